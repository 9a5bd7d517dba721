"""Train tab: configure a PromptKD distillation run, launch it as a process, watch and stop it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from promptkd.cli import cli_command
from promptkd.config import ConfigError, DistillConfig, load_config, save_config
from promptkd.webui import spaces as spaces_mode
from promptkd.webui.common import (
    PROBE_QUANTITIES,
    STRATEGY_NAMES,
    AppContext,
    config_file_choices,
    format_duration,
    markdown_escape,
    metrics_figure,
    model_choices,
    probe_heatmap,
    read_log_tail,
    resolve_model,
    run_config,
    run_folders,
)
from promptkd.webui.runner import ACTIVE_STATES, LOG_FILE, RunnerError, describe_run, folder_status

logger = logging.getLogger("promptkd.webui.train")

DEFAULTS = DistillConfig()
FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
HELP = {name: f.metadata.get("help", "") for name, f in FIELDS.items()}
# Fields the form never sets: the app chooses the folder and name, resuming has its own button, the data
# source is the shipped Dolly records, and evaluation settings belong to the Runs tab.
HIDDEN_FIELDS = ("run_name", "output_dir", "resume", "dataset", "eval_limit")
CHOICE_FIELDS = {"mixed_precision": ["auto", "no", "bf16"], "kl_direction": ["forward", "reverse"], "template": ["dolly", "alpaca"]}
UNIT_SLIDERS = ("alpha", "alpha_start", "alpha_end", "gated_alpha_min", "gated_alpha_max")
# Fields laid out in the main form. Every other DistillConfig field goes under "All other settings".
MAIN_FIELDS = (
    "teacher", "student", "run_name", "strategies", "alpha", "top_k", "top_p", "kl_direction", "prompt_tuning",
    "soft_prompt_length", "mixed_precision", "max_steps", "per_device_batch_size", "learning_rate", "train_limit",
    "alpha_start", "alpha_end", "fallback_temperature", "kl_scale", "prompt_learning_rate", "max_new_tokens",
    "max_length", "gradient_accumulation_steps", "probe_every", "save_every", "seed",
)
OTHER_FIELDS = tuple(name for name in FIELDS if name not in MAIN_FIELDS and name not in HIDDEN_FIELDS and name != "strategy")
# Order of the form fields in the outputs of the load-config event (its API returns one value per field).
FORM_FIELDS = MAIN_FIELDS + OTHER_FIELDS
INT_FIELDS = tuple(name for name, f in FIELDS.items() if f.type in ("int", "Optional[int]"))
# Whole-number fields where 0 or an empty box means "not set".
OPTIONAL_FIELDS = tuple(name for name, f in FIELDS.items() if f.type.startswith("Optional"))
TRAINING_COMMANDS = ("distill", "sft")
POLL_INTERVAL_S = 2.0
LABELS = {
    "max_steps": "max_steps (0: use num_epochs)",
    "train_limit": "train_limit (0: all records)",
    "per_device_batch_size": "Batch size per device",
    "learning_rate": "Learning rate",
    "soft_prompt_length": "Soft prompt length",
    "prompt_learning_rate": "Soft prompt learning rate",
    "max_new_tokens": "Pseudo-target length (max_new_tokens)",
    "probe_every": "Probe every N steps",
    "save_every": "Checkpoint every N steps",
    "stop_after_steps": "stop_after_steps (0: off)",
}


def field_input(name: str):
    """Build the form component of one DistillConfig field from its type, set to the field's default."""
    spec = FIELDS[name]
    default = getattr(DEFAULTS, name)
    label = LABELS.get(name, name)
    if name in CHOICE_FIELDS:
        return gr.Dropdown(CHOICE_FIELDS[name], value=default, label=label, info=HELP[name])
    if name in UNIT_SLIDERS:
        return gr.Slider(0.0, 1.0, value=default, step=0.05, label=label, info=HELP[name])
    if name == "top_p":
        return gr.Slider(0.05, 1.0, value=default, step=0.05, label=label, info=HELP[name])
    if spec.type == "bool":
        return gr.Checkbox(value=default, label=label, info=HELP[name])
    if spec.type in ("int", "float", "Optional[int]", "Optional[float]"):
        value = 0 if default is None and name in OPTIONAL_FIELDS else default
        return gr.Number(value=value, label=label, info=HELP[name], precision=0 if name in INT_FIELDS else None)
    return gr.Textbox(value=default or "", label=label, info=HELP[name])


