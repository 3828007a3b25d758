"""Training on the token store (data_store=true, the default) is training on the folders read into memory.

The quickstart's recipe (finetune/configs/quickstart.yaml: packing, a held-out folder, two weighted
training folders here) on tiny quickstart-style rows, run once per loader: the loss and the validation loss
are identical at every step, and a run started on one loader resumes on the other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.demo_data import demo_rows
from finetune.train import main as train_main
from medmax.data.shards import write_sequences

CONFIG = str(Path(__file__).parents[2] / "finetune" / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def folders(tiny_tokenizer, tiny_vocab, tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    special = tiny_vocab.special_ids()
    return {name: write_sequences(root / name, demo_rows(tiny_tokenizer, n, n_codes=32, seed=seed), special,
                                  rows_per_shard=16)
            for name, n, seed in (("train_a", 40, 0), ("train_b", 24, 1), ("heldout", 8, 2))}


def _train(out: Path, folders: dict, *overrides: str, resume: bool = False) -> list[dict]:
    argv = ["--config", CONFIG, "model=preset:tiny", "tokenizer=preset:tiny", "vqgan=preset:tiny",
            f"datasets=[{folders['train_a']}, {folders['train_b']}:2.5]", f"validation={folders['heldout']}",
            f"output_dir={out}", "max_length=256", "per_device_train_batch_size=2", "per_device_eval_batch_size=2",
            "max_steps=6", "logging_steps=1", "eval_steps=3", "save_steps=3", "save_total_limit=2", "warmup_steps=1", "report_to=none",
            "disable_tqdm=true", *overrides]
    train_main(argv + (["--resume"] if resume else []))
    return [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]


def _curve(history: list[dict]) -> list[tuple]:
    return [(h["step"], h.get("loss"), h.get("eval_loss")) for h in history if "loss" in h or "eval_loss" in h]


def test_the_loss_curve_on_the_store_is_todays_step_for_step_and_resumes_across_loaders(tmp_path, folders):
    memory = _train(tmp_path / "memory", folders, "data_store=false")
    mapped = _train(tmp_path / "store", folders, "data_store=true", f"store_dir={tmp_path / 'stores'}")
    assert len([h for h in memory if "loss" in h]) == 6 and any("eval_loss" in h for h in memory)
    assert _curve(mapped) == _curve(memory)
    assert list((tmp_path / "stores").glob("*.store/*/plans/*/order.npy"))  # the plan was cached with the store
    assert not list(Path(folders["train_a"]).parent.glob("*.store"))  # store_dir was honoured

    # a run begun reading into memory continues on the store: the same data, by content
    shutil.copytree(tmp_path / "memory" / "checkpoint-3", tmp_path / "cut" / "checkpoint-3")
    resumed = _train(tmp_path / "cut", folders, "data_store=true", resume=True)
    assert [h["loss"] for h in resumed if "loss" in h][-1] == [h["loss"] for h in memory if "loss" in h][-1]
