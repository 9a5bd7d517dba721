"""Distillation losses as small pure functions.

Every student strategy has one signature::

    strategy(student_logits, teacher_logits, mask, ctx) -> LossOutput

with logits of shape (..., V), a mask of the same leading shape (1 on response tokens, 0 elsewhere) and
a `StepContext` holding the step and the strategy settings. Strategies are looked up by exact name in
`STRATEGIES`; names joined by '+' compose (filter the teacher, then blend, then weight tokens).
All KL terms are computed in float32 whatever the dtype of the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from promptkd.config import ConfigError

# A teacher row whose kept set has less probability mass than this (under the full softmax) counts as
# degenerate and falls back to the temperature-scaled full distribution.
MIN_KEPT_MASS = 1e-8
# Reverse KL needs log(target) where filtering set target probabilities to 0, so they are floored here.
REVERSE_KL_FLOOR = 1e-12
# kd_loss works on this many logits (about 4 MiB of float32) at a time, so its float32 temporaries stay
# small whatever the batch: rows per chunk = max(1, KD_CHUNK_ELEMENTS // vocabulary size).
KD_CHUNK_ELEMENTS = 2**20


@dataclass(frozen=True)
class StepContext:
    """Training progress and strategy settings that a loss may read."""

    step: int = 0
    total_steps: int = 1
    alpha: float = 0.7
    alpha_start: float = 0.9
    alpha_end: float = 0.5
    top_k: int = 200
    top_p: float = 0.9
    fallback_temperature: float = 2.0
    kl_direction: str = "forward"
    entropy_gamma: float = 1.0
    gated_alpha_min: float = 0.5
    gated_alpha_max: float = 0.9
    scheduled_top_k_start: int = 0
    scheduled_top_k_end: int = 200
    scheduled_top_p_start: float = 1.0
    scheduled_top_p_end: float = 0.9

    @classmethod
    def from_config(cls, config, step: int, total_steps: int) -> "StepContext":
        return cls(
            step=step,
            total_steps=total_steps,
            alpha=config.alpha,
            alpha_start=config.alpha_start,
            alpha_end=config.alpha_end,
            top_k=config.top_k,
            top_p=config.top_p,
            fallback_temperature=config.fallback_temperature,
            kl_direction=config.kl_direction,
            entropy_gamma=config.entropy_gamma,
            gated_alpha_min=config.gated_alpha_min,
            gated_alpha_max=config.gated_alpha_max,
            scheduled_top_k_start=config.scheduled_top_k_start,
            scheduled_top_k_end=config.scheduled_top_k_end,
            scheduled_top_p_start=config.scheduled_top_p_start,
            scheduled_top_p_end=config.scheduled_top_p_end,
        )


@dataclass
class LossOutput:
    """A scalar loss, scalar statistics for logging and detached per-token values for inspection."""

    loss: torch.Tensor
    stats: dict
    per_token: dict


@dataclass(frozen=True)
class Strategy:
    """The parts a composed strategy applies: teacher filter, target blend and token weighting."""

    filter: Optional[str] = None  # "top_k_top_p" or "scheduled"
    blend: Optional[str] = None  # "soft", "dynamic" or "entropy_gated"
    weighting: Optional[str] = None  # "entropy" or "calibrated_entropy"

    def merge(self, other: "Strategy", names: str) -> "Strategy":
        merged = {}
        for part in ("filter", "blend", "weighting"):
            mine, theirs = getattr(self, part), getattr(other, part)
            if mine and theirs and mine != theirs:
                raise ConfigError(
                    f"strategy={names!r} is invalid: it combines two {part} rules ({mine} and {theirs}); keep one."
                )
            merged[part] = mine or theirs
        return Strategy(**merged)


# ---------------------------------------------------------------------------------------------------
# Building blocks, all over flattened tokens: logits (N, V), probabilities (N, V), per-token values (N,).


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where mask is 1; 0 (not NaN) when nothing is unmasked."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def safe_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 that turns NaN logits into -inf and all -inf rows into a uniform row."""
    logits = logits.float().nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))
    dead_rows = ~torch.isfinite(logits).any(dim=-1, keepdim=True)
    logits = torch.where(dead_rows, torch.zeros_like(logits), logits)
    return F.log_softmax(logits, dim=-1)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of log-probabilities (N, V) -> (N,); 0 * log 0 counts as 0."""
    probs = log_probs.exp()
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)


def entropy_weights(teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """w_t = 1 - H(p_T,t) / log|V|: 1 for a one-hot teacher, 0 for a uniform one. (N, V) -> (N,)."""
    vocab_size = teacher_log_probs.shape[-1]
    return (1.0 - entropy(teacher_log_probs) / math.log(vocab_size)).clamp(0.0, 1.0)


def filter_top_k_top_p(
    teacher_logits: torch.Tensor, top_k: int, top_p: float, fallback_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the teacher's top-k tokens, then the smallest top-p set of those, and renormalise.

    Args:
        teacher_logits: (N, V) logits; NaN and -inf entries are never kept.
        top_k: tokens kept by the first cut; 0 keeps the whole vocabulary.
        top_p: cumulative probability (of the top-k renormalised distribution) the kept set must reach.
        fallback_temperature: rows whose kept set is empty or holds less than MIN_KEPT_MASS of the full
            softmax use softmax(logits / fallback_temperature) over the full vocabulary instead.

    Returns:
        probs (N, V) float32 summing to 1 per row, kept_size (N,) long, fallback (N,) bool.
    """
    logits = teacher_logits.float().nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))
    vocab_size = logits.shape[-1]
    full_log_probs = safe_log_softmax(logits)

    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
    keep_sorted = torch.isfinite(sorted_logits)
    if 0 < top_k < vocab_size:
        keep_sorted[:, top_k:] = False

    # Top-p on the renormalised top-k distribution: keep a token while the mass before it is < top_p,
    # so the most likely kept token always stays.
    cut_logits = sorted_logits.masked_fill(~keep_sorted, float("-inf"))
    cut_probs = safe_log_softmax(cut_logits).exp()
    mass_before = cut_probs.cumsum(dim=-1) - cut_probs
    keep_sorted &= mass_before < top_p

    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to vocabulary order
    kept_size = keep.sum(dim=-1)
    kept_mass = (full_log_probs.exp() * keep).sum(dim=-1)
    fallback = (kept_size == 0) | (kept_mass < MIN_KEPT_MASS) | ~torch.isfinite(logits).any(dim=-1)

    filtered = safe_log_softmax(logits.masked_fill(~keep, float("-inf"))).exp()
    fallback_probs = safe_log_softmax(logits / fallback_temperature).exp()
    probs = torch.where(fallback.unsqueeze(-1), fallback_probs, filtered)
    kept_size = torch.where(fallback, torch.full_like(kept_size, vocab_size), kept_size)
    return probs, kept_size, fallback


