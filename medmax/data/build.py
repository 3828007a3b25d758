"""Build a whole sequence dataset: input files -> parquet shards, errors.jsonl and manifest.json.

Work is parallel over input files (``workers`` forked processes; each file becomes its own
``part-FFFFF-SSSS.parquet`` shards) and streams in batches of rows, so memory stays bounded by the
batch size and the image-code table, whatever the input size. Image codes come from the row itself
(``image_tokens`` / code lists), from ``image_tokens`` folders written by ``tokenization.image_tokenize``
(joined by image path), or, with a VQGAN checkpoint, from image bytes (or paths under ``image_root``)
encoded on the fly.

The build runs in a work folder beside the output and replaces it only when complete
(``medmax.data.build_folder``). A resumed build keeps an input file's shards only when its fingerprint is
unchanged: the input's content (sha256), the tokenizer file's content, each image-token folder
(its manifest's settings, row counts and rows digest, and each partition's row count and sha256), the
VQGAN's code-deciding weights (``VQGAN.codes_digest``), and every setting that changes a shard.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from ..errors import UserError, is_disk_refusal, write_refused
from ..image_code_lookup import ImageCodeLookup, image_token_fingerprint, load_code_table, load_volume_table, table_code_count
from ..vocab import Vocabulary, load_tokenizer, tokenizer_file
from . import passthrough
from .build_folder import BuildFolder
from .inputs import MAX_ROW_BYTES, file_digest, find_inputs, iter_row_batches, row_id
from .passthrough import ColumnFilter
from .preferences import CONSUMED_COLUMNS, PREFERENCES, PreferenceBuilder
from .rows import VOLUME_LAYOUT, BuildConfigError, LengthDrop, RowError, SequenceBuilder, SequenceConfig
from .shards import (
    ERRORS,
    FORMAT_NAME,
    SEQUENCES,
    FORMAT_VERSION,
    ErrorLog,
    ShardLayout,
    ShardWriter,
    clear_file_outputs,
    conform_shard,
    progress_paths,
    shard_types,
    write_manifest,
)

logger = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    """One sequence build (``tokenization.build_sequences`` fills it from its flags)."""

    inputs: list[str]  # JSONL / parquet files, folders or globs
    tokenizer: str  # tokenizer.json or a checkpoint folder holding one
    output: str  # folder for shards, manifest.json and errors.jsonl (built beside it, swapped in when complete)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    image_tokens: tuple[str, ...] = ()  # folders written by tokenization.image_tokenize
    ckpt: str | None = None  # VQGAN (or model folder holding one) to encode image bytes on the fly
    image_root: str | None = None  # with ckpt: image paths not in image_tokens are read under this folder
    trust_checkpoint: bool = False  # allow a legacy pickled VQGAN checkpoint
    workers: int = 1  # processes, each taking whole input files
    batch_size: int = 1024  # rows encoded per tokenizer call
    rows_per_shard: int = 100_000
    keep: tuple[str, ...] | None = None  # passthrough allow-list; None: every column the builder does not read
    drop: tuple[str, ...] = ()  # passthrough deny-list
    max_row_bytes: int = MAX_ROW_BYTES  # a longer JSONL line (or parquet row's text) is that row's error
    strict: bool = False  # fail on the first rejected row
    resume: bool = False  # keep the outputs of input files a previous run finished (same inputs and settings)
    progress: bool = True
    layout: str = "sequences"  # or "preferences": pairs (medmax.data.preferences) instead of sequences

    def __post_init__(self):
        if self.layout not in ("sequences", "preferences"):
            raise BuildConfigError(f"layout={self.layout!r}: choose sequences or preferences")
        if self.workers < 1:
            raise BuildConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.batch_size < 1 or self.rows_per_shard < 1:
            raise BuildConfigError("--batch-size and --rows-per-shard must be positive")
        if self.image_root is not None and self.ckpt is None:
            raise BuildConfigError("--image-root needs --ckpt (images read from disk are encoded with the VQGAN)")
        if self.max_row_bytes < 1:
            raise BuildConfigError(f"--max-row-bytes must be positive, got {self.max_row_bytes}")
        self.columns  # noqa: B018 - validates --keep / --drop

    @classmethod
    def from_flags(cls, flags, sequence: SequenceConfig, layout: str = "sequences") -> "BuildConfig":
        """A build from a build program's parsed flags (an object with their attributes, argparse's names)."""
        keep = getattr(flags, "keep", None)
        return cls(
            inputs=flags.input, tokenizer=flags.tokenizer, output=flags.output, sequence=sequence,
            image_tokens=tuple(flags.image_tokens), ckpt=flags.ckpt, image_root=flags.image_root,
            trust_checkpoint=flags.trust_checkpoint, workers=flags.workers, batch_size=flags.batch_size,
            rows_per_shard=flags.rows_per_shard, keep=None if keep is None else tuple(keep), drop=tuple(flags.drop),
            max_row_bytes=flags.max_row_bytes, strict=flags.strict, resume=flags.resume, progress=not flags.no_progress,
            layout=layout,
        )

    @property
    def columns(self) -> ColumnFilter:
        keep = None if self.keep is None else tuple(self.keep)
        if self.layout == "preferences":
            return ColumnFilter(keep, tuple(self.drop), CONSUMED_COLUMNS, PREFERENCES.names)
        return ColumnFilter(keep, tuple(self.drop))

    @property
    def shard_layout(self) -> ShardLayout:
        if self.layout == "preferences":
            return PREFERENCES
        return SEQUENCES

    def builder(self, tokenizer, sequence: SequenceConfig, resolver, vocab):
        """The row builder of this build's layout: sequences, or preference pairs."""
        if self.layout == "preferences":
            return PreferenceBuilder(tokenizer, sequence, resolver, vocab)
        return SequenceBuilder(tokenizer, sequence, resolver, vocab)


