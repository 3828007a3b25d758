"""3D volumes in: a NIfTI file, a folder holding one DICOM series, or a ``.npy`` array, read slice by slice.

:func:`open_volume` returns a :class:`Volume` without reading a voxel; :meth:`Volume.read_uint8` reads the
chosen slices one at a time, so a volume is never held whole, and never as float64 (a slice is float32
between reading and windowing):

- **NIfTI** (``.nii``, ``.nii.gz``) through nibabel's array proxy (the file stays open, so a gzip stream is
  read forward once, not restarted for every slice). A 4D file needs ``volume_index`` (which 3D volume).
- **DICOM series**: every file of the folder is read header-first (pixel data deferred); files that are not
  DICOM, or a ``DICOMDIR``, are skipped and counted (:attr:`Volume.skipped_files`). The folder must hold one
  series (one ``SeriesInstanceUID``), one slice size and one orientation. Slices are ordered by
  ``ImagePositionPatient`` projected on the slice normal (the cross product of the two
  ``ImageOrientationPatient`` directions), falling back to ``InstanceNumber`` when a file lacks them; a
  duplicated position or a gap (a step over 1.5 times the median step) is refused, naming the positions.
  ``RescaleSlope`` / ``RescaleIntercept`` are applied, so CT slices are in Hounsfield units.
- **``.npy``** (MultiMeditron's and M3D's volumes): ``np.load(allow_pickle=False, mmap_mode="r")``, shape
  ``(D, H, W)`` or channel-first ``(C, D, H, W)`` (``volume_index`` picks the channel when ``C > 1``). Such an
  array has no geometry: its axis order is taken as (slice, row, column) and the spacing is unknown.

**Geometry.** Every volume is reoriented to one canonical orientation, **LPS** (DICOM's patient
coordinates: +x toward the patient's left, +y posterior, +z superior) before slicing: the voxel-to-world
affine (NIfTI's RAS affine with x and y negated; DICOM's from its position, orientation and pixel spacing) is
reduced to the closest axis permutation and flips (``nibabel.orientations.io_orientation``), and slices are
taken along z (axial), ordered inferior to superior. Each slice is an image whose rows run anterior to
posterior and whose columns run from the patient's right to left: the radiological display convention,
whatever the source's axis order. :meth:`Volume.describe` records the source's axis codes, which source axis
the slices run along, the spacing (slice, row, column in mm) and each slice's z position in mm.

**Intensity** (:class:`Intensity`): a CT window by name (:data:`WINDOWS`) or as ``W/L`` in HU, or
``percentile``: the 0.5th and 99.5th percentiles of the volume's voxels (taken on every 4th row and column of
every chosen slice, NaN and inf left out) map to black and white, the usual normalisation for MRI, whose values
have no unit. A NaN voxel (no value, e.g. outside a processed MRI's brain mask) is black.

Anything that cannot be read raises :class:`medmax.images.VolumeError` (an ``ImageLoadError``) naming the
file and the reason: a truncated file, a DICOM slice without pixel data, a gap, a 4D file without
``volume_index``, a path outside the image root (:func:`medmax.paths.resolve_inside`, checked by callers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .dicom_series import DicomSeries
from .images import VolumeError, resize_and_crop

logger = logging.getLogger(__name__)

CANONICAL = "LPS"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".npy")
# Standard CT windows, (width, level) in HU, as Radiopaedia's "Windowing (CT)" article lists them
# (https://radiopaedia.org/articles/windowing-ct): brain W:80 L:40, lungs W:1500 L:-600, mediastinum
# W:350 L:50, bone W:1800 L:400, soft tissue (abdomen) W:400 L:50.
WINDOWS = {"brain": (80.0, 40.0), "lung": (1500.0, -600.0), "mediastinum": (350.0, 50.0), "bone": (1800.0, 400.0),
           "abdomen": (400.0, 50.0)}
PERCENTILES = (0.5, 99.5)
_SAMPLE_STRIDE = 4  # percentiles are taken on every 4th row and column of the chosen slices
_LPS_LABELS = (("R", "L"), ("A", "P"), ("I", "S"))  # world axis -> (negative, positive) code in LPS


def is_volume_path(path: str | Path) -> bool:
    """A NIfTI file, a ``.npy`` array or a folder (a DICOM series): what :func:`open_volume` reads."""
    name = str(path).lower()
    return name.endswith(VOLUME_SUFFIXES) or Path(path).is_dir()


# ------------------------------------------------------------------------------------------------ intensity


@dataclass(frozen=True)
class Intensity:
    """How voxel values become grey levels: ``window`` (width, level in HU) or the :data:`PERCENTILES`."""

    spec: str  # as the user gave it: a name of WINDOWS, "W/L", or "percentile"
    window: tuple[float, float] | None  # (width, level); None for percentile

    @classmethod
    def parse(cls, spec: str) -> Intensity:
        """``lung`` / ``400/50`` / ``percentile`` -> the intensity rule (ValueError naming the choices)."""
        spec = str(spec).strip().lower()
        if spec == "percentile":
            return cls(spec, None)
        if spec in WINDOWS:
            return cls(spec, WINDOWS[spec])
        try:
            width, level = (float(x) for x in spec.split("/"))
        except ValueError:
            raise ValueError(f"window {spec!r}: give one of {', '.join(WINDOWS)}, W/L in HU (e.g. 400/50) or percentile") from None
        if not width > 0:
            raise ValueError(f"window {spec!r}: the width must be positive")
        return cls(spec, (width, level))

    def describe(self) -> dict:
        """What the manifest states about it."""
        if self.window is None:
            return {"rule": "percentile", "percentiles": list(PERCENTILES), "sample_stride": _SAMPLE_STRIDE}
        return {"rule": "window", "name": self.spec if self.spec in WINDOWS else None, "width": self.window[0], "level": self.window[1]}

    def bounds(self, samples: list[np.ndarray]) -> tuple[float, float]:
        """The values that map to black and white (``samples``: subsampled slices, for percentiles)."""
        if self.window is not None:
            width, level = self.window
            return level - width / 2, level + width / 2
        values = np.concatenate([s.ravel() for s in samples]) if samples else np.zeros(1, np.float32)
        values = values[np.isfinite(values)]  # NaN (no value, e.g. outside a mask) and inf take no part
        if not values.size:
            return 0.0, 0.0
        lo, hi = np.percentile(values, PERCENTILES)
        return float(lo), float(hi)


def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 slice -> uint8: ``lo..hi`` to 0..255, clipped and rounded (a constant range is black; NaN, a voxel
    without a value, is black; -inf and inf are clipped like any value out of range)."""
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.clip(values, lo, hi) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(np.nan_to_num(scaled, nan=0.0)).astype(np.uint8)


