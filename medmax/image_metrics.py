"""Distribution metrics between generated and real images: FID and KID on features from a chosen extractor.

Statistics (computed here, in float64):

- **FID**: the Fréchet distance between Gaussians fitted to the two feature sets (mean, unbiased covariance),
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The trace of the square root is the sum of the square
  roots of the eigenvalues of ``S1^(1/2) S2 S1^(1/2)`` (symmetric, positive semi-definite; negative rounding
  clamped to 0), which equals scipy's ``sqrtm(S1 @ S2).trace()`` (tests/medmax/test_image_metrics.py checks it)
  and stays real where ``sqrtm`` returns complex noise.
- **KID**: the unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
  ``subsets`` random subsets of ``subset_size`` rows drawn without replacement from each set (torch-fidelity's
  definition; its defaults are 100 subsets of 1000). Mean and standard deviation over the subsets are reported.

torch-fidelity's metrics (and torchmetrics' FID/KID, whose ``image`` extra pulls torch-fidelity in) import
torchvision, which this toolkit does not install; the statistics are short enough to own, and are checked against
scipy and a direct sum. Only torch-fidelity's Inception-v3 network is used, as an extractor (below).

FID is biased upward at small n, and the bias depends on the extractor: figures are only comparable at the same
n and extractor, so every result carries ``n_real``, ``n_generated``, ``feature_dim`` and the extractor, and a
warning when n is below :data:`SMALL_N` (the customary 2048 at least) or not above the feature dimension (the
covariance is then singular).

Extractors (each maps a list of RGB PIL images to an (N, D) float tensor):

- :class:`TransformersImageFeatures` (kind ``dinov2``): a local transformers vision folder such as DINOv2 or
  RadDino (``AutoModel``), CLS token (``pool="cls"``) or ``pooler_output`` (``pool="pooled"``); the folder's
  ``preprocessor_config.json`` sizes, mean and std, applied with PIL (no image processor, which may need
  torchvision).
- :class:`VqganEncoderFeatures` (kind ``vqgan-encoder``): a VQGAN's encoder output after ``quant_conv`` and before
  quantisation, mean-pooled over the grid. A stand-in for tiny runs that have no trained extractor (the
  quickstart); not comparable with any published FID.
- :class:`InceptionFeatures` (kind ``inception``): torch-fidelity's Inception-v3 (the TensorFlow 2015-12-05
  graph FID was defined on, as ``FeatureExtractorInceptionV3``), its 2048-d pool3 features, from the weights file
  torch-fidelity downloads (``weights-inception-2015-12-05-6726825d.pth``) given as a local path. The network and
  its input handling (uint8 RGB, its TF1-compatible bilinear resize to 299, ``(x - 128) / 128``) are
  torch-fidelity's own module, imported without the package's ``__init__`` (:func:`torch_fidelity_inception`);
  the weights are read with ``torch.load(weights_only=True)`` only.
- The CLIP / BiomedCLIP image tower is in eval/fid.py (it reads through medmax/clip_score.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError

logger = logging.getLogger(__name__)

SMALL_N = 2048  # below this many images per side, FID is noticeably biased upward
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCH_FIDELITY, TORCH_FIDELITY_PIN = "torch_fidelity", "torch-fidelity==0.3.0"
INCEPTION_MODULE = f"{TORCH_FIDELITY}.feature_extractor_inceptionv3"
INCEPTION_NAME, INCEPTION_LAYER = "inception-v3-compat", "2048"  # torch-fidelity's extractor name, FID's layer


# ------------------------------------------------------------------------------ statistics
def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> mean (D,) and unbiased covariance (D, D), float64."""
    x = torch.as_tensor(feats).to(torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature rows of shape (N, D), got {tuple(x.shape)}")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2, s1, s2 = (torch.as_tensor(t).to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


def fid(real: torch.Tensor, generated: torch.Tensor) -> float:
    return frechet_distance(*feature_stats(real), *feature_stats(generated))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 of two equal-size (m, D) sets with :func:`polynomial_kernel` (diagonals of k_xx, k_yy left out)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(real, generated, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float, int]:
    """-> (mean, std over subsets, the subset size used: ``subset_size`` capped at the smaller set). In numpy:
    many small products, where torch's thread pool costs more than the arithmetic."""
    x, y = (torch.as_tensor(t).to(torch.float64).numpy() for t in (real, generated))
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 rows, got {m}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(x.shape[0], m, replace=False)], y[rng.choice(y.shape[0], m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values)), m


