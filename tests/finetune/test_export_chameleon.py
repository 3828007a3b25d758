"""finetune.export --format chameleon: any model back to Meta's original layout, round trips bit for bit.

Fixtures in the release layout come from ``tests/meta_release.py`` (its docstring names the sources).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from finetune.convert import main as convert_main
from finetune.export import main as export_main
from medmax.training_run import write_run_info
from medmax.model import MedMaxChameleon
from medmax.vqgan import read_vqgan_yaml
from tests.meta_release import meta_forward, write_release

TEXT_IDS = torch.tensor([8712, 8800, 9001, 8750, 9100, 8999, 8713, 9200, 8760, 9050])


def _shard_names(n: int) -> list[str]:
    return ["consolidated.pth"] if n == 1 else [f"consolidated.{i:02d}.pth" for i in range(n)]


def _load_release(root: Path, size: str = "7b") -> tuple[list[dict], dict]:
    model_dir = root / "models" / size
    files = sorted(model_dir.glob("consolidated*.pth"))
    return [torch.load(f, weights_only=True) for f in files], json.loads((model_dir / "params.json").read_text())


def _round_trip(tmp_path, tokenizer, vqgan, medmax=True, **release):
    root, state = write_release(tmp_path / "ckpt", tokenizer, vqgan, medmax=medmax, **release)
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "model")]) == 0
    assert export_main(["--checkpoint", str(tmp_path / "model"), "--output", str(tmp_path / "back"),
                        "--format", "chameleon"]) == 0
    return root, state, tmp_path / "back"


@pytest.mark.parametrize("shards", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_original_to_model_folder_and_back_is_bit_identical(tmp_path, tiny_tokenizer, tiny_vqgan, shards, dtype):
    root, state, back = _round_trip(tmp_path, tiny_tokenizer, tiny_vqgan, shards=shards, dtype=dtype, swin_norm=True)
    for name, original in zip(_shard_names(shards), state):
        again = torch.load(back / "models" / "7b" / name, weights_only=True)
        assert again.keys() == original.keys(), name
        for key, value in original.items():
            assert again[key].dtype == value.dtype and torch.equal(again[key], value), f"{name}: {key}"
    for name in ("params.json", "consolidate_params.json"):
        assert json.loads((back / "models/7b" / name).read_text()) == json.loads((root / "models/7b" / name).read_text())
    for name in ("text_tokenizer.json", "text_tokenizer_modified.json"):
        assert json.loads((back / "tokenizer" / name).read_text()) == \
            json.loads((root / "tokenizer" / name).read_text()), name
    vq = torch.load(back / "tokenizer" / "vqgan.ckpt", weights_only=True)["state_dict"]  # plain tensors
    assert vq.keys() == tiny_vqgan.state_dict().keys()  # taming names; the discriminator leftovers are not carried
    for key, value in tiny_vqgan.state_dict().items():
        assert torch.equal(vq[key], value), key
    assert read_vqgan_yaml(back / "tokenizer" / "vqgan.yaml") == tiny_vqgan.params
    assert yaml.safe_load((back / "tokenizer" / "vqgan.yaml").read_text())["model"]["target"] == \
        "taming.models.vqgan.VQModel"


def test_a_chameleon_tokenizer_comes_back_alone(tmp_path, tiny_tokenizer, tiny_vqgan):
    root, _, back = _round_trip(tmp_path, tiny_tokenizer, tiny_vqgan, medmax=False)
    assert sorted(p.name for p in (back / "tokenizer").glob("*.json")) == ["text_tokenizer.json"]
    assert json.loads((back / "tokenizer/text_tokenizer.json").read_text()) == \
        json.loads((root / "tokenizer/text_tokenizer.json").read_text())


def test_a_model_folder_exports_to_the_logits_of_the_meta_forward(tmp_path, tiny_model_dir):
    """The other direction on its own: a model folder made in transformers' layout, read by Meta's forward."""
    assert export_main(["--checkpoint", str(tiny_model_dir), "--output", str(tmp_path / "meta"),
                        "--format", "chameleon"]) == 0
    shards, params = _load_release(tmp_path / "meta")
    model = MedMaxChameleon.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=TEXT_IDS[None]).logits[0].double()
    torch.testing.assert_close(meta_forward(shards, params, TEXT_IDS), expected, atol=2e-5, rtol=1e-5)
    assert (tmp_path / "meta/models/7b/consolidate_params.json").is_file()  # Meta's loader opens it unconditionally
    assert shards[0]["rope.freqs"].shape == (4,)  # Meta's loader expects exactly this one unexpected key


def test_merged_lora_is_exported(tmp_path, tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = MedMaxChameleon.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(3)
    lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    checkpoint = tmp_path / "run" / "checkpoint-5"
    lora.save_pretrained(checkpoint)
    write_run_info(checkpoint, {"mode": "lora", "base_model": str(tiny_model_dir), "vqgan": str(tiny_model_dir / "vqgan"),
                                "tokenizer": "tokenizer.json"}, tiny_tokenizer)
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "meta"), "--format", "chameleon"]) == 0
    merged = lora.merge_and_unload().eval()
    with torch.no_grad():
        expected = merged(input_ids=TEXT_IDS[None]).logits[0].double()
        plain = MedMaxChameleon.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=TEXT_IDS[None]).logits[0]
    assert (expected - plain.double()).abs().max() > 1e-3  # the adapters change the model
    shards, params = _load_release(tmp_path / "meta")
    torch.testing.assert_close(meta_forward(shards, params, TEXT_IDS), expected, atol=2e-5, rtol=1e-5)


def test_per_head_norms_need_as_many_shards_as_hold_them(tmp_path, tiny_tokenizer, tiny_vqgan, capsys):
    """Fine-tuning moves every head's query norm its own way; one shard cannot hold that, four can."""
    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    convert_main(["--input", str(root), "--output", str(tmp_path / "model")])
    model = MedMaxChameleon.from_pretrained(tmp_path / "model", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_norm.weight.add_(torch.arange(4.0)[:, None] * 0.01)
    model.save_pretrained(tmp_path / "tuned")
    for name in ("tokenizer.json", "vqgan"):
        (tmp_path / "tuned" / name).symlink_to(tmp_path / "model" / name)
    assert export_main(["--checkpoint", str(tmp_path / "tuned"), "--output", str(tmp_path / "one"),
                        "--format", "chameleon"]) == 2
    assert "--shards 4 would hold it exactly" in capsys.readouterr().err and not (tmp_path / "one").exists()
    assert export_main(["--checkpoint", str(tmp_path / "tuned"), "--output", str(tmp_path / "four"),
                        "--format", "chameleon", "--shards", "4"]) == 0
    shards, params = _load_release(tmp_path / "four")
    with torch.no_grad():
        expected = model.eval()(input_ids=TEXT_IDS[None]).logits[0].double()
    torch.testing.assert_close(meta_forward(shards, params, TEXT_IDS), expected, atol=2e-5, rtol=1e-5)


def test_an_output_that_is_a_symlink_to_an_empty_folder_receives_the_release(tmp_path, tiny_tokenizer, tiny_vqgan):
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "model")]) == 0
    (tmp_path / "disk" / "release").mkdir(parents=True)
    (tmp_path / "back").symlink_to(tmp_path / "disk" / "release", target_is_directory=True)
    assert export_main(["--checkpoint", str(tmp_path / "model"), "--output", str(tmp_path / "back"),
                        "--format", "chameleon"]) == 0
    shards, _ = _load_release(tmp_path / "disk" / "release")
    assert all(torch.equal(shards[0][k], v) for k, v in state[0].items())
    assert not [p for p in (*tmp_path.iterdir(), *(tmp_path / "disk").iterdir()) if p.name.endswith(".partial")]


@pytest.mark.parametrize("size", ["../../x", "..", "a/b", "/abs", "", ".hidden"])
def test_a_model_size_is_one_plain_folder_name(tmp_path, tiny_model_dir, capsys, size):
    """--model-size ../../x once wrote the weights two folders above --output."""
    out = tmp_path / "a" / "b" / "out"
    out.parent.mkdir(parents=True)
    assert export_main(["--checkpoint", str(tiny_model_dir), "--output", str(out), "--format", "chameleon",
                        "--model-size", size]) == 2
    err = capsys.readouterr().err
    assert "--model-size" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), so that writes fail as they do on a full disk; skipped without mount rights."""
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("fault", ["full disk", "read-only file system"])
def test_a_full_or_read_only_disk_is_one_line_naming_the_output(tmp_path, tiny_model_dir, small_disk, capsys, fault):
    """torch.save's own writer turned a full disk into RuntimeError: unexpected pos, with a traceback."""
    import subprocess

    if fault == "read-only file system":
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "release"
    assert export_main(["--checkpoint", str(tiny_model_dir), "--output", str(out), "--format", "chameleon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err, err
    assert ("No space left on device" if fault == "full disk" else "Read-only file system") in err
    assert list(small_disk.iterdir()) == []
