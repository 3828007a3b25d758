"""--train-data (issue 28): eval images found in training data by pixels or by VQGAN codes (never by name),
question texts found there, and the score on seen and unseen images."""

import csv
import json

import numpy as np
from PIL import Image

import eval.run as run
from medmax import image_tokens
from medmax.images import preprocess
from medmax.vqgan import load_vqgan


def _scan(i):
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _eval_data(root):
    root.mkdir()
    rows = []
    for i in range(4):
        _scan(i).save(root / f"{i}.png")
        rows.append({"task_name": "vqa_rad", "question_type": "closed", "prompt": f"Is there a mass in region {i}?",
                     "answer": "yes", "image_path": f"{i}.png"})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _train_csv(root):
    root.mkdir()
    _scan(0).save(root / "renamed_a.bmp")  # same pixels, another name and format
    _scan(1).save(root / "b.png")
    Image.new("RGB", (40, 48), (1, 2, 3)).save(root / "other.png")
    with open(root / "images.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["img_path", "text"])
        writer.writeheader()
        writer.writerows([{"img_path": "renamed_a.bmp", "text": "<image>Is there a mass in region 0?<reserved08706>yes"},
                          {"img_path": "b.png", "text": "Describe the scan."}, {"img_path": "other.png", "text": ""}])
    return root / "images.csv"


def _token_folder(root, model_dir):
    vqgan = load_vqgan(model_dir / "vqgan").prepare_for_encoding()
    codes = vqgan.encode_codes(preprocess(_scan(2), vqgan.resolution)[None])[0].numpy()
    root.mkdir()
    image_tokens.write_partition(image_tokens.partition_path(root, 0, 0),
                                 image_tokens.partition_table(["elsewhere/scan_2.jpg"], [codes]), {"partition": 0})
    manifest = {"format": image_tokens.FORMAT, "version": image_tokens.VERSION, "complete": True,
                "settings": {"vqgan_digest": vqgan.codes_digest()}}
    (root / image_tokens.MANIFEST).write_text(json.dumps(manifest))
    return root


def test_seen_images_and_questions_are_counted_and_scored_apart(tiny_model_dir, tmp_path):
    data = _eval_data(tmp_path / "data")
    train = [_train_csv(tmp_path / "train"), _token_folder(tmp_path / "tokens", tiny_model_dir)]
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--tasks", "vqa_rad_closed",
            "--max-new-tokens", "1", "--device", "cpu", "--train-data", *map(str, train)]
    assert run.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    c = results["vqa_rad_closed"]["contamination"]
    assert (c["images_in_training"], c["n_images"], c["questions_in_training"], c["n_questions"]) == (3, 4, 1, 4)
    assert c["score_seen"]["n"] == 3 and c["score_unseen"]["n"] == 1
    assert any("1 images by VQGAN codes" in note for note in results["_train_data"])
    assert "## Contamination (--train-data)" in (out / "report.md").read_text()
    fp = json.loads((out / "fingerprint.json").read_text())
    assert "train_data" not in fp["settings"]  # it decides no prediction: a rerun with it re-merges only
    assert run.main(argv[:-3]) == 0


def test_a_sequence_folder_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    data = _eval_data(tmp_path / "data")
    seq = tmp_path / "sequences"
    seq.mkdir()
    (seq / "manifest.json").write_text(json.dumps({"format": "medmax-sequences"}))
    code = run.main(["--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                     "--tasks", "vqa_rad_closed", "--device", "cpu", "--max-new-tokens", "1", "--train-data", str(seq)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pass the image-token folder or the CSV" in err
