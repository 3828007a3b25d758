"""Fine-tune a Chameleon-family model on sequence folders (full, LoRA or image-alignment).

Usage::

    # one process (CPU or one GPU)
    python -m finetune.train --config finetune/configs/tiny_cpu.yaml
    # overrides on top of the YAML, and resuming from the last complete checkpoint of output_dir
    python -m finetune.train --config finetune/configs/tiny_cpu.yaml max_steps=20 learning_rate=1e-3 --resume
    # several processes / nodes: finetune/launch.sh wraps torchrun (and runs --check once first)
    finetune/launch.sh finetune/configs/lora_7b.yaml --nproc-per-node 8
    # only read and check the settings (contradictions are refused in one line naming both)
    python -m finetune.train --config finetune/configs/quickstart.yaml validation=null --check

The output folder receives checkpoints (``checkpoint-N/``), the final weights, ``tokenizer.json``,
``vqgan/`` (the complete VQGAN), ``medmax_run.json`` (where each piece came from),
``log_history.jsonl``, ``loss_curve.png`` and TensorBoard logs. ``python -m finetune.export`` turns
the output folder or any checkpoint into a model folder.

Each dataset folder is memory-mapped from its token store (``medmax.data.store``), made once beside it by the
first process that needs it (``store_dir=PATH`` to put it elsewhere, ``data_store=false`` to read every folder
into every process as before); an ``s3://`` dataset path names a store on S3-compatible storage.

``--resume`` continues from the newest *complete* checkpoint (one whose ``trainer_state.json``, written
last, is readable; a folder cut short by a kill is skipped with a warning). It refuses, naming the
difference, to continue a run whose mode, starting model (its config and weight files' content, or a
preset's name and seed), row and trained-weight settings (max_length, packing, seed, freeze, LoRA, DPO), tokenizer, dataset content (manifest and data files, not their paths), dataset
weights or validation set differ from the ones recorded in the checkpoint's ``medmax_run.json``;
``--resume-anyway`` continues regardless. Resuming a run that already reached ``max_steps`` trains
nothing: its final model stays as it is (or is written from its last checkpoint, when the run stopped
before writing it). A model whose ``config.json`` sizes need
more memory than is available stops before any allocation (``skip_memory_check=true`` to try anyway).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from medmax.cli import program
from medmax.jsonl import write_jsonl
from medmax.training_run import RUN_FILE
from medmax.vocab import Vocabulary, load_tokenizer

from .trainer import medmax_trainer

if TYPE_CHECKING:  # annotations only: torch, transformers and the recipe load when a run starts, not for --help
    from transformers import Trainer

    from medmax.model import MedMaxChameleon

    from .config import FinetuneConfig

logger = logging.getLogger("finetune.train")

BASE_MODEL_DIR = "base_model"


def _setup_assets(cfg: FinetuneConfig):
    """Tokenizer, vocabulary and the complete VQGAN, with errors naming the setting."""
    from medmax.presets import VQGAN_PRESETS, parse_preset, resolve_tokenizer
    from medmax.vqgan import VQGAN, load_vqgan

    from .config import ConfigError

    model_dir = None if cfg.is_preset else Path(cfg.model)
    if model_dir is not None and not (model_dir / "config.json").is_file():
        raise ConfigError(f"model={cfg.model}: not a Hugging Face folder (no config.json) and not preset:NAME")
    tokenizer = resolve_tokenizer(cfg.tokenizer) if cfg.tokenizer else load_tokenizer(model_dir)
    vqgan_preset = parse_preset(cfg.vqgan, VQGAN_PRESETS, "vqgan")
    if vqgan_preset:  # random weights (seeded by run): CPU smoke runs and tests
        vqgan_path, vqgan = cfg.vqgan, VQGAN.from_params(VQGAN_PRESETS[vqgan_preset])
    else:
        vqgan_path = Path(cfg.vqgan) if cfg.vqgan else model_dir
        vqgan = load_vqgan(vqgan_path, trust_checkpoint=cfg.trust_checkpoint)
    if vqgan.decoder is None:
        raise ConfigError(f"vqgan: {vqgan_path} holds only the VQGAN encoder; name the complete VQGAN with "
                          "vqgan=PATH so that the exported model can draw images")
    return tokenizer, Vocabulary.from_tokenizer(tokenizer), vqgan


def _check_memory(cfg: FinetuneConfig, tokenizer, vqgan) -> None:
    """Refuse a model whose parameters cannot fit in memory before any weight is allocated."""
    import torch
    from transformers import ChameleonConfig

    from medmax.model import chameleon_config, check_config_fits

    dtype, override = getattr(torch, cfg.model_dtype), "skip_memory_check=true"
    if cfg.is_preset:
        config = chameleon_config(cfg.preset_name, tokenizer, vqgan.params)
        check_config_fits(config, f"model={cfg.model}", dtype, allow=cfg.skip_memory_check, override=override)
    else:
        check_config_fits(ChameleonConfig.from_pretrained(cfg.model), f"{Path(cfg.model) / 'config.json'}", dtype,
                          allow=cfg.skip_memory_check, override=override)


def _join_deepspeed_comm() -> None:
    """Let DeepSpeed see the process group before ZeRO-3 partitions the model as it is built.

    On GPUs accelerate starts the processes through ``deepspeed.comm``; on CPU it starts a plain gloo group, which
    ``deepspeed.comm`` does not know, so ``zero.Init`` read a world size of 1 and refused the batch sizes
    ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 4 != 2 * 1 * 1").
    ``init_distributed`` adopts the existing group; where DeepSpeed already has one it does nothing.
    """
    import torch.distributed as dist

    import deepspeed

    if dist.is_initialized() and not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def _setup_model(cfg: FinetuneConfig, tokenizer, vqgan, resume: bool) -> tuple[MedMaxChameleon, str | None]:
    """The model before the mode is applied, and the folder its base weights can be reloaded from."""
    import torch

    from medmax.model import MedMaxChameleon, new_model, save_model_dir

    dtype = getattr(torch, cfg.model_dtype)
    saved_base = Path(cfg.output_dir) / BASE_MODEL_DIR
    if cfg.is_preset and resume and saved_base.is_dir():
        return MedMaxChameleon.from_pretrained(saved_base, dtype=dtype, attn_implementation=cfg.attn_implementation), str(saved_base)
    if cfg.is_preset:
        model = new_model(cfg.preset_name, tokenizer, vqgan, seed=cfg.seed).to(dtype)
        model.config._attn_implementation = cfg.attn_implementation
        if cfg.weights_mode == "lora" and cfg.should_save:  # the adapters need their base weights at export
            save_model_dir(saved_base, model, tokenizer, None)
        return model, (str(saved_base) if cfg.weights_mode == "lora" else None)
    model = MedMaxChameleon.from_pretrained(cfg.model, dtype=dtype, attn_implementation=cfg.attn_implementation)
    return model, str(Path(cfg.model).resolve())


def _model_vocab_size(cfg: FinetuneConfig, vocab: Vocabulary) -> int:
    """The model's vocabulary size, read before any weights are loaded."""
    if cfg.is_preset:
        return vocab.size
    from transformers import ChameleonConfig

    from .config import ConfigError

    size = ChameleonConfig.from_pretrained(cfg.model).vocab_size
    if vocab.size > size:
        raise ConfigError(f"tokenizer: {vocab.size} ids, but model={cfg.model} has only {size}")
    return size


