"""Image loading (every PIL mode and format, DICOM) and Chameleon's preprocessing."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_files

from medmax import images
from medmax.images import ImageLimits, ImageLoadError, load_image, preprocess

REPO = Path(__file__).resolve().parents[2]

# Only files shipped inside the pydicom wheel: get_testdata_file(name) would try to download the rest.
DICOM_FILES = {os.path.basename(f): f for f in get_testdata_files()}


def _rgb(h=30, w=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


MODES_AND_FORMATS = [
    (mode, fmt)
    for mode, formats in {
        "RGB": ("PNG", "JPEG", "TIFF", "BMP", "WEBP"),
        "L": ("PNG", "JPEG", "TIFF", "BMP", "WEBP"),
        "LA": ("PNG", "TIFF", "WEBP"),
        "P": ("PNG", "TIFF", "BMP"),
        "RGBA": ("PNG", "TIFF", "WEBP"),
        "CMYK": ("JPEG", "TIFF"),
        "1": ("PNG", "TIFF", "BMP"),
    }.items()
    for fmt in formats
]


@pytest.mark.parametrize("mode,fmt", MODES_AND_FORMATS, ids=[f"{m}-{f}" for m, f in MODES_AND_FORMATS])
def test_every_mode_and_format_loads_as_rgb(mode, fmt):
    source = Image.fromarray(_rgb()).convert(mode)
    loaded = load_image(_encode(source, fmt))
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if mode in ("RGB", "L") and fmt in ("PNG", "TIFF", "BMP", "WEBP"):  # lossless: the pixels survive
        assert np.array_equal(np.asarray(loaded), np.asarray(source.convert("RGB")))


def test_transparency_is_blended_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red channel 200, green and blue 0
    rgba[0, 0, 3] = 0  # fully transparent -> white
    rgba[0, 1, 3] = 255  # opaque -> unchanged
    rgba[0, 2, 3] = 128  # half -> between
    rgba[1:, :, 3] = 255
    loaded = np.asarray(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert loaded[0, 0].tolist() == [255, 255, 255]
    assert loaded[0, 1].tolist() == [200, 0, 0]
    a = 128 / 255
    assert loaded[0, 2].tolist() == [int((1 - a) * 255 + a * 200), int((1 - a) * 255), int((1 - a) * 255)]


@pytest.mark.parametrize("dtype,fmt", [(np.uint16, "PNG"), (np.uint16, "TIFF"), (np.int32, "TIFF"), (np.float32, "TIFF")])
def test_high_bit_depth_is_scaled_by_its_own_range(dtype, fmt):
    values = np.linspace(1000, 3000, 30 * 40).reshape(30, 40).astype(dtype)  # a 12-bit-like ramp, far from 0 and 65535
    source = Image.fromarray(values)
    assert source.mode in ("I;16", "I", "F")
    grey = np.asarray(load_image(_encode(source, fmt)))[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey.reshape(-1).astype(int)) >= 0)  # monotone ramp stays monotone


def test_multi_frame_tiff_takes_the_asked_frame():
    frames = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(buf.getvalue()))[0, 0, 0] == 10
    assert np.asarray(load_image(buf.getvalue(), frame=1))[0, 0, 0] == 200
    with pytest.raises(ImageLoadError, match="frame 2 requested"):
        load_image(buf.getvalue(), frame=2)


def test_unreadable_inputs_raise_with_source_and_reason(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png: cannot read file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageLoadError, match="text.png: not a recognised image format"):
        load_image(tmp_path / "text.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_encode(Image.fromarray(_rgb(64, 64)), "PNG")[:200])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        load_image(truncated)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(tmp_path / "empty.jpg")


# ---------------------------------------------------------------------------------------------- DICOM


def _dicoms_with_pixels() -> list[str]:
    files = []
    for path in get_testdata_files():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, force=True)
        except Exception:  # not DICOM at all (README, json, icc...)
            continue
        if "PixelData" in ds:
            files.append(path)
    return files


def test_every_bundled_dicom_loads_or_says_why():
    files = _dicoms_with_pixels()
    assert len(files) > 50
    loaded, failed = 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            try:
                image = load_image(path)
            except ImageLoadError as exc:
                assert exc.source == path and len(exc.reason) > 10
                failed[os.path.basename(path)] = exc.reason
                continue
            assert image.mode == "RGB" and min(image.size) > 0
            loaded += 1
    # the few that fail are genuinely broken (truncated, invalid VR values, missing required elements)
    assert loaded >= len(files) - 8, failed
    assert "MR_truncated.dcm" in failed and "less than expected" in failed["MR_truncated.dcm"]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_ct_and_mr_give_sensible_images(name):
    grey = np.asarray(load_image(DICOM_FILES[name])).astype(int)
    assert np.array_equal(grey[..., 0], grey[..., 1])  # greyscale replicated to RGB
    assert grey.std() > 20 and grey.max() - grey.min() > 150  # real contrast, not a constant or a sliver


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(DICOM_FILES["CT_small.dcm"])
    normal = np.asarray(load_image(_dicom_bytes(ds))).astype(int)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = np.asarray(load_image(_dicom_bytes(ds))).astype(int)
    assert np.array_equal(inverted, 255 - normal)


def test_window_centre_width_is_applied_after_rescale():
    ds = pydicom.dcmread(DICOM_FILES["CT_small.dcm"])  # has RescaleSlope / Intercept, no window
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    ds.WindowCenter, ds.WindowWidth = float(np.median(hu)), 100.0
    grey = np.asarray(load_image(_dicom_bytes(ds)))[..., 0]
    assert np.all(grey[hu <= np.median(hu) - 60] == 0) and np.all(grey[hu >= np.median(hu) + 60] == 255)
    inside = (hu > np.median(hu) - 40) & (hu < np.median(hu) + 40)
    assert inside.any() and np.all((grey[inside] > 0) & (grey[inside] < 255))


def test_dicom_colour_and_frames():
    rgb = np.asarray(load_image(DICOM_FILES["SC_rgb_dcmtk_+eb+cr.dcm"])).astype(int)
    ybr = np.asarray(load_image(DICOM_FILES["SC_ybr_full_422_uncompressed.dcm"])).astype(int)
    assert rgb[0, 0].tolist() == [255, 0, 0]  # the test image's top band is pure red
    assert np.abs(rgb - ybr).max() <= 8  # YBR_FULL_422 converted to RGB
    palette = np.asarray(load_image(DICOM_FILES["examples_palette.dcm"]))
    assert palette.reshape(-1, 3).std(axis=0).min() > 10 and not np.array_equal(palette[..., 0], palette[..., 2])
    first, sixth = (np.asarray(load_image(DICOM_FILES["rtdose.dcm"], frame=f)) for f in (0, 5))
    assert not np.array_equal(first, sixth)
    with pytest.raises(ImageLoadError, match="frame 15 requested but the DICOM file has 15"):
        load_image(DICOM_FILES["rtdose.dcm"], frame=15)


# ---------------------------------------------------------------------------------------- preprocessing


def test_preprocess_of_an_exact_size_image_is_a_pure_rescale():
    pixels = _rgb(64, 64)
    out = preprocess(Image.fromarray(pixels), 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    expected = torch.from_numpy(pixels).permute(2, 0, 1).double() / 255 * 2 - 1
    assert torch.equal(out, expected.float())


def test_preprocess_resizes_the_shorter_side_and_crops_the_centre():
    wide = np.zeros((50, 200, 3), dtype=np.uint8)
    wide[:, 75:125] = 255  # a white centre square of side 50, black beyond it
    out = preprocess(Image.fromarray(wide), 32)
    assert out.shape == (3, 32, 32)
    assert out[:, :, 4:-4].min() > 0.9  # the crop is the centre square, away from LANCZOS ringing at its edges
    tall = np.zeros((200, 50, 3), dtype=np.uint8)
    tall[75:125] = 255
    assert preprocess(Image.fromarray(tall), 32)[:, 4:-4].min() > 0.9
    assert -1 <= float(out.min()) and float(out.max()) <= 1


# ------------------------------------------------------------------------------------ sources and formats


def test_a_png_named_dcm_is_read_by_its_content(tmp_path):
    """Issue 12: a valid PNG named .dcm was reported as "DICOM has no pixel data"."""
    pixels = _rgb(20, 30)
    (tmp_path / "scan.dcm").write_bytes(_encode(Image.fromarray(pixels), "PNG"))
    assert np.array_equal(np.asarray(load_image(tmp_path / "scan.dcm")), pixels)
    ds = pydicom.dcmread(DICOM_FILES["CT_small.dcm"])  # and the reverse: DICOM content under an image name
    (tmp_path / "ct.png").write_bytes(_dicom_bytes(ds))
    assert np.array_equal(np.asarray(load_image(tmp_path / "ct.png")), np.asarray(load_image(DICOM_FILES["CT_small.dcm"])))
    (tmp_path / "text.dcm").write_text("neither DICOM nor an image")
    with pytest.raises(ImageLoadError, match="text.dcm: .*not a DICOM file.* nor a recognised image format"):
        load_image(tmp_path / "text.dcm")


def test_bytes_and_file_like_sources(tmp_path):
    """Embedded images (parquet bytes, uploads) load like files: bytes, memoryview, BytesIO, an open file."""
    data = _encode(Image.fromarray(_rgb()), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    expected = np.asarray(load_image(tmp_path / "a.png"))
    with open(tmp_path / "a.png", "rb") as f:
        sources = [data, bytearray(data), memoryview(data), io.BytesIO(data), f, str(tmp_path / "a.png")]
        for source in sources:
            assert np.array_equal(np.asarray(load_image(source)), expected), type(source)
    with pytest.raises(ImageLoadError, match=r"<BytesIO>: not a recognised image format"):
        load_image(io.BytesIO(b"junk"))
    with pytest.raises(ImageLoadError, match=r"<3 bytes>: not a recognised image format"):
        load_image(b"abc")


# ------------------------------------------------------------------------------------------- limits


def _png(width: int, height: int, pixel: bytes) -> bytes:
    """A PNG of one repeated pixel (1 byte: greyscale, 4 bytes: RGBA), streamed: tiny on disk, huge decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    colour_type = {1: 0, 3: 2, 4: 6}[len(pixel)]
    z, row = zlib.compressobj(6), b"\x00" + pixel * width
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_limits_refuse_before_decoding_and_can_be_raised():
    strip = _png(10, 300, b"\x80")  # aspect ratio 30
    with pytest.raises(ImageLoadError, match=r"10x300, aspect ratio 30 is over the limit of 20 \(max_aspect_ratio; --max-aspect-ratio"):
        load_image(strip)
    assert load_image(strip, limits=ImageLimits(max_aspect_ratio=40)).size == (10, 300)
    with pytest.raises(ImageLoadError, match=r"aspect ratio"):  # an image built in memory is checked too
        preprocess(Image.new("RGB", (10, 300)), 16)
    assert preprocess(Image.new("RGB", (10, 300)), 16, limits=ImageLimits(max_aspect_ratio=40)).shape == (3, 16, 16)
    big = _png(3000, 2000, b"\x80")
    with pytest.raises(ImageLoadError, match=r"3000x2000 = 6,000,000 pixels, over the limit of 5,000,000"):
        load_image(big, limits=ImageLimits(max_pixels=5_000_000))
    assert load_image(big).size == (3000, 2000)
    ds = pydicom.dcmread(DICOM_FILES["CT_small.dcm"])  # DICOM: checked from Rows x Columns, before decoding
    with pytest.raises(ImageLoadError, match=r"128x128 = 16,384 pixels, over the limit of 10,000"):
        load_image(_dicom_bytes(ds), limits=ImageLimits(max_pixels=10_000))


