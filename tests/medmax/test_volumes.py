"""Reading volumes (medmax.volumes, medmax.dicom_series) from real-format files: NIfTI written by nibabel in
canonical and non-canonical orientations, DICOM series written by pydicom from its CT test file (shuffled
file order, gaps, duplicates, mixed series), .npy arrays; and every bad input's one-line error."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from medmax.images import VolumeError
from medmax.synthetic_volumes import write_dicom_series, write_nifti
from medmax.volumes import WINDOWS, Intensity, choose_slices, open_volume, to_uint8


def coded_volume(z=5, y=6, x=7) -> np.ndarray:
    """Each voxel's value says where it is: 100 z + 10 y + x (canonical LPS)."""
    return (np.arange(z)[:, None, None] * 100 + np.arange(y)[None, :, None] * 10 + np.arange(x)[None, None, :]).astype(np.int16)


def read_all(volume) -> np.ndarray:
    out = np.zeros((volume.n_slices, *next(volume.read_slices([0]))[1].shape), dtype=np.float32)
    for k, plane in volume.read_slices(list(range(volume.n_slices))):
        assert plane.dtype == np.float32  # never float64
        out[k] = plane
    return out


@pytest.mark.parametrize("axcodes", ["LPS", "RAS", "PSR", "IRA", "LPI"])
def test_nifti_any_orientation_reads_back_canonical_lps(tmp_path, axcodes):
    hu = coded_volume()
    volume = open_volume(write_nifti(tmp_path / f"v_{axcodes}.nii.gz", hu, spacing=(2.5, 0.8, 0.7), axcodes=axcodes))
    assert np.array_equal(read_all(volume), hu)
    info = volume.describe()
    assert info["source_axcodes"] == axcodes and info["canonical"] == "LPS"
    assert info["spacing_mm"] == [2.5, 0.8, 0.7]
    assert volume.positions([0, 4]) == [0.0, 10.0]  # z of slices 0 and 4, inferior to superior


def test_dicom_series_in_shuffled_files_is_ordered_by_position_and_in_hu(tmp_path):
    hu = coded_volume() - 1000  # air to soft tissue
    folder = write_dicom_series(tmp_path / "ct", hu, spacing=(3.0, 0.5, 0.5), seed=3)
    names = sorted(p.name for p in folder.iterdir())
    import pydicom

    assert [pydicom.dcmread(folder / n).InstanceNumber for n in names] != sorted(pydicom.dcmread(folder / n).InstanceNumber for n in names)
    volume = open_volume(folder)
    assert np.array_equal(read_all(volume), hu)
    info = volume.describe()
    assert (info["kind"], info["modality"], info["spacing_mm"], info["source_axis"]) == ("dicom", "CT", [3.0, 0.5, 0.5], 0)
    assert volume.positions([0, 1, 4]) == [0.0, 3.0, 12.0]


def test_dicom_series_without_positions_falls_back_to_instance_number(tmp_path):
    import pydicom

    hu = coded_volume()
    folder = write_dicom_series(tmp_path / "ct", hu)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    volume = open_volume(folder)
    assert np.array_equal(read_all(volume), hu) and volume.spacing() is None


def test_dicom_series_with_a_gap_is_refused_naming_the_positions(tmp_path):
    folder = write_dicom_series(tmp_path / "ct", coded_volume(z=8), spacing=(2.0, 1.0, 1.0), skip=[4, 5])
    with pytest.raises(VolumeError, match=r"gap in the series: about 2 slice\(s\) missing between 6.000 mm and 12.000 mm"):
        open_volume(folder)


def test_dicom_duplicated_position_is_refused(tmp_path):
    import shutil

    folder = write_dicom_series(tmp_path / "ct", coded_volume())
    first = sorted(folder.iterdir())[0]
    shutil.copy(first, folder / "copy.dcm")
    with pytest.raises(VolumeError, match="duplicated slice position"):
        open_volume(folder)


def test_dicom_folder_mixing_series_or_sizes_is_refused(tmp_path):
    write_dicom_series(tmp_path / "mix", coded_volume(), series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "other", coded_volume() , series_uid="1.2.3.2")
    (tmp_path / "other" / "IM00000.dcm").rename(tmp_path / "mix" / "zz.dcm")
    with pytest.raises(VolumeError, match=r"mixes 2 series \(SeriesInstanceUID\)"):
        open_volume(tmp_path / "mix")
    write_dicom_series(tmp_path / "size", coded_volume())
    write_dicom_series(tmp_path / "small", coded_volume(y=4))
    (tmp_path / "small" / "IM00000.dcm").rename(tmp_path / "size" / "zz.dcm")
    with pytest.raises(VolumeError, match=r"mixes 2 slice sizes"):
        open_volume(tmp_path / "size")