def _setup_data(cfg: FinetuneConfig, vocab: Vocabulary, vocab_size: int):
    """Training and validation datasets, checked against the model and tokenizer before any step."""
    if cfg.mode == "dpo":
        from .dpo import setup_preference_data

        return setup_preference_data(cfg, vocab, vocab_size)
    if cfg.mode == "grpo":
        from .grpo import PromptDataset

        prompts = PromptDataset([s.path for s in cfg.dataset_specs()], cfg.prompt_tasks or None)
        logger.info("prompts: %d (groups of %d continuations)", len(prompts), cfg.grpo_num_generations)
        return prompts, None
    from medmax.data.loader import SequenceDataset, check_one_image_layout, check_sequences, split_validation

    load = _loader(cfg)
    specs = cfg.dataset_specs()
    special = vocab.special_ids()
    train = []
    for spec in specs:
        data = load(spec.path)
        check_sequences(data, vocab_size, cfg.max_length, special)
        train.append(data)
    val = []
    fraction = cfg.validation_fraction()
    seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
    if fraction is not None:
        pairs = [split_validation(d, fraction, seed) for d in train]
        train, val = [p[0] for p in pairs], [p[1] for p in pairs]
    elif cfg.validation:
        data = load(cfg.validation)
        check_sequences(data, vocab_size, cfg.max_length, special)
        val = [data]
    check_one_image_layout(train + val)
    weights = [s.weight for s in specs]
    train_set = SequenceDataset(train, weights, cfg.max_length, cfg.packing, seed)
    val_set = SequenceDataset(val, None, cfg.max_length, cfg.packing, seed) if val else None
    logger.info("training rows: %d (%d sequences, %d tokens, packing=%s)", len(train_set),
                len(train_set.order), train_set.n_tokens(), cfg.packing)
    return train_set, val_set


