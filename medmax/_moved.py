"""Module names from before ``medmax.data`` (issue 14), kept importable: each gives the module that took its job.

``import medmax.training_data`` returns ``medmax.data.loader`` itself (the same module object, so its
classes and errors are the same ones); ``medmax.dataset_io`` was split in two, and its old name reads
attributes from both halves. New code imports ``medmax.data.*``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

MOVED = {
    "medmax.sequences": ("medmax.data.rows",),
    "medmax.sequence_dataset": ("medmax.data.build",),
    "medmax.build_folder": ("medmax.data.build_folder",),
    "medmax.passthrough": ("medmax.data.passthrough",),
    "medmax.training_data": ("medmax.data.loader",),
    "medmax.dataset_io": ("medmax.data.shards", "medmax.data.inputs"),
}


def _joined(name: str, targets: tuple[str, ...]) -> types.ModuleType:
    """A module whose attributes are looked up, live, in each of ``targets`` in turn."""
    modules = [importlib.import_module(t) for t in targets]
    joined = types.ModuleType(name, f"Moved to {' and '.join(targets)}.")

    def __getattr__(attr: str):
        for module in modules:
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {name!r} (now {' and '.join(targets)}) has no attribute {attr!r}")

    joined.__getattr__ = __getattr__
    return joined


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        targets = MOVED[spec.name]
        return importlib.import_module(targets[0]) if len(targets) == 1 else _joined(spec.name, targets)

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before the path finders: the old files must not shadow it
