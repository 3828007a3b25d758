"""Library configs refuse a bad value with a UserError subclass naming the setting, never a bare ValueError."""

from __future__ import annotations

import pytest

from medmax.data.build import BuildConfig
from medmax.data.passthrough import ColumnFilter
from medmax.data.rows import SequenceConfig
from medmax.dpo import DPOLoss
from medmax.errors import UserError
from medmax.image_tokenizing import TokenizeConfig


@pytest.mark.parametrize("make, named", [
    (lambda tmp: BuildConfig(inputs=["x"], tokenizer="t", output=str(tmp / "o"), workers=0), "--workers"),
    (lambda tmp: BuildConfig(inputs=["x"], tokenizer="t", output=str(tmp / "o"), image_root="r"), "--image-root"),
    (lambda tmp: SequenceConfig(max_length=2), "--max-length"),
    (lambda tmp: ColumnFilter(keep=("a",), drop=("b",)), "--keep and --drop"),
    (lambda tmp: DPOLoss(beta=0), "dpo_beta"),
    (lambda tmp: TokenizeConfig(input=tmp / "none.csv", output=tmp / "o", ckpt=tmp), "--input"),
])
def test_a_bad_setting_is_a_user_error_naming_it(make, named, tmp_path):
    with pytest.raises(UserError, match=named) as info:
        make(tmp_path)
    assert type(info.value) is not UserError  # a subclass that says which room refused it
