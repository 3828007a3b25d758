"""mode: dpo: the logged loss is exact, the LoRA reference is the base model, and the loss is TRL's.

The independent computation below never calls medmax.dpo: full-vocabulary logits from the model's plain
forward, log-softmax, and the log-probabilities of the continuation tokens found from each pair's prompt
length (the prompt is never scored; image codes in a continuation are scored like text).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.config import ConfigError, load_config
from finetune.train import main as train_main
from medmax.dpo import DPOLoss, sequence_logps
from medmax.model import MedMaxChameleon
from medmax.data.preference_loader import PreferenceCollator, load_preferences
from tokenization.build_preferences import main as build_main

N_CODES = 16


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Text pairs with an image in the prompt, and image-continuation pairs; weights from 0.2 to 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        codes = rng.integers(0, 64, N_CODES).tolist()
        weight = round(0.2 + 0.8 * i / max(n - 1, 1), 3)
        if i % 3 == 2:
            rows.append({"prompt": f"Generate a scan: lesion {i}", "chosen": {"image_tokens": codes},
                         "rejected": {"image_tokens": codes[::-1]}, "weight": weight})
        else:
            yes = i % 2 == 0
            rows.append({"prompt": "Is there a lesion in this scan?", "images": [codes],
                         "chosen": "yes" if yes else "no", "rejected": "no" if yes else "yes", "weight": weight})
    return rows


@pytest.fixture(scope="module")
def prefs(tiny_tokenizer_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prefs")
    with open(root / "rows.jsonl", "w") as f:
        for row in _rows(8):
            f.write(json.dumps(row) + "\n")
    build_main(["--input", str(root / "rows.jsonl"), "--tokenizer", str(tiny_tokenizer_path), "--output",
                str(root / "folder"), "--no-progress", "--strict"])
    return root / "folder"


def _independent_logps(model, pair_ids: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """Sum of log p(continuation token | everything before it), one sequence at a time, full vocabulary."""
    model.eval()
    out = []
    with torch.no_grad():
        for prompt, cont in pair_ids:
            ids = torch.tensor(np.concatenate([prompt, cont]), dtype=torch.long)[None]
            logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
            out.append(sum(logps[len(prompt) + k - 1, int(t)] for k, t in enumerate(cont)))
    return torch.stack(out)


def _independent_loss(policy, reference, data, beta: float, weighted: bool) -> tuple[float, float]:
    """(weighted sigmoid DPO loss, reward accuracy) over every pair of ``data``."""
    pairs = [data.pair(i) for i in range(len(data))]
    margins = []
    for side in ("chosen", "rejected"):
        ids = [(p["prompt_ids"], p[f"{side}_ids"]) for p in pairs]
        margins.append(_independent_logps(policy, ids) - _independent_logps(reference, ids))
    delta = beta * (margins[0] - margins[1])
    weights = torch.tensor(data.weights, dtype=torch.float64) if weighted else 1.0
    return float((-F.logsigmoid(delta) * weights).mean()), float((delta > 0).double().mean())


def _train(tmp_path: Path, model_dir: Path, prefs: Path, *overrides: str) -> Path:
    out = tmp_path / "run"
    train_main.__wrapped__([f"model={model_dir}", f"datasets=[{prefs}]", f"output_dir={out}", "mode=dpo", "report_to=none",
                "disable_tqdm=true", "use_cpu=true", "max_length=128", "per_device_train_batch_size=8",
                "max_steps=2", "save_steps=1", "logging_steps=1", "learning_rate=0.05", "seed=0",
                "dataloader_num_workers=0", *overrides])
    return out


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]


def test_logged_loss_equals_an_independent_computation_full(tmp_path, tiny_model_dir, prefs):
    """Step 2's logged loss and rewards, from checkpoint-1's weights and the frozen starting model."""
    out = _train(tmp_path, tiny_model_dir, prefs, "dpo_weights=full", "dpo_beta=0.5")
    step2 = [h for h in _history(out) if h.get("step") == 2 and "loss" in h][0]
    data = load_preferences(prefs)  # 8 pairs = one batch: every step sees all of them
    policy = MedMaxChameleon.from_pretrained(out / "checkpoint-1")
    reference = MedMaxChameleon.from_pretrained(tiny_model_dir)
    loss, accuracy = _independent_loss(policy, reference, data, beta=0.5, weighted=True)
    assert loss != pytest.approx(math.log(2), abs=1e-3)  # the policy has moved: not a trivial log 2
    assert step2["loss"] == pytest.approx(loss, abs=2e-4)
    assert step2["rewards/accuracies"] == pytest.approx(accuracy, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert math.isfinite(step2[key])
    assert step2["rewards/margins"] == pytest.approx(step2["rewards/chosen"] - step2["rewards/rejected"], abs=1e-5)


def test_logged_loss_equals_an_independent_computation_lora(tmp_path, tiny_model_dir, prefs):
    """Under LoRA the reference is the base model (adapters disabled); the exported merge is the policy."""
    from finetune.export import main as export_main

    out = _train(tmp_path, tiny_model_dir, prefs, "dpo_weights=lora", "lora_r=4", "lora_alpha=8",
                 "dpo_use_weights=false")
    step2 = [h for h in _history(out) if h.get("step") == 2 and "loss" in h][0]
    export_main(["--checkpoint", str(out / "checkpoint-1"), "--output", str(tmp_path / "merged")])
    policy = MedMaxChameleon.from_pretrained(tmp_path / "merged")
    reference = MedMaxChameleon.from_pretrained(tiny_model_dir)
    loss, _ = _independent_loss(policy, reference, load_preferences(prefs), beta=0.1, weighted=False)
    assert step2["loss"] == pytest.approx(loss, abs=2e-4)
    assert loss != pytest.approx(math.log(2), abs=1e-4)


def test_resume_continues_and_validation_logs_trls_metric_names(tmp_path, tiny_model_dir, prefs):
    out = _train(tmp_path, tiny_model_dir, prefs, "dpo_weights=lora", "lora_r=4", "validation=0.25", "eval_steps=1",
                 "per_device_train_batch_size=4")
    evals = [h for h in _history(out) if "eval_loss" in h]
    assert evals and all(k in evals[0] for k in ("eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"))
    _train(tmp_path, tiny_model_dir, prefs, "dpo_weights=lora", "lora_r=4", "validation=0.25", "eval_steps=1",
           "per_device_train_batch_size=4", "max_steps=3", "--resume")
    steps = [h["step"] for h in _history(out) if "loss" in h]
    assert steps == [1, 2, 3]
    with pytest.raises(ConfigError, match="mode=dpo"):  # the fingerprint names the mode that changed
        _train(tmp_path, tiny_model_dir, prefs, "mode=lora", "max_steps=4", "--resume")


def test_adapter_disabled_reference_equals_a_separate_frozen_base(tiny_model_dir, prefs, tiny_vocab):
    from finetune.modes import apply_lora

    base = MedMaxChameleon.from_pretrained(tiny_model_dir).eval()
    policy = apply_lora(MedMaxChameleon.from_pretrained(tiny_model_dir), 4, 8, 0.0, ["q_proj", "v_proj"]).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output
    data = load_preferences(prefs)
    batch = PreferenceCollator(tiny_vocab.pad_id)([data.pair(i) for i in range(len(data))])
    args = (batch["input_ids"], batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        separate, mask = sequence_logps(base, *args)
        with policy.disable_adapter():
            disabled, _ = sequence_logps(policy, *args)
        enabled, _ = sequence_logps(policy, *args)
    assert torch.equal(disabled, separate)
    assert not torch.allclose(enabled, separate)
    # continuation tokens only: as many scored tokens per row as the continuation has, image codes included
    lengths = [len(data.pair(i)[f"{s}_ids"]) for s in ("chosen", "rejected") for i in range(len(data))]
    assert mask.sum(-1).tolist() == lengths


def test_prompt_is_never_scored_and_image_codes_are(tiny_model_dir, prefs, tiny_vocab):
    """Changing a prompt token changes nothing but the context; the image continuation's codes carry log-probs."""
    model = MedMaxChameleon.from_pretrained(tiny_model_dir).eval()
    data = load_preferences(prefs)
    image_pair = next(i for i in range(len(data)) if data.formats[i] == "image")
    batch = PreferenceCollator(tiny_vocab.pad_id)([data.pair(image_pair)])
    with torch.no_grad():
        logps, mask = sequence_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    prompt_len = len(data.pair(image_pair)["prompt_ids"])
    assert not mask[:, : prompt_len - 1].any() and mask[:, prompt_len - 1 :].all()
    codes = tiny_vocab.is_image_code(batch["input_ids"][0, 1:])
    assert (logps[0][codes] < 0).all() and codes.sum() == N_CODES


