"""Is the gap between two evaluation runs real? Pair their predictions question by question and test it.

Usage::

    python -m eval.compare runs/eval_a runs/eval_b [--output runs/eval_b/compare] [--seed 0]
    medmax-eval-compare runs/eval_a runs/eval_b

Both folders are finished ``eval.run`` outputs (results.json, predictions/<task>.jsonl). The runs must
have read the same questions and scored them by the same rules, else the program refuses in one line:

- the same data: the data files' digests and the settings that choose rows (``data_format``, ``split``,
  ``lang``, ``image_dir``, ``trust_pickle``, ``limit``, and ``seed`` when a limit subsamples) agree;
- the same ``--protocol``.

Models, prompt styles, answer lengths and other settings may differ: that is what is being compared.
For each task both runs scored, rows are paired by uid (a row either run failed is left out and counted).
Tasks scored correct / incorrect get the exact McNemar test (eval/stats.py) on the discordant pairs;
others (token recall, F1, CLIP similarity) a paired bootstrap of the mean difference (2000 resamples,
seeded by ``--seed`` and the task). Writes OUTPUT/compare.json, compare.md (also printed), compare.png
(the per-task differences with their 95 % intervals) and disagreements.jsonl (every paired question the
two runs score differently, with both outputs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medmax.cli import program
from medmax.jsonl import read_json, read_jsonl, write_jsonl

from . import outputs, report
from .errors import EvalError
from .stats import mcnemar_exact, paired_bootstrap, wilson

ROW_SETTINGS = ("data_format", "split", "lang", "image_dir", "trust_pickle", "limit")
MD_DISAGREEMENTS = 20  # per task in compare.md; all of them are in disagreements.jsonl


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medmax-eval-compare", description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path, help="an eval.run output folder (the baseline)")
    p.add_argument("run_b", type=Path, help="an eval.run output folder (the one compared with it)")
    p.add_argument("--output", type=Path, help="where to write compare.{json,md,png} (default: RUN_B/compare)")
    p.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap")
    return p


def load_run(folder: Path) -> dict:
    results = read_json(folder / outputs.RESULTS) if (folder / outputs.RESULTS).is_file() else None
    if not isinstance(results, dict) or "_fingerprint" not in results:
        raise EvalError(f"{folder}: no results.json with a fingerprint; is it a finished eval.run output?")
    return results


def refuse_mismatch(a: dict, b: dict, name_a: str, name_b: str) -> None:
    """Raise naming the first difference in data or protocol between two runs' results."""
    if a.get("_protocol") != b.get("_protocol"):
        raise EvalError(f"{name_a} was scored under --protocol {a.get('_protocol')} and {name_b} under "
                        f"{b.get('_protocol')}; compare runs scored by the same rules")
    fa, fb = a["_fingerprint"], b["_fingerprint"]
    if fa.get("data") != fb.get("data"):
        raise EvalError(f"{name_a} and {name_b} read different data files (their data digests differ); "
                        f"a paired comparison needs the same questions")
    sa, sb = fa.get("settings") or {}, fb.get("settings") or {}
    keys = ROW_SETTINGS + (("seed",) if sa.get("limit") is not None else ())
    for key in keys:
        if sa.get(key) != sb.get(key):
            raise EvalError(f"{name_a} and {name_b} chose their rows differently ({key} {sa.get(key)!r} vs "
                            f"{sb.get(key)!r}); a paired comparison needs the same questions")


def _rows(folder: Path, key: str) -> dict[str, dict]:
    return {r["uid"]: r for r in read_jsonl(folder / outputs.PREDICTIONS / f"{key}.jsonl")
            if isinstance(r.get("uid"), str) and not r.get("error")}


def _value(row: dict, field: str):
    value = row.get(field)
    return None if value is None else float(value)


def compare_task(key: str, field: str, rows_a: dict, rows_b: dict, seed: int) -> tuple[dict, list[dict]]:
    """One task's paired test and its disagreeing questions."""
    uids = [u for u in rows_a if u in rows_b and _value(rows_a[u], field) is not None and _value(rows_b[u], field) is not None]
    va, vb = [_value(rows_a[u], field) for u in uids], [_value(rows_b[u], field) for u in uids]
    entry: dict = {"field": field, "n_paired": len(uids), "n_unpaired": len(set(rows_a) | set(rows_b)) - len(uids)}
    if not uids:
        return entry, []
    entry.update(score_a=sum(va) / len(va), score_b=sum(vb) / len(vb))
    if all(v in (0.0, 1.0) for v in va + vb):
        entry["test"] = "mcnemar_exact"
        entry.update(mcnemar_exact(va, vb))
        entry["difference"] = entry["score_b"] - entry["score_a"]
        entry["ci95"] = _newcombe_paired(va, vb)
    else:
        entry["test"] = "paired_bootstrap"
        boot = paired_bootstrap(va, vb, seed=f"{seed}:{key}")
        entry.update(difference=boot["difference"], p_value=boot["p_value"], ci95={"low": boot["low"], "high": boot["high"]})
    disagree = [{"task": key, "uid": u, "question": rows_a[u].get("question"), "answer": rows_a[u].get("answer"),
                 "output_a": rows_a[u].get("output"), "output_b": rows_b[u].get("output"), "score_a": x, "score_b": y}
                for u, x, y in zip(uids, va, vb) if x != y]
    return entry, disagree


