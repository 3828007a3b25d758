import csv
import json

import numpy as np

from medmax.synthetic import POSITIONS, make_scans, write_dataset


def _quadrant_means(img):
    a = np.asarray(img, dtype=float)
    h, w = a.shape
    return {"upper left": a[: h // 2, : w // 2].max(), "upper right": a[: h // 2, w // 2 :].max(),
            "lower left": a[h // 2 :, : w // 2].max(), "lower right": a[h // 2 :, w // 2 :].max()}


def test_lesions_are_where_the_answers_say():
    scans = make_scans(40, seed=3)
    assert 8 < sum(s.lesion for s in scans) < 32
    for s in scans:
        peaks = _quadrant_means(s.image)
        if s.lesion:
            assert max(peaks, key=peaks.get) == s.position
            assert peaks[s.position] > 190
        else:
            assert max(peaks.values()) < 190


def test_questions_match_the_ground_truth():
    for s in make_scans(20, seed=1):
        qs = {q["question_type"]: q for q in s.questions()}
        assert qs["closed"]["answer"] == ("yes" if s.lesion else "no")
        assert ("mcq" in qs) == s.lesion
        if s.lesion:
            assert qs["mcq"]["answer"] == "ABCD"[POSITIONS.index(s.position)]
            assert s.position in s.caption


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = make_scans(3, seed=5), make_scans(3, seed=5), make_scans(3, seed=6)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(c[0].image))


def test_write_dataset_keeps_heldout_scans_out_of_training(tmp_path):
    info = write_dataset(tmp_path, n_train=12, n_test=5, seed=0, n_dicom=2)
    with open(info["images_csv"]) as f:
        listed = [r["img_path"] for r in csv.DictReader(f)]
    assert len(listed) == 17 + 2 and all((tmp_path / p).is_file() for p in listed)
    train_images = {json.loads(line)["image_path"] for line in open(info["train_jsonl"])}
    eval_rows = [json.loads(line) for line in open(tmp_path / "eval" / "eval.jsonl")]
    assert eval_rows and all((tmp_path / "eval" / r["image_path"]).is_file() for r in eval_rows)
    assert not train_images & {r["image_path"] for r in eval_rows}
    assert {r["question_type"] for r in eval_rows} <= {"closed", "mcq", "open"}
    rows = [json.loads(line) for line in open(info["train_jsonl"])]
    assert all(r["text"].count("<image>") == 1 and r["text"].count("<reserved08706>") == 1 for r in rows)
    generation = [r for r in rows if r["task"] == "image_generation"]
    assert len(generation) == 6  # scans 0, 2, 4, ... of the 12 training scans (generation_every=2)
    assert all(r["text"].endswith("<reserved08706><image>") for r in generation)
