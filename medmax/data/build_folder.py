"""A sequence folder built beside itself, so that no build destroys input or deletes a file it did not write.

A build never writes into ``OUT`` while it runs. It works in the sibling ``OUT.partial`` (created by the
build and marked as its own by a ``.build_sequences.json`` file), and only when everything is written:

1. an old ``OUT`` -- which may hold nothing but the files its manifest lists as written -- is renamed
   ``OUT.old``;
2. ``OUT.partial`` is renamed ``OUT``;
3. the files ``OUT.old``'s manifest lists are deleted (the manifest last), then its folders if empty.

A kill at any point leaves the old output or the new one whole, plus ``OUT.partial`` for ``--resume``
(which also starts from a finished ``OUT``: its shards are hard-linked, not copied, into the work folder).
Before any work :meth:`BuildFolder.check` refuses an output folder that is or contains an input, and an
existing ``OUT`` (or ``OUT.old``) holding any file its manifest does not list. Inside ``OUT.partial``, a
folder the build created itself, a fresh start removes only the names a build writes there and refuses
anything else.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from pathlib import Path

from ..errors import UserError
from ..paths import check_apart, output_target
from .shards import FORMAT_NAME, MANIFEST, PROGRESS, written_files

logger = logging.getLogger(__name__)

MARKER = ".build_sequences.json"
# What a build writes in its own work folder (the only names a fresh start there removes).
_WORK_NAMES = (MARKER, MANIFEST, "errors.jsonl", "errors.jsonl.tmp", "part-*.parquet", "part-*.parquet.tmp",
               f"{PROGRESS}/done-*.json", f"{PROGRESS}/done-*.json.tmp", f"{PROGRESS}/errors-*.jsonl")


class BuildFolder:
    """``OUT`` and its work folder ``OUT.partial``: check, start, finish (see the module docstring)."""

    def __init__(self, output: str | Path):
        self.path = output_target(output)  # a symlinked OUT is built, and swapped in, where it points
        if not self.path.name:
            raise UserError(f"--output {output}: give a folder below the file system root")
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.old = self.path.with_name(self.path.name + ".old")

    # -- before any work ----------------------------------------------------------------------

    def check(self, inputs: list[Path]) -> None:
        """Refuse an output that is or contains an input, or that holds files a build did not write."""
        check_apart(self.path, (self.path, self.partial), inputs)
        for folder in (self.path, self.old):
            foreign = _foreign_files(folder)
            if foreign:
                raise UserError(
                    f"--output {self.path}: {folder} holds files build_sequences did not write ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder (nothing was changed)"
                )
        if self.partial.exists() and not (self.partial / MARKER).is_file():
            raise UserError(f"--output {self.path}: {self.partial} exists but was not made by build_sequences; move it away")

    # -- the work folder ----------------------------------------------------------------------

    def start(self, resume: bool) -> Path:
        """``OUT.partial``: as a killed build left it (``resume``), else fresh; returns it."""
        if self.partial.exists() and not resume:
            _clear_work_folder(self.partial)
        if not self.partial.exists():
            self.partial.mkdir(parents=True)
            (self.partial / MARKER).write_text(json.dumps({"format": FORMAT_NAME, "output": str(self.path)}) + "\n")
            if resume and (self.path / MANIFEST).is_file():
                self._link_finished_output()
        (self.partial / PROGRESS).mkdir(exist_ok=True)
        return self.partial

    def _link_finished_output(self) -> None:
        """Resume from a finished ``OUT``: hard-link its shards and progress records into the work folder."""
        manifest = json.loads((self.path / MANIFEST).read_text())
        for rel in written_files(manifest):
            source, target = self.path / rel, self.partial / rel
            if rel in (MANIFEST, "errors.jsonl") or not source.is_file():
                continue  # both are written afresh
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # a file system without hard links
                shutil.copy2(source, target)

    def written(self) -> list[str]:
        """Every file in the work folder (all written by this build), relative, sorted; the marker excluded."""
        return sorted(str(p.relative_to(self.partial)) for p in self.partial.rglob("*") if p.is_file() and p.name != MARKER)

    # -- the swap -----------------------------------------------------------------------------

    def finish(self) -> None:
        """Swap the complete work folder in for ``OUT`` and remove the old output's own files."""
        if self.old.exists():
            _remove_written(self.old)  # a build killed between the two renames below
        if self.path.exists():
            if any(self.path.iterdir()):
                self.path.rename(self.old)
            else:
                self.path.rmdir()
        self.partial.rename(self.path)
        (self.path / MARKER).unlink()
        if self.old.exists():
            _remove_written(self.old)


def _foreign_files(folder: Path) -> list[str]:
    """Files in an existing output folder that its manifest does not list (all of them without a manifest)."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        return [folder.name]
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    if not files:
        return []
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        owned = set(written_files(manifest)) if manifest.get("format") == FORMAT_NAME else set()
    except (OSError, ValueError, KeyError, AttributeError):
        owned = set()
    return [f for f in files if f not in owned | {MARKER}]


def _remove_written(folder: Path) -> None:
    """Delete the files a folder's manifest lists (the manifest last), then its folders if empty."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for rel in [MARKER, *written_files(manifest)]:
        (folder / rel).unlink(missing_ok=True)
    _remove_empty_folders(folder)
    if folder.exists():
        logger.warning("%s still holds files build_sequences did not write; left in place", folder)


def _clear_work_folder(folder: Path) -> None:
    """Remove an earlier build's work folder: only the names a build writes there; anything else refuses."""
    files = [p for p in folder.rglob("*") if not p.is_dir()]
    foreign = [str(p.relative_to(folder)) for p in files if not any(fnmatch.fnmatch(str(p.relative_to(folder)), n) for n in _WORK_NAMES)]
    if foreign:
        raise UserError(f"{folder} holds files build_sequences did not write ({', '.join(foreign[:3])}); move them away")
    for path in files:
        path.unlink()
    _remove_empty_folders(folder)


def _remove_empty_folders(folder: Path) -> None:
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [folder]:
        try:
            path.rmdir()
        except OSError:
            pass  # not empty: it holds something this build did not write