def build_form(ctx: AppContext) -> dict[str, gr.components.Component]:
    """Build the form components, keyed by handler parameter (a DistillConfig field name or 'strategies')."""
    choices = model_choices(ctx.paths)
    form: dict[str, Any] = {}
    with gr.Row():
        form["teacher"] = gr.Dropdown(choices, value=DEFAULTS.teacher, label="Teacher", info=HELP["teacher"], allow_custom_value=True)
        form["student"] = gr.Dropdown(choices, value=DEFAULTS.student, label="Student", info=HELP["student"], allow_custom_value=True)
        form["run_name"] = gr.Textbox(value="", label="Run name", placeholder="distill-<UTC time>", info="Folder name under the runs root; empty picks one.")
    form["strategies"] = gr.CheckboxGroup(
        STRATEGY_NAMES, value=[DEFAULTS.strategy], label="Strategy",
        info="Ticked strategies are joined with '+'. A combination may hold one filter, one blend and one weighting.",
    )
    rows = (
        ("alpha", "top_k", "top_p", "kl_direction"),
        ("prompt_tuning", "soft_prompt_length", "mixed_precision"),
        ("max_steps", "per_device_batch_size", "learning_rate", "train_limit"),
    )
    for row in rows:
        with gr.Row():
            for name in row:
                form[name] = field_input(name)
    with gr.Accordion("Advanced settings", open=False):
        advanced = (
            ("alpha_start", "alpha_end", "fallback_temperature", "kl_scale"),
            ("prompt_learning_rate", "max_new_tokens", "max_length", "gradient_accumulation_steps"),
            ("probe_every", "save_every", "seed"),
        )
        for row in advanced:
            with gr.Row():
                for name in row:
                    form[name] = field_input(name)
    with gr.Accordion("All other settings", open=False):
        for start in range(0, len(OTHER_FIELDS), 4):
            with gr.Row():
                for name in OTHER_FIELDS[start : start + 4]:
                    form[name] = field_input(name)
    return form


def form_overrides(ctx: AppContext, form: dict) -> dict:
    """Turn the form values into DistillConfig overrides.

    Raises gr.Error that names the field, the value and the fix.
    """
    overrides: dict[str, Any] = {}
    for name, value in form.items():
        if name in ("teacher", "student", "strategies", "run_name"):
            continue
        if value is None or value == "":
            if name not in OPTIONAL_FIELDS:
                raise gr.Error(f"{name} is empty: enter a value (default {getattr(DEFAULTS, name)!r}).")
            continue
        if name in INT_FIELDS:
            if float(value) != int(float(value)):
                raise gr.Error(f"{name}={value} is invalid: use a whole number.")
            value = int(float(value))
            if name in OPTIONAL_FIELDS and value == 0:
                continue
        overrides[name] = value

    strategies = [name for name in (form.get("strategies") or []) if name]
    if not strategies:
        raise gr.Error(f"No strategy ticked: tick at least one of {', '.join(STRATEGY_NAMES)}.")
    overrides["strategy"] = "+".join(strategies)
    overrides["teacher"] = resolve_model(ctx.paths, form.get("teacher"), "Teacher")
    overrides["student"] = resolve_model(ctx.paths, form.get("student"), "Student")
    run_name = (form.get("run_name") or "").strip()
    if run_name:
        overrides["run_name"] = run_name
    overrides["output_dir"] = str(ctx.paths.runs)

    if ctx.spaces:
        try:
            spaces_mode.check_spaces_limits(overrides.get("max_steps"), overrides.get("train_limit"))
        except ValueError as error:
            raise gr.Error(str(error)) from error
    return overrides


def build_config(ctx: AppContext, form: dict) -> DistillConfig:
    """Validate the form as a DistillConfig, before any process starts."""
    overrides = form_overrides(ctx, form)
    try:
        return load_config(DistillConfig, overrides=overrides)
    except ConfigError as error:
        raise gr.Error(f"Invalid settings: {error}") from error


def training_run_choices(ctx: AppContext) -> list[str]:
    names = []
    for folder in run_folders(ctx.paths):
        if folder_status(folder).get("command") in TRAINING_COMMANDS:
            names.append(folder.name)
    return names


def run_path(ctx: AppContext, name: str) -> Path:
    name = (name or "").strip()
    if not name or "/" in name or name in (".", ".."):
        raise gr.Error(f"Run {name!r} is invalid: pick a run from the list.")
    path = ctx.paths.runs / name
    if not path.is_dir():
        raise gr.Error(f"Run {name!r} not found under {ctx.paths.runs}: pick a run from the list.")
    return path


# ----- status rendering ---------------------------------------------------------------------------


def progress_bar(step: int, total: int, width: int = 30) -> str:
    filled = round(width * step / total) if total else 0
    return "█" * filled + "░" * (width - filled)


