"""Runs tab: every run folder with its settings, final losses and evaluation scores, curve overlays and run actions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import gradio as gr

from promptkd.report import METRIC_NAMES, ReportError, build_report, load_eval_run, report_markdown
from promptkd.runs import read_json, read_jsonl
from promptkd.significance import MAX_RESAMPLES, format_p_value
from promptkd.webui.common import (
    METRIC_PANELS,
    AppContext,
    empty_figure,
    overlay_figure,
    run_config,
    run_folders,
)
from promptkd.webui.runner import RunnerError, folder_status

logger = logging.getLogger("promptkd.webui.runs")

RUN_HEADERS = [
    "run", "command", "state", "strategy", "teacher", "student / model", "step", "lr", "batch", "train_limit",
    "final loss", "final prompt_loss", "eval", "EM", "ROUGE-L", "BERTScore", "started",
]
LEADERBOARD_HEADERS = ["model", "evaluation run", "split", "prompts", "EM", "ROUGE-L", "BERTScore", "BERTScore model"]
# Settings left out of the config differences: they differ between any two runs by design.
DIFF_IGNORED = ("run_name", "output_dir", "resume")
DIFFERENCE_HEADERS = ["method", "metric", "difference", "interval low", "interval high", "p", "interval excludes 0"]
# The baseline the report picks by default: the pipeline's labels for the baseline strategy and the SFT student.
DEFAULT_BASELINES = ("PromptKD baseline", "SFT student")
EVAL_SPLITS = ["test", "validation"]
EVAL_BERTSCORE = ["offline", "none"]


def _score(entry: dict, *keys: str) -> Optional[float]:
    """Return the first number among `keys`, rounded to 2 decimals.

    Evaluation results name EM and BERTScore 'em' and 'bertscore', and the metrics module 'exact_match' and
    'bertscore_f1', so both spellings are read.
    """
    for key in keys:
        value = entry.get(key)
        if isinstance(value, (int, float)):
            return round(float(value), 2)
    return None


def _round(value, digits: int = 4):
    return round(value, digits) if isinstance(value, (int, float)) else None


def collect_runs(ctx: AppContext) -> list[dict]:
    """Summarize every run folder under the runs root, newest first, including folders whose process never wrote status.json."""
    runs = []
    for folder in run_folders(ctx.paths):
        status = folder_status(folder)
        config = run_config(folder)
        metrics = read_jsonl(folder / "metrics.jsonl")
        results = read_json(folder / "results.json", None) or {}
        evaluations = results.get("evaluations") or {}
        latest_key = list(evaluations)[-1] if evaluations else None
        runs.append({
            "name": folder.name,
            "folder": str(folder),
            "command": status.get("command"),
            "state": status.get("state"),
            "step": status.get("step"),
            "total_steps": status.get("total_steps"),
            "error": status.get("error"),
            "started_at": status.get("started_at"),
            "config": config,
            "last_metrics": metrics[-1] if metrics else {},
            "evaluations": evaluations,
            "latest_evaluation": evaluations.get(latest_key) if latest_key else None,
            "latest_evaluation_key": latest_key,
            "results": results if status.get("command") == "evaluate" else None,
        })
    return runs


def run_rows(runs: list[dict]) -> list[list]:
    rows = []
    for run in runs:
        config, last = run["config"], run["last_metrics"]
        evaluation = run["latest_evaluation"] or {}
        step = f"{run['step'] or 0}/{run['total_steps']}" if run.get("total_steps") else ""
        rows.append([
            run["name"], run["command"], run["state"], config.get("strategy"), config.get("teacher"),
            config.get("student") or config.get("model") or ", ".join(config.get("models") or []), step,
            config.get("learning_rate"), config.get("per_device_batch_size"), config.get("train_limit"),
            _round(last.get("loss")), _round(last.get("prompt_loss")), run["latest_evaluation_key"],
            _score(evaluation, "em", "exact_match"), _score(evaluation, "rouge_l"), _score(evaluation, "bertscore", "bertscore_f1"),
            run["started_at"],
        ])
    return rows


def leaderboard_rows(runs: list[dict]) -> list[list]:
    """Build one row per model of each evaluation run, best ROUGE-L first."""
    rows = []
    for run in runs:
        results = run.get("results") or {}
        for model in results.get("models") or []:
            rows.append([
                model.get("label"), run["name"], results.get("split"), results.get("num_examples"),
                _score(model, "em", "exact_match"), _score(model, "rouge_l"), _score(model, "bertscore", "bertscore_f1"),
                model.get("bertscore_model") or results.get("bertscore_model"),
            ])
    rows.sort(key=lambda row: -(row[5] if row[5] is not None else -1.0))
    return rows


def config_diff(runs: list[dict]) -> tuple[list[str], list[list]]:
    """Return the headers and rows of the settings that differ between the runs."""
    headers = ["setting", *[run["name"] for run in runs]]
    keys = sorted({key for run in runs for key in run["config"]} - set(DIFF_IGNORED))
    rows = []
    for key in keys:
        values = [run["config"].get(key) for run in runs]
        if any(value != values[0] for value in values[1:]):
            rows.append([key, *[str(value) for value in values]])
    return headers, rows


def evaluation_run_names(runs: list[dict]) -> list[str]:
    """Return the names of completed evaluation runs, whose per-prompt scores a significance report can combine."""
    return [run["name"] for run in runs if run["command"] == "evaluate" and run["state"] == "completed" and run["results"]]


def default_baseline(labels: list[str]) -> Optional[str]:
    for label in DEFAULT_BASELINES:
        if label in labels:
            return label
    return labels[0] if labels else None


def difference_rows(report: dict) -> list[list]:
    """One row per method other than the baseline and per metric: the bootstrap difference and its interval."""
    rows = []
    for entry in report["methods"]:
        for metric, comparison in (entry["vs_baseline"] or {}).items():
            rows.append([
                entry["label"], METRIC_NAMES[metric], round(comparison["diff"], 4), round(comparison["ci_low"], 4),
                round(comparison["ci_high"], 4), format_p_value(comparison["p_value"], report["num_resamples"]),
                bool(comparison["significant"]),
            ])
    return rows


def public_runs(runs: list[dict]) -> list[dict]:
    return [{key: value for key, value in run.items() if key not in ("config",)} for run in runs]


def create_runs_tab(ctx: AppContext) -> dict:
    gr.Markdown("All run folders under `" + str(ctx.paths.runs) + "`: SFT, distillation and evaluation runs.")
    refresh_button = gr.Button("Refresh", elem_id="runs-refresh")
    names = [folder.name for folder in run_folders(ctx.paths)]
    runs_table = gr.Dataframe(headers=RUN_HEADERS, elem_id="runs-table", label="Runs", interactive=False, wrap=True)
    leaderboard = gr.Dataframe(headers=LEADERBOARD_HEADERS, elem_id="runs-leaderboard", label="Leaderboard (evaluation runs, best ROUGE-L first)", interactive=False)

    gr.Markdown("### Compare runs")
    with gr.Row():
        selected = gr.Dropdown(names, elem_id="runs-overlay", multiselect=True, allow_custom_value=True, label="Runs to overlay", scale=3)
        metric = gr.Dropdown([key for key, _ in METRIC_PANELS], value="loss", label="Metric", scale=1)
    overlay = gr.Plot(label="Overlaid curves", elem_id="runs-overlay-plot")
    diff = gr.Dataframe(label="Settings that differ", interactive=False, wrap=True)

    gr.Markdown(
        "### Significance over seeds\n"
        "Pick the evaluation runs of several seeds (for example `<prefix>-s1-eval`, `<prefix>-s2-eval` of "
        "`python -m promptkd pipeline --seeds 1 2 3`). The report gives mean ± std over the runs and, for each method "
        "against the baseline, a paired bootstrap over the prompts: the difference, its 95% interval and a p-value. "
        "`*` marks an interval that excludes 0."
    )
    with gr.Row():
        report_runs = gr.Dropdown(
            evaluation_run_names(collect_runs(ctx)), multiselect=True, allow_custom_value=True, label="Evaluation runs (one per seed)",
            elem_id="runs-report-runs", scale=3,
        )
        report_baseline = gr.Dropdown([], value=None, allow_custom_value=True, label="Baseline method", elem_id="runs-report-baseline", scale=2)
        report_resamples = gr.Number(value=1000, precision=0, minimum=100, maximum=MAX_RESAMPLES, label="Bootstrap resamples", scale=1)
    report_button = gr.Button("Build report", elem_id="runs-report-build")
    report_text = gr.Markdown(label="Significance report", elem_id="runs-report-markdown")
    report_table = gr.Dataframe(headers=DIFFERENCE_HEADERS, label="Differences from the baseline", interactive=False, elem_id="runs-report-table")

    actions: dict = {}
    if not ctx.spaces:
        gr.Markdown("### Run actions")
        with gr.Row():
            actions["run"] = gr.Dropdown(names, value=None, allow_custom_value=True, label="Run", scale=3)
            actions["eval_limit"] = gr.Number(value=20, precision=0, minimum=1, label="Evaluation prompts")
            actions["split"] = gr.Radio(EVAL_SPLITS, value="test", label="Split")
            actions["bertscore"] = gr.Dropdown(EVAL_BERTSCORE, value="offline", label="BERTScore model")
        with gr.Row():
            evaluate_button = gr.Button("Evaluate", variant="primary")
            resume_button = gr.Button("Resume")
            stop_button = gr.Button("Stop", variant="stop")
        message = gr.Markdown()
    with gr.Accordion("Runs (JSON)", open=False):
        runs_json = gr.JSON(label="Run summaries")

    def refresh():
        runs = collect_runs(ctx)
        names = [run["name"] for run in runs]
        updates = [
            run_rows(runs), leaderboard_rows(runs), gr.Dropdown(choices=names), public_runs(runs),
            gr.Dropdown(choices=evaluation_run_names(runs)),
        ]
        if not ctx.spaces:
            updates.append(gr.Dropdown(choices=names))
        return tuple(updates)

    def compare_runs(names, key):
        names = [name for name in (names or []) if name]
        if not names:
            return empty_figure("Select runs to overlay their curves."), gr.Dataframe(value=[], headers=["setting"])
        runs = {run["name"]: run for run in collect_runs(ctx)}
        missing = [name for name in names if name not in runs]
        if missing:
            raise gr.Error(f"Run(s) {', '.join(missing)} not found under {ctx.paths.runs}: refresh the list and select again.")
        curves = {name: read_jsonl(Path(runs[name]["folder"]) / "metrics.jsonl") for name in names}
        headers, rows = config_diff([runs[name] for name in names])
        return overlay_figure(curves, key), gr.Dataframe(value=rows, headers=headers)

    def _load_evaluations(names) -> list:
        names = [name for name in (names or []) if name]
        known = {run["name"]: run for run in collect_runs(ctx)}
        loaded = []
        for name in names:
            if name not in known:
                raise gr.Error(f"Evaluation run {name!r} not found under {ctx.paths.runs}: refresh the list and select again.")
            try:
                loaded.append(load_eval_run(Path(known[name]["folder"])))
            except ReportError as error:
                raise gr.Error(str(error)) from error
        return loaded

    def report_choices(names):
        loaded = _load_evaluations(names)
        labels = loaded[0].labels if loaded else []
        return gr.Dropdown(choices=labels, value=default_baseline(labels))

    def build_significance(names, baseline, resamples):
        loaded = _load_evaluations(names)
        if not loaded:
            raise gr.Error("No evaluation run selected: pick the evaluation runs of one or more seeds.")
        resamples = int(resamples or 0)
        if not 100 <= resamples <= MAX_RESAMPLES:
            raise gr.Error(f"Bootstrap resamples = {resamples} is invalid: use 100 to {MAX_RESAMPLES} (1000 is the default).")
        baseline = baseline or default_baseline(loaded[0].labels)
        try:
            report = build_report(loaded, baseline, num_resamples=resamples)
        except ReportError as error:
            raise gr.Error(str(error)) from error
        return report_markdown(report), difference_rows(report)

    def _path(name) -> Path:
        name = (name or "").strip()
        if not name or "/" in name or name in (".", "..") or not (ctx.paths.runs / name).is_dir():
            raise gr.Error(f"Run {name!r} not found under {ctx.paths.runs}: pick a run from the list.")
        return ctx.paths.runs / name

    def evaluate(name, eval_limit, split, bertscore):
        eval_limit = int(eval_limit or 0)
        if eval_limit < 1:
            raise gr.Error(f"Evaluation prompts = {eval_limit} is invalid: use 1 or more prompts.")
        try:
            job = ctx.runner.evaluate(_path(name), eval_limit, split, bertscore)
        except RunnerError as error:
            raise gr.Error(str(error)) from error
        return f"Started evaluation run **{job.name}** (pid {job.pid}) of {name} on {eval_limit} {split} prompts."

    def resume(name):
        try:
            job = ctx.runner.resume(_path(name))
        except RunnerError as error:
            raise gr.Error(str(error)) from error
        return f"Resumed run **{job.name}** (pid {job.pid}); follow it in the Train tab."

    def stop(name):
        try:
            return ctx.runner.stop(_path(name))
        except RunnerError as error:
            raise gr.Error(str(error)) from error

    refresh_outputs = [runs_table, leaderboard, selected, runs_json, report_runs]
    if not ctx.spaces:
        refresh_outputs.append(actions["run"])
    refresh_button.click(refresh, outputs=refresh_outputs, api_name="runs_refresh")
    selected.change(compare_runs, inputs=[selected, metric], outputs=[overlay, diff], api_name="runs_compare")
    metric.change(compare_runs, inputs=[selected, metric], outputs=[overlay, diff], api_name="runs_metric")
    report_runs.change(report_choices, inputs=report_runs, outputs=report_baseline, api_name="runs_report_methods")
    report_button.click(
        build_significance, inputs=[report_runs, report_baseline, report_resamples], outputs=[report_text, report_table],
        api_name="runs_report",
    )
    if not ctx.spaces:
        evaluate_button.click(evaluate, inputs=[actions["run"], actions["eval_limit"], actions["split"], actions["bertscore"]],
                              outputs=message, api_name="runs_evaluate").success(refresh, outputs=refresh_outputs, api_name="runs_after_evaluate")
        resume_button.click(resume, inputs=actions["run"], outputs=message, api_name="runs_resume").success(
            refresh, outputs=refresh_outputs, api_name="runs_after_resume")
        stop_button.click(stop, inputs=actions["run"], outputs=message, api_name="runs_stop").success(
            refresh, outputs=refresh_outputs, api_name="runs_after_stop")

    return {"attach": refresh, "attach_outputs": refresh_outputs}
