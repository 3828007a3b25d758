"""eval.run's image-generation extras: FID / KID against real images on a chosen extractor, the grid in report.md."""

import json
import shutil

import pytest
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

import eval.run as run
from eval.errors import EvalError
from eval.fid import GenerationQuality, detect_kind, load_real_images, report_lines
from medmax.image_metrics import InceptionFeatures, VqganEncoderFeatures, extract, fid
from medmax.vqgan import load_vqgan


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gendata")
    rows = [{"task_name": "image_generation", "question_type": "quilt", "prompt": f"a pathology slide {i}", "answer": "",
             "image_path": None} for i in range(2)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    (root / "sub").mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]):
        Image.new("RGB", (40, 40), colour).save(root / ("sub" if i % 2 else ".") / f"{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "notes.txt").write_text("not an image")
    return root


def _argv(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--output", str(out), "--device", "cpu",
            "--tasks", "image_generation_quilt", *extra]


def _drawn(out, n=2):
    """An output folder as eval.run leaves it after drawing: predictions/images/*.png and their rows."""
    (out / "predictions" / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.effect_noise((32, 32), 40 + 20 * i).convert("RGB").save(out / "predictions" / "images" / f"u{i}.png")
        rows.append({"uid": f"u{i}", "question": f"a chest x-ray with a nodule {i}", "output_image": f"predictions/images/u{i}.png"})
    return rows + [{"uid": "u9", "question": "failed", "output": None, "error": "generation failed"}]


def test_generation_quality_entry_and_report(tiny_vqgan_dir, real_dir, tmp_path):
    rows = _drawn(tmp_path)
    entry = GenerationQuality(tmp_path, tiny_vqgan_dir, real_dir, seed=3).entry("image_generation_report", rows)
    q = entry["image_quality"]
    assert (q["n_real"], q["n_generated"], q["real_unreadable"]) == (4, 2, 1) and "broken.png" in q["real_unreadable_first"]
    assert q["extractor"] == f"vqgan-encoder {tiny_vqgan_dir.name}" and "warning" in q and q["kid_subset_size"] == 2
    # the same figure from the files themselves: the real folder's readable images, the drawings
    features = VqganEncoderFeatures(load_vqgan(tiny_vqgan_dir))
    real = [Image.open(p).convert("RGB") for p in sorted(real_dir.rglob("*.png")) if p.name != "broken.png"]
    drawn = [Image.open(tmp_path / r["output_image"]).convert("RGB") for r in rows if "output_image" in r]
    assert q["fid"] == pytest.approx(fid(extract(features, real), extract(features, drawn)), rel=1e-9)
    assert entry["grid"] == "generations_image_generation_report.png" and (tmp_path / entry["grid"]).is_file()
    md = "\n".join(report_lines({"image_generation_report": entry, "vqa_rad_closed": {"n": 1}}))
    assert f"FID {q['fid']:.4f}" in md and "2 drawn against 4 real images" in md and "warning: FID on 4 real" in md
    assert f"]({entry['grid']})" in md and "1 real images unreadable" in md and "vqa_rad" not in md
    assert GenerationQuality(tmp_path).entry("k", rows[2:]) == {}  # no drawing, no FID asked: nothing


@pytest.mark.slow
def test_fid_of_drawn_images_against_a_real_folder(tiny_model_dir, tiny_vqgan_dir, gen_data, real_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(tiny_model_dir, gen_data, out, "--fid-features", str(tiny_vqgan_dir), "--fid-real", str(real_dir))
    assert run.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["image_generation_quilt"]
    q = entry["image_quality"]
    assert (q["n_real"], q["n_generated"], q["real_unreadable"]) == (4, 2, 1) and entry["n"] == 0  # no --clip-model
    md = (out / "report.md").read_text()
    assert f"FID {q['fid']:.4f}" in md and "2 drawn against 4 real images" in md
    assert entry["grid"] == "generations_image_generation_quilt.png" and (out / entry["grid"]).is_file()
    assert f"]({entry['grid']})" in md
    before = (out / "results.json").read_bytes()
    assert run.main(argv) == 0 and (out / "results.json").read_bytes() == before  # a rerun re-merges to the same bytes
    other = tmp_path / "real2"
    shutil.copytree(real_dir, other)
    Image.new("RGB", (40, 40), (0, 0, 0)).save(other / "extra.png")
    capsys.readouterr()
    assert run.main(_argv(tiny_model_dir, gen_data, out, "--fid-features", str(tiny_vqgan_dir), "--fid-real", str(other))) == 2
    assert "fid real file extra.png added" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_run_measures_fid_on_inception_weights(tiny_model_dir, inception_weights, gen_data, real_dir, tmp_path):
    out = tmp_path / "out"
    assert run.main(_argv(tiny_model_dir, gen_data, out, "--fid-features", str(inception_weights), "--fid-real", str(real_dir))) == 0
    q = json.loads((out / "results.json").read_text())["image_generation_quilt"]["image_quality"]
    assert (q["n_real"], q["n_generated"], q["feature_dim"], q["real_unreadable"]) == (4, 2, 2048, 1)
    assert q["extractor"] == f"inception-v3 {inception_weights.name}"
    assert f"FID {q['fid']:.4f}" in (out / "report.md").read_text()


def test_fid_settings_are_checked_before_anything_runs(tiny_model_dir, gen_data, real_dir, tmp_path, capsys):
    assert run.main(_argv(tiny_model_dir, gen_data, tmp_path / "o", "--fid-real", str(real_dir))) == 2
    assert "--fid-features and --fid-real go together" in capsys.readouterr().err
    assert run.main(_argv(tiny_model_dir, gen_data, tmp_path / "o", "--fid-features", str(tmp_path / "none"),
                          "--fid-real", str(real_dir))) == 2
    assert "--fid-features" in capsys.readouterr().err
    (tmp_path / "inception.pth").write_bytes(b"")  # a single file: Inception weights, loaded before any drawing
    assert run.main(_argv(tiny_model_dir, gen_data, tmp_path / "o", "--fid-features", str(tmp_path / "inception.pth"),
                          "--fid-real", str(real_dir))) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'inception.pth'}: the file is empty" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_inception_weights_give_fid_against_a_real_folder(inception_weights, gen_data, tmp_path):
    real_dir = tmp_path / "real"  # two real images and two drawn ones: Inception runs at 299 px, on CPU
    real_dir.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (40, 40), colour).save(real_dir / f"{i}.png")
    assert detect_kind(inception_weights) == "inception"
    run.EvalConfig(model=tmp_path, data=gen_data, output=tmp_path / "o", fid_features=inception_weights, fid_real=real_dir)
    rows = _drawn(tmp_path)
    q = GenerationQuality(tmp_path, inception_weights, real_dir, seed=1).entry("image_generation_report", rows)["image_quality"]
    assert (q["n_real"], q["n_generated"], q["feature_dim"]) == (2, 2, 2048) and "warning" in q
    assert q["extractor"] == f"inception-v3 {inception_weights.name}"
    features = InceptionFeatures.from_file(inception_weights)
    real = [Image.open(p).convert("RGB") for p in sorted(real_dir.glob("*.png"))]
    drawn = [Image.open(tmp_path / r["output_image"]).convert("RGB") for r in rows if "output_image" in r]
    assert q["fid"] == pytest.approx(fid(extract(features, real), extract(features, drawn)), rel=1e-9) and q["fid"] > 0


def test_detect_kind(tiny_vqgan_dir, tmp_path):
    assert detect_kind(tiny_vqgan_dir) == "vqgan-encoder"
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text("{}")
    assert detect_kind(tmp_path / "oc") == "clip"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    assert detect_kind(tmp_path / "dino") == "dinov2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="name the kind with --fid-kind"):
        detect_kind(tmp_path / "empty")


def test_real_images_from_a_csv_count_every_refused_row(real_dir, tmp_path):
    csv = real_dir / "list.csv"
    csv.write_text("img_path,label\n0.png,a\nsub/1.png,b\n../escape.png,c\nmissing.png,d\n")
    try:
        batches = list(load_real_images(csv, batch_size=1))
    finally:
        csv.unlink()
    images = [im for batch, _ in batches for im in batch]
    failed = [f for _, bad in batches for f in bad]
    assert len(images) == 2 and [len(b) for b, _ in batches] == [1, 1, 0] and [f["image"] for f in failed] == ["../escape.png", "missing.png"]
    assert "leaves the image root" in failed[0]["reason"]


def test_fid_settings_join_the_fingerprint_only_when_fid_is_asked(tiny_vqgan_dir, gen_data, real_dir, tmp_path):
    from eval import fingerprint

    plain = run.EvalConfig(model=tmp_path, data=gen_data, output=tmp_path / "o")
    assert not {"fid_kind", "fid_pool", "fid_features", "fid_real"} & set(fingerprint.settings(plain))  # older runs still match
    asked = run.EvalConfig(model=tmp_path, data=gen_data, output=tmp_path / "o", fid_features=tiny_vqgan_dir, fid_real=real_dir)
    settings = fingerprint.settings(asked)
    assert (settings["fid_kind"], settings["fid_pool"]) == ("auto", "cls") and "fid_real" not in settings
    fp = fingerprint.compute(asked, {})
    assert "broken.png" in fp["fid_real"] and "sub/1.png" in fp["fid_real"] and "vqgan.yaml" in fp["fid_features"]
    other = fingerprint.compute(run.EvalConfig(model=tmp_path, data=gen_data, output=tmp_path / "o", fid_features=tiny_vqgan_dir,
                                               fid_real=real_dir, fid_pool="pooled"), {})
    assert "fid_pool 'cls' -> 'pooled'" in fingerprint.differences(fp, other)