def _newcombe_paired(va: list[float], vb: list[float]) -> dict:
    """A 95 % interval of the paired difference in accuracy (Newcombe's method 10, from Wilson intervals)."""
    n = len(va)
    pa, pb = sum(va) / n, sum(vb) / n
    la, ua = wilson(int(sum(va)), n)
    lb, ub = wilson(int(sum(vb)), n)
    both = sum(x and y for x, y in zip(va, vb)) / n
    neither = sum(not x and not y for x, y in zip(va, vb)) / n
    denom = ((pa * (1 - pa)) * (pb * (1 - pb))) ** 0.5
    phi = 0.0 if denom == 0 else (both * neither - (pa - both) * (pb - both)) / denom
    d = pb - pa
    low = d - ((pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2) ** 0.5
    high = d + ((ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2) ** 0.5
    return {"low": max(-1.0, low), "high": min(1.0, high)}


def _field(entry: dict) -> str:
    """The row field behind a task's primary metric."""
    if entry.get("protocol") == "medmax":
        return "correct"
    fields = {name: f for _, table in report.METRIC_FIELDS.values() for name, f in table.items()}
    return fields[entry["metric"]]


def compare(run_a: Path, run_b: Path, seed: int = 0) -> tuple[dict, list[dict]]:
    """-> ({task: paired comparison}, the disagreeing questions); raises when the runs cannot be paired."""
    a, b = load_run(run_a), load_run(run_b)
    refuse_mismatch(a, b, str(run_a), str(run_b))
    tasks: dict = {}
    disagreements: list[dict] = []
    for key in sorted(k for k in a if not k.startswith("_") and k in b):
        if "metric" not in a[key] or "metric" not in b[key]:
            continue
        entry, rows = compare_task(key, _field(a[key]), _rows(run_a, key), _rows(run_b, key), seed)
        tasks[key] = {"metric": a[key]["metric"], **entry}
        disagreements += rows
    if not tasks:
        raise EvalError(f"{run_a} and {run_b} share no scored task")
    return tasks, disagreements


def markdown(tasks: dict, disagreements: list[dict], run_a: Path, run_b: Path) -> str:
    lines = [f"# {run_b} against {run_a}", "", "difference = B - A; McNemar: b = right in A only, c = right in B only.", "",
             "| task | metric | n paired | A | B | B - A | 95% CI | test | p |", "|---|---|---|---|---|---|---|---|---|"]
    for key, e in tasks.items():
        if "difference" not in e:
            lines.append(f"| {key} | {e['metric']} | 0 | - | - | - | - | - | - |")
            continue
        test = f"McNemar {e['b']} vs {e['c']}" if e["test"] == "mcnemar_exact" else "paired bootstrap"
        lines.append(f"| {key} | {e['metric']} | {e['n_paired']} | {e['score_a']:.3f} | {e['score_b']:.3f} | "
                     f"{e['difference']:+.3f} | [{e['ci95']['low']:+.3f}, {e['ci95']['high']:+.3f}] | {test} | {e['p_value']:.3g} |")
    lines += ["", f"## Questions scored differently ({len(disagreements)}; all in disagreements.jsonl)", ""]
    for key in tasks:
        rows = [d for d in disagreements if d["task"] == key]
        lines += [f"- `{d['uid']}` ({key}): A {d['output_a']!r} ({d['score_a']:g}), B {d['output_b']!r} ({d['score_b']:g})"
                  for d in rows[:MD_DISAGREEMENTS]]
        if len(rows) > MD_DISAGREEMENTS:
            lines.append(f"- ... {len(rows) - MD_DISAGREEMENTS} more of {key}")
    return "\n".join(lines) + "\n"


def chart(path: Path, tasks: dict, run_a: Path, run_b: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, e in tasks.items() if "difference" in e]
    diffs = [tasks[k]["difference"] for k in keys]
    errs = [[d - tasks[k]["ci95"]["low"] for k, d in zip(keys, diffs)], [tasks[k]["ci95"]["high"] - d for k, d in zip(keys, diffs)]]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.4 * len(keys) + 1.5)))
    colours = ["#55a868" if d >= 0 else "#c44e52" for d in diffs]
    ax.barh(range(len(keys)), diffs, xerr=errs, capsize=3, color=colours)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(keys)), [f"{k} (p {tasks[k]['p_value']:.2g})" for k in keys], fontsize=7)
    ax.set_xlabel(f"B - A (95% CI); A = {run_a.name}, B = {run_b.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@program("medmax-eval-compare")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.run_a.resolve() == args.run_b.resolve():
        raise EvalError(f"RUN_A and RUN_B are the same folder ({args.run_a}); compare two runs")
    tasks, disagreements = compare(args.run_a, args.run_b, args.seed)
    out = args.output or args.run_b / "compare"
    out.mkdir(parents=True, exist_ok=True)
    report.write_results(out / "compare.json", {"run_a": str(args.run_a), "run_b": str(args.run_b), "tasks": tasks})
    write_jsonl(out / "disagreements.jsonl", disagreements)
    text = markdown(tasks, disagreements, args.run_a, args.run_b)
    (out / "compare.md").write_text(text)
    chart(out / "compare.png", tasks, args.run_a, args.run_b)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
