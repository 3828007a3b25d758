"""Every shipped config parses; bad settings and bad data stop before training with an error naming them."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from finetune.config import ConfigError, load_config, parse_overrides, parse_yaml
from finetune.demo_data import demo_rows
from finetune.modes import NothingToTrainError
from finetune.train import main as train_main
from medmax.data.shards import DataError
from medmax.data.shards import write_sequences

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "finetune" / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"tiny_cpu.yaml", "quickstart.yaml", "lora_7b.yaml", "full_7b_zero3.yaml", "dpo_7b.yaml", "dpo_cpu.yaml", "grpo_7b.yaml", "grpo_tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_opens_with_its_command(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name their DeepSpeed / FSDP files relative to the repository
    first = path.read_text().splitlines()[0]
    assert re.match(r"# (python -m finetune\.|finetune/launch\.sh )", first), first
    assert str(path.relative_to(ROOT)) in first
    raw = parse_yaml(path.read_text())
    extra = {"use_cpu": True}  # GPU configs (bf16) parse on a CPU-only machine too
    if raw.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        extra["deepspeed"] = None  # TrainingArguments imports deepspeed to read it; the JSON is checked below
    cfg = load_config(path, **extra)
    assert cfg.mode in ("full", "lora", "image-alignment", "dpo", "grpo") and cfg.datasets
    if cfg.mode == "dpo":  # its loss settings build, and the weights it trains are named
        assert cfg.dpo_loss().beta > 0 and cfg.weights_mode in ("lora", "full")
    if cfg.mode == "grpo":  # its loss, sampling and rewards build
        assert cfg.grpo_loss().epsilon > 0 and cfg.generation_config().mode == "image" and cfg.reward_functions()
    for key in ("deepspeed", "fsdp_config"):
        if isinstance(raw.get(key), str):
            assert isinstance(json.loads((ROOT / raw[key]).read_text()), dict)


def test_fsdp_config_is_valid_json():
    """The DeepSpeed JSONs are read by DeepSpeed's own parser in tests/finetune/test_sharded.py."""
    assert json.loads((ROOT / "finetune" / "configs" / "fsdp_7b.json").read_text())["version"] == 2


def test_overrides_parse_as_yaml_with_only_true_false_booleans():
    assert parse_overrides(["save_strategy=no", "packing=false", "learning_rate=1e-3", "freeze=[lm_head]"]) == {
        "save_strategy": "no", "packing": False, "learning_rate": 1e-3, "freeze": ["lm_head"]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])