def status_markdown(summary: dict) -> str:
    state = summary.get("state") or "unknown"
    lines = [f"### {summary['name']} · {state}"]
    step, total = summary.get("step") or 0, summary.get("total_steps")
    if total:
        percent = 100 * step / total
        lines.append(f"`{progress_bar(step, total)}` step {step}/{total} ({percent:.0f}%)")
    elif state in ACTIVE_STATES:
        lines.append("Loading models and data…")
    timing = [f"elapsed {format_duration(summary.get('elapsed_s'))}"]
    if summary.get("eta_s") is not None:
        timing.append(f"ETA {format_duration(summary['eta_s'])}")
    if summary.get("pid") and state in ACTIVE_STATES:
        timing.append(f"pid {summary['pid']}")
    lines.append(" · ".join(timing))
    config = run_config(Path(summary["folder"]))
    if config:
        model = f"teacher `{config.get('teacher')}` → student `{config.get('student')}`" if summary.get("command") == "distill" else f"model `{config.get('model')}`"
        lines.append(f"{summary.get('command')} · strategy `{config.get('strategy', '–')}` · {model}")
    if summary.get("error") and state in ("failed", "stopped"):
        label = "Error" if state == "failed" else "Stopped"
        lines.append(f"**{label}:** {markdown_escape(str(summary['error']))}")
    return "\n\n".join(lines)


def public_summary(summary: dict) -> dict:
    """Return the run summary without the metric and probe lists, which the charts show."""
    return {key: value for key, value in summary.items() if key not in ("metrics", "probes")}


def render(ctx: AppContext, name: str, quantity: str, example) -> tuple:
    if not name:
        message = "No run selected: launch one above, or pick a run."
        return message, metrics_figure([]), probe_heatmap([], quantity), "", {}
    summary = describe_run(run_path(ctx, name))
    example = int(example or 0)
    return (
        status_markdown(summary),
        metrics_figure(summary["metrics"], title=f"{name}: training curves"),
        probe_heatmap(summary["probes"], quantity, example),
        run_log_tail(Path(summary["folder"])),
        public_summary(summary),
    )


def run_log_tail(folder: Path) -> str:
    """Return the tail of stdout.log, or of run.log for a run started outside the app (it has no stdout.log)."""
    return read_log_tail(folder / LOG_FILE) or read_log_tail(folder / "run.log")


def _signature(ctx: AppContext, name: str, quantity: str, example) -> tuple:
    """Return the file times that change whenever the rendered view of a run would change."""
    if not name:
        return (name,)
    path = ctx.paths.runs / name
    stamps = []
    for filename in ("status.json", "metrics.jsonl", "probes.jsonl", LOG_FILE, "run.log", "launch.json"):
        try:
            stamps.append((path / filename).stat().st_mtime_ns)
        except OSError:
            stamps.append(None)
    return (name, quantity, example, *stamps)


# ----- tab -------------------------------------------------------------------------------------------


