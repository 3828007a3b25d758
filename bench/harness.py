"""The shared benchmark harness: interleaved rounds, parity, conditions, memory and one JSON record per run.

Every script in ``bench/`` describes its work as *cases* (one comparison each: a baseline and the
variants measured against it) and hands them to :func:`run_benchmark`, which

- runs every variant once untimed (warm-up, optional), then ``--rounds`` interleaved rounds (at least 3
  for a record): in round ``r`` the cases, and the variants inside each case, start at position ``r``,
  so no variant always runs first or last while the machine's load drifts;
- times each run (wall seconds, or the variant's own timer when it must leave out set-up), counts the
  process's CPU seconds, and measures peak memory per variant run: on CPU the process's peak RSS
  (``VmHWM``, reset before each run through ``/proc/self/clear_refs``) or, for a variant that runs a
  whole program as a child process, that child's peak RSS (``wait4``); on CUDA also
  ``torch.cuda.max_memory_allocated``;
- checks parity: a variant marked ``exact`` must give the baseline's output in every round, else the
  run exits 1 (the record is still written, marked as failed, so the failure is on file);
- summarises every figure as median, min and max over the rounds; a variant's ratio to its baseline
  is taken per round (baseline and variant ran side by side) and summarised the same way;
- records the conditions: load average before and after (and its maximum while running), CPUs, the
  CPU model, thread counts, Python, torch and transformers versions, the git commit and whether the
  tree was clean;
- judges each :class:`Target` on the median of the rounds (or on every round, where the target says
  so), and writes ``bench/results/<name>-<size>-<time>.json``. ``python bench/report.py`` builds
  BENCHMARKS.md from those records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MIN_ROUNDS = 3
OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


@dataclass
class Result:
    """What one run of a variant returns."""

    work: dict[str, float]  # units done, e.g. {"images": 12}; rates are work / seconds
    output: Any = None  # compared with the baseline's for parity (keep it small: a digest or a list of ids)
    seconds: float | None = None  # the variant's own timer (when set-up must be left out); default: wall time
    figures: dict[str, float] = field(default_factory=dict)  # more per-run figures to summarise (e.g. bytes)
    peak_rss_bytes: int | None = None  # set by variants that run a child process (see run_process)
    cpu_seconds: float | None = None  # likewise


@dataclass
class Variant:
    name: str
    run: Callable[[], Result]
    exact: bool = True  # output must equal the baseline's; False: the agreement is reported, not asserted
    warmup: Callable[[], Any] | None = None  # a cheaper untimed warm-up than one full run


@dataclass
class Case:
    """One comparison: ``variants[0]`` is the baseline."""

    name: str
    variants: list[Variant]
    unit: str  # the work unit ratios are taken on: ratio = rate(variant) / rate(baseline), per round
    agreement: Callable[[Any, Any], float] | None = None  # share agreeing (1.0 = parity); default: 1.0 when equal
    parity: Callable[[], dict[str, Any]] | None = None  # a separate parity pass (e.g. greedy) -> output by variant


@dataclass
class Target:
    case: str
    variant: str
    figure: str  # "ratio", "seconds", "<unit>/s", or a name in Result.figures
    op: str  # ">=" or "<="
    value: float
    text: str  # the target as the issue states it
    every_round: bool = False  # judged on every round, not only the median


# ------------------------------------------------------------------------------------------ conditions
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class _Sampler:
    """A background thread that calls ``_loop(every)`` from ``with`` entry until exit."""

    def __init__(self, every: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)

    def _loop(self, every: float) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class LoadSampler(_Sampler):
    """Samples the 1-minute load average every few seconds while a benchmark runs."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = []
        super().__init__(every)

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    """git's output, unstripped: `status --porcelain` lines start with a meaningful space."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> dict:
    """The commit measured, and whether program files differed from it (records and reports excluded)."""
    changed = [line[3:] for line in _git("status", "--porcelain").splitlines()
               if not line[3:].startswith(("bench/results/", "BENCHMARKS.md"))]
    return {"commit": _git("rev-parse", "HEAD").strip() or None, "dirty_files": changed}


def threads() -> dict:
    info = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def environment() -> dict:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": _cpu_model(), "cpus": cpus, "python": platform.python_version(),
            "torch": _version("torch"), "transformers": _version("transformers"), "platform": platform.platform(),
            **git_state()}


def device_name() -> str:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


# ------------------------------------------------------------------------------------------ memory
def _status_kib(key: str) -> int | None:
    try:
        found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


class ChildrenRss(_Sampler):
    """Peak of the summed RSS of this process's descendants (worker processes), sampled every 0.2 s.

    Shared copy-on-write pages count once per process, so this overstates what the workers add.
    """

    def __init__(self, every: float = 0.2):
        self.peak = 0
        super().__init__(every)

    def _loop(self, every: float) -> None:
        try:
            import psutil
        except ImportError:  # psutil comes with accelerate; without it, children are not measured
            return
        me = psutil.Process()
        while not self._stop.wait(every):
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)


def _cuda():
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


@dataclass
class ProcessRun:
    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int  # the child's peak RSS (the largest of it and its own waited-for children)
    returncode: int
    stdout: str
    stderr: str


def run_process(cmd: list[str], env: dict | None = None, cwd: Path | None = None, check: bool = True) -> ProcessRun:
    """Run a whole program as a child process: wall seconds, CPU seconds and peak RSS from ``wait4``."""
    with open(os.devnull, "rb") as stdin, _Capture() as out, _Capture() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin, stdout=out.fh, stderr=err.fh)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        run = ProcessRun(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, proc.returncode,
                         out.text(), err.text())
    if check and run.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {run.returncode}:\n{run.stderr[-2000:]}")
    return run


class _Capture:
    """A temporary file for a child's output (pipes could fill up while we wait in wait4)."""

    def __enter__(self):
        import tempfile

        self.fh = tempfile.TemporaryFile()
        return self

    def text(self) -> str:
        self.fh.seek(0)
        return self.fh.read().decode(errors="replace")

    def __exit__(self, *exc):
        self.fh.close()


