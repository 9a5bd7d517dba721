"""Evaluation speed: batched greedy decoding (promptkd.generation) against a per-example generate loop.

Both decode the same Dolly test prompts greedily in float32 with the same GenerationConfig. The
outputs must be identical: `check_identical` raises AssertionError otherwise, and bench.py calls it
after the results are saved, so a mismatch is recorded as well. BERTScore (the offline
all-MiniLM-L6-v2 model via promptkd.metrics) is timed separately.
"""

from __future__ import annotations

import logging

import torch

from benchmarks.common import spread, timed
from promptkd import data as dolly
from promptkd.generation import generate_greedy, generation_config
from promptkd.metrics import bertscore_f1

logger = logging.getLogger(__name__)


@torch.inference_mode()
def generate_one_by_one(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy-decode each prompt alone with model.generate: the loop that batching replaces."""
    config = generation_config(tokenizer, max_new_tokens)
    was_training = model.training
    model.eval()
    texts = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], dtype=torch.long, device=model.device)  # (1, T)
        sequence = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        new_ids = sequence[0, len(prompt) :].tolist()
        if tokenizer.eos_token_id in new_ids:
            new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(new_ids, skip_special_tokens=True).strip())
    model.train(was_training)
    return texts


def _first_mismatch(batched: list[str], single: list[str]) -> str:
    for index, (a, b) in enumerate(zip(batched, single)):
        if a != b:
            return f"record {index}: batched {a!r} vs per-example {b!r}"
    return "none"


def run_eval_section(
    model,
    tokenizer,
    device: torch.device,
    num_records: int = 32,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_length: int = 512,
    repeats: int = 1,
    bertscore: bool = True,
) -> dict:
    """Time both decoding loops on the first `num_records` test records (alternating which runs first)."""
    records = dolly.load_split(dolly.SHIPPED_SOURCE, "test", limit=num_records)
    prompts = [dolly.encode_prompt(r, tokenizer, "dolly", max_length - max_new_tokens) for r in records]
    model = model.to(device).float().eval()

    batched_s, single_s = [], []
    batched = single = None
    for round_index in range(repeats):
        runs = [
            ("batched", lambda: generate_greedy(model, tokenizer, prompts, batch_size, max_new_tokens, progress=False)),
            ("single", lambda: generate_one_by_one(model, tokenizer, prompts, max_new_tokens)),
        ]
        if round_index % 2 == 1:
            runs.reverse()
        for name, fn in runs:
            texts, seconds = timed(fn, device)
            if name == "batched":
                batched = texts
                batched_s.append(seconds)
            else:
                single = texts
                single_s.append(seconds)

    identical = batched == single
    mismatches = sum(a != b for a, b in zip(batched, single))
    section = {
        "num_records": len(records),
        "record_indices": [r.index for r in records],
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "dtype": "fp32",
        "prompt_tokens": spread([len(p) for p in prompts]),
        "batched_s": spread(batched_s),
        "per_example_s": spread(single_s),
        "speedup": spread([s / b for s, b in zip(single_s, batched_s)]),
        "identical": identical,
        "mismatches": mismatches,
        "empty_outputs": sum(not text for text in batched),
    }
    if not identical:
        section["first_mismatch"] = _first_mismatch(batched, single)
    if bertscore:
        section["bertscore"] = time_bertscore(batched, [r.response for r in records], device)
    return section


def check_identical(section: dict) -> None:
    """Raise AssertionError when batched and per-example decoding disagreed (bench.py calls it after saving)."""
    assert section["identical"], (
        f"Batched and per-example greedy outputs differ in {section['mismatches']} of {section['num_records']} records, "
        f"first: {section['first_mismatch']}"
    )


def time_bertscore(predictions: list[str], references: list[str], device: torch.device) -> dict:
    """Seconds of BERTScore F1 with the offline model: first call (loads the model) and a second call."""
    try:
        (scores, name), first_s = timed(lambda: bertscore_f1(predictions, references, model="offline"), device)
        _, second_s = timed(lambda: bertscore_f1(predictions, references, model="offline"), device)
    except FileNotFoundError as error:
        logger.warning("BERTScore timing skipped: %s", error)
        return {"error": str(error)}
    return {
        "model": name,
        "first_call_s": first_s,
        "second_call_s": second_s,
        "pairs": len(predictions),
        "mean_f1": sum(scores) / len(scores) if scores else None,
    }
