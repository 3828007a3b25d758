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


def test_vqgan_training_list_holds_training_scans_only(tmp_path):
    """The quickstart trains its VQGAN on this list: no held-out scan may be in it."""
    info = write_dataset(tmp_path, n_train=12, n_test=5, seed=0, n_dicom=1)
    with open(info["train_images_csv"]) as f:
        listed = [r["img_path"] for r in csv.DictReader(f)]
    train_images = {json.loads(line)["image_path"] for line in open(info["train_jsonl"])}
    held_out = {json.loads(line)["image_path"] for line in open(info["heldout_jsonl"])}
    assert set(listed) == train_images and len(listed) == 12 and not set(listed) & held_out
    lesions = info["heldout_lesions"]  # the quickstart's faithfulness prompts
    assert lesions and {r["image_path"] for r in lesions} <= held_out
    assert all(r["size"] in r["prompt"] and r["position"] in r["prompt"] for r in lesions)


def test_locate_lesion_finds_known_lesions_even_blurred():
    from PIL import ImageFilter

    from medmax.synthetic import locate_lesion

    scans = make_scans(120, seed=7, size=64)
    for blur in (0, 2.0):  # 2 px of blur stands in for a VQGAN decode
        found = [locate_lesion(s.image.filter(ImageFilter.GaussianBlur(blur)) if blur else s.image) for s in scans]
        assert all(f == ((s.position, s.size) if s.lesion else None) for f, s in zip(found, scans)), blur


def test_faithfulness_counts_matches_against_one_in_eight():
    from medmax.synthetic import SIZES, faithfulness

    scans = [s for s in make_scans(60, seed=2, size=64) if s.lesion][:8] + make_scans(4, seed=3, lesion_fraction=0.0)
    targets = [(s.position, s.size) for s in scans[:4]]  # right
    targets += [(s.position, SIZES[1 - SIZES.index(s.size)]) for s in scans[4:6]]  # right place, wrong size
    targets += [(POSITIONS[(POSITIONS.index(s.position) + 1) % 4], s.size) for s in scans[6:8]]  # wrong place
    targets += [("upper left", "small")] * 4  # no lesion drawn at all
    result = faithfulness([s.image for s in scans], targets)
    assert (result["n"], result["match"], result["chance"]) == (12, 4 / 12, 1 / 8)
    assert (result["position_match"], result["size_match"], result["no_lesion_found"]) == (6 / 12, 6 / 12, 4)


def test_lesion_box_covers_the_lesion_and_is_none_without_one():
    from medmax.synthetic import _CENTRES, lesion_box, make_scans

    for scan in make_scans(12, seed=5):
        box = lesion_box(scan.image)
        if not scan.lesion:
            assert box is None
            continue
        cx, cy = _CENTRES[scan.position]
        assert box[0] < cx < box[2] and box[1] < cy < box[3]
        assert (box[2] - box[0]) < 0.5 and (box[3] - box[1]) < 0.5  # the lesion, not the body
