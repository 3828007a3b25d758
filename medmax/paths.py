"""Paths read from data files stay inside their declared root (CSV image folder, --image-root, eval data),
and a program's output never lands on one of its inputs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import UserError


class PathEscapeError(UserError):
    """A path from a data file resolves (through '..' or a link) to somewhere outside its root."""


def resolve_inside(root: str | Path, rel: str | Path) -> Path:
    """``root / rel`` with links resolved; raises PathEscapeError when that lies outside ``root``."""
    root = Path(root).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise PathEscapeError(f"{str(rel)!r} leaves {root}")
    return path


def output_target(output: str | Path) -> Path:
    """The folder an output path names, with symbolic links followed (also a link whose target is not made yet).

    A program that builds ``OUT.partial`` beside its output and renames it onto ``OUT`` works beside this path:
    renaming onto the link's own name would fail (a link is not a folder), stranding the finished work in
    ``.partial``, or replace the link. The user's link keeps pointing at the finished output.
    """
    return Path(output).absolute().resolve()


def check_apart(output: str | Path, written: Iterable[str | Path], inputs: Iterable[str | Path]) -> None:
    """Refuse an ``output`` that is, or holds, one of ``inputs`` before anything is written.

    ``written`` are the paths the program writes (the output and its work or side files); links are
    resolved, so a link to an input is that input. Every program with an ``--output`` and inputs checks here.
    """
    targets = [Path(w).resolve() for w in written]
    for path in inputs:
        resolved = Path(path).resolve()
        for target in targets:
            if resolved == target or target in resolved.parents:
                where = "is" if resolved == target else "is inside"
                raise UserError(f"--output {output}: the input {path} {where} {target}, which this run writes; "
                                "choose an output apart from the inputs")
