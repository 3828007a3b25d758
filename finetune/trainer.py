"""The trainer every fine-tuning mode runs in: transformers' ``Trainer`` with the toolkit's plumbing.

:class:`MedMaxTrainerMixin` logs real (non-padding) tokens/s, writes ``medmax_run.json`` with every checkpoint
and switches FSDP on for CPU processes (:func:`enable_fsdp_on_cpu`). It also stops a step whose loss or gradient is
not finite (:class:`NonFiniteTrainingError`, naming the step and the row), trains nothing when a resumed run already
reached ``max_steps``, bounds the wall time (``max_seconds``) and, without progress bars, logs the metrics as lines
instead of printing them. :func:`medmax_trainer` builds the trainer
of supervised modes, and a mode with its own loss (``finetune.dpo``) mixes its own class in front of the mixin.
Importing this module does not load torch or transformers (``--help`` stays fast); they load when a trainer is made.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from medmax.errors import UserError
from medmax.training_run import write_run_info

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(UserError):
    """A training step gave a non-finite loss or gradient: the run stops before that step changes any weight, so
    nothing of it is saved (transformers would log the average of earlier losses instead and train on)."""


class MedMaxTrainerMixin:
    """Trainer that logs real (non-padding) tokens/s and saves what export needs with every checkpoint.

    Mixed into transformers' ``Trainer`` by :func:`medmax_trainer` when a run starts, so that importing this
    program (for ``--help``) does not load transformers.
    """

    def __init__(self, *args, run_info: dict, tokenizer_obj, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_info = run_info
        self.tokenizer_obj = tokenizer_obj
        self._real_tokens = 0
        self._tokens_at_log, self._time_at_log = 0, time.perf_counter()
        self._step_rows = []  # the dataset rows of each micro-batch since the last optimizer step
        if getattr(self.args, "max_seconds", None) is not None:
            self.add_callback(_wall_time_bound(self))
        if self.args.disable_tqdm:  # transformers then print()s each log as a dict; ours are log lines
            from transformers.trainer_callback import PrinterCallback

            self.pop_callback(PrinterCallback)
            self.add_callback(_log_lines())

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin_args = getattr(self.args, "fsdp_plugin_args", None)
        if plugin_args is not None and not self.is_fsdp_enabled:
            self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, plugin_args)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        """Resuming a run that already reached ``max_steps``: no step at all (transformers trains one more).

        transformers checks ``max_steps`` only after a step, so a finished run resumed mid-epoch trained one more step
        on every rerun and saved it as the final model. Reporting every epoch as done leaves its loop empty, while it
        still loads the checkpoint's weights and state as for any resume, so the final model is the checkpoint's.
        """
        epochs, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     *args, **kwargs)
        if self.state.global_step >= max_steps > 0:
            logger.info("the run finished at step %d (max_steps=%d): nothing left to train", self.state.global_step,
                        max_steps)
            return num_train_epochs, 0
        return epochs, steps

    def _prepare_inputs(self, inputs):
        n_real = inputs.pop("n_real_tokens", None)
        rows = inputs.pop("rows", None)
        if self.model.training:
            self._real_tokens += int(n_real) if n_real is not None else 0
            self._step_rows.append(rows)
        return super()._prepare_inputs(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.stop_if_not_finite(loss, lambda: self._rows_with_non_finite_loss(model, inputs))
        return (loss, outputs) if return_outputs else loss

    def stop_if_not_finite(self, loss, culprits) -> None:
        """Stop at a non-finite training loss, before its backward: one line naming the step and the rows
        ``culprits()`` finds (positions in the micro-batch; every row of it when it finds none)."""
        import torch

        if torch.isfinite(loss.detach()).all():
            return
        rows = self._step_rows[-1] if self._step_rows else None
        raise NonFiniteTrainingError(f"step {self.state.global_step + 1}: the training loss is "
                                     f"{float(loss.detach().float().mean())} on {self._named(rows, culprits())}; "
                                     f"{_STOPPED}")

    def _rows_with_non_finite_loss(self, model, inputs: dict) -> list[int]:
        """Positions of the micro-batch's rows whose own loss is not finite: a forward of each scored row alone,
        without gradient, through the unwrapped model; [] under FSDP or DeepSpeed, where a forward needs the other
        processes (the message then names every row of the micro-batch)."""
        import torch

        from medmax.vocab import IGNORE_INDEX

        labels = inputs.get("labels")
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or labels is None:
            return []
        net, bad = self.accelerator.unwrap_model(model), []
        with torch.no_grad():
            for b in range(len(labels)):
                if not (labels[b, 1:] != IGNORE_INDEX).any():  # nothing scored: no loss of its own
                    continue
                row = {k: v[b : b + 1] for k, v in inputs.items() if torch.is_tensor(v) and v.shape[:1] == labels.shape[:1]}
                if not torch.isfinite(net(**row).loss):
                    bad.append(b)
        return bad

    def _get_grad_norm(self, model, grad_norm=None):
        """transformers' norm of the step's gradient (every process's, after clipping's reduction): a non-finite one
        stops the run before the optimizer step, naming the step and its rows."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        rows, self._step_rows = self._step_rows, []
        if norm is not None and not math.isfinite(float(norm)):
            import torch

            known = [r for r in rows if r is not None]
            raise NonFiniteTrainingError(f"step {self.state.global_step + 1}: the gradient norm is {float(norm)} "
                                         f"after {self._named(torch.cat(known) if known else None, [])}; {_STOPPED}")
        return norm

    def _named(self, rows, positions: list[int]) -> str:
        """The rows at ``positions`` of a batch whose dataset indices are ``rows`` (all rows when none), as the
        training set describes them (folder and position), else by their place in the batch."""
        n = len(rows) if rows is not None else 0
        positions = positions or list(range(n))
        describe = getattr(self.train_dataset, "describe", None)
        if rows is None or describe is None:
            return f"rows {positions} of the batch" if positions else "this batch"
        named = [describe(int(rows[p])) for p in positions[:3]]
        if len(positions) > 3:
            named.append(f"{len(positions) - 3} more")
        return f"row {named[0]}" if len(named) == 1 else f"rows {', '.join(named[:-1])} and {named[-1]}"

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            total = self._all_processes(self._real_tokens)
            now = time.perf_counter()
            logs["tokens_per_s"] = round((total - self._tokens_at_log) / max(now - self._time_at_log, 1e-9), 1)
            logs["real_tokens"] = total
            self._tokens_at_log, self._time_at_log = total, now
        super().log(logs, *args, **kwargs)

    def _all_processes(self, count: int) -> int:
        import torch

        if self.accelerator.num_processes == 1:
            return count
        value = torch.tensor([count], device=self.accelerator.device)
        return int(self.accelerator.reduce(value, reduction="sum").item())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        from .modes import sync_trainable_rows

        sync_trainable_rows(self.model)
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_run_info(Path(output_dir or self.args.output_dir), self.run_info, self.tokenizer_obj)


