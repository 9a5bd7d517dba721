"""Compare tab: one prompt, two to four models, the same decoding settings, outputs side by side."""

from __future__ import annotations

import logging
import time

import gradio as gr

from promptkd.data import encode_prompt
from promptkd.generation import generate_token_ids
from promptkd.models import SMOLLM2
from promptkd.webui import spaces as spaces_mode
from promptkd.webui.common import (
    AppContext,
    find_record,
    model_choices,
    prompt_record,
    record_choices,
    resolve_model,
    split_records,
)

logger = logging.getLogger("promptkd.webui.compare")

MIN_MODELS = 2
MAX_MODELS = 4
SPLIT = "test"
TEMPLATE = "dolly"
MAX_LENGTH = 512
BERTSCORE_CHOICES = ["offline", "none"]
SCORE_HEADERS = ["model", "ROUGE-L", "BERTScore F1", "new tokens", "seconds"]


def pick_record(index) -> tuple[str, str, str]:
    """Fill the prompt boxes from a test record: instruction, context and reference response."""
    if index in (None, ""):
        return gr.skip(), gr.skip(), gr.skip()
    record = find_record(SPLIT, index)
    return record.instruction, record.context, record.response


def search_records(query: str):
    choices = record_choices(SPLIT, query)
    if not choices:
        gr.Warning(f"No {SPLIT} record contains {query!r}: try a shorter search text, or type the prompt below.")
        return gr.Dropdown(choices=record_choices(SPLIT), value=None)
    return gr.Dropdown(choices=choices, value=choices[0][1])


def score_outputs(outputs: list[str], reference: str, bertscore_model: str) -> tuple[list, list, str]:
    """Score each output against the reference: ROUGE-L and BERTScore F1 (x100), and the BERTScore model name."""
    from promptkd.metrics import bertscore_f1, rouge_l_f1

    references = [reference] * len(outputs)
    rouge = [100.0 * value for value in rouge_l_f1(outputs, references)]
    try:
        bert, name = bertscore_f1(outputs, references, model=bertscore_model)
    except (FileNotFoundError, OSError, ValueError) as error:
        gr.Warning(f"BERTScore with model {bertscore_model!r} failed ({error}); showing ROUGE-L only. Pick 'none' to skip BERTScore.")
        return rouge, [None] * len(outputs), ""
    bert = [None] * len(outputs) if bert is None else [100.0 * value for value in bert]
    return rouge, bert, name or ""


