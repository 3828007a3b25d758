"""Built-in GRPO rewards: plain functions ``f(samples, **settings) -> list[float]`` (one value per sample).

Name them in a fine-tuning config as ``rewards: [medmax.grpo_rewards:lesion_locator, ...]``; settings come from
``reward_settings: {lesion_locator: {...}}``. A reward sees :class:`medmax.grpo.Samples`: the prompts, the decoded
images and their VQGAN codes, the generated text, and the policy as a generator. Return NaN (or raise) where a
sample cannot be judged: it is counted as a failure for that sample (:func:`medmax.grpo.score`), never a crash.

- :func:`lesion_locator`: the synthetic task's locator (:func:`medmax.synthetic.locate_lesion`) on the drawing,
  against the position and size the prompt names.
- :func:`clip_similarity`: CLIP / BiomedCLIP image-text similarity of the drawing to its prompt
  (:class:`medmax.clip_score.ClipScorer`, a local Hugging Face or open_clip folder).
- :func:`classifier_probability`: a local transformers image-classification folder's probability for a stated
  finding.
- :func:`self_consistency`: the policy answers questions about its own drawing (given as its codes), checked
  against what the prompt asked for.
"""

from __future__ import annotations

import functools
import math
import re

from .grpo import GRPOSettingError, Samples

_TARGET = re.compile(r"with a (small|large) bright lesion in the (upper left|upper right|lower left|lower right)\b")
_NO_LESION = re.compile(r"\bwith no lesion\b")


def lesion_target(prompt: str) -> tuple[str, str] | None | float:
    """What a synthetic generation prompt asks for: (position, size), None for "no lesion", NaN when it says neither."""
    found = _TARGET.search(prompt)
    if found:
        return found[2], found[1]
    return None if _NO_LESION.search(prompt) else math.nan


def _first_image(samples: Samples, i: int):
    images = samples.images[i] if i < len(samples.images) else None
    return images[0] if images else None


def lesion_locator(samples: Samples, position_weight: float = 0.5, size_weight: float = 0.5) -> list[float]:
    """``position_weight`` when the brightest blob lies in the asked quadrant, plus ``size_weight`` when its size is
    the asked one; for a "no lesion" prompt, their sum when no blob is found. 0 without a drawing; NaN for a prompt
    that names no target."""
    from .synthetic import locate_lesion

    out = []
    for i, prompt in enumerate(samples.prompts):
        target, image = lesion_target(prompt), _first_image(samples, i)
        if isinstance(target, float):
            out.append(math.nan)
        elif image is None:
            out.append(0.0)
        else:
            found = locate_lesion(image)
            if target is None or found is None:
                out.append((position_weight + size_weight) * float(found is None and target is None))
            else:
                out.append(position_weight * (found[0] == target[0]) + size_weight * (found[1] == target[1]))
    return out


@functools.lru_cache(maxsize=4)
def _clip_scorer(folder: str):
    from .clip_score import ClipScorer

    return ClipScorer.from_dir(folder)


def clip_similarity(samples: Samples, model: str, strip_prefix: str = "") -> list[float]:
    """Cosine similarity of each drawing to its prompt (``strip_prefix`` cut from the prompt's start, e.g. an
    instruction such as "Generate a scan: ") under the CLIP / BiomedCLIP folder ``model``; NaN without a drawing."""
    scorer = _clip_scorer(str(model))
    texts = [p[len(strip_prefix):] if strip_prefix and p.startswith(strip_prefix) else p for p in samples.prompts]
    drawn = [i for i in range(len(samples)) if _first_image(samples, i) is not None]
    out = [math.nan] * len(samples)
    if drawn:
        scores = scorer.image_text([_first_image(samples, i) for i in drawn], [texts[i] for i in drawn])
        for i, s in zip(drawn, scores):
            out[i] = s
    return out


@functools.lru_cache(maxsize=4)
def _classifier(folder: str):
    import json
    from pathlib import Path

    from transformers import AutoModelForImageClassification

    from .image_metrics import processor_size

    model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).eval()
    pre_file = Path(folder) / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    native = int(getattr(model.config, "image_size", 224))
    size = processor_size(pre.get("size"), native)
    return model, size, processor_size(pre.get("crop_size"), size), pre.get("image_mean", (0.5,) * 3), \
        pre.get("image_std", (0.5,) * 3)


def classifier_probability(samples: Samples, model: str, finding: str) -> list[float]:
    """The probability the image classifier in folder ``model`` gives ``finding`` (one of its ``id2label`` names)
    for each drawing: softmax over labels, or sigmoid when the folder says multi-label; NaN without a drawing."""
    import torch

    from .image_metrics import resize_crop_normalize

    net, size, crop, mean, std = _classifier(str(model))
    labels = {str(v): int(k) for k, v in net.config.id2label.items()}
    if finding not in labels:
        raise GRPOSettingError(f"classifier_probability: finding {finding!r} is not a label of {model} "
                               f"({sorted(labels)})")
    drawn = [i for i in range(len(samples)) if _first_image(samples, i) is not None]
    out = [math.nan] * len(samples)
    if drawn:
        pixels = torch.stack([resize_crop_normalize(_first_image(samples, i), size, crop, mean, std) for i in drawn])
        with torch.no_grad():
            logits = net(pixel_values=pixels).logits.float()  # (n, n_labels)
        multi = getattr(net.config, "problem_type", None) == "multi_label_classification"
        probs = torch.sigmoid(logits) if multi else torch.softmax(logits, -1)
        for i, p in zip(drawn, probs[:, labels[finding]].tolist()):
            out[i] = p
    return out


CLOSED_QUESTION = "Is there a lesion in this scan?"
POSITION_QUESTION = "Where is the lesion? A) upper left B) upper right C) lower left D) lower right"


def self_consistency(samples: Samples, max_new_tokens: int = 8) -> list[float]:
    """The policy answers about its own drawing (given as its codes, no VQGAN round trip), greedily: "Is there a
    lesion?" and, when the prompt asks for one, "Where is the lesion?" (four quadrants). The reward is the share of
    answers that agree with the prompt; 0 without a drawing, NaN for a prompt that names no target."""
    from .answers import parse_mcq, yes_no
    from .generation import GenerationConfig, ImageCodes, prompt_segments
    from .synthetic import POSITIONS

    asks, keys = [], []
    for i, prompt in enumerate(samples.prompts):
        target, codes = lesion_target(prompt), samples.codes[i] if i < len(samples.codes) else []
        if isinstance(target, float) or not codes:
            continue
        image = ImageCodes(codes[0])
        asks.append(prompt_segments(CLOSED_QUESTION, [image], end_of_turn=True))
        keys.append((i, "closed", "no" if target is None else "yes"))
        if target is not None:
            asks.append(prompt_segments(POSITION_QUESTION, [image], end_of_turn=True))
            keys.append((i, "mcq", "ABCD"[POSITIONS.index(target[0])]))
    answers = samples.generator.generate(asks, GenerationConfig(mode="text", do_sample=False, max_new_tokens=max_new_tokens,
                                                                 batch_size=max(len(asks), 1))) if asks else []
    right = {}
    for (i, kind, gold), answer in zip(keys, answers):
        said = yes_no(answer.text) if kind == "closed" else parse_mcq(answer.text)
        right.setdefault(i, []).append(float(said == gold))
    out = []
    for i, prompt in enumerate(samples.prompts):
        if isinstance(lesion_target(prompt), float):
            out.append(math.nan)
        else:
            out.append(sum(right[i]) / len(right[i]) if i in right else 0.0)
    return out
