"""``eval.run --ablate-image``: does the score come from reading the image?

Every VQA question (closed, ProbMed, MCQ, open) whose real-image row was scored is asked three more times,
with the same prompt style, answer length and greedy decoding:

- ``none``: no image block at all (the prompt's text only);
- ``blank``: a uniform mid-grey image (RGB 128, 128, 128) of the real image's size;
- ``shuffled``: another question's real image from the same task. Partners come from a seeded shuffle of
  the task's rows (seed = ``--seed`` and the task key, over the task's rows after ``--limit``, so every shard
  and every resume agrees): each row takes the first row after it in the shuffled order whose image differs
  (by path, or by content hash for embedded images), so no row keeps its own image. A task whose rows
  share one image has no partner to give: those rows' ``shuffled`` entry names why.

The shuffled control matters most: a blank image is out of distribution, so a model may fail on it for
reasons that say nothing about whether it reads real images; a real image of another case is not.

Each row gets ``ablation: {condition: {"output", "score", "answer"}}``: the score by the task's own rule
(``correct`` for closed / MCQ questions, token recall for open ones under the toolkit protocol; the judge
is not asked for ablated answers, so open rows under ``--protocol medmax`` have none) and ``answer``, the
answer as the rule reads it (yes / no, the option letter, else the normalised text).

results.json's ``image_ablation`` per task: each condition's score with its 95 % CI, the share of
questions answered the same as with the real image, and the exact McNemar test of real against
shuffled (correct / incorrect kinds). **Flag rule** (closed, ProbMed and MCQ tasks): the score is flagged,
in report.md and results.json's ``_warnings``, when it drops by less than ``FLAG_MIN_DROP`` (5 points) from
the real to the shuffled image, or the McNemar p-value is ``FLAG_P`` (0.05) or more: the evidence then does
not show that the model reads the image.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .data import EvalRecord
from .scoring import normalize, parse_mcq, yes_no
from .stats import mcnemar_exact, summary

CONDITIONS = ("none", "blank", "shuffled")
KINDS = ("closed", "probmed", "mcq", "open")
CLOSED_KINDS = ("closed", "probmed", "mcq")
BLANK_GREY = (128, 128, 128)
FLAG_MIN_DROP = 0.05
FLAG_P = 0.05


def image_identity(rec: EvalRecord) -> str:
    """What makes two rows' images the same: the content hash of embedded bytes, else the path."""
    if rec.image_bytes is not None:
        return "sha256:" + hashlib.sha256(rec.image_bytes).hexdigest()
    return f"path:{rec.image_path}"


def shuffle_partners(records: list[EvalRecord], seed: int, key: str) -> dict[str, EvalRecord | None]:
    """uid -> the row whose real image this row is shown in the shuffled control (None: every row of the task
    has the same image). Seeded, and a function of the whole task, so shards and resumes agree."""
    order = list(range(len(records)))
    random.Random(f"ablate:{seed}:{key}").shuffle(order)
    ids = [image_identity(records[i]) for i in order]
    partners: dict[str, EvalRecord | None] = {}
    for j, i in enumerate(order):
        found = next((order[(j + s) % len(order)] for s in range(1, len(order)) if ids[(j + s) % len(order)] != ids[j]), None)
        partners[records[i].uid] = None if found is None else records[found]
    return partners


def without_images(segments: list) -> list:
    """The prompt with its image blocks removed (text and the end-of-turn sentinel stay)."""
    return [s for s in segments if not isinstance(s, (Image.Image, Path))]


def with_image(segments: list, real, replacement) -> list:
    """The prompt with the real image object replaced."""
    return [replacement if s is real else s for s in segments]


def blank_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, BLANK_GREY)


def answer_key(kind: str, output: str, options: dict | None) -> str:
    """The answer as the task's rule reads it, to tell whether two answers are the same."""
    if kind in ("closed", "probmed"):
        return yes_no(output) or normalize(output)
    if kind == "mcq":
        return parse_mcq(output, options) or normalize(output)
    return normalize(output)


def row_value(kind: str, row: dict):
    """The per-row score the ablation compares: ``correct`` where the rule gives one, else token recall."""
    if "correct" in row or kind != "open":
        value = row.get("correct")
    else:
        value = row.get("recall")
    return None if value is None else float(value)


def condition_entry(kind: str, rec: EvalRecord, scored: dict) -> dict:
    return {"output": scored.get("output"), "score": row_value(kind, scored),
            "answer": answer_key(kind, scored.get("output") or "", rec.options)}


