"""The module names from before medmax.data still import, as the very modules that took their jobs (issue 14)."""

from __future__ import annotations

import importlib

import pytest

from medmax._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_name_gives_the_new_module(old):
    targets = MOVED[old]
    module = importlib.import_module(old)
    if len(targets) == 1:
        assert module is importlib.import_module(targets[0])
    else:  # split in two: every public name of each half is reachable, and is the same object
        for target in map(importlib.import_module, targets):
            for name in (n for n in vars(target) if not n.startswith("__")):
                assert getattr(module, name) is getattr(target, name) or any(
                    hasattr(importlib.import_module(t), name) for t in targets[: targets.index(target.__name__)])


def test_names_the_readme_and_other_programs_use_still_import():
    from medmax.dataset_io import ERRORS, ShardWriter, iter_row_batches, read_manifest  # noqa: F401
    from medmax.training_data import DataError, SequenceDataset, pack_greedy, write_sequences  # noqa: F401

    assert issubclass(DataError, ValueError)


def test_an_unknown_name_on_a_split_module_is_an_attribute_error_naming_both_halves():
    import medmax.dataset_io as old

    with pytest.raises(AttributeError, match="medmax.data.shards and medmax.data.inputs"):
        old.no_such_name  # noqa: B018
