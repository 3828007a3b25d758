"""The sharded engines, run for real on this CPU machine (issue 18).

FSDP: the shipped recipe (``finetune/configs/full_7b_fsdp.yaml`` with ``fsdp_7b.json``), unchanged except for what
makes it tiny (preset model, a few steps, ``use_cpu``), trains through ``finetune/launch.sh`` on 2 processes (gloo).
Its loss follows a 1-process run on the same data step for step, its checkpoint resumes to the same weights, and the
result exports to a model folder that ``medmax generate`` loads.

DeepSpeed: its configs are read by DeepSpeed's own parser (README: why it does not train here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.demo_data import demo_rows
from medmax.data.shards import write_sequences

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "finetune" / "configs"
FSDP_RECIPE = CONFIGS / "full_7b_fsdp.yaml"
STEPS = 4
# What makes the 7B recipe tiny; everything else (FSDP2 full sharding per decoder layer, activation checkpointing,
# rank-0 loading, full state dicts, cosine schedule with warm-up, weight decay, validation 0.01) is the shipped file's.
# bf16=false: FSDP2's bf16 casts the weights and the loss itself, autocast in one process only the matmuls, so in
# bf16 the two differ by bf16 rounding (up to 0.015 at a loss of 9, README); in float32 they agree to 1e-6.
TINY = ["model=preset:tiny", "tokenizer=preset:tiny", "vqgan=preset:tiny", "use_cpu=true", "bf16=false",
        "report_to=none", "max_length=96", "per_device_train_batch_size=2", "per_device_eval_batch_size=2",
        "gradient_accumulation_steps=1", f"max_steps={STEPS}", "save_steps=2", "logging_steps=1",
        "learning_rate=2.0e-3", "dataloader_num_workers=0"]
LOSS_TOLERANCE = 1e-4  # measured: 1e-6 (README, "Sharded training")


def _launch(output: Path, data: Path, *extra: str, recipe: Path = FSDP_RECIPE, tiny=TINY) -> None:
    subprocess.run([str(ROOT / "finetune" / "launch.sh"), str(recipe), "--nproc-per-node", "2", *tiny,
                    f"datasets=[{data}]", f"output_dir={output}", *extra],
                   check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def _one_process(output: Path, data: Path, *extra: str, recipe: Path = FSDP_RECIPE, tiny=TINY) -> None:
    """The same recipe unsharded, in one process holding both ranks' rows (twice the per-device batch)."""
    from finetune.train import main as train_main

    train_main(["--config", str(recipe), *tiny, *extra, "per_device_train_batch_size=4", f"datasets=[{data}]",
                f"output_dir={output}"])


