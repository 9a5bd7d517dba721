"""Inspect tab: per-token teacher entropy, kept sets and student probabilities of one prompt and response."""

from __future__ import annotations

import logging
import math
from typing import Optional

import gradio as gr
import plotly.graph_objects as go

from promptkd.config import ConfigError, DistillConfig, load_config
from promptkd.data import encode_prompt
from promptkd.generation import generate_greedy
from promptkd.models import SMOLLM2, check_same_vocab
from promptkd.webui import spaces as spaces_mode
from promptkd.webui.common import (
    RECORD_SPLITS,
    STRATEGY_NAMES,
    AppContext,
    empty_figure,
    find_record,
    model_choices,
    prompt_record,
    record_choices,
    resolve_model,
    run_config,
    soft_prompt_choices,
    split_records,
    token_label,
)

logger = logging.getLogger("promptkd.webui.inspect")

DEFAULTS = DistillConfig()
# Column "A-B gap" is |p_A - p_T| - |p_B - p_T|: above 0 where student B is closer to the teacher than A.
TABLE_HEADERS = ["pos", "token", "H (nats)", "H/log|V|", "weight", "kept", "fallback", "p_T", "p_A", "p_B", "A-B gap", "kept tokens (top)"]
GENERATE_TOKENS = 64


def _optional_model(ctx: AppContext, text: Optional[str], label: str) -> Optional[str]:
    if not text or not text.strip():
        return None
    return resolve_model(ctx.paths, text, label)


def load_soft_prompt_from(ctx: AppContext, folder_text: str, teacher, teacher_spec: str):
    """Load the soft prompt of a distillation run folder (None when no folder is given) and check its size against the teacher."""
    from promptkd.soft_prompt import load_soft_prompt

    if not folder_text or not folder_text.strip():
        return None
    folder = ctx.paths.check(folder_text, "Soft prompt run folder")
    path = folder / "soft_prompt.safetensors" if folder.is_dir() else folder
    if not path.is_file():
        raise gr.Error(f"Soft prompt file {path} not found: pick a distillation run that has finished or stopped.")
    try:
        soft_prompt = load_soft_prompt(path)
    except (ValueError, OSError) as error:
        raise gr.Error(f"Could not read the soft prompt {path}: {error}") from error
    hidden = teacher.get_input_embeddings().weight.shape[1]
    if soft_prompt.weight.shape[1] != hidden:
        raise gr.Error(
            f"The soft prompt in {path} has {soft_prompt.weight.shape[1]} dimensions but teacher {teacher_spec!r} embeds "
            f"in {hidden}: pick the teacher that run used ({run_config(folder).get('teacher', 'see its config.yaml')})."
        )
    run_teacher = run_config(folder).get("teacher")
    if run_teacher and run_teacher != teacher_spec:
        gr.Warning(f"The soft prompt was trained for teacher {run_teacher!r}, not {teacher_spec!r}: its effect may be meaningless.")
    return soft_prompt.to(teacher.device)


def heatmap_figure(report: dict, student_b: Optional[list]) -> go.Figure:
    """Rows scaled to [0, 1] for one colour scale; hover shows the raw values."""
    tokens = report["tokens"]
    vocab_log = math.log(report["vocab_size"])
    rows = [
        ("entropy H/log|V|", report["normalized_entropy"], report["entropy"], "H={:.3f} nats"),
        ("token weight (strategy)", report["weight"], report["weight"], "w={:.3f}"),
        ("kept-set size (log/log|V|)", [math.log(max(size, 1)) / vocab_log for size in report["kept_size"]], report["kept_size"], "kept={}"),
        ("teacher prob p_T", report["teacher_prob"], report["teacher_prob"], "p_T={:.4f}"),
    ]
    if report.get("student_prob") is not None:
        rows.append(("student A prob p_S", report["student_prob"], report["student_prob"], "p_S={:.4f}"))
    if student_b is not None:
        rows.append(("student B prob p_S", student_b, student_b, "p_S={:.4f}"))
    if isinstance(report.get("alpha"), list) and len(report["alpha"]) == len(tokens):
        rows.append(("blend alpha (teacher weight)", report["alpha"], report["alpha"], "alpha={:.3f}"))
    z = [values for _, values, _, _ in rows]
    text = [[fmt.format(raw) for raw in raws] for _, _, raws, fmt in rows]
    x = [token_label(i, token) for i, token in enumerate(tokens)]
    figure = go.Figure(
        go.Heatmap(
            z=z, x=x, y=[name for name, _, _, _ in rows], text=text, zmin=0.0, zmax=1.0, colorscale="Viridis",
            hovertemplate="%{x}<br>%{y}: %{text}<extra></extra>",
        )
    )
    figure.update_layout(
        height=120 + 40 * len(rows), margin=dict(l=170, r=20, t=20, b=90), xaxis=dict(tickangle=-60), yaxis=dict(autorange="reversed"),
    )
    return figure