def _perturbed(model_dir: Path) -> MedMaxChameleon:
    torch.manual_seed(0)
    model = MedMaxChameleon.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_our_loss_equals_trls_on_a_text_only_batch(tiny_model_dir, tiny_tokenizer, tmp_path):
    """TRL 1.16's DPOTrainer._compute_loss and ours, same weights, same text-only batch, sigmoid and RPO."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": [0, 40, 41, 42, 8710], "chosen_ids": [50, 51, 2], "rejected_ids": [60, 2]},
                {"prompt_ids": [0, 43, 8710], "chosen_ids": [52, 2], "rejected_ids": [61, 62, 63, 2]}]
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer, pad_token="<pad>", eos_token="</s>")
    ours_batch = PreferenceCollator(1)([{k: np.asarray(v) for k, v in e.items()} for e in examples])
    ids, labels, mask = ours_batch["input_ids"], ours_batch["labels"], ours_batch["attention_mask"]
    for loss_types, weights, ours in ((["sigmoid"], None, DPOLoss(0.3)),
                                      (["sigmoid", "sft"], [1.0, 0.5], DPOLoss(0.3, rpo_alpha=0.5)),
                                      (["ipo"], None, DPOLoss(0.3, "ipo")),
                                      (["hinge"], None, DPOLoss(0.3, "hinge"))):
        policy, reference = _perturbed(tiny_model_dir), MedMaxChameleon.from_pretrained(tiny_model_dir).eval()
        with torch.no_grad():  # ours first: TRL patches the models' forward (its fused head)
            pol, scored = sequence_logps(policy.eval(), ids, labels, mask)
            ref, _ = sequence_logps(reference, ids, labels, mask)
            our_loss = ours(pol, ref, scored).loss
        args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=loss_types, loss_weights=weights,
                         report_to="none", use_cpu=True, max_length=None, bf16=False)  # TRL defaults to bf16
        # DPOTrainer tokenizes text itself (it takes no pre-tokenized ids): a text row to construct it, then our ids
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=hf_tok,
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
        policy.eval()
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, dict(DataCollatorForPreference(pad_token_id=1)(examples)))
        assert float(our_loss) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6), loss_types


@pytest.mark.parametrize("setting, named", [("dpo_loss_type=kto", "dpo_loss_type"), ("dpo_beta=0", "dpo_beta"),
                                            ("dpo_weights=image-alignment", "dpo_weights"),
                                            ("dpo_reference=none", "dpo_reference"), ("rpo_alpha=-1", "rpo_alpha")])
def test_bad_dpo_settings_name_themselves(setting, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, ["mode=dpo", "datasets=[x]", setting, "model=preset:tiny", "tokenizer=preset:tiny",
                           "vqgan=preset:tiny"], use_cpu=True)


def test_dpo_settings_outside_mode_dpo_are_refused():
    with pytest.raises(ConfigError, match="dpo_beta=0.5: only used with mode: dpo"):
        load_config(None, ["mode=lora", "datasets=[x]", "dpo_beta=0.5", "model=preset:tiny", "tokenizer=preset:tiny",
                           "vqgan=preset:tiny"], use_cpu=True)


def test_a_sequence_folder_is_refused_by_dpo_and_a_preference_folder_by_sft(tmp_path, tiny_model_dir, prefs,
                                                                            tiny_tokenizer, tiny_vocab):
    from finetune.demo_data import demo_rows
    from medmax.data.loader import load_sequences
    from medmax.data.shards import DataError
    from medmax.data.shards import write_sequences

    seq = write_sequences(tmp_path / "seq", demo_rows(tiny_tokenizer, 4, n_codes=8), tiny_vocab.special_ids())
    with pytest.raises(DataError, match="not a preference folder"):
        _train(tmp_path, tiny_model_dir, seq)
    with pytest.raises(DataError, match="holds preferences, not sequences"):
        load_sequences(prefs)
    from medmax.data.store import open_sequences, store_digest

    for read in (open_sequences, store_digest):  # the store refuses it itself, as load_sequences does, before making a store
        with pytest.raises(DataError, match=f"{prefs}/.*holds preferences, not sequences"):
            read(prefs, store_root=tmp_path / "stores")
    assert not (tmp_path / "stores").exists()
    for store in ("true", "false"):  # supervised training refuses it the same way from the token store and from memory
        with pytest.raises(DataError, match="holds preferences, not sequences"):
            _train(tmp_path / store, tiny_model_dir, prefs, "mode=lora", f"data_store={store}")


def test_the_forward_adds_no_argument_trainer_takes_for_a_label():
    """Trainer treats every forward argument named *label* as a label; one more made SFT validation lose eval_loss."""
    from transformers.utils import find_labels

    assert find_labels(MedMaxChameleon) == ["labels"]