def create_compare_tab(ctx: AppContext) -> dict:
    choices = model_choices(ctx.paths)
    first = split_records(SPLIT)[0]
    gr.Markdown(
        "Pick a prompt from the Dolly test split (by original index, or search its text) or type one, choose "
        f"{MIN_MODELS}–{MAX_MODELS} models and decode them all with the same settings."
    )
    with gr.Row():
        record = gr.Dropdown(record_choices(SPLIT), value=first.index, elem_id="compare-record", label="Dolly test record", info="Pick one, or type its original Dolly index (14500–14999).", allow_custom_value=True, scale=3)
        query = gr.Textbox(label="Search the test split", placeholder="e.g. photosynthesis", scale=2)
        search_button = gr.Button("Search", scale=1)
    with gr.Row():
        instruction = gr.Textbox(first.instruction, label="Instruction", lines=3, elem_id="compare-instruction")
        context = gr.Textbox(first.context, label="Context (optional)", lines=3)
        reference = gr.Textbox(first.response, label="Reference response (optional; used for the scores)", lines=3)
    models = gr.Dropdown(
        choices, elem_id="compare-models", value=[SMOLLM2, f"{SMOLLM2}:layers=default"], multiselect=True, max_choices=MAX_MODELS,
        allow_custom_value=True, label=f"Models ({MIN_MODELS}–{MAX_MODELS})",
        info="Presets, finished runs, or a model folder under the app's folders.",
    )
    with gr.Row():
        max_new_tokens = gr.Number(value=32, precision=0, minimum=1, label="max_new_tokens")
        do_sample = gr.Checkbox(value=False, label="Sample (off: greedy)")
        temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature")
        top_k = gr.Number(value=0, precision=0, minimum=0, label="top_k (0: off)")
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p")
        seed = gr.Number(value=0, precision=0, label="seed")
        bertscore_model = gr.Dropdown(BERTSCORE_CHOICES, value="offline", label="BERTScore model")
    compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
    with gr.Row():
        boxes = [gr.Textbox(label=f"Model {i + 1}", lines=8, interactive=False, visible=i < MIN_MODELS, elem_id=f"compare-output-{i + 1}") for i in range(MAX_MODELS)]
    scores = gr.Dataframe(headers=SCORE_HEADERS, elem_id="compare-scores", label="Scores against the reference", interactive=False)
    with gr.Accordion("Result (JSON)", open=False):
        result = gr.JSON(label="Outputs and scores")

    def compare(instruction_text, context_text, reference_text, record_index, model_specs, new_tokens, sample, temperature_value, top_k_value, top_p_value, seed_value, bertscore):
        record = prompt_record(instruction_text, context_text, reference_text, record_index)
        typed = [spec for spec in (model_specs or []) if spec and spec.strip()]
        if not MIN_MODELS <= len(typed) <= MAX_MODELS:
            raise gr.Error(f"{len(typed)} models chosen: choose between {MIN_MODELS} and {MAX_MODELS} models to compare.")
        specs = [resolve_model(ctx.paths, spec, f"Model {i + 1}") for i, spec in enumerate(typed)]
        new_tokens = int(new_tokens or 0)
        if new_tokens < 1:
            raise gr.Error(f"max_new_tokens={new_tokens} is invalid: use 1 or more tokens.")
        seed_value = int(seed_value or 0)

        outputs, rows = [], []
        for spec in specs:
            model, tokenizer = ctx.models.get(spec)
            prompt_ids = encode_prompt(record, tokenizer, TEMPLATE, MAX_LENGTH - new_tokens)
            started = time.perf_counter()
            try:
                ids = generate_token_ids(
                    model, tokenizer, [prompt_ids], batch_size=1, max_new_tokens=new_tokens, do_sample=bool(sample),
                    temperature=float(temperature_value), top_k=int(top_k_value or 0), top_p=float(top_p_value),
                    seed=seed_value if sample else None, include_eos=False, progress=False,
                )[0]
            except ValueError as error:
                raise gr.Error(f"Generation with {spec!r} failed: {error}") from error
            seconds = time.perf_counter() - started
            outputs.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
            rows.append({"model": spec, "new_tokens": len(ids), "seconds": seconds})
            logger.info("Compare: %s generated %d tokens in %.2f s", spec, len(ids), seconds)

        bert_name = ""
        if record.response:
            rouge, bert, bert_name = score_outputs(outputs, record.response, bertscore)
        else:
            rouge, bert = [None] * len(outputs), [None] * len(outputs)
        for row, output, rouge_value, bert_value in zip(rows, outputs, rouge, bert):
            row.update(output=output, rouge_l=rouge_value, bertscore=bert_value)

        box_updates = [
            gr.Textbox(value=outputs[i], label=specs[i], visible=True) if i < len(specs) else gr.Textbox(value="", visible=False)
            for i in range(MAX_MODELS)
        ]
        table = [
            [row["model"], _round(row["rouge_l"]), _round(row["bertscore"]), row["new_tokens"], round(row["seconds"], 2)]
            for row in rows
        ]
        payload = {
            "index": record.index,
            "reference": record.response,
            "bertscore_model": bert_name or None,
            "decoding": {"do_sample": bool(sample), "max_new_tokens": new_tokens, "temperature": float(temperature_value),
                         "top_k": int(top_k_value or 0), "top_p": float(top_p_value), "seed": seed_value if sample else None},
            "models": rows,
        }
        return (*box_updates, table, payload)

    compare_fn = spaces_mode.gpu(compare) if ctx.spaces else compare
    record.change(pick_record, inputs=record, outputs=[instruction, context, reference], api_name="compare_pick")
    search_button.click(search_records, inputs=query, outputs=record, api_name="compare_search")
    query.submit(search_records, inputs=query, outputs=record, api_name="compare_search_submit")
    compare_button.click(
        compare_fn,
        inputs=[instruction, context, reference, record, models, max_new_tokens, do_sample, temperature, top_k, top_p, seed, bertscore_model],
        outputs=[*boxes, scores, result],
        api_name="compare",
    )

    def attach():
        return gr.Dropdown(choices=model_choices(ctx.paths))

    return {"attach": attach, "attach_outputs": [models]}


def _round(value):
    return None if value is None else round(value, 2)
