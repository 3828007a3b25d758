"""VQGAN training: error falls, the codebook is used, saved weights round-trip, bad images are reported; taming's
full objective (discriminator switch-on, decoder-only, resume, perceptual weights) and the shipped configs.

A 16 px VQGAN (8x8 codes, 64-entry codebook) keeps a few dozen CPU steps within seconds; the trainer
has no size-specific code, the 64 px tiny preset runs through the same functions.
"""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medmax.images import preprocess
from medmax.synthetic import make_scans
from medmax.vqgan import VQGAN, load_vqgan, save_vqgan
from medmax.vqgan_training import (
    RunContext,
    Trainer,
    VQGANTrainConfig,
    evaluate_reconstruction,
    kmeans_plus_plus,
    pixel_loss,
    pixel_weights,
    reseed_dead_codes,
    train_vqgan,
)
from tokenization.train_vqgan import main

SMALL = dict(embed_dim=16, n_embed=64, ddconfig=dict(double_z=False, z_channels=16, resolution=16, in_channels=3, out_ch=3,
                                                     ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0))


def _small_vqgan(seed=0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN.from_params(SMALL)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on two shared, busy cores cost ~10x the CPU time of one (OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scans():
    return make_scans(48, seed=3, size=24)


@pytest.fixture(scope="module")
def pixels(scans):
    return torch.stack([preprocess(s.image, 16) for s in scans])  # (48, 3, 16, 16)


@pytest.fixture(scope="module")
def trained(pixels):
    vqgan = _small_vqgan()
    before = evaluate_reconstruction(vqgan, pixels)
    history = train_vqgan(vqgan, pixels, VQGANTrainConfig(steps=30, batch_size=8, lr=2e-3, reseed_every=5, init_images=32))
    return vqgan, before, history


def test_training_lowers_reconstruction_error(trained, pixels):
    vqgan, before, history = trained
    after = evaluate_reconstruction(vqgan, pixels)
    assert after["l1"] < 0.5 * before["l1"], (before, after)
    assert history[-1]["pixel_loss"] < history[0]["pixel_loss"]
    assert [r["step"] for r in history] == list(range(5, 31, 5))


def test_codebook_is_used_after_training(trained, pixels):
    vqgan, _, history = trained
    used = evaluate_reconstruction(vqgan, pixels)["codes_used"]
    assert used >= 16, f"only {used} of 64 codes used on 48 images"
    assert sum(r["reseeded"] for r in history) > 0  # dead codes were brought back at least once


def test_saved_vqgan_encodes_like_the_trained_one(trained, pixels, tmp_path):
    vqgan, _, _ = trained
    save_vqgan(vqgan, tmp_path)
    loaded = load_vqgan(tmp_path)
    assert torch.equal(loaded.encode_codes(pixels), vqgan.encode_codes(pixels))
    codes = vqgan.encode_codes(pixels[:4])
    assert torch.allclose(loaded.decode_codes(codes), vqgan.decode_codes(codes))


def test_same_seed_same_run(pixels):
    runs = []
    for _ in range(2):
        vqgan = _small_vqgan()
        history = train_vqgan(vqgan, pixels, VQGANTrainConfig(steps=3, batch_size=8, reseed_every=2, log_every=1, init_images=16, seed=7))
        runs.append(([r["loss"] for r in history], vqgan.quantize.embedding.weight.clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_kmeans_plus_plus_covers_every_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = (centres[:, None, :] + 0.01 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)  # 4 tight clusters
    chosen = kmeans_plus_plus(points, 4, g)
    nearest = torch.cdist(chosen, centres).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]


def test_reseed_moves_only_dead_codes_onto_the_worst_latents():
    vqgan = _small_vqgan()
    weight = vqgan.quantize.embedding.weight
    before = weight.detach().clone()
    counts = torch.ones(64, dtype=torch.long)
    counts[[3, 9]] = 0
    latents = before[[0, 0, 0]].clone()
    latents[1] += 5.0  # the farthest from its code
    latents[2] += 1.0
    n = reseed_dead_codes(vqgan, counts, latents, torch.zeros(3, dtype=torch.long))
    assert n == 2
    assert torch.equal(weight[3], latents[1]) and torch.equal(weight[9], latents[2])
    alive = counts > 0
    assert torch.equal(weight[alive], before[alive])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pixel_loss"):
        VQGANTrainConfig(pixel_loss="l3")
    with pytest.raises(ValueError, match="steps"):
        VQGANTrainConfig(steps=0)
    with pytest.raises(ValueError, match="pixel_weight"):
        VQGANTrainConfig(pixel_weight="focal")
    with pytest.raises(ValueError, match="pixel_weight_alpha"):
        VQGANTrainConfig(pixel_weight="contrast", pixel_weight_alpha=-1.0)


def test_contrast_weights_favour_pixels_far_from_the_image_mean():
    x = torch.full((1, 3, 4, 4), -0.5)
    x[..., 0, 0] = 1.0  # one bright pixel on a dark image
    w = pixel_weights(x, alpha=4.0)  # (1, 1, 4, 4)
    mean = x.mean()
    assert w.shape == (1, 1, 4, 4)
    assert torch.isclose(w[0, 0, 0, 0], 1 + 4.0 * (1.0 - mean))
    assert torch.isclose(w[0, 0, 1, 1], 1 + 4.0 * (mean + 0.5).abs())
    assert torch.equal(pixel_weights(x, alpha=0.0), torch.ones(1, 1, 4, 4))


def test_contrast_weighting_makes_a_missed_bright_spot_cost_more():
    x = torch.full((2, 3, 8, 8), -0.5)
    x[:, :, 2:4, 2:4] = 0.9  # a small bright "lesion"
    missed = x.clone()
    missed[:, :, 2:4, 2:4] = -0.5  # reconstruction that smooths the lesion away
    plain = pixel_loss(missed, x, VQGANTrainConfig())
    weighted = pixel_loss(missed, x, VQGANTrainConfig(pixel_weight="contrast", pixel_weight_alpha=5.0))
    assert weighted > 3 * plain
    uniform_error = x + 0.1  # the same error everywhere: a weighted mean leaves its scale unchanged
    assert torch.isclose(pixel_loss(uniform_error, x, VQGANTrainConfig(pixel_weight="contrast", pixel_weight_alpha=5.0)),
                         torch.tensor(0.1))


def test_program_reports_bad_image_and_saves_a_loadable_vqgan(scans, tmp_path):
    init = tmp_path / "init"
    save_vqgan(_small_vqgan(), init)
    data = tmp_path / "data"
    data.mkdir()
    names = []
    for scan in scans[:12]:
        scan.image.save(data / f"{scan.name}.png")
        names.append(f"{scan.name}.png")
    (data / "broken.png").write_bytes(b"not an image")
    names.insert(5, "broken.png")
    with open(data / "images.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_path"]] + [[n] for n in names])
    out = tmp_path / "out"

    args = ["--input", str(data / "images.csv"), "--output", str(out), "--init", str(init),
            "--steps", "3", "--batch-size", "4", "--seed", "1"]
    assert main(args) == 0

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["img_path"]) for e in errors] == [(5, "broken.png")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 12 and summary["n_failed"] == 1 and summary["steps_run"] == 3
    assert len((out / "history.jsonl").read_text().splitlines()) >= 1
    assert (out / "reconstructions.png").stat().st_size > 0
    good = torch.stack([preprocess(s.image, 16) for s in scans[:12]])  # the broken row is not replaced by anything
    assert evaluate_reconstruction(load_vqgan(out), good)["l1"] == pytest.approx(summary["after"]["l1"], abs=1e-6)
    assert main(args + ["--output", str(tmp_path / "strict"), "--strict"]) == 1


# ------------------------------------------------------------------------- taming's full objective


def _gan_config(**overrides) -> VQGANTrainConfig:
    base = dict(steps=4, batch_size=4, lr=1e-3, disc_start=2, disc_weight=0.8, disc_num_layers=2, disc_ndf=8, init_images=16, reseed_every=2, log_every=1,
                tensorboard=False, save_every=0, seed=3)
    return VQGANTrainConfig(**{**base, **overrides})


def _trainer(pixels, config, **context) -> Trainer:
    return Trainer(_small_vqgan(), pixels[:16], config, RunContext(**context))


def test_discriminator_is_not_updated_before_disc_start(pixels):
    before = _trainer(pixels, _gan_config(steps=3, disc_start=3))
    initial = {k: v.clone() for k, v in before.disc.state_dict().items()}
    history = before.run()
    assert all(torch.equal(v, initial[k]) for k, v in before.disc.state_dict().items())  # running stats too
    assert not any("d_loss" in r or "g_loss" in r for r in history)

    after = _trainer(pixels, _gan_config(steps=5, disc_start=3))
    history = after.run()
    assert [("d_loss" in r, "g_loss" in r) for r in history] == [(False, False)] * 3 + [(True, True)] * 2
    assert not torch.equal(after.disc.main[0].weight, initial["main.0.weight"])
    assert all(r["d_weight"] > 0 for r in history[3:])


def test_decoder_only_training_leaves_encoder_and_codebook_bit_identical(pixels):
    trainer = _trainer(pixels, _gan_config(train="decoder", disc_start=1, steps=3))
    frozen = {k: v.clone() for k, v in trainer.vqgan.state_dict().items() if k.startswith(("encoder.", "quant_conv.", "quantize."))}
    decoder = trainer.vqgan.decoder.conv_out.weight.detach().clone()
    digest = trainer.vqgan.codes_digest()
    trainer.run()
    state = trainer.vqgan.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert not torch.equal(trainer.vqgan.decoder.conv_out.weight, decoder)  # the decoder did learn
    assert trainer.vqgan.codes_digest() == digest


def test_training_all_weights_changes_the_codes_and_image_tokenize_refuses_to_mix_them(scans, gan_yaml, tmp_path, capsys):
    from tokenization.image_tokenize import main as tokenize

    data = _image_csv(scans[:6], tmp_path / "data")
    old = save_vqgan(_small_vqgan(), tmp_path / "old")
    new = tmp_path / "new"
    assert main(["--input", str(data), "--output", str(new), "--init", str(old), "--steps", "2", "--batch-size", "4",
                 "--train", "all", "--disc-start", "0", "--config", str(gan_yaml), "--no-progress", "--no-tensorboard", "--threads", "1"]) == 0
    summary = json.loads((new / "summary.json").read_text())
    assert summary["codes_changed"] and load_vqgan(new).codes_digest() != load_vqgan(old).codes_digest()
    tokens = tmp_path / "tokens"
    assert tokenize(["--input", str(data), "--output", str(tokens), "--ckpt", str(old), "--workers", "0", "--no-progress"]) == 0
    assert tokenize(["--input", str(data), "--output", str(tokens), "--ckpt", str(new), "--workers", "0", "--no-progress"]) == 2
    assert re.search(r"other settings: --ckpt \(the VQGAN's weights\) was", capsys.readouterr().err)


def _image_csv(scans, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for scan in scans:
        scan.image.save(folder / f"{scan.name}.png")
    with open(folder / "images.csv", "w", newline="") as f:
        csv.writer(f).writerows([["img_path"]] + [[f"{s.name}.png"] for s in scans])
    return folder / "images.csv"


@pytest.fixture(scope="module")
def gan_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny_gan.yaml"
    path.write_text("disc_num_layers: 2\ndisc_ndf: 8\nlog_every: 1\n")  # a 16 px image fits a 2-layer PatchGAN
    return path


def _program(data, out, init, gan_yaml, *extra):
    return main(["--input", str(data), "--output", str(out), "--init", str(init), "--batch-size", "4", "--disc-start", "1",
                 "--config", str(gan_yaml),
                 "--seed", "5", "--no-progress", "--no-tensorboard", "--eval-images", "4", "--threads", "1", *extra])


def test_resume_continues_the_same_run(scans, gan_yaml, tmp_path, capsys):
    data = _image_csv(scans[:8], tmp_path / "data")
    init = save_vqgan(_small_vqgan(), tmp_path / "init")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _program(data, straight, init, gan_yaml, "--steps", "4") == 0
    assert _program(data, resumed, init, gan_yaml, "--steps", "2") == 0  # stopped after 2 steps: the checkpoint is there
    assert _program(data, resumed, init, gan_yaml, "--steps", "4") == 0  # the same command, more steps: it continues
    a, b = load_vqgan(straight), load_vqgan(resumed)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    history = [json.loads(line) for line in (resumed / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    straight_history = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in history] == [r["loss"] for r in straight_history]
    assert "d_loss" in history[-1]
    assert _program(data, resumed, init, gan_yaml, "--steps", "6", "--lr", "1e-3") == 2
    assert re.search(r"other settings: lr was 0.0005, now 0.001", capsys.readouterr().err)


def test_without_perceptual_weights_the_term_is_off_with_one_warning(pixels, caplog):
    trainer = _trainer(pixels, _gan_config(steps=2, disc_start=None))
    history = trainer.run()
    warnings = [r for r in caplog.records if "perceptual" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--perceptual-weights" in warnings[0].getMessage()
    assert all(r["perceptual_loss"] == 0.0 for r in history)


def test_perceptual_weights_add_the_lpips_term(scans, gan_yaml, tmp_path):
    from medmax.perceptual import LPIPS

    torch.manual_seed(0)
    lpips = LPIPS((4, 8, 8, 8, 8))
    for p in lpips.parameters():
        p.data.uniform_(0.0, 0.2)
    save_file({k: v.contiguous() for k, v in lpips.state_dict().items()}, str(tmp_path / "lpips.safetensors"))
    data = _image_csv(scans[:8], tmp_path / "data")
    out = tmp_path / "out"
    assert _program(data, out, save_vqgan(_small_vqgan(), tmp_path / "init"), gan_yaml, "--steps", "2",
                    "--perceptual-weights", str(tmp_path / "lpips.safetensors")) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all(r["perceptual_loss"] > 0 for r in history)
    assert history[0]["nll_loss"] == pytest.approx(history[0]["pixel_loss"] + history[0]["perceptual_loss"], rel=1e-5)
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and {"psnr", "ssim", "perplexity", "lesion_survival"} <= evals[0].keys()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "tokenization" / "configs").glob("vqgan_*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_vqgan_config_parses_and_opens_with_its_command(path):
    from medmax.vqgan_train_config import read_config_yaml
    from tokenization.train_vqgan import build_parser, resolve_settings

    first = path.read_text().splitlines()[0]
    assert "-m tokenization.train_vqgan" in first and f"tokenization/configs/{path.name}" in first, first
    values = read_config_yaml(path)
    args = build_parser().parse_args(["--config", str(path), "--input", "x.csv", "--output", "out"])
    config, start = resolve_settings(args)
    assert config.disc_start is not None and {k: getattr(config, k) for k in values if k not in ("init", "preset")} == {
        k: tuple(v) if k == "adam_betas" else v for k, v in values.items() if k not in ("init", "preset")}


def test_medmax_gpu_config_is_medmaxs_recipe():
    from tokenization.train_vqgan import build_parser, resolve_settings

    path = Path(__file__).parents[2] / "tokenization" / "configs" / "vqgan_medmax_gpu.yaml"
    config, _ = resolve_settings(build_parser().parse_args(["--config", str(path), "--input", "x", "--output", "y"]))
    assert (config.disc_start, config.disc_weight, config.codebook_weight, config.lr, config.batch_size) == (25001, 0.8, 1.0, 4.5e-6, 2)
    assert config.scale_lr and config.adam_betas == (0.5, 0.9) and config.disc_loss == "hinge" and config.device == "cuda"


def test_bad_settings_name_the_setting(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("img_path\n")
    (tmp_path / "bad.yaml").write_text("disc_weigth: 0.8\n")
    assert main(["--config", str(tmp_path / "bad.yaml"), "--input", str(tmp_path / "a.csv"), "--output", str(tmp_path / "o")]) == 2
    assert re.search(r"unknown settings \['disc_weigth'\]", capsys.readouterr().err)
    (tmp_path / "t.yaml").write_text("train: encoder\n")
    assert main(["--config", str(tmp_path / "t.yaml"), "--input", str(tmp_path / "a.csv"), "--output", str(tmp_path / "o")]) == 2
    assert re.search("train must be one of", capsys.readouterr().err)


def test_torchrun_two_processes_share_each_global_batch(scans, gan_yaml, tmp_path):
    """Two gloo processes with batch 2 each see the same global batch as one process with batch 4: the same first loss,
    and after one synchronised update the same reconstruction loss."""
    import os
    import subprocess
    import sys

    data = _image_csv(scans[:8], tmp_path / "data")
    init = save_vqgan(_small_vqgan(), tmp_path / "init")
    common = ["--input", str(data), "--init", str(init), "--config", str(gan_yaml), "--steps", "2", "--disc-start", "1",
              "--seed", "2", "--no-progress", "--no-tensorboard", "--threads", "1", "--max-seconds", "600"]
    assert main([*common, "--output", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    leaves_no_threads = Path(__file__).parents[1] / "leaves_no_threads.py"  # and the ranks end their process group
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(leaves_no_threads),
           "-m", "tokenization.train_vqgan",
           *common, "--output", str(tmp_path / "two"), "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()] for name in ("one", "two"))
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)
    assert two[1]["pixel_loss"] == pytest.approx(one[1]["pixel_loss"], rel=1e-5)
    assert "d_loss" in two[1] and load_vqgan(tmp_path / "two").codes_digest() != load_vqgan(init).codes_digest()


def test_a_discriminator_too_deep_for_the_images_is_refused_before_training(pixels):
    from medmax.vqgan_train_config import VQGANConfigError

    with pytest.raises(VQGANConfigError, match=r"disc_num_layers 3 is too many for 16 px images .*use at most 2"):
        _trainer(pixels, _gan_config(disc_num_layers=3))


# ------------------------------------------------------------------ issue 23: inputs, advice and labels


def _quick(data, out, *extra):
    """One step of the 16 px VQGAN (or the tiny preset, with --preset) on the CSV ``data``."""
    start = [] if "--preset" in extra else ["--init", str(save_vqgan(_small_vqgan(), out.parent / f"{out.name}_init"))]
    return main(["--input", str(data), "--output", str(out), *start, "--batch-size", "4", "--no-progress", "--no-tensorboard",
                 "--eval-images", "4", "--threads", "1", *extra])


def test_resume_refuses_images_replaced_under_the_same_csv(scans, tmp_path, capsys):
    data = _image_csv(scans[:6], tmp_path / "data")
    out = tmp_path / "out"
    assert _quick(data, out, "--steps", "1") == 0
    scans[10].image.save(data.parent / f"{scans[0].name}.png")  # another scan under the first row's name: the CSV is unchanged
    assert _quick(data, out, "--steps", "2") == 2
    err = capsys.readouterr().err
    assert re.search(r"other settings: input_images was '[0-9a-f]{64}', now '[0-9a-f]{64}'", err), err
    scans[0].image.save(data.parent / f"{scans[0].name}.png")  # the same bytes again: the run resumes
    assert _quick(data, out, "--steps", "2") == 0
    assert [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()][-1] == 2


def test_an_invalid_utf8_path_is_that_rows_error(scans, tmp_path):
    data = _image_csv(scans[:6], tmp_path / "data")
    data.write_bytes(data.read_bytes() + b"bad\xff\xfe.png\n")
    out = tmp_path / "out"
    assert _quick(data, out, "--steps", "1") == 0
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["img_path"]) for e in errors] == [(6, "bad\\xff\\xfe.png")]
    assert "not valid UTF-8" in errors[0]["error"]
    assert json.loads((out / "summary.json").read_text())["n_images"] == 6


def test_a_pickled_perceptual_file_is_refused_with_advice_that_applies(scans, gan_yaml, tmp_path, capsys):
    import argparse

    torch.save({"net": argparse.Namespace(weight=torch.zeros(1))}, tmp_path / "lpips.pt")  # needs full unpickling
    data = _image_csv(scans[:6], tmp_path / "data")
    assert _quick(data, tmp_path / "out", "--steps", "1", "--perceptual-weights", str(tmp_path / "lpips.pt")) == 2
    err = capsys.readouterr().err
    assert "--perceptual-weights" in err and "--trust-checkpoint" not in err and "safetensors" in err, err
    assert len(err.strip().splitlines()) == 1


def test_the_aspect_ratio_limit_names_a_flag_the_program_has(scans, tmp_path):
    from PIL import Image

    data = _image_csv(scans[:6], tmp_path / "data")
    Image.new("RGB", (10, 300), "white").save(data.parent / "strip.png")
    data.write_text(data.read_text() + "strip.png\n")
    out = tmp_path / "out"
    assert _quick(data, out, "--steps", "1") == 0
    (error,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert "aspect ratio 30 is over the limit of 20" in error["error"]
    flag = re.search(r"--max-aspect-ratio", error["error"]).group(0)
    assert _quick(data, tmp_path / "wide", "--steps", "1", flag, "40") == 0  # the named flag exists and lifts the limit
    assert json.loads((tmp_path / "wide" / "summary.json").read_text())["n_failed"] == 0


def test_a_random_start_does_not_warn_that_the_codes_changed(scans, tmp_path, caplog):
    data = _image_csv(scans[:4], tmp_path / "data")
    assert _quick(data, tmp_path / "fresh", "--steps", "1", "--preset", "tiny", "--eval-images", "2") == 0
    assert not [r for r in caplog.records if "codes changed" in r.getMessage()]
    summary = json.loads((tmp_path / "fresh" / "summary.json").read_text())
    assert summary["codes_changed"] is None and summary["codes_digest_before"] is None
    caplog.clear()
    assert _quick(data, tmp_path / "from_init", "--steps", "1", "--train", "all") == 0  # from a saved VQGAN it still warns
    assert [r for r in caplog.records if "codes changed" in r.getMessage() and r.levelname == "WARNING"]


def test_psnr_without_eval_input_is_labelled_as_measured_on_training_images(scans, tmp_path, caplog):
    data = _image_csv(scans[:6], tmp_path / "data")
    assert _quick(data, tmp_path / "train_only", "--steps", "1") == 0
    messages = [r.getMessage() for r in caplog.records if "PSNR" in r.getMessage()]
    assert messages and all("held-out" not in m and "training-image PSNR" in m for m in messages), messages
    assert json.loads((tmp_path / "train_only" / "summary.json").read_text())["eval_images"].startswith("training images")
    caplog.clear()
    held = _image_csv(scans[6:10], tmp_path / "held")
    assert _quick(data, tmp_path / "with_held", "--steps", "1", "--eval-input", str(held)) == 0
    messages = [r.getMessage() for r in caplog.records if "PSNR" in r.getMessage()]
    assert messages and all("held-out PSNR" in m for m in messages), messages
    assert json.loads((tmp_path / "with_held" / "summary.json").read_text())["eval_images"].startswith("held-out")


def test_resume_refuses_perceptual_weights_replaced_under_the_same_path(scans, tmp_path, capsys):
    from medmax.perceptual import LPIPS

    def write_lpips(seed):
        torch.manual_seed(seed)
        lpips = LPIPS((4, 8, 8, 8, 8))
        for p in lpips.parameters():
            p.data.uniform_(0.0, 0.2)
        save_file({k: v.contiguous() for k, v in lpips.state_dict().items()}, str(tmp_path / "lpips.safetensors"))

    write_lpips(0)
    data, out = _image_csv(scans[:6], tmp_path / "data"), tmp_path / "out"
    flags = ["--perceptual-weights", str(tmp_path / "lpips.safetensors")]
    assert _quick(data, out, "--steps", "1", *flags) == 0
    write_lpips(1)  # other weights, same file name
    assert _quick(data, out, "--steps", "2", *flags) == 2
    assert re.search(r"other settings: perceptual_weights_sha256 was '[0-9a-f]{64}', now '[0-9a-f]{64}'", capsys.readouterr().err)


def test_eval_input_that_repeats_training_images_is_not_called_held_out(scans, tmp_path, caplog):
    data = _image_csv(scans[:6], tmp_path / "data")
    held = data.with_name("held.csv")
    held.write_text(f"img_path\n{scans[0].name}.png\n{scans[1].name}.png\n")  # the same files as two training rows
    assert _quick(data, tmp_path / "out", "--steps", "1", "--eval-input", str(held)) == 0
    messages = [r.getMessage() for r in caplog.records if "PSNR" in r.getMessage()]
    assert messages and all("training-image PSNR" in m for m in messages), messages
    assert any("2 of the 2 --eval-input images evaluated are also --input images" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["eval_images"].startswith("partly training images")
