"""Loading a VQGAN: errors that say what is wrong with a file, a size check before allocating, a content digest."""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from medmax.memory import MemoryBudgetError
from medmax.presets import VQGAN_PRESETS
from medmax.torch_files import CheckpointError, load_torch_file
from medmax.vqgan import VQGAN, UntrustedCheckpointError, estimate_vqgan_parameters, load_vqgan, save_vqgan


class _Touch:
    """Unpickling this creates a folder: the proof that a loader ran code from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _ckpt_dir(tmp_path: Path, params: dict, name: str = "ckpt") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}}))
    return folder


def _broken_files(tmp_path: Path, state: dict) -> dict[str, bytes]:
    torch.save({"state_dict": state}, tmp_path / "good.ckpt")
    torch.save({"state_dict": state}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    good, legacy = (tmp_path / "good.ckpt").read_bytes(), (tmp_path / "legacy.ckpt").read_bytes()
    return {
        "truncated zip": good[: len(good) // 2],
        "truncated legacy": legacy[: len(legacy) // 3],
        "garbage": b"this is not a checkpoint at all " * 20,
        "empty": b"",
        "plain pickle": pickle.dumps({"state_dict": {}}),
        "zip without data.pkl": _zip({"archive/other.txt": b"hello"}),
    }


def _zip(members: dict[str, bytes]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


EXPECTED = {
    "truncated zip": "truncated or corrupt",
    "truncated legacy": "truncated or corrupt",
    "garbage": "not a PyTorch checkpoint (neither a zip archive nor a pickle)",
    "empty": "the file is empty",
    "plain pickle": "not a PyTorch checkpoint",
    "zip without data.pkl": "no data.pkl",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_broken_checkpoint_is_reported_as_broken_not_as_untrusted(kind, tiny_vqgan, tmp_path):
    """Issue 11: a corrupt or truncated .ckpt was reported as "pass --trust-checkpoint"."""
    folder = _ckpt_dir(tmp_path, tiny_vqgan.params)
    (folder / "vqgan.ckpt").write_bytes(_broken_files(tmp_path, tiny_vqgan.state_dict())[kind])
    for trust in (False, True):  # trusting a broken file does not help, and is not suggested
        with pytest.raises(CheckpointError) as info:
            load_vqgan(folder, trust_checkpoint=trust)
        message = str(info.value)
        assert str(folder / "vqgan.ckpt") in message and EXPECTED[kind] in message, message
        assert "trust" not in message and not isinstance(info.value, UntrustedCheckpointError)


def test_only_a_complete_pickle_asking_for_other_globals_needs_trust(tiny_vqgan, tmp_path):
    folder = _ckpt_dir(tmp_path, tiny_vqgan.params)
    torch.save({"state_dict": tiny_vqgan.state_dict(), "args": argparse.Namespace(lr=1)}, folder / "vqgan.ckpt")
    with pytest.raises(UntrustedCheckpointError, match=r"vqgan\.ckpt: needs --trust-checkpoint: its pickle asks for argparse\.Namespace"):
        load_vqgan(folder)
    loaded = load_vqgan(folder, trust_checkpoint=True)
    assert torch.equal(loaded.quantize.embedding.weight, tiny_vqgan.quantize.embedding.weight)
    torch.save({"state_dict": tiny_vqgan.state_dict(), "args": argparse.Namespace(lr=1)}, folder / "vqgan.ckpt",
               _use_new_zipfile_serialization=False)  # the legacy format too
    with pytest.raises(UntrustedCheckpointError, match="argparse.Namespace"):
        load_vqgan(folder)


def test_nothing_in_an_untrusted_or_broken_file_is_run(tmp_path):
    """The inspection reads opcodes (pickletools); it never unpickles. A pickle that would create a file is proof."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Touch(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match=r"asks for posix\.mkdir"):
        load_torch_file(path)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:  # drop the storage records: the pickle is complete, the archive is not a checkpoint
        members = {n: zf.read(n) for n in zf.namelist() if n.endswith(("data.pkl", "version", "byteorder"))}
    for broken in (data[:-30], _zip(members), pickle.dumps(_Touch(marker))):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError):
            load_torch_file(path)
    assert not marker.exists()


