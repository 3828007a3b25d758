"""Image-generation quality for eval.run: FID / KID of the drawn images against real ones, and a grid of drawings.

``--fid-features PATH`` names the feature extractor, a local file or folder; ``--fid-kind`` says which (``auto``
decides from the files):

- ``clip``: a Hugging Face CLIP folder or an open_clip one (BiomedCLIP), its image tower's unit-norm embedding
  (medmax/clip_score.py);
- ``dinov2``: a transformers vision folder (DINOv2, RadDino: ``config.json`` of another model type), its CLS
  token, or ``pooler_output`` with ``--fid-pool pooled``;
- ``vqgan-encoder``: a VQGAN (``vqgan.yaml`` + weights, as under a model folder's ``vqgan/``), mean-pooled
  pre-quantisation encoder features; a stand-in for runs without a trained extractor, comparable with nothing
  published;
- ``inception``: torch-fidelity's Inception-v3 weights file (``weights-inception-2015-12-05-6726825d.pth``; any
  single file without a ``vqgan.yaml`` beside it), its 2048-d pool3 features, the published FID's
  (medmax.image_metrics.InceptionFeatures). Needs torch-fidelity, installed ``--no-deps``; its weights are loaded,
  and checked, before any drawing.

``--fid-real`` is a folder of images (read recursively, in name order) or a CSV with an ``img_path`` /
``image_path`` column (paths relative to the CSV's folder, never leaving it). An unreadable real image is counted
and its reason reported in the task's entry, never replaced. The statistics are medmax/image_metrics.py's.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

from .errors import EvalError

logger = logging.getLogger(__name__)

KINDS = ("auto", "clip", "dinov2", "vqgan-encoder", "inception")
POOLS = ("cls", "pooled")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm")
GRID_IMAGES = 16


class ClipImageFeatures:
    """A CLIP / BiomedCLIP image tower as a feature extractor: its unit-norm image embedding."""

    kind = "clip"

    def __init__(self, scorer, name: str):
        self.scorer, self.name = scorer, name

    def __call__(self, images):
        return self.scorer.image_embeds(images).cpu()


def detect_kind(path: Path) -> str:
    """``clip``, ``dinov2``, ``vqgan-encoder`` or ``inception`` from the files at ``path``; EvalError when none fits."""
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        return "clip"
    if path.is_file():  # a VQGAN's weights beside its vqgan.yaml, else the one single-file extractor
        return "vqgan-encoder" if (path.parent / "vqgan.yaml").is_file() else "inception"
    if (path / "vqgan.yaml").is_file():
        return "vqgan-encoder"
    if (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except ValueError as e:
            raise EvalError(f"--fid-features {path}: config.json is not JSON ({e})") from None
        return "clip" if model_type == "clip" else "dinov2"
    raise EvalError(f"--fid-features {path}: neither a CLIP / open_clip folder, a transformers vision folder "
                    "(config.json) nor a VQGAN (vqgan.yaml); name the kind with --fid-kind")


def load_extractor(path: Path, kind: str = "auto", pool: str = "cls", device: str = "cpu"):
    from medmax.image_metrics import InceptionFeatures, TransformersImageFeatures, VqganEncoderFeatures

    if not path.exists():
        raise EvalError(f"--fid-features {path}: does not exist")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "inception":
        return InceptionFeatures.from_file(path, device=device)
    if kind == "clip":
        from medmax.clip_score import ClipScorer

        return ClipImageFeatures(ClipScorer.from_dir(path, device=device), f"clip {path.name}")
    if kind == "dinov2":
        return TransformersImageFeatures.from_dir(path, pool=pool, device=device)
    from medmax.vqgan import load_vqgan

    return VqganEncoderFeatures(load_vqgan(path, device=device), f"vqgan-encoder {path.name}")


def real_image_files(path: Path) -> list[tuple[str, Path | None, str | None]]:
    """``(name, file, None)`` per real image, or ``(name, None, reason)`` for a CSV row whose path is refused."""
    from medmax.image_csv import pick_column, resolve_image
    from medmax.images import ImageLoadError

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p.relative_to(path).as_posix(), p, None) for p in files]
    if not path.is_file():
        raise EvalError(f"--fid-real {path}: does not exist")
    import pandas as pd

    column = pick_column(path, None)
    out = []
    for img_path in pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False)[column]:
        try:
            out.append((img_path, resolve_image(path.parent, img_path), None))
        except ImageLoadError as e:
            out.append((img_path, None, e.reason))
    return out


def load_real_images(path: Path, batch_size: int = 32):
    """Yield ``(images, failed)`` per batch of up to ``batch_size`` readable real images (so a large folder is never
    held in memory at once); ``failed``: ``{"image", "reason"}`` for each one that is not readable."""
    from medmax.images import ImageLoadError, load_image

    images, failed = [], []
    for name, file, reason in real_image_files(path):
        try:
            if reason is None:
                images.append(load_image(file))
        except ImageLoadError as e:
            reason = e.reason
        if reason is not None:
            failed.append({"image": name, "reason": reason})
            logger.warning("--fid-real %s: %s: %s", path, name, reason)
        if len(images) == batch_size:
            yield images, failed
            images, failed = [], []
    if images or failed:
        yield images, failed


def real_features(path: Path, extractor, batch_size: int = 32):
    """-> (features (N, D) of the readable real images, the unreadable ones ``{"image", "reason"}``)."""
    import torch

    feats, failed = [], []
    for images, bad in load_real_images(path, batch_size):
        feats += [extractor(images)] if images else []
        failed += bad
    return (torch.cat(feats) if feats else torch.zeros(0, 0)), failed


def _rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def drawn_features(paths: list[Path], extractor, batch_size: int = 32):
    """(N, D) features of eval.run's own saved drawings, ``batch_size`` files at a time."""
    import torch

    feats = [extractor([_rgb(p) for p in paths[i : i + batch_size]]) for i in range(0, len(paths), batch_size)]
    return torch.cat(feats) if feats else torch.zeros(0, 0)