class RowRejected(UserError):
    """Raised in strict mode for the first rejected row."""


# ---------------------------------------------------------------------------------------------
# One input file


@dataclass
class FileResult:
    """What one input file gave; merged into the manifest."""

    index: int
    path: str
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_written: int = 0
    rejected: Counter = field(default_factory=Counter)
    dropped_for_length: int = 0
    longest_dropped: int = 0  # tokens of the longest row dropped for length
    truncated: int = 0
    formats: Counter = field(default_factory=Counter)
    total_tokens: int = 0
    trained_tokens: int = 0
    min_length: int | None = None
    max_length: int | None = None
    codes_per_image: int | None = None

    def count(self, built) -> None:
        n = len(built)
        self.rows_written += 1
        self.truncated += built.truncated
        self.formats[built.format] += 1
        self.total_tokens += n
        self.trained_tokens += int((built.labels != -100).sum())
        self.min_length = n if self.min_length is None else min(self.min_length, n)
        self.max_length = n if self.max_length is None else max(self.max_length, n)


# State a forked worker inherits (set by build_dataset before the pool starts).
_STATE: dict = {}


def _process_file(index: int) -> FileResult:
    cfg: BuildConfig = _STATE["config"]
    path, work = _STATE["inputs"][index], _STATE["work"]
    stamp = _input_stamp(path)  # before reading: the content this build saw
    done, error_path = progress_paths(work, index)
    builder = cfg.builder(_STATE["tokenizer"], cfg.sequence, _STATE["resolver"], _STATE["vocab"])
    writer = ShardWriter(work, index, cfg.columns, cfg.rows_per_shard, layout=cfg.shard_layout)
    errors = ErrorLog(error_path)
    result = FileResult(index, str(path))
    try:
        for batch in iter_row_batches(path, cfg.batch_size, cfg.max_row_bytes):
            _process_batch(batch, builder, writer, errors, result, path, cfg.strict)
            with _STATE["progress"].get_lock():
                _STATE["progress"].value += len(batch)
        result.files = writer.close()
    finally:
        errors.close()
    result.codes_per_image = builder.codes_per_image
    fields = {**result.__dict__, "rejected": dict(result.rejected), "formats": dict(result.formats)}
    record = {"input": stamp, "settings": _STATE["fingerprint"], "result": fields}
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    tmp.replace(done)  # written last, whole: the file is complete
    return result


def _input_stamp(path: Path) -> dict:
    return {"path": str(path), "size": path.stat().st_size, "sha256": file_digest(path)}