def test_memory_error_while_loading_is_that_images_error(monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(images, "to_rgb", no_memory)
    with pytest.raises(ImageLoadError, match="out of memory"):
        load_image(_encode(Image.fromarray(_rgb()), "PNG"))


def test_blending_and_scaling_in_strips_equal_the_whole_image(monkeypatch):
    """Transparency and high-bit-depth work is done a few rows at a time; the pixels are the same."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (37, 23, 4), dtype=np.uint8)
    deep = Image.fromarray(rng.integers(0, 5000, (37, 23)).astype(np.uint16))
    whole = [np.asarray(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))), np.asarray(load_image(_encode(deep, "PNG")))]
    alpha = rgba[..., 3:4] / 255.0  # Chameleon's _whiten_transparency, on the whole array
    assert np.array_equal(whole[0], ((1 - alpha) * 255 + alpha * rgba[..., :3]).astype(np.uint8))
    monkeypatch.setattr(images, "_STRIP_PIXELS", 50)  # two or three rows a strip
    strips = [np.asarray(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))), np.asarray(load_image(_encode(deep, "PNG")))]
    assert all(np.array_equal(a, b) for a, b in zip(whole, strips))


PEAK = """
import json, resource, sys
from medmax.images import ImageLoadError, load_image, preprocess
preprocess(load_image(sys.argv[1]), 64)  # warm up: imports, plugins, first allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[2:]:
    try:
        preprocess(load_image(path), 64)
        outcome = "ok"
    except ImageLoadError as exc:
        outcome = exc.reason
    print(json.dumps({"outcome": outcome, "mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def _peaks(tmp_path, *paths) -> list[dict]:
    """Load and preprocess each path in turn in a fresh process: the outcomes, and the growth of its peak RSS (MB) so far."""
    warm = tmp_path / "warm.png"
    Image.new("RGBA", (64, 64), (1, 2, 3, 100)).save(warm)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PEAK, str(warm), *map(str, paths)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()[-len(paths):]]


def test_memory_stays_bounded_on_hostile_pngs(tmp_path):
    """Issue 12: a 178-byte 1x100000 PNG took loading to 2.46 GB; an 8000x8000 RGBA PNG to 5.18 GB.

    Here a 3000x3000 half-transparent RGBA PNG (36 MB decoded; 650 MB with the whole-image float blend)
    loads within a few times its decoded size, and the 1x100000 strip is refused by its aspect ratio
    before any resize (it took 2 GB and 15 s).
    """
    strip = tmp_path / "strip.png"
    strip.write_bytes(_png(1, 100_000, b"\x80"))
    rgba = tmp_path / "rgba.png"
    rgba.write_bytes(_png(3000, 3000, b"\xc8\x0a\x0a\x80"))
    assert strip.stat().st_size < 300 and rgba.stat().st_size < 100_000
    refused, loaded = _peaks(tmp_path, strip, rgba)  # smallest first: the peak only grows
    assert "aspect ratio 100000" in refused["outcome"] and refused["mb"] < 50, refused
    assert loaded["outcome"] == "ok" and loaded["mb"] < 200, loaded


def test_dicom_in_strips_equals_whole(monkeypatch):
    """Every DICOM path (min-max, window, VOI LUT table, colour, palette) gives the same pixels by strips."""
    ds = pydicom.dcmread(DICOM_FILES["CT_small.dcm"])
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [256, 0, 12])  # LUT Descriptor: 256 entries from value 0, 12-bit output
    item.add_new(0x00283006, "US", [int(v) for v in np.linspace(0, 4095, 256)])  # LUT Data
    ds.VOILUTSequence = pydicom.Sequence([item])
    sources = [_dicom_bytes(ds)] + [DICOM_FILES[n] for n in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "examples_palette.dcm")]
    whole = [np.asarray(load_image(s)) for s in sources]
    assert whole[0].std() > 10 and not np.array_equal(whole[0], whole[1])  # the VOI LUT took effect
    monkeypatch.setattr(images, "_STRIP_PIXELS", 37)  # strips of a single row, or a few
    assert all(np.array_equal(np.asarray(load_image(s)), w) for s, w in zip(sources, whole))


def _load_in_thread(load, *args):
    """Run ``load(*args)`` in a daemon thread: -> (finished within 10 s, its exception or None)."""
    import threading

    outcome = {}

    def body():
        try:
            load(*args)
            outcome["error"] = None
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(10)
    return not thread.is_alive(), outcome.get("error")


def _unblock(fifo: Path) -> None:
    """Let a reader stuck on the FIFO's open see end of file (the old code's hang), so nothing is left blocked."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader is waiting


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_or_folder_is_refused_not_waited_on(tmp_path):
    from medmax.image_csv import load_image_csv

    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    try:
        finished, error = _load_in_thread(load_image, fifo)
        assert finished, "load_image waited on a FIFO"
        assert isinstance(error, ImageLoadError) and "not a regular file" in error.reason
        (tmp_path / "images.csv").write_text("img_path\nscan.png\nfolder\n")
        (tmp_path / "folder").mkdir()
        finished, error = _load_in_thread(load_image_csv, tmp_path / "images.csv", "img_path", tmp_path, 16, False)
        assert finished and error is None
        loaded = load_image_csv(tmp_path / "images.csv", "img_path", tmp_path, 16, progress=False)
        assert loaded.pixels is None and [f["row"] for f in loaded.errors] == [0, 1]
        assert all("not a regular file" in f["error"] for f in loaded.errors)
    finally:
        _unblock(fifo)
