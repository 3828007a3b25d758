"""tokenization.image_tokenize --volume-column: volumes (DICOM series, NIfTI, .npy) -> one row of slice codes each,
under the same error, resume and world-size rules as images."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medmax.image_tokens import partition_files, read_image_token_manifest, read_volume_tokens
from medmax.images import preprocess
from medmax.synthetic_volumes import lesion_volume, write_dicom_series, write_nifti
from medmax.volumes import to_uint8

sys.path.insert(0, str(Path(__file__).parent))
from test_image_tokenize import Refused, _errors, _run, _torchrun  # noqa: E402

WINDOW = "400/50"  # HU -150..250
BAD = {
    "gap": "a gap in the series",
    "nopixels": "DICOM slice without pixel data",
    "trunc.nii.gz": "truncated or unreadable voxel data",
    "fmri.nii": "pick one with --volume-index",
    "../outside.nii.gz": "leaves the image root",
}


def _hu(seed: int, shape=(10, 24, 20)) -> np.ndarray:
    return lesion_volume(np.random.default_rng(seed), shape=shape).hu


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """A CSV of three good volumes (a shuffled DICOM series, a non-canonical NIfTI, a channel-first .npy)
    interleaved with one bad volume of each kind."""
    root = tmp_path_factory.mktemp("volumes")
    write_dicom_series(root / "ct", _hu(0), spacing=(2.5, 0.7, 0.7), seed=1)
    write_nifti(root / "mr.nii.gz", _hu(1), spacing=(3.0, 1.0, 1.0), axcodes="PIR")
    np.save(root / "vol.npy", _hu(2)[None])
    write_dicom_series(root / "gap", _hu(3), skip=[5])
    write_dicom_series(root / "nopixels", _hu(4))
    import pydicom

    broken = sorted((root / "nopixels").iterdir())[3]
    ds = pydicom.dcmread(broken)
    del ds.PixelData
    ds.save_as(broken)
    trunc = write_nifti(root / "trunc.nii.gz", _hu(5, (40, 32, 32)))
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), str(root / "fmri.nii"))
    write_nifti(root.parent / "outside.nii.gz", _hu(6))
    rows = ["ct", "gap", "mr.nii.gz", "nopixels", "trunc.nii.gz", "vol.npy", "fmri.nii", "../outside.nii.gz"]
    slices = {"mr.nii.gz": "1 4 8"}
    (root / "data.csv").write_text("volume,slices\n" + "".join(f"{r},{slices.get(r, '')}\n" for r in rows))
    return root / "data.csv"


def _vrun(csv: Path, out: Path, ckpt: Path, *extra: str) -> int:
    return _run(csv, out, ckpt, "--volume-column", "volume", "--slices", "4", "--slice-resolution", "32", "--window", WINDOW, *extra)


def _expected_codes(vqgan, hu: np.ndarray, slices: list[int]) -> np.ndarray:
    """What the 2D image path gives each slice saved as a windowed greyscale picture."""
    pixels = [preprocess(Image.fromarray(to_uint8(hu[k].astype(np.float32), -150, 250)).convert("RGB"), 32) for k in slices]
    return vqgan.encode_codes(torch.stack(pixels)).numpy()


def test_each_volume_is_one_row_of_slice_codes_in_canonical_order(volumes, tiny_vqgan, tiny_vqgan_dir, tmp_path):
    out = tmp_path / "out"
    assert _vrun(volumes, out, tiny_vqgan_dir, "--slice-column", "slices", "--partition-size", "3") == 0
    tokens = read_volume_tokens(out)
    assert sorted(tokens) == ["ct", "mr.nii.gz", "vol.npy"]
    ct = tokens["ct"]
    assert ct.slice_indices == [1, 3, 6, 8] and ct.grid == (4, 4) and ct.codes.shape == (4, 16)
    assert ct.positions_mm == [2.5, 7.5, 15.0, 20.0] and ct.spacing_mm == [2.5, 0.7, 0.7] and ct.window == WINDOW
    assert ct.geometry["modality"] == "CT" and ct.geometry["window_bounds"] == [-150.0, 250.0]
    for name, seed, slices in (("ct", 0, [1, 3, 6, 8]), ("mr.nii.gz", 1, [1, 4, 8]), ("vol.npy", 2, [1, 3, 6, 8])):
        assert tokens[name].slice_indices == slices
        assert np.array_equal(tokens[name].codes, _expected_codes(tiny_vqgan, _hu(seed), slices)), name
    assert tokens["mr.nii.gz"].geometry["source_axcodes"] == "PIR"
    errors = _errors(out)
    assert set(errors) == set(BAD) and all(reason in errors[p] for p, reason in BAD.items()), errors
    manifest = read_image_token_manifest(out)
    assert (manifest["version"], manifest["kind"], manifest["settings"]["window"]) == (3, "volumes", WINDOW)
    assert manifest["volumes"]["intensity"] == {"rule": "window", "name": None, "width": 400.0, "level": 50.0}
    assert manifest["rows"] == {"input": 8, "written": 3, "failed": 5, "duplicate": 0, "slices": 11, "skipped_files": 0}


def test_a_resume_with_another_window_is_refused_and_an_edited_slice_list_is_redone(volumes, tiny_vqgan_dir, tmp_path):
    out = tmp_path / "out"
    _vrun(volumes, out, tiny_vqgan_dir, "--slice-column", "slices", "--partition-size", "3")
    with pytest.raises(Refused, match=r"--window was 400/50, now lung"):
        _run(volumes, out, tiny_vqgan_dir, "--volume-column", "volume", "--slices", "4", "--slice-resolution", "32",
             "--window", "lung", "--slice-column", "slices", "--partition-size", "3")
    edited = tmp_path / "edited.csv"
    edited.write_text(volumes.read_text().replace("1 4 8", "0 2"))
    shutil.copy(edited, volumes.parent / "edited.csv")
    _vrun(volumes.parent / "edited.csv", out, tiny_vqgan_dir, "--slice-column", "slices", "--partition-size", "3")
    assert read_volume_tokens(out)["mr.nii.gz"].slice_indices == [0, 2]


def test_a_volume_in_an_image_run_fails_naming_the_flag(volumes, tiny_vqgan_dir, tmp_path):
    out = tmp_path / "out"
    _run(volumes, out, tiny_vqgan_dir, "--column", "volume")
    assert "tokenize volumes with --volume-column" in _errors(out)["ct"]


def test_slice_resolution_must_be_a_multiple_of_the_vqgan_downsampling(volumes, tiny_vqgan_dir, tmp_path):
    with pytest.raises(Refused, match=r"--slice-resolution 36: the VQGAN tiles multiples of 8 pixels"):
        _run(volumes, tmp_path / "out", tiny_vqgan_dir, "--volume-column", "volume", "--slice-resolution", "36")
    with pytest.raises(Refused, match=r"--window: window 'liver'"):
        _run(volumes, tmp_path / "out", tiny_vqgan_dir, "--volume-column", "volume", "--window", "liver")


def test_an_image_folder_with_a_version_2_manifest_still_resumes(volumes, tiny_vqgan_dir, tmp_path):
    root = volumes.parent
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "flat.png")
    (root / "images.csv").write_text("img_path\nflat.png\n")
    out = tmp_path / "out"
    _run(root / "images.csv", out, tiny_vqgan_dir)
    manifest = read_image_token_manifest(out)
    manifest["version"] = 2
    del manifest["kind"]
    for key in ("kind", "slices", "slice_column", "slice_resolution", "window", "volume_index"):
        del manifest["settings"][key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = [p.stat().st_mtime_ns for p in partition_files(out)]
    assert _run(root / "images.csv", out, tiny_vqgan_dir) == 0
    assert [p.stat().st_mtime_ns for p in partition_files(out)] == before  # nothing redone
    assert read_image_token_manifest(out)["version"] == 3


def test_torchrun_two_processes_match_one_for_volumes(volumes, tiny_vqgan_dir, tmp_path):
    single = tmp_path / "single"
    _vrun(volumes, single, tiny_vqgan_dir, "--partition-size", "2")
    double = tmp_path / "double"
    args = ["--volume-column", "volume", "--slices", "4", "--slice-resolution", "32", "--window", WINDOW]
    stdout = _torchrun(volumes, double, tiny_vqgan_dir, ["-m", "tokenization.image_tokenize", *args])
    assert {p.name.split("-")[1] for p in partition_files(double)} == {"rank00000", "rank00001"}
    one, two = read_volume_tokens(single), read_volume_tokens(double)
    assert sorted(one) == sorted(two) and all(np.array_equal(one[k].codes, two[k].codes) for k in one)
    assert _errors(double) == _errors(single)
    assert "8 rows: 3 written, 5 failed" in stdout
