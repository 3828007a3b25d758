"""The benchmark harness (bench/harness.py) and the report built from its records (bench/report.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
import report  # noqa: E402
from harness import Benchmark, Case, Result, Target, Variant  # noqa: E402


def args(tmp_path: Path, rounds: int = 3, record: bool = True, warmup: bool = False) -> argparse.Namespace:
    return argparse.Namespace(rounds=rounds, warmup=warmup, results=tmp_path / "results", record=record)


def bench(name: str = "demo") -> Benchmark:
    return Benchmark(name=name, title=f"Demo {name}", description="A fake benchmark.", size="quick",
                     settings={"n": 1}, command=f"python bench/{name}.py")


def scripted(name: str, log: list, seconds: list[float], output=lambda r: "same", work: float = 10.0) -> Variant:
    """A variant whose r-th run reports seconds[r] and records the order it ran in."""
    def run():
        r = sum(1 for n in log if n == name)
        log.append(name)
        return Result({"items": work}, output=output(r), seconds=seconds[r])

    return Variant(name, run)


def only_record(tmp_path: Path) -> dict:
    files = list((tmp_path / "results").glob("*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def test_rounds_rotate_the_order_so_every_variant_runs_in_every_position(tmp_path):
    log: list[str] = []
    case = Case("c", unit="items", variants=[scripted(n, log, [1.0] * 3) for n in "abc"])
    assert harness.run_benchmark(bench(), [case], [], args(tmp_path)) == 0
    rounds = [log[i : i + 3] for i in range(0, 9, 3)]
    assert rounds == [list("abc"), list("bca"), list("cab")]
    for position in range(3):
        assert sorted(r[position] for r in rounds) == list("abc")


def test_median_min_max_and_per_round_ratios(tmp_path):
    log: list[str] = []
    case = Case("c", unit="items", variants=[scripted("base", log, [2.0, 4.0, 3.0]), scripted("ours", log, [1.0, 1.0, 3.0])])
    harness.run_benchmark(bench(), [case], [], args(tmp_path))
    ours = only_record(tmp_path)["cases"]["c"]["variants"]["ours"]
    assert ours["summary"]["seconds"] == pytest.approx({"median": 1.0, "min": 1.0, "max": 3.0, "spread": 2.0, "n": 3})
    assert ours["summary"]["items/s"]["median"] == pytest.approx(10.0)
    # the ratio is taken inside each round: 2/1, 4/1, 3/3
    assert [s["ratio"] for s in ours["samples"]] == pytest.approx([2.0, 4.0, 1.0])
    assert ours["summary"]["ratio"]["median"] == pytest.approx(2.0)


def test_different_outputs_exit_1_and_the_record_says_so(tmp_path):
    log: list[str] = []
    case = Case("c", unit="items", variants=[scripted("base", log, [1.0] * 3),
                                             scripted("ours", log, [1.0] * 3, output=lambda r: "x" if r == 2 else "same")])
    assert harness.run_benchmark(bench(), [case], [], args(tmp_path)) == 1
    record = only_record(tmp_path)
    assert record["parity_ok"] is False
    assert record["cases"]["c"]["variants"]["ours"]["parity"]["ok"] is False
    assert "**failed**" in report.render(tmp_path / "results")


def test_inexact_variant_reports_agreement_without_failing(tmp_path):
    log: list[str] = []
    share = lambda a, b: sum(x == y for x, y in zip(a, b)) / len(a)  # noqa: E731
    inexact = scripted("bf16", log, [1.0] * 3, output=lambda r: [1, 2, 3, 0])
    inexact.exact = False
    case = Case("c", unit="items", agreement=share,
                variants=[scripted("base", log, [1.0] * 3, output=lambda r: [1, 2, 3, 4]), inexact])
    assert harness.run_benchmark(bench(), [case], [], args(tmp_path)) == 0
    parity = only_record(tmp_path)["cases"]["c"]["variants"]["bf16"]["parity"]
    assert parity["ok"] and parity["agreement"] == pytest.approx(0.75)


def test_a_separate_parity_pass_is_what_gets_compared(tmp_path):
    log: list[str] = []
    case = Case("c", unit="items", parity=lambda: {"base": [1], "ours": [2]},
                variants=[scripted("base", log, [1.0] * 3), scripted("ours", log, [1.0] * 3)])
    assert harness.run_benchmark(bench(), [case], [], args(tmp_path)) == 1


def test_targets_are_judged_on_the_median_or_on_every_round(tmp_path):
    log: list[str] = []
    case = Case("c", unit="items", variants=[scripted("base", log, [2.0, 2.0, 2.0]), scripted("ours", log, [1.0, 1.0, 4.0])])
    targets = [Target("c", "ours", "ratio", ">=", 1.5, "median ratio >= 1.5"),
               Target("c", "ours", "ratio", ">=", 1.5, "every round >= 1.5", every_round=True),
               Target("c", "ours", "seconds", "<=", 0.5, "seconds <= 0.5")]
    harness.run_benchmark(bench(), [case], targets, args(tmp_path))
    judged = {t["text"]: t for t in only_record(tmp_path)["targets"]}
    assert judged["median ratio >= 1.5"]["met"] is True
    assert judged["every round >= 1.5"]["met"] is False and judged["every round >= 1.5"]["rounds_met"] == 2
    assert judged["seconds <= 0.5"]["met"] is False


def test_a_record_needs_three_rounds(tmp_path):
    case = Case("c", unit="items", variants=[Variant("a", lambda: Result({"items": 1}))])
    with pytest.raises(SystemExit, match="at least 3 rounds"):
        harness.run_benchmark(bench(), [case], [], args(tmp_path, rounds=2))
    assert harness.run_benchmark(bench(), [case], [], args(tmp_path, rounds=1, record=False)) == 0
    assert not (tmp_path / "results").exists()


def test_record_holds_the_conditions(tmp_path):
    case = Case("c", unit="items", variants=[Variant("a", lambda: Result({"items": 1}))])
    harness.run_benchmark(bench(), [case], [], args(tmp_path))
    record = only_record(tmp_path)
    cond, env = record["conditions"], record["environment"]
    assert len(cond["load_before"]) == 3 and len(cond["load_after"]) == 3
    assert {"OMP_NUM_THREADS", "MKL_NUM_THREADS"} <= cond["threads"].keys()
    assert env["cpus"] >= 1 and env["cpu_model"] and env["python"]
    assert env["commit"] is None or len(env["commit"]) == 40
    assert record["command"] == "python bench/demo.py" and record["rounds"] == 3


def test_peak_rss_is_measured_per_run_not_per_process(tmp_path):
    if not harness.reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")

    def big():
        block = bytearray(300 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
        return Result({"items": 1})

    case = Case("c", unit="items", variants=[Variant("big", big), Variant("small", lambda: Result({"items": 1}))])
    harness.run_benchmark(bench(), [case], [], args(tmp_path))
    variants = only_record(tmp_path)["cases"]["c"]["variants"]
    big_peak = variants["big"]["summary"]["peak_rss_mib"]["min"]
    small_peak = variants["small"]["summary"]["peak_rss_mib"]["max"]
    assert big_peak - small_peak > 250


def test_run_process_reports_the_childs_peak_rss_and_exit_code():
    code = "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('done')"
    run = harness.run_process([sys.executable, "-c", code])
    assert run.returncode == 0 and run.stdout.strip() == "done"
    assert run.peak_rss_bytes > 200 * 2**20
    with pytest.raises(RuntimeError, match="exited 3"):
        harness.run_process([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_report_check_fails_until_the_file_is_regenerated(tmp_path):
    log: list[str] = []
    case = Case("c", unit="items", variants=[scripted("base", log, [2.0] * 3), scripted("ours", log, [1.0] * 3)])
    harness.run_benchmark(bench(), [case], [Target("c", "ours", "ratio", ">=", 1.5, "ours >= 1.5x")], args(tmp_path))
    out = tmp_path / "BENCHMARKS.md"
    common = ["--results", str(tmp_path / "results"), "--output", str(out)]
    assert report.main(common + ["--check"]) == 1
    assert report.main(common) == 0
    assert report.main(common + ["--check"]) == 0
    text = out.read_text()
    assert "| Demo demo | quick | ours >= 1.5x | 2.000 (2.000-2.000) | **met** |" in text
    assert "python bench/demo.py" in text


def test_benchmarks_md_is_generated_from_the_committed_records():
    """BENCHMARKS.md and bench/results/*.json cannot drift apart: rerun `python bench/report.py` after a benchmark."""
    assert report.main(["--check"]) == 0


def test_git_state_names_modified_files_whole(tmp_path, monkeypatch):
    """`git status --porcelain` starts a modified tracked file's line with a space; the path must survive."""
    import subprocess

    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "script.py").write_text("a\n")
    (repo / "other.py").write_text("b\n")
    for cmd in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True)
    (repo / "bench" / "script.py").write_text("changed\n")
    (repo / "other.py").write_text("changed\n")
    monkeypatch.setattr(harness, "ROOT", repo)
    assert sorted(harness.git_state()["dirty_files"]) == ["bench/script.py", "other.py"]


def test_vqgan_objective_records_are_tabulated_one_row_per_arm(tmp_path):
    folder = tmp_path / "results" / "vqgan_objectives"
    folder.mkdir(parents=True)
    arm = {"steps": 7, "scans": {"psnr": 21.5, "ssim": 0.61, "codes_used": 40, "perplexity": 12.0, "lesion_survival": 0.75}}
    record = {"command": "python bench/vqgan_objectives.py", "started": "now", "settings": {"seed": 3},
              "conditions": {"load_before": [1.0], "load_after": [2.0]}, "environment": {"cpus": 2},
              "arms": {"reconstruction": {**arm, "dicom": {"psnr": 9.5}}, "full_all": arm}, "notes": ["a note"]}
    (folder / "vqgan-objectives-1.json").write_text(json.dumps(record))
    text = report.render(tmp_path / "results")
    assert "| reconstruction | 7 | 21.50 | 0.610 | 40 | 12.0 | 0.75 | 9.50 |" in text
    assert "| full_all | 7 | 21.50 | 0.610 | 40 | 12.0 | 0.75 | - |" in text and "- a note" in text


def test_a_variants_own_figures_are_reported_under_its_case(tmp_path):
    """Result.figures (e.g. forwards per image) reach BENCHMARKS.md as median (min-max), one line per variant."""
    def run():
        return Result({"items": 1.0}, output="same", seconds=1.0, figures={"forwards_per_image": 18.0})

    case = Case("c", unit="items", variants=[Variant("base", lambda: Result({"items": 1.0}, "same", 1.0)), Variant("ours", run)])
    harness.run_benchmark(bench(), [case], [], args(tmp_path))
    text = report.render(tmp_path / "results")
    assert "- ours: forwards_per_image 18.00 (18.00-18.00)" in text and "- base:" not in text


def test_targets_that_share_a_text_are_told_apart_by_their_variant():
    """A record whose targets say the same thing for several variants (bench_volumes' readers) named them nowhere."""
    record = {"title": "T", "size": "full", "rounds": 3, "parity_ok": True, "_file": "t.json",
              "conditions": {"load_before": [1.0], "load_after": [1.0], "load1_max_during": 1.0}, "environment": {"cpus": 2},
              "targets": [{"variant": v, "text": "peak under 2x", "median": 1.0, "min": 1.0, "max": 1.0, "met": True,
                           "rounds_met": 3, "n": 3, "every_round": True, "figure": "peak_rss_mib"} for v in ("nifti", "dicom")]}
    lines = "\n".join(report.targets_table([record]))
    assert "nifti: peak under 2x" in lines and "dicom: peak under 2x" in lines


def test_a_json_that_is_not_a_record_is_named_not_a_keyerror(tmp_path):
    (tmp_path / "summary.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit) as exit_:
        report.load_records(tmp_path)
    assert "summary.json: not a benchmark record" in str(exit_.value)
