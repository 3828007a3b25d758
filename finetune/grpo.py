"""``mode: grpo``: reinforcement learning on sampled continuations (images, text or both), scored by rewards.

Each optimizer micro-batch holds ``per_device_train_batch_size`` prompts. For each, the policy samples a group of
``grpo_num_generations`` continuations with :class:`medmax.generation.Generator` (guidance, speculative Jacobi
decoding: the same fast path as inference; each sample has its own seed, from the run's seed, the step, the prompt's
place in the step's global batch, its row and the sample's place in the group, so a run is reproducible, a resume
draws what the uninterrupted run would, and N processes draw what one process holding their prompts would).
The rewards named in the config (:mod:`medmax.grpo_rewards` or any ``module:function``) score each sample; the
group-normalised advantages, the clipped policy ratio and the k3 KL to the reference make the loss of
:class:`medmax.grpo.GRPOLoss`, over the generated tokens only.

The reference is, under LoRA (``grpo_weights: lora``, ``grpo_reference: auto``), the policy with its adapters
disabled; otherwise a frozen copy of the starting model (as mode dpo). With ``grpo_beta: 0`` there is none.
Each batch is sampled and then trained on once (TRL's default ``num_iterations=1``): the "old" log-probabilities
are the current ones, detached, so the ratio is 1 in value and the clip acts only through its gradient, exactly as
in TRL.

Why not TRL's ``GRPOTrainer``: it generates with ``model.generate`` (or vLLM) from text prompts through a
processing class, and scores completions it decodes as text; our continuations are image codes drawn under
three-stream classifier-free guidance with speculative Jacobi decoding from pre-tokenised mixed-modal ids, and
rewards need the decoded pixels. So the loss is ours and equals TRL's number for number on a text-only batch
(``tests/finetune/test_grpo.py``), as mode dpo does.

On several processes (DDP, ZeRO-2) each samples and scores whole groups of its own prompts, and the logged figures
are gathered over all of them. FSDP and ZeRO-3 are refused by the config (``finetune.config.SHARDING_REFUSED``).

Logged (TRL's names): ``reward``, ``reward_std``, ``rewards/<name>/mean``, ``rewards/<name>/std``, ``kl``,
``clip_ratio``, ``completions/mean_length``; and ``rewards/<name>/failures``, the samples whose reward raised or
returned NaN.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch

from medmax.dpo import sequence_logps
from medmax.errors import UserError
from medmax.grpo import GRPOLoss, Reward, Samples, group_advantages, reward_metrics, score
from medmax.vocab import END_OF_TURN, IGNORE_INDEX

from .dpo import DPOTrainerMixin
from .trainer import MedMaxTrainerMixin

logger = logging.getLogger(__name__)


class PromptFileError(UserError):
    """A prompt file or row that cannot be used; the message names the file and the row."""


# ------------------------------------------------------------------------------ prompts
class PromptDataset:
    """Prompts from JSONL files: ``{"prompt": text}``, or MedMax training rows (``text``: the part before the
    end of turn is the prompt). ``tasks`` keeps only rows whose ``task`` is listed (the others are counted)."""

    def __init__(self, paths: list[str], tasks: list[str] | None = None):
        self.prompts, self.sources = [], []
        skipped = 0
        for path in paths:
            rows = _read_rows(Path(path))
            for n, row in rows:
                if tasks and row.get("task") not in tasks:
                    skipped += 1
                    continue
                self.prompts.append(_prompt_of(row, path, n))
                self.sources.append(f"{path}:{n}")
        if skipped:
            logger.info("prompts: %d rows of other tasks than %s left out", skipped, tasks)
        if not self.prompts:
            raise PromptFileError(f"datasets {paths}: no prompt" + (f" of tasks {tasks}" if tasks else ""))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "row": i}

    def describe(self, i: int) -> str:
        return self.sources[i]


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise PromptFileError(f"datasets: {path} is not a file (mode grpo reads JSONL prompt files)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise PromptFileError(f"{path}:{n}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{path}:{n}: expected a JSON object")
        rows.append((n, row))
    return rows


def _prompt_of(row: dict, path, n: int) -> str:
    if isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
    elif isinstance(row.get("text"), str) and END_OF_TURN in row["text"]:
        prompt = row["text"].split(END_OF_TURN)[0]
    else:
        raise PromptFileError(f"{path}:{n}: no prompt (a 'prompt' string, or a 'text' with {END_OF_TURN})")
    if "<image>" in prompt:
        raise PromptFileError(f"{path}:{n}: a prompt with an input image; mode grpo takes text prompts only so far")
    if not prompt.strip():
        raise PromptFileError(f"{path}:{n}: an empty prompt")
    return prompt


def collate_prompts(rows: list[dict]) -> dict:
    """A batch of prompts; ``rows`` (their dataset indices) is taken by the trainer's step bookkeeping, ``prompt_rows``
    (the same) seeds the samples."""
    index = torch.tensor([r["row"] for r in rows])
    return {"prompts": [r["prompt"] for r in rows], "prompt_rows": index, "rows": index.clone()}


def completion_batch(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int, device="cpu") -> dict:
    """Right-padded ``input_ids`` (N, T), ``labels`` (-100 on the prompt and on padding: only generated tokens are
    scored) and ``attention_mask``."""
    seqs = [p + c for p, c in zip(prompt_ids, completions)]
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(p) + len(c)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def prompt_file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ the trainer
class GRPOTrainerMixin:
    """Sampling, rewards and the GRPO loss in a transformers Trainer (mixed in by :func:`grpo_trainer`)."""

    _reference_context = DPOTrainerMixin._reference_context
    reference_logps = DPOTrainerMixin.reference_logps

    def __init__(self, *args, grpo_loss: GRPOLoss, rewards: list[Reward], num_generations: int, generation,
                 vqgan, vocab, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.grpo_loss, self.rewards, self.num_generations = grpo_loss, rewards, num_generations
        self.generation, self.vqgan, self.vocab = generation, vqgan.to(self.args.device), vocab
        self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None
        self.model_accepts_loss_kwargs = False  # a mean over sequences: Trainer divides it for accumulation
        self._grpo_metrics = defaultdict(list)
        self._generator = None
        self._micro_batch = [None, 0]  # [optimizer step, micro-batches sampled in it]

    def generator(self, model):
        """The policy as a Generator (built once: it holds the model, not a copy)."""
        from medmax.generation import Generator
        from medmax.model import ModelBundle

        net = self.accelerator.unwrap_model(model)
        base = net.get_base_model() if hasattr(net, "get_base_model") else net
        if self._generator is None or self._generator.model is not base:
            self._generator = Generator(ModelBundle(base, self.tokenizer_obj, self.vocab, self.vqgan))
        return self._generator

    def sample_seeds(self, rows: torch.Tensor) -> list[int]:
        """One seed per sample, from the run's seed, the step, the prompt's place in the step's global batch
        (micro-batch, then process, then position), its row and the sample's place in the group.

        The global place keeps two processes given the same prompt in one step (accelerate fills the last batch of
        an epoch from its first rows) from drawing the same group, and makes one process holding every process's
        prompts draw what they drew."""
        step, g, b = self.state.global_step, self.num_generations, len(rows)
        if self._micro_batch[0] != step:
            self._micro_batch = [step, 0]
        first = (self._micro_batch[1] * self.accelerator.num_processes + self.accelerator.process_index) * b
        self._micro_batch[1] += 1
        return [sample_seed(self.args.seed, step, first + i, int(r), k) for i, r in enumerate(rows) for k in range(g)]

    def rollout(self, model, prompts: list[str], rows: torch.Tensor) -> tuple[Samples, dict]:
        """Sample ``G`` continuations per prompt; -> what the rewards see, and the padded batch to score."""
        from medmax.generation import prompt_segments

        training = model.training
        gen = self.generator(model)
        expanded = [p for p in prompts for _ in range(self.num_generations)]
        segments = [prompt_segments(p, [], end_of_turn=True) for p in expanded]
        try:
            outs = gen.generate(segments, self.generation, seeds=self.sample_seeds(rows))
            prompt_ids = gen.encode_prompts(segments, self.generation)
        finally:
            model.train(training)
        samples = Samples(expanded, [o.text for o in outs], [[im.image for im in o.images] for o in outs],
                          [[im.codes for im in o.images] for o in outs], generator=gen)
        return samples, completion_batch(prompt_ids, [o.token_ids for o in outs], self.vocab.pad_id, self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        samples, batch = self.rollout(model, inputs["prompts"], inputs["prompt_rows"])
        table, totals, _ = score(self.rewards, samples)  # failures: counted from the table over all processes
        advantages, group_std = group_advantages(totals, self.num_generations)
        logps, mask = sequence_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        ref = self.reference_logps(model, batch) if self.grpo_loss.beta != 0.0 else None
        out = self.grpo_loss(logps, logps.detach(), ref, mask, advantages.to(logps.device))
        if model.training:
            self._real_tokens += int(batch["attention_mask"].sum())
            self.stop_if_not_finite(out.loss, lambda: [])
        for key, value in self.step_metrics(table, totals, group_std, out, mask).items():
            self._grpo_metrics[key].append(value)
        return (out.loss, {"advantages": advantages}) if return_outputs else out.loss

    def step_metrics(self, table, totals, group_std, out, mask) -> dict[str, float]:
        """TRL's metrics over every process's samples: each process holds whole groups of its own, and the figures
        rank 0 logs are those of the step's global batch (KL and clip ratio per generated token of all of them)."""
        n = mask.sum().double()
        tokens = torch.stack([out.kl.double() * n, out.clip_ratio.double() * n, n])[None]  # (1, 3)
        table, totals, group_std, lengths, tokens = (
            self._all_processes_rows(t) for t in (table, totals, group_std, mask.sum(-1).double(), tokens))
        failures = {r.name: int(torch.isnan(table[:, k]).sum()) for k, r in enumerate(self.rewards)}
        kl, clipped, n = tokens.sum(0).tolist()
        metrics = reward_metrics(self.rewards, table, totals, group_std, failures)
        metrics.update({"kl": kl / max(n, 1.0), "clip_ratio": clipped / max(n, 1.0),
                        "completions/mean_length": float(lengths.mean())})
        return metrics

    def _all_processes_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows of ``tensor``, concatenated in process order (itself on one process)."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.gather(tensor.detach().to(self.accelerator.device)).cpu()

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update({k: sum(v) if k.endswith("/failures") else _nanmean(v) for k, v in self._grpo_metrics.items() if v})
            self._grpo_metrics.clear()
        super().log(logs, *args, **kwargs)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (sha256 of them): distinct tuples never share a seed by arithmetic."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


def grpo_trainer(**kwargs):
    """A Trainer with :class:`finetune.trainer.MedMaxTrainerMixin` and :class:`GRPOTrainerMixin`."""
    from transformers import Trainer

    bases = (GRPOTrainerMixin, MedMaxTrainerMixin, Trainer)
    return type("MedMaxGRPOTrainer", bases, {"__module__": __name__})(**kwargs)
