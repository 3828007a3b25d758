"""Synthetic 3D volumes on disk, in real formats: a NIfTI file in any orientation, a DICOM series with real tags.

Used by the tests, the volume evidence (``bench/volume_evidence.py``) and the memory benchmark
(``bench/bench_volumes.py``). Every writer takes the volume in the canonical layout :mod:`medmax.volumes`
reads back: an int16 array ``(Z, Y, X)`` in LPS (slices inferior to superior, rows anterior to posterior,
columns from the patient's right to left), so a test can compare what is read with what was written.

:func:`lesion_volume` draws a "CT" body with a bright lesion spanning a slab of slices, in one third of the
volume (lower, middle, upper along z) and on one side (the patient's left or right), for the evidence's
questions; :func:`write_volume_dataset` writes a training and a held-out set of them with their questions
(is there a lesion, in which third, on which side).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

THIRDS = ("lower", "middle", "upper")  # along z: inferior to superior
SIDES = ("right", "left")  # the patient's: columns run right to left in LPS


def write_nifti(path: str | Path, hu: np.ndarray, spacing=(2.0, 1.0, 1.0), axcodes: str = "LPS") -> Path:
    """``hu`` (Z, Y, X) canonical -> a NIfTI file whose voxel axes point along ``axcodes`` (e.g. ``"PSR"``)."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, ornt_transform

    dz, dy, dx = spacing
    lps = np.ascontiguousarray(np.transpose(hu, (2, 1, 0)))  # (X, Y, Z) voxel axes L, P, S
    affine_ras = np.diag([-dx, -dy, dz, 1.0])  # voxel (L, P, S) steps in RAS world: x and y negated
    img = nib.Nifti1Image(lps, affine_ras)
    img = img.as_reoriented(ornt_transform(axcodes2ornt(tuple("LPS")), axcodes2ornt(tuple(axcodes))))
    out = nib.Nifti1Image(np.asarray(img.dataobj).astype(hu.dtype), img.affine)
    nib.save(out, str(path))
    return Path(path)


def write_dicom_series(folder: str | Path, hu: np.ndarray, spacing=(2.0, 1.0, 1.0), *, skip: Iterable[int] = (),
                       seed: int | None = 0, series_uid: str = "1.2.826.0.1.3680043.8.498.1") -> Path:
    """``hu`` (Z, Y, X) canonical, int16 HU -> one DICOM file per slice (axial, LPS), named in shuffled order.

    The template is pydicom's own CT test file (``CT_small.dcm``: real CT tags and explicit VR little
    endian); each slice gets its pixels (stored as HU + 1024 with ``RescaleIntercept`` -1024),
    ``ImagePositionPatient``, ``ImageOrientationPatient`` (1,0,0 / 0,1,0), ``PixelSpacing``,
    ``SliceThickness``, ``InstanceNumber`` and UIDs. Slices in ``skip`` are not written (a gap).
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dz, dy, dx = spacing
    order = np.random.default_rng(seed).permutation(len(hu)) if seed is not None else np.arange(len(hu))
    for name_index, z in enumerate(order):
        if int(z) in set(skip):
            continue
        ds = template.copy()
        stored = (hu[z].astype(np.int32) + 1024).astype(np.int16)  # (Y, X)
        ds.Rows, ds.Columns = stored.shape
        ds.PixelData = stored.tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-dx * hu.shape[2] / 2, -dy * hu.shape[1] / 2, float(z) * dz]
        ds.PixelSpacing, ds.SliceThickness = [dy, dx], dz
        ds.InstanceNumber, ds.SeriesInstanceUID = int(z) + 1, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(z)])
        for tag in ("WindowCenter", "WindowWidth", "SliceLocation"):
            if tag in ds:
                delattr(ds, tag)
        ds.save_as(folder / f"IM{name_index:05d}.dcm", enforce_file_format=True)
    return folder


@dataclass(frozen=True)
class LesionVolume:
    """One synthetic CT volume and its ground truth."""

    hu: np.ndarray  # (Z, Y, X) int16, canonical LPS
    lesion: bool
    third: str | None  # one of THIRDS
    side: str | None  # one of SIDES


def lesion_volume(rng: np.random.Generator, shape=(24, 48, 48), lesion: bool = True, third: str | None = None,
                  side: str | None = None) -> LesionVolume:
    """A soft-tissue ellipsoid "body" (about 40 HU, noisy) in air; with ``lesion``, a bright (300 HU) ball
    spanning a slab of about a sixth of the slices, centred in ``third`` and on ``side``."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    hu = np.where((y / 0.8) ** 2 + (x / 0.9) ** 2 < 1, 40.0, -1000.0) + rng.normal(0, 15, shape)
    if lesion:
        third = third or THIRDS[rng.integers(3)]
        side = side or SIDES[rng.integers(2)]
        zc = (-2 / 3, 0.0, 2 / 3)[THIRDS.index(third)] + rng.uniform(-0.1, 0.1)
        xc = (-0.45 if side == "right" else 0.45) + rng.uniform(-0.1, 0.1)
        yc = rng.uniform(-0.3, 0.3)
        radius = rng.uniform(0.2, 0.3)
        ball = ((z - zc) / 0.2) ** 2 + ((y - yc) / radius) ** 2 + ((x - xc) / radius) ** 2 < 1
        hu[ball] = 300.0 + rng.normal(0, 15, int(ball.sum()))
    return LesionVolume(np.clip(hu, -1024, 3000).astype(np.int16), lesion, third if lesion else None, side if lesion else None)