def movement_figure(report: dict, prob_a: list, prob_b: list) -> go.Figure:
    """Per token, |p_A - p_T| - |p_B - p_T|: above 0 where student B is closer to the teacher than A."""
    deltas = [abs(a - t) - abs(b - t) for a, b, t in zip(prob_a, prob_b, report["teacher_prob"])]
    x = [token_label(i, token) for i, token in enumerate(report["tokens"])]
    colors = ["#2a9d8f" if delta > 0 else "#e76f51" for delta in deltas]
    figure = go.Figure(go.Bar(x=x, y=deltas, marker_color=colors, hovertemplate="%{x}<br>Δ=%{y:.4f}<extra></extra>"))
    figure.update_layout(
        height=320, yaxis_title="|p_A−p_T| − |p_B−p_T|", margin=dict(l=60, r=20, t=20, b=90), xaxis=dict(tickangle=-60),
    )
    return figure


def table_rows(report: dict, prob_b: Optional[list]) -> list[list]:
    rows = []
    prob_a = report.get("student_prob")
    for i, token in enumerate(report["tokens"]):
        p_t = report["teacher_prob"][i]
        p_a = prob_a[i] if prob_a is not None else None
        p_b = prob_b[i] if prob_b is not None else None
        delta = abs(p_a - p_t) - abs(p_b - p_t) if p_a is not None and p_b is not None else None
        kept = ", ".join(f"{entry['token']!r}:{entry['prob']:.3f}" for entry in report["kept_tokens"][i])
        rows.append([
            i, repr(token), round(report["entropy"][i], 4), round(report["normalized_entropy"][i], 4),
            round(report["weight"][i], 4), report["kept_size"][i], bool(report["fallback"][i]), round(p_t, 5),
            None if p_a is None else round(p_a, 5), None if p_b is None else round(p_b, 5),
            None if delta is None else round(delta, 5), kept,
        ])
    return rows


def summary_markdown(report: dict, prob_b: Optional[list], soft_prompt: bool) -> str:
    count = len(report["tokens"])
    fallbacks = sum(bool(flag) for flag in report["fallback"])
    kept = report["kept_size"]
    lines = [
        f"**{count} response tokens** · |V| = {report['vocab_size']} · top_k = {report['top_k']}, top_p = {report['top_p']:.3g} · "
        f"mean alpha = {_mean_alpha(report):.3f} · soft prompt {'on' if soft_prompt else 'off'}",
        f"Mean teacher entropy {sum(report['entropy']) / count:.3f} nats ({sum(report['normalized_entropy']) / count:.3f} of log|V|); "
        f"kept-set size median {sorted(kept)[count // 2]}, fallback on {fallbacks} of {count} tokens.",
    ]
    prob_a = report.get("student_prob")
    if prob_a is not None and prob_b is not None:
        teacher = report["teacher_prob"]
        gap_a = sum(abs(a - t) for a, t in zip(prob_a, teacher)) / count
        gap_b = sum(abs(b - t) for b, t in zip(prob_b, teacher)) / count
        closer = sum(abs(b - t) < abs(a - t) for a, b, t in zip(prob_a, prob_b, teacher))
        lines.append(
            f"Student B is closer to the teacher than student A on **{closer} of {count}** tokens; "
            f"mean |p_S − p_T|: A {gap_a:.3g}, B {gap_b:.3g}."
        )
    return "\n\n".join(lines)


def _mean_alpha(report: dict) -> float:
    """Mean teacher weight of the blend; older reports hold one alpha, newer ones one per token."""
    alpha = report["alpha"]
    if isinstance(alpha, list):
        return sum(alpha) / max(len(alpha), 1)
    return float(alpha)


