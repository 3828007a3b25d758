"""The ``image_editing`` task kind: input images + an instruction -> an image, scored against a target image.

A row (MedMax's eval schema) holds the instruction in ``prompt``, the target image's path in ``answer`` and
the input image in ``image_path``, or several in ``input_images`` (a list of paths, in prompt order). The
prompt is the input images, the instruction, then the end-of-turn (``medmax.prompting``'s one layout), and
the model draws one image (``--mode image`` guidance: full prompt, input images alone, nothing).

Each row is scored at the drawn image's size (target and inputs resized and centre-cropped to it, as the
VQGAN's input is) by PSNR and SSIM against the target, and so is the **no-change baseline**: the first input
returned as it is. A model that does not beat that baseline on a task (HealthGPT's CT-to-MRI "translation"
handed the input back) is named in the report's warnings. Rows of the synthetic edit tasks
(``medmax.synthetic_edits``) also carry ``edit`` (``{"kind", "position", "size"}``) and are judged by the
lesion locator: ``edit_success`` for the output, ``no_change_success`` for the input.

SSIM is Wang et al. 2004's: an 11x11 Gaussian window of sigma 1.5 (``scipy.ndimage.gaussian_filter``,
truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, a data range of 255, population (not sample) variances, the
map averaged away from the borders the window does not cover; on the grey levels (ITU-R 601 luma).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIGMA, TRUNCATE, K1, K2, DATA_RANGE = 1.5, 3.5, 0.01, 0.03, 255.0


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def psnr(output: Image.Image, target: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB of two images of one size on their grey levels (inf when equal)."""
    mse = float(np.mean((_grey(output) - _grey(target)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(DATA_RANGE**2 / mse)


def ssim(output: Image.Image | np.ndarray, target: Image.Image | np.ndarray) -> float:
    """Mean structural similarity (module docstring) of two images or (H, W) grey arrays of one size."""
    from scipy.ndimage import gaussian_filter  # here: eval.run's start-up does not need scipy

    x = output if isinstance(output, np.ndarray) else _grey(output)
    y = target if isinstance(target, np.ndarray) else _grey(target)
    x, y = x.astype(np.float64), y.astype(np.float64)
    blur = lambda a: gaussian_filter(a, SIGMA, truncate=TRUNCATE)  # noqa: E731
    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = int(TRUNCATE * SIGMA + 0.5)
    return float(s[pad:-pad, pad:-pad].mean())


def input_paths(record) -> list[str]:
    """The row's input images: ``input_images`` (a list), else ``image_path``; none is a bad row."""
    from .data import BadRow

    paths = record.extra.get("input_images") or ([record.image_path] if record.image_path else [])
    if not paths:
        raise BadRow("an image_editing row needs an input image (image_path or input_images) besides its instruction")
    return [str(p) for p in paths]


def edit_prompt(record, root, style_end_of_turn: bool = True) -> tuple[list, list[Image.Image]]:
    """(prompt segments, the input images loaded) for an image_editing row; BadRow when an image cannot be read."""
    from dataclasses import replace

    from medmax.prompting import prompt_segments

    from .data import BadRow, load_record_image

    if not str(record.prompt).strip():
        raise BadRow("an image_editing row needs an instruction (prompt)")
    images = [load_record_image(root, replace(record, image_path=p, image_bytes=None)) for p in input_paths(record)]
    return prompt_segments(record.prompt, images, end_of_turn=style_end_of_turn), images


def _fit(image: Image.Image, size: int) -> Image.Image:
    from medmax.images import resize_and_crop

    return resize_and_crop(image.convert("RGB"), size)


def score_row(row: dict, record, output: Image.Image, inputs: list[Image.Image], root) -> None:
    """PSNR / SSIM of the output and of the no-change baseline against the target; the locator's verdicts."""
    from dataclasses import replace

    from .data import load_record_image

    size = output.width
    target = _fit(load_record_image(root, replace(record, image_path=str(record.answer), image_bytes=None)), size)
    source = _fit(inputs[0], size)
    row.update(psnr=psnr(output, target), ssim=ssim(output, target),
               no_change_psnr=psnr(source, target), no_change_ssim=ssim(source, target))
    edit = record.extra.get("edit")
    if isinstance(edit, dict):
        from medmax.synthetic_edits import edit_success

        args = (edit["kind"], edit["position"], edit["size"])
        row.update(edit_kind=edit["kind"], edit_success=edit_success(*args, output),
                   no_change_success=edit_success(*args, source))


def summary(rows: list[dict]) -> dict:
    """Extra results.json fields: the no-change baseline's means, and the locator's success per edit kind."""
    good = [r for r in rows if not r.get("error")]
    finite = lambda key: [r[key] for r in good if r.get(key) is not None and np.isfinite(r[key])]  # noqa: E731
    out = {"no_change": {m: float(np.mean(finite(f"no_change_{m}"))) if finite(f"no_change_{m}") else None
                         for m in ("psnr", "ssim")}}
    judged = [r for r in good if "edit_success" in r]
    if judged:
        kinds = sorted({r["edit_kind"] for r in judged})
        out["edit_success_by_kind"] = {k: {"n": sum(r["edit_kind"] == k for r in judged),
                                           "success": float(np.mean([r["edit_success"] for r in judged if r["edit_kind"] == k])),
                                           "no_change": float(np.mean([r["no_change_success"] for r in judged if r["edit_kind"] == k]))}
                                       for k in kinds}
    return out


def baseline_warnings(key: str, entry: dict) -> list[str]:
    """Lines for report.md when the model does not beat the no-change baseline (PSNR, SSIM, or an edit kind's success)."""
    lines = []
    metrics = entry.get("metrics", {})
    for m in ("psnr", "ssim"):
        model, base = (metrics.get(m) or {}).get("score"), entry.get("no_change", {}).get(m)
        if model is not None and base is not None and not model > base:
            lines.append(f"{key}: the model's {m.upper()} against the target ({model:.3f}) does not beat the no-change "
                         f"baseline, the input returned as it is ({base:.3f})")
    for kind, s in entry.get("edit_success_by_kind", {}).items():
        if not s["success"] > s["no_change"]:
            lines.append(f"{key}: edit '{kind}' succeeds on {s['success']:.3f} of {s['n']} rows, not above the no-change "
                         f"baseline ({s['no_change']:.3f})")
    return lines
