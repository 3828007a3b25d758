"""mode: grpo: the loss is exact over generated tokens only, its terms vanish where they must, it is TRL's, and
a run trains, resumes and exports under LoRA and full weights on one CPU process.

The independent computation never calls medmax.grpo or medmax.dpo: full-vocabulary logits from the model's plain
forward on each unpadded sequence, log-softmax in float64, the log-probabilities of the continuation tokens found
from each prompt's length (the prompt is never scored; image codes are scored like text), and the GRPO formula
written out per token in Python.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.config import ConfigError, load_config
from finetune.grpo import completion_batch
from finetune.train import main as train_main
from medmax.dpo import sequence_logps
from medmax.grpo import GRPOLoss, Reward, Samples, group_advantages, score
from medmax.model import MedMaxChameleon


def _perturbed(model_dir: Path, seed: int = 1, scale: float = 0.05) -> MedMaxChameleon:
    model = MedMaxChameleon.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def _group(tiny_vocab) -> tuple[list[list[int]], list[list[int]]]:
    """Two prompts of different lengths, three continuations each: images (boi, codes, eoi) and text."""
    codes = tiny_vocab.image_id_tensor().tolist()
    boi, eoi = tiny_vocab.boi_id, tiny_vocab.eoi_id
    prompts = [[0, 40, 41, 42, 8710], [0, 43, 8710]]
    conts = [[boi, *codes[3:9], eoi], [boi, *codes[10:16], eoi], [50, 51, 2],
             [boi, *codes[1:7], eoi], [60, 2], [boi, *codes[20:26], eoi]]
    return [prompts[i // 3] for i in range(6)], conts


def _independent_token_logps(model, prompt: list[int], cont: list[int]) -> list[float]:
    ids = torch.tensor(prompt + cont)[None]
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
    return [float(logps[len(prompt) + k - 1, t]) for k, t in enumerate(cont)]


def _independent_loss(pol, old, ref, rewards, g, beta, eps) -> float:
    """GRPO per TRL/DeepSeekMath, token by token: rewards (N,), per-sequence lists of per-token log-probs."""
    losses = []
    for i in range(len(pol)):
        group = [r for r in rewards[(i // g) * g : (i // g + 1) * g] if not math.isnan(r)]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1)) if len(group) > 1 else 0.0
        adv = 0.0 if math.isnan(rewards[i]) else (rewards[i] - mean) / (std + 1e-4)
        terms = []
        for lp, lo, lr in zip(pol[i], old[i], ref[i]):
            ratio = math.exp(lp - lo)
            pg = -min(ratio * adv, min(max(ratio, 1 - eps), 1 + eps) * adv)
            kl = math.exp(lr - lp) - (lr - lp) - 1
            terms.append(pg + beta * kl)
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def test_loss_on_a_fixed_group_equals_an_independent_computation(tiny_model_dir, tiny_vocab):
    prompts, conts = _group(tiny_vocab)
    policy, reference = _perturbed(tiny_model_dir), MedMaxChameleon.from_pretrained(tiny_model_dir).eval()
    batch = completion_batch(prompts, conts, tiny_vocab.pad_id)
    with torch.no_grad():
        logps, mask = sequence_logps(policy, batch["input_ids"], batch["labels"], batch["attention_mask"])
        ref, _ = sequence_logps(reference, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert mask.sum(-1).tolist() == [len(c) for c in conts]  # generated tokens only, image codes included
    shift = torch.linspace(-0.4, 0.4, logps.shape[1]).expand_as(logps) * mask  # old != current: the clip acts
    old = logps + shift
    rewards = torch.tensor([1.0, 0.25, 0.0, 0.5, math.nan, 0.75], dtype=torch.float64)
    adv, _ = group_advantages(rewards, 3)
    out = GRPOLoss(beta=0.1, epsilon=0.2)(logps.double(), old.double(), ref.double(), mask, adv)

    pol_i = [_independent_token_logps(policy, p, c) for p, c in zip(prompts, conts)]
    ref_i = [_independent_token_logps(reference, p, c) for p, c in zip(prompts, conts)]
    old_i = [[lp + float(shift[i, len(prompts[i]) - 1 + k]) for k, lp in enumerate(row)] for i, row in enumerate(pol_i)]
    expected = _independent_loss(pol_i, old_i, ref_i, rewards.tolist(), 3, beta=0.1, eps=0.2)
    assert float(out.loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert 0 < float(out.clip_ratio) < 1


def test_one_sample_per_group_or_equal_rewards_give_no_policy_gradient(tiny_model_dir, tiny_vocab):
    prompts, conts = _group(tiny_vocab)
    batch = completion_batch(prompts, conts, tiny_vocab.pad_id)
    for rewards, g in ((torch.tensor([0.1, 0.9, 0.3, 0.7, 0.2, 0.5]), 1), (torch.full((6,), 0.6), 3)):
        adv, std = group_advantages(rewards, g)
        assert torch.equal(adv, torch.zeros(6)) and torch.equal(std, torch.zeros(6))
        policy = _perturbed(tiny_model_dir)
        logps, mask = sequence_logps(policy, batch["input_ids"], batch["labels"], batch["attention_mask"])
        out = GRPOLoss(beta=0.0)(logps, logps.detach(), None, mask, adv)
        out.loss.backward()
        assert float(out.loss) == 0.0
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.parameters())


def test_kl_is_zero_when_the_policy_is_the_reference(tiny_model_dir, tiny_vocab):
    prompts, conts = _group(tiny_vocab)
    batch = completion_batch(prompts, conts, tiny_vocab.pad_id)
    policy = MedMaxChameleon.from_pretrained(tiny_model_dir).eval()
    logps, mask = sequence_logps(policy, batch["input_ids"], batch["labels"], batch["attention_mask"])
    out = GRPOLoss(beta=0.5)(logps, logps.detach(), logps.detach(), mask, torch.zeros(6))
    assert float(out.kl) == 0.0 and torch.count_nonzero(out.per_token_kl) == 0 and float(out.loss) == 0.0
    other = _perturbed(tiny_model_dir)
    with torch.no_grad():
        ref, _ = sequence_logps(other, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert float(GRPOLoss(beta=0.5)(logps, logps.detach(), ref, mask, torch.zeros(6)).kl) > 0


def test_our_loss_equals_trls_on_a_text_only_batch(tiny_model_dir):
    """TRL 1.16's GRPOTrainer._compute_loss (loss_type grpo, beta, clip) on our sequences and ours agree."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    prompt, conts = [0, 40, 41, 8710], [[50, 51, 52, 2], [60, 2, 1, 1], [53, 54, 2, 1], [61, 62, 63, 64]]
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    policy, reference = _perturbed(tiny_model_dir), MedMaxChameleon.from_pretrained(tiny_model_dir).eval()
    adv = torch.tensor([1.2, -0.4, -0.8, 0.3])
    real = [c[: int(m.sum())] for c, m in zip(conts, cmask)]
    batch = completion_batch([prompt] * 4, real, 1)
    with torch.no_grad():
        ours_lp, mask = sequence_logps(policy, batch["input_ids"], batch["labels"], batch["attention_mask"])
        ours_ref, _ = sequence_logps(reference, batch["input_ids"], batch["labels"], batch["attention_mask"])
        old = ours_lp + 0.3 * mask * torch.sign(torch.randn(ours_lp.shape, generator=torch.Generator().manual_seed(0)))
        ours = GRPOLoss(beta=0.2, epsilon=0.2)(ours_lp, old, ours_ref, mask, adv).loss
        # TRL's per-token layout: completion positions only, right-padded
        k = cmask.shape[1]
        pick = lambda x: torch.stack([x[i, len(prompt) - 1 : len(prompt) - 1 + k] for i in range(4)])  # noqa: E731
        fake = _trl_self(policy)
        inputs = {"prompt_ids": torch.tensor([prompt] * 4), "prompt_mask": torch.ones(4, len(prompt), dtype=torch.long),
                  "completion_ids": torch.tensor(conts), "completion_mask": cmask, "advantages": adv,
                  "old_per_token_logps": pick(old), "ref_per_token_logps": pick(ours_ref)}
        trl_loss = GRPOTrainer._compute_loss(fake, policy, inputs)
    assert float(ours) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)


