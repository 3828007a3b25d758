"""Model folders written tensor by tensor, and checked without loading them.

:func:`write_safetensors_stream` writes a safetensors file whose header is known in advance (names,
shapes, dtypes), building and writing one tensor at a time: a conversion holds one converted tensor,
never the model. ``safetensors.torch.save_file`` needs every tensor of a file in memory at once (see
``bench/bench_convert.py`` for the peak-memory figures). :func:`release_pages` drops the pages of a
memory-mapped source tensor from the process once it is written, so reading a 14 GB checkpoint does
not leave 14 GB resident.

A model folder is the layout :mod:`medmax.model` describes (``config.json``, safetensors, ``tokenizer.json``,
``vqgan/``); :func:`check_model_folder` validates one from file headers and small tensors only.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import shutil
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import UserError, is_disk_refusal, write_refused
from .meta_layout import PlannedTensor
from .paths import output_target

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
_PARTIAL_MARK = ".medmax-partial"
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages; keeps their contents (unlike MADV_DONTNEED on anonymous memory)


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


_MADVISE = _madvise()


def release_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Ask the kernel to reclaim the pages behind these CPU tensors (a hint: contents stay valid, re-read on use).

    Meant for tensors of a memory-mapped checkpoint once they are converted; on other memory, or where
    ``MADV_PAGEOUT`` is unknown, it changes nothing.
    """
    if _MADVISE is None:
        return
    page = mmap.PAGESIZE
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        start = storage.data_ptr() // page * page
        end = storage.data_ptr() + storage.nbytes()
        _MADVISE(start, end - start, _MADV_PAGEOUT)  # a failed hint (old kernel) leaves memory as it was


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ``VmHWM``), or 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# safetensors, one tensor at a time


def _header(items: list[PlannedTensor]) -> bytes:
    doc: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        if item.dtype not in _ST_DTYPES:
            raise ValueError(f"{item.name}: dtype {item.dtype} has no safetensors code")
        doc[item.name] = {"dtype": _ST_DTYPES[item.dtype], "shape": list(item.shape),
                          "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data then starts 8-byte aligned, as safetensors writes it


def write_safetensors_stream(path: str | Path, items: list[PlannedTensor],
                             after_each: Callable[[PlannedTensor], None] | None = None) -> None:
    """Write ``items`` to a safetensors file, building each tensor only when its bytes are due.

    Tensors are laid out by element size, largest first, so every tensor's data is aligned to its dtype.
    A built tensor whose shape or dtype differs from its plan is an error (nothing is written past it).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this machine is big-endian")
    order = sorted(items, key=lambda t: -t.dtype.itemsize)  # stable: plan order within a dtype
    header = _header(order)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for item in order:
            value = item.build()
            if tuple(value.shape) != item.shape or value.dtype != item.dtype:
                raise ValueError(f"{item.name}: built {tuple(value.shape)} {value.dtype}, planned {item.shape} {item.dtype}")
            f.write(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del value
            if after_each is not None:
                after_each(item)


def shard_plan(items: list[PlannedTensor], max_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a file of its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups


def write_weights(folder: Path, items: list[PlannedTensor], max_bytes: int = DEFAULT_SHARD_BYTES,
                  progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + the index transformers reads.

    Each source tensor's pages are released once its converted tensor is written.
    """
    groups = shard_plan(items, max_bytes)
    names = [SAFE_WEIGHTS] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    done = [0]

    def after(item: PlannedTensor) -> None:
        release_pages(item.sources)
        done[0] += 1
        if progress is not None:
            progress(done[0], len(items))

    for name, group in zip(names, groups):
        write_safetensors_stream(folder / name, group, after)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in items)},
                 "weight_map": {t.name: name for name, group in zip(names, groups) for t in group}}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Output folders


@contextmanager
def fresh_output(output: str | Path) -> Iterator[Path]:
    """A folder to write into that becomes ``output`` only when the work completes.

    ``output`` must not exist or be empty: a conversion never mixes with, or deletes, earlier files.
    The work goes to ``<output>.partial`` (marked as ours); a failure removes it, and so does the next run
    when a killed run left it behind. A ``.partial`` folder without the mark is someone else's: refused.
    An ``output`` that is a symbolic link is written where the link points (see :func:`medmax.paths.output_target`).
    """
    output = output_target(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output}: already exists and is not empty; choose a new --output or remove it")
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        if not (partial / _PARTIAL_MARK).is_file():
            raise FileExistsError(f"{partial}: exists and was not written by this toolkit; move it away")
        logger.warning("%s: left by an interrupted run; starting again", partial)
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
        (partial / _PARTIAL_MARK).write_text("written by medmax; removed when complete\n")
        yield partial
        (partial / _PARTIAL_MARK).unlink()
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(partial, output)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if is_disk_refusal(err):
            raise write_refused(output, err) from None
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Reading a model folder's tensors without loading the model


