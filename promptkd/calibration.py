"""Calibration of next-token predictions on reference responses: ECE, predictive entropy and NLL.

The model reads each prompt followed by its reference response (teacher forcing). At every response
token, including the final EOS, its next-token distribution is scored against the reference token:
confidence is the maximum probability, and the prediction is correct when the argmax is the reference
token.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from promptkd import data as dolly
from promptkd.data import IGNORE_INDEX
from promptkd.losses import entropy
from promptkd.models import response_logits

logger = logging.getLogger(__name__)

DEFAULT_NUM_BINS = 10
STATS_CHUNK_ROWS = 512  # token positions per softmax in calibration_stats


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], num_bins: int = DEFAULT_NUM_BINS) -> float:
    """Return the expected calibration error (a fraction in [0, 1]) over equal-width confidence bins.

    ECE = sum over bins b of |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|. Bin b contains the
    confidences in (b / num_bins, (b + 1) / num_bins], and the first bin also contains 0. The edges
    come from numpy.linspace(0, 1, num_bins + 1). Empty bins add nothing.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if num_bins < 1:
        raise ValueError(f"num_bins={num_bins} is invalid: use 1 or more bins.")
    if confidences.ndim != 1 or confidences.shape != correct.shape:
        raise ValueError(
            f"Got confidences of shape {confidences.shape} and correct of shape {correct.shape}: "
            "pass two 1-D sequences of the same length."
        )
    if confidences.size == 0:
        raise ValueError("expected_calibration_error got no predictions: pass at least one confidence.")
    if not np.all(np.isfinite(confidences)) or confidences.min() < 0.0 or confidences.max() > 1.0:
        raise ValueError(f"Confidences must lie in [0, 1], but they range from {confidences.min()} to {confidences.max()}.")
    if not np.all((correct == 0.0) | (correct == 1.0)):
        raise ValueError("correct must contain only 0/1 or False/True values.")

    inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    bins = np.digitize(confidences, inner_edges, right=True)  # bin b: edges[b] < confidence <= edges[b + 1]
    total = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        if count == 0:
            continue
        gap = abs(correct[in_bin].mean() - confidences[in_bin].mean())
        total += count / confidences.size * gap
    return float(total)


def _response_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the logits (N, V) that predict the N labelled tokens of a left-padded batch, and those tokens (N,).

    Position t predicts token t + 1, and the output head runs only on the N positions whose next token is labelled.
    """
    labels = batch["labels"]  # (B, T), -100 on prompt and padding
    predicts_label = torch.zeros_like(labels, dtype=torch.bool)
    predicts_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # (B, T)
    logits = response_logits(model, batch["input_ids"], batch["attention_mask"], predicts_label)  # (N, V)
    return logits, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]


def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return per-token confidence, correctness, entropy (nats) and NLL (nats) of logits (N, V) against targets (N,)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    max_log_prob, argmax = log_probs.max(dim=-1)
    return {
        "confidence": max_log_prob.exp().clamp(max=1.0),  # rounding can put a log-probability a few ulp above 0
        "correct": argmax == targets,
        "entropy": entropy(log_probs),
        "nll": -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
    }


@torch.no_grad()
def calibration_stats(
    model,
    tokenizer,
    records,
    template: str = "dolly",
    max_length: int = 512,
    batch_size: int = 8,
    num_bins: int = DEFAULT_NUM_BINS,
) -> dict:
    """Teacher-force the reference responses of `records` and measure calibration over all response tokens.

    Each example is encoded by promptkd.data.encode_example (prompt, " " + response for the dolly
    template, EOS), so the scored tokens are the response tokens and the final EOS. Batches are left-padded.
    Returns a dict:
      ece: expected calibration error (fraction in [0, 1], `num_bins` equal-width bins),
      mean_entropy: mean entropy of the next-token distributions (nats),
      mean_nll: mean negative log-likelihood of the reference tokens (nats; exp of it is the perplexity),
      accuracy: share of tokens whose argmax is the reference token,
      mean_confidence: mean maximum probability,
      num_tokens: number of scored tokens.
    NOTE: each batch keeps its whole head output in memory, (response tokens in the batch) x vocabulary float32 values:
    about 1.5 GB for 8 responses of 1,000 tokens with SmolLM2's 49,152 tokens. Lower batch_size for long responses.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: use a positive number of examples per batch.")
    if not records:
        raise ValueError("calibration_stats got no records: pass at least one record with a response.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    examples = [dolly.encode_example(record, tokenizer, template, max_length) for record in records]

    parts: dict[str, list[torch.Tensor]] = {"confidence": [], "correct": [], "entropy": [], "nll": []}
    try:
        for start in range(0, len(examples), batch_size):
            batch = dolly.collate_left(examples[start : start + batch_size], tokenizer.pad_token_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            logits, targets = _response_logits(model, batch)
            # Chunks bound the (rows, V) temporaries of the softmax and entropy.
            for row in range(0, logits.shape[0], STATS_CHUNK_ROWS):
                chunk = token_statistics(logits[row : row + STATS_CHUNK_ROWS], targets[row : row + STATS_CHUNK_ROWS])
                for key, value in chunk.items():
                    parts[key].append(value.cpu())
    finally:
        model.train(was_training)

    values = {key: torch.cat(chunks) for key, chunks in parts.items()}
    confidence = values["confidence"].double().numpy()
    correct = values["correct"].numpy()
    stats = {
        "ece": expected_calibration_error(confidence, correct, num_bins),
        "mean_entropy": float(values["entropy"].double().mean()),
        "mean_nll": float(values["nll"].double().mean()),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
        "num_tokens": int(confidence.size),
    }
    logger.info(
        "Calibration over %d response tokens: ECE %.2f %%, mean entropy %.3f nats, mean NLL %.3f nats",
        stats["num_tokens"], 100.0 * stats["ece"], stats["mean_entropy"], stats["mean_nll"],
    )
    return stats