def slice_pixels(grey: np.ndarray, resolution: int) -> np.ndarray:
    """A uint8 slice -> (R, R) uint8 by Chameleon's resize and centre crop (:func:`medmax.images.resize_and_crop`)."""
    image = resize_and_crop(Image.fromarray(grey, mode="L").convert("RGB"), resolution)
    return np.asarray(image, dtype=np.uint8)[:, :, 0].copy()


# ------------------------------------------------------------------------------------------------ sources


class _NiftiSource:
    """A NIfTI file through nibabel's array proxy; one 3D volume of it (``volume_index`` of a 4D file)."""

    kind = "nifti"

    def __init__(self, path: Path, volume_index: int | None):
        import nibabel as nib

        self.name = str(path)
        try:
            self.img = nib.load(path, keep_file_open=True, mmap=False)  # read, not mapped: RSS stays one slice
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad header
            raise VolumeError(self.name, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
        shape = tuple(int(n) for n in self.img.shape)
        self.extra = _pick_volume(self.name, shape, volume_index, "4D NIfTI file")
        self.shape = shape[:3]
        self.affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.img.affine  # RAS -> LPS world
        self.modality = None

    def read(self, axis: int, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        for i in indices:
            index = tuple(i if d == axis else slice(None) for d in range(3)) + self.extra
            try:
                plane = np.asarray(self.img.dataobj[index], dtype=np.float32)
            except Exception as exc:  # noqa: BLE001 - EOFError, zlib.error, OSError ... : a truncated file
                raise VolumeError(self.name, f"truncated or unreadable voxel data at slice {i} ({type(exc).__name__}: {exc})") from None
            yield i, plane

    def close(self) -> None:
        self.img = None  # the array proxy closes the file it kept open when it goes


class _NpySource:
    """A ``.npy`` array, memory-mapped: (D, H, W) or channel-first (C, D, H, W)."""

    kind = "npy"

    def __init__(self, path: Path, volume_index: int | None):
        self.name = str(path)
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise VolumeError(self.name, f"not a readable .npy array ({exc})") from None
        if not isinstance(self.array, np.ndarray) or not np.issubdtype(self.array.dtype, np.number) or np.iscomplexobj(self.array):
            raise VolumeError(self.name, f"a .npy volume holds real numbers, this one {getattr(self.array, 'dtype', type(self.array))}")
        shape = tuple(int(n) for n in self.array.shape)
        if len(shape) == 4:  # channel-first, as MultiMeditron's VolumeProcessor and M3D's arrays are
            shape = shape[1:] + shape[:1]
            self.array = np.moveaxis(self.array, 0, -1)
        self.extra = _pick_volume(self.name, shape, volume_index, "4D array (C, D, H, W)")
        self.shape = shape[:3]
        self.affine_lps = None
        self.modality = None

    def read(self, axis: int, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        for i in indices:
            index = tuple(i if d == axis else slice(None) for d in range(3)) + self.extra
            yield i, np.asarray(self.array[index], dtype=np.float32)

    def close(self) -> None:
        self.array = None


def _pick_volume(name: str, shape: tuple[int, ...], volume_index: int | None, what: str) -> tuple:
    """The index that picks one 3D volume of a 4D source: () for 3D; refuses 4D without ``volume_index``."""
    if len(shape) < 3 or len(shape) > 4 or min(shape) < 1:
        raise VolumeError(name, f"a volume has 3 dimensions (or 4 with --volume-index), this one has shape {shape}")
    if len(shape) == 3 or shape[3] == 1:
        if volume_index not in (None, 0):
            raise VolumeError(name, f"--volume-index {volume_index}: the file holds one volume")
        return () if len(shape) == 3 else (0,)
    if volume_index is None:
        raise VolumeError(name, f"{what} with {shape[3]} volumes: pick one with --volume-index (0..{shape[3] - 1})")
    if not 0 <= volume_index < shape[3]:
        raise VolumeError(name, f"--volume-index {volume_index} is outside 0..{shape[3] - 1}")
    return (volume_index,)


# ------------------------------------------------------------------------------------------------ volume


@dataclass
class Volume:
    """One volume, canonical (LPS) once read: slices along z, inferior to superior; nothing read yet."""

    path: str
    source: object  # _NiftiSource, _NpySource or medmax.dicom_series.DicomSeries
    axes: list[tuple[int, int]]  # source axis -> (canonical axis 0=x 1=y 2=z, +1 or -1)
    skipped_files: int = 0  # files of a DICOM folder that are not DICOM slices

    @property
    def slice_axis(self) -> int:
        """The source axis the canonical slices run along."""
        return next(s for s, (a, _) in enumerate(self.axes) if a == 2)

    @property
    def n_slices(self) -> int:
        return self.source.shape[self.slice_axis]

    def spacing(self) -> list[float] | None:
        """(slice, row, column) spacing in mm, None when the source has no geometry (``.npy``)."""
        if self.source.affine_lps is None:
            return None
        sizes = np.sqrt((self.source.affine_lps[:3, :3] ** 2).sum(axis=0))  # (3,) mm per source axis
        by_canonical = {a: float(sizes[s]) for s, (a, _) in enumerate(self.axes)}
        return [round(by_canonical[2], 6), round(by_canonical[1], 6), round(by_canonical[0], 6)]

    def positions(self, slices: list[int]) -> list[float] | None:
        """z (LPS, mm) of each canonical slice's first voxel; None without geometry."""
        affine = self.source.affine_lps
        if affine is None:
            return None
        s, (_, flip) = self.slice_axis, self.axes[self.slice_axis]
        n = self.n_slices
        return [round(float(affine[2, s] * (k if flip > 0 else n - 1 - k) + affine[2, 3]), 4) for k in slices]

    def describe(self) -> dict:
        """Geometry for a manifest or a row: source kind, source axis codes, slice axis, spacing, canonical."""
        codes = None
        if self.source.affine_lps is not None:
            from nibabel.orientations import aff2axcodes

            codes = "".join(aff2axcodes(self.source.affine_lps, labels=_LPS_LABELS))
        return {"kind": self.source.kind, "source_shape": list(self.source.shape), "source_axcodes": codes,
                "source_axis": self.slice_axis, "canonical": CANONICAL, "n_slices": self.n_slices,
                "spacing_mm": self.spacing(), "modality": self.source.modality, "skipped_files": self.skipped_files}

    def read_slices(self, slices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """``(k, float32 slice)`` for each canonical slice k, one at a time, rows A->P, columns R->L.

        They come in the source's order (a z-flipped file gives its superior slices first), so that a gzip
        stream is read forward once: callers place each slice by its ``k``.
        """
        axis, (_, flip) = self.slice_axis, self.axes[self.slice_axis]
        n = self.n_slices
        by_source = {(k if flip > 0 else n - 1 - k): k for k in slices}
        rest = [(s, self.axes[s]) for s in range(3) if s != axis]  # the plane's axes in source order
        for i, plane in self.source.read(axis, sorted(by_source)):
            yield by_source[i], _to_canonical_plane(plane, rest)

    def bounds(self, slices: list[int], intensity: Intensity) -> tuple[float, float]:
        """The values ``intensity`` maps to black and white; percentiles read the slices once, subsampled."""
        samples = []
        if intensity.window is None:
            samples = [p[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE].copy() for _, p in self.read_slices(slices)]
        return intensity.bounds(samples)

    def read_uint8(self, slices: list[int], lo: float, hi: float) -> Iterator[tuple[int, np.ndarray]]:
        """``(k, uint8 slice)`` as :meth:`read_slices` gives them, ``lo..hi`` (:meth:`bounds`) mapped to 0..255."""
        for k, plane in self.read_slices(slices):
            yield k, to_uint8(plane, lo, hi)

    def close(self) -> None:
        self.source.close()


def _to_canonical_plane(plane: np.ndarray, rest: list[tuple[int, tuple[int, int]]]) -> np.ndarray:
    """A source plane (its two axes in source order) -> rows along canonical y, columns along x, flipped to +."""
    (_, (first, first_flip)), (_, (_, second_flip)) = rest
    if first == 0:  # the source's first remaining axis is x: transpose so rows are y
        plane, first_flip, second_flip = plane.T, second_flip, first_flip
    if first_flip < 0:
        plane = plane[::-1, :]
    if second_flip < 0:
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane)


def _axes(affine: np.ndarray | None) -> list[tuple[int, int]]:
    """Source axis -> (canonical LPS axis, flip): the closest permutation and flips of ``affine``."""
    if affine is None:
        return [(2, 1), (1, 1), (0, 1)]  # an array without geometry: (slice, row, column)
    from nibabel.orientations import io_orientation

    ornt = io_orientation(affine)
    return [(int(a), int(f)) for a, f in ornt]


def open_volume(path: str | Path, volume_index: int | None = None) -> Volume:
    """A NIfTI file, a DICOM series folder or a ``.npy`` array, opened (headers read, no voxels)."""
    path = Path(path)
    name = str(path)
    if path.is_dir():
        source = DicomSeries(path)
        return Volume(name, source, _axes(source.affine_lps), skipped_files=source.skipped_files)
    if not path.is_file():
        raise VolumeError(name, "no such file or folder")
    lower = name.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        source = _NiftiSource(path, volume_index)
    elif lower.endswith(".npy"):
        source = _NpySource(path, volume_index)
    else:
        raise VolumeError(name, "not a volume: give a .nii / .nii.gz file, a .npy array or a folder of one DICOM series")
    return Volume(name, source, _axes(source.affine_lps))


def choose_slices(n: int, spec: str | int | list[int], name: str = "<volume>") -> list[int]:
    """Which canonical slices to take: ``"all"``, ``K`` evenly spaced (each bin's centre; all when K >= n)
    or an explicit list of indices (strictly increasing, inside ``0..n-1``)."""
    if isinstance(spec, (list, tuple)):
        indices = [int(i) for i in spec]
        if not indices or any(i < 0 or i >= n for i in indices) or any(b <= a for a, b in zip(indices, indices[1:])):
            raise VolumeError(name, f"slice list {indices}: give increasing indices in 0..{n - 1}")
        return indices
    if str(spec) == "all":
        return list(range(n))
    k = int(spec)
    if k >= n:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]
