"""Multi-seed report: mean ± std over evaluation runs and paired bootstrap tests against a baseline method.

Each evaluation run folder (results.json and predictions.jsonl, written by promptkd.evaluate) is one
seed. Methods are matched across runs by their label. See docs/significance.md for how to read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from promptkd.config import home_dir
from promptkd.runs import atomic_write_json, atomic_write_text, read_json, read_jsonl
from promptkd.significance import CONFIDENCE_LEVEL, MAX_RESAMPLES, format_p_value, interval_excludes_zero, mean_std, paired_bootstrap

logger = logging.getLogger(__name__)

# Metrics with one score per prompt in predictions.jsonl: averaged over runs, then bootstrapped over prompts.
PROMPT_METRICS = ("em", "rouge_l", "bertscore")
# Metrics with one value per model and run in results.json: reported as mean ± std only.
RUN_METRICS = ("ece", "mean_entropy")
METRIC_NAMES = {"em": "EM", "rouge_l": "ROUGE-L", "bertscore": "BERTScore", "ece": "ECE", "mean_entropy": "entropy"}


class ReportError(ValueError):
    """Evaluation runs that cannot be combined into one report."""


@dataclass
class EvalRun:
    """The scores of one evaluation run folder."""

    name: str
    path: Path
    seed: Optional[int]
    split: Optional[str]
    bertscore_model: Optional[str]
    indices: list[int]
    labels: list[str]
    run_metrics: dict[str, dict[str, float]]  # label -> metric -> value, for RUN_METRICS found in results.json
    prompt_scores: dict[str, dict[str, dict[int, float]]]  # label -> metric -> prompt index -> score


# ----- loading ------------------------------------------------------------------------------------


def resolve_run_path(spec: str) -> Path:
    """Return the folder of an evaluation run given as a path or as a run name under $PROMPTKD_HOME/runs."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    named = home_dir() / "runs" / spec
    if named.is_dir():
        return named
    raise FileNotFoundError(f"Evaluation run {spec!r} not found: neither {path} nor {named} is a folder.")


def _run_seed(path: Path) -> Optional[int]:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return None
    seed = config.get("seed") if isinstance(config, dict) else None
    return seed if isinstance(seed, int) else None


def load_eval_run(path: Path) -> EvalRun:
    """Read results.json and predictions.jsonl of an evaluation run folder.

    Raises ReportError when a file is missing, a prompt is scored twice for a model, or a model lacks
    the score of a prompt listed in results.json.
    """
    path = Path(path)
    results = read_json(path / "results.json", None)
    if not isinstance(results, dict) or "models" not in results or "indices" not in results:
        raise ReportError(
            f"{path} has no evaluation results.json (with 'models' and 'indices'): "
            "pass folders written by `python -m promptkd evaluate` that completed."
        )
    if not (path / "predictions.jsonl").is_file():
        raise ReportError(f"{path}/predictions.jsonl not found: the report needs the per-prompt scores of a completed evaluation.")

    labels = [row["label"] for row in results["models"]]
    if len(set(labels)) != len(labels):
        raise ReportError(f"{path}/results.json lists a model label more than once ({labels}): give each model its own label.")
    run_metrics = {
        row["label"]: {metric: float(row[metric]) for metric in RUN_METRICS if row.get(metric) is not None}
        for row in results["models"]
    }
    indices = [int(index) for index in results["indices"]]
    prompt_scores = _prompt_scores(path, labels, indices)
    return EvalRun(
        name=path.name,
        path=path,
        seed=_run_seed(path),
        split=results.get("split"),
        bertscore_model=results.get("bertscore_model"),
        indices=indices,
        labels=labels,
        run_metrics=run_metrics,
        prompt_scores=prompt_scores,
    )


def _prompt_scores(path: Path, labels: list[str], indices: list[int]) -> dict[str, dict[str, dict[int, float]]]:
    scores: dict[str, dict[str, dict[int, float]]] = {label: {metric: {} for metric in PROMPT_METRICS} for label in labels}
    seen = set()
    for row in read_jsonl(path / "predictions.jsonl"):
        label, index = row.get("model"), row.get("index")
        if label not in scores or not isinstance(index, int):
            continue
        if (label, index) in seen:
            raise ReportError(f"{path}/predictions.jsonl scores prompt {index} twice for {label!r}: the file is corrupt, re-run the evaluation.")
        seen.add((label, index))
        for metric in PROMPT_METRICS:
            if row.get(metric) is not None:
                scores[label][metric][int(index)] = float(row[metric])

    expected = set(indices)
    for label in labels:
        scored = {index for (row_label, index) in seen if row_label == label}
        missing = expected - scored
        if missing:
            raise ReportError(
                f"{path}/predictions.jsonl has no scores of {label!r} for {len(missing)} of {len(expected)} prompts "
                f"(first missing index: {min(missing)}): re-run the evaluation."
            )
    return scores