def create_train_tab(ctx: AppContext) -> dict:
    if ctx.spaces:
        gr.Markdown(spaces_mode.spaces_notice())
    form = build_form(ctx)
    with gr.Row():
        launch_button = gr.Button("Launch", variant="primary", elem_id="train-launch")
        preview_button = gr.Button("Show CLI command")
        stop_button = None if ctx.spaces else gr.Button("Stop", variant="stop")
    message = gr.Markdown()
    command = gr.Code(label="Equivalent CLI command", language="shell", interactive=False)

    with gr.Accordion("Save or load settings", open=False):
        with gr.Row():
            config_name = gr.Textbox(label="Config name", placeholder="my-settings", info=f"Saved as {ctx.paths.configs}/<name>.yaml")
            save_button = gr.Button("Save config")
        with gr.Row():
            config_file = gr.Dropdown(config_file_choices(ctx.paths), label="Config file", allow_custom_value=True, info=f"A YAML file under {ctx.paths.describe_roots()}")
            load_button = gr.Button("Load config")

    gr.Markdown("## Run")
    with gr.Row():
        run_select = gr.Dropdown(elem_id="train-run", choices=training_run_choices(ctx), value=None, label="Run", allow_custom_value=True, scale=3)
        refresh_button = gr.Button("Refresh", scale=1)
    status = gr.Markdown(elem_id="train-status")
    curves = gr.Plot(label="Training curves", elem_id="train-curves")
    with gr.Row():
        quantity = gr.Radio(list(PROBE_QUANTITIES), value=next(iter(PROBE_QUANTITIES)), label="Probe heatmap value")
        example = gr.Number(value=0, precision=0, minimum=0, label="Probe example")
    heatmap = gr.Plot(label="Probe example: response position × step", elem_id="train-heatmap")
    log_tail = gr.Textbox(label="Log (last lines of stdout.log, else run.log)", lines=12, max_lines=12, interactive=False, autoscroll=True)
    with gr.Accordion("Run details (JSON)", open=False):
        details = gr.JSON(label="Run summary")
    signature = gr.State(None)
    timer = gr.Timer(POLL_INTERVAL_S)

    form_inputs = dict(form)
    view_outputs = [status, curves, heatmap, log_tail, details]

    def preview(**values):
        config = build_config(ctx, values)
        return cli_command("distill", config)

    def launch(**values):
        config = build_config(ctx, values)
        try:
            job = ctx.runner.launch_distill(config)
        except RunnerError as error:
            raise gr.Error(str(error)) from error
        text = f"Started run **{job.name}** (pid {job.pid}). Output: `{job.path}`."
        choices = training_run_choices(ctx)
        return text, gr.Dropdown(choices=choices, value=job.name), cli_command("distill", config)

    def stop(name):
        try:
            return ctx.runner.stop(run_path(ctx, name))
        except RunnerError as error:
            raise gr.Error(str(error)) from error

    def refresh(name, quantity_value, example_value):
        return render(ctx, name, quantity_value, example_value)

    def poll(name, quantity_value, example_value, last):
        """Timer tick: redraw only when the run's files changed since the last draw in this browser tab."""
        current = _signature(ctx, name, quantity_value, example_value)
        if current == last:
            return (*[gr.skip()] * len(view_outputs), last)
        return (*render(ctx, name, quantity_value, example_value), current)

    def attach():
        """Page load: list the runs and select the active one, else the newest."""
        choices = training_run_choices(ctx)
        job = ctx.runner.active_job()
        value = choices[0] if choices else None
        if job is not None and job.name in choices:
            value = job.name
        return gr.Dropdown(choices=choices, value=value), gr.Dropdown(choices=model_choices(ctx.paths)), gr.Dropdown(choices=model_choices(ctx.paths)), gr.Dropdown(choices=config_file_choices(ctx.paths))

    def save(name, **values):
        config = build_config(ctx, values)
        name = (name or "").strip()
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise gr.Error(f"Config name {name!r} is invalid: use a plain file name such as 'ta-filter-short'.")
        path = ctx.paths.configs / (name if name.endswith(".yaml") else f"{name}.yaml")
        config.run_name = None
        save_config(config, path)
        logger.info("Saved distillation settings to %s", path)
        return f"Saved settings to `{path}`.", gr.Dropdown(choices=config_file_choices(ctx.paths), value=str(path))

    def load(path_text):
        path = ctx.paths.check(path_text, "Config file")
        try:
            config = load_config(DistillConfig, path)
        except ConfigError as error:
            raise gr.Error(f"Config file {path} is invalid: {error}") from error
        updates = []
        for name in FORM_FIELDS:
            if name == "strategies":
                updates.append([part.strip() for part in config.strategy.split("+")])
            elif name in OPTIONAL_FIELDS:
                updates.append(getattr(config, name) or 0)
            elif name == "run_name":
                updates.append("")
            else:
                updates.append(getattr(config, name))
        return (*updates, f"Loaded settings from `{path}`.")

    preview_button.click(preview, inputs_kwargs=form_inputs, outputs=command, api_name="train_preview")
    launch_button.click(
        launch, inputs_kwargs=form_inputs, outputs=[message, run_select, command], api_name="train_launch"
    ).success(refresh, inputs=[run_select, quantity, example], outputs=view_outputs, api_name="train_after_launch")
    if stop_button is not None:
        stop_button.click(stop, inputs=run_select, outputs=message, api_name="train_stop")
    refresh_button.click(refresh, inputs=[run_select, quantity, example], outputs=view_outputs, api_name="train_refresh")
    run_select.change(refresh, inputs=[run_select, quantity, example], outputs=view_outputs, api_name="train_select")
    quantity.change(refresh, inputs=[run_select, quantity, example], outputs=view_outputs, api_name="train_quantity")
    timer.tick(poll, inputs=[run_select, quantity, example, signature], outputs=[*view_outputs, signature], api_name="train_poll", show_progress="hidden")
    save_button.click(save, inputs=[config_name], inputs_kwargs=form_inputs, outputs=[message, config_file], api_name="train_save_config")
    load_button.click(load, inputs=config_file, outputs=[*(form[name] for name in FORM_FIELDS), message], api_name="train_load_config")
    return {"attach": attach, "attach_outputs": [run_select, form["teacher"], form["student"], config_file]}