def small_sample_warning(n_real: int, n_generated: int, dim: int) -> str | None:
    n = min(n_real, n_generated)
    if n >= SMALL_N and n > dim:
        return None
    return (f"FID on {n_real} real and {n_generated} generated images ({dim}-dimensional features) is biased upward "
            f"(under {SMALL_N} images, or not more images than feature dimensions): compare it only with figures at "
            "the same n and extractor")


def compare_features(real: torch.Tensor, generated: torch.Tensor, extractor: str, kid_subsets: int = KID_SUBSETS,
                     kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict:
    """FID and KID of two feature sets, with the counts and the extractor's description (JSON values)."""
    kid_mean, kid_std, m = kid(real, generated, kid_subsets, kid_subset_size, seed)
    out = {"fid": fid(real, generated), "kid": kid_mean, "kid_std": kid_std, "kid_subsets": kid_subsets,
           "kid_subset_size": m, "n_real": int(real.shape[0]), "n_generated": int(generated.shape[0]),
           "feature_dim": int(real.shape[1]), "extractor": extractor}
    warning = small_sample_warning(out["n_real"], out["n_generated"], out["feature_dim"])
    if warning:
        out["warning"] = warning
    return out


# ------------------------------------------------------------------------------ extractors
def resize_crop_normalize(image: Image.Image, size: int, crop: int, mean, std) -> torch.Tensor:
    """RGB image -> (3, crop, crop): shorter side to ``size`` (bicubic), centre crop, (x / 255 - mean) / std."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - crop) // 2, (h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def processor_size(value, default: int) -> int:
    """An image processor's ``size`` / ``crop_size`` entry (int or dict) as one side length."""
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    return int(value) if value else default


class TransformersImageFeatures:
    """DINOv2 / RadDino (any transformers vision backbone with a CLS token) from a local folder."""

    kind = "dinov2"
    POOLS = ("cls", "pooled")

    def __init__(self, model, size: int, crop: int, mean, std, pool: str = "cls", name: str = "", device="cpu"):
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        self.model, self.size, self.crop, self.mean, self.std = model.eval().to(device), size, crop, mean, std
        self.pool, self.device, self.name = pool, device, name

    @classmethod
    def from_dir(cls, folder: str | Path, pool: str = "cls", device="cpu") -> "TransformersImageFeatures":
        from transformers import AutoModel

        folder = Path(folder)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        pre_path = folder / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        native = int(getattr(model.config, "image_size", 224))
        size, crop = processor_size(pre.get("size"), native), processor_size(pre.get("crop_size"), native)
        return cls(model, size, crop, pre.get("image_mean", IMAGENET_MEAN), pre.get("image_std", IMAGENET_STD), pool,
                   f"{model.config.model_type} {folder.name} ({pool})", device)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:  # (N, D)
        batch = torch.stack([resize_crop_normalize(im, self.size, self.crop, self.mean, self.std) for im in images])
        out = self.model(pixel_values=batch.to(self.device))
        feats = out.last_hidden_state[:, 0] if self.pool == "cls" else out.pooler_output
        return feats.float().cpu()


class VqganEncoderFeatures:
    """A VQGAN's pre-quantisation encoder features (after ``quant_conv``), mean-pooled over the grid: (N, embed_dim)."""

    kind = "vqgan-encoder"

    def __init__(self, vqgan, name: str = "vqgan-encoder"):
        self.vqgan, self.name = vqgan.eval(), name

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        from .images import preprocess

        weight = self.vqgan.encoder.conv_in.weight
        pixels = torch.stack([preprocess(im, self.vqgan.resolution) for im in images]).to(weight.device, weight.dtype)
        hidden = self.vqgan.quant_conv(self.vqgan.encoder(pixels))  # (B, embed_dim, h, w), before quantisation
        return hidden.float().mean(dim=(2, 3)).cpu()


def torch_fidelity_inception():
    """torch-fidelity's ``feature_extractor_inceptionv3`` module, imported without running the package's ``__init__``.

    ``torch_fidelity/__init__.py`` imports its LPIPS and dataset modules, which import torchvision (never installed
    here), so ``import torch_fidelity`` fails. The Inception module needs only torch and three small siblings
    (``feature_extractor_base``, ``helpers`` -> ``defaults``, ``interpolate_compat_tensorflow``). So, unless the
    package is already imported, a bare package module (the installed package's spec and ``__path__``, its
    ``__init__`` never executed) stands in ``sys.modules`` while the submodule is imported, and is removed again:
    a later ``import torch_fidelity`` (where torchvision exists) runs the real ``__init__``.
    """
    if INCEPTION_MODULE in sys.modules:
        return sys.modules[INCEPTION_MODULE]
    if sys.modules.get(TORCH_FIDELITY) is not None:  # the whole package imported already
        return importlib.import_module(INCEPTION_MODULE)
    spec = importlib.util.find_spec(TORCH_FIDELITY) if TORCH_FIDELITY not in sys.modules else None
    if spec is None or spec.submodule_search_locations is None:
        raise UserError(f"Inception features need torch-fidelity's Inception-v3 module, and {TORCH_FIDELITY} is not "
                        f"installed: pip install --no-deps {TORCH_FIDELITY_PIN} (--no-deps: it would pull torchvision)")
    sys.modules[TORCH_FIDELITY] = importlib.util.module_from_spec(spec)  # __init__ not executed
    try:
        return importlib.import_module(INCEPTION_MODULE)
    finally:
        sys.modules.pop(TORCH_FIDELITY, None)


def uint8_chw(image: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) uint8, the bytes torch-fidelity's ``TransformPILtoRGBTensor`` makes of it."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


class InceptionFeatures:
    """torch-fidelity's Inception-v3, pool3: (N, 2048), the features torch-fidelity's FID and KID use."""

    kind = "inception"

    def __init__(self, model, name: str = "inception-v3", device="cpu"):
        self.model, self.name, self.device = model.eval().to(device), name, device

    @classmethod
    def from_file(cls, path: str | Path, device="cpu") -> "InceptionFeatures":
        """From torch-fidelity's weights file, read with ``weights_only=True``; CheckpointError (naming the file)
        when it is missing, unreadable or not this network's state dict."""
        from .torch_files import CheckpointError, load_torch_file

        path = Path(path)
        module = torch_fidelity_inception()
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file (torch-fidelity's Inception-v3 weights)")
        state = load_torch_file(path, refusal="torch-fidelity's Inception-v3 weights are a plain state dict of tensors")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not torch-fidelity's Inception-v3 state dict")
        buffer = io.BytesIO()  # its constructor takes a path or file for torch.load: hand it our tensors, re-saved
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            model = module.FeatureExtractorInceptionV3(INCEPTION_NAME, [INCEPTION_LAYER], feature_extractor_weights_path=buffer)
        except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen keys
            raise CheckpointError(f"{path}: not torch-fidelity's Inception-v3 weights ({' '.join(str(e).split())[:300]})") from None
        return cls(model, f"inception-v3 {path.name}", device)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:  # (N, 2048)
        pixels = [uint8_chw(im) for im in images]
        out = torch.empty(len(pixels), 2048)
        for shape in dict.fromkeys(p.shape for p in pixels):  # one batch per image size, as torch-fidelity stacks
            rows = [i for i, p in enumerate(pixels) if p.shape == shape]
            (feats,) = self.model(torch.stack([pixels[i] for i in rows]).to(self.device))  # resized to 299 inside
            out[rows] = feats.float().cpu()
        return out


def extract(extractor, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """All images' features, ``batch_size`` at a time: (N, D)."""
    return torch.cat([extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def vqgan_encoder_fid(vqgan, generated: list[Image.Image], real: list[Image.Image], seed: int = 0) -> dict:
    """FID / KID of drawn images against real ones on a VQGAN's encoder features (the quickstart's stand-in)."""
    features = VqganEncoderFeatures(vqgan)
    return compare_features(extract(features, real), extract(features, generated), features.kind, seed=seed)