def test_dicom_slice_without_pixel_data_is_refused_naming_the_file(tmp_path):
    import pydicom

    folder = write_dicom_series(tmp_path / "ct", coded_volume())
    path = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(VolumeError, match=f"{path.name}: DICOM slice without pixel data"):
        open_volume(folder)


def test_files_that_are_not_dicom_are_skipped_and_counted(tmp_path):
    folder = write_dicom_series(tmp_path / "ct", coded_volume())
    (folder / "README.txt").write_text("series exported by a PACS")
    volume = open_volume(folder)
    assert volume.skipped_files == 1 and volume.describe()["skipped_files"] == 1 and volume.n_slices == 5


def test_truncated_nifti_gz_is_one_error_naming_the_file(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", coded_volume(z=40, y=32, x=32))
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    volume = open_volume(path)  # the header is there
    with pytest.raises(VolumeError, match=r"v.nii.gz: truncated or unreadable voxel data"):
        read_all(volume)


def test_4d_nifti_needs_volume_index(tmp_path):
    import nibabel as nib

    data = np.stack([coded_volume().transpose(2, 1, 0), coded_volume().transpose(2, 1, 0) + 1], axis=-1)  # (X, Y, Z, 2)
    path = tmp_path / "fmri.nii"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))
    with pytest.raises(VolumeError, match=r"4D NIfTI file with 2 volumes: pick one with --volume-index \(0..1\)"):
        open_volume(path)
    assert np.array_equal(read_all(open_volume(path, volume_index=1)), coded_volume() + 1)
    with pytest.raises(VolumeError, match="--volume-index 2 is outside 0..1"):
        open_volume(path, volume_index=2)


def test_npy_channel_first_as_m3d_and_multimeditron_store_them(tmp_path):
    hu = coded_volume().astype(np.float32) / 500
    np.save(tmp_path / "v.npy", hu[None])  # (1, D, H, W)
    volume = open_volume(tmp_path / "v.npy")
    assert np.array_equal(read_all(volume), hu) and volume.spacing() is None and volume.positions([0]) is None


def test_npy_that_needs_unpickling_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(VolumeError, match="obj.npy: not a readable .npy array"):
        open_volume(tmp_path / "obj.npy")


def test_not_a_volume(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(VolumeError, match="not a volume"):
        open_volume(tmp_path / "x.png")
    with pytest.raises(VolumeError, match="no DICOM slices in the folder"):
        open_volume(tmp_path)


def test_windows_and_percentile_normalisation():
    assert Intensity.parse("lung").window == WINDOWS["lung"] == (1500.0, -600.0)
    assert Intensity.parse("400/50").bounds([]) == (-150.0, 250.0)
    with pytest.raises(ValueError, match="give one of brain, lung"):
        Intensity.parse("liver")
    values = np.linspace(-1000, 1000, 1001, dtype=np.float32)
    assert to_uint8(values, -150, 250)[[0, 500, 1000]].tolist() == [0, 96, 255]  # 0 HU: 150 / 400 * 255
    lo, hi = Intensity.parse("percentile").bounds([values])
    assert lo == pytest.approx(-990) and hi == pytest.approx(990)


def test_voxels_without_a_value_do_not_blank_the_volume(tmp_path):
    """NaN outside a brain mask is common in processed MRI: the percentiles are of the values there are, NaN is black
    (it blanked every slice: one NaN made both percentiles NaN)."""
    values = np.random.default_rng(0).normal(0, 100, (6, 16, 16)).astype(np.float32)
    values[:, :4, :4], values[:, -1, -1] = np.nan, np.inf
    np.save(tmp_path / "mri.npy", values)
    volume = open_volume(tmp_path / "mri.npy")
    slices = [0, 3]
    lo, hi = volume.bounds(slices, Intensity.parse("percentile"))
    assert np.isfinite([lo, hi]).all() and lo < 0 < hi
    for _, grey in volume.read_uint8(slices, lo, hi):
        assert grey[4:, 4:].std() > 20 and (grey[:4, :4] == 0).all() and grey[-1, -1] == 255


def test_choose_slices():
    assert choose_slices(100, 4) == [12, 37, 62, 87]
    assert choose_slices(3, 16) == [0, 1, 2] == choose_slices(3, "all")
    assert choose_slices(10, [1, 5]) == [1, 5]
    with pytest.raises(VolumeError, match=r"slice list \[5, 1\]"):
        choose_slices(10, [5, 1])
    with pytest.raises(VolumeError, match="slice list"):
        choose_slices(10, [3, 10])
