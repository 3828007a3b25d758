"""A folder of DICOM slices as one volume (:class:`DicomSeries`), read by :func:`medmax.volumes.open_volume`.

The folder's files are read header-first (``pydicom.dcmread(defer_size=...)``: the pixel data is found but not
loaded), checked together, ordered, and read one slice at a time when asked. The rules:

- One series: every slice has the same ``SeriesInstanceUID``, ``Rows`` x ``Columns`` and
  ``ImageOrientationPatient`` (within 1e-4); a folder mixing them is refused, naming what differs.
- Order: ``ImagePositionPatient`` projected on the slice normal (row direction x column direction); when a
  slice lacks position or orientation, ``InstanceNumber`` (then the volume has no geometry).
- A duplicated position, or a step over 1.5 times the median step (missing slices), is refused, naming the
  positions in mm. A slice without pixel data, or a multi-frame file, is refused naming the file.
- Files that are not DICOM, and a ``DICOMDIR``, are skipped and counted (:attr:`DicomSeries.skipped_files`).
- Values: ``pixel_array * RescaleSlope + RescaleIntercept`` in float32, so CT slices are in Hounsfield units.

The affine (voxel -> LPS mm) has the source axes (slice, row, column): slice along the normal by the median
step, row along the column direction by ``PixelSpacing[0]``, column along the row direction by ``PixelSpacing[1]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .images import VolumeError

_DEFER = 1024  # values over 1 KB (the pixel data) are not read with the header
_DICOMDIR_UID = "1.2.840.10008.1.3.10"
_GAP_FACTOR = 1.5  # a step between slices over 1.5 times the median step is a gap


class DicomSeries:
    """One series folder: its slices ordered along the normal, headers only until :meth:`read`."""

    kind = "dicom"

    def __init__(self, folder: Path):
        self.name = str(folder)
        headers, self.skipped_files = _read_headers(folder)
        if not headers:
            raise VolumeError(self.name, f"no DICOM slices in the folder ({self.skipped_files} other files)")
        _check_one_series(self.name, headers)
        self.files, positions, self.affine_lps = _order(self.name, headers)
        self.positions = positions
        first = headers[0][1]
        self.shape = (len(self.files), int(first.Rows), int(first.Columns))
        self.modality = str(getattr(first, "Modality", "") or "") or None

    def read(self, axis: int, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Planes along source ``axis``: one file per plane along the slices, else every file once."""
        if axis == 0:
            for i in indices:
                yield i, _pixels(self.files[i])
            return
        planes = {i: np.empty((self.shape[0], self.shape[3 - axis]), dtype=np.float32) for i in indices}
        for s, path in enumerate(self.files):
            values = _pixels(path)
            for i, plane in planes.items():
                plane[s] = values[i, :] if axis == 1 else values[:, i]
        yield from sorted(planes.items())

    def close(self) -> None:
        pass


def _read_headers(folder: Path) -> tuple[list[tuple[Path, object]], int]:
    """(file, header) of every DICOM slice of the folder (sorted by name), and how many files were skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers, skipped = [], 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER)
        except (InvalidDicomError, EOFError, OSError, ValueError):
            skipped += 1  # not DICOM (a README, a thumbnail): counted, never read as a slice
            continue
        if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) == _DICOMDIR_UID or "DirectoryRecordSequence" in ds:
            skipped += 1
            continue
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise VolumeError(str(path), "DICOM slice without pixel data")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(str(path), f"a multi-frame DICOM file ({ds.NumberOfFrames} frames) in a series folder of single slices")
        headers.append((path, ds))
    return headers, skipped


def _check_one_series(name: str, headers: list) -> None:
    for what, key in (("series (SeriesInstanceUID)", lambda ds: str(getattr(ds, "SeriesInstanceUID", ""))),
                      ("slice sizes (Rows x Columns)", lambda ds: f"{ds.Rows}x{ds.Columns}")):
        values = sorted({key(ds) for _, ds in headers})
        if len(values) > 1:
            raise VolumeError(name, f"the folder mixes {len(values)} {what}: {', '.join(values[:4])}")
    orientations = [_orientation(ds) for _, ds in headers]
    known = [o for o in orientations if o is not None]
    if known and any(not np.allclose(o, known[0], atol=1e-4) for o in known):
        raise VolumeError(name, "the folder mixes slice orientations (ImageOrientationPatient)")


def _orientation(ds) -> np.ndarray | None:
    iop = getattr(ds, "ImageOrientationPatient", None)
    return None if iop is None or len(iop) != 6 else np.asarray([float(v) for v in iop], dtype=np.float64)


def _order(name: str, headers: list) -> tuple[list[Path], list[float] | None, np.ndarray | None]:
    """Files in slice order, their positions along the normal (mm) and the affine; InstanceNumber without geometry."""
    iop = _orientation(headers[0][1])
    ipps = [getattr(ds, "ImagePositionPatient", None) for _, ds in headers]
    if iop is None or any(p is None or len(p) != 3 for p in ipps):
        return _order_by_instance(name, headers), None, None
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    ipps = np.asarray([[float(v) for v in p] for p in ipps])  # (N, 3)
    along = ipps @ normal  # (N,) mm along the normal
    order = np.argsort(along, kind="stable")
    along, ipps = along[order], ipps[order]
    files = [headers[i][0] for i in order]
    step = _check_steps(name, along, files)
    spacing = [float(v) for v in getattr(headers[0][1], "PixelSpacing", [1.0, 1.0])]
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = normal * step, col_dir * spacing[0], row_dir * spacing[1]
    affine[:3, 3] = ipps[0]
    return files, [round(float(v), 4) for v in along], affine


def _check_steps(name: str, along: np.ndarray, files: list[Path]) -> float:
    """The median step between slices; refuses duplicated positions and gaps, naming them."""
    if len(along) < 2:
        return 1.0
    steps = np.diff(along)
    same = np.flatnonzero(steps < 1e-3)
    if len(same):
        i = same[0]
        raise VolumeError(name, f"duplicated slice position {along[i]:.3f} mm ({files[i].name} and {files[i + 1].name})")
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_FACTOR * step)
    if len(gaps):
        i = gaps[0]
        missing = round(steps[i] / step) - 1
        raise VolumeError(name, f"a gap in the series: about {missing} slice(s) missing between {along[i]:.3f} mm and "
                                f"{along[i + 1]:.3f} mm (step {step:.3f} mm)")
    return step


def _order_by_instance(name: str, headers: list) -> list[Path]:
    numbers = [getattr(ds, "InstanceNumber", None) for _, ds in headers]
    if any(n is None for n in numbers):
        raise VolumeError(name, "slices have neither ImagePositionPatient + ImageOrientationPatient nor InstanceNumber to order them")
    numbers = [int(n) for n in numbers]
    if len(set(numbers)) != len(numbers):
        raise VolumeError(name, "duplicated InstanceNumber (and no ImagePositionPatient to order the slices by)")
    return [path for _, path in sorted(zip(numbers, (p for p, _ in headers)))]


def _pixels(path: Path) -> np.ndarray:
    """One slice in float32, rescaled (HU for CT)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        values = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - a decoder's error is this file's
        raise VolumeError(str(path), f"cannot decode the slice ({type(exc).__name__}: {exc})") from None
    if values.ndim != 2:
        raise VolumeError(str(path), f"a slice must be one greyscale frame, this one has shape {values.shape}")
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    return values.astype(np.float32) * np.float32(slope) + np.float32(intercept)