def generation_quality(rows: list[dict], output: Path, extractor, real, real_failed: list[dict], seed: int = 0) -> dict:
    """FID / KID of the rows' drawn images (``output_image`` under ``output``) against the real images' features."""
    from medmax.image_metrics import compare_features

    drawn = drawn_features([output / r["output_image"] for r in rows if r.get("output_image")], extractor)
    entry = {"real_unreadable": len(real_failed)}
    if real_failed:
        entry["real_unreadable_first"] = f"{real_failed[0]['image']}: {real_failed[0]['reason']}"
    try:
        entry.update(compare_features(real, drawn, extractor.name, seed=seed))
    except ValueError as e:  # fewer than 2 images on a side
        entry["error"] = f"FID/KID not computed: {e} ({real.shape[0]} real, {drawn.shape[0]} drawn images)"
    return entry


def write_grid(path: Path, rows: list[dict], output: Path, n: int = GRID_IMAGES) -> bool:
    """Up to ``n`` drawings with their prompts (matplotlib Agg); False when no row has a drawing."""
    shown = [r for r in rows if r.get("output_image")][:n]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(shown))
    nrows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown):
        ax.imshow(_rgb(output / row["output_image"]))
        ax.set_title(textwrap.shorten(str(row.get("question", "")), 90), fontsize=6, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


class GenerationQuality:
    """eval.run's image-generation extras per task: the grid always, FID / KID when ``features`` is given. The
    extractor and the real images are loaded once, on the first task that needs them."""

    def __init__(self, output: Path, features: Path | None = None, real: Path | None = None, kind: str = "auto",
                 pool: str = "cls", device: str = "cpu", seed: int = 0):
        self.output, self.features, self.real, self.kind, self.pool = output, features, real, kind, pool
        self.device, self.seed = device, seed
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            extractor = load_extractor(self.features, self.kind, self.pool, self.device)
            self._loaded = (extractor, *real_features(self.real, extractor))
        return self._loaded

    def entry(self, key: str, rows: list[dict]) -> dict:
        """``{"grid": file name}`` when a row has a drawing, ``{"image_quality": {...}}`` with ``features``."""
        from .outputs import grid_name

        out = {"grid": grid_name(key)} if write_grid(self.output / grid_name(key), rows, self.output) else {}
        if self.features is not None:
            out["image_quality"] = generation_quality(rows, self.output, *self._load(), seed=self.seed)
        return out


def report_lines(results: dict) -> list[str]:
    """report.md's section: each generation task's FID / KID with its counts, and its grid of drawings."""
    lines = []
    for key in sorted(k for k, e in results.items() if not k.startswith("_") and ("image_quality" in e or "grid" in e)):
        entry = results[key]
        lines += ["", f"## Image generation: {key}", ""]
        q = entry.get("image_quality")
        if q and "fid" in q:
            lines.append(f"- FID {q['fid']:.4f}, KID {q['kid']:.6f} (std {q['kid_std']:.6f} over {q['kid_subsets']} subsets "
                         f"of {q['kid_subset_size']}), on {q['extractor']} features ({q['feature_dim']} dimensions): "
                         f"{q['n_generated']} drawn against {q['n_real']} real images")
        elif q:
            lines.append(f"- {q['error']}")
        if q and q.get("warning"):
            lines.append(f"- warning: {q['warning']}")
        if q and q.get("real_unreadable"):
            lines.append(f"- {q['real_unreadable']} real images unreadable and left out; the first, {q['real_unreadable_first']}")
        if entry.get("grid"):
            lines += ["", f"![prompts and their drawings]({entry['grid']})"]
    return lines
