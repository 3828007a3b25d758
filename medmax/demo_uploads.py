"""The demo's uploads (:mod:`medmax.demo`): 2D images and volumes, checked, read, and shown as the model sees them.

Every path comes from the browser, so :func:`checked_upload` first makes sure it names a file (not a folder)
inside the app's temporary folder and under the size limit. Then:

- a 2D image (PNG, JPEG, TIFF, a single DICOM file...) is read by :func:`medmax.images.load_image`
  (:func:`load_upload`); :func:`model_view` is what the model sees of it;
- a volume is a NIfTI file (``.nii``, ``.nii.gz``), a ``.npy`` array, or, when the page's "DICOM files are one
  series" box is ticked, every attached DICOM file together (:func:`group_uploads`). Its files are linked into
  one folder of the upload (:func:`link_series`), which :func:`medmax.volumes.open_volume` reads as a DICOM series
  folder with all its checks (one ``SeriesInstanceUID``, no gap, no duplicate). Without the box, each DICOM file
  is a 2D image: a series is never guessed, so two radiographs that share a series stay two images.
  A volume is read by :func:`medmax.prompting.load_volume_input`, the reader ``medmax generate --volume`` uses,
  with the page's slices (``K`` or ``all``, as ``--slices``) and window (as ``--window``); its slices as the
  model sees them (windowed, reoriented to LPS, resized and centre-cropped) are saved as PNGs for the preview
  gallery, labelled with slice index and position (:func:`slice_views`).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import UserError
from .images import ImageLoadError, load_image, resize_and_crop
from .paths import PathEscapeError, resolve_inside
from .volumes import NIFTI_SUFFIXES, WINDOWS, Intensity, open_volume

VOLUME_FILE_SUFFIXES = (*NIFTI_SUFFIXES, ".npy")
WINDOW_CHOICES = ("percentile", *WINDOWS)  # or W/L in HU, as medmax generate --window


class DemoError(UserError):
    """Something the page shows to its user as one line (a bad upload, a bad setting, a failed answer)."""


def display_name(path) -> str:
    """A file's name for a message: its last part, with control characters (a newline...) shown as ``?``."""
    name = Path(str(path)).name or str(path)
    return re.sub(r"[\x00-\x1f\x7f]", "?", name)


def checked_upload(path, root: Path, max_bytes: int) -> Path:
    """The uploaded file ``path`` names, resolved: a file inside ``root`` (the app's folder), not over ``max_bytes``."""
    name = display_name(path)
    try:
        inside = resolve_inside(root, path)
    except (PathEscapeError, OSError, ValueError) as err:
        raise DemoError(f"{name}: not a file uploaded to this page ({err})") from err
    if not inside.is_file():
        raise DemoError(f"{name}: no such uploaded file")
    size = inside.stat().st_size
    if size > max_bytes:
        raise DemoError(f"{name}: {size / 2**20:.1f} MB is over the upload limit of {max_bytes / 2**20:g} MB")
    return inside


def load_upload(path, root: Path, max_bytes: int) -> Image.Image:
    """An uploaded file as an RGB image; DemoError naming the file and the reason otherwise."""
    inside, name = checked_upload(path, root, max_bytes), display_name(path)
    try:
        return load_image(inside)
    except ImageLoadError as err:
        raise DemoError(f"{name}: cannot be read as an image or DICOM ({err.reason})") from err
    except (MemoryError, Image.DecompressionBombError) as err:
        raise DemoError(f"{name}: too large to decode ({err})") from err


def model_view(image: Image.Image, resolution: int) -> Image.Image:
    """What the model sees of a loaded image: resized (shorter side) and centre-cropped to the VQGAN's resolution."""
    return resize_and_crop(image, resolution)


# ---------------------------------------------------------------------------------------------- volumes
@dataclass(frozen=True)
class VolumeReading:
    """The page's volume controls: slices (``"K"`` or ``"all"``), the window, and whether DICOM files are one series."""

    slices: str = "16"
    window: str = "percentile"
    one_series: bool = False

    @classmethod
    def from_page(cls, slices, window, one_series) -> "VolumeReading":
        text = str(slices if slices is not None else "").strip().lower()
        if text != "all" and not (re.fullmatch(r"[0-9]{1,9}", text) and int(text) >= 1):  # no int() of 5000 digits
            raise DemoError(f"setting volume slices must be a whole number from 1 to 999999999, or all, "
                            f"not {str(slices)[:20]!r}")
        window = str(window if window is not None else "").strip()
        try:
            Intensity.parse(window)
        except ValueError as err:
            raise DemoError(f"setting window: {err}") from err
        return cls(text if text == "all" else str(int(text)), window, bool(one_series))


