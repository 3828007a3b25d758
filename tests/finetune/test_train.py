"""Smoke-train the tiny model through finetune.train.main: what must change, what must not, resume and export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import ChameleonForConditionalGeneration

from finetune.demo_data import demo_rows
from finetune.export import main as export_main
from finetune.modes import image_alignment_ids
from finetune.train import main as train_main
from medmax.model import new_model
from medmax.presets import VQGAN_PRESETS
from medmax.data.shards import write_sequences
from medmax.vqgan import VQGAN, load_vqgan

CONFIG = str(Path(__file__).parents[2] / "finetune" / "configs" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def data_dir(tiny_tokenizer, tiny_vocab, tmp_path_factory):
    return write_sequences(tmp_path_factory.mktemp("seq"), demo_rows(tiny_tokenizer, 48, n_codes=32),
                           tiny_vocab.special_ids())


def _train(out: Path, data: Path, *overrides: str, resume: bool = False) -> Path:
    small = ["max_length=128", "per_device_train_batch_size=2", "max_steps=4", "save_steps=2", "eval_steps=2",
             "logging_steps=2"]  # a smaller run than the shipped config, for test time
    argv = ["--config", CONFIG, f"datasets=[{data}]", f"output_dir={out}", "report_to=none",
            "disable_tqdm=true", *small, *overrides]
    train_main.__wrapped__(argv + (["--resume"] if resume else []))  # errors raise (no medmax.cli error line)
    return out


def _initial_model(tiny_tokenizer, seed: int = 0):
    """The weights finetune.train starts from with model/vqgan preset:tiny and this seed."""
    torch.manual_seed(seed)
    vqgan = VQGAN.from_params(VQGAN_PRESETS["tiny"])
    return new_model("tiny", tiny_tokenizer, vqgan, seed=seed).state_dict()


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]


def test_full_run_logs_curves_and_exports_a_standard_model(tmp_path, data_dir, tiny_tokenizer):
    out = _train(tmp_path / "run", data_dir, "report_to=tensorboard", r"freeze=[layers\.0\.mlp\.]")
    history = _history(out)
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 2 and all(h["tokens_per_s"] > 0 for h in history if "loss" in h)
    assert any("eval_loss" in h for h in history)  # validation: 0.1 of the training folder
    assert (out / "loss_curve.png").stat().st_size > 0 and list(out.glob("runs/*/events.out.tfevents*"))
    final = load_file(out / "model.safetensors")
    start = _initial_model(tiny_tokenizer)
    assert not torch.equal(final["lm_head.weight"], start["lm_head.weight"])
    frozen = [k for k in start if k.startswith(("model.vqmodel.", "model.layers.0.mlp."))]
    assert len(frozen) > 3 and all(torch.equal(final[k], start[k]) for k in frozen)  # freeze pattern + vqmodel
    assert not torch.equal(final["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])

    export_main(["--checkpoint", str(out / "checkpoint-2"), "--output", str(tmp_path / "model")])
    model = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "model")
    ckpt = load_file(out / "checkpoint-2" / "model.safetensors")
    assert torch.equal(model.lm_head.weight, ckpt["lm_head.weight"])
    assert load_vqgan(tmp_path / "model" / "vqgan").decoder is not None
    assert (tmp_path / "model" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def whole_run(data_dir, tmp_path_factory):
    """4 steps without interruption: checkpoint-2 and checkpoint-4."""
    return _train(tmp_path_factory.mktemp("whole") / "run", data_dir, "validation=null")


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, data_dir, whole_run, caplog):
    whole = whole_run
    # an interruption right after the step-2 save, and a kill while checkpoint-4 was being written
    shutil.copytree(whole / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    (tmp_path / "cut" / "checkpoint-4").mkdir()
    shutil.copy(whole / "checkpoint-4" / "config.json", tmp_path / "cut" / "checkpoint-4")
    resumed = _train(tmp_path / "cut", data_dir, "validation=null", resume=True)
    assert "checkpoint-4 is incomplete" in caplog.text and f"resuming from {tmp_path / 'cut' / 'checkpoint-2'}" in caplog.text
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    assert [h["loss"] for h in _history(resumed) if "loss" in h][-1] == [h["loss"] for h in _history(whole) if "loss" in h][-1]


def test_resume_refuses_another_dataset_tokenizer_or_mode(tmp_path, data_dir, whole_run, tiny_tokenizer, tiny_vocab,
                                                         caplog):
    from tokenizers import AddedToken

    from finetune.config import ConfigError

    out = tmp_path / "run"
    shutil.copytree(whole_run / "checkpoint-2", out / "checkpoint-2")
    other = write_sequences(tmp_path / "other", demo_rows(tiny_tokenizer, 48, n_codes=32, seed=1), tiny_vocab.special_ids())
    tokenizer = Tokenizer.from_str(tiny_tokenizer.to_str())
    tokenizer.add_tokens([AddedToken("lesion-free", normalized=False)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for overrides, named in (([], "datasets[0]"), (["mode=lora"], "mode=full (this run: lora)"),
                             ([f"tokenizer={tmp_path / 'tokenizer.json'}"], "tokenizer")):
        with pytest.raises(ConfigError, match=re.escape(named) + ".*--resume-anyway"):
            _train(out, other if not overrides else data_dir, "validation=null", *overrides, resume=True)
    moved = shutil.copytree(data_dir, tmp_path / "moved")  # the same content elsewhere is the same data
    _train(out, moved, "validation=null", "max_steps=2", resume=True)
    train_main(["--config", CONFIG, f"datasets=[{other}]", f"output_dir={out}", "report_to=none", "validation=null",
                "max_steps=2", "disable_tqdm=true", "--resume-anyway"])
    assert "continuing anyway" in caplog.text


def test_lora_trains_adapters_only_and_export_merges_them(tmp_path, data_dir, tiny_tokenizer):
    out = _train(tmp_path / "lora", data_dir, "mode=lora", "lora_r=4", "lora_alpha=8", "learning_rate=0.01",
                 "validation=null")
    start = _initial_model(tiny_tokenizer)
    base = load_file(out / "base_model" / "model.safetensors")
    assert all(torch.equal(base[k], start[k]) for k in start)  # the saved base is the untouched start
    adapters = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapters.items())  # B starts at zero

    export_main(["--checkpoint", str(out), "--output", str(tmp_path / "merged")])
    merged = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "merged").state_dict()
    changed = {k for k in start if not torch.equal(merged[k], start[k])}
    assert changed and all(k.split(".")[-2].endswith("_proj") for k in changed)
    assert any(".q_proj." in k for k in changed) and any(".down_proj." in k for k in changed)
    # the merge used the adapter's own rank and alpha: W = W0 + B @ A * alpha / r
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    prefix, key = "base_model.model.model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj.weight"
    delta = adapters[f"{prefix}.lora_B.weight"] @ adapters[f"{prefix}.lora_A.weight"] * 8 / 4
    torch.testing.assert_close(merged[key], start[key] + delta, atol=1e-6, rtol=1e-5)


def test_image_alignment_trains_only_image_rows(tmp_path, data_dir, tiny_tokenizer, tiny_vocab):
    out = _train(tmp_path / "align", data_dir, "mode=image-alignment", "weight_decay=0.1", "learning_rate=0.01",
                 "validation=null")
    start, final = _initial_model(tiny_tokenizer), load_file(out / "model.safetensors")
    rows = image_alignment_ids(tiny_vocab)
    others = torch.ones(tiny_vocab.size, dtype=torch.bool)
    others[rows] = False
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(final[key][others], start[key][others]), key  # bit-identical, weight decay or not
        assert not torch.equal(final[key][rows], start[key][rows]), key
    for key in start:
        if key not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(final[key], start[key]), key


def test_loss_on_image_code_targets_is_finite_and_falls(tmp_path, tiny_vocab):
    """Generation data: the loss sits on image codes (transformers' own class would make it infinite)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(32):
        codes = tiny_vocab.codes_to_ids(torch.randint(0, 8, (40,), generator=gen)).tolist()  # a few codes recur
        ids = [tiny_vocab.bos_id, tiny_vocab.boi_id, *codes, tiny_vocab.eoi_id, tiny_vocab.eos_id]
        rows.append((ids, [-100, -100, *codes, -100, -100]))
    data = write_sequences(tmp_path / "img", rows, tiny_vocab.special_ids())
    out = _train(tmp_path / "run", data, "validation=null", "max_steps=8", "learning_rate=0.01",
                 "logging_steps=1", "save_strategy=no")
    losses = [h["loss"] for h in _history(out) if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5