# ------------------------------------------------------------------------------------------ running
def digest(obj: Any) -> str:
    """A short content digest of JSON-able data or bytes, for parity on large outputs."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def rotated(items: list, r: int) -> list:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def _timed(variant: Variant) -> tuple[Result, dict]:
    cuda = _cuda()
    if cuda is not None:
        cuda.cuda.synchronize()
        cuda.cuda.reset_peak_memory_stats()
    reset = reset_peak_rss()
    with ChildrenRss() as children:
        cpu0, start = time.process_time(), time.perf_counter()
        result = variant.run()
        if cuda is not None:
            cuda.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    seconds = result.seconds if result.seconds is not None else wall
    sample = {"seconds": seconds, "wall_seconds": wall,
              "cpu_seconds": result.cpu_seconds if result.cpu_seconds is not None else cpu,
              **{f"{unit}/s": amount / seconds for unit, amount in result.work.items()}, **result.figures}
    if result.peak_rss_bytes is not None:
        sample["peak_rss_mib"], sample["memory"] = result.peak_rss_bytes / 2**20, "child process peak RSS"
    else:
        sample["peak_rss_mib"] = peak_rss_bytes() / 2**20
        sample["memory"] = "process peak RSS during the run" if reset else "process peak RSS so far (no reset)"
        if children.peak:
            sample["children_rss_mib"] = children.peak / 2**20
    if cuda is not None:
        sample["cuda_peak_mib"] = cuda.cuda.max_memory_allocated() / 2**20
    return result, sample


def summarise(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else None, "n": len(values)}


def _agreement(case: Case, base_out, out, exact: bool) -> tuple[bool, float]:
    """-> (passes, share agreeing). With ``Case.agreement`` (e.g. a float tolerance), all must agree."""
    share = case.agreement(base_out, out) if case.agreement else float(out == base_out)
    return share == 1.0 or not exact, share


def _run_rounds(cases: list[Case], rounds: int, warmup: bool, log) -> tuple[dict, dict]:
    samples = {c.name: {v.name: [] for v in c.variants} for c in cases}
    outputs = {c.name: {v.name: [] for v in c.variants} for c in cases}
    if warmup:
        for case in cases:
            for v in case.variants:
                log(f"warm-up  {case.name} / {v.name}")
                (v.warmup or v.run)()
    for r in range(rounds):
        for case in rotated(cases, r):
            for v in rotated(case.variants, r):
                result, sample = _timed(v)
                sample.update(round=r, load1=os.getloadavg()[0])
                samples[case.name][v.name].append(sample)
                outputs[case.name][v.name].append(result.output)
                log(f"round {r + 1}/{rounds}  {case.name} / {v.name}: {sample['seconds']:.3f} s")
    return samples, outputs


def _case_record(case: Case, samples: dict, outputs: dict) -> dict:
    base = case.variants[0].name
    rate = f"{case.unit}/s"
    parity_outputs = case.parity() if case.parity else None
    record = {"baseline": base, "unit": case.unit, "variants": {}}
    for v in case.variants:
        rows = samples[v.name]
        if v.name != base:
            for row, base_row in zip(rows, samples[base]):
                row["ratio"] = row[rate] / base_row[rate]
        figures = sorted({k for row in rows for k, val in row.items()
                          if isinstance(val, (int, float)) and k not in ("round",)})
        entry = {"exact": v.exact, "samples": rows,
                 "summary": {k: summarise([row[k] for row in rows if k in row]) for k in figures},
                 "memory": rows[0]["memory"] if rows else None}
        if v.name != base:
            entry["parity"] = _parity(case, v, outputs, parity_outputs)
        record["variants"][v.name] = entry
    return record


def _parity(case: Case, v: Variant, outputs: dict, parity_outputs: dict | None) -> dict:
    base = case.variants[0].name
    pairs = ([(parity_outputs[base], parity_outputs[v.name])] if parity_outputs is not None
             else list(zip(outputs[base], outputs[v.name])))
    if not pairs or all(b is None and o is None for b, o in pairs):
        return {"checked": False, "ok": True, "agreement": None, "how": "no output to compare"}
    checks = [_agreement(case, b, o, v.exact) for b, o in pairs]
    return {"checked": True, "ok": all(ok for ok, _ in checks), "agreement": min(s for _, s in checks),
            "how": ("separate parity pass" if parity_outputs is not None else "every timed round")
            + (", must be identical" if v.exact else ", agreement reported")}


def judge(target: Target, cases: dict) -> dict:
    out = {k: getattr(target, k) for k in ("case", "variant", "figure", "op", "value", "text", "every_round")}
    try:
        rows = cases[target.case]["variants"][target.variant]["samples"]
    except KeyError:
        return {**out, "met": None, "why": "not measured in this run"}
    values = [row[target.figure] for row in rows if target.figure in row]
    if not values:
        return {**out, "met": None, "why": f"no figure {target.figure!r}"}
    stats = summarise(values)
    rounds_met = sum(OPS[target.op](x, target.value) for x in values)
    met = rounds_met == len(values) if target.every_round else OPS[target.op](stats["median"], target.value)
    if len(values) < MIN_ROUNDS:
        return {**out, **stats, "rounds_met": rounds_met, "met": None, "why": f"fewer than {MIN_ROUNDS} rounds"}
    return {**out, **stats, "rounds_met": rounds_met, "met": met}


# ------------------------------------------------------------------------------------------ the entry point
def add_arguments(parser: argparse.ArgumentParser, rounds: int = MIN_ROUNDS) -> None:
    """The flags every benchmark shares."""
    g = parser.add_argument_group("harness")
    g.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds}; a record needs >= {MIN_ROUNDS})")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up run of each variant")
    g.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON record (default bench/results)")
    g.add_argument("--no-record", dest="record", action="store_false", help="print only; write no record")


def command_line(argv: list[str] | None) -> str:
    """The command that reproduces this run: the script and the flags it was given."""
    import shlex

    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])


def size_label(quick: bool, *overrides) -> str:
    """"quick" or "full", or "custom" when a size flag was given (such records are reported apart)."""
    return "custom" if any(o is not None for o in overrides) else ("quick" if quick else "full")


@dataclass
class Benchmark:
    name: str  # file-name stem of the record, e.g. "eval"
    title: str
    description: str  # what is compared, how, and what to read into it (goes into BENCHMARKS.md)
    size: str  # "full" or "quick" (or another label): records of different sizes are reported apart
    settings: dict  # every setting that decides the figures
    command: str  # the command that reproduces this record


def run_benchmark(bench: Benchmark, cases: list[Case], targets: list[Target], args: argparse.Namespace,
                  notes: Callable[[dict], list[str]] | None = None) -> int:
    """Run, check parity, judge targets, print a summary, write the record; -> the exit code (1: outputs differ)."""
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    if args.record and args.rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds {args.rounds}: a record needs at least {MIN_ROUNDS} rounds (or pass --no-record)")
    log = lambda msg: print(f"[{bench.name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    started, load_before = datetime.now(timezone.utc), load_average()
    with LoadSampler() as sampler:
        samples, outputs = _run_rounds(cases, args.rounds, args.warmup, log)
        case_records = {c.name: _case_record(c, samples[c.name], outputs[c.name]) for c in cases}
    record = {"benchmark": bench.name, "title": bench.title, "description": bench.description, "size": bench.size,
              "command": bench.command, "settings": bench.settings, "rounds": args.rounds, "warmup": args.warmup,
              "started": started.isoformat(timespec="seconds"),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "conditions": {"load_before": load_before, "load_after": load_average(),
                             "load1_max_during": max(sampler.samples, default=load_before[0]),
                             "threads": threads(), "device": device_name()},
              "environment": environment(), "cases": case_records}
    record["targets"] = [judge(t, case_records) for t in targets]
    record["notes"] = notes(record) if notes else []
    failed = [f"{c} / {v}" for c, cr in case_records.items() for v, e in cr["variants"].items()
              if not e.get("parity", {"ok": True})["ok"]]
    record["parity_ok"] = not failed
    print_summary(record)
    if args.record:
        path = write_record(record, args.results)
        log(f"record written: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if failed:
        log(f"OUTPUTS DIFFER from the baseline: {', '.join(failed)}")
        return 1
    return 0


def write_record(record: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = record["started"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = folder / f"{record['benchmark']}-{record['size']}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def fmt(stats: dict | None, digits: int = 2) -> str:
    if not stats:
        return "-"
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def print_summary(record: dict) -> None:
    cond = record["conditions"]
    print(f"{record['title']} [{record['size']}], {record['rounds']} rounds; load {cond['load_before']} -> "
          f"{cond['load_after']} (max {cond['load1_max_during']:.2f}); threads {cond['threads']}")
    for name, case in record["cases"].items():
        rate = f"{case['unit']}/s"
        print(f"  {name}")
        for vname, v in case["variants"].items():
            s = v["summary"]
            parity = v.get("parity")
            same = "" if parity is None else ("  parity ok" if parity["ok"] else "  PARITY FAILED")
            print(f"    {vname:<44} {rate} {fmt(s.get(rate))}  ratio {fmt(s.get('ratio'))}  "
                  f"peak RSS MiB {fmt(s.get('peak_rss_mib'), 0)}{same}")
    for t in record["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not judged"}[t["met"]]
        print(f"  target {t['text']}: median {t.get('median', float('nan')):.3f} -> {verdict}")
