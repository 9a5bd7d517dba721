"""Per-token view of what the strategies see: teacher entropy, weights, kept sets, student probabilities."""

from __future__ import annotations

import math
from typing import Optional

import torch

from promptkd import data as dolly
from promptkd.losses import (
    StepContext,
    calibrated_entropy_weights,
    dynamic_alpha,
    gated_alpha,
    scheduled_top_k_top_p,
    entropy,
    entropy_weights,
    filter_top_k_top_p,
    parse_strategy,
    safe_log_softmax,
)
from promptkd.soft_prompt import SoftPrompt, teacher_forward


def encode_pair(record, response: str, tokenizer, template: str, max_length: int) -> tuple[list[int], list[int]]:
    """Prompt ids and response ids (ending in EOS) for `record`'s prompt and the given response text."""
    response_ids = tokenizer(" " + response.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[: max(1, max_length // 2)]
    prompt_ids = dolly.encode_prompt(record, tokenizer, template, max_length - len(response_ids))
    return prompt_ids, response_ids


@torch.no_grad()
def _response_log_probs(model, prompt_ids, response_ids, soft_prompt: Optional[SoftPrompt] = None) -> torch.Tensor:
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids + response_ids], device=device)  # (1, T)
    attention_mask = torch.ones_like(input_ids)
    logits = teacher_forward(model, input_ids, attention_mask, soft_prompt, logits_to_keep=len(response_ids) + 1)
    return safe_log_softmax(logits[0, :-1])  # (R, V)


@torch.no_grad()
def token_report(
    teacher,
    student,
    tokenizer,
    record,
    config,
    ctx: Optional[StepContext] = None,
    soft_prompt: Optional[SoftPrompt] = None,
    response: Optional[str] = None,
    top_n: int = 5,
) -> dict:
    """Per-token statistics of `response` (default: the record's reference) after the record's prompt.

    `config` supplies template, max_length, strategy, top_k, top_p and fallback_temperature (a
    DistillConfig or anything with those fields). Returns plain lists, ready for JSON.
    """
    ctx = ctx or StepContext.from_config(config, step=0, total_steps=1)
    response = record.response if response is None else response
    prompt_ids, response_ids = encode_pair(record, response, tokenizer, config.template, config.max_length)

    teacher_log_probs = _response_log_probs(teacher, prompt_ids, response_ids, soft_prompt)  # (R, V)
    vocab_size = teacher_log_probs.shape[-1]
    token_entropy = entropy(teacher_log_probs)
    weights = entropy_weights(teacher_log_probs)
    strategy = parse_strategy(getattr(config, "strategy", "baseline"))
    top_k, top_p = ctx.top_k, ctx.top_p
    if strategy.filter == "scheduled":
        top_k, top_p = scheduled_top_k_top_p(ctx, vocab_size)
    kept_probs, kept_size, fallback = filter_top_k_top_p(teacher_log_probs, top_k, top_p, ctx.fallback_temperature)
    targets = torch.tensor(response_ids, device=teacher_log_probs.device)
    teacher_token_prob = teacher_log_probs.exp().gather(1, targets[:, None])[:, 0]

    alpha = [1.0] * len(response_ids)
    if strategy.blend == "soft":
        alpha = [ctx.alpha] * len(response_ids)
    elif strategy.blend == "dynamic":
        alpha = [dynamic_alpha(ctx)] * len(response_ids)
    elif strategy.blend == "entropy_gated":
        alpha = gated_alpha(teacher_log_probs, ctx).tolist()
    if strategy.weighting == "calibrated_entropy":
        weights = calibrated_entropy_weights(teacher_log_probs, torch.ones(len(response_ids)), ctx.entropy_gamma)

    student_token_prob = None
    if student is not None:
        student_log_probs = _response_log_probs(student, prompt_ids, response_ids)
        student_token_prob = student_log_probs.exp().gather(1, targets[:, None])[:, 0].tolist()

    top_values, top_ids = kept_probs.topk(min(top_n, vocab_size), dim=-1)
    kept_tokens = []
    for row in range(len(response_ids)):
        size = int(kept_size[row])
        entries = []
        for prob, token_id in zip(top_values[row].tolist(), top_ids[row].tolist()):
            if prob <= 0 or len(entries) >= size:
                break
            entries.append({"token": tokenizer.decode([token_id]), "id": token_id, "prob": prob})
        kept_tokens.append(entries)

    return {
        "index": getattr(record, "index", None),
        "prompt": tokenizer.decode(prompt_ids),
        "tokens": [tokenizer.decode([token_id]) for token_id in response_ids],
        "token_ids": response_ids,
        "entropy": token_entropy.tolist(),
        "normalized_entropy": (token_entropy / math.log(vocab_size)).tolist(),
        "weight": weights.tolist(),
        "kept_size": kept_size.tolist(),
        "fallback": fallback.tolist(),
        "kept_tokens": kept_tokens,
        "teacher_prob": teacher_token_prob.tolist(),
        "student_prob": student_token_prob,
        "alpha": alpha,
        "vocab_size": vocab_size,
        "top_k": top_k,
        "top_p": top_p,
    }


def format_report(report: dict) -> str:
    """Format a token report as a fixed-width text table for the CLI."""
    lines = [
        f"Teacher top-k={report['top_k']} top-p={report['top_p']:.3f}, |V|={report['vocab_size']}, "
        f"mean alpha={sum(report['alpha']) / max(len(report['alpha']), 1):.3f}",
        f"{'#':>3} {'token':<16} {'H':>6} {'H/logV':>7} {'w':>6} {'kept':>6} {'fb':>3} {'p_T':>7} {'p_S':>7}  kept set (top)",
    ]
    for i, token in enumerate(report["tokens"]):
        student = report["student_prob"][i] if report["student_prob"] is not None else float("nan")
        kept = ", ".join(f"{entry['token']!r}:{entry['prob']:.2f}" for entry in report["kept_tokens"][i])
        lines.append(
            f"{i:>3} {token!r:<16.16} {report['entropy'][i]:>6.3f} {report['normalized_entropy'][i]:>7.3f} "
            f"{report['weight'][i]:>6.3f} {report['kept_size'][i]:>6} {'y' if report['fallback'][i] else '-':>3} "
            f"{report['teacher_prob'][i]:>7.4f} {student:>7.4f}  {kept}"
        )
    legend = (
        "H: teacher entropy (nats). H/logV: H over log|V|. w: entropy weight 1 - H/logV. "
        "kept: tokens in the teacher's top-k/top-p set. "
        "fb: y where that set was empty or kept too little probability mass, so the temperature-scaled full "
        "distribution was used. "
        "p_T, p_S: teacher and student probability of the response token."
    )
    lines += ["", legend]
    return "\n".join(lines)