# ----- checks -------------------------------------------------------------------------------------


def check_runs_match(runs: list[EvalRun]) -> None:
    """Raise ReportError unless all runs share the split, the prompt indices, the method labels and the BERTScore model."""
    if not runs:
        raise ReportError("No evaluation runs given: pass one run folder per seed.")
    paths = [run.path.resolve() for run in runs]
    for position, path in enumerate(paths):
        if path in paths[:position]:
            raise ReportError(f"Evaluation run {path} is listed twice: pass each seed's run once.")

    first = runs[0]
    for run in runs[1:]:
        if run.split != first.split:
            raise ReportError(
                f"Runs {first.name} and {run.name} evaluated different splits ({first.split!r} and {run.split!r}): "
                "evaluate every seed on the same split."
            )
        if set(run.indices) != set(first.indices):
            only_first = sorted(set(first.indices) - set(run.indices))
            only_run = sorted(set(run.indices) - set(first.indices))
            parts = [f"{len(only)} only in {name} (first: {only[:3]})" for only, name in ((only_first, first.name), (only_run, run.name)) if only]
            raise ReportError(
                f"Runs {first.name} ({len(first.indices)} prompts) and {run.name} ({len(run.indices)} prompts) were "
                f"evaluated on different prompt indices: {', '.join(parts)}. "
                "Evaluate every seed with the same dataset, split and eval_limit."
            )
        if set(run.labels) != set(first.labels):
            raise ReportError(
                f"Runs {first.name} and {run.name} evaluated different methods: {sorted(first.labels)} and "
                f"{sorted(run.labels)}. Methods are matched by label, so give every seed the same labels."
            )
        if first.bertscore_model and run.bertscore_model and run.bertscore_model != first.bertscore_model:
            raise ReportError(
                f"Runs {first.name} and {run.name} used different BERTScore models ({first.bertscore_model!r} and "
                f"{run.bertscore_model!r}), whose scores are not comparable: evaluate every seed with the same bertscore_model."
            )


def _shared_metrics(runs: list[EvalRun]) -> list[str]:
    """Return the per-prompt metrics that every run scored for every method."""
    shared = []
    for metric in PROMPT_METRICS:
        complete = all(run.prompt_scores[label][metric] for run in runs for label in run.labels)
        if complete:
            shared.append(metric)
        elif any(run.prompt_scores[label][metric] for run in runs for label in run.labels):
            logger.warning("%s is missing from some runs or methods, so the report leaves it out.", METRIC_NAMES[metric])
    return shared


# ----- the report ---------------------------------------------------------------------------------


def seed_averaged_scores(runs: list[EvalRun], label: str, metric: str, indices: list[int]) -> np.ndarray:
    """Return the per-prompt scores of one method, averaged over the runs, in the order of `indices` (n,)."""
    table = np.array([[run.prompt_scores[label][metric][index] for index in indices] for run in runs])  # (runs, n)
    return table.mean(axis=0)


def _method_entry(runs: list[EvalRun], label: str, metrics: list[str], indices: list[int]) -> dict:
    per_run: dict[str, list[float]] = {}
    for metric in metrics:
        per_run[metric] = [float(np.mean([run.prompt_scores[label][metric][index] for index in indices])) for run in runs]
    for metric in RUN_METRICS:
        values = [run.run_metrics[label].get(metric) for run in runs]
        if all(value is not None for value in values):
            per_run[metric] = values

    entry = {"label": label, "per_run": per_run, "mean": {}, "std": {}, "vs_baseline": None}
    for metric, values in per_run.items():
        entry["mean"][metric], entry["std"][metric] = mean_std(values)
    return entry