QUESTIONS = {  # question type -> (question, the words an answer is scored by)
    "presence": ("Is there a lesion?", ("yes", "no")),
    "third": ("In which third of the volume (upper, middle, lower) is the lesion?", THIRDS),
    "side": ("Is the lesion on the left or the right?", SIDES),
}
_AXCODES = ("LPS", "RAS", "PSR", "LPI")  # NIfTI files in canonical and non-canonical orientations


def volume_questions(volume: LesionVolume) -> list[tuple[str, str, str]]:
    """``(type, question, answer)`` for one volume: presence always, third and side when it has a lesion."""
    rows = [("presence", QUESTIONS["presence"][0], "yes" if volume.lesion else "no")]
    if volume.lesion:
        rows += [("third", QUESTIONS["third"][0], volume.third), ("side", QUESTIONS["side"][0], volume.side)]
    return rows


def write_volume_dataset(folder: str | Path, n_train: int, n_test: int, seed: int = 0, shape=(24, 48, 48),
                         lesion_fraction: float = 2 / 3, dicom_every: int = 10) -> dict:
    """Synthetic lesion volumes on disk and their questions, for training and held-out measurement.

    Volume ``i`` is a NIfTI file in one of several orientations (every ``dicom_every``-th a DICOM series folder).
    Writes ``volumes.csv`` (column ``volume``, every volume), ``train_images.csv`` (PNG mid-slices of the training
    volumes, for a VQGAN), ``train.jsonl`` (conversation rows with MultiMeditron's ``image_3d`` modality) and
    ``heldout.jsonl`` (``{volume, type, question, answer}``). Returns their paths.
    """
    folder = Path(folder)
    (folder / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, heldout, train, slices = [], [], [], []
    for i in range(n_train + n_test):
        volume = lesion_volume(rng, shape, lesion=bool(rng.random() < lesion_fraction))
        name = _write_one(folder / "volumes", i, volume, dicom_every, shape)
        names.append(name)
        for kind, question, answer in volume_questions(volume):
            if i < n_train:
                train.append({"conversations": [{"role": "user", "content": "<image>" + question}, {"role": "assistant", "content": answer}],
                              "modalities": [{"type": "image_3d", "value": name}]})
            else:
                heldout.append({"volume": name, "type": kind, "question": question, "answer": answer})
        if i < n_train:
            slices += _training_slices(folder, i, volume)
    (folder / "volumes.csv").write_text("volume\n" + "".join(f"{n}\n" for n in names))
    (folder / "train_images.csv").write_text("img_path\n" + "".join(f"{s}\n" for s in slices))
    order = np.random.default_rng(seed + 1).permutation(len(train))
    (folder / "train.jsonl").write_text("".join(json.dumps(train[j]) + "\n" for j in order))
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    return {name: folder / name for name in ("volumes.csv", "train_images.csv", "train.jsonl", "heldout.jsonl")}


def _write_one(root: Path, i: int, volume: LesionVolume, dicom_every: int, shape) -> str:
    spacing = (6.0, 1.0, 1.0)
    if dicom_every and i % dicom_every == dicom_every - 1:
        write_dicom_series(root / f"case{i:04d}", volume.hu, spacing, seed=i)
        return f"volumes/case{i:04d}"
    write_nifti(root / f"case{i:04d}.nii.gz", volume.hu, spacing, axcodes=_AXCODES[i % len(_AXCODES)])
    return f"volumes/case{i:04d}.nii.gz"


def _training_slices(folder: Path, i: int, volume: LesionVolume) -> list[str]:
    """Two slices of a training volume as abdomen-windowed PNGs (one through the lesion when it has one)."""
    from PIL import Image

    from .volumes import WINDOWS, to_uint8

    width, level = WINDOWS["abdomen"]
    (folder / "slices").mkdir(exist_ok=True)
    bright = np.flatnonzero((volume.hu > 200).any(axis=(1, 2)))
    picks = {len(volume.hu) // 2, int(bright[len(bright) // 2]) if len(bright) else 0}
    out = []
    for k in sorted(picks):
        rel = f"slices/case{i:04d}_{k:02d}.png"
        Image.fromarray(to_uint8(volume.hu[k].astype(np.float32), level - width / 2, level + width / 2)).save(folder / rel)
        out.append(rel)
    return out