def _finished(work: Path, index: int, path: Path, fingerprint: dict) -> FileResult | None:
    """The recorded result of an input file a previous run completed with the same content and settings."""
    done, _ = progress_paths(work, index)
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
        same_input = record["input"]["path"] == str(path) and record["input"]["size"] == path.stat().st_size
        if not (same_input and record["settings"] == fingerprint and record["input"]["sha256"] == file_digest(path)):
            logger.info("%s changed or settings differ since the last run: building it again", path)
            return None
        result = FileResult(**record["result"])
    except (ValueError, KeyError, TypeError):
        logger.warning("%s: unreadable progress record; building %s again", done, path)
        return None
    result.rejected, result.formats = Counter(result.rejected), Counter(result.formats)
    return result if all((work / name).is_file() for name in result.files) else None


def _process_batch(batch, builder, writer, errors, result, path, strict) -> None:
    numbers = [n for n, _ in batch]
    rows = [r for _, r in batch]
    parsed = [r for r in rows if isinstance(r, dict)]
    built_iter = iter(builder.build_batch(parsed))
    for number, row in zip(numbers, rows):
        built = next(built_iter) if isinstance(row, dict) else row  # a RowError for unreadable rows
        result.rows_read += 1
        if isinstance(built, RowError):
            _reject(built, number, row if isinstance(row, dict) else None, path, errors, result, strict)
        else:
            writer.add(built, row)
            result.count(built)


def _reject(err: RowError, number: int, row: dict | None, path, errors: ErrorLog, result: FileResult, strict: bool) -> None:
    errors.add(path, number, err, row)
    if isinstance(err, LengthDrop):
        result.dropped_for_length += 1
        result.longest_dropped = max(result.longest_dropped, err.length)
        return
    result.rejected[err.kind] += 1
    if strict:
        named = row_id(row)
        where = f" ({named[0]} {named[1]!r})" if named else ""
        raise RowRejected(f"{path} row {number}{where}: {err.reason} ({err.kind}; --strict stops at the first bad row)")


# ---------------------------------------------------------------------------------------------
# Fingerprints: what a finished input file's shards depend on


def _fingerprint(cfg: BuildConfig, vqgan) -> dict:
    """What must be unchanged for a finished input file to be kept by a resumed run."""
    return json.loads(json.dumps({
        "tokenizer_sha256": file_digest(tokenizer_file(cfg.tokenizer)),
        "sequence": asdict(cfg.sequence),
        "image_tokens": [image_token_fingerprint(f) for f in cfg.image_tokens],
        "vqgan": None if vqgan is None else {"codes_digest": vqgan.codes_digest(), "resolution": vqgan.resolution},
        "image_root": None if cfg.image_root is None else str(Path(cfg.image_root).resolve()),
        "rows_per_shard": cfg.rows_per_shard, "keep": cfg.keep, "drop": list(cfg.drop), "max_row_bytes": cfg.max_row_bytes,
        "layout": cfg.layout,
    }))


# ---------------------------------------------------------------------------------------------
# The whole build


