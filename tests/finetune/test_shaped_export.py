"""The shaped image layout survives export to Meta's layout (finetune.export --format chameleon) and back."""

from __future__ import annotations

import json

from finetune.convert import main as convert_main
from finetune.export import main as export_main
from medmax.generation import GenerationConfig, Generator
from medmax.image_layout import END_OF_LINE, MAX_SIDE, size_token


def test_shaped_generation_is_unchanged_through_meta_layout(tiny_model_dir, tmp_path):
    assert export_main(["--checkpoint", str(tiny_model_dir), "--output", str(tmp_path / "meta"), "--format", "chameleon"]) == 0
    vocab = json.loads((tmp_path / "meta" / "tokenizer" / "text_tokenizer.json").read_text())["model"]["vocab"]
    assert vocab[END_OF_LINE] == 8603 and vocab[size_token(1)] == 8605 and vocab[size_token(MAX_SIDE)] == 8709
    assert convert_main(["--input", str(tmp_path / "meta"), "--output", str(tmp_path / "back")]) == 0
    cfg = GenerationConfig(mode="image", image_size=(32, 48), image_temperature=0.0, decoding="sjd")
    before = Generator.from_dir(tiny_model_dir).generate([["a wide scan"]], cfg)[0]
    after = Generator.from_dir(tmp_path / "back").generate([["a wide scan"]], cfg)[0]
    assert after.token_ids == before.token_ids and after.images[0].grid == (4, 6)
    assert after.images[0].image.size == (48, 32)