def dynamic_alpha(ctx: StepContext) -> float:
    """alpha = max(alpha_end, alpha_start - (alpha_start - alpha_end) * step / total_steps)."""
    progress = ctx.step / max(ctx.total_steps, 1)
    return max(ctx.alpha_end, ctx.alpha_start - (ctx.alpha_start - ctx.alpha_end) * progress)


def scheduled_top_k_top_p(ctx: StepContext, vocab_size: int) -> tuple[int, float]:
    """Top-k and top-p moved linearly from their start to their end values over training.

    A top-k of 0 means no cut and counts as the whole vocabulary while interpolating.
    """
    progress = min(max(ctx.step / max(ctx.total_steps, 1), 0.0), 1.0)
    k_start = ctx.scheduled_top_k_start or vocab_size
    k_end = ctx.scheduled_top_k_end or vocab_size
    top_k = int(round(k_start + (k_end - k_start) * progress))
    top_p = ctx.scheduled_top_p_start + (ctx.scheduled_top_p_end - ctx.scheduled_top_p_start) * progress
    return (0 if top_k >= vocab_size else top_k), top_p


def gated_alpha(teacher_log_probs: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Per-token alpha_t = alpha_min + (alpha_max - alpha_min) * (1 - H(p_T,t) / log|V|). (N, V) -> (N,)."""
    confidence = entropy_weights(teacher_log_probs)
    return ctx.gated_alpha_min + (ctx.gated_alpha_max - ctx.gated_alpha_min) * confidence


def calibrated_entropy_weights(teacher_log_probs: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Entropy weights raised to `gamma` and rescaled to mean 1 over the unmasked tokens. (N, V) -> (N,).

    Where every unmasked weight is 0 (a uniform teacher everywhere), all weights are 1.
    """
    return calibrate_weights(entropy_weights(teacher_log_probs), mask, gamma)


def calibrate_weights(entropy_weight: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """calibrated_entropy_weights from per-token entropy weights (N,) -> (N,)."""
    weights = entropy_weight ** gamma
    mean = masked_mean(weights, mask)
    if mean <= 0:
        return torch.ones_like(weights)
    return weights / mean


def token_kl(target_probs: torch.Tensor, student_log_probs: torch.Tensor, direction: str) -> torch.Tensor:
    """Per-token KL between a target distribution and the student. (N, V) -> (N,).

    forward: KL(target || student) = sum target * (log target - log q).
    reverse: KL(student || target) = sum q * (log q - log target), target floored at REVERSE_KL_FLOOR.
    """
    if direction == "forward":
        target_log = torch.where(target_probs > 0, target_probs.log(), torch.zeros_like(target_probs))
        terms = torch.where(target_probs > 0, target_probs * (target_log - student_log_probs), torch.zeros_like(target_probs))
        return terms.sum(dim=-1)
    if direction == "reverse":
        student_probs = student_log_probs.exp()
        target_log = target_probs.clamp_min(REVERSE_KL_FLOOR).log()
        return (student_probs * (student_log_probs - target_log)).sum(dim=-1)
    raise ConfigError(f"kl_direction={direction!r} is invalid: choose forward or reverse.")


def _flatten(student_logits, teacher_logits, mask):
    vocab_size = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab_size:
        raise ValueError(
            f"Student logits have {vocab_size} classes but teacher logits have {teacher_logits.shape[-1]}: "
            "teacher and student must share a vocabulary."
        )
    return (
        student_logits.reshape(-1, vocab_size),  # (N, V)
        teacher_logits.reshape(-1, vocab_size),  # (N, V)
        mask.reshape(-1).float(),  # (N,)
    )


# ---------------------------------------------------------------------------------------------------
# The strategy loss and the named strategies.


class _PrecomputedRowGradients(torch.autograd.Function):
    """Per-token values (N,) attached to the logits (N, V) they come from, with their gradient rows computed in advance.

    Each value depends on its own logits row only, so row_grads[t] = d values[t] / d logits[t] is the whole
    Jacobian, and the backward pass scales each row by the incoming gradient of its value.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, values: torch.Tensor, row_grads: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(row_grads)
        ctx.logits_dtype = logits.dtype
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor):
        (row_grads,) = ctx.saved_tensors
        return (row_grads * grad_values.unsqueeze(-1)).to(ctx.logits_dtype), None, None


def _token_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ctx: StepContext, strategy: Strategy) -> dict:
    """Per-token parts of kd_loss for rows of logits (n, V); only "kl" carries a gradient (to student_logits)."""
    student_log_probs = safe_log_softmax(student_logits)  # (n, V) float32
    teacher_log_probs = safe_log_softmax(teacher_logits)  # (n, V) float32
    num_tokens, vocab_size = student_logits.shape
    device = student_log_probs.device

    if strategy.filter:
        top_k, top_p = ctx.top_k, ctx.top_p
        if strategy.filter == "scheduled":
            top_k, top_p = scheduled_top_k_top_p(ctx, vocab_size)
        target, kept_size, fallback = filter_top_k_top_p(teacher_logits, top_k, top_p, ctx.fallback_temperature)
    else:
        target = teacher_log_probs.exp()
        kept_size = torch.full((num_tokens,), vocab_size, dtype=torch.long, device=device)
        fallback = torch.zeros(num_tokens, dtype=torch.bool, device=device)

    alpha = torch.ones(num_tokens, device=device)  # (n,)
    if strategy.blend == "soft":
        alpha = torch.full((num_tokens,), ctx.alpha, device=device)
    elif strategy.blend == "dynamic":
        alpha = torch.full((num_tokens,), dynamic_alpha(ctx), device=device)
    elif strategy.blend == "entropy_gated":
        alpha = gated_alpha(teacher_log_probs, ctx)
    if strategy.blend:
        target = alpha[:, None] * target + (1.0 - alpha[:, None]) * student_log_probs.detach().exp()

    terms = {
        "kl": token_kl(target, student_log_probs, ctx.kl_direction),
        "teacher_entropy": entropy(teacher_log_probs),
        "alpha": alpha,
        "kept_size": kept_size,
        "fallback": fallback,
    }
    if strategy.weighting in ("entropy", "calibrated_entropy"):
        terms["entropy_weight"] = entropy_weights(teacher_log_probs)
    return terms


def _rowwise_terms(logits: torch.Tensor, grad_key: str, compute: Callable) -> dict:
    """Compute per-token terms of logits (N, V), KD_CHUNK_ELEMENTS logits at a time.

    compute(rows, logits_rows) returns a dict of (n,) tensors for the rows `rows`; only terms[grad_key] may
    depend on logits_rows with a gradient. When logits need a gradient, each chunk's backward runs right
    after its forward and only the float32 gradient rows (N, V) are kept, so the temporaries of one chunk are
    alive at a time. The returned terms[grad_key] carries that gradient to logits; the others are detached.
    """
    num_tokens, vocab_size = logits.shape
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    rows_per_chunk = max(1, KD_CHUNK_ELEMENTS // max(vocab_size, 1))
    row_grads = torch.empty((num_tokens, vocab_size), dtype=torch.float32, device=logits.device) if needs_grad else None

    chunks = []
    for start in range(0, max(num_tokens, 1), rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        logits_rows = logits[rows].detach()
        if needs_grad:
            logits_rows = logits_rows.float().requires_grad_()
        with torch.set_grad_enabled(needs_grad):
            terms = compute(rows, logits_rows)
        if needs_grad:
            (row_grads[rows],) = torch.autograd.grad(terms[grad_key].sum(), logits_rows)
        chunks.append({key: value.detach() for key, value in terms.items()})
    terms = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    if needs_grad:
        terms[grad_key] = _PrecomputedRowGradients.apply(logits, terms[grad_key], row_grads)
    return terms


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    ctx: StepContext,
    strategy: Strategy = Strategy(),
) -> LossOutput:
    """Distillation loss of the student toward the (filtered, blended) teacher, weighted per token.

    The per-token terms are computed KD_CHUNK_ELEMENTS logits at a time. When the student logits need a
    gradient, each chunk's backward runs right after its forward and only the gradient rows (N, V) are kept.
    Besides the logits, the peak memory is then one float32 gradient-sized buffer and one chunk of temporaries.

    Args:
        student_logits: (..., V) student logits; gradients flow through them.
        teacher_logits: (..., V) teacher logits; detached here.
        mask: (...) 1 on tokens that count, 0 elsewhere.
        ctx: step and settings.
        strategy: which filter, blend and weighting to apply.

    Returns:
        LossOutput with loss = sum_t w_t * KL_t * mask_t / sum_t mask_t.
    """
    student_logits, teacher_logits, mask = _flatten(student_logits, teacher_logits.detach(), mask)
    terms = _rowwise_terms(
        student_logits, "kl", lambda rows, student_rows: _token_terms(student_rows, teacher_logits[rows], ctx, strategy)
    )
    kl = terms["kl"]  # (N,), carries the gradient to student_logits
    teacher_entropy, alpha = terms["teacher_entropy"], terms["alpha"]
    kept_size, fallback = terms["kept_size"], terms["fallback"]
    if strategy.weighting == "entropy":
        weights = terms["entropy_weight"]
    elif strategy.weighting == "calibrated_entropy":
        weights = calibrate_weights(terms["entropy_weight"], mask, ctx.entropy_gamma)
    else:
        weights = torch.ones_like(kl)

    loss = masked_mean(weights * kl, mask)
    stats = {
        "kl": masked_mean(kl, mask).item(),
        "teacher_entropy": masked_mean(teacher_entropy, mask).item(),
        "mean_weight": masked_mean(weights, mask).item(),
        "alpha": masked_mean(alpha, mask).item() if mask.sum() > 0 else alpha.mean().item(),
        "kept_size": masked_mean(kept_size.float(), mask).item(),
        "fallbacks": int((fallback & (mask > 0)).sum().item()),
        "tokens": int(mask.sum().item()),
    }
    per_token = {
        "kl": kl.detach(),
        "teacher_entropy": teacher_entropy.detach(),
        "weight": weights.detach(),
        "alpha": alpha.detach(),
        "kept_size": kept_size,
        "fallback": fallback,
    }
    return LossOutput(loss=loss, stats=stats, per_token=per_token)


def baseline(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
    """KL(p_T || q_S) per response token, averaged over tokens."""
    return kd_loss(student_logits, teacher_logits, mask, ctx, STRATEGY_PARTS["baseline"])


def entropy_weighted(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
    """Per-token KL times w_t = 1 - H(p_T,t) / log|V|, so confident teacher tokens count more."""
    return kd_loss(student_logits, teacher_logits, mask, ctx, STRATEGY_PARTS["entropy_weighted"])


def soft_blend(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
    """KL toward alpha * p_T + (1 - alpha) * p_S, with p_S detached and alpha = ctx.alpha."""
    return kd_loss(student_logits, teacher_logits, mask, ctx, STRATEGY_PARTS["soft_blend"])


def dynamic_blend(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
    """soft_blend with alpha = max(alpha_end, alpha_start - (alpha_start - alpha_end) * step / total)."""
    return kd_loss(student_logits, teacher_logits, mask, ctx, STRATEGY_PARTS["dynamic_blend"])


def ta_filter(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
    """KL toward the teacher restricted to its top-k then top-p tokens and renormalised."""
    return kd_loss(student_logits, teacher_logits, mask, ctx, STRATEGY_PARTS["ta_filter"])


def calibrated_entropy(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
    """Entropy weights w_t^gamma rescaled to mean 1 over the batch's response tokens."""
    return kd_loss(student_logits, teacher_logits, mask, ctx, STRATEGY_PARTS["calibrated_entropy"])


def entropy_gated_blend(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
    """Blend with a per-token alpha_t that trusts the teacher more where it is confident."""
    return kd_loss(student_logits, teacher_logits, mask, ctx, STRATEGY_PARTS["entropy_gated_blend"])


def scheduled_filter(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
    """ta_filter whose top-k and top-p move linearly from their start to their end values."""
    return kd_loss(student_logits, teacher_logits, mask, ctx, STRATEGY_PARTS["scheduled_filter"])


STRATEGY_PARTS: dict[str, Strategy] = {
    "baseline": Strategy(),
    "entropy_weighted": Strategy(weighting="entropy"),
    "soft_blend": Strategy(blend="soft"),
    "dynamic_blend": Strategy(blend="dynamic"),
    "ta_filter": Strategy(filter="top_k_top_p"),
    "calibrated_entropy": Strategy(weighting="calibrated_entropy"),
    "entropy_gated_blend": Strategy(blend="entropy_gated"),
    "scheduled_filter": Strategy(filter="scheduled"),
}

StrategyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, StepContext], LossOutput]

STRATEGIES: dict[str, StrategyFn] = {
    "baseline": baseline,
    "entropy_weighted": entropy_weighted,
    "soft_blend": soft_blend,
    "dynamic_blend": dynamic_blend,
    "ta_filter": ta_filter,
    "calibrated_entropy": calibrated_entropy,
    "entropy_gated_blend": entropy_gated_blend,
    "scheduled_filter": scheduled_filter,
}


def parse_strategy(spec: str) -> Strategy:
    """Merge the parts of a '+'-joined strategy spec, matching each name exactly."""
    names = [name.strip() for name in spec.split("+")]
    if not spec or any(not name for name in names):
        raise ConfigError(f"strategy={spec!r} is invalid: name one of {', '.join(STRATEGIES)} or join several with '+'.")
    merged = Strategy()
    for name in names:
        if name not in STRATEGY_PARTS:
            where = f" in {spec!r}" if name != spec.strip() else ""
            raise ConfigError(f"Unknown strategy {name!r}{where}: choose from {', '.join(STRATEGIES)}.")
        merged = merged.merge(STRATEGY_PARTS[name], spec)
    return merged


def get_strategy(spec: str) -> StrategyFn:
    """Return the loss function for a strategy name or a '+'-joined composition."""
    if spec in STRATEGIES:
        return STRATEGIES[spec]
    merged = parse_strategy(spec)

    def composed(student_logits, teacher_logits, mask, ctx: StepContext) -> LossOutput:
        return kd_loss(student_logits, teacher_logits, mask, ctx, merged)

    composed.__name__ = spec
    return composed


# ---------------------------------------------------------------------------------------------------
# Soft prompt losses.


def regularizer_weight(step: int, total_steps: int) -> float:
    """Weight of the pull toward the unprompted teacher: 1 at step 0, falling linearly to 0 at the end."""
    return max(0.0, 1.0 - step / max(total_steps, 1))


def prompt_loss(
    prompted_teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    reg_weight: float,
) -> LossOutput:
    """Soft prompt objective KL(p_T^P || p_S) + reg_weight * KL(p_T^P || p_T^0), averaged over tokens.

    Like kd_loss, it works KD_CHUNK_ELEMENTS logits at a time and keeps only the gradient rows of the
    prompted teacher's logits.

    Args:
        prompted_teacher_logits: (..., V) teacher logits with the soft prompt; gradients flow to the prompt.
        student_logits: (..., V) student logits, detached here.
        teacher_logits: (..., V) unprompted teacher logits, detached here.
        mask: (...) 1 on response tokens.
        reg_weight: weight of the regulariser toward the unprompted teacher.
    """
    prompted, student, mask = _flatten(prompted_teacher_logits, student_logits.detach(), mask)
    teacher = teacher_logits.detach().reshape(prompted.shape)

    def token_terms(rows: slice, prompted_rows: torch.Tensor) -> dict:
        prompted_log_probs = safe_log_softmax(prompted_rows)  # (n, V) float32
        prompted_probs = prompted_log_probs.exp()

        def kl_from_prompted(other_logits: torch.Tensor) -> torch.Tensor:
            other_log_probs = safe_log_softmax(other_logits)
            zero = torch.zeros_like(prompted_probs)
            return torch.where(prompted_probs > 0, prompted_probs * (prompted_log_probs - other_log_probs), zero).sum(dim=-1)

        kl_student, kl_teacher = kl_from_prompted(student[rows]), kl_from_prompted(teacher[rows])  # (n,)
        return {"objective": kl_student + reg_weight * kl_teacher, "kl_student": kl_student, "kl_teacher": kl_teacher}

    terms = _rowwise_terms(prompted, "objective", token_terms)
    loss = masked_mean(terms["objective"], mask)
    kl_student, kl_teacher = masked_mean(terms["kl_student"], mask), masked_mean(terms["kl_teacher"], mask)
    stats = {"prompt_kl_student": kl_student.item(), "prompt_kl_teacher": kl_teacher.item(), "reg_weight": reg_weight}
    return LossOutput(loss=loss, stats=stats, per_token={})
