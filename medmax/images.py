"""Images in: load any medical image as RGB, and preprocess it the way Chameleon's image tokenizer does.

:func:`load_image` reads PNG, JPEG, TIFF, BMP, WebP (any PIL mode) and DICOM, from a path, bytes or a
binary file object (``io.BytesIO``: embedded images, uploads), and returns an RGB ``PIL.Image``:

- the format is read from the content (the ``DICM`` prefix, an image format's signature), never from
  the file name: a PNG named ``.dcm`` is a PNG; a name only decides how a file with neither is tried;
- transparency (LA, PA, RGBA, P with a transparent colour) is blended onto white, truncating to
  uint8 like Chameleon's ``_whiten_transparency``;
- high-bit-depth greyscale (I;16, I, F) is scaled min-max to 0..255 (such files carry no window);
- DICOM: the modality LUT (rescale slope / intercept), then the VOI LUT or window centre / width when
  the file has one, else min-max; MONOCHROME1 is inverted; colour photometric interpretations
  (YBR_*, PALETTE COLOR) are converted to RGB; multi-frame files give frame ``frame`` (0 by default).

Memory is bounded by :class:`ImageLimits`, not by what a file claims. Before any pixel is decoded, the
size in the header is checked: at most ``max_pixels`` (width x height of one frame) and an aspect ratio
(long side / short side) of at most ``max_aspect_ratio``, the bound on what the resize in
:func:`preprocess` allocates. Work at full resolution (transparency, scaling) is done a few rows at a
time, so an image costs about three times its decoded size, not twenty. Programs raise the
limits with ``--max-image-pixels`` and ``--max-aspect-ratio``; library callers pass ``limits=``.
Images are never downscaled before Chameleon's resize (Pillow's ``draft`` / ``reduce``), because that
would change their codes; an image over the limits is an error, not a silently different input.

A path must name a regular file: a FIFO, a device or a folder is refused at once (opened without blocking, so
a FIFO under an image root cannot hang a program). Anything that cannot be read, including an image over the
limits or one that runs out of memory, raises :class:`ImageLoadError` naming the source and the reason;
nothing is replaced by a placeholder.

:func:`preprocess` is Chameleon's rule: the shorter side is resized to the VQGAN resolution with
LANCZOS (the other side rounded), the centre square is cropped, pixels go to [-1, 1].
"""

from __future__ import annotations

import functools
import io
import logging
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# signatures of the formats read through PIL: a file starting with one is never tried as DICOM
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF87a", b"GIF89a", b"\x00\x00\x00\x0cjP  ")
_STRIP_PIXELS = 1 << 18  # pixels per strip of full-resolution work (a few MB of temporaries)

ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost; an image over a limit is an :class:`ImageLoadError`, checked before decoding."""

    max_pixels: int = 1 << 26  # width x height of the decoded frame: 67,108,864 (8192 x 8192)
    max_aspect_ratio: float = 20.0  # long side / short side; the resize to R on the short side makes R x (R * ratio)

    def __post_init__(self):
        if self.max_pixels < 1:
            raise UserError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if not self.max_aspect_ratio >= 1:
            raise UserError(f"max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")

    def check(self, width: int, height: int, name: str) -> None:
        """Raise :class:`ImageLoadError` when a ``width`` x ``height`` image is over a limit."""
        if width < 1 or height < 1:
            raise ImageLoadError(name, f"image is {width}x{height} pixels")
        pixels, ratio = width * height, max(width, height) / min(width, height)
        if pixels > self.max_pixels:
            raise ImageLoadError(
                name, f"image is {width}x{height} = {pixels:,} pixels, over the limit of {self.max_pixels:,} "
                "(max_pixels; --max-image-pixels of image_tokenize and train_vqgan)"
            )
        if ratio > self.max_aspect_ratio:
            raise ImageLoadError(
                name, f"image is {width}x{height}, aspect ratio {ratio:g} is over the limit of {self.max_aspect_ratio:g} "
                "(max_aspect_ratio; --max-aspect-ratio of image_tokenize and train_vqgan)"
            )


DEFAULT_LIMITS = ImageLimits()


def allow_in_pillow(limits: ImageLimits) -> None:
    """Raise Pillow's own decompression-bomb threshold so it never refuses what ``limits`` allows.

    Pillow warns above ``PIL.Image.MAX_IMAGE_PIXELS`` and refuses above twice that (178,956,970 by
    default); a program that raises ``max_pixels`` past it calls this once. It never lowers Pillow's.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels


