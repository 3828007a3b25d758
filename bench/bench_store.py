"""Training data at corpus scale: today's in-memory loader vs the memory-mapped token store, at 1 and 2 ranks.

Usage::

    nice -n 10 python bench/bench_store.py             # 20M- and 200M-token sequence folders
    nice -n 10 python bench/bench_store.py --quick     # 2M and 20M tokens
    nice -n 10 python bench/bench_store.py --sizes 20M --ranks 1 --rounds 3

Synthetic sequence folders with MedMax's shape (``tokenization.build_sequences``' layout, written through
``medmax.data.shards.write_sequences``): 75% of the rows hold one 1024-code image (boi, 1024 codes, eoi)
after a prompt of 20-200 text tokens and before an answer of 5-300 (loss on the answer); the rest are text
of 100-1500 tokens, loss on the second half. Made once under ``--data-dir`` and kept for later runs.

Each variant run is a whole training launch (``finetune.train.run`` on the tiny preset, packed rows of 4096
tokens, 4 rows per rank and step, ``--steps`` steps, no checkpoints), under ``torchrun`` (gloo) at 2 ranks:
``data_store=false`` (today: every rank reads every shard into its memory) or ``data_store=true`` (the store,
made beforehand with its packing plan by the untimed warm-up; the one-time conversion is timed in its own case). Every rank
reports, from inside training:

- *peak RSS per rank minus a model-only baseline*: the rank's ``VmHWM`` at the end, minus the median
  ``VmHWM`` of one launch on a 64-sequence folder read into memory (measured first, per rank count);
  file pages of the store a rank touched count in its RSS, although the page cache holds them once per node;
- *launch to first step*: wall time from the parent's launch of the process (tree) to the end of the first
  optimizer step on the slowest rank; its parts are reported too: launch to the end of the imports
  (interpreter, torch, transformers: the same for both loaders), and the data set-up itself (reading or
  mapping the folders, the checks, the plan), which is what the loader decides;
- *steady tokens/s*: real tokens of every rank over the steps after the 5th, divided by their wall time.

Parity: the loss at every step (rank 0's log) must be identical for both loaders.

A second case compares ways to serve the rows, in one process on the smaller folder: random sequences read
as training reads them (2,000 draws), and the time to open. Today's in-memory arrays; the store (the Arrow
IPC file ``datasets`` memory-maps, read as zero-copy numpy views); the same file through ``datasets``' own
row access (``Dataset.with_format("numpy")[i]``); a home-made flat format (``np.memmap`` of the ids and
labels with an offsets index); and the parquet shards read through a memory map (``pq.read_table(...,
memory_map=True)``: zstd pages must be decoded, so the whole column lands in anonymous memory). The
conversion case times making the store against ``datasets.Dataset.from_parquet`` (its own Arrow cache).
litdata 0.2.76 and mosaicml-streaming 0.13.0 were not measured: pip's dry run (with the project's
constraints) shows litdata pulling in torchvision 0.28.0, and mosaicml-streaming downgrading numpy (2.4.6 ->
2.1.3), transformers (5.23 -> 4.57.6), tokenizers and huggingface_hub: neither installs beside this stack.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from harness import (ROOT, Benchmark, Case, Result, Target, Variant, add_arguments, command_line, digest,  # noqa: E402
                     fmt, run_benchmark, run_process, size_label)

WARM_STEPS = 5  # steps before the steady-state window
ROW_TOKENS = 4096
ROWS_PER_STEP = 4
DRAWS = 2000
BASELINE_SEQUENCES = 64
IMAGE_CODES = 1024
ROW_FLAGS: list[str] = []  # --row-tokens / --rows-per-step, passed on to each launch


# ------------------------------------------------------------------------------------------ data
def parse_size(text: str) -> int:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text.strip())
    if not found:
        raise SystemExit(f"--sizes: {text!r} is not a token count like 20M")
    return int(float(found[1]) * {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}[found[2]])


def synthetic_rows(vocab, tokens: int, seed: int):
    """MedMax-shaped (input_ids, labels) rows until ``tokens`` tokens are written."""
    rng = np.random.default_rng(seed)
    structure = [v for k, v in vocab.special_ids().items() if k not in ("image_code_offset", "n_image_codes", "vocab_size")]
    text_ids = np.setdiff1d(np.arange(vocab.size), np.concatenate([np.asarray(vocab.code_to_id), structure]))
    first_code = int(vocab.code_to_id[0])
    written = 0
    while written < tokens:
        if rng.random() < 0.75:
            prompt = rng.choice(text_ids, rng.integers(20, 201))
            codes = rng.integers(first_code, first_code + IMAGE_CODES, IMAGE_CODES)
            answer = rng.choice(text_ids, rng.integers(5, 301))
            ids = np.concatenate([[vocab.bos_id], prompt, [vocab.boi_id], codes, [vocab.eoi_id], answer, [vocab.eos_id]])
            loss_from = len(ids) - len(answer) - 1
        else:
            ids = np.concatenate([[vocab.bos_id], rng.choice(text_ids, rng.integers(100, 1501))])
            loss_from = len(ids) // 2
        labels = ids.copy()
        labels[:loss_from] = -100
        written += len(ids)
        yield ids.astype(np.int32), labels.astype(np.int32)


def make_folder(root: Path, tokens: int, seed: int = 0) -> Path:
    """A sequence folder of about ``tokens`` tokens, made once under ``root``."""
    from medmax.data.shards import write_sequences
    from medmax.presets import build_tiny_tokenizer
    from medmax.vocab import Vocabulary

    folder = root / f"seq-{tokens}-seed{seed}"
    if (folder / "manifest.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    partial = root / f"{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    vocab = Vocabulary.from_tokenizer(build_tiny_tokenizer())
    start = time.perf_counter()
    write_sequences(partial, synthetic_rows(vocab, tokens, seed), vocab.special_ids(), rows_per_shard=10_000)
    partial.rename(folder)
    print(f"[store] wrote {folder} ({tokens:,} tokens) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return folder


# ------------------------------------------------------------------------------------------ one training launch
def _status(key: str) -> int:
    found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) * 1024 if found else 0


def worker(args) -> int:
    """Inside each rank: train, and write what this rank saw (times, tokens, RSS) to ``--worker``/rank-R.json."""
    marks: dict = {"rank": int(os.environ.get("RANK", 0)), "steps": [], "t_worker": time.time()}
    import finetune.train as train
    from finetune.config import load_config
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            marks["steps"].append([state.global_step, time.time(), trainer_ref[0]._real_tokens])

    trainer_ref = []
    make = train.medmax_trainer

    def medmax_trainer(**kwargs):
        trainer = make(**kwargs)
        trainer.add_callback(Marks())
        trainer_ref.append(trainer)
        return trainer

    train.medmax_trainer = medmax_trainer
    setup_data = train._setup_data

    def timed_setup_data(*a, **kw):
        marks["t_data"] = time.time()
        out = setup_data(*a, **kw)
        marks["data_s"] = time.time() - marks["t_data"]
        return out

    train._setup_data = timed_setup_data
    overrides = ["model=preset:tiny", "tokenizer=preset:tiny", "vqgan=preset:tiny", f"datasets=[{args.data}]",
                 "validation=null", f"output_dir={args.worker / 'run'}", f"max_length={args.row_tokens}",
                 f"per_device_train_batch_size={args.rows_per_step}", f"max_steps={args.steps}", "logging_steps=1",
                 "save_strategy=no", "report_to=none", "disable_tqdm=true", "warmup_steps=1",
                 f"data_store={'true' if args.loader == 'store' else 'false'}", f"store_dir={args.store_dir}",
                 "use_cpu=true", "dataloader_num_workers=0"]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        overrides.append("ddp_backend=gloo")
    cfg = load_config(str(ROOT / "finetune" / "configs" / "tiny_cpu.yaml"), overrides)
    marks["t_run"] = time.time()  # interpreter, torch and transformers are loaded by now
    trainer = train.run(cfg)
    marks.update(peak_rss=_status("VmHWM"), rss_file=_status("RssFile"), rss_anon=_status("RssAnon"),
                 losses=[h["loss"] for h in trainer.state.log_history if "loss" in h])
    (args.worker / f"rank-{marks['rank']}.json").write_text(json.dumps(marks))
    from medmax.distributed import leave_group

    leave_group()  # as finetune.train's main does: a 2-rank launch must not abort at exit (medmax/distributed.py)
    return 0


def launch(data: Path, loader: str, ranks: int, steps: int, store_dir: Path, work: Path) -> tuple[list[dict], object]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    me = [str(Path(__file__).resolve()), "--worker", str(work), "--data", str(data), "--loader", loader,
          "--steps", str(steps), "--store-dir", str(store_dir), *ROW_FLAGS]
    cmd = [sys.executable, *me] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *me]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.time()
    proc = run_process(cmd, env=env, cwd=ROOT)
    reports = [json.loads((work / f"rank-{r}.json").read_text()) for r in range(ranks)]
    for report in reports:
        report["launch"] = start
    return reports, proc


def figures(reports: list[dict], baseline_rss: float) -> tuple[dict, float, int, list]:
    """-> (figures, steady seconds, steady tokens, rank 0's losses)."""
    first = max(r["steps"][0][1] for r in reports) - reports[0]["launch"]
    t0 = max(r["steps"][WARM_STEPS - 1][1] for r in reports)
    t1 = max(r["steps"][-1][1] for r in reports)
    tokens = sum(r["steps"][-1][2] - r["steps"][WARM_STEPS - 1][2] for r in reports)
    growth = max(r["peak_rss"] for r in reports) / 2**20 - baseline_rss
    rank0 = next(r for r in reports if r["rank"] == 0)
    return ({"first_step_s": first, "rss_growth_mib": growth, "rank_peak_rss_mib": max(r["peak_rss"] for r in reports) / 2**20,
             "rank_rss_file_mib": max(r["rss_file"] for r in reports) / 2**20,
             "launch_to_imports_done_s": max(r["t_run"] for r in reports) - reports[0]["launch"],
             "data_setup_s": max(r["data_s"] for r in reports),
             "launch_to_data_ready_s": max(r["t_data"] + r["data_s"] for r in reports) - reports[0]["launch"]},
            t1 - t0, tokens, rank0["losses"])


def training_variant(data: Path, loader: str, ranks: int, args, baselines: dict) -> Variant:
    def run() -> Result:
        reports, proc = launch(data, loader, ranks, args.steps, args.data_dir / "stores", args.data_dir / "work")
        figs, seconds, tokens, losses = figures(reports, baselines[ranks])
        return Result(work={"tokens": tokens}, seconds=seconds, figures=figs, output=digest(losses),
                      peak_rss_bytes=proc.peak_rss_bytes, cpu_seconds=proc.cpu_seconds)

    def warmup() -> None:  # the store and its plan exist before the first timed launch (conversion has its own case)
        if loader == "store":
            from medmax.data.loader import SequenceDataset
            from medmax.data.store import open_sequences

            SequenceDataset([open_sequences(data, args.data_dir / "stores")], [1.0], args.row_tokens, True, seed=0)

    name = "today: in memory" if loader == "memory" else "token store (memory-mapped)"
    return Variant(name, run, exact=True, warmup=warmup)


def model_only_rss(args, ranks: int) -> float:
    """Median peak RSS per rank (MiB) of a launch whose data is negligible: the model, optimizer and framework."""
    folder = args.data_dir / "baseline"
    if not (folder / "manifest.json").is_file():
        from medmax.data.shards import write_sequences
        from medmax.presets import build_tiny_tokenizer
        from medmax.vocab import Vocabulary

        vocab = Vocabulary.from_tokenizer(build_tiny_tokenizer())
        rows = synthetic_rows(vocab, 10**9, 1)
        write_sequences(folder, (next(rows) for _ in range(BASELINE_SEQUENCES)), vocab.special_ids())
    reports, _ = launch(folder, "memory", ranks, WARM_STEPS + 2, args.data_dir / "stores", args.data_dir / "work")
    return max(r["peak_rss"] for r in reports) / 2**20


# ------------------------------------------------------------------------------------------ ways to serve rows
def _draws(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, DRAWS)


def _read_all(get, draws) -> int:
    h = 0
    for i in draws:
        ids, labels = get(int(i))
        h = (h * 1_000_003 + int(ids.astype(np.int64).sum()) + 7 * int(labels.astype(np.int64).sum())) % (1 << 61)
    return h


def serving_variants(folder: Path, store_root: Path, flat_dir: Path) -> list[Variant]:
    from medmax.data.loader import load_sequences
    from medmax.data.store import TOKENS, open_sequences

    n = len(open_sequences(folder, store_root))
    draws = _draws(n)

    def timed(opener):
        def run() -> Result:
            start = time.perf_counter()
            get = opener()
            opened = time.perf_counter()
            out = _read_all(get, draws)
            done = time.perf_counter()
            return Result(work={"sequences": DRAWS}, seconds=done - opened, output=out,
                          figures={"open_s": opened - start})
        return run

    def memory():
        return load_sequences(folder).sequence

    def store():
        sequences = open_sequences(folder, store_root)
        sequences.sequence(0)  # maps the file (datasets.Dataset.from_file) inside the open time
        return sequences.sequence

    def datasets_rows():
        from datasets import Dataset

        ds = Dataset.from_file(str(open_sequences(folder, store_root).store.path / TOKENS)).with_format("numpy")
        return lambda i: (lambda row: (row["input_ids"], row["labels"]))(ds[i])

    def flat():
        if not (flat_dir / "offsets.npy").is_file():
            data = load_sequences(folder)
            flat_dir.mkdir(parents=True, exist_ok=True)
            data.ids.tofile(flat_dir / "ids.bin")
            data.labels.tofile(flat_dir / "labels.bin")
            np.save(flat_dir / "offsets.npy", data.offsets)
        offsets = np.load(flat_dir / "offsets.npy", mmap_mode="r")
        ids = np.memmap(flat_dir / "ids.bin", dtype=np.int32, mode="r")
        labels = np.memmap(flat_dir / "labels.bin", dtype=np.int32, mode="r")
        return lambda i: (ids[offsets[i] : offsets[i + 1]], labels[offsets[i] : offsets[i + 1]])

    def parquet_mapped():
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = json.loads((folder / "manifest.json").read_text())["files"]
        table = pa.concat_tables([pq.read_table(folder / f, columns=["input_ids", "labels"], memory_map=True) for f in files])
        ids, labels = table.column("input_ids").combine_chunks(), table.column("labels").combine_chunks()
        offsets, iv, lv = ids.offsets.to_numpy(), ids.values.to_numpy(), labels.values.to_numpy()
        return lambda i: (iv[offsets[i] : offsets[i + 1]], lv[offsets[i] : offsets[i + 1]])

    return [Variant("today: in memory", timed(memory)),
            Variant("store: datasets' memory-mapped Arrow, zero-copy views (chosen)", timed(store)),
            Variant("store file through datasets' row access (numpy format)", timed(datasets_rows)),
            Variant("home-made flat files (np.memmap + offsets)", timed(flat)),
            Variant("parquet through a memory map (pq.read_table memory_map=True)", timed(parquet_mapped))]


def conversion_variants(folder: Path, scratch: Path) -> list[Variant]:
    from medmax.data.store import ensure_store

    files = [str(folder / f) for f in json.loads((folder / "manifest.json").read_text())["files"]]

    def ours() -> Result:
        shutil.rmtree(scratch, ignore_errors=True)
        ensure_store(folder, store_root=scratch)
        return Result(work={"files": len(files)})

    def hf() -> Result:
        from datasets import Dataset

        shutil.rmtree(scratch, ignore_errors=True)
        Dataset.from_parquet(files, columns=["input_ids", "labels"], cache_dir=str(scratch))
        return Result(work={"files": len(files)})

    return [Variant("ours: pyarrow stream + per-row figures + content digest", ours, exact=False),
            Variant("datasets.Dataset.from_parquet (its Arrow cache)", hf, exact=False)]


# ------------------------------------------------------------------------------------------ the benchmark
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2M and 20M tokens instead of 20M and 200M")
    p.add_argument("--sizes", help="comma-separated token counts, e.g. 20M,200M")
    p.add_argument("--ranks", default="1,2", help="rank counts to launch (default 1,2)")
    p.add_argument("--serve-size", help="token count of the folder the serving and conversion cases use "
                   "(default: the smallest of --sizes)")
    p.add_argument("--row-tokens", type=int, default=ROW_TOKENS, help=f"packed row length (default {ROW_TOKENS})")
    p.add_argument("--rows-per-step", type=int, default=ROWS_PER_STEP, help=f"rows per rank and step (default {ROWS_PER_STEP})")
    p.add_argument("--steps", type=int, default=20, help="training steps per launch (default 20)")
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "medmax_bench_store",
                   help="where the synthetic folders and their stores are kept between runs")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--loader", choices=("memory", "store"), help=argparse.SUPPRESS)
    p.add_argument("--store-dir", type=Path, help=argparse.SUPPRESS)
    add_arguments(p)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # datasets must never reach for the network here
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ROW_FLAGS[:] = ["--row-tokens", str(args.row_tokens), "--rows-per-step", str(args.rows_per_step)]
    if args.worker is not None:
        return worker(args)
    if args.steps <= WARM_STEPS + 1:
        raise SystemExit(f"--steps {args.steps}: needs more than {WARM_STEPS + 1} (the first {WARM_STEPS} are warm-up)")
    sizes = [parse_size(s) for s in (args.sizes or ("2M,20M" if args.quick else "20M,200M")).split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    args.data_dir.mkdir(parents=True, exist_ok=True)
    serve = parse_size(args.serve_size) if args.serve_size else min(sizes)
    folders = {size: make_folder(args.data_dir, size) for size in {*sizes, serve}}
    baselines = {r: model_only_rss(args, r) for r in ranks}
    cases = [Case(f"ways to serve rows, {serve:,} tokens", unit="sequences",
                  variants=serving_variants(folders[serve], args.data_dir / "stores", args.data_dir / f"flat-{serve}")),
             Case(f"one-time conversion, {serve:,} tokens", unit="files",
                  variants=conversion_variants(folders[serve], args.data_dir / "convert"))]
    targets = []
    for size in sizes:
        for r in ranks:
            name = f"{size / 1e6:g}M tokens, {r} rank{'s' if r > 1 else ''}"
            cases.append(Case(name, unit="tokens", variants=[training_variant(folders[size], "memory", r, args, baselines),
                                                             training_variant(folders[size], "store", r, args, baselines)]))
            store = "token store (memory-mapped)"
            targets += [Target(name, store, "rss_growth_mib", "<=", 200, "RSS growth per rank < 200 MB"),
                        Target(name, store, "ratio", ">=", 0.95, "tokens/s within 5% of the in-memory loader")]
            if size == max(sizes):
                targets.append(Target(name, store, "first_step_s", "<=", 10, f"first step within 10 s at {size / 1e6:g}M tokens"))
    bench = Benchmark(
        name="store", title="Memory-mapped token store vs today's in-memory loader",
        size=size_label(args.quick, args.sizes, args.serve_size), description=__doc__.split("\n\n", 2)[2].strip(),
        settings={"tokens": sizes, "serving_and_conversion_tokens": serve, "ranks": ranks, "steps": args.steps, "steady_after_step": WARM_STEPS,
                  "row_tokens": args.row_tokens, "rows_per_step_per_rank": args.rows_per_step, "model": "preset:tiny",
                  "model_only_peak_rss_mib": baselines, "image_codes": IMAGE_CODES, "serving_draws": DRAWS},
        command=command_line(argv))
    return run_benchmark(bench, cases, targets, args, notes=_notes)


NOTED = {"first_step_s": ("launch to first step", "s", 1), "launch_to_imports_done_s": ("of which imports", "s", 1),
         "data_setup_s": ("data set-up", "s", 2), "rss_growth_mib": ("peak RSS per rank minus model-only", "MiB", 0),
         "rank_rss_file_mib": ("file pages in a rank's RSS", "MiB", 0), "open_s": ("open", "s", 3)}


def _notes(record: dict) -> list[str]:
    """The figures the case tables do not show: per variant, median (min-max) over the rounds."""
    notes = [f"model-only peak RSS per rank (MiB, by rank count): {record['settings']['model_only_peak_rss_mib']}."]
    for case_name, case in record["cases"].items():
        for name, v in case["variants"].items():
            parts = [f"{label} {fmt(v['summary'][key], digits)} {unit}" for key, (label, unit, digits) in NOTED.items()
                     if key in v["summary"]]
            if parts:
                notes.append(f"{case_name} / {name}: {'; '.join(parts)}.")
    return notes


if __name__ == "__main__":
    from medmax.distributed import exit_process

    exit_process(main())
