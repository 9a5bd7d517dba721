"""The offline demo end to end: SFT the student, distil it with each strategy, evaluate everything.

Every stage is an ordinary run folder named `<prefix>-<stage>`; a stage whose folder already holds a
completed run is reused, so running the pipeline again continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from promptkd.config import BaseConfig, ConfigError, DistillConfig, EvalConfig, SFTConfig, _field
from promptkd.losses import parse_strategy
from promptkd.runs import read_json, read_jsonl

logger = logging.getLogger(__name__)

FIVE_STRATEGIES = ["baseline", "entropy_weighted", "soft_blend", "dynamic_blend", "ta_filter"]


@dataclass
class PipelineConfig(BaseConfig):
    """Settings of the offline demo. The defaults finish in about 25 minutes on 2 CPU cores (bf16)."""

    prefix: str = _field("demo", "Run folder prefix: stages are <prefix>-sft, <prefix>-<strategy>, <prefix>-eval.")
    teacher: str = _field("smollm2-135m-instruct", "Teacher model (preset, hub id or folder).")
    student: str = _field("smollm2-135m-instruct:layers=default", "Student before SFT (preset, hub id or folder).")
    strategies: list = _field(list(FIVE_STRATEGIES), "Strategies to distil with, one run each ('+' composes).")
    mixed_precision: str = _field("bf16", "'no', 'bf16' or 'fp16'; bf16 autocast is about 1.4x faster on CPU.")
    train_limit: int = _field(400, "Training records used by SFT and distillation.")
    eval_limit: int = _field(100, "Test records evaluated.")
    sft_steps: int = _field(100, "SFT optimizer steps of the student.")
    sft_batch_size: int = _field(4, "SFT examples per step.")
    sft_learning_rate: float = _field(1e-4, "SFT learning rate of the student.")
    distill_steps: int = _field(20, "Distillation optimizer steps per strategy.")
    distill_batch_size: int = _field(4, "Prompts per distillation step.")
    distill_learning_rate: float = _field(1e-5, "Distillation learning rate of the student.")
    prompt_learning_rate: float = _field(1e-4, "Learning rate of the soft prompt.")
    eval_batch_size: int = _field(16, "Prompts per generation batch in the evaluation.")
    bertscore_model: str = _field("auto", "BERTScore model ('auto', 'offline', 'none', hub id or folder).")

    def validate(self) -> None:
        super().validate()
        if not self.strategies:
            raise ConfigError("strategies is empty: name at least one strategy.")
        for spec in self.strategies:
            parse_strategy(spec)
        for name in ("sft_steps", "distill_steps", "sft_batch_size", "distill_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: use a positive value.")


def _completed(path: Path) -> bool:
    return (read_json(path / "status.json", {}) or {}).get("state") == "completed"


def _stage_name(prefix: str, strategy: str) -> str:
    return f"{prefix}-{strategy.replace('+', '-')}"


def _common(config: PipelineConfig) -> dict:
    return dict(
        output_dir=config.output_dir,
        seed=config.seed,
        dataset=config.dataset,
        template=config.template,
        max_length=config.max_length,
        mixed_precision=config.mixed_precision,
    )


def run_pipeline(config: PipelineConfig) -> str:
    """Run every stage and return the results table (Markdown)."""
    from promptkd.distill import distill
    from promptkd.evaluate import evaluate, results_markdown
    from promptkd.models import load_model
    from promptkd.sft import sft

    config.validate()
    root = config.runs_root
    started = time.perf_counter()
    timings = {}

    # The teacher is converted once (GGUF to safetensors for the offline preset) before timing the stages.
    stage_started = time.perf_counter()
    load_model(config.teacher)
    timings["prepare teacher"] = time.perf_counter() - stage_started

    sft_name = f"{config.prefix}-sft"
    stage_started = time.perf_counter()
    if not _completed(root / sft_name):
        sft(SFTConfig(
            **_common(config), run_name=sft_name, resume=(root / sft_name).exists(), model=config.student,
            train_limit=config.train_limit, eval_limit=min(config.eval_limit, 50), max_steps=config.sft_steps,
            per_device_batch_size=config.sft_batch_size, gradient_accumulation_steps=1,
            learning_rate=config.sft_learning_rate, save_every=max(config.sft_steps // 2, 1),
        ))
    timings["SFT student"] = time.perf_counter() - stage_started
    sft_student = str(root / sft_name)

    distilled = []
    for strategy in config.strategies:
        name = _stage_name(config.prefix, strategy)
        stage_started = time.perf_counter()
        if not _completed(root / name):
            distill(DistillConfig(
                **_common(config), run_name=name, resume=(root / name).exists(), teacher=config.teacher,
                student=sft_student, strategy=strategy, train_limit=config.train_limit, max_steps=config.distill_steps,
                per_device_batch_size=config.distill_batch_size, learning_rate=config.distill_learning_rate,
                prompt_learning_rate=config.prompt_learning_rate, save_every=max(config.distill_steps // 2, 1),
            ))
        timings[f"distill {strategy}"] = time.perf_counter() - stage_started
        distilled.append((strategy, str(root / name)))

    eval_name = f"{config.prefix}-eval"
    stage_started = time.perf_counter()
    if not _completed(root / eval_name):
        models = [f"teacher={config.teacher}", f"SFT student={sft_student}"]
        models += [f"PromptKD {strategy}={path}" for strategy, path in distilled]
        evaluate(EvalConfig(
            **_common(config), run_name=eval_name, resume=(root / eval_name).exists(), models=models,
            split="test", eval_limit=config.eval_limit, batch_size=config.eval_batch_size,
            bertscore_model=config.bertscore_model,
        ))
    timings["evaluate"] = time.perf_counter() - stage_started

    results = read_json(root / eval_name / "results.json")
    table = results_markdown(results)
    sft_ppl = [row["val_ppl"] for row in read_jsonl(root / sft_name / "metrics.jsonl") if "val_ppl" in row]
    lines = [table, "Wall time per stage in this invocation (a reused stage shows its lookup time):"]
    lines += [f"- {stage}: {seconds:.0f} s" for stage, seconds in timings.items()]
    lines.append(f"- total: {time.perf_counter() - started:.0f} s")
    if sft_ppl:
        lines.append(f"\nStudent validation perplexity: {sft_ppl[0]:.1f} before SFT, {sft_ppl[-1]:.1f} after.")
    return "\n".join(lines)