class ImageLoadError(UserError):
    """An image that cannot be read or decoded; the message names the source and the reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class VolumeError(ImageLoadError):
    """A 3D volume (or one file of a DICOM series) that cannot be read (:mod:`medmax.volumes`); names the file and why."""


def _read_source(source: ImageSource) -> tuple[bytes, str]:
    """The bytes of a path, bytes-like or binary file object, and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), f"<{len(source)} bytes>"
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        name = name if isinstance(name, str) else f"<{type(source).__name__}>"
        try:
            data = source.read()
        except OSError as exc:
            raise ImageLoadError(name, f"cannot read ({exc})") from exc
        if not isinstance(data, (bytes, bytearray)):
            raise ImageLoadError(name, f"a binary file object is needed, this one gives {type(data).__name__}")
        return bytes(data), name
    name = str(source)
    try:  # non-blocking: opening a FIFO for reading would otherwise wait for a writer forever
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ImageLoadError(name, f"cannot read file ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageLoadError(name, "not a regular file (a FIFO, device or folder); an image is read from a file")
    with os.fdopen(fd, "rb") as fh:
        try:
            return fh.read(), name
        except OSError as exc:
            raise ImageLoadError(name, f"cannot read file ({exc.strerror or exc})") from exc


def _is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def _has_image_magic(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def load_image(source: ImageSource, *, frame: int = 0, limits: ImageLimits | None = None) -> Image.Image:
    """Read an image file (or its bytes, or a binary file object) as an RGB PIL image.

    See the module docstring for the rules; ``limits`` defaults to :data:`DEFAULT_LIMITS`.
    """
    data, name = _read_source(source)
    limits = limits or DEFAULT_LIMITS
    if not data:
        raise ImageLoadError(name, "file is empty")
    if _is_dicom(data):
        return _load_dicom(data, name, frame, limits)
    if not _has_image_magic(data) and name.lower().endswith(DICOM_SUFFIXES):
        return _load_dicom(data, name, frame, limits, sniffed=True)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _load_dicom(data, name, frame, limits, sniffed=True)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"{exc} (Pillow's own limit; allow_in_pillow() raises it)") from exc
    except (OSError, ValueError) as exc:
        raise ImageLoadError(name, f"cannot open image ({exc})") from exc
    return _pil_to_rgb(image, name, frame, limits)


def _pil_to_rgb(image: Image.Image, name: str, frame: int, limits: ImageLimits) -> Image.Image:
    try:
        image = _select_frame(image, name, frame)
        limits.check(*image.size, name)
        image.load()  # decode now, so truncated or corrupt data fails here
        return to_rgb(image)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(name, f"out of memory decoding a {image.width}x{image.height} {image.mode} image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(name, f"cannot decode {image.format or 'image'} data ({exc})") from exc


def _select_frame(image: Image.Image, name: str, frame: int) -> Image.Image:
    n_frames = getattr(image, "n_frames", 1)
    if not 0 <= frame < n_frames:
        raise ImageLoadError(name, f"frame {frame} requested but the image has {n_frames} frame(s)")
    if frame:
        image.seek(frame)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha blended onto white, high-bit-depth greyscale scaled min-max."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        grey = _minmax_strips(image.size, lambda rows: np.asarray(_crop_rows(image, rows), dtype=np.float64))
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return _whiten_transparency(image.convert("RGBA"))
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


# ------------------------------------------------------------------------------- work a few rows at a time


def _strips(height: int, width: int) -> Iterator[slice]:
    """Row ranges of about ``_STRIP_PIXELS`` pixels each, covering ``height`` rows."""
    step = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, step):
        yield slice(top, min(top + step, height))


def _crop_rows(image: Image.Image, rows: slice) -> Image.Image:
    return image.crop((0, rows.start, image.width, rows.stop))


def _map_strips(shape: tuple[int, ...], fn: Callable[[slice], np.ndarray]) -> np.ndarray:
    """A uint8 array of ``shape`` (H, W[, C]) filled strip by strip with ``fn(rows)``."""
    out = np.empty(shape, dtype=np.uint8)
    for rows in _strips(shape[0], shape[1]):
        out[rows] = fn(rows)
    return out


def _minmax_strips(size: tuple[int, int], values: Callable[[slice], np.ndarray]) -> np.ndarray:
    """Min-max scaling to 0..255 of an image given as float strips ``values(rows)``; NaN and inf count as 0."""
    width, height = size
    lo, hi = np.inf, -np.inf
    for rows in _strips(height, width):
        strip = _finite(values(rows))
        lo, hi = min(lo, float(strip.min())), max(hi, float(strip.max()))
    return _map_strips((height, width), lambda rows: _scale_uint8(_finite(values(rows)), lo, hi))


def _finite(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _scale_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``lo..hi`` to 0..255, rounded; a constant range becomes 0."""
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _whiten_transparency(rgba: Image.Image) -> Image.Image:
    """Chameleon's blend onto white (float64, truncated to uint8), a strip of rows at a time.

    Each output value depends only on (alpha, value), so the blend is a 256 x 256 table computed with
    Chameleon's exact float64 arithmetic and looked up: the same pixels, without float images.
    """
    if rgba.getextrema()[3][0] == 255:  # fully opaque
        return rgba.convert("RGB")
    table = _blend_table()
    out = Image.new("RGB", rgba.size)
    for rows in _strips(rgba.height, rgba.width):
        vals = np.asarray(_crop_rows(rgba, rows))  # (h, W, 4) uint8
        index = vals[:, :, 3:4].astype(np.uint16) * 256 + vals[:, :, :3]  # (h, W, 3): alpha * 256 + value
        out.paste(Image.fromarray(table[index], "RGB"), (0, rows.start))
    return out


@functools.lru_cache(maxsize=1)
def _blend_table() -> np.ndarray:
    """``table[alpha * 256 + value]`` = Chameleon's ``((1 - a) * 255 + a * value).astype(uint8)``, ``a = alpha / 255``."""
    alpha = np.arange(256, dtype=np.uint8).reshape(256, 1) / 255.0
    values = np.arange(256, dtype=np.uint8).reshape(1, 256)
    return ((1 - alpha) * 255 + alpha * values).astype(np.uint8).reshape(-1)


# ---------------------------------------------------------------------------------------------- DICOM


def _load_dicom(data: bytes, name: str, frame: int, limits: ImageLimits, sniffed: bool = False) -> Image.Image:
    """DICOM bytes -> RGB. ``sniffed``: no DICM prefix, so the content may be DICOM without a preamble, or neither."""
    ds = _read_dicom(data, name, sniffed)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(name, "DICOM file has no pixel data" if _has_dicom_elements(ds) else _neither(name))
    limits.check(int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), name)
    _fill_transfer_syntax(ds, name)
    try:
        return _dicom_to_rgb(ds, name, frame)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(name, f"out of memory decoding a {ds.Columns}x{ds.Rows} DICOM image") from None
    except Exception as exc:  # pydicom raises many types (NotImplementedError, RuntimeError, ...) for pixel data it cannot decode
        raise ImageLoadError(name, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc


def _read_dicom(data: bytes, name: str, sniffed: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), force=sniffed)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, struct.error) as exc:
        raise ImageLoadError(name, _neither(name) if sniffed else f"cannot parse DICOM ({exc})") from exc


