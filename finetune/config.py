"""The fine-tuning configuration: transformers' ``TrainingArguments`` plus the fields of this toolkit.

One YAML per run, ``key=value`` overrides on top (values parsed as YAML: ``max_steps=5``,
``packing=false``, ``freeze=[lm_head]``). Written in the style of trl's ``SFTConfig``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import TrainingArguments

from medmax.errors import UserError
from medmax.model import MODEL_PRESETS
from medmax.presets import TOKENIZER_PRESETS, VQGAN_PRESETS, parse_preset

MODES = ("full", "lora", "image-alignment", "dpo", "grpo")
DPO_WEIGHTS = ("lora", "full")  # what mode dpo (and grpo) trains
DPO_REFERENCES = ("auto", "copy")
DPO_FIELDS = ("dpo_weights", "dpo_beta", "dpo_loss_type", "dpo_label_smoothing", "rpo_alpha", "dpo_use_weights",
              "dpo_reference")
# modes that cannot run with sharded weight matrices (FSDP, ZeRO-3), and why
SHARDING_REFUSED = {
    "image-alignment": "the trainable image rows sit beside weight matrices this setting shards",
    "grpo": "sampling calls the model's layers outside its forward, and each process runs a number of forwards of "
            "its own (speculative decoding, text that ends early), while this setting gathers the weights inside "
            "every forward of the whole model",
}
GRPO_FIELDS = ("grpo_weights", "grpo_num_generations", "grpo_beta", "grpo_epsilon", "grpo_epsilon_high",
               "grpo_reference", "grpo_generation", "rewards", "reward_weights", "reward_settings", "prompt_tasks")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Yaml12Loader(yaml.SafeLoader):
    """YAML where only true/false are booleans, so ``save_strategy: no`` stays the string "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    key: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_Yaml12Loader.add_implicit_resolver(  # 1e-3 is a float (YAML 1.1 wants 1.0e-3)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(UserError):
    """A setting that cannot work; the message names the setting."""


@dataclass
class DatasetSpec:
    """One training folder and its relative sampling weight."""

    path: str
    weight: float = 1.0