def _trl_self(model):
    """The attributes GRPOTrainer._compute_loss reads (loss_type grpo, token-level ratio, one process)."""
    from collections import defaultdict
    from types import SimpleNamespace

    acc = SimpleNamespace(reduce=lambda t, reduction: t, gather=lambda t: t, num_processes=1, is_main_process=True)
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=0.2,
        loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, use_vllm=False, model=SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, accelerator=acc, temperature=1.0,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), model_kwarg_keys=set(),
        is_fsdp_enabled=False, vllm_importance_sampling_correction=False, use_liger_kernel=False)
    fake._get_per_token_logps_and_entropies = _plain_logps
    return fake


def _plain_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **kwargs):
    """TRL's per-token log-probs of the last ``logits_to_keep`` tokens, from the plain forward (TRL's own method
    needs the fused head its trainer patches in; the log-probs themselves are checked by the exactness test)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1 : -1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
    return logps, torch.zeros_like(logps), None


def test_a_reward_that_raises_or_gives_nan_is_a_counted_failure(caplog):
    def fine(samples):
        return [1.0, 2.0, 3.0]

    def nan_once(samples):
        return [0.5, float("nan"), 0.5]

    def boom(samples):
        raise RuntimeError("detector crashed")

    samples = Samples(["a", "b", "c"], ["", "", ""], [[], [], []], [[], [], []])
    table, totals, failures = score([Reward("fine", fine), Reward("nan_once", nan_once, 2.0), Reward("boom", boom)],
                                    samples)
    assert failures == {"fine": 0, "nan_once": 1, "boom": 3}
    assert totals.tolist() == [2.0, 2.0, 4.0]  # the failed rewards left out of each sample's weighted sum
    assert "detector crashed" in caplog.text
    _, totals, _ = score([Reward("boom", boom)], samples)
    assert torch.isnan(totals).all()
    adv, _ = group_advantages(torch.tensor([1.0, math.nan, 0.0]), 3)
    assert adv[1] == 0 and adv[0] > 0 > adv[2]  # an unscorable sample: no advantage, not in its group's baseline


# ------------------------------------------------------------------------------ built-in rewards
def _scan(position: str, size: str):
    from medmax.synthetic import _render

    from PIL import Image

    return Image.fromarray(_render(np.random.default_rng(0), 64, True, position, size), mode="L")


def test_lesion_locator_scores_position_and_size_against_the_prompt():
    from medmax.grpo_rewards import lesion_locator

    ask = "Generate a scan: A grey scan with a small bright lesion in the upper left."
    images = [[_scan("upper left", "small")], [_scan("upper left", "large")], [_scan("lower right", "small")],
              [_scan("lower right", "large")], []]
    samples = Samples([ask] * 5 + ["Draw anything."], [""] * 6, images + [[_scan("upper left", "small")]], [[]] * 6)
    values = lesion_locator(samples)
    assert values[:5] == [1.0, 0.5, 0.5, 0.0, 0.0] and math.isnan(values[5])  # no drawing: 0; no target: a failure


def test_self_consistency_asks_the_policy_about_its_own_codes(tiny_model_dir):
    from medmax.generation import Generator
    from medmax.grpo_rewards import self_consistency

    gen = Generator.from_dir(tiny_model_dir)
    n = gen.vqgan.n_codes_per_image
    prompts = ["Generate a scan: A grey scan with a large bright lesion in the lower left.",
               "Generate a scan: A grey scan with no lesion.", "Tell me a story."]
    samples = Samples(prompts, [""] * 3, [[None]] * 3, [[list(range(n))], [list(range(n))], [list(range(n))]],
                      generator=gen)
    values = self_consistency(samples)
    assert values[0] in (0.0, 0.5, 1.0) and values[1] in (0.0, 1.0) and math.isnan(values[2])


# ------------------------------------------------------------------------------ runs
def mean_brightness(samples: Samples) -> list[float]:
    """A reward for the smoke runs: the drawing's mean grey level (varies on a random tiny model)."""
    return [float(np.asarray(ims[0].convert("L")).mean()) / 255 if ims else float("nan") for ims in samples.images]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "train.jsonl"
    rows = [{"text": f"Generate a scan: A grey scan with a small bright lesion in the upper left.<reserved08706><image>",
             "task": "image_generation"},
            {"text": "Is there a lesion?<reserved08706>yes", "task": "vqa_closed"},
            {"prompt": "Generate a scan: A grey scan with a large bright lesion in the lower right.",
             "task": "image_generation"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _grpo(out: Path, prompts: Path, *overrides: str, resume: bool = False) -> Path:
    argv = ["model=preset:tiny", "tokenizer=preset:tiny", "vqgan=preset:tiny", f"datasets=[{prompts}]", "mode=grpo",
            f"output_dir={out}", "report_to=none", "disable_tqdm=true", "use_cpu=true", "max_length=256",
            "per_device_train_batch_size=2", "grpo_num_generations=3", "max_steps=2", "save_steps=1",
            "logging_steps=1", "learning_rate=0.05", "seed=0", "dataloader_num_workers=0",
            f"rewards=[{__name__}:mean_brightness]", "prompt_tasks=[image_generation]", *overrides]
    train_main.__wrapped__(argv + (["--resume"] if resume else []))
    return out


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~35 s of CPU each (8 steps of 6 drawings, export), minutes on a loaded machine
@pytest.mark.parametrize("weights", ["lora", "full"])
def test_grpo_trains_resumes_and_exports_on_one_cpu_process(tmp_path, prompt_file, weights):
    from finetune.export import main as export_main

    out = _grpo(tmp_path / "run", prompt_file, f"grpo_weights={weights}", "lora_r=4", "lora_alpha=8")
    steps = [h for h in _history(out) if "loss" in h]
    assert len(steps) == 2
    for key in ("reward", "reward_std", "kl", "clip_ratio", "rewards/mean_brightness/mean",
                "rewards/mean_brightness/failures"):
        assert math.isfinite(steps[-1][key]), key
    assert steps[0]["reward_std"] > 0 and steps[0]["kl"] == 0.0  # step 1: the policy is the reference
    export_main(["--checkpoint", str(out / "checkpoint-2"), "--output", str(tmp_path / "model")])
    assert (tmp_path / "model" / "config.json").is_file()
    # a second run of two more steps resumed from checkpoint-1 draws and logs what the first did at step 2
    again = _grpo(tmp_path / "again", prompt_file, f"grpo_weights={weights}", "lora_r=4", "lora_alpha=8",
                  "max_steps=1")
    _grpo(again, prompt_file, f"grpo_weights={weights}", "lora_r=4", "lora_alpha=8", resume=True)
    resumed = [h for h in _history(again) if "loss" in h]
    assert resumed[-1]["reward"] == pytest.approx(steps[-1]["reward"], abs=1e-6)
    assert resumed[-1]["loss"] == pytest.approx(steps[-1]["loss"], abs=1e-5)


def test_grpo_settings_are_checked(prompt_file):
    base = ["mode=grpo", f"datasets=[{prompt_file}]", "model=preset:tiny", "tokenizer=preset:tiny", "vqgan=preset:tiny"]
    for setting, named in (("rewards=[nowhere:nothing]", "nowhere:nothing"), ("grpo_num_generations=0", "grpo_num_generations"),
                           ("grpo_generation={mode: video}", "video"), ("grpo_beta=-1", "grpo_beta"),
                           ("validation=0.1", "validation")):
        with pytest.raises(ConfigError, match=named):
            load_config(None, base + ["rewards=[medmax.grpo_rewards:lesion_locator]", setting], use_cpu=True)
    with pytest.raises(ConfigError, match="only used with mode: grpo"):
        load_config(None, ["mode=lora", f"datasets=[{prompt_file}]", "grpo_beta=0.5", "model=preset:tiny",
                           "tokenizer=preset:tiny", "vqgan=preset:tiny"], use_cpu=True)
