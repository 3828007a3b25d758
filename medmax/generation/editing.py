"""Inpainting: an edit region on the code grid, and the codes outside it forced from the input image.

A token model inpaints exactly and cheaply: the image loop draws the grid's codes in raster order, and a
code outside the region is not drawn but forced to the input image's code at that place (its guided
distribution becomes a point mass on that code), so every code outside the region equals the input's,
and the codes inside are drawn conditioned on everything before them, forced codes included. Speculative
Jacobi decoding verifies the same point masses (a draft of the forced code is always accepted, any other
always rejected), so both decodings keep the outside exact.

A region is given in the input image's pixels, as a box ``x0,y0,x1,y1`` (``x1``, ``y1`` exclusive) or a
mask image of the input's size (non-zero = edit), or directly on the code grid as a mask image of the
grid's size (``w x h`` pixels, one per code). Pixel regions go through the same resize and centre crop
the VQGAN's input does (``medmax.images.resize_and_crop``); a code is in the region when any of its
pixels is. :func:`region_from_spec` checks everything it can without the model: a box outside the image,
an empty mask, a region the centre crop cuts away, a mask of neither the image's nor the grid's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError


class EditMaskError(UserError):
    """An edit region that cannot apply to its image or model."""


@dataclass(frozen=True)
class EditRegion:
    """Which codes an image-mode generation draws: ``region`` (h, w) bool, True = drawn; every other code is copied
    from the prompt's image number ``source`` (0 = its first image)."""

    region: np.ndarray
    source: int = 0

    def __post_init__(self):
        region = np.asarray(self.region, dtype=bool)
        if region.ndim != 2:
            raise EditMaskError(f"edit region: expected a 2-d grid of booleans, got shape {region.shape}")
        if not region.any():
            raise EditMaskError("edit region: empty (no code is to be drawn)")
        object.__setattr__(self, "region", region)


def model_grid(model_dir: str | Path) -> tuple[int, tuple[int, int]]:
    """(resolution, (h, w) code grid) of a model folder's VQGAN, read from ``vqgan/vqgan.yaml`` alone (no weights)."""
    from ..vqgan import YAML_NAME, read_vqgan_yaml

    path = Path(model_dir) / "vqgan" / YAML_NAME
    if not path.is_file():
        raise EditMaskError(f"--edit-mask: {model_dir} has no vqgan/{YAML_NAME}; inpainting needs the model's VQGAN")
    dd = read_vqgan_yaml(path)["ddconfig"]
    side = int(dd["resolution"]) // 2 ** (len(dd["ch_mult"]) - 1)
    return int(dd["resolution"]), (side, side)


def _crop_geometry(size: tuple[int, int], resolution: int) -> tuple[float, int, int]:
    """(scale, x offset, y offset) of ``resize_and_crop`` for an image of ``size`` (w, h)."""
    w, h = size
    scale = resolution / min(w, h)
    return scale, (round(scale * w) - resolution) // 2, (round(scale * h) - resolution) // 2


def region_from_box(box: tuple[float, float, float, float], size: tuple[int, int], resolution: int,
                    grid: tuple[int, int], label: str = "--edit-mask") -> np.ndarray:
    """(h, w) bool: the codes a pixel box ``x0, y0, x1, y1`` of an image of ``size`` (w, h) touches; errors start
    with ``label`` (the setting's name)."""
    x0, y0, x1, y1 = box
    w, h = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise EditMaskError(f"{label} {x0:g},{y0:g},{x1:g},{y1:g}: outside the {w}x{h} image or empty "
                            "(need 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height)")
    scale, ox, oy = _crop_geometry(size, resolution)
    cell_h, cell_w = resolution / grid[0], resolution / grid[1]
    xs = (np.arange(grid[1]) * cell_w, (np.arange(grid[1]) + 1) * cell_w)
    ys = (np.arange(grid[0]) * cell_h, (np.arange(grid[0]) + 1) * cell_h)
    in_x = (x0 * scale - ox < xs[1]) & (x1 * scale - ox > xs[0])  # (w,) columns the box overlaps
    in_y = (y0 * scale - oy < ys[1]) & (y1 * scale - oy > ys[0])  # (h,)
    region = in_y[:, None] & in_x[None, :]
    if not region.any():
        raise EditMaskError(f"{label} {x0:g},{y0:g},{x1:g},{y1:g}: the box lies outside the centre square the model "
                            f"sees of the {w}x{h} image")
    return region


