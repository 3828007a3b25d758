"""Same config and seed, same weights: LoRA adapters from a model folder are created after the run is seeded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.demo_data import demo_rows
from finetune.train import main as train_main
from medmax.data.shards import write_sequences
from tokenization.build_preferences import main as build_preferences


@pytest.fixture(scope="module")
def sequences(tiny_tokenizer, tiny_vocab, tmp_path_factory) -> Path:
    return write_sequences(tmp_path_factory.mktemp("seq"), demo_rows(tiny_tokenizer, 16, n_codes=16),
                           tiny_vocab.special_ids())


@pytest.fixture(scope="module")
def preferences(yes_no_preferences, tmp_path_factory) -> Path:
    return yes_no_preferences(tmp_path_factory.mktemp("prefs"), 4)


def _adapters(out: Path, model_dir: Path, data: Path, *overrides: str) -> dict[str, torch.Tensor]:
    """One step from the model folder; -> the saved adapter tensors."""
    train_main.__wrapped__([f"model={model_dir}", f"datasets=[{data}]", f"output_dir={out}", "report_to=none",
                            "disable_tqdm=true", "use_cpu=true", "max_length=128", "per_device_train_batch_size=4",
                            "max_steps=1", "save_steps=1", "logging_steps=1", "learning_rate=0.01", "seed=0",
                            "validation=null", "dataloader_num_workers=0", "lora_r=4", "lora_alpha=8", *overrides])
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("mode", [("mode=lora",), ("mode=dpo", "dpo_weights=lora")], ids=["lora", "dpo-lora"])
def test_two_identical_lora_runs_from_a_model_folder_give_bit_identical_adapters(tmp_path, tiny_model_dir, sequences,
                                                                                preferences, mode):
    data = preferences if "mode=dpo" in mode else sequences
    first = _adapters(tmp_path / "a", tiny_model_dir, data, *mode)
    torch.rand(7)  # whatever the process drew in between must not matter
    second = _adapters(tmp_path / "b", tiny_model_dir, data, *mode)
    assert first.keys() == second.keys() and len(first) > 4
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f"{len(differ)} of {len(first)} adapter tensors differ, e.g. {differ[:2]}"