def build_report(runs: list[EvalRun], baseline: str, num_resamples: int = 1000, seed: int = 0) -> dict:
    """Combine evaluation runs (one per seed) into the report dict that report.json stores.

    For each method: the mean and sample standard deviation over runs of EM, ROUGE-L and BERTScore (each
    run's mean over prompts) and, when every run measured them, of ECE and mean entropy. For each method
    other than `baseline`: a paired bootstrap (promptkd.significance.paired_bootstrap) of its per-prompt
    scores against the baseline's, both averaged over the runs first.
    """
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or not 1 <= num_resamples <= MAX_RESAMPLES:
        raise ReportError(f"num_resamples={num_resamples!r} is invalid: use a whole number from 1 to {MAX_RESAMPLES} (1000 is usual).")
    check_runs_match(runs)
    labels = runs[0].labels
    if baseline not in labels:
        raise ReportError(f"Baseline {baseline!r} is not an evaluated method: choose one of {labels}.")
    indices = sorted(runs[0].indices)
    metrics = _shared_metrics(runs)

    methods = [_method_entry(runs, label, metrics, indices) for label in labels]
    base_scores = {metric: seed_averaged_scores(runs, baseline, metric, indices) for metric in metrics}
    for entry in methods:
        if entry["label"] == baseline:
            continue
        comparisons = {}
        for metric in metrics:
            other = seed_averaged_scores(runs, entry["label"], metric, indices)
            result = paired_bootstrap(base_scores[metric], other, num_resamples=num_resamples, seed=seed)
            comparisons[metric] = {**result, "significant": interval_excludes_zero(result)}
        entry["vs_baseline"] = comparisons

    return {
        "runs": [{"name": run.name, "path": str(run.path), "seed": run.seed} for run in runs],
        "num_runs": len(runs),
        "split": runs[0].split,
        "num_prompts": len(indices),
        "indices": indices,
        "bertscore_model": next((run.bertscore_model for run in runs if run.bertscore_model), None),
        "baseline": baseline,
        "num_resamples": num_resamples,
        "bootstrap_seed": seed,
        "confidence_level": CONFIDENCE_LEVEL,
        "metrics": metrics,
        "run_metrics": [metric for metric in RUN_METRICS if any(metric in entry["mean"] for entry in methods)],
        "methods": methods,
    }


# ----- Markdown -----------------------------------------------------------------------------------


def _mean_std_cell(entry: dict, metric: str) -> str:
    if metric not in entry["mean"]:
        return "–"
    return f"{entry['mean'][metric]:.2f} ± {entry['std'][metric]:.2f}"


def _difference_cell(comparison: dict, num_resamples: int) -> str:
    mark = "*" if comparison["significant"] else ""
    return (
        f"{comparison['diff']:+.2f}{mark} [{comparison['ci_low']:.2f}, {comparison['ci_high']:.2f}] "
        f"{format_p_value(comparison['p_value'], num_resamples)}"
    )


def report_markdown(report: dict) -> str:
    """Render a build_report dict as Markdown: a mean ± std table and a table of differences from the baseline."""
    runs = report["runs"]
    run_names = ", ".join(run["name"] + (f" (seed {run['seed']})" if run["seed"] is not None else "") for run in runs)
    columns = report["metrics"] + report["run_metrics"]
    level = round(100 * report["confidence_level"])
    lines = [
        f"{report['num_runs']} evaluation runs: {run_names}. Dolly {report['split']} split, {report['num_prompts']} prompts. "
        f"BERTScore F1 model: {report['bertscore_model']}.",
        "",
        "Mean ± sample standard deviation over the runs (std is 0 when there is one run). EM, ROUGE-L and "
        "BERTScore are x100; ECE is in % (10 bins) and entropy in nats.",
        "",
        "| method | " + " | ".join(METRIC_NAMES[metric] for metric in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for entry in report["methods"]:
        lines.append(f"| {entry['label']} | " + " | ".join(_mean_std_cell(entry, metric) for metric in columns) + " |")

    metrics = report["metrics"]
    lines += [
        "",
        f"Difference from {report['baseline']}: method − baseline of the per-prompt scores averaged over the runs, "
        f"[{level}% paired bootstrap percentile interval over prompts], two-sided p-value "
        f"({report['num_resamples']} resamples, seed {report['bootstrap_seed']}). * marks an interval that excludes 0.",
        "",
        "| method | " + " | ".join("Δ" + METRIC_NAMES[metric] for metric in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for entry in report["methods"]:
        if entry["vs_baseline"] is None:
            continue
        cells = [_difference_cell(entry["vs_baseline"][metric], report["num_resamples"]) for metric in metrics]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, markdown_path: Path) -> tuple[Path, Path]:
    """Write the Markdown report to `markdown_path` and the report dict next to it (same name, .json)."""
    markdown_path = Path(markdown_path)
    json_path = markdown_path.with_suffix(".json")
    if json_path == markdown_path:
        raise ReportError(f"Report path {markdown_path} ends in .json: give a Markdown file name such as report.md.")
    atomic_write_text(markdown_path, report_markdown(report))
    atomic_write_json(json_path, report)
    return markdown_path, json_path


def make_report(
    run_specs: list[str], baseline: str, num_resamples: int = 1000, seed: int = 0, out: Optional[Path] = None
) -> tuple[dict, str]:
    """Load evaluation runs (paths or run names), build the report, write it when `out` is set, and return it with its Markdown."""
    runs = [load_eval_run(resolve_run_path(spec)) for spec in run_specs]
    logger.info("Report over %d evaluation runs against %r (%d resamples)", len(runs), baseline, num_resamples)
    report = build_report(runs, baseline, num_resamples=num_resamples, seed=seed)
    if out is not None:
        markdown_path, json_path = write_report(report, out)
        logger.info("Wrote %s and %s", markdown_path, json_path)
    return report, report_markdown(report)