def test_safetensors_and_yaml_problems_name_the_file(tiny_vqgan, tmp_path):
    folder = _ckpt_dir(tmp_path, tiny_vqgan.params)
    (folder / "vqgan.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError, match=r"vqgan\.safetensors: not a readable safetensors file"):
        load_vqgan(folder)
    (folder / "vqgan.yaml").write_text("model: {params: [unclosed")
    with pytest.raises(ValueError, match=r"vqgan\.yaml: not valid YAML"):
        load_vqgan(folder)
    wrong = copy.deepcopy(tiny_vqgan.params)
    wrong["ddconfig"]["ch"] = 64  # weights of another size
    other = save_vqgan(tiny_vqgan, tmp_path / "other")
    (other / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": wrong}}))
    with pytest.raises(CheckpointError, match=r"vqgan\.safetensors: weights do not fit .*vqgan\.yaml"):
        load_vqgan(other)


def test_absurd_sizes_are_refused_before_any_allocation(tiny_vqgan, tmp_path):
    """Issue 12: a VQGAN n_embed of 10^9 tried a huge allocation; now the estimate is checked first."""
    huge = copy.deepcopy(VQGAN_PRESETS["chameleon"])
    huge["n_embed"] = 10**9  # a 256 x 10^9 codebook: about 954 GiB of fp32
    folder = _ckpt_dir(tmp_path, huge)
    save_vqgan(tiny_vqgan, tmp_path / "weights")
    (folder / "vqgan.safetensors").write_bytes((tmp_path / "weights" / "vqgan.safetensors").read_bytes())
    with pytest.raises(MemoryBudgetError, match=r"vqgan\.yaml: a VQGAN of 256,0\d\d,\d{3},\d{3} parameters needs about .* GiB.*--skip-memory-check"):
        load_vqgan(folder)
    with pytest.raises(MemoryBudgetError):
        VQGAN.from_params(huge)
    bad = copy.deepcopy(VQGAN_PRESETS["tiny"])
    bad["ddconfig"]["ch"] = 20  # GroupNorm needs multiples of 32
    with pytest.raises(ValueError, match=r"ddconfig\.ch .*multiple of 32"):
        VQGAN.from_params(bad)
    bad["ddconfig"].update(ch=32, num_res_blocks=0)
    with pytest.raises(ValueError, match=r"ddconfig\.num_res_blocks must be a positive integer, got 0"):
        VQGAN.from_params(bad)


@pytest.mark.parametrize("variant", ["tiny", "attention and double z"])
def test_parameter_estimate_is_exact(variant):
    params = copy.deepcopy(VQGAN_PRESETS["tiny"])
    if variant != "tiny":
        params["ddconfig"].update(double_z=True, attn_resolutions=[16, 8], ch_mult=[1, 2, 2, 4], num_res_blocks=2, in_channels=1, out_ch=1)
    for with_decoder in (True, False):
        model = VQGAN.from_params(params, with_decoder=with_decoder)
        assert estimate_vqgan_parameters(params, with_decoder) == sum(p.numel() for p in model.parameters())


def test_codes_digest_follows_the_encoder_weights_not_the_file(tiny_vqgan, tmp_path):
    a = save_vqgan(tiny_vqgan, tmp_path / "a")
    b = _ckpt_dir(tmp_path, tiny_vqgan.params, "b")  # the same weights as a .ckpt elsewhere
    torch.save({"state_dict": tiny_vqgan.state_dict()}, b / "vqgan.ckpt")
    digest = load_vqgan(a).codes_digest()
    assert digest == load_vqgan(b).codes_digest() == tiny_vqgan.codes_digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    other = load_vqgan(a)
    with torch.no_grad():
        other.decoder.conv_out.weight.add_(1)  # decoder-only changes keep every code
    assert other.codes_digest() == digest
    with torch.no_grad():
        other.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert other.codes_digest() != digest
