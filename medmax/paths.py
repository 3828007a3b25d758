"""Paths read from data files stay inside their declared root (CSV image folder, --image-root, eval data)."""

from __future__ import annotations

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