def add_conditions(kind: str, items: list[tuple[EvalRecord, list, object, dict]], partners: dict,
                   load: Callable[[EvalRecord], Image.Image], generate: Callable[[list], list],
                   score: Callable[[EvalRecord, object], dict]) -> None:
    """Ask each (record, real prompt, real image, scored row) again under every condition; the result goes
    into the row's ``ablation``. ``load`` reads a partner's image, ``generate`` a list of prompts, ``score``
    one output as the task's rule (without the judge)."""
    for rec, _, _, row in items:
        row["ablation"] = {"real": {"answer": answer_key(kind, row.get("output") or "", rec.options)}}
    for condition in CONDITIONS:
        prompts, owners = [], []
        for rec, prompt, image, row in items:
            try:
                prompts.append(_ablated(condition, prompt, image, partners.get(rec.uid), load))
                owners.append((rec, row))
            except (ValueError, OSError, MemoryError) as e:  # the partner's image cannot be read
                row["ablation"][condition] = {"error": str(e)}
        for (rec, row), out in zip(owners, generate(prompts)):
            if isinstance(out, BaseException):
                row["ablation"][condition] = {"error": f"generation failed ({type(out).__name__}: {out})"}
            else:
                row["ablation"][condition] = condition_entry(kind, rec, score(rec, out))


def _ablated(condition: str, prompt: list, image, partner: EvalRecord | None, load) -> list:
    if condition == "none":
        return without_images(prompt)
    if condition == "blank":
        return with_image(prompt, image, blank_like(image))
    if partner is None:
        raise ValueError("every row of this task has the same image: no other image to show")
    return with_image(prompt, image, load(partner))


def summarize(kind: str, rows: list[dict], key: str) -> dict | None:
    """results.json's ``image_ablation`` for a task's scored rows (None when no row was ablated)."""
    rows = [r for r in rows if isinstance(r.get("ablation"), dict) and row_value(kind, r) is not None]
    if not rows:
        return None
    out: dict = {"real": summary([row_value(kind, r) for r in rows], f"{key}:real")}
    for condition in CONDITIONS:
        pairs = [(r, r["ablation"].get(condition) or {}) for r in rows]
        pairs = [(r, c) for r, c in pairs if c.get("score") is not None]
        entry = summary([c["score"] for _, c in pairs], f"{key}:{condition}")
        same = sum(r["ablation"]["real"]["answer"] == c["answer"] for r, c in pairs)
        entry["same_as_real"] = same / len(pairs) if pairs else None
        entry["n_failed"] = len(rows) - len(pairs)
        out[condition] = entry
    if kind in CLOSED_KINDS:
        pairs = [(r, r["ablation"]["shuffled"]) for r in rows if (r["ablation"].get("shuffled") or {}).get("score") is not None]
        out["mcnemar_real_vs_shuffled"] = mcnemar_exact([bool(row_value(kind, r)) for r, _ in pairs],
                                                        [bool(c["score"]) for _, c in pairs])
        out["flagged"] = _flagged(out)
    return out


def _flagged(entry: dict) -> bool:
    real, shuffled = entry["real"]["score"], entry["shuffled"]["score"]
    if shuffled is None:
        return False
    return real - shuffled < FLAG_MIN_DROP or entry["mcnemar_real_vs_shuffled"]["p_value"] >= FLAG_P


def flag_line(key: str, entry: dict | None) -> str | None:
    """The warning for a flagged task (see the module doc's flag rule), else None."""
    if not entry or not entry.get("flagged"):
        return None
    test = entry["mcnemar_real_vs_shuffled"]
    return (f"{key}: the score barely moves when the image is another question's (real {entry['real']['score']:.3f}, "
            f"shuffled {entry['shuffled']['score']:.3f}, McNemar p {test['p_value']:.3g} on {test['b']} vs {test['c']} "
            f"discordant); it may not come from reading the image (flagged: a drop under {FLAG_MIN_DROP:.2f} or "
            f"p >= {FLAG_P})")


def report_lines(results: dict) -> list[str]:
    """report.md's image-ablation section (empty when no task was ablated)."""
    keys = sorted(k for k, e in results.items() if not k.startswith("_") and isinstance(e, dict) and e.get("image_ablation"))
    if not keys:
        return []
    lines = ["", "## Image ablation (--ablate-image)", "",
             "Each question asked again with no image, a blank grey image, and another question's real image "
             "(shuffled). same: the share answered as with the real image. McNemar: exact test of real against "
             f"shuffled. Flagged when the score drops by under {FLAG_MIN_DROP:.2f} from real to shuffled, or p >= {FLAG_P}.", "",
             "| task | real | no image | blank | shuffled | same (none/blank/shuffled) | McNemar real vs shuffled | flag |",
             "|---|---|---|---|---|---|---|---|"]
    for key in keys:
        e = results[key]["image_ablation"]
        cells = [_score_cell(e[c]) for c in ("real",) + CONDITIONS]
        same = "/".join("-" if e[c]["same_as_real"] is None else f"{e[c]['same_as_real']:.2f}" for c in CONDITIONS)
        test = e.get("mcnemar_real_vs_shuffled")
        mc = "-" if not test else f"{test['b']} vs {test['c']}, p {test['p_value']:.2g}"
        lines.append(f"| {key} | {' | '.join(cells)} | {same} | {mc} | {'FLAGGED' if e.get('flagged') else ''} |")
    return lines


def _score_cell(m: dict) -> str:
    if m["score"] is None:
        return "-"
    ci = m.get("ci95")
    return f"{m['score']:.3f}" + (f" [{ci['low']:.2f}, {ci['high']:.2f}]" if ci else "")