def test_launch_script_builds_the_torchrun_command():
    out = subprocess.run([str(ROOT / "finetune" / "launch.sh"), str(CONFIGS[0]), "--nproc-per-node", "3",
                          "--rdzv-endpoint", "host:1234", "max_steps=2", "--dry-run"],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", "NNODES": "2"}).stdout
    assert "torch.distributed.run --nproc-per-node 3 --nnodes 2" in out
    assert "--rdzv-endpoint host:1234" in out and "-m finetune.train --config" in out and "max_steps=2" in out


@pytest.fixture(scope="module")
def good_data(tiny_tokenizer, tiny_vocab, tmp_path_factory):
    return write_sequences(tmp_path_factory.mktemp("good"), demo_rows(tiny_tokenizer, 8, n_codes=16),
                           tiny_vocab.special_ids())


def _run(tmp_path, data, *overrides):
    # main's body without medmax.cli's one error line, so that each test sees which error class was raised
    train_main.__wrapped__(["--config", str(ROOT / "finetune" / "configs" / "tiny_cpu.yaml"), f"datasets=[{data}]",
                f"output_dir={tmp_path / 'out'}", "report_to=none", *overrides])


def _bad_rows(tiny_tokenizer, tiny_vocab, tmp_path, edit):
    rows = demo_rows(tiny_tokenizer, 8, n_codes=16)
    special = dict(tiny_vocab.special_ids())
    rows, special = edit(rows, special)
    return write_sequences(tmp_path / "bad", rows, special)


def test_folder_without_manifest_is_named(tmp_path, good_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty/manifest\.json"):
        _run(tmp_path, empty)


def test_too_long_without_packing_names_max_length(tmp_path, good_data):
    with pytest.raises(DataError, match="longer than max_length=20"):
        _run(tmp_path, good_data, "packing=false", "max_length=20")


def test_ids_outside_the_vocabulary_are_named(tmp_path, tiny_tokenizer, tiny_vocab):
    def edit(rows, special):
        rows[3][0][5] = tiny_vocab.size + 7
        return rows, special

    data = _bad_rows(tiny_tokenizer, tiny_vocab, tmp_path, edit)
    with pytest.raises(DataError, match=r"outside the model's vocabulary .*row 3"):
        _run(tmp_path, data)


def test_manifest_special_ids_must_match_the_tokenizer(tmp_path, tiny_tokenizer, tiny_vocab):
    def edit(rows, special):
        special["eot"] = special["eot"] + 1
        return rows, special

    data = _bad_rows(tiny_tokenizer, tiny_vocab, tmp_path, edit)
    with pytest.raises(DataError, match=r"manifest\.json: special ids differ .*eot"):
        _run(tmp_path, data)


def test_a_mode_that_freezes_everything_stops(tmp_path, good_data):
    with pytest.raises(NothingToTrainError, match="freeze"):
        _run(tmp_path, good_data, "mode=image-alignment", "freeze=[trainable_rows]")
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.parametrize("override, setting", [
    ("mode=partial", "mode"), ("tokenizer=null", "tokenizer"), ("model=preset:huge", "model"),
    ("validation=1.5", "validation"), ("datasets=[]", "datasets"), ("no_such_setting=1", "no_such_setting"),
    ("vqgan=preset:huge", "vqgan='preset:huge': unknown preset"), ("tokenizer=preset:huge", "tokenizer='preset:huge'"),
])
def test_bad_settings_name_the_setting(tmp_path, good_data, override, setting):
    with pytest.raises(ConfigError, match=setting):
        _run(tmp_path, good_data, override)


def test_weighted_datasets_and_a_validation_folder(tmp_path, tiny_tokenizer, tiny_vocab):
    from finetune.train import _setup_data

    special = tiny_vocab.special_ids()
    a = write_sequences(tmp_path / "a", demo_rows(tiny_tokenizer, 20, n_codes=8, seed=1), special)
    b = write_sequences(tmp_path / "b", demo_rows(tiny_tokenizer, 20, n_codes=8, seed=2), special)
    val = write_sequences(tmp_path / "val", demo_rows(tiny_tokenizer, 5, n_codes=8, seed=3), special)
    cfg = load_config(ROOT / "finetune" / "configs" / "tiny_cpu.yaml", [f"datasets=[{a}:3, {{path: {b}, weight: 1}}]", f"validation={val}",
                                    f"output_dir={tmp_path / 'out'}"])
    assert [s.weight for s in cfg.dataset_specs()] == [3.0, 1.0] and cfg.eval_strategy == "steps"
    train, held_out = _setup_data(cfg, tiny_vocab, tiny_vocab.size)
    counts = [sum(1 for d, _ in train.order if d == k) for k in (0, 1)]
    assert counts == [30, 10]  # 40 sequences per epoch, split 3:1, the first folder oversampled
    assert len(held_out.order) == 5


@pytest.mark.slow
def test_launch_script_trains_with_two_cpu_processes(tmp_path, good_data):
    """torchrun + gloo: two processes train, and the real-token count sums over both."""
    out = tmp_path / "ddp"
    subprocess.run([str(ROOT / "finetune" / "launch.sh"), str(ROOT / "finetune" / "configs" / "tiny_cpu.yaml"),
                    "--nproc-per-node", "2", "--rdzv-endpoint", "localhost:29731", f"datasets=[{good_data}]",
                    f"output_dir={out}", "report_to=none", "validation=null", "max_steps=2", "logging_steps=1",
                    "save_strategy=no"], check=True, cwd=ROOT, timeout=600)
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "loss" in h] == [1, 2] and (out / "model.safetensors").is_file()


def test_a_model_folder_without_the_vqgan_decoder_needs_the_vqgan_setting(tmp_path, good_data, tiny_tokenizer,
                                                                          tiny_vqgan):
    from medmax.model import new_model, save_model_dir

    folder = save_model_dir(tmp_path / "hf", new_model("tiny", tiny_tokenizer, tiny_vqgan), tiny_tokenizer, None)
    with pytest.raises(ConfigError, match="vqgan: .* only the VQGAN encoder"):
        _run(tmp_path, good_data, f"model={folder}", "tokenizer=null", "vqgan=null")


def test_a_single_path_override_is_one_dataset_not_its_characters():
    cfg = load_config(ROOT / "finetune/configs/tiny_cpu.yaml", ["datasets=/data/seq/train:2", "freeze=model.layers.0"])
    assert [(s.path, s.weight) for s in cfg.dataset_specs()] == [("/data/seq/train", 2.0)]
    assert cfg.freeze == ["model.layers.0"]


def test_a_model_that_cannot_fit_in_memory_stops_before_allocating(tmp_path, good_data, monkeypatch):
    import medmax.model
    from medmax.model import ModelTooLargeError

    monkeypatch.setattr(medmax.model, "_available_bytes", lambda device=None: 1 << 20)  # 1 MiB free
    with pytest.raises(ModelTooLargeError, match="model=preset:tiny.*skip_memory_check=true"):
        _run(tmp_path, good_data)
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.parametrize("override, named", [
    ("fsdp=full_shard auto_wrap", "fsdp='full_shard auto_wrap'"),
    (f"deepspeed={ROOT / 'finetune' / 'configs' / 'ds_zero3.json'}", "ds_zero3.json (ZeRO stage 3)"),
    ("deepspeed={zero_optimization: {stage: 3}}", "ZeRO stage 3"),
])
def test_image_alignment_with_sharded_weights_is_refused_before_training(override, named):
    """Documented unsupported (the trainable rows sit beside the sharded matrices); now refused in one line."""
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "finetune" / "configs" / "tiny_cpu.yaml", ["mode=image-alignment", override])
    message = str(err.value)
    assert "mode=image-alignment" in message and named in message and "\n" not in message