def _has_dicom_elements(ds) -> bool:
    """Whether a data set read with ``force`` holds real DICOM (an identifying element), not parsed noise."""
    return any(tag in ds for tag in (0x00080016, 0x00080060, 0x00280010, 0x7FE00010))  # SOPClassUID, Modality, Rows, PixelData


def _neither(name: str) -> str:
    if name.lower().endswith(DICOM_SUFFIXES):
        return "not a DICOM file (no DICM prefix, no DICOM elements) nor a recognised image format"
    return "not a recognised image format"


def _fill_transfer_syntax(ds, name: str) -> None:
    """Files without file meta still say how they were encoded; record it so pixel data can be decoded."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in ds.get("file_meta", {}):
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    logger.debug("%s: no transfer syntax in file meta; the data set was read as %s", name, uid.name)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


def _dicom_to_rgb(ds, name: str, frame: int) -> Image.Image:
    from pydicom.pixels import pixel_array

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < n_frames:
        raise ImageLoadError(name, f"frame {frame} requested but the DICOM file has {n_frames} frame(s)")
    arr = pixel_array(ds, index=frame)  # (H, W) or (H, W, C); YBR is converted to RGB by the decoder
    interpretation = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if interpretation == "PALETTE COLOR":
        return Image.fromarray(_palette_to_rgb(arr, ds), "RGB")
    if arr.ndim == 3:
        return Image.fromarray(_colour_to_uint8(arr, ds), "RGB")
    if arr.ndim != 2:
        raise ImageLoadError(name, f"unsupported DICOM pixel array of shape {arr.shape}")
    grey = _monochrome_to_uint8(arr, ds)
    if interpretation == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L").convert("RGB")


def _monochrome_to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """Modality LUT, then the VOI LUT or the window (centre / width) when present, else min-max; by strips."""
    from pydicom.pixels import apply_modality_lut

    def values(rows: slice) -> np.ndarray:
        return apply_modality_lut(arr[rows], ds).astype(np.float64)

    size = (arr.shape[1], arr.shape[0])
    if ds.get("VOILUTSequence"):
        return _apply_voi_lut_table(size, values, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _map_strips(arr.shape, lambda rows: _apply_window(values(rows), ds))
    return _minmax_strips(size, values)


def _first(value) -> float:
    """The first of a multi-valued DICOM element (window centre / width may hold several)."""
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


def _apply_window(values: np.ndarray, ds) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to 0..255 (LINEAR, LINEAR_EXACT or SIGMOID)."""
    centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise ValueError(f"window width {width} is not valid for {function} windowing")
    if function == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    elif function == "LINEAR_EXACT":
        out = ((values - centre) / width + 0.5) * 255.0
    else:  # LINEAR
        out = ((values - (centre - 0.5)) / (width - 1) + 0.5) * 255.0 if width > 1 else (values > centre - 0.5) * 255.0
    return np.round(np.clip(out, 0, 255)).astype(np.uint8)


