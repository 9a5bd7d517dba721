"""Evaluation runs: greedy decoding on a Dolly split, scored with Exact Match, ROUGE-L and BERTScore.

Each model is also teacher-forced on the reference responses to measure the calibration of its
next-token predictions (promptkd.calibration), unless EvalConfig.calibration is off.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from promptkd import data as dolly
from promptkd.calibration import calibration_stats
from promptkd.config import EvalConfig
from promptkd.generation import generate_greedy
from promptkd.metrics import resolve_bertscore_model, score_predictions
from promptkd.models import load_model_and_tokenizer, resolve_model_source, split_model_spec
from promptkd.runs import Run, atomic_write_json, atomic_write_text, read_json
from promptkd.training import describe_error, make_accelerator

logger = logging.getLogger(__name__)


def split_label(entry: str) -> tuple[str, str]:
    """'label=spec' -> (label, spec). A '=' after a ':' belongs to the spec (e.g. 'model:layers=0,1')."""
    head, sep, tail = entry.partition("=")
    if sep and ":" not in head and head.strip() and tail.strip():
        return head.strip(), tail.strip()
    return default_label(entry), entry


def default_label(spec: str) -> str:
    """Name a model by its spec; a run folder becomes '<run name> (<strategy>)'."""
    path = Path(spec)
    status = read_json(path / "status.json", None) if path.is_dir() else None
    if status is None:
        return spec
    config = read_json(path / "config.json", None) or {}
    try:
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or config
    except (FileNotFoundError, OSError):
        pass
    strategy = config.get("strategy")
    return f"{path.name} ({strategy})" if strategy else path.name


def evaluate_model(
    spec: str, records, config: EvalConfig, device: Optional[torch.device] = None
) -> tuple[dict, list[str]]:
    """Generate greedily for `records` with one model and score the outputs."""
    model, tokenizer = load_model_and_tokenizer(spec)
    model.to(device or torch.device("cpu"))
    max_prompt_tokens = dolly.check_prompt_room(tokenizer, config.template, config.max_length, config.max_new_tokens)
    prompts = [dolly.encode_prompt(r, tokenizer, config.template, max_prompt_tokens) for r in records]

    started = time.perf_counter()
    predictions = generate_greedy(model, tokenizer, prompts, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens)
    generation_s = time.perf_counter() - started
    calibration = _calibration_summary(model, tokenizer, records, config) if config.calibration else {}
    del model
    gc.collect()

    references = [r.response for r in records]
    started = time.perf_counter()
    scores = score_predictions(
        predictions, references, bertscore_model=config.bertscore_model, bertscore_num_layers=config.bertscore_num_layers
    )
    scoring_s = time.perf_counter() - started
    per_example = scores["per_example"]
    summary = {
        "em": scores["exact_match"],
        "rouge_l": scores["rouge_l"],
        "bertscore": scores["bertscore_f1"],
        "bertscore_model": scores["bertscore_model"],
        "generation_s": generation_s,
        "scoring_s": scoring_s,
        **calibration,
        "per_example": {
            "em": per_example["exact_match"],
            "rouge_l": per_example["rouge_l"],
            "bertscore": per_example["bertscore_f1"],
        },
    }
    return summary, predictions


def _calibration_summary(model, tokenizer, records, config: EvalConfig) -> dict:
    """Return the summary fields ece (percent), mean_entropy and mean_nll (nats) and calibration_s of one model."""
    started = time.perf_counter()
    stats = calibration_stats(model, tokenizer, records, config.template, config.max_length, config.batch_size)
    return {
        "ece": 100.0 * stats["ece"],
        "mean_entropy": stats["mean_entropy"],
        "mean_nll": stats["mean_nll"],
        "calibration_s": time.perf_counter() - started,
    }


def format_number(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def results_markdown(results: dict) -> str:
    """The results table: method | EM | ROUGE-L | BERTScore, one row per model, plus ECE | entropy when measured."""
    with_calibration = any("ece" in row for row in results["models"])
    lines = [
        f"Dolly {results['split']} split, {results['num_examples']} prompts, greedy decoding, "
        f"{results['max_new_tokens']} new tokens. BERTScore F1 model: {results['bertscore_model']}.",
    ]
    if with_calibration:
        lines.append(
            "ECE: expected calibration error (%, 10 bins) and entropy: mean predictive entropy (nats) of the "
            "next-token predictions on the teacher-forced reference responses."
        )
    header, rule = "| method | EM | ROUGE-L | BERTScore |", "|---|---:|---:|---:|"
    if with_calibration:
        header, rule = header + " ECE | entropy |", rule + "---:|---:|"
    lines += ["", header, rule]
    for row in results["models"]:
        line = f"| {row['label']} | {format_number(row['em'])} | {format_number(row['rouge_l'])} | {format_number(row['bertscore'])} |"
        if with_calibration:
            line += f" {format_number(row.get('ece'))} | {format_number(row.get('mean_entropy'))} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def evaluate(config: EvalConfig) -> Run:
    """Evaluate every model in config.models; writes results.json, results.md and predictions.jsonl."""
    config.validate()
    entries = [split_label(entry) for entry in config.models]
    for _, spec in entries:
        # A missing folder or bad layer spec fails here, before any model is evaluated.
        resolve_model_source(split_model_spec(spec)[0])
    if config.bertscore_model not in ("auto", "offline", "none"):
        resolve_bertscore_model(config.bertscore_model, config.bertscore_num_layers)  # a mistyped name fails before generation
    records = dolly.load_split(config.dataset, config.split, limit=config.eval_limit)
    accelerator = make_accelerator(config)
    run = Run.create(config, "evaluate", is_main=accelerator.is_main_process)
    logger.info("Evaluation run %s: %d models on %d %s records", run.run_id, len(entries), len(records), config.split)

    results = {
        "split": config.split,
        "num_examples": len(records),
        "indices": [r.index for r in records],
        "max_new_tokens": config.max_new_tokens,
        "bertscore_model": None,
        "models": [],
    }
    prediction_lines = []
    try:
        for step, (label, spec) in enumerate(entries, start=1):
            logger.info("Evaluating %s (%s)", label, spec)
            summary, predictions = evaluate_model(spec, records, config, accelerator.device)
            per_example = summary.pop("per_example")
            results["bertscore_model"] = summary["bertscore_model"]
            results["models"].append({"label": label, "spec": spec, **summary})
            for i, (record, prediction) in enumerate(zip(records, predictions)):
                row = {"model": label, "index": record.index, "prediction": prediction, "reference": record.response}
                row.update({key: values[i] for key, values in per_example.items() if values is not None})
                prediction_lines.append(row)
            run.log_metrics({"step": step, "model": label, **summary})
            run.set_status(step=step, total_steps=len(entries))
            _write_into_source_run(spec, label, summary, config)

        run.write_json("results.json", results)
        run.write_text("results.md", results_markdown(results))
        import json

        run.write_text("predictions.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction_lines))
        run.set_status("completed")
        return run
    except BaseException as error:
        run.set_status("stopped" if isinstance(error, KeyboardInterrupt) else "failed", error=describe_error(error))
        raise
    finally:
        run.close()


def _write_into_source_run(spec: str, label: str, summary: dict, config: EvalConfig) -> None:
    """Record the scores in the evaluated run's own folder, so the runs list can show them."""
    path = Path(spec)
    if not (path / "status.json").is_file():
        return
    existing = read_json(path / "results.json", {}) or {}
    evaluations = existing.get("evaluations", {})
    key = f"{config.split}:{config.eval_limit or 'all'}"
    evaluations[key] = {"label": label, "split": config.split, "eval_limit": config.eval_limit, **summary}
    atomic_write_json(path / "results.json", {"evaluations": evaluations})


def write_markdown(path: Path, results: dict) -> None:
    atomic_write_text(path, results_markdown(results))
