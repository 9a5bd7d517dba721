"""The offline demo end to end: SFT the student, distil it with each strategy, evaluate everything.

Every stage is an ordinary run folder named `<prefix>-<stage>`; a stage whose folder already holds a
completed run is reused, so running the pipeline again continues where it stopped.

With several seeds, the distillation and evaluation stages run once per seed as `<prefix>-s<seed>-<stage>`
and a report (promptkd.report) compares the methods over the seeds. The SFT student is shared by
default: one `<prefix>-sft` run with the first seed, so the seeds vary the distillation (data order,
student sampling, soft prompt updates) on top of the same student, and the teacher and SFT student
rows of the report have a standard deviation of 0. `sft_per_seed` trains one SFT student per seed
instead, which also measures the spread that SFT adds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from promptkd.config import BaseConfig, ConfigError, DistillConfig, EvalConfig, SFTConfig, _field
from promptkd.losses import parse_strategy
from promptkd.runs import RunError, read_json, read_jsonl

logger = logging.getLogger(__name__)

FIVE_STRATEGIES = ["baseline", "entropy_weighted", "soft_blend", "dynamic_blend", "ta_filter"]


@dataclass
class PipelineConfig(BaseConfig):
    """Settings of the offline demo; docs/results.md gives what they cost on 2 CPU cores."""

    prefix: str = _field("demo", "Run folder prefix: stages are <prefix>-sft, <prefix>-<strategy>, <prefix>-eval.")
    teacher: str = _field("smollm2-135m-instruct", "Teacher model (preset, hub id or folder).")
    student: str = _field("smollm2-135m-instruct:layers=default", "Student before SFT (preset, hub id or folder).")
    strategies: list = _field(list(FIVE_STRATEGIES), "Strategies to distil with, one run each ('+' composes).")
    mixed_precision: str = _field("bf16", "'no' or 'bf16'; bf16 autocast is about 1.4x faster on CPU.")
    max_length: int = _field(256, "Maximum tokens of prompt plus response; the context is truncated first.")
    train_limit: int = _field(400, "Training records used by SFT and distillation.")
    eval_limit: int = _field(100, "Test records evaluated.")
    sft_steps: int = _field(100, "SFT optimizer steps of the student.")
    sft_batch_size: int = _field(4, "SFT examples per step.")
    sft_learning_rate: float = _field(1e-4, "SFT learning rate of the student.")
    distill_steps: int = _field(20, "Distillation optimizer steps per strategy.")
    distill_batch_size: int = _field(4, "Prompts per distillation step.")
    distill_learning_rate: float = _field(5e-5, "Distillation learning rate of the student.")
    prompt_learning_rate: float = _field(1e-3, "Learning rate of the soft prompt.")
    eval_batch_size: int = _field(16, "Prompts per generation batch in the evaluation.")
    bertscore_model: str = _field("auto", "BERTScore model ('auto', 'offline', 'none', hub id or folder).")
    seeds: list = _field(
        [],
        "Run the distillation and evaluation once per seed (e.g. 1 2 3), as <prefix>-s<seed>-<strategy> and "
        "<prefix>-s<seed>-eval, then write the report <prefix>-report.md (and .json) that compares every method "
        "with 'PromptKD baseline' (or 'SFT student' when the baseline strategy is not run). "
        "Empty: one set of runs with `seed`, named <prefix>-<stage>; a single seed does the same with that seed.",
    )
    sft_per_seed: bool = _field(
        False,
        "With several seeds, fine-tune one SFT student per seed (<prefix>-s<seed>-sft) instead of one shared "
        "<prefix>-sft trained with the first seed.",
    )

    def validate(self) -> None:
        super().validate()
        if not self.strategies:
            raise ConfigError("strategies is empty: name at least one strategy.")
        for spec in self.strategies:
            parse_strategy(spec)
        for name in ("sft_steps", "distill_steps", "sft_batch_size", "distill_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: use a positive value.")
        self.seeds = _parse_seeds(self.seeds)
        if len(self.seeds) > 1 and self.eval_limit < 2:
            raise ConfigError(f"eval_limit={self.eval_limit} is too small for the multi-seed report: use 2 or more test prompts.")


def _parse_seeds(values: list) -> list[int]:
    """Return the seeds as ints; the command line passes them as strings."""
    seeds = []
    for value in values:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"seeds contains {value!r}, which is invalid: use non-negative whole numbers, e.g. --seeds 1 2 3.")
        seeds.append(value)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds} repeats a seed: list each seed once.")
    return seeds


def pipeline_seeds(config: PipelineConfig) -> list[int]:
    """Return the seeds the pipeline runs with: config.seeds, or [config.seed] when it is empty."""
    return list(config.seeds) or [config.seed]


def report_baseline(config: PipelineConfig) -> str:
    """Return the label of the method that the multi-seed report compares the others with."""
    return "PromptKD baseline" if "baseline" in config.strategies else "SFT student"


def _completed(path: Path) -> bool:
    return (read_json(path / "status.json", {}) or {}).get("state") == "completed"


def _require_completed(run) -> None:
    """Stop the pipeline when a stage was stopped (Ctrl-C, SIGTERM), instead of going on to the next one."""
    state = run.status.get("state")
    if state != "completed":
        raise RunError(
            f"Stage {run.name} ended as '{state}' at step {run.status.get('step')}. "
            "Run the same pipeline command again to resume it; completed stages are reused."
        )


def _stage_name(prefix: str, strategy: str) -> str:
    return f"{prefix}-{strategy.replace('+', '-')}"


def _common(config: PipelineConfig, seed: int) -> dict:
    return dict(
        output_dir=config.output_dir,
        seed=seed,
        dataset=config.dataset,
        template=config.template,
        max_length=config.max_length,
        mixed_precision=config.mixed_precision,
    )


def run_pipeline(config: PipelineConfig) -> str:
    """Run every stage and return the results table, or with several seeds the report (Markdown)."""
    from promptkd.models import load_model

    config.validate()
    root = config.runs_root
    seeds = pipeline_seeds(config)
    several = len(seeds) > 1
    started = time.perf_counter()
    timings = {}

    # The teacher is converted once (GGUF to safetensors for the offline preset) before timing the stages.
    stage_started = time.perf_counter()
    load_model(config.teacher)
    timings["prepare teacher"] = time.perf_counter() - stage_started

    sft_names, eval_names = [], []
    for seed in seeds:
        stage_prefix = f"{config.prefix}-s{seed}" if several else config.prefix
        timing_prefix = f"seed {seed}: " if several else ""
        if config.sft_per_seed:
            sft_name, sft_seed = f"{stage_prefix}-sft", seed
        else:
            sft_name, sft_seed = f"{config.prefix}-sft", seeds[0]
        if sft_name not in sft_names:
            sft_names.append(sft_name)
        eval_names.append(_run_seed(config, seed, stage_prefix, sft_name, sft_seed, timing_prefix, timings))

    if several:
        from promptkd.report import make_report

        report_path = root / f"{config.prefix}-report.md"
        _, table = make_report([str(root / name) for name in eval_names], report_baseline(config), out=report_path)
        table += f"\nReport files: {report_path} and {report_path.with_suffix('.json')}\n"
    else:
        from promptkd.evaluate import results_markdown

        table = results_markdown(read_json(root / eval_names[0] / "results.json"))

    lines = [table, "Wall time per stage in this invocation (a reused stage shows its lookup time):"]
    lines += [f"- {stage}: {seconds:.0f} s" for stage, seconds in timings.items()]
    lines.append(f"- total: {time.perf_counter() - started:.0f} s")
    for sft_name in sft_names:
        sft_ppl = [row["val_ppl"] for row in read_jsonl(root / sft_name / "metrics.jsonl") if "val_ppl" in row]
        if sft_ppl:
            where = f" ({sft_name})" if len(sft_names) > 1 else ""
            lines.append(f"\nStudent validation perplexity{where}: {sft_ppl[0]:.1f} before SFT, {sft_ppl[-1]:.1f} after.")
    return "\n".join(lines)


def _run_seed(
    config: PipelineConfig, seed: int, stage_prefix: str, sft_name: str, sft_seed: int, timing_prefix: str, timings: dict
) -> str:
    """Run (or reuse) the SFT, distillation and evaluation stages of one seed and return the evaluation run name."""
    from promptkd.distill import distill
    from promptkd.evaluate import evaluate
    from promptkd.sft import sft

    root = config.runs_root
    stage_started = time.perf_counter()
    if not _completed(root / sft_name):
        _require_completed(sft(SFTConfig(
            **_common(config, sft_seed), run_name=sft_name, resume=(root / sft_name).exists(), model=config.student,
            train_limit=config.train_limit, eval_limit=min(config.eval_limit, 50), max_steps=config.sft_steps,
            per_device_batch_size=config.sft_batch_size, gradient_accumulation_steps=1,
            learning_rate=config.sft_learning_rate, save_every=max(config.sft_steps // 2, 1),
        )))
    timings[f"{timing_prefix}SFT student"] = time.perf_counter() - stage_started
    sft_student = str(root / sft_name)

    distilled = []
    for strategy in config.strategies:
        name = _stage_name(stage_prefix, strategy)
        stage_started = time.perf_counter()
        if not _completed(root / name):
            _require_completed(distill(DistillConfig(
                **_common(config, seed), run_name=name, resume=(root / name).exists(), teacher=config.teacher,
                student=sft_student, strategy=strategy, train_limit=config.train_limit, max_steps=config.distill_steps,
                per_device_batch_size=config.distill_batch_size, learning_rate=config.distill_learning_rate,
                prompt_learning_rate=config.prompt_learning_rate, save_every=max(config.distill_steps // 2, 1),
            )))
        timings[f"{timing_prefix}distill {strategy}"] = time.perf_counter() - stage_started
        distilled.append((strategy, str(root / name)))

    eval_name = f"{stage_prefix}-eval"
    stage_started = time.perf_counter()
    if not _completed(root / eval_name):
        models = [f"teacher={config.teacher}", f"SFT student={sft_student}"]
        models += [f"PromptKD {strategy}={path}" for strategy, path in distilled]
        evaluate(EvalConfig(
            **_common(config, seed), run_name=eval_name, resume=(root / eval_name).exists(), models=models,
            split="test", eval_limit=config.eval_limit, batch_size=config.eval_batch_size,
            bertscore_model=config.bertscore_model,
        ))
    timings[f"{timing_prefix}evaluate"] = time.perf_counter() - stage_started
    return eval_name
