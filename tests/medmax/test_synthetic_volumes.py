"""The synthetic lesion volumes of the volume evidence (medmax.synthetic_volumes): what the questions say is
where the reader (medmax.volumes) finds the lesion, whatever orientation the file was written in."""

from __future__ import annotations

import json

import numpy as np

from medmax.synthetic_volumes import THIRDS, write_volume_dataset
from medmax.volumes import open_volume


def test_answers_match_where_the_reader_finds_the_lesion(tmp_path):
    paths = write_volume_dataset(tmp_path, n_train=4, n_test=8, seed=3, shape=(24, 32, 32), dicom_every=4)
    rows = [json.loads(line) for line in paths["heldout.jsonl"].read_text().splitlines()]
    answers: dict = {}
    for r in rows:
        answers.setdefault(r["volume"], {})[r["type"]] = r["answer"]
    assert any(v.endswith(".nii.gz") for v in answers) and any(not v.endswith(".nii.gz") for v in answers)
    for name, said in answers.items():
        volume = open_volume(tmp_path / name)
        hu = np.stack([p for _, p in sorted(volume.read_slices(list(range(volume.n_slices))), key=lambda kp: kp[0])])
        bright = np.argwhere(hu > 200)  # (z, y, x) of lesion voxels, canonical LPS
        assert (said["presence"] == "yes") == bool(len(bright))
        if len(bright):
            z, x = bright[:, 0].mean(), bright[:, 2].mean()
            assert THIRDS[int(3 * z / len(hu))] == said["third"]
            assert ("right" if x < hu.shape[2] / 2 else "left") == said["side"]  # columns run right to left
    train = [json.loads(line) for line in paths["train.jsonl"].read_text().splitlines()]
    assert all(r["modalities"][0]["type"] == "image_3d" for r in train)
