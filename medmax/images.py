"""Images in: load any medical image as RGB, and preprocess it the way Chameleon's image tokenizer does.

:func:`load_image` reads PNG, JPEG, TIFF, BMP, WebP (any PIL mode) and DICOM, from a path or bytes,
and returns an RGB ``PIL.Image``:

- transparency (LA, PA, RGBA, P with a transparent colour) is blended onto white, truncating to
  uint8 like Chameleon's ``_whiten_transparency``;
- high-bit-depth greyscale (I;16, I, F) is scaled min-max to 0..255 (such files carry no window);
- DICOM: the modality LUT (rescale slope / intercept), then the VOI LUT or window centre / width when
  the file has one, else min-max; MONOCHROME1 is inverted; colour photometric interpretations
  (YBR_*, PALETTE COLOR) are converted to RGB; multi-frame files give frame ``frame`` (0 by default).

Anything that cannot be read raises :class:`ImageLoadError` naming the source and the reason; nothing
is replaced by a placeholder.

:func:`preprocess` is Chameleon's rule: the shorter side is resized to the VQGAN resolution with
LANCZOS (the other side rounded), the centre square is cropped, pixels go to [-1, 1].
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageLoadError(ValueError):
    """An image that cannot be read or decoded; the message names the source and the reason."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _describe(source: str | Path | bytes) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def _read_bytes(source: str | Path | bytes, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ImageLoadError(name, f"cannot read file ({exc.strerror or exc})") from exc


def _looks_like_dicom(data: bytes, name: str) -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith(DICOM_SUFFIXES)


def load_image(source: str | Path | bytes, *, frame: int = 0) -> Image.Image:
    """Read an image file (or its bytes) as an RGB PIL image; see the module docstring for the rules."""
    name = _describe(source)
    data = _read_bytes(source, name)
    if not data:
        raise ImageLoadError(name, "file is empty")
    if _looks_like_dicom(data, name):
        return _load_dicom(data, name, frame)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _load_dicom(data, name, frame, sniffed=True)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(name, f"cannot open image ({exc})") from exc
    return _pil_to_rgb(image, name, frame)


def _pil_to_rgb(image: Image.Image, name: str, frame: int) -> Image.Image:
    try:
        image = _select_frame(image, name, frame)
        image.load()  # decode now, so truncated or corrupt data fails here
        return to_rgb(image)
    except ImageLoadError:
        raise
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
        return Image.fromarray(_minmax_uint8(np.asarray(image, dtype=np.float64))).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        return _whiten_transparency(image.convert("RGBA"))
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _whiten_transparency(rgba: Image.Image) -> Image.Image:
    vals = np.asarray(rgba)  # (H, W, 4) uint8
    if not (vals[:, :, 3] < 255).any():
        return rgba.convert("RGB")
    alpha = vals[:, :, 3:4] / 255.0
    blended = (1 - alpha) * 255 + alpha * vals[:, :, :3]  # float64, truncated below as Chameleon does
    return Image.fromarray(blended.astype(np.uint8), "RGB")


def _minmax_uint8(values: np.ndarray) -> np.ndarray:
    """Scale to 0..255 by the array's own range; a constant array becomes 0."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- DICOM


def _load_dicom(data: bytes, name: str, frame: int, sniffed: bool = False) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=sniffed)
        except InvalidDicomError:  # a .dcm file without the 128-byte preamble and DICM prefix
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        reason = "not a recognised image format" if sniffed else f"cannot parse DICOM ({exc})"
        raise ImageLoadError(name, reason) from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageLoadError(name, "not a recognised image format" if sniffed else "DICOM file has no pixel data")
    _fill_transfer_syntax(ds, name)
    try:
        return _dicom_to_rgb(ds, name, frame)
    except ImageLoadError:
        raise
    except Exception as exc:  # pydicom raises many types (NotImplementedError, RuntimeError, ...) for pixel data it cannot decode
        raise ImageLoadError(name, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc


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
    """Modality LUT, then the VOI LUT or the window (centre / width) when present, else min-max."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        return _apply_voi_lut_table(values, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return _apply_window(values, ds)
    return _minmax_uint8(values)


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


def _apply_voi_lut_table(values: np.ndarray, ds) -> np.ndarray:
    """The first VOI LUT of the file, its output scaled by the LUT's own range."""
    from pydicom.pixels import apply_voi_lut

    out = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
    lo, hi = _voi_lut_range(ds.VOILUTSequence[0])
    if hi <= lo:
        return _minmax_uint8(out)
    return np.round(np.clip((out - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)


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
    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
    return np.round(arr.astype(np.float64) * (255.0 / (2**bits - 1))).clip(0, 255).astype(np.uint8)


def _palette_to_rgb(arr: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(arr, ds)  # palette entries are 8 or 16 bits
    if rgb.dtype == np.uint8:
        return rgb
    return np.round(rgb.astype(np.float64) / 257.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------- preprocessing


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side LANCZOS-resized to ``resolution`` (the other rounded), then the centre square."""
    scale = resolution / min(image.size)
    size = (round(scale * image.width), round(scale * image.height))
    image = image.resize(size, Image.LANCZOS)
    x0, y0 = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((x0, y0, x0 + resolution, y0 + resolution))


def preprocess(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB PIL image -> (3, R, R) float32 in [-1, 1], exactly as Chameleon's ``_vqgan_input_from``."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    image = resize_and_crop(to_rgb(image), resolution)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (R, R, 3) uint8
    pixels = pixels.to(torch.float64) / 255.0 * 2 - 1  # float64 then float32, as the reference rounds
    return pixels.permute(2, 0, 1).to(torch.float32).contiguous()

