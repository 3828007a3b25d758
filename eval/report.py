"""Metrics from prediction rows, and the outputs: results.json, results_medmax.json, report.md, report.png.

Everything here is a pure function of the prediction rows, so a resumed run that reads the same rows
back writes a byte-identical results.json. Each task's entry names the protocol that scored it
(``toolkit``, or ``medmax`` for the VQA tasks under ``--protocol medmax``), and so does report.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medmax.jsonl import write_atomic

from . import ablation, circular, contamination, fid, medmax_protocol
from .scoring import paired_accuracy
from .stats import summary
from .tasks import MEDMAX_KEYS, Task

logger = logging.getLogger(__name__)

# kind -> (primary metric, row fields averaged as sub-metrics)
METRIC_FIELDS = {
    "closed": ("accuracy", {"accuracy": "correct"}),
    "mcq": ("accuracy", {"accuracy": "correct"}),
    "probmed": ("accuracy", {"accuracy": "correct"}),
    "open": ("recall", {"recall": "recall", "f1": "f1", "exact_match": "exact_match"}),
    "captioning": ("clip_similarity", {"clip_similarity": "clip"}),
    "image_generation": ("clip_similarity", {"clip_similarity": "clip"}),
    "visual_chat": ("token_f1", {"token_f1": "f1", "recall": "recall"}),
    "mm_out": ("token_f1", {"token_f1": "f1", "recall": "recall", "image_clip_similarity": "image_clip"}),
    "image_editing": ("psnr", {"psnr": "psnr", "ssim": "ssim", "edit_success": "edit_success"}),
}


def task_metrics(task: Task, rows: list[dict], protocol: str = "toolkit") -> dict:
    """results.json entry: n, metric, score, stderr and ci95 (of the primary metric), every sub-metric, error
    counts, the protocol that scored it, and the checks that ran (``image_ablation``)."""
    entry = _scored_metrics(task, rows, protocol)
    entry["suite"] = "medmax" if task.key in MEDMAX_KEYS else "beyond_medmax"
    good = [r for r in rows if not r.get("error")]
    checks = {"image_ablation": ablation.summarize(task.kind, good, task.key), "circular": circular.summarize(good, task.key)}
    entry.update({k: v for k, v in checks.items() if v is not None})
    scored = [r for r in good if r.get("correct") is not None]
    if task.kind == "probmed" or any(r.get("pair_id") for r in scored):
        entry["metrics"]["paired_accuracy"] = summary(paired_accuracy(scored), f"{task.key}:paired")
    if any(r.get("groups") for r in scored):
        entry["by_group"] = _by_group(scored, task.key)
    return entry


def _by_group(rows: list[dict], key: str) -> dict:
    """Accuracy per value of each category column a converter gave (``groups``), with its 95 % CI."""
    values: dict[str, dict[str, list]] = {}
    for row in rows:
        for column, value in (row.get("groups") or {}).items():
            values.setdefault(column, {}).setdefault(str(value), []).append(row["correct"])
    return {c: {v: summary(scores, f"{key}:{c}:{v}") for v, scores in sorted(by.items())} for c, by in sorted(values.items())}


def _scored_metrics(task: Task, rows: list[dict], protocol: str) -> dict:
    if medmax_protocol.applies(protocol, task):
        return medmax_protocol.task_metrics(task, rows)
    good = [r for r in rows if not r.get("error")]
    primary, fields = METRIC_FIELDS[task.kind]
    metrics = {name: summary((r[f] for r in good if r.get(f) is not None), f"{task.key}:{name}") for name, f in fields.items()}
    if any("judge" in r for r in good):
        metrics["judge_accuracy"] = summary((r["judge"] for r in good if r.get("judge") is not None), f"{task.key}:judge")
    entry = {"metric": primary, **metrics[primary], "metrics": metrics, "n_errors": len(rows) - len(good), "protocol": "toolkit"}
    if any("judge" in r for r in good):
        entry["judge_unparseable"] = sum(r.get("judge_status") == "unparseable" for r in good)
        entry["judge_failed"] = sum(r.get("judge_status") == "failed" for r in good)
    return entry


# a task with more than this share of its rows unscored (or of its judge verdicts missing) is reported loudly
MOSTLY_FAILED = 0.5


def failure_warnings(key: str, rows: list[dict]) -> list[str]:
    """Lines for a task most of whose rows were not scored, or most of whose judge requests gave no verdict,
    each naming the first such row and its reason."""
    lines = []
    failed = [r for r in rows if r.get("error")]
    if rows and len(failed) > MOSTLY_FAILED * len(rows):
        lines.append(f"{key}: {len(failed)} of {len(rows)} rows were not scored; the first, {failed[0]['uid']}: "
                     f"{failed[0]['error']} (every reason is in problems.jsonl)")
    asked = [r for r in rows if "judge_status" in r]
    missed = [r for r in asked if r["judge_status"] != "ok"]
    if asked and len(missed) > MOSTLY_FAILED * len(asked):
        why = missed[0].get("judge_error") or "a reply without a verdict"
        lines.append(f"{key}: the judge gave no verdict for {len(missed)} of {len(asked)} rows; the first, "
                     f"{missed[0]['uid']}: {why}")
    return lines


def unread_warnings(n_rows: int, problems: list[dict]) -> list[str]:
    """A line when most rows of the data could not be read or belong to no task (``n_rows``: rows read plus
    rows refused while reading; ``problems``: those refused, and those of no task)."""
    if not problems or len(problems) <= MOSTLY_FAILED * n_rows:
        return []
    return [f"{len(problems)} of {n_rows} rows of the data could not be read or belong to no task; the first, "
            f"{problems[0]['uid']}: {problems[0]['reason']} (every reason is in problems.jsonl)"]


def write_results(path: Path, results: dict) -> None:
    write_atomic(path, json.dumps(results, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _fmt(value, digits=4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_PROTOCOL_NOTES = {
    "toolkit": "toolkit: whole-word yes/no, option letters in any common form, token recall/F1 for open answers",
    "medmax": "medmax: MedMax's evaluation/vqa.py rules (1-token closed/MCQ answers scored by substring / exact "
              "match; open answers by a GPT judge, rows without a verdict dropped and counted)",
}


def ci_text(ci: dict | None) -> str:
    """A 95 % interval as "[0.512, 0.688] wilson" (or "-")."""
    return "-" if not ci else f"[{ci['low']:.3f}, {ci['high']:.3f}] {ci['method']}"


def _counts(entry: dict) -> str:
    parts = [f"{entry[k]} {label}" for k, label in (("n_dropped", "dropped (no verdict)"), ("n_judge_failed", "judge failed"),
                                                    ("judge_unparseable", "judge unparseable"), ("judge_failed", "judge failed"),
                                                    ("n_unmatchable", "n_unmatchable (gold never matches)"))
             if entry.get(k)]
    return f"{entry['n_errors']}" + (f" ({', '.join(parts)})" if parts else "")


def _table(results: dict, suite: str = "medmax") -> list[str]:
    keys = sorted(k for k in results if not k.startswith("_") and "skipped" not in results[k]
                  and results[k].get("suite", "medmax") == suite)
    if not keys and (suite != "medmax" or any(e.get("suite") == "beyond_medmax" for e in results.values()
                                               if isinstance(e, dict))):
        return []
    if suite != "medmax":
        head = ["", "## Beyond MedMax's tasks", "", "Benchmarks outside MedMax's suite, listed apart and never averaged "
                "with MedMax's tasks.", ""]
    else:
        head = []
    lines = head + ["| task | protocol | metric | n | score | stderr | 95% CI | errors |", "|---|---|---|---|---|---|---|---|"]
    for key in keys:
        entry = results[key]
        proto = entry["protocol"]
        lines.append(f"| {key} | {proto} | {entry['metric']} | {entry['n']} | {_fmt(entry['score'])} | "
                     f"{_fmt(entry['stderr'])} | {ci_text(entry.get('ci95'))} | {_counts(entry)} |")
        for name, m in sorted(entry["metrics"].items()):
            if name != entry["metric"]:
                lines.append(f"| {key} | {proto} | {name} | {m['n']} | {_fmt(m['score'])} | {_fmt(m['stderr'])} | "
                             f"{ci_text(m.get('ci95'))} | |")
    return lines


def _groups(results: dict) -> list[str]:
    """Accuracy by each category column a benchmark gives (GMAI-MMBench's clinical VQA task, department ...)."""
    lines = []
    for key in sorted(k for k, e in results.items() if not k.startswith("_") and isinstance(e, dict) and e.get("by_group")):
        lines += ["", f"## {key} by category", "", "| column | value | n | accuracy | 95% CI |", "|---|---|---|---|---|"]
        for column, by in results[key]["by_group"].items():
            lines += [f"| {column} | {value} | {m['n']} | {_fmt(m['score'])} | {ci_text(m.get('ci95'))} |" for value, m in by.items()]
    return lines


def _skipped(results: dict) -> list[str]:
    """Skipped tasks after the results, one line per reason (the tasks without rows in the data are many)."""
    by_reason: dict[str, list[str]] = {}
    for key in sorted(k for k in results if not k.startswith("_") and "skipped" in results[k]):
        by_reason.setdefault(results[key]["skipped"], []).append(key)
    if not by_reason:
        return []
    lines = ["", f"## Skipped tasks ({sum(map(len, by_reason.values()))})", ""]
    return lines + [f"- {reason}: {', '.join(keys)}" for reason, keys in sorted(by_reason.items())]


def write_markdown(path: Path, results: dict, problems: list[dict], settings: dict) -> None:
    protocols = sorted({e["protocol"] for k, e in results.items() if not k.startswith("_") and "protocol" in e})
    lines = ["# Evaluation report", ""]
    if results.get("_warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in results["_warnings"]] + [""]
    lines += ["The protocol column says which rules produced each number:", ""]
    lines += [f"- {_PROTOCOL_NOTES[p]}" for p in protocols]
    lines += ["", "MedMax's results layout (accuracy, std_err) of the same numbers is in results_medmax.json. "
              "95% CI: Wilson's interval for an accuracy (0/1 scores), a seeded bootstrap (2000 resamples) of the "
              "mean for other metrics (eval/stats.py).", ""]
    lines += _table(results) + _table(results, "beyond_medmax") + _groups(results) + fid.report_lines(results)
    lines += ablation.report_lines(results) + circular.report_lines(results) + contamination.report_lines(results)
    lines += _skipped(results)
    lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in sorted(settings.items())]
    lines += ["", f"## Rows not evaluated ({len(problems)})", ""]
    lines += [f"- `{p['uid']}`: {p['reason']}" for p in problems[:200]]
    if len(problems) > 200:
        lines.append(f"- ... {len(problems) - 200} more in problems.jsonl")
    path.write_text("\n".join(lines) + "\n")


def write_chart(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k, v in results.items() if not k.startswith("_") and v.get("score") is not None)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(keys) + 2), 4))
    scores = [results[k]["score"] for k in keys]
    cis = [results[k].get("ci95") or {"low": s, "high": s} for k, s in zip(keys, scores)]
    errs = [[s - c["low"] for s, c in zip(scores, cis)], [c["high"] - s for s, c in zip(scores, cis)]]
    ax.bar(range(len(keys)), scores, yerr=errs, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(keys)), [f"{k}\n({results[k]['metric']})" for k in keys], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("score (mean, 95% CI)")
    ax.set_title("MedMax evaluation suite")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
