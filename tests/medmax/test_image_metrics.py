"""FID against scipy's sqrtm and KID against a direct sum on fixed features; the extractors on tiny models, and
torch-fidelity's Inception-v3 on random weights against torch-fidelity's own forward."""

import itertools
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from transformers import Dinov2Config, Dinov2Model

from medmax.errors import UserError
from medmax.image_metrics import (INCEPTION_LAYER, INCEPTION_MODULE, INCEPTION_NAME, SMALL_N, TORCH_FIDELITY,
                                  InceptionFeatures, TransformersImageFeatures, compare_features, extract, fid, kid,
                                  mmd2_unbiased, torch_fidelity_inception, vqgan_encoder_fid)
from medmax.torch_files import CheckpointError


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (pytorch-fid's), with scipy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _features(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features, as real embeddings are
    return rng.normal(size=(n, d)) @ mix * scale + shift


@pytest.mark.parametrize("n,d,shift,scale", [(300, 8, 0.5, 1.0), (300, 8, 0.0, 2.0), (500, 16, -1.0, 0.5)])
def test_fid_equals_scipy_sqrtm(n, d, shift, scale):
    a, b = _features(0, n, d), _features(1, n, d, shift, scale)
    assert fid(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(_scipy_fid(a, b), rel=1e-7, abs=1e-9)
    assert fid(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-9)


def test_fid_with_fewer_images_than_dimensions_stays_real_and_close_to_scipy():
    a, b = _features(2, 10, 16), _features(3, 12, 16, 0.3)  # singular covariances
    ours = fid(torch.from_numpy(a), torch.from_numpy(b))
    assert np.isfinite(ours) and ours == pytest.approx(_scipy_fid(a, b), rel=1e-4)


def _direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 by explicit sums over pairs, k(u, v) = (u.v / d + 1)^3."""
    m, d = x.shape
    k = lambda u, v: (float(u @ v) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def test_kid_equals_a_direct_sum():
    x, y = _features(4, 7, 3), _features(5, 7, 3, 0.4)
    direct = _direct_mmd2(x, y)
    assert mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(direct, rel=1e-10)
    # subsets as large as the sets are permutations of them: every subset gives the full MMD^2
    mean, std, m = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=3, subset_size=100)
    assert (mean, m) == (pytest.approx(direct, rel=1e-10), 7) and std == pytest.approx(0.0, abs=1e-12)
    # smaller subsets: the mean of the subsets' direct sums, the same subsets for the same seed
    a = kid(torch.from_numpy(x), torch.from_numpy(y), subsets=5, subset_size=4, seed=3)
    assert a == kid(torch.from_numpy(x), torch.from_numpy(y), subsets=5, subset_size=4, seed=3)
    assert a[0] != pytest.approx(direct) and a[2] == 4


def test_compare_features_reports_counts_and_warns_at_small_n():
    a, b = torch.from_numpy(_features(6, 40, 4)), torch.from_numpy(_features(7, 30, 4, 1.0))
    out = compare_features(a, b, "test-extractor", kid_subsets=10, kid_subset_size=1000)
    assert (out["n_real"], out["n_generated"], out["feature_dim"], out["kid_subset_size"]) == (40, 30, 4, 30)
    assert out["fid"] > 1.0 and out["kid"] > 0 and out["extractor"] == "test-extractor"
    assert f"under {SMALL_N} images" in out["warning"] and "30 generated" in out["warning"]


def _images(n: int, seed: int, bright: bool) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = 160 if bright else 40
    return [Image.fromarray((rng.integers(0, 60, size=(40, 48, 3)) + base).astype(np.uint8)) for _ in range(n)]


def test_dinov2_folder_features(tmp_path):
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}}')
    cls_feats = TransformersImageFeatures.from_dir(tmp_path)
    assert (cls_feats.size, cls_feats.crop) == (32, 28)
    imgs = _images(3, 0, True)
    feats = extract(cls_feats, imgs, batch_size=2)
    assert feats.shape == (3, 32)
    # Dinov2Model's pooler_output is its final-LayerNormed CLS token
    torch.testing.assert_close(extract(TransformersImageFeatures.from_dir(tmp_path, pool="pooled"), imgs), feats)
    with pytest.raises(ValueError, match="pool must be one of"):
        TransformersImageFeatures.from_dir(tmp_path, pool="mean")


def test_vqgan_encoder_fid_separates_different_images(tiny_vqgan):
    dark, bright = _images(4, 1, False), _images(4, 2, True)
    same = vqgan_encoder_fid(tiny_vqgan, dark, dark)
    other = vqgan_encoder_fid(tiny_vqgan, bright, dark)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and other["fid"] > 100 * max(same["fid"], 1e-6)
    assert (other["n_real"], other["n_generated"], other["feature_dim"], other["extractor"]) == (
        4, 4, tiny_vqgan.config.embed_dim, "vqgan-encoder") and "warning" in other


def _torch_fidelity_pixels(image: Image.Image) -> torch.Tensor:
    """torch-fidelity's datasets.TransformPILtoRGBTensor (datasets.py imports torchvision, so it is restated here)."""
    image = image.convert("RGB")
    width, height = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


def test_inception_features_equal_torch_fidelitys_forward(inception_weights):
    rng = np.random.default_rng(5)
    square = [Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)) for _ in range(2)]
    grey = Image.fromarray(rng.integers(0, 256, size=(32, 32), dtype=np.uint8))  # another size, and not RGB
    images = [square[0], grey, square[1]]
    ours = InceptionFeatures.from_file(inception_weights)
    feats = extract(ours, images, batch_size=2)
    # the reference: torch-fidelity's module, loading the file itself, on its own uint8 batches (one per size)
    reference = torch_fidelity_inception().FeatureExtractorInceptionV3(
        INCEPTION_NAME, [INCEPTION_LAYER], feature_extractor_weights_path=str(inception_weights)).eval()
    with torch.no_grad():
        (pair,) = reference(torch.stack([_torch_fidelity_pixels(im) for im in square]))
        (single,) = reference(_torch_fidelity_pixels(grey)[None])
    assert feats.shape == (3, 2048) and ours.name == f"inception-v3 {inception_weights.name}"
    assert torch.equal(feats, torch.stack([pair[0], single[0], pair[1]]))
    assert feats.std() > 0.1 and (feats[0] - feats[2]).abs().max() > 0.1  # features that tell images apart
    assert INCEPTION_MODULE in sys.modules and TORCH_FIDELITY not in sys.modules  # the bare package was removed


def test_inception_weights_that_cannot_be_used_fail_in_one_line_naming_the_file(inception_weights, tmp_path):
    empty, truncated, other, tensor = (tmp_path / n for n in ("empty.pth", "truncated.pth", "other.pth", "tensor.pth"))
    empty.write_bytes(b"")
    truncated.write_bytes(inception_weights.read_bytes()[:100_000])
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, other)
    torch.save(torch.zeros(3), tensor)
    cases = [(tmp_path / "missing.pth", "no such file"), (empty, "the file is empty"), (truncated, "truncated or corrupt"),
             (other, "not torch-fidelity's Inception-v3 weights .*Missing key"), (tensor, "holds a Tensor")]
    for path, reason in cases:
        with pytest.raises(CheckpointError, match=reason) as caught:
            InceptionFeatures.from_file(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_inception_without_torch_fidelity_says_how_to_install_it(monkeypatch):
    monkeypatch.delitem(sys.modules, INCEPTION_MODULE, raising=False)
    monkeypatch.setitem(sys.modules, TORCH_FIDELITY, None)  # as if not installed: `import torch_fidelity` fails
    with pytest.raises(UserError, match="torch_fidelity is not installed: pip install --no-deps torch-fidelity=="):
        torch_fidelity_inception()