def create_inspect_tab(ctx: AppContext) -> dict:
    choices = model_choices(ctx.paths)
    first = split_records(RECORD_SPLITS[0])[0]
    gr.Markdown(
        "Per token of a response: the teacher's entropy, the entropy weight, the top-k/top-p kept set and whether "
        "the fallback applied, with the students' probabilities of the same token. With two students, the last chart "
        "shows where student B moved toward the teacher compared with student A."
    )
    with gr.Row():
        split = gr.Radio(list(RECORD_SPLITS), value=RECORD_SPLITS[0], label="Split", scale=1)
        record = gr.Dropdown(record_choices(RECORD_SPLITS[0]), value=first.index, elem_id="inspect-record", label="Dolly record", info="Pick one, or type its original Dolly index.", allow_custom_value=True, scale=4)
    with gr.Row():
        instruction = gr.Textbox(first.instruction, label="Instruction", lines=3)
        context = gr.Textbox(first.context, label="Context (optional)", lines=3)
    response = gr.Textbox(first.response, elem_id="inspect-response", label="Response to inspect (the reference, a model's output, or typed)", lines=4)
    with gr.Row():
        reference_button = gr.Button("Use the reference", elem_id="inspect-use-reference")
        generate_model = gr.Dropdown(choices, value=SMOLLM2, allow_custom_value=True, label="Model for a generated response", scale=2)
        generate_button = gr.Button("Use this model's greedy output")
    with gr.Row():
        teacher = gr.Dropdown(choices, value=SMOLLM2, elem_id="inspect-teacher", allow_custom_value=True, label="Teacher")
        student_a = gr.Dropdown(choices, elem_id="inspect-student-a", value=f"{SMOLLM2}:layers=default", allow_custom_value=True, label="Student A (optional, e.g. the SFT student)")
        student_b = gr.Dropdown(choices, value=None, allow_custom_value=True, label="Student B (optional, e.g. a distilled student)")
        soft_prompt = gr.Dropdown(soft_prompt_choices(ctx.paths), value="", allow_custom_value=True, label="Soft prompt from a distillation run")
    with gr.Row():
        strategy = gr.Dropdown(STRATEGY_NAMES, value="ta_filter", allow_custom_value=True, label="Strategy (sets alpha)")
        top_k = gr.Number(value=DEFAULTS.top_k, precision=0, minimum=0, label="top_k")
        top_p = gr.Slider(0.05, 1.0, value=DEFAULTS.top_p, step=0.05, label="top_p")
        fallback_temperature = gr.Number(value=DEFAULTS.fallback_temperature, label="Fallback temperature")
        alpha = gr.Slider(0.0, 1.0, value=DEFAULTS.alpha, step=0.05, label="alpha")
        top_n = gr.Number(value=5, precision=0, minimum=1, label="Kept tokens listed")
    inspect_button = gr.Button("Inspect", variant="primary", elem_id="inspect-button")
    summary = gr.Markdown()
    entropy_text = gr.HighlightedText(elem_id="inspect-entropy", label="Teacher entropy per token (score = H / log|V|)", show_legend=False)
    heatmap = gr.Plot(label="Per-token values", elem_id="inspect-heatmap")
    movement = gr.Plot(label="Where student B moved toward the teacher")
    table = gr.Dataframe(headers=TABLE_HEADERS, elem_id="inspect-table", label="Per-token table (p_A, p_B: students' probabilities of the token; A-B gap: |p_A−p_T| − |p_B−p_T|)", interactive=False, wrap=True)
    with gr.Accordion("Report (JSON)", open=False):
        result = gr.JSON(label="Token report")

    def change_split(split_name):
        return gr.Dropdown(choices=record_choices(split_name), value=None)

    def pick(split_name, index):
        if index in (None, ""):
            return gr.skip(), gr.skip(), gr.skip()
        chosen = find_record(split_name, index)
        return chosen.instruction, chosen.context, chosen.response

    def use_reference(split_name, index):
        if index in (None, ""):
            raise gr.Error("No Dolly record picked: pick one to use its reference, or type a response.")
        return find_record(split_name, index).response

    def generate(instruction_text, context_text, model_text):
        spec = resolve_model(ctx.paths, model_text, "Model for a generated response")
        prompt = prompt_record(instruction_text, context_text, "")
        model, tokenizer = ctx.models.get(spec)
        ids = encode_prompt(prompt, tokenizer, DEFAULTS.template, DEFAULTS.max_length - GENERATE_TOKENS)
        output = generate_greedy(model, tokenizer, [ids], batch_size=1, max_new_tokens=GENERATE_TOKENS, progress=False)[0]
        if not output:
            gr.Warning(f"{spec} produced an empty response (EOS first): type a response or pick another model.")
        return output

    def inspect(split_name, index, instruction_text, context_text, response_text, teacher_text, student_a_text, student_b_text,
                soft_prompt_text, strategy_text, top_k_value, top_p_value, fallback_value, alpha_value, top_n_value):
        from promptkd.inspection import token_report

        record = prompt_record(instruction_text, context_text, "", index)
        response_text = (response_text or "").strip()
        if not response_text:
            raise gr.Error("The response is empty: use the reference, a model's output, or type a response to inspect.")
        teacher_spec = resolve_model(ctx.paths, teacher_text, "Teacher")
        spec_a = _optional_model(ctx, student_a_text, "Student A")
        spec_b = _optional_model(ctx, student_b_text, "Student B")
        if spec_b and not spec_a:
            spec_a, spec_b = spec_b, None
        try:
            config = load_config(DistillConfig, overrides={
                "strategy": (strategy_text or "baseline").strip(), "top_k": int(top_k_value or 0), "top_p": float(top_p_value),
                "fallback_temperature": float(fallback_value), "alpha": float(alpha_value),
            })
        except ConfigError as error:
            raise gr.Error(f"Invalid settings: {error}") from error
        top_n_value = max(1, int(top_n_value or 1))

        teacher_model, tokenizer = ctx.models.get(teacher_spec)
        students = {}
        for label, spec in (("A", spec_a), ("B", spec_b)):
            if spec is None:
                continue
            model, student_tokenizer = ctx.models.get(spec)
            try:
                check_same_vocab(teacher_model, model, tokenizer, student_tokenizer)
            except ValueError as error:
                raise gr.Error(f"Student {label} {spec!r} cannot be compared with teacher {teacher_spec!r}: {error}") from error
            students[label] = model
        prompt_vectors = load_soft_prompt_from(ctx, soft_prompt_text, teacher_model, teacher_spec)

        report = token_report(teacher_model, students.get("A"), tokenizer, record, config,
                              soft_prompt=prompt_vectors, response=response_text, top_n=top_n_value)
        prob_b = None
        if "B" in students:
            prob_b = token_report(teacher_model, students["B"], tokenizer, record, config,
                                  soft_prompt=prompt_vectors, response=response_text, top_n=1)["student_prob"]
        logger.info("Inspect: %d tokens, teacher %s, students %s", len(report["tokens"]), teacher_spec, [spec_a, spec_b])

        highlighted = [(token, round(score, 4)) for token, score in zip(report["tokens"], report["normalized_entropy"])]
        if report.get("student_prob") is not None and prob_b is not None:
            movement_plot = movement_figure(report, report["student_prob"], prob_b)
        else:
            movement_plot = empty_figure("Choose student A and student B to see where B moved toward the teacher.")
        payload = dict(report, student_b_prob=prob_b, teacher=teacher_spec, student_a=spec_a, student_b=spec_b,
                       soft_prompt=bool(prompt_vectors is not None))
        return (
            summary_markdown(report, prob_b, prompt_vectors is not None),
            highlighted,
            heatmap_figure(report, prob_b),
            movement_plot,
            table_rows(report, prob_b),
            payload,
        )

    inspect_fn = spaces_mode.gpu(inspect) if ctx.spaces else inspect
    generate_fn = spaces_mode.gpu(generate) if ctx.spaces else generate
    split.change(change_split, inputs=split, outputs=record, api_name="inspect_split")
    record.change(pick, inputs=[split, record], outputs=[instruction, context, response], api_name="inspect_pick")
    reference_button.click(use_reference, inputs=[split, record], outputs=response, api_name="inspect_use_reference")
    generate_button.click(generate_fn, inputs=[instruction, context, generate_model], outputs=response, api_name="inspect_generate")
    inspect_button.click(
        inspect_fn,
        inputs=[split, record, instruction, context, response, teacher, student_a, student_b, soft_prompt, strategy,
                top_k, top_p, fallback_temperature, alpha, top_n],
        outputs=[summary, entropy_text, heatmap, movement, table, result],
        api_name="inspect",
    )

    def attach():
        models = model_choices(ctx.paths)
        return (
            gr.Dropdown(choices=models), gr.Dropdown(choices=models), gr.Dropdown(choices=models),
            gr.Dropdown(choices=models), gr.Dropdown(choices=soft_prompt_choices(ctx.paths)),
        )

    return {"attach": attach, "attach_outputs": [generate_model, teacher, student_a, student_b, soft_prompt]}