def is_dicom(path: Path) -> bool:
    """A DICOM file by its content (``DICM`` after the 128-byte preamble), whatever its name."""
    from pydicom.misc import is_dicom as has_preamble

    return has_preamble(str(path))


def group_uploads(files: list[tuple[str, Path]], one_series: bool) -> list[tuple[str, list[tuple[str, Path]]]]:
    """(kind, [(name, file)...]) in attachment order: ``image``, ``volume`` (NIfTI / .npy) or ``series`` (every
    DICOM file, placed where the first one was; only when ``one_series``)."""
    groups: list[tuple[str, list]] = []
    series: list = []
    for name, path in files:
        if path.name.lower().endswith(VOLUME_FILE_SUFFIXES):  # the file's own name (links resolved), as open_volume sees it
            groups.append(("volume", [(name, path)]))
        elif one_series and is_dicom(path):
            if not series:
                groups.append(("series", series))
            series.append((name, path))
        else:
            groups.append(("image", [(name, path)]))
    return groups


def series_note(groups: list[tuple[str, list[tuple[str, Path]]]]) -> str:
    """When 2D DICOM images of the attachments share a ``SeriesInstanceUID``: a note that the series box reads them
    as one volume (the page never guesses it); "" otherwise."""
    import pydicom

    uids = []
    for kind, [(_, path), *_] in groups:
        if kind == "image" and is_dicom(path):
            try:
                uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID", "")))
            except Exception:  # noqa: BLE001 - only a note: load_upload reports an unreadable file
                continue
    n = max((uids.count(uid) for uid in set(uids) if uid), default=0)
    if n < 2:
        return ""
    return (f"{n} DICOM files of one series are read as {n} 2D images; tick \"The attached DICOM files are one "
            "series\" (Volumes) to read them as one volume")


def link_series(files: list[tuple[str, Path]], folder: Path) -> Path:
    """The series' files in one folder (hard links, copies across file systems), named by their order and a safe
    form of their name (never a path the browser gave)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (name, path) in enumerate(files):
        target = folder / f"{k:05d}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}"
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
    return folder


def read_volume(path: Path, name: str, reading: VolumeReading, max_slices: int):
    """A volume upload as the prompt takes it (:class:`medmax.prompting.VolumeInput`); DemoError naming it otherwise.

    At most ``max_slices`` slices (what the model's context could hold): ``all`` of a longer volume is refused
    before a slice is read."""
    from .prompting import load_volume_input

    try:
        if reading.slices == "all":
            _check_slice_count(path, name, max_slices)
        volume = load_volume_input(path, None, reading.slices, reading.window)
    except ImageLoadError as err:  # one file of a series names itself
        where = "" if Path(err.source) == path else f" {display_name(err.source)}"
        raise DemoError(f"{name}: cannot be read as a volume ({err.reason}{where})") from err
    except ValueError as err:
        raise DemoError(f"{name}: cannot be read as a volume ({err})") from err
    except MemoryError as err:
        raise DemoError(f"{name}: too large to read ({err})") from err
    if volume.skipped_files:
        raise DemoError(f"{name}: {volume.skipped_files} of the series' files are not DICOM slices (a DICOMDIR?)")
    return volume


def _check_slice_count(path: Path, name: str, max_slices: int) -> None:
    volume = open_volume(path)
    try:
        n = volume.n_slices
    finally:
        volume.close()
    if n > max_slices:
        raise DemoError(f"{name}: all {n} slices are more than the model's context holds ({max_slices} at most); "
                        "choose fewer slices")


def slice_views(volume, name: str, resolution: int, folder: Path) -> list[tuple[Path, str]]:
    """Each slice as the model sees it, saved as a PNG in ``folder``, with its label (name, slice index, z in mm)."""
    folder.mkdir(parents=True, exist_ok=True)
    positions = volume.positions_mm or (None,) * len(volume.slices)
    views = []
    for k, (image, index, z) in enumerate(zip(volume.slices, volume.slice_indices, positions)):
        path = folder / f"slice_{k:03d}.png"
        model_view(image, resolution).save(path)
        views.append((path, f"{name}: slice {index}" + (f", z {z:.1f} mm" if z is not None else "")))
    return views


def montage(views: list[Path], path: Path) -> Path:
    """The slice views side by side in rows of up to 8 (one picture of a volume for the chat)."""
    tiles = [Image.open(p) for p in views]
    side, per_row = tiles[0].width, min(8, len(tiles))
    sheet = Image.new("RGB", (side * per_row, side * -(-len(tiles) // per_row)))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % per_row) * side, (k // per_row) * side))
    sheet.save(path)
    return path