@dataclass
class FinetuneConfig(TrainingArguments):
    """Everything a fine-tuning run needs; fields below are ours, the rest are transformers' own."""

    model: str = field(default="preset:tiny", metadata={
        "help": "A Hugging Face Chameleon folder (a model folder from finetune.export, or transformers' converter "
                "output), or preset:NAME (tiny/small/base/7b) initialised from scratch."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer.json (or a folder holding one), or preset:tiny. Required with a preset model; "
                "defaults to the model folder's."})
    vqgan: str | None = field(default=None, metadata={
        "help": "VQGAN folder for medmax.vqgan.load_vqgan, or preset:tiny (random weights, smoke runs). Required with a preset, or when the model folder has no "
                "vqgan/ (a plain HF folder holds only the encoder; export must ship the decoder too)."})
    datasets: list = field(default_factory=list, metadata={
        "help": "Sequence folders from tokenization.build_sequences: each a path, 'path:weight', or "
                "{path: ..., weight: ...}. Weights are relative sampling rates per epoch."})
    validation: str | None = field(default=None, metadata={
        "help": "A sequence folder, or a fraction (e.g. 0.05) held out of every training folder; none by default."})
    mode: str = field(default="lora", metadata={
        "help": f"One of {MODES}. image-alignment and grpo are refused with FSDP or DeepSpeed ZeRO-3 "
                "(use DDP or ZeRO-2)."})
    dpo_weights: str = field(default="lora", metadata={
        "help": f"mode dpo: which weights train, one of {DPO_WEIGHTS} (LoRA settings as in mode lora)."})
    dpo_beta: float = field(default=0.1, metadata={"help": "mode dpo: beta, the strength of the pull towards the reference."})
    dpo_loss_type: str = field(default="sigmoid", metadata={
        "help": "mode dpo: sigmoid (DPO), hinge, ipo or sigmoid_norm, as TRL names them (medmax.dpo)."})
    dpo_label_smoothing: float = field(default=0.0, metadata={"help": "mode dpo: cDPO's label smoothing (sigmoid loss)."})
    rpo_alpha: float = field(default=0.0, metadata={
        "help": "mode dpo: factor of RPO's NLL on the chosen continuation (mean per token); 0 = plain DPO."})
    dpo_use_weights: bool = field(default=True, metadata={
        "help": "mode dpo: multiply each pair's loss by its weight from the preference folder (MMedPO)."})
    dpo_reference: str = field(default="auto", metadata={
        "help": "mode dpo: auto = under LoRA the same weights with adapters disabled, else a frozen copy; "
                "copy = always a frozen copy of the starting model."})
    grpo_weights: str = field(default="lora", metadata={
        "help": f"mode grpo: which weights train, one of {DPO_WEIGHTS} (LoRA settings as in mode lora)."})
    grpo_num_generations: int = field(default=4, metadata={
        "help": "mode grpo: G, continuations sampled per prompt (a group); advantages are normalised per group."})
    grpo_beta: float = field(default=0.04, metadata={
        "help": "mode grpo: factor of the KL term to the reference (k3 estimator); 0 = no reference."})
    grpo_epsilon: float = field(default=0.2, metadata={"help": "mode grpo: the policy ratio's clip, 1 +- epsilon."})
    grpo_epsilon_high: float | None = field(default=None, metadata={
        "help": "mode grpo: the upper clip (DAPO's clip-higher); null = grpo_epsilon."})
    grpo_reference: str = field(default="auto", metadata={
        "help": "mode grpo: auto = under LoRA the same weights with adapters disabled, else a frozen copy; "
                "copy = always a frozen copy of the starting model."})
    grpo_generation: dict = field(default_factory=dict, metadata={
        "help": "mode grpo: how to sample, medmax.generation.GenerationConfig's fields (mode: image by default; "
                "text or interleaved for text continuations); batch_size defaults to a group per batch."})
    rewards: list = field(default_factory=list, metadata={
        "help": "mode grpo: reward functions as module:function (built in: medmax.grpo_rewards:lesion_locator, "
                "clip_similarity, classifier_probability, self_consistency)."})
    reward_weights: list | None = field(default=None, metadata={
        "help": "mode grpo: one weight per reward (the total is their weighted sum); null = all 1."})
    reward_settings: dict = field(default_factory=dict, metadata={
        "help": "mode grpo: keyword arguments per reward function name, e.g. {clip_similarity: {model: PATH}}."})
    prompt_tasks: list = field(default_factory=list, metadata={
        "help": "mode grpo: keep only prompt rows whose 'task' is listed (e.g. [image_generation]); [] = every row."})
    freeze: list = field(default_factory=list, metadata={
        "help": "Regular expressions (re.search) over parameter names to freeze in addition to the mode."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (mode lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (mode lora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (mode lora)."})
    lora_target_modules: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), metadata={
        "help": "Module names LoRA wraps; MedMax's q/k/v/o/gate/up/down by default."})
    data_store: bool = field(default=True, metadata={
        "help": "Memory-map each dataset from its token store (medmax.data.store: made once beside the folder, "
                "shared by every rank through the page cache). false: read every folder into each process."})
    store_dir: str | None = field(default=None, metadata={
        "help": "Where token stores are made (default: FOLDER.store beside each folder); remote stores are copied here."})
    packing: bool = field(default=True, metadata={
        "help": "Pack several sequences per row (no cross-attention, positions restart). false = pad each "
                "sequence to the longest in its batch, as MedMax does."})
    max_length: int = field(default=4096, metadata={"help": "Longest row (packed) or sequence (padding), in tokens."})
    pad_to_max_length: bool = field(default=False, metadata={
        "help": "Packing: pad every row to max_length (fixed shapes) instead of to the longest row in the batch."})
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "sdpa, eager or flash_attention_2; packing works with all three (boundaries come from positions)."})
    model_dtype: str = field(default="float32", metadata={
        "help": "dtype the weights are loaded in (float32, bfloat16); mixed precision is bf16=true."})
    skip_memory_check: bool = field(default=False, metadata={
        "help": "Load the model even when its config's sizes need more memory than is available (refused by default)."})
    max_seconds: float | None = field(default=None, metadata={
        "help": "Stop after this much wall time of training (checked after each optimizer step, agreed by every "
                "process), saving a checkpoint there so that --resume continues; none by default."})
    trust_checkpoint: bool = field(default=False, metadata={
        "help": "Allow a legacy pickled VQGAN checkpoint (runs code from the file)."})
    # transformers' defaults we change: log to TensorBoard, our own columns reach the collator
    report_to: str | list = field(default="tensorboard", metadata={"help": "tensorboard, wandb, none, or a list."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: rows carry position_ids."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    prediction_loss_only: bool = field(default=True, metadata={
        "help": "Validation keeps only the loss (gathering (B, T, 65536) logits per batch would exhaust memory)."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer name (transformers' OptimizerNames)."})
    disable_tqdm: bool | None = field(default=None, metadata={
        "help": "No progress bars: metrics go to the log as lines. Default: bars only on an interactive terminal "
                "(a log file or a pipe gets lines, not bar fragments)."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP: search every step for trainable weights the forward did not use. Every mode uses all of "
                "its trainable weights (the VQGAN is frozen), so false: no extra graph traversal and no warning."})

    def __post_init__(self):
        self._check_fields()
        if self.validation is not None and _value(self.eval_strategy) == "no":
            self.eval_strategy = "steps"  # validation given: evaluate every eval_steps (default logging_steps)
        check_contradictions(self)
        if self.disable_tqdm is None:
            self.disable_tqdm = not sys.stderr.isatty()
        super().__post_init__()

    def _check_fields(self) -> None:
        for key in ("datasets", "freeze", "lora_target_modules"):  # `datasets=PATH` on the command line is one entry
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: choose one of {MODES}")
        if not self.datasets:
            raise ConfigError("datasets: give at least one folder written by tokenization.build_sequences")
        self.dataset_specs()  # parses, raises on a bad entry
        if self.max_length <= 1:
            raise ConfigError(f"max_length={self.max_length}: must be at least 2")
        try:
            for key, choices in (("model", MODEL_PRESETS), ("tokenizer", TOKENIZER_PRESETS), ("vqgan", VQGAN_PRESETS)):
                parse_preset(getattr(self, key), choices, key)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.is_preset:
            for key in ("tokenizer", "vqgan"):
                if not getattr(self, key):
                    raise ConfigError(f"{key}: required when model is a preset ({self.model})")
        self._check_dpo()
        self._check_grpo()
        if self.weights_mode == "lora" and (self.lora_r <= 0 or self.lora_alpha <= 0):
            raise ConfigError(f"lora_r={self.lora_r}, lora_alpha={self.lora_alpha}: both must be positive")
        self.validation_fraction()  # raises on a bad value
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"max_seconds={self.max_seconds}: must be > 0 (or null for no bound)")
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model_dtype={self.model_dtype!r}: choose float32, bfloat16 or float16")
        sharded = sharded_weights(self.fsdp, self.deepspeed) if self.mode in SHARDING_REFUSED else None
        if sharded:
            raise ConfigError(f"mode={self.mode} with {sharded}: not supported ({SHARDING_REFUSED[self.mode]}); "
                              "use DDP or deepspeed ZeRO-2")

    def _refuse_set_fields(self, names: tuple[str, ...], mode: str) -> None:
        """A mode's own settings given a value other than their default while another mode runs: one error."""
        defaults = {f.name: (f.default_factory() if callable(f.default_factory) else f.default)
                    for f in fields(FinetuneConfig) if f.name in names}
        stray = [f"{k}={getattr(self, k)!r}" for k in names if getattr(self, k) != defaults[k]]
        if stray:
            raise ConfigError(f"{', '.join(stray)}: only used with mode: {mode} (mode is {self.mode})")

    def _check_dpo(self) -> None:
        if self.mode != "dpo":
            self._refuse_set_fields(DPO_FIELDS, "dpo")
            return
        if self.dpo_weights not in DPO_WEIGHTS:
            raise ConfigError(f"dpo_weights={self.dpo_weights!r}: choose one of {DPO_WEIGHTS}")
        if self.dpo_reference not in DPO_REFERENCES:
            raise ConfigError(f"dpo_reference={self.dpo_reference!r}: choose one of {DPO_REFERENCES}")
        try:
            self.dpo_loss()
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_grpo(self) -> None:
        for key in ("rewards", "prompt_tasks"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])
        if self.mode != "grpo":
            self._refuse_set_fields(GRPO_FIELDS, "grpo")
            return
        if self.grpo_weights not in DPO_WEIGHTS:
            raise ConfigError(f"grpo_weights={self.grpo_weights!r}: choose one of {DPO_WEIGHTS}")
        if self.grpo_reference not in DPO_REFERENCES:
            raise ConfigError(f"grpo_reference={self.grpo_reference!r}: choose one of {DPO_REFERENCES}")
        if self.grpo_num_generations < 1:
            raise ConfigError(f"grpo_num_generations={self.grpo_num_generations}: must be at least 1 (2 or more to learn)")
        if self.validation is not None:
            raise ConfigError(f"validation={self.validation}: mode grpo has no validation loss; measure the exported "
                              "model with eval.run instead")
        if not self.rewards:
            raise ConfigError("rewards: mode grpo needs at least one reward (module:function)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"reward_weights={self.reward_weights}: one weight per reward ({len(self.rewards)})")
        try:
            self.grpo_loss()
            self.generation_config()
            self.reward_functions()
        except (ValueError, TypeError, UserError) as err:
            raise ConfigError(str(err)) from None

    def grpo_loss(self):
        """The GRPO objective these settings describe (``medmax.grpo.GRPOLoss``)."""
        from medmax.grpo import GRPOLoss

        return GRPOLoss(self.grpo_beta, self.grpo_epsilon, self.grpo_epsilon_high)

    def generation_config(self):
        """How mode grpo samples (``medmax.generation.GenerationConfig``): image mode and a batch of one group,
        unless ``grpo_generation`` says otherwise."""
        from medmax.generation import GenerationConfig

        known = {f.name for f in fields(GenerationConfig)}
        unknown = sorted(set(self.grpo_generation or {}) - known)
        if unknown:
            raise ConfigError(f"grpo_generation: unknown settings {unknown} (GenerationConfig's fields: {sorted(known)})")
        values = {"mode": "image", "batch_size": self.grpo_num_generations, **(self.grpo_generation or {})}
        return GenerationConfig(**values)

    def reward_functions(self):
        """The configured rewards (``medmax.grpo.Reward``), loaded; a bad name or settings key raises ConfigError."""
        from medmax.grpo import GRPOSettingError, Reward, load_reward

        weights = self.reward_weights or [1.0] * len(self.rewards)
        names = [str(spec).rpartition(":")[2] for spec in self.rewards]
        stray = sorted(set(self.reward_settings or {}) - set(names))
        if stray:
            raise ConfigError(f"reward_settings: {stray} name no reward in rewards ({names})")
        try:
            return [Reward(name, load_reward(spec), float(w), dict((self.reward_settings or {}).get(name) or {}))
                    for spec, name, w in zip(self.rewards, names, weights)]
        except GRPOSettingError as err:
            raise ConfigError(str(err)) from None

    def dpo_loss(self):
        """The DPO objective these settings describe (``medmax.dpo.DPOLoss``)."""
        from medmax.dpo import DPOLoss

        return DPOLoss(self.dpo_beta, self.dpo_loss_type, self.dpo_label_smoothing, self.rpo_alpha)

    @property
    def weights_mode(self) -> str:
        """What trains: full, lora or image-alignment (mode dpo: its dpo_weights; mode grpo: its grpo_weights)."""
        return {"dpo": self.dpo_weights, "grpo": self.grpo_weights}.get(self.mode, self.mode)

    @property
    def is_preset(self) -> bool:
        return self.preset_name is not None

    @property
    def preset_name(self) -> str | None:
        """NAME when ``model`` is ``preset:NAME``, else None."""
        return parse_preset(self.model, MODEL_PRESETS, "model")

    def dataset_specs(self) -> list[DatasetSpec]:
        specs = []
        for entry in self.datasets:
            if isinstance(entry, dict):
                path, weight = str(entry["path"]), entry.get("weight", 1.0)
            else:
                path, _, weight = str(entry).rpartition(":") if _has_weight(str(entry)) else (str(entry), "", "1")
            try:
                spec = DatasetSpec(path, float(weight))
            except (TypeError, ValueError):
                spec = DatasetSpec(path, math.nan)
            if not (math.isfinite(spec.weight) and spec.weight > 0):
                raise ConfigError(f"datasets: {path} has weight {weight!r}; weights must be positive finite numbers")
            specs.append(spec)
        return specs

    def validation_fraction(self) -> float | None:
        """The held-out fraction, or None when ``validation`` is a folder or unset."""
        if self.validation is None:
            return None
        try:
            value = float(self.validation)
        except ValueError:
            return None
        if not 0 < value < 1:
            raise ConfigError(f"validation={self.validation}: a fraction must lie strictly between 0 and 1")
        return value


FSDP1_ONLY = ("backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers")
NEEDS_EVALUATION = {"load_best_model_at_end": (True,), "lr_scheduler_type": ("reduce_lr_on_plateau", "greedy")}


def _value(setting):
    """A setting as written: ``IntervalStrategy.STEPS`` -> "steps" (transformers turns strings into enums later)."""
    return getattr(setting, "value", setting)


def _named(key: str, value) -> str:
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def check_contradictions(cfg: FinetuneConfig) -> None:
    """Settings that cannot hold together, refused in one line naming both (before transformers' own checks,
    which raise inside every rank once the model and the data have loaded, or drop a setting without a word)."""
    _check_evaluation(cfg)
    _check_sharding(cfg)
    _check_precision(cfg)
    if cfg.pad_to_max_length and not cfg.packing:
        raise ConfigError("pad_to_max_length=true pads packed rows, but packing=false: each sequence is padded to the "
                          "longest in its batch; drop pad_to_max_length or set packing=true")


def _check_evaluation(cfg: FinetuneConfig) -> None:
    evaluate = _value(cfg.eval_strategy)
    if cfg.validation is None:
        if evaluate != "no":
            raise ConfigError(f"eval_strategy={evaluate} evaluates on validation, but validation is not set: give "
                              "validation=FOLDER or a fraction (e.g. 0.05), or set eval_strategy=no")
        for key, values in NEEDS_EVALUATION.items():
            if _value(getattr(cfg, key)) in values:
                raise ConfigError(f"{_named(key, _value(getattr(cfg, key)))} needs an evaluation, but validation is "
                                  "not set: give validation=FOLDER or a fraction (e.g. 0.05)")
    save = _value(cfg.save_strategy)
    if cfg.load_best_model_at_end and save not in ("best", evaluate):
        raise ConfigError(f"load_best_model_at_end=true picks among the checkpoints saved at evaluations, but "
                          f"save_strategy={save} and eval_strategy={evaluate}: make them match (or save_strategy=best)")


def _check_sharding(cfg: FinetuneConfig) -> None:
    if cfg.fsdp and cfg.deepspeed:
        raise ConfigError(f"{_named('fsdp', cfg.fsdp)} and deepspeed={cfg.deepspeed}: both shard the model; choose one")
    if cfg.fsdp_config and not cfg.fsdp:
        raise ConfigError(f"fsdp_config={cfg.fsdp_config} has no effect without fsdp: set fsdp=true, or drop fsdp_config")
    if not cfg.fsdp:
        return
    doc = {k.removeprefix("fsdp_"): v for k, v in (_json_setting("fsdp_config", cfg.fsdp_config) or {}).items()}
    version = int(doc.get("version", 2))
    stale = [key for key in FSDP1_ONLY if key in doc]
    if version == 2 and stale:
        raise ConfigError(f"fsdp_config={cfg.fsdp_config}: {', '.join(stale)} are FSDP1 settings, which FSDP2 (version 2, "
                          "transformers' default) ignores; remove them, or set version: 1 (deprecated)")
    if version == 1 and cfg.use_cpu:
        raise ConfigError(f"fsdp_config={cfg.fsdp_config}: version 1 (FSDP1) with use_cpu=true; only FSDP2 (version 2) "
                          "runs on CPU processes")
    if str(doc.get("activation_checkpointing", "false")).lower() == "true" and (
            cfg.gradient_checkpointing or getattr(cfg, "activation_checkpointing", None)):
        raise ConfigError(f"gradient_checkpointing=true and fsdp_config={cfg.fsdp_config} activation_checkpointing=true "
                          "both checkpoint activations; keep only fsdp_config's (gradient_checkpointing=false)")


def _check_precision(cfg: FinetuneConfig) -> None:
    import torch

    gpu = torch.cuda.is_available() and not cfg.use_cpu
    if cfg.fp16 and not gpu:
        where = "use_cpu=true" if cfg.use_cpu else "no CUDA GPU here"
        raise ConfigError(f"fp16=true needs a CUDA GPU, but {where}: on CPU use bf16=true or neither")
    if (cfg.bf16 or cfg.bf16_full_eval) and not cfg.use_cpu and not torch.cuda.is_available():
        raise ConfigError("bf16=true needs a GPU, and there is none here: add use_cpu=true to train on the CPU "
                          "(bf16 autocast), or set bf16=false")


def check_world_size(cfg: FinetuneConfig, world_size: int) -> None:
    """FSDP shards over processes: refuse it in a single process, before the model loads (transformers would raise
    "Using fsdp only works in distributed training" after)."""
    if cfg.fsdp and world_size < 2:
        raise ConfigError(f"{_named('fsdp', cfg.fsdp)} shards the model over processes, but this run has 1 process: "
                          "launch it with finetune/launch.sh --nproc-per-node N (N >= 2), or drop fsdp")


def _json_setting(key: str, value) -> dict | None:
    """A setting given as a dict or as the path of a JSON file; a missing file is transformers' to report."""
    if not isinstance(value, (str, Path)):
        return value
    try:
        doc = json.loads(Path(value).read_text())
    except OSError:
        return None
    except ValueError as err:
        raise ConfigError(f"{key}={value}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{key}={value}: expected a JSON object")
    return doc


def sharded_weights(fsdp, deepspeed) -> str | None:
    """The setting that shards the weight matrices themselves (FSDP, DeepSpeed ZeRO-3), named; None otherwise."""
    if fsdp:
        return f"fsdp={' '.join(fsdp) if isinstance(fsdp, list) else fsdp!r}"
    doc = _json_setting("deepspeed", deepspeed)
    stage = ((doc or {}).get("zero_optimization") or {}).get("stage") if isinstance(doc, dict) else None
    if stage == 3:
        return f"deepspeed={deepspeed} (ZeRO stage 3)" if isinstance(deepspeed, (str, Path)) else "deepspeed (ZeRO stage 3)"
    return None


def _has_weight(entry: str) -> bool:
    head, sep, tail = entry.rpartition(":")
    if not sep:
        return False
    try:
        float(tail)
    except ValueError:
        return False
    return bool(head)


def parse_overrides(overrides: list[str]) -> dict:
    """``key=value`` strings to a dict, values parsed as YAML; a bare word names the bad override."""
    result = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        result[key.strip()] = parse_yaml(value)
    return result


def load_config(path: str | Path | None, overrides: list[str] = (), **extra) -> FinetuneConfig:
    """A config from a YAML file, then ``key=value`` overrides, then keyword arguments."""
    values = {}
    if path is not None:
        values = parse_yaml(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
    values.update(parse_overrides(list(overrides)))
    values.update(extra)
    known = {f.name for f in fields(FinetuneConfig) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path or 'overrides'}: unknown settings {unknown}")
    try:
        return FinetuneConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None
    except ValueError as err:
        if not _raised_by_training_arguments(err):
            raise
        raise ConfigError(f"{path or 'config'}: {' '.join(str(err).split())}") from None


def _raised_by_training_arguments(err: BaseException) -> bool:
    """transformers' own checks of the settings (raised in ``training_args.py``, some over several lines), as
    opposed to an error from deeper down (torch.distributed, accelerate), which keeps its traceback."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).name == "training_args.py"