def test_zero3_with_other_modes_is_not_refused_by_the_alignment_check():
    from finetune.config import sharded_weights

    assert sharded_weights(None, {"zero_optimization": {"stage": 2}}) is None
    assert "ZeRO stage 3" in sharded_weights(None, {"zero_optimization": {"stage": 3}})


@pytest.mark.parametrize("listing, status, nproc, gloo", [
    ("No devices were found", 6, "1", True),  # the driver is installed, the machine has no GPU
    ("", 0, "1", True),
    ("GPU 0: NVIDIA A100 (UUID: GPU-1)\nGPU 1: NVIDIA A100 (UUID: GPU-2)", 0, "2", False),
])
def test_launch_script_counts_gpus_from_nvidia_smi(tmp_path, listing, status, nproc, gloo):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' '{listing}'\nexit {status}\n")
    fake.chmod(0o755)
    run = subprocess.run([str(ROOT / "finetune" / "launch.sh"), str(CONFIGS[0]), "--dry-run"], capture_output=True,
                         text=True, env={"PATH": f"{fake.parent}:/usr/bin:/bin"})
    assert run.returncode == 0 and not run.stderr, run.stderr
    assert f"--nproc-per-node {nproc} " in run.stdout and ("ddp_backend=gloo" in run.stdout) == gloo
    assert "--rdzv-endpoint localhost:0 " in run.stdout  # one node: a free port, never another run's rendezvous


@pytest.mark.parametrize("entry", ["/data/seq/train:nan", "/data/seq/train:1e400", "/data/seq/train:-1",
                                   "{path: /data/seq/train, weight: .inf}", "{path: /data/seq/train, weight: heavy}"])
def test_a_dataset_weight_that_is_not_a_positive_finite_number_is_a_config_error(entry):
    """The sibling of a preference weight's rule (issue 23 item 3): NaN or inf would reach the epoch plan."""
    with pytest.raises(ConfigError, match="/data/seq/train"):
        load_config(ROOT / "finetune/configs/tiny_cpu.yaml", [f"datasets=[{entry}]"]).dataset_specs()
