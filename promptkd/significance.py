"""Paired bootstrap over test prompts, and mean ± sample standard deviation over seeds."""

from __future__ import annotations

from typing import Sequence

import numpy as np

CONFIDENCE_LEVEL = 0.95
# Resamples drawn per numpy call, which bounds the index matrix to RESAMPLE_CHUNK x num_prompts.
RESAMPLE_CHUNK = 256
# The resampled means take 8 bytes each, and the p-value resolution 2/B is already 2e-5 at this bound.
MAX_RESAMPLES = 100_000


def _paired_deltas(base_scores: Sequence[float], other_scores: Sequence[float]) -> np.ndarray:
    base = np.asarray(base_scores, dtype=np.float64)
    other = np.asarray(other_scores, dtype=np.float64)
    if base.ndim != 1 or base.shape != other.shape:
        raise ValueError(
            f"Paired scores need two 1-D sequences of the same length, but got shapes {base.shape} and {other.shape}. "
            "Pass one score per prompt, in the same prompt order, for both systems."
        )
    if base.size < 2:
        raise ValueError(
            f"A paired bootstrap needs at least 2 prompts, but got {base.size}. Evaluate on more prompts (eval_limit)."
        )
    if not (np.all(np.isfinite(base)) and np.all(np.isfinite(other))):
        raise ValueError("Paired scores contain NaN or infinite values: every prompt needs a finite score.")
    return other - base


def paired_bootstrap(
    base_scores: Sequence[float],
    other_scores: Sequence[float],
    num_resamples: int = 1000,
    seed: int = 0,
    confidence_level: float = CONFIDENCE_LEVEL,
) -> dict[str, float]:
    """Compare two systems scored on the same prompts with a paired percentile bootstrap.

    With per-prompt differences d_i = other_i - base_i (i = 1..n):
      diff: the observed mean difference, mean(d).
      Resampling: each of the B = `num_resamples` resamples draws n prompt indices uniformly with
        replacement (numpy.random.default_rng(seed).integers) and takes d*_b, the mean of d over them.
        Both systems share the drawn indices, which is what makes the bootstrap paired.
      ci_low, ci_high: the equal-tailed percentile interval, numpy.percentile of d* at
        100 * (1 - level) / 2 and 100 * (1 + level) / 2 (2.5 and 97.5 for the default 95%), with
        numpy's default linear interpolation.
      p_value: two-sided, p = min(1, 2 * min(#{d*_b <= 0}, #{d*_b >= 0}) / B). This p-value inverts
        the percentile interval: up to the interpolation between neighbouring resamples, p < 1 - level
        exactly when the interval of that level excludes 0. Resamples equal to 0 count on both sides, so
        identical systems get p = 1. A p of 0 means that no resample fell on the other side of 0, so
        p < 2 / B, the resolution of B resamples.
    The same seed and inputs give the same result.
    """
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples!r} is invalid: use a positive integer (1000 or more is usual).")
    if num_resamples > MAX_RESAMPLES:
        raise ValueError(f"num_resamples={num_resamples} is too many: use at most {MAX_RESAMPLES} (1000 is usual).")
    if not 0.0 < confidence_level < 1.0:
        raise ValueError(f"confidence_level={confidence_level} is invalid: use a value in (0, 1), such as 0.95.")
    deltas = _paired_deltas(base_scores, other_scores)
    n = deltas.size

    rng = np.random.default_rng(seed)
    resampled = np.empty(num_resamples, dtype=np.float64)
    for start in range(0, num_resamples, RESAMPLE_CHUNK):
        size = min(RESAMPLE_CHUNK, num_resamples - start)
        indices = rng.integers(0, n, size=(size, n))  # (size, n) prompt indices
        resampled[start : start + size] = deltas[indices].mean(axis=1)

    tail = 100.0 * (1.0 - confidence_level) / 2.0
    ci_low, ci_high = np.percentile(resampled, [tail, 100.0 - tail])
    at_or_below = int(np.count_nonzero(resampled <= 0.0))
    at_or_above = int(np.count_nonzero(resampled >= 0.0))
    p_value = min(1.0, 2.0 * min(at_or_below, at_or_above) / num_resamples)
    return {"diff": float(deltas.mean()), "ci_low": float(ci_low), "ci_high": float(ci_high), "p_value": p_value}


def interval_excludes_zero(result: dict) -> bool:
    """Return whether the interval [ci_low, ci_high] of a paired_bootstrap result lies entirely above or below 0."""
    return result["ci_low"] > 0.0 or result["ci_high"] < 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (ddof=1) of `values`, such as one score per seed.

    One value has no spread to estimate, so its standard deviation is reported as 0.0.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"mean_std needs a non-empty 1-D sequence of numbers, but got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"mean_std got NaN or infinite values: {array.tolist()}.")
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return mean, std


def format_p_value(p_value: float, num_resamples: int) -> str:
    """Format a bootstrap p-value as 'p=0.0312', writing 0 as 'p<2/B' (the resolution of B resamples)."""
    if p_value == 0.0:
        return f"p<{2.0 / num_resamples:.2g}"
    return f"p={p_value:.3g}"