def _log_lines():
    """A callback that logs the metrics of each ``log`` as one line on the main process: ``step N: loss 9.132, ...``."""
    from transformers import TrainerCallback

    class LogLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                logger.info("step %d: %s", state.global_step, ", ".join(f"{k} {_figure(v)}" for k, v in logs.items()))

    return LogLines()


def _figure(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _wall_time_bound(trainer):
    """A callback that ends training once ``max_seconds`` of wall time have passed since it began, saving a
    checkpoint at that step (the one ``--resume`` continues from). Every process stops at the same step: the
    longest elapsed time decides."""
    from transformers import TrainerCallback

    class WallTimeBound(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_training_stop or _longest(trainer, time.monotonic() - self.start) < args.max_seconds:
                return
            logger.info("stopping after step %d of %d: max_seconds=%s reached; --resume continues from "
                        "checkpoint-%d", state.global_step, state.max_steps, args.max_seconds, state.global_step)
            control.should_training_stop = control.should_save = True

    return WallTimeBound()


def _longest(trainer, seconds: float) -> float:
    """The largest of every process's ``seconds``."""
    import torch

    if trainer.accelerator.num_processes == 1:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=trainer.accelerator.device)
    return float(trainer.accelerator.reduce(value, reduction="max").item())


_STOPPED = ("training stopped before this step changed any weight, and nothing of it was saved (a weight too large "
            "for float32 in the data, or a learning rate too high, are the usual causes)")


def enable_fsdp_on_cpu(accelerator, plugin_args: dict) -> bool:
    """Turn accelerate's CPU data parallelism into FSDP, which it skips on CPU; returns True.

    accelerate 1.x enables FSDP only when the processes run on an accelerator device (its ``AcceleratorState``
    checks for ``MULTI_GPU``, ``MULTI_XPU``... and leaves ``MULTI_CPU`` out), so on CPU the ``fsdp`` setting was
    dropped without a word and every process trained a full replica under DDP. PyTorch's FSDP2 (``fully_shard``)
    itself runs on CPU over gloo, and so does the rest of accelerate's FSDP2 path as far as it is used here
    (wrapping per decoder layer, activation checkpointing, float32 and bf16, full state dicts, saving and resuming:
    tests/finetune/test_sharded.py), so the state is switched to FSDP, with the plugin transformers built from
    ``fsdp_config``.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"fsdp is set but accelerate chose {state.distributed_type}; expected FSDP or MULTI_CPU")
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if plugin.fsdp_version != 2:
        from .config import ConfigError

        raise ConfigError("fsdp on CPU: only FSDP2 (fsdp_config version 2, the default) runs on CPU processes")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
    # as accelerate does at the end of AcceleratorState.__init__: every later AcceleratorState() copies this back
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.info("FSDP2 on CPU processes (gloo): accelerate leaves FSDP off on CPU; switched on here")
    return True


def medmax_trainer(**kwargs) -> Trainer:
    """A ``MedMaxTrainer``: transformers' Trainer with :class:`MedMaxTrainerMixin`."""
    from transformers import Trainer

    return type("MedMaxTrainer", (MedMaxTrainerMixin, Trainer), {"__module__": __name__})(**kwargs)