def _setup(cfg: BuildConfig) -> dict:
    """Tokenizer, image-code table, VQGAN and the resolved sequence settings."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    table = load_code_table(cfg.image_tokens) if cfg.image_tokens else {}
    seq = cfg.sequence
    vqgan = None
    if cfg.ckpt:
        from ..vqgan import load_vqgan

        vqgan = load_vqgan(cfg.ckpt, trust_checkpoint=cfg.trust_checkpoint)
        if seq.codes_per_image is not None and seq.codes_per_image != vqgan.n_codes_per_image:
            raise BuildConfigError(f"--codes-per-image {seq.codes_per_image} but the VQGAN in --ckpt gives {vqgan.n_codes_per_image}")
        fixed = seq.image_layout == "fixed"  # the shaped layout takes every grid: no one count
        seq = SequenceConfig(**{**asdict(seq), "codes_per_image": vqgan.n_codes_per_image if fixed else None, "codebook_size": vqgan.n_embed})
    if seq.codes_per_image is None and table and seq.image_layout == "fixed":
        seq = SequenceConfig(**{**asdict(seq), "codes_per_image": table_code_count(table, cfg.image_tokens)})
    vocab = Vocabulary.from_tokenizer(tokenizer)
    volumes = load_volume_table(cfg.image_tokens) if cfg.image_tokens else {}
    return {"tokenizer": tokenizer, "vocab": vocab, "resolver": ImageCodeLookup(table, vqgan, cfg.image_root, volumes), "sequence": seq,
            "vqgan": vqgan}


def _run_files(cfg: BuildConfig, indices: list[int], total_rows: int | None) -> list[FileResult]:
    bar = tqdm(total=total_rows, unit="row", desc="build sequences", disable=not cfg.progress)
    progress = _STATE["progress"]
    try:
        if cfg.workers == 1 or len(indices) <= 1:
            results = []
            for i in indices:
                results.append(_process_file(i))
                bar.update(progress.value - bar.n)
            return results
        ctx = multiprocessing.get_context("fork")  # workers inherit the tokenizer and code table
        with ctx.Pool(min(cfg.workers, len(indices)), initializer=_worker_init) as pool:
            pending = pool.map_async(_process_file, indices, chunksize=1)
            while not pending.ready():
                pending.wait(0.5)
                bar.update(progress.value - bar.n)
            results = pending.get()
        bar.update(progress.value - bar.n)
        return results
    finally:
        bar.close()


def _worker_init() -> None:
    """One thread per worker process: the workers already fill the cores."""
    import torch

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


def _count_rows(paths) -> int | None:
    """Rows in parquet inputs (from metadata) for the progress bar; None when any input is JSONL."""
    import pyarrow.parquet as pq

    if any(p.suffix != ".parquet" for p in paths):
        return None
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def build_dataset(cfg: BuildConfig) -> dict:
    """Run a build; returns the manifest it wrote. The output is replaced only once the new one is complete."""
    inputs = find_inputs(cfg.inputs)
    folder = BuildFolder(cfg.output)
    folder.check([*inputs, *(Path(spec) for spec in cfg.inputs if Path(spec).is_dir())])
    state = _setup(cfg)
    cfg = replace(cfg, sequence=state["sequence"])
    try:
        return _build(cfg, inputs, folder, state)
    except OSError as err:  # a full disk or read-only file system: one line naming the output
        if not is_disk_refusal(err):
            raise
        kept = f"{folder.partial} is kept for --resume" if folder.partial.exists() else "nothing was written"
        raise write_refused(folder.path, err, kept) from None


def _build(cfg: BuildConfig, inputs: list[Path], folder: BuildFolder, state: dict) -> dict:
    fingerprint = _fingerprint(cfg, state["vqgan"])
    work = folder.start(cfg.resume)
    finished = _resume(work, inputs, fingerprint) if cfg.resume else {}
    todo = [i for i in range(len(inputs)) if i not in finished]
    for i in todo:
        clear_file_outputs(work, i)
    _STATE.update(state, config=cfg, inputs=inputs, work=work, fingerprint=fingerprint,
                  progress=multiprocessing.get_context("fork").Value("q", 0))
    if cfg.workers > 1 and len(todo) == 1:
        logger.warning("--workers %d but a single input file to build: parallelism is over input files", cfg.workers)
    try:
        results = _run_files(cfg, todo, _count_rows([inputs[i] for i in todo]))
    finally:
        _STATE.clear()
    results = sorted([*results, *finished.values()], key=lambda r: r.index)
    columns = _unify_columns(work, results, cfg.shard_layout)
    _merge_errors(work, len(inputs))
    manifest = _manifest(cfg, inputs, results, state["vocab"], columns, fingerprint)
    manifest["written"] = [name for name in folder.written() if name != "manifest.json"]
    write_manifest(work, manifest)
    folder.finish()
    return manifest


def _resume(work: Path, inputs: list[Path], fingerprint: dict) -> dict[int, FileResult]:
    """Results of the input files an earlier run finished with the same content and settings."""
    finished = {i: r for i, path in enumerate(inputs) if (r := _finished(work, i, path, fingerprint)) is not None}
    logger.info("resume: %d of %d input files already built", len(finished), len(inputs))
    return finished


def _unify_columns(work: Path, results: list[FileResult], layout: ShardLayout) -> dict:
    """One passthrough schema for every shard of the build (input files may disagree); returns it."""
    per_shard = [(name, shard_types(work / name, layout)) for r in results for name in r.files]
    merged: dict = {}
    for _, types in per_shard:
        for column, t in types.items():
            merged[column] = passthrough.merge_types(merged.get(column, pa.null()), t)
    for name, types in per_shard:
        conform_shard(work / name, merged, layout)
    return merged


def _merge_errors(work: Path, n_files: int) -> None:
    tmp = work / (ERRORS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as merged:
        for i in range(n_files):
            _, part = progress_paths(work, i)
            if part.is_file():
                merged.write(part.read_text(encoding="utf-8"))
    tmp.replace(work / ERRORS)


def _codes_per_image(results: list[FileResult], configured: int | None) -> int | None:
    seen = {r.codes_per_image for r in results if r.codes_per_image is not None}
    if len(seen) > 1:
        by_file = {r.path: r.codes_per_image for r in results if r.codes_per_image is not None}
        raise BuildConfigError(f"images have different code counts across input files {by_file}; pass --codes-per-image")
    return configured if configured is not None else next(iter(seen), None)


def _manifest(cfg: BuildConfig, inputs, results: list[FileResult], vocab: Vocabulary, columns: dict, fingerprint: dict) -> dict:
    rejected = sum((r.rejected for r in results), Counter())
    written = sum(r.rows_written for r in results)
    total = sum(r.total_tokens for r in results)
    lengths = [(r.min_length, r.max_length) for r in results if r.rows_written]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "layout": cfg.layout,
        "image_layout": cfg.sequence.image_layout,
        "tokenizer": str(cfg.tokenizer),
        "tokenizer_sha256": fingerprint["tokenizer_sha256"],
        "special_ids": vocab.special_ids(),
        "image_code_offset": vocab.offset,
        "codes_per_image": _codes_per_image(results, cfg.sequence.codes_per_image),
        "codebook_size": cfg.sequence.codebook_size,
        "volume_layout": VOLUME_LAYOUT,
        "counts": {
            "rows_read": sum(r.rows_read for r in results),
            "rows_written": written,
            "rejected": dict(sorted(rejected.items())),
            "rejected_total": sum(rejected.values()),
            "dropped_for_length": sum(r.dropped_for_length for r in results),
            "longest_dropped": max((r.longest_dropped for r in results), default=0),
            "truncated": sum(r.truncated for r in results),
            "by_format": dict(sorted(sum((r.formats for r in results), Counter()).items())),
        },
        "token_stats": {
            "total_tokens": total,
            "trained_tokens": sum(r.trained_tokens for r in results),
            "min_length": min((a for a, _ in lengths), default=None),
            "mean_length": round(total / written, 3) if written else None,
            "max_length": max((b for _, b in lengths), default=None),
        },
        "files": [name for r in results for name in r.files],
        "columns": {name: passthrough.type_name(t) for name, t in columns.items()},
        "inputs": [str(p) for p in inputs],
        "settings": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg.sequence).items()},
            "image_tokens": list(cfg.image_tokens),
            "ckpt": cfg.ckpt,
            "keep": cfg.keep,
            "drop": list(cfg.drop),
            "max_row_bytes": cfg.max_row_bytes,
        },
    }


def timed_build(cfg: BuildConfig) -> str:
    """Run a build; returns its summary (what the build programs print)."""
    start = time.perf_counter()
    manifest = build_dataset(cfg)
    return build_summary(manifest, cfg.output, time.perf_counter() - start)


def build_summary(manifest: dict, output: str, seconds: float) -> str:
    """What a finished build did, in a few lines (the build programs print it)."""
    counts, stats = manifest["counts"], manifest["token_stats"]
    limit = manifest["settings"]["max_length"]
    lines = [
        f"rows read {counts['rows_read']}, written {counts['rows_written']}, rejected {counts['rejected_total']}"
        f" {json.dumps(counts['rejected']) if counts['rejected'] else ''}",
        f"max length {limit or 'none'}: truncated {counts['truncated']} at the end of their answer text,"
        f" dropped for length {counts['dropped_for_length']}"
        + (f" (longest {counts['longest_dropped']} tokens; raise --max-length, 0 = no limit, to keep them)" if counts["dropped_for_length"] else ""),
        f"tokens {stats['total_tokens']} ({stats['trained_tokens']} with loss); length min {stats['min_length']}"
        f" mean {stats['mean_length']} max {stats['max_length']}; {len(manifest['files'])} shard(s) in {output}",
        f"{seconds:.1f} s, {counts['rows_read'] / max(seconds, 1e-9):.0f} rows/s",
    ]
    if counts["rejected_total"] or counts["dropped_for_length"]:
        lines.append(f"see {output}/{ERRORS} for the rows left out")
    return "\n".join(lines)