def _assert_same_training(sharded: Path, single: Path) -> None:
    """Same loss at every step (LOSS_TOLERANCE) and the same final weights (1e-5; measured 1.2e-7)."""
    losses, reference = _losses(sharded), _losses(single)
    assert len(losses) == len(reference) == STEPS
    assert losses == pytest.approx(reference, abs=LOSS_TOLERANCE), (losses, reference)
    assert reference[-1] < reference[0]  # it learns: the comparison is not between two flat lines
    a, b = load_file(sharded / "model.safetensors"), load_file(single / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def _losses(output: Path) -> list[float]:
    history = [json.loads(line) for line in (output / "log_history.jsonl").read_text().splitlines()]
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def data(tiny_tokenizer, tiny_vocab, tmp_path_factory):
    return write_sequences(tmp_path_factory.mktemp("seq"), demo_rows(tiny_tokenizer, 48, n_codes=16),
                           tiny_vocab.special_ids())


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    output = tmp_path_factory.mktemp("fsdp") / "run"
    _launch(output, data)
    return output


@pytest.fixture(scope="module")
def single_run(data, tmp_path_factory):
    output = tmp_path_factory.mktemp("single") / "run"
    _one_process(output, data, "fsdp=null", "fsdp_config=null")
    return output


def test_fsdp_recipe_on_two_cpu_processes_matches_one_process(fsdp_run, single_run):
    _assert_same_training(fsdp_run, single_run)


def test_fsdp_checkpoint_is_complete_and_exports_to_a_model_that_generates(fsdp_run, tmp_path):
    from finetune.export import export
    from medmax.__main__ import main as medmax_main

    checkpoint = fsdp_run / f"checkpoint-{STEPS}"
    # accelerate's FSDP files (the model and the optimizer as FSDP gathers them): FSDP ran, not DDP under its name
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()
    assert not (checkpoint / "optimizer.pt").exists()
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "medmax_run.json").is_file()
    assert (checkpoint / "trainer_state.json").is_file()
    folder = export(checkpoint, tmp_path / "model")
    exported, trained = load_file(folder / "model.safetensors"), load_file(fsdp_run / "model.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    out = tmp_path / "generated"
    assert medmax_main(["generate", "--model", str(folder), "--prompt", "Is there a lesion in the image?",
                        "--mode", "text", "--output", str(out), "--max-new-tokens", "4", "--greedy",
                        "--device", "cpu"]) == 0
    assert json.loads((out / "generation.json").read_text())


@pytest.mark.slow
def test_fsdp_resumes_to_the_same_weights(fsdp_run, data, tmp_path):
    """Resume from checkpoint-2 of the run above, in a fresh folder: steps 3 and 4 end on the same weights."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(fsdp_run / "checkpoint-2", resumed / "checkpoint-2")
    _launch(resumed, data, "--resume")
    a, b = load_file(fsdp_run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert _losses(resumed)[-2:] == pytest.approx(_losses(fsdp_run)[-2:], abs=1e-6)


# ---------------------------------------------------------------------------------------------- DeepSpeed
@pytest.mark.slow
def test_deepspeed_zero2_recipe_on_two_cpu_processes_matches_one_process(data, single_run, tmp_path):
    pytest.importorskip("deepspeed")
    output = tmp_path / "zero2"
    _launch(output, data, recipe=CONFIGS / "full_7b_zero2.yaml")
    assert (output / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()  # DeepSpeed's engine saved it
    _assert_same_training(output, single_run)


@pytest.mark.slow
def test_deepspeed_zero3_from_a_model_folder_trains_and_exports(data, tiny_model_dir, tmp_path):
    """ZeRO-3 partitions the weights as the model folder loads (transformers' zero.Init); a preset model, built
    outside from_pretrained, cannot take its VQGAN encoder into partitioned weights, so this starts from a folder."""
    pytest.importorskip("deepspeed")
    from finetune.export import export

    tiny = [t for t in TINY if not t.startswith(("model=", "tokenizer=", "vqgan="))] + [f"model={tiny_model_dir}"]
    recipe = CONFIGS / "full_7b_zero3.yaml"
    output, single = tmp_path / "zero3", tmp_path / "single"
    _launch(output, data, recipe=recipe, tiny=tiny)
    _one_process(single, data, "deepspeed=null", recipe=recipe, tiny=tiny)
    assert (output / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()
    _assert_same_training(output, single)
    assert (export(output / f"checkpoint-{STEPS}", tmp_path / "model") / "model.safetensors").is_file()


ZERO_RECIPES = [("full_7b_zero2.yaml", 2), ("full_7b_zero3.yaml", 3)]


def _deepspeed_config(recipe: str, tiny_tokenizer, tiny_vqgan, edit=None):
    """The recipe's DeepSpeed JSON as transformers hands it to DeepSpeed ("auto" filled from the settings and a
    model), read by DeepSpeed's own parser (``deepspeed.runtime.config.DeepSpeedConfig``)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from finetune.config import load_config
    from medmax.model import new_model

    raw = json.loads((ROOT / _recipe_setting(recipe, "deepspeed")).read_text())
    if edit:
        edit(raw)
    model = new_model("tiny", tiny_tokenizer, tiny_vqgan)  # before the config: ZeRO-3's would partition it
    try:
        cfg = load_config(CONFIGS / recipe, ["use_cpu=true"], deepspeed=raw)  # bf16 GPU recipes parse on CPU too
        cfg.hf_deepspeed_config.trainer_config_finalize(cfg, model, 100)
        return cfg, DeepSpeedConfig(cfg.hf_deepspeed_config.config)
    finally:
        unset_hf_deepspeed_config()  # transformers keeps a global reference that turns ZeRO-3 loading on


def _recipe_setting(recipe: str, key: str):
    from finetune.config import parse_yaml

    return parse_yaml((CONFIGS / recipe).read_text())[key]


@pytest.mark.parametrize("recipe, stage", ZERO_RECIPES)
def test_deepspeed_configs_pass_deepspeeds_own_parser(recipe, stage, tiny_tokenizer, tiny_vqgan):
    pytest.importorskip("deepspeed")
    cfg, ds = _deepspeed_config(recipe, tiny_tokenizer, tiny_vqgan)
    assert ds.zero_optimization_stage == stage and ds.zero_enabled
    assert ds.bfloat16_config.enabled and not ds.float16_config.enabled  # "auto" followed the recipe's bf16: true
    assert ds.train_micro_batch_size_per_gpu == cfg.per_device_train_batch_size
    assert ds.gradient_accumulation_steps == cfg.gradient_accumulation_steps
    if stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save  # export reads model.safetensors


def test_deepspeeds_parser_refuses_a_misspelt_setting(tiny_tokenizer, tiny_vqgan):
    """The check has teeth: a JSON check would let a misspelt ZeRO key through, DeepSpeed's parser does not."""
    pytest.importorskip("deepspeed")

    def misspell(doc):
        doc["zero_optimization"]["stage3_gather_16bit_weights_on_model_sav"] = True

    with pytest.raises(ValueError, match=r"stage3_gather_16bit_weights_on_model_sav\n  Extra inputs are not permitted"):
        _deepspeed_config("full_7b_zero3.yaml", tiny_tokenizer, tiny_vqgan, misspell)
