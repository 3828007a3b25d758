"""VQGAN reconstruction training: error falls, the codebook is used, saved weights round-trip, bad images are reported.

A 16 px VQGAN (8x8 codes, 64-entry codebook) keeps a few dozen CPU steps within seconds; the trainer
has no size-specific code, the 64 px tiny preset runs through the same functions.
"""

import csv
import json

import pytest
import torch

from medmax.images import preprocess
from medmax.synthetic import make_scans
from medmax.vqgan import VQGAN, load_vqgan, save_vqgan
from medmax.vqgan_training import (
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