@dataclass
class FolderTensors:
    """Where each tensor of a model folder's safetensors lives; ``get`` reads one."""

    folder: Path
    files: dict[str, Path]  # tensor name -> file

    @classmethod
    def open(cls, folder: str | Path) -> "FolderTensors":
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / SAFE_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / SAFE_WEIGHTS).is_file():
            with safe_open(str(folder / SAFE_WEIGHTS), framework="pt") as f:
                files = {name: folder / SAFE_WEIGHTS for name in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: no {SAFE_WEIGHTS} or {SAFE_INDEX}")
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{folder}: the index names missing weight files {missing[:3]}")
        return cls(folder, files)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{self.folder}: no tensor {name}")
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, safetensors dtype code), from the file headers."""
        out = {}
        for file in sorted(set(self.files.values())):
            with open(file, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            out.update({k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"})
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Checking a model folder


def load_complete_vqgan(path: str | Path, trust_checkpoint: bool = False):
    """A VQGAN with its decoder (a model folder without one could not draw images)."""
    from .vqgan import load_vqgan

    vqgan = load_vqgan(path, trust_checkpoint=trust_checkpoint)
    if vqgan.decoder is None:
        raise UserError(f"{path}: the VQGAN has no decoder; a model folder with it could not draw images")
    return vqgan


# config.json's sizes: positive integers (checked before transformers builds anything from them)
_CONFIG_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size")


def _config(folder: Path):
    from transformers import ChameleonConfig

    path = folder / "config.json"
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: not valid UTF-8 JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("model_type") != "chameleon":
        found = doc.get("model_type") if isinstance(doc, dict) else type(doc).__name__
        raise UserError(f"{path}: model_type {found!r}, expected 'chameleon'")
    for key in _CONFIG_SIZES:
        value = doc.get(key)
        if key in doc and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**53):
            raise UserError(f"{path}: {key} is {json.dumps(value)}; it must be a positive integer")
    try:
        return ChameleonConfig.from_pretrained(folder)
    except (TypeError, ValueError) as err:  # transformers' own field validation
        raise UserError(f"{path}: {' '.join(str(err).split())}") from None


def _check_layer_count(folder: Path, config, stored: dict) -> None:
    """config.json's num_hidden_layers against the layers the weights hold, before a model is built from it."""
    held = {int(k.split(".")[2]) for k in stored if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    count = max(held) + 1 if held else 0
    if count != config.num_hidden_layers:
        raise UserError(f"{folder}/config.json: num_hidden_layers {config.num_hidden_layers}, but the weights hold "
                        f"{count} layers")


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from .model import MedMaxChameleon

    with torch.device("meta"):
        model = MedMaxChameleon(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# safetensors' dtype codes of floating-point tensors (and its 8-bit float formats)
_FLOAT_CODES = {code for dtype, code in _ST_DTYPES.items() if dtype.is_floating_point} | {"F8_E4M3", "F8_E5M2"}


def check_weights(folder: str | Path):
    """``folder``'s config.json against its safetensors, from their headers, before any model is built from it.

    The config's sizes are positive integers, its layer count is the weights', the tensors are exactly (names and
    shapes) those the config implies, and floating point. Returns (config, :class:`FolderTensors`, stored shapes).
    """
    folder = Path(folder)
    config = _config(folder)
    tensors = FolderTensors.open(folder)
    stored = tensors.shapes()
    _check_layer_count(folder, config, stored)
    expected = _expected_shapes(config)
    missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    if missing or extra:
        raise UserError(f"{folder}: weights do not match config.json (missing {missing[:4]}, unexpected {extra[:4]})")
    wrong = [k for k in expected if stored[k][0] != expected[k]]
    if wrong:
        raise UserError(f"{folder}: {wrong[0]} has shape {stored[wrong[0]][0]}, config.json implies {expected[wrong[0]]}")
    integral = [k for k in expected if stored[k][1] not in _FLOAT_CODES]
    if integral:
        code = stored[integral[0]][1]
        name = next((str(d).removeprefix("torch.") for d, c in _ST_DTYPES.items() if c == code), code)
        raise UserError(f"{folder}: {integral[0]} is {name} ({len(integral)} tensor(s) are not "
                        "floating point); a model's weights are floating point")
    return config, tensors, stored


def check_model_folder(folder: str | Path, trust_checkpoint: bool = False) -> dict:
    """Validate a model folder without loading its weights; returns a summary, raises naming the first fault.

    Checks: config.json is Chameleon's; the tokenizer fits the vocabulary and agrees with ``vocabulary_map``;
    the safetensors hold exactly the tensors (names and shapes) the config implies; ``vqgan/`` has a
    decoder and its encoder is the model's ``model.vqmodel``.
    """
    from .vocab import Vocabulary, load_tokenizer

    folder = Path(folder)
    for name in ("config.json", "tokenizer.json", "vqgan"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder}: not a model folder (no {name})")
    config, tensors, stored = check_weights(folder)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    vocab = Vocabulary.from_tokenizer(tokenizer)
    if vocab.size > config.vocab_size:
        raise UserError(f"{folder}: tokenizer.json has {vocab.size} ids, config.json vocab_size {config.vocab_size}")
    if config.vocabulary_map and config.vocabulary_map != tokenizer.get_vocab(with_added_tokens=True):
        raise UserError(f"{folder}: config.json's vocabulary_map differs from tokenizer.json")
    vqgan = load_complete_vqgan(folder / "vqgan", trust_checkpoint=trust_checkpoint)
    for key, value in vqgan.state_dict().items():
        if not key.startswith("decoder.") and not torch.equal(tensors.get(f"model.vqmodel.{key}").float(), value.float()):
            raise UserError(f"{folder}: model.vqmodel.{key} differs from vqgan/; they come from different VQGANs")
    dtypes = sorted({code for _, code in stored.values()})
    return {"tensors": len(stored), "dtypes": dtypes, "vocab_size": config.vocab_size, "tokenizer_ids": vocab.size,
            "image_placeholder": vocab.image_placeholder_id, "layers": config.num_hidden_layers}
