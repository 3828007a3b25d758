"""Volume rows for image tokenization (:mod:`medmax.image_tokenizing`): a CSV row naming a volume -> its chosen
slices as uint8 pixels (:func:`load_volume_row`) -> their codes (:func:`encode_volume`).

A row names a NIfTI file, a DICOM series folder or a ``.npy`` array (:mod:`medmax.volumes`), relative to the
image root and never outside it. Its slices are chosen by the run's ``slices`` rule (``K`` evenly spaced along
z, or ``all``) or by the row's own list in the ``slice_column`` (``3 7 12``, ``3;7;12`` or ``[3, 7, 12]``; an
empty cell uses the rule). Each slice is windowed to uint8 (:class:`medmax.volumes.Intensity`), resized and
centre-cropped to ``slice_resolution`` by Chameleon's rule and encoded by the VQGAN in chunks of
``batch_size`` slices. A row's key (what its partition digest and the duplicate check see) is its path, plus
its slice list when there is a slice column, so editing a row's list redoes its partition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .image_csv import resolve_image
from .image_tokens import VolumeCodes
from .images import ImageLimits, VolumeError
from .volumes import Intensity, choose_slices, open_volume, slice_pixels

if TYPE_CHECKING:
    from .vqgan import VQGAN

_KEY_SEP = "\x00"  # no file path holds a NUL: path and slice list in one row key


def row_key(path: str, slice_list: str | None) -> str:
    """The key of a CSV row: its path, and its slice list when the run reads one."""
    return path if slice_list is None else f"{path}{_KEY_SEP}{slice_list}"


def split_key(key: str) -> tuple[str, str | None]:
    path, _, listed = key.partition(_KEY_SEP)
    return path, (listed if _KEY_SEP in key else None)


def parse_slice_list(text: str, name: str) -> list[int] | None:
    """``"3 7 12"`` / ``"3;7;12"`` / ``"[3, 7, 12]"`` -> [3, 7, 12]; empty -> None (the run's rule)."""
    text = text.strip()
    if not text:
        return None
    if not re.fullmatch(r"\[?\s*-?\d+(\s*[,; ]\s*-?\d+)*\s*\]?", text):
        raise VolumeError(name, f"slice list {text!r}: give slice numbers such as '3 7 12' or '[3, 7, 12]'")
    return [int(v) for v in re.findall(r"-?\d+", text)]


@dataclass(frozen=True)
class VolumeRule:
    """The run's settings that decide a volume's slices and pixels."""

    root: Path
    slices: str  # "K" or "all"
    resolution: int | None  # slice side after resize and crop; None: as read (a prompt's VQGAN resizes it)
    intensity: Intensity
    volume_index: int | None
    limits: ImageLimits


@dataclass
class VolumeSlices:
    """A volume's chosen slices, ready to encode."""

    pixels: np.ndarray  # (K, R, R) uint8, inferior to superior (rows x columns as read when no resolution)
    slice_indices: list[int]
    positions_mm: list[float] | None
    spacing_mm: list[float] | None
    window: str
    geometry: dict


def load_volume_row(key: str, rule: VolumeRule) -> VolumeSlices:
    """Read one row's volume (raises ``ImageLoadError`` / ``VolumeError`` naming the file and the reason)."""
    path, listed = split_key(key)
    volume = open_volume(resolve_image(rule.root, path), rule.volume_index)
    try:
        h, w = (volume.source.shape[s] for s in range(3) if s != volume.slice_axis)
        rule.limits.check(w, h, path)
        wanted = parse_slice_list(listed, path) if listed is not None else None
        slices = choose_slices(volume.n_slices, wanted if wanted is not None else rule.slices, path)
        lo, hi = volume.bounds(slices, rule.intensity)
        pixels = [None] * len(slices)
        place = {k: j for j, k in enumerate(slices)}
        for k, grey in volume.read_uint8(slices, lo, hi):
            pixels[place[k]] = grey if rule.resolution is None else slice_pixels(grey, rule.resolution)
        geometry = {**volume.describe(), "window_bounds": [round(lo, 4), round(hi, 4)]}
        return VolumeSlices(np.stack(pixels), slices, volume.positions(slices), volume.spacing(), rule.intensity.spec, geometry)
    finally:
        volume.close()


def encode_volume(model: VQGAN, volume: VolumeSlices, device, chunk: int) -> VolumeCodes:
    """The slices' codes, ``chunk`` slices per forward pass (fp32 codes do not depend on it)."""
    import torch

    codes = []
    for start in range(0, len(volume.pixels), chunk):
        grey = torch.from_numpy(volume.pixels[start:start + chunk])  # (B, R, R) uint8
        pixels = (grey.to(torch.float64) / 255.0 * 2 - 1).to(torch.float32)  # as medmax.images.preprocess rounds
        pixels = pixels[:, None].expand(-1, 3, -1, -1).contiguous()  # (B, 3, R, R): grey in every channel
        codes.append(model.encode_codes(pixels.to(device)).to(torch.int32).cpu().numpy())  # (B, h*w)
    side = volume.pixels.shape[1] // (model.resolution // model.grid_shape[0])
    return VolumeCodes(np.concatenate(codes), volume.slice_indices, volume.positions_mm, (side, side), volume.spacing_mm,
                       volume.window, volume.geometry)
