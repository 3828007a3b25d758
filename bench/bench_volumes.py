"""Reading a CT volume slice by slice: peak memory against the volume's int16 size, NIfTI and DICOM series.

Usage::

    nice -n 10 python bench/bench_volumes.py             # a 512 x 512 x 600 int16 CT (300 MiB)
    nice -n 10 python bench/bench_volumes.py --quick     # 256 x 256 x 150

A synthetic CT (``medmax.synthetic_volumes.lesion_volume``'s body, int16 HU, 0.7 x 0.7 x 1 mm) is written once to a
temporary folder as an uncompressed NIfTI file (``.nii``: nibabel memory-maps it), a gzipped one (``.nii.gz``,
read forward through the kept-open stream) and a DICOM series (one file per slice, pydicom's CT tags). Each
variant run is a child process (its peak RSS from ``wait4``: the interpreter and its libraries included) that
does what ``image_tokenize --volume-column`` does with a row before the VQGAN: every slice (``--slices all``),
reoriented to LPS, windowed (abdomen) and resized to 256 px (``medmax.volume_tokenizing.load_volume_row``).

- ``nifti`` / ``nifti.gz`` / ``dicom``: the toolkit's reader; their outputs (a digest of the 256 px slices) must
  be identical, the NIfTI one being the baseline.
- ``get_fdata``: what the obvious code does, for scale: nibabel's ``get_fdata()`` (the whole volume as
  float64), then the same windowing and resizing; not exact (float64 rounding), its agreement is reported.

Target: each of the toolkit's variants peaks under 2x the volume's int16 size (the issue's bound; the
interpreter with numpy, nibabel, pydicom, PIL and pyarrow counts against it, about 110 MiB); it is judged at
the full size only. The CPU's SIMD flags are recorded in the settings. Wall times on the shared machine are
dominated by its load and the child's start-up; read them as an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import (ROOT, Benchmark, Case, Result, Target, Variant, add_arguments, command_line,  # noqa: E402
                     run_benchmark, run_process, size_label)

FULL, QUICK = (600, 512, 512), (150, 256, 256)  # (slices, rows, columns)
SPACING = (1.0, 0.7, 0.7)
RESOLUTION, WINDOW = 256, "abdomen"


def cpu_flags() -> list[str]:
    """The SIMD flags of /proc/cpuinfo that decide numpy's and PIL's kernels."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    wanted = re.compile(r"^(sse4_[12]|ssse3|avx|avx2|avx512\w*|fma|f16c|amx\w*|neon|asimd\w*)$")
    return sorted(f for f in (found.group(1).split() if found else []) if wanted.match(f))


def write_volume(folder: Path, shape) -> dict[str, Path]:
    """The CT on disk: .nii, .nii.gz and a DICOM series; the array itself only as an int16 memmap."""
    import nibabel as nib

    from medmax.synthetic_volumes import lesion_volume, write_dicom_series

    folder.mkdir(parents=True, exist_ok=True)
    hu = np.lib.format.open_memmap(folder / "hu.npy", mode="w+", dtype=np.int16, shape=shape)  # (Z, Y, X)
    rng = np.random.default_rng(0)
    for z0 in range(0, shape[0], 50):  # slab by slab: never the whole volume in memory
        hu[z0:z0 + 50] = lesion_volume(rng, (min(50, shape[0] - z0), *shape[1:]), lesion=z0 == 0).hu
    hu.flush()
    affine = np.diag([-SPACING[2], -SPACING[1], SPACING[0], 1.0])  # voxel (L, P, S) in RAS
    image = nib.Nifti1Image(hu.transpose(2, 1, 0), affine)  # a view: nibabel writes it in chunks
    paths = {"nifti": folder / "ct.nii", "nifti.gz": folder / "ct.nii.gz", "dicom": folder / "ct_dicom"}
    nib.save(image, str(paths["nifti"]))
    nib.save(image, str(paths["nifti.gz"]))
    write_dicom_series(paths["dicom"], hu, SPACING, seed=None)
    return paths


def child(mode: str, path: Path) -> None:
    """One variant's work, in this (child) process; prints the output digest and the slice count as JSON."""
    import hashlib

    from medmax.images import ImageLimits
    from medmax.volume_tokenizing import VolumeRule, load_volume_row
    from medmax.volumes import Intensity, open_volume, slice_pixels, to_uint8

    intensity = Intensity.parse(WINDOW)
    if mode == "get_fdata":
        import nibabel as nib

        data = nib.load(str(path)).get_fdata()  # (X, Y, Z) float64
        lo, hi = intensity.bounds([])
        pixels = np.stack([slice_pixels(to_uint8(data[:, :, k].T.astype(np.float32), lo, hi), RESOLUTION) for k in range(data.shape[2])])
    else:
        rule = VolumeRule(root=path.parent, slices="all", resolution=RESOLUTION, intensity=intensity, volume_index=None,
                          limits=ImageLimits())
        pixels = load_volume_row(path.name, rule).pixels  # (K, 256, 256) uint8
        assert open_volume(path).n_slices == len(pixels)
    print(json.dumps({"digest": hashlib.sha256(pixels.tobytes()).hexdigest()[:16], "slices": len(pixels)}))


def _variant(name: str, mode: str, path: Path) -> Variant:
    def run() -> Result:
        proc = run_process([sys.executable, __file__, "--child", mode, str(path)], cwd=ROOT)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return Result(work={"slices": out["slices"]}, output=out["digest"], seconds=proc.seconds,
                      peak_rss_bytes=proc.peak_rss_bytes, cpu_seconds=proc.cpu_seconds)

    return Variant(name, run, exact=mode != "get_fdata")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 256 x 256 x 150 volume")
    p.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return 0
    shape = QUICK if args.quick else FULL
    int16_bytes = int(np.prod(shape)) * 2
    bench = Benchmark(
        name="volumes", title="Volumes: peak memory of reading a CT slice by slice", size=size_label(args.quick),
        description=__doc__.split("\n\n", 2)[2].strip(), command=command_line(argv),
        settings={"shape_zyx": list(shape), "int16_bytes": int16_bytes, "spacing_mm": list(SPACING), "slices": "all",
                  "slice_resolution": RESOLUTION, "window": WINDOW, "cpu_flags": cpu_flags()})
    work = Path(tempfile.mkdtemp(prefix="bench_volumes_"))
    try:
        paths = write_volume(work, shape)
        variants = [_variant(name, name, paths[name]) for name in ("nifti", "nifti.gz", "dicom")]
        variants.append(_variant("get_fdata", "get_fdata", paths["nifti"]))
        case = Case("read all slices", variants, unit="slices")
        targets = [Target("read all slices", name, "peak_rss_mib", "<=", 2 * int16_bytes / 2**20,
                          f"{name}: peak memory under 2x the volume's int16 size ({2 * int16_bytes / 2**20:.0f} MiB)", every_round=True)
                   for name in ("nifti", "nifti.gz", "dicom")] if not args.quick else []  # quick: the interpreter alone is over it
        return run_benchmark(bench, [case], targets, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