def region_from_mask(mask: np.ndarray, size: tuple[int, int], resolution: int, grid: tuple[int, int],
                     name: str = "mask") -> np.ndarray:
    """(h, w) bool from a mask (H, W) of non-zero pixels to edit: of the image's size (pixels) or the grid's (codes)."""
    mask = np.asarray(mask) != 0
    w, h = size
    if not mask.any():
        raise EditMaskError(f"--edit-mask {name}: empty (no non-zero pixel marks a region to edit)")
    if mask.shape == (h, w):
        scale, ox, oy = _crop_geometry(size, resolution)
        ys, xs = np.nonzero(mask)
        col = np.floor(((xs + 0.5) * scale - ox) / (resolution / grid[1])).astype(int)
        row = np.floor(((ys + 0.5) * scale - oy) / (resolution / grid[0])).astype(int)
        keep = (col >= 0) & (col < grid[1]) & (row >= 0) & (row < grid[0])
        if not keep.any():
            raise EditMaskError(f"--edit-mask {name}: the marked pixels lie outside the centre square the model sees")
        region = np.zeros(grid, dtype=bool)
        region[row[keep], col[keep]] = True
        return region
    if mask.shape == tuple(grid):
        return mask
    raise EditMaskError(f"--edit-mask {name}: {mask.shape[1]}x{mask.shape[0]} pixels, neither the input image's "
                        f"{w}x{h} nor the model's {grid[1]}x{grid[0]} code grid")


def parse_box(spec: str) -> tuple[float, ...] | None:
    """``"x0,y0,x1,y1"`` -> four numbers; None when ``spec`` is not four comma-separated numbers (a mask file then)."""
    parts = spec.split(",")
    if len(parts) != 4:
        return None
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        return None


def region_from_spec(spec: str, image: Image.Image, resolution: int, grid: tuple[int, int]) -> np.ndarray:
    """``--edit-mask``'s value (a box ``x0,y0,x1,y1`` or a mask image's path) on ``image`` -> (h, w) bool region."""
    box = parse_box(spec)
    if box is not None:
        return region_from_box(box, image.size, resolution, grid)
    from ..images import load_image

    path = Path(spec)
    if not path.is_file():
        raise EditMaskError(f"--edit-mask {spec}: neither a box x0,y0,x1,y1 nor an existing mask image")
    mask = np.asarray(load_image(path).convert("L"))
    return region_from_mask(mask, image.size, resolution, grid, name=spec)


def forced_codes(region: np.ndarray, source_codes, n_codes: int) -> list[int]:
    """(n,) the code each grid place is forced to (the source's), or -1 where the region draws it."""
    region = np.asarray(region, dtype=bool).reshape(-1)
    codes = np.asarray(list(source_codes), dtype=np.int64).reshape(-1)
    if region.size != n_codes or codes.size != n_codes:
        raise EditMaskError(f"edit region: {region.size} places and {codes.size} source codes for a grid of {n_codes}")
    return np.where(region, -1, codes).tolist()


def check_edits(edits, prompts: list[list], mode: str, grid: tuple[int, int], layout: str = "fixed") -> None:
    """Before any model work: one edit (or None) per prompt, image mode, the fixed layout, a region of the grid's
    shape, a source image."""
    from .prompts import ImageCodes

    if len(edits) != len(prompts):
        raise EditMaskError(f"generate: {len(edits)} edits for {len(prompts)} prompts")
    if mode != "image" and any(e is not None for e in edits):
        raise EditMaskError(f"an edit region (inpainting) needs mode 'image', not {mode!r}")
    if layout != "fixed" and any(e is not None for e in edits):
        raise EditMaskError("an edit region (inpainting) works in the fixed image layout only, not with "
                            "--image-layout shaped or --size")
    for i, (edit, segs) in enumerate(zip(edits, prompts)):
        if edit is None:
            continue
        if edit.region.shape != tuple(grid):
            raise EditMaskError(f"prompt {i}: edit region of {edit.region.shape[1]}x{edit.region.shape[0]} codes, but the "
                                f"model's VQGAN has a {grid[1]}x{grid[0]} code grid")
        n_images = sum(isinstance(s, (Image.Image, ImageCodes)) for s in segs)
        if not 0 <= edit.source < n_images:
            raise EditMaskError(f"prompt {i}: the edit region copies image {edit.source}, but the prompt has "
                                f"{n_images} image(s); inpainting needs an input image")
