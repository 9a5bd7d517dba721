"""Aggregate promptkd evaluation runs over seeds: mean ± sample standard deviation per metric and method.

    python scripts/aggregate_results.py checkpoints/runs/gpu-ref-seed1-eval checkpoints/runs/gpu-ref-seed2-eval ...

Each argument is an evaluation run folder (or its results.json). Rows are grouped by their label, so every
seed's evaluation must label the same method the same way. All inputs must cover the same split, records and
decoding length; a mix is rejected. The table goes to stdout as Markdown (or JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

# results.json field -> table column. Fields missing from every input are left out of the table.
METRICS = {
    "em": "EM",
    "rouge_l": "ROUGE-L",
    "bertscore": "BERTScore",
    "ece": "ECE (%)",
    "mean_entropy": "entropy (nats)",
    "mean_nll": "NLL (nats)",
}
# Fields that must agree across the inputs, so that only evaluations of the same records are combined.
SETTINGS = ("split", "num_examples", "indices", "max_new_tokens", "bertscore_model")


class AggregationError(ValueError):
    """The inputs cannot be combined into one table."""


def results_path(path: Path) -> Path:
    path = Path(path)
    return path / "results.json" if path.is_dir() else path


def load_results(path: Path) -> dict:
    file = results_path(path)
    if not file.is_file():
        raise AggregationError(f"{file} not found: pass evaluation run folders that hold a results.json, or those files.")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AggregationError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(results.get("models"), list):
        raise AggregationError(f"{file} has no 'models' list: it is not the results.json of an evaluation run.")
    return results


def check_same_settings(inputs: list[tuple[Path, dict]]) -> None:
    first_path, first = inputs[0]
    for path, results in inputs[1:]:
        for key in SETTINGS:
            if results.get(key) != first.get(key):
                raise AggregationError(
                    f"{results_path(path)} and {results_path(first_path)} differ in {key!r}: "
                    "aggregate only evaluations of the same records with the same settings."
                )


def aggregate(inputs: list[tuple[Path, dict]]) -> dict:
    """Return {"settings": ..., "methods": [{"label", "n", "metrics": {field: {"mean", "std", "values"}}}]}."""
    if not inputs:
        raise AggregationError("No evaluation runs given.")
    check_same_settings(inputs)

    values: dict[str, dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    for path, results in inputs:
        seen = set()
        for row in results["models"]:
            label = row.get("label")
            if label in seen:
                raise AggregationError(f"{results_path(path)} lists the label {label!r} twice: give each model its own label.")
            seen.add(label)
            counts[label] = counts.get(label, 0) + 1
            per_metric = values.setdefault(label, {})
            for field in METRICS:
                value = row.get(field)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    per_metric.setdefault(field, []).append(float(value))

    methods = []
    for label, per_metric in values.items():
        metrics = {}
        for field, numbers in per_metric.items():
            metrics[field] = {
                "mean": statistics.fmean(numbers),
                "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
                "values": numbers,
            }
        methods.append({"label": label, "n": counts[label], "metrics": metrics})
    settings = {key: inputs[0][1].get(key) for key in SETTINGS if key != "indices"}
    return {"settings": settings, "runs": [str(path) for path, _ in inputs], "methods": methods}


def format_cell(summary) -> str:
    if summary is None:
        return "–"
    if summary["std"] is None:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def markdown_table(table: dict) -> str:
    fields = [field for field in METRICS if any(field in method["metrics"] for method in table["methods"])]
    settings = table["settings"]
    lines = [
        f"Dolly {settings.get('split')} split, {settings.get('num_examples')} prompts, greedy decoding, "
        f"{settings.get('max_new_tokens')} new tokens, BERTScore model {settings.get('bertscore_model')}. "
        f"Mean ± sample standard deviation over {len(table['runs'])} evaluation runs; n is the number of runs "
        "that include the method.",
        "",
        "| method | n | " + " | ".join(METRICS[field] for field in fields) + " |",
        "|---|---:|" + "---:|" * len(fields),
    ]
    for method in table["methods"]:
        cells = [format_cell(method["metrics"].get(field)) for field in fields]
        lines.append(f"| {method['label']} | {method['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mean ± std of promptkd evaluation runs over seeds.")
    parser.add_argument("runs", nargs="+", type=Path, help="Evaluation run folders or their results.json files.")
    parser.add_argument("--json", action="store_true", help="Print the aggregated numbers as JSON.")
    args = parser.parse_args(argv)
    try:
        table = aggregate([(path, load_results(path)) for path in args.runs])
    except AggregationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(table, indent=2) if args.json else markdown_table(table), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