def _loader(cfg: FinetuneConfig):
    """Sequence folder -> sequences: memory-mapped from its token store (default), or read into this process."""
    from medmax.data.loader import load_sequences
    from medmax.data.store import open_sequences

    if not cfg.data_store:
        return load_sequences
    return lambda folder: open_sequences(folder, store_root=cfg.store_dir)


def _collator(cfg: FinetuneConfig, vocab: Vocabulary):
    from medmax.data.loader import PackedCollator, PaddingCollator

    if cfg.packing:
        return PackedCollator(vocab.pad_id, cfg.max_length if cfg.pad_to_max_length else None)
    return PaddingCollator(vocab.pad_id)


def write_curves(output_dir: Path, history: list[dict]) -> None:
    """log_history.jsonl and loss_curve.png (train and validation loss against step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_jsonl(output_dir / "log_history.jsonl", history, sort_keys=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.grid(alpha=0.3)
    if ax.lines:  # a run too short to log a loss has no curve to name
        ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curve.png", dpi=100)
    plt.close(fig)


def _trainer_state(folder: Path) -> dict | None:
    """A folder's trainer_state.json when it is readable and records its step; else None."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def _global_step(folder: Path) -> int | None:
    """The step recorded in a folder's trainer_state.json; None when there is no readable one."""
    state = _trainer_state(folder)
    return state["global_step"] if state else None


def _is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last (after weights, optimizer and RNG state): a checkpoint without a
    readable one was cut short while being written."""
    return _global_step(checkpoint) is not None


def _finished_run(cfg: FinetuneConfig, checkpoint: Path | None) -> tuple[int, int] | None:
    """(step, last step) of the run in output_dir when it finished and also wrote its final model; else None.

    Finished: its newest checkpoint reached max_steps (without max_steps, the steps its run computed from an unchanged
    num_train_epochs). Final model written: output_dir's trainer_state.json (saved after the final weights) records
    that step, and loss_curve.png (written last) exists. A kill during teardown leaves exactly this, and the job
    looks failed; resuming it must change nothing.
    """
    state = _trainer_state(checkpoint) if checkpoint is not None else None
    if state is None:
        return None
    same_epochs = state.get("num_train_epochs") == cfg.num_train_epochs
    last = cfg.max_steps if cfg.max_steps > 0 else (state.get("max_steps") if same_epochs else None)
    step, output_dir = state["global_step"], Path(cfg.output_dir)
    if not last or step < last or _global_step(output_dir) != step:
        return None
    return (step, last) if (output_dir / "loss_curve.png").is_file() else None


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` that was written completely; incomplete newer ones are skipped with a warning."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    for checkpoint in sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True):
        if _is_complete(checkpoint):
            return checkpoint
        logger.warning("%s is incomplete (no readable trainer_state.json: training stopped while it was being "
                       "written); skipping it", checkpoint)
    return None


def _resume_point(cfg: FinetuneConfig, resume: bool) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    from .config import ConfigError

    output_dir = Path(cfg.output_dir)
    if not resume:
        if output_dir.is_dir() and get_last_checkpoint(cfg.output_dir):
            logger.warning("output_dir=%s already holds checkpoints; starting over (pass --resume to continue)",
                           cfg.output_dir)
        return None
    last = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    if last is None:
        raise ConfigError(f"--resume: no complete checkpoint-N folder in output_dir={cfg.output_dir}")
    logger.info("resuming from %s", last)
    return last


# ------------------------------------------------------------------------------ what a run continues
def _digest(cfg: FinetuneConfig, folder: str) -> str:
    """A folder's content digest (``medmax.data.store.dataset_digest``); with the token store, the one recorded
    when the store was made. Mode grpo: the prompt file's sha256."""
    from medmax.data.store import dataset_digest

    if cfg.mode == "grpo":
        from .grpo import prompt_file_digest

        return prompt_file_digest(folder)

    return dataset_digest(folder, cfg.data_store, cfg.store_dir)