def _apply_voi_lut_table(size: tuple[int, int], values: Callable[[slice], np.ndarray], ds) -> np.ndarray:
    """The first VOI LUT of the file, its output scaled by the LUT's own range."""
    from pydicom.pixels import apply_voi_lut

    def looked_up(rows: slice) -> np.ndarray:
        return apply_voi_lut(values(rows), ds, prefer_lut=True).astype(np.float64)

    lo, hi = _voi_lut_range(ds.VOILUTSequence[0])
    if hi <= lo:
        return _minmax_strips(size, looked_up)
    return _map_strips((size[1], size[0]), lambda rows: np.round(np.clip((looked_up(rows) - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8))


def _voi_lut_range(item) -> tuple[float, float]:
    """Output range of a VOI LUT: its entries' range when readable, else 0 .. 2**bits - 1 of its descriptor."""
    data = item.get("LUTData")
    if isinstance(data, (list, tuple)) or hasattr(data, "__len__") and not isinstance(data, (bytes, bytearray)):
        table = np.asarray(list(data), dtype=np.float64)
        if table.size:
            return float(table.min()), float(table.max())
    return 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)


def _colour_to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    if arr.shape[-1] != 3:
        raise ValueError(f"colour DICOM with {arr.shape[-1]} samples per pixel (expected 3)")
    if arr.dtype == np.uint8:
        return arr
    scale = 255.0 / (2 ** int(ds.get("BitsStored", 8 * arr.dtype.itemsize)) - 1)
    return _map_strips(arr.shape, lambda rows: np.round(arr[rows].astype(np.float64) * scale).clip(0, 255).astype(np.uint8))


def _palette_to_rgb(arr: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    def rgb(rows: slice) -> np.ndarray:  # palette entries are 8 or 16 bits
        entries = apply_color_lut(arr[rows], ds)
        return entries if entries.dtype == np.uint8 else np.round(entries.astype(np.float64) / 257.0).astype(np.uint8)

    return _map_strips((*arr.shape[:2], 3), rgb)


# ---------------------------------------------------------------------------------------- preprocessing


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side LANCZOS-resized to ``resolution`` (the other rounded), then the centre square."""
    scale = resolution / min(image.size)
    size = (round(scale * image.width), round(scale * image.height))
    image = image.resize(size, Image.LANCZOS)
    x0, y0 = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((x0, y0, x0 + resolution, y0 + resolution))


def preprocess(image: Image.Image, resolution: int, limits: ImageLimits | None = None, *, keep_aspect_factor: int | None = None) -> torch.Tensor:
    """RGB PIL image -> (3, R, R) float32 in [-1, 1], exactly as Chameleon's ``_vqgan_input_from``.

    The image's size is checked against ``limits`` first (an image built in memory was never checked by
    :func:`load_image`); over them, or out of memory, it raises :class:`ImageLoadError`.
    ``keep_aspect_factor`` (a VQGAN's downsampling): keep the aspect instead, onto the grid
    :func:`medmax.image_layout.pick_grid` gives for the codes of a square ``resolution`` -> (3, h*f, w*f).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    name = getattr(image, "filename", "") or "<image>"
    (limits or DEFAULT_LIMITS).check(*image.size, name)
    try:
        if keep_aspect_factor is None:
            image = resize_and_crop(to_rgb(image), resolution)
        else:
            from .image_layout import grid_budget, pick_grid, resize_to_grid

            grid = pick_grid(image.width, image.height, grid_budget(resolution, keep_aspect_factor))
            image = resize_to_grid(to_rgb(image), grid, keep_aspect_factor)
    except MemoryError:
        raise ImageLoadError(name, f"out of memory preprocessing a {image.width}x{image.height} image") from None
    import torch  # here, so that loading images does not import torch

    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3) uint8
    pixels = pixels.to(torch.float64) / 255.0 * 2 - 1  # float64 then float32, as the reference rounds
    return pixels.permute(2, 0, 1).to(torch.float32).contiguous()