def _model_identity(cfg: FinetuneConfig) -> str:
    """The starting model by content: ``preset:NAME seed N`` (the seed draws its weights), else ``sha256:...`` of the
    folder's config and weight files (``medmax.model.model_digest``)."""
    if cfg.is_preset:
        return f"{cfg.model} seed {cfg.seed}"
    from medmax.model import model_digest

    return f"sha256:{model_digest(cfg.model)}"


def _training_settings(cfg: FinetuneConfig) -> dict:
    """The settings that decide the training rows, their order, what trains and the objective: a resume that changed
    one would continue one run with another's rows or weights."""
    keys = ["max_length", "packing", "seed", "data_seed", "freeze"]
    if cfg.weights_mode == "lora":
        keys += ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"]
    if cfg.mode == "dpo":
        keys += ["dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "rpo_alpha", "dpo_use_weights", "dpo_reference"]
    if cfg.mode == "grpo":
        keys += ["grpo_num_generations", "grpo_beta", "grpo_epsilon", "grpo_epsilon_high", "grpo_reference",
                 "grpo_generation", "rewards", "reward_weights", "reward_settings", "prompt_tasks"]
    return {key: getattr(cfg, key) for key in keys}


def run_fingerprint(cfg: FinetuneConfig, tokenizer) -> dict:
    """What a resumed run must share with the run it continues: mode, starting model, tokenizer and the data's
    content. The model matters to every mode: DPO's frozen reference and LoRA's base (export merges onto it) are
    rebuilt from it on resume."""
    fraction = cfg.validation_fraction()
    return {
        "mode": cfg.mode if cfg.mode not in ("dpo", "grpo") else f"{cfg.mode}/{cfg.weights_mode}",  # LoRA and full differ
        "model": _model_identity(cfg),
        "settings": _training_settings(cfg),
        "tokenizer": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        "datasets": [{"digest": _digest(cfg, s.path), "weight": s.weight, "path": s.path} for s in cfg.dataset_specs()],
        "validation": fraction if fraction is not None else (_digest(cfg, cfg.validation) if cfg.validation else None),
    }


def fingerprint_differences(before: dict, now: dict) -> list[str]:
    """How ``now`` differs from the run that wrote ``before``, one phrase per difference (paths do not count)."""
    diffs = []
    if before.get("mode") != now["mode"]:
        diffs.append(f"mode={before.get('mode')} (this run: {now['mode']})")
    if "model" in before and before["model"] != now["model"]:  # older records lack it (_check_resume warns)
        diffs.append(f"another model ({_short(before['model'])}, this run {_short(now['model'])})")
    settings = before.get("settings") or {}
    diffs += [f"{key}={settings[key]!r} (this run: {value!r})" for key, value in now["settings"].items()
              if key in settings and settings[key] != value]
    if before.get("tokenizer") != now["tokenizer"]:
        diffs.append(f"another tokenizer (sha256 {str(before.get('tokenizer'))[:12]}, this run {now['tokenizer'][:12]})")
    old, new = before.get("datasets") or [], now["datasets"]
    if len(old) != len(new):
        diffs.append(f"{len(old)} dataset folders (this run: {len(new)})")
    for k, (a, b) in enumerate(zip(old, new)):
        if a.get("digest") != b["digest"]:
            diffs.append(f"datasets[{k}]={a.get('path')} holding other content than {b['path']}")
        elif a.get("weight") != b["weight"]:
            diffs.append(f"datasets[{k}] weight {a.get('weight')} (this run: {b['weight']})")
    if before.get("validation") != now["validation"]:
        diffs.append("another validation set")
    return diffs


def _short(identity) -> str:
    """A model identity for a message: a digest cut to 12 hex digits."""
    text = str(identity)
    return f"sha256 {text[7:19]}" if text.startswith("sha256:") else text


def _check_resume(checkpoint: Path, fingerprint: dict, anyway: bool) -> None:
    """Stop a resume that would continue another run's training with other data, tokenizer or mode."""
    from .config import ConfigError

    try:
        before = json.loads((checkpoint / RUN_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError):
        before = None
    if before is None:
        logger.warning("%s records no fingerprint (written by an older version): cannot check that this run "
                       "continues it with the same data, tokenizer and mode", checkpoint)
        return
    if "model" not in before or "settings" not in before:
        logger.warning("%s records no model or settings fingerprint (written by an older version): cannot check that "
                       "this run starts from the same model with the same rows and trained weights", checkpoint)
    diffs = fingerprint_differences(before, fingerprint)
    if not diffs:
        return
    message = f"--resume: {checkpoint} was trained with {'; '.join(diffs)}"
    if not anyway:
        raise ConfigError(f"{message}; pass --resume-anyway to continue regardless, or choose another output_dir")
    logger.warning("%s; continuing anyway (--resume-anyway)", message)


def _reference(cfg: FinetuneConfig, model):
    """Modes dpo and grpo: a frozen copy of the starting model as the reference, unless LoRA's disabled adapters
    serve (or grpo_beta is 0: no KL term, no reference)."""
    if cfg.mode not in ("dpo", "grpo"):
        return None
    from .dpo import disable_dropout, frozen_copy

    disable_dropout(model)
    setting = cfg.dpo_reference if cfg.mode == "dpo" else cfg.grpo_reference
    if (cfg.weights_mode == "lora" and setting == "auto") or (cfg.mode == "grpo" and cfg.grpo_beta == 0):
        return None
    return frozen_copy(model)


def _trainer(cfg: FinetuneConfig, vocab: Vocabulary, model, reference, train_set, val_set, info: dict, tokenizer,
             vqgan=None):
    common = dict(model=model, args=cfg, train_dataset=train_set, eval_dataset=val_set, run_info=info,
                  tokenizer_obj=tokenizer)
    if cfg.mode == "grpo":
        from .dpo import disable_dropout
        from .grpo import collate_prompts, grpo_trainer

        disable_dropout(model)  # LoRA's dropout layers exist only now
        return grpo_trainer(data_collator=collate_prompts, grpo_loss=cfg.grpo_loss(), rewards=cfg.reward_functions(),
                            num_generations=cfg.grpo_num_generations, generation=cfg.generation_config(),
                            vqgan=vqgan, vocab=vocab, ref_model=reference, **common)
    if cfg.mode != "dpo":
        return medmax_trainer(data_collator=_collator(cfg, vocab), **common)
    from medmax.data.preference_loader import PreferenceCollator

    from .dpo import disable_dropout, dpo_trainer

    disable_dropout(model)  # LoRA's dropout layers exist only now
    return dpo_trainer(data_collator=PreferenceCollator(vocab.pad_id), dpo_loss=cfg.dpo_loss(), ref_model=reference,
                       use_weights=cfg.dpo_use_weights, **common)


def _quiet_console(cfg: FinetuneConfig) -> None:
    """With ``disable_tqdm`` (the default off a terminal), transformers' own progress bars (loading and writing
    weights) stay off too; DeepSpeed's CPU notice (filtered for every program by ``medmax.cli``) is heard again in
    a run that uses DeepSpeed."""
    import logging as std_logging

    from transformers.utils import logging as hf_logging

    from medmax.cli import not_deepspeed_cpu_notice

    if cfg.disable_tqdm:
        hf_logging.disable_progress_bar()
    if cfg.deepspeed:
        std_logging.getLogger("DeepSpeed").removeFilter(not_deepspeed_cpu_notice)


def run(cfg: FinetuneConfig, resume: bool = False, resume_anyway: bool = False) -> Trainer | None:
    """Train with ``cfg``; returns the finished trainer, or None when resuming a run that had already finished
    (nothing is trained or written). ``resume_anyway`` resumes without the fingerprint check."""
    from transformers import set_seed

    from medmax.vqgan import save_vqgan

    from .modes import setup_mode

    _quiet_console(cfg)
    checkpoint = _resume_point(cfg, resume or resume_anyway)
    set_seed(cfg.seed)  # before anything random is made (a preset VQGAN, LoRA's adapters), in every mode
    tokenizer, vocab, vqgan = _setup_assets(cfg)
    fingerprint = run_fingerprint(cfg, tokenizer)
    if checkpoint is not None:
        _check_resume(checkpoint, fingerprint, resume_anyway)
    finished = _finished_run(cfg, checkpoint)
    if finished is not None:
        logger.info("%s finished at step %d (max_steps=%d) and holds its final model: nothing to train, nothing "
                    "changed (raise max_steps to train further)", cfg.output_dir, *finished)
        return None
    _check_memory(cfg, tokenizer, vqgan)  # before the data is read and the weights allocated
    if cfg.deepspeed:
        _join_deepspeed_comm()
    vocab_size = _model_vocab_size(cfg, vocab)
    train_set, val_set = _setup_data(cfg, vocab, vocab_size)
    model, base_dir = _setup_model(cfg, tokenizer, vqgan, resume)
    # transformers finds packed boundaries only without a KV cache, and Chameleon makes one whenever use_cache is on
    model.config.use_cache = False
    reference = _reference(cfg, model)
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target_modules)
    model = setup_mode(model, cfg.weights_mode, vocab, cfg.freeze, lora)
    if cfg.gradient_checkpointing and cfg.weights_mode != "full":
        model.enable_input_require_grads()
    output_dir = Path(cfg.output_dir)
    if cfg.should_save:
        save_vqgan(vqgan, output_dir / "vqgan")
    info = {"mode": cfg.mode, "model": cfg.model, "base_model": base_dir if cfg.weights_mode == "lora" else None,
            "vqgan": str(output_dir / "vqgan"), "tokenizer": "tokenizer.json", "fingerprint": fingerprint}
    trainer = _trainer(cfg, vocab, model, reference, train_set, val_set, info, tokenizer, vqgan)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if val_set is not None:
        trainer.evaluate()
    trainer.save_model(str(output_dir))
    if cfg.should_save:
        trainer.save_state()
        write_curves(output_dir, trainer.state.log_history)
    return trainer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmax-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of settings (finetune/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last complete checkpoint in output_dir (same data, tokenizer and mode)")
    parser.add_argument("--resume-anyway", action="store_true",
                        help="resume even when the data, tokenizer or mode differ from the checkpoint's run")
    parser.add_argument("--check", action="store_true",
                        help="read and check the settings, then exit (finetune/launch.sh runs this once before the "
                             "processes start, so a contradiction is reported once, before anything loads)")
    parser.add_argument("--world-size", type=int,
                        help="processes the run has (default: torchrun's WORLD_SIZE, else 1); launch.sh passes it to --check")
    parser.add_argument("overrides", nargs="*", help="key=value settings on top of the YAML")
    return parser


@program("medmax-train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import check_world_size, load_config  # after parsing: --help does not load transformers

    cfg = load_config(args.config, args.overrides)
    check_world_size(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
    if args.check:
        logger.info("%s: settings checked", args.config or "overrides")
        return 0
    from medmax.distributed import leave_group

    try:  # accelerate made the group (when torchrun started several processes); it ends here
        run(cfg, resume=args.resume, resume_anyway=args.resume_anyway)
    finally:
        leave_group()
    return 0


if __name__ == "__main__":
    from medmax.distributed import exit_process

    exit_process(main())  # without the interpreter's teardown when the group's threads outlived it
