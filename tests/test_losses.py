"""Every loss against values computed by hand with the math module."""

import math

import pytest
import torch

from promptkd import losses
from promptkd.config import ConfigError
from promptkd.losses import (
    STRATEGIES,
    StepContext,
    baseline,
    dynamic_alpha,
    dynamic_blend,
    entropy_weighted,
    filter_top_k_top_p,
    get_strategy,
    parse_strategy,
    prompt_loss,
    regularizer_weight,
    soft_blend,
    ta_filter,
)

INF = float("inf")


def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def entropy(p):
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


TEACHER = [[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0], [9.0, 9.0, 9.0, 9.0]]
STUDENT = [[0.0, 1.0, 0.5, 0.0], [1.0, -1.0, 2.0, 0.0], [5.0, -5.0, 0.0, 0.0]]
MASK = [1, 1, 0]  # the third token must not count


def tensors():
    return torch.tensor([TEACHER]), torch.tensor([STUDENT]), torch.tensor([MASK])  # (1, 3, 4)


def test_baseline_matches_hand_kl():
    teacher, student, mask = tensors()
    expected = (kl(softmax(TEACHER[0]), softmax(STUDENT[0])) + kl(softmax(TEACHER[1]), softmax(STUDENT[1]))) / 2
    output = baseline(student, teacher, mask, StepContext())
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)
    assert output.stats["tokens"] == 2


def test_entropy_weighted_matches_hand():
    teacher, student, mask = tensors()
    total = 0.0
    for t, s in zip(TEACHER[:2], STUDENT[:2]):
        weight = 1 - entropy(softmax(t)) / math.log(4)
        total += weight * kl(softmax(t), softmax(s))
    output = entropy_weighted(student, teacher, mask, StepContext())
    assert output.loss.item() == pytest.approx(total / 2, rel=1e-5)


def test_entropy_weight_of_uniform_teacher_is_zero():
    teacher = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    student = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    output = entropy_weighted(student, teacher, torch.tensor([1]), StepContext())
    assert output.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert output.stats["mean_weight"] == pytest.approx(0.0, abs=1e-6)


def test_soft_blend_matches_hand():
    teacher, student, mask = tensors()
    alpha = 0.7
    total = 0.0
    for t, s in zip(TEACHER[:2], STUDENT[:2]):
        p, q = softmax(t), softmax(s)
        target = [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)]
        total += kl(target, q)
    output = soft_blend(student, teacher, mask, StepContext(alpha=alpha))
    assert output.loss.item() == pytest.approx(total / 2, rel=1e-5)
    assert output.stats["alpha"] == pytest.approx(0.7)


def test_soft_blend_gradient_treats_student_target_as_constant():
    teacher = torch.tensor([[1.0, 0.0, -1.0]])
    student = torch.tensor([[0.0, 0.5, 0.0]], requires_grad=True)
    soft_blend(student, teacher, torch.tensor([1]), StepContext(alpha=0.7)).loss.backward()
    # d/ds KL(m || softmax(s)) with m fixed is softmax(s) - m.
    p, q = softmax([1.0, 0.0, -1.0]), softmax([0.0, 0.5, 0.0])
    target = [0.7 * pi + 0.3 * qi for pi, qi in zip(p, q)]
    expected = [qi - mi for qi, mi in zip(q, target)]
    assert student.grad[0].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "step, total, expected",
    [(0, 100, 0.9), (50, 100, 0.7), (100, 100, 0.5), (150, 100, 0.5), (25, 100, 0.8)],
)
def test_dynamic_alpha_schedule(step, total, expected):
    assert dynamic_alpha(StepContext(step=step, total_steps=total)) == pytest.approx(expected)


def test_dynamic_blend_uses_scheduled_alpha():
    teacher, student, mask = tensors()
    ctx = StepContext(step=25, total_steps=100)
    expected = soft_blend(student, teacher, mask, StepContext(alpha=0.8)).loss.item()
    output = dynamic_blend(student, teacher, mask, ctx)
    assert output.loss.item() == pytest.approx(expected, rel=1e-6)
    assert output.stats["alpha"] == pytest.approx(0.8)


def test_filter_top_k_then_top_p():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    probs, kept, fallback = filter_top_k_top_p(logits, top_k=2, top_p=0.9, fallback_temperature=2.0)
    assert probs[0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=1e-6)
    assert kept.tolist() == [2]
    assert fallback.tolist() == [False]

    probs, kept, _ = filter_top_k_top_p(logits, top_k=0, top_p=0.7, fallback_temperature=2.0)
    assert probs[0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=1e-6)  # 0.5 < 0.7, 0.8 >= 0.7
    assert kept.tolist() == [2]

    probs, kept, _ = filter_top_k_top_p(logits, top_k=3, top_p=0.5, fallback_temperature=2.0)
    assert probs[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert kept.tolist() == [1]


def test_filter_falls_back_on_dead_rows_without_nan():
    logits = torch.tensor([[-INF, -INF, -INF, -INF], [0.0, float("nan"), -INF, 1.0], [2.0, 0.0, 0.0, 0.0]])
    probs, kept, fallback = filter_top_k_top_p(logits, top_k=2, top_p=0.9, fallback_temperature=2.0)
    assert fallback.tolist() == [True, False, False]
    assert probs[0].tolist() == pytest.approx([0.25] * 4)
    assert kept.tolist()[0] == 4  # a fallback row counts the whole vocabulary as kept
    assert torch.isfinite(probs).all()
    assert probs[1, 1].item() == 0.0  # NaN logits are never kept
    assert probs.sum(dim=-1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_ta_filter_matches_hand():
    teacher, student, mask = tensors()
    ctx = StepContext(top_k=2, top_p=0.9)
    total = 0.0
    for t, s in zip(TEACHER[:2], STUDENT[:2]):
        p = softmax(t)
        order = sorted(range(4), key=lambda i: -p[i])[:2]
        top = [p[i] for i in order]
        renorm = [x / sum(top) for x in top]
        keep = [order[0]] + ([order[1]] if renorm[0] < 0.9 else [])
        target = [0.0] * 4
        for i in keep:
            target[i] = p[i] / sum(p[j] for j in keep)
        total += kl(target, softmax(s))
    output = ta_filter(student, teacher, mask, ctx)
    assert output.loss.item() == pytest.approx(total / 2, rel=1e-5)


def test_ta_filter_counts_fallbacks_on_masked_tokens_only():
    teacher = torch.tensor([[[-INF] * 4, [-INF] * 4, [1.0, 0.0, 0.0, 0.0]]])
    student = torch.zeros(1, 3, 4, requires_grad=True)
    output = ta_filter(student, teacher, torch.tensor([[1, 0, 1]]), StepContext(top_k=2, top_p=0.9))
    assert output.stats["fallbacks"] == 1
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert torch.isfinite(student.grad).all()


def test_composed_filter_blend_weight_matches_hand():
    teacher, student, mask = tensors()
    ctx = StepContext(alpha=0.6, top_k=1, top_p=0.9)
    total = 0.0
    for t, s in zip(TEACHER[:2], STUDENT[:2]):
        p, q = softmax(t), softmax(s)
        best = max(range(4), key=lambda i: p[i])
        filtered = [1.0 if i == best else 0.0 for i in range(4)]
        target = [0.6 * f + 0.4 * qi for f, qi in zip(filtered, q)]
        weight = 1 - entropy(p) / math.log(4)
        total += weight * kl(target, q)
    loss = get_strategy("ta_filter+soft_blend+entropy_weighted")(student, teacher, mask, ctx).loss
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)


def test_reverse_kl_matches_hand():
    teacher, student, mask = tensors()
    total = sum(kl(softmax(s), softmax(t)) for t, s in zip(TEACHER[:2], STUDENT[:2]))
    output = baseline(student, teacher, mask, StepContext(kl_direction="reverse"))
    assert output.loss.item() == pytest.approx(total / 2, rel=1e-5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_all_masked_batch_gives_zero(name):
    teacher, _, _ = tensors()
    student = torch.randn(1, 3, 4, requires_grad=True)
    output = STRATEGIES[name](student, teacher, torch.zeros(1, 3), StepContext(top_k=2))
    assert output.loss.item() == 0.0
    output.loss.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_bf16_logits_are_computed_in_fp32(name):
    teacher, student, mask = tensors()
    full = STRATEGIES[name](student, teacher, mask, StepContext(top_k=2)).loss
    half = STRATEGIES[name](student.bfloat16(), teacher.bfloat16(), mask, StepContext(top_k=2)).loss
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05, abs=1e-3)


def test_prompt_loss_matches_hand():
    prompted = [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]
    student = [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    unprompted = [[0.5, 0.0, 0.0], [0.0, 1.0, 1.0]]
    reg = 0.25
    kl_student = sum(kl(softmax(p), softmax(s)) for p, s in zip(prompted, student)) / 2
    kl_teacher = sum(kl(softmax(p), softmax(t)) for p, t in zip(prompted, unprompted)) / 2
    output = prompt_loss(torch.tensor(prompted), torch.tensor(student), torch.tensor(unprompted), torch.ones(2), reg)
    assert output.loss.item() == pytest.approx(kl_student + reg * kl_teacher, rel=1e-5)
    assert output.stats["prompt_kl_student"] == pytest.approx(kl_student, rel=1e-5)
    assert output.stats["prompt_kl_teacher"] == pytest.approx(kl_teacher, rel=1e-5)


def test_prompt_loss_gradient_reaches_prompted_logits_only():
    prompted = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    student = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.5, 0.0, 0.0]], requires_grad=True)
    prompt_loss(prompted, student, teacher, torch.ones(1), 1.0).loss.backward()
    assert prompted.grad is not None and prompted.grad.abs().sum() > 0
    assert student.grad is None
    assert teacher.grad is None



@pytest.mark.parametrize("chunk_elements", [2**20, 3])  # one chunk, then one row of 3 logits per chunk
def test_prompt_loss_gradient_matches_hand(monkeypatch, chunk_elements):
    # d KL(p || q) / d z_j = p_j * (log p_j - log q_j - KL(p || q)) for p = softmax(z); masked rows get 0.
    monkeypatch.setattr(losses, "KD_CHUNK_ELEMENTS", chunk_elements)
    prompted = [[1.0, 0.0, -1.0], [0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]
    student = [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    unprompted = [[0.5, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 2.0]]
    mask = [1, 1, 0]
    reg = 0.5
    expected = []
    for z, s, t, m in zip(prompted, student, unprompted, mask):
        p, q_s, q_t = softmax(z), softmax(s), softmax(t)
        kl_s, kl_t = kl(p, q_s), kl(p, q_t)
        expected.append([
            m / sum(mask) * p[j] * ((math.log(p[j] / q_s[j]) - kl_s) + reg * (math.log(p[j] / q_t[j]) - kl_t))
            for j in range(3)
        ])
    logits = torch.tensor(prompted, requires_grad=True)
    prompt_loss(logits, torch.tensor(student), torch.tensor(unprompted), torch.tensor(mask), reg).loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor(expected), rtol=1e-5, atol=1e-7)

@pytest.mark.parametrize("step, expected", [(0, 1.0), (25, 0.75), (100, 0.0), (120, 0.0)])
def test_regularizer_weight_decays_linearly(step, expected):
    assert regularizer_weight(step, 100) == pytest.approx(expected)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("blend", "Unknown strategy 'blend'"),
        ("baseline+Soft_Blend", "Unknown strategy 'Soft_Blend'"),
        ("soft_blend+dynamic_blend", "two blend rules"),
        ("", "is invalid"),
        ("ta_filter+", "is invalid"),
    ],
)
def test_parse_strategy_rejects(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_strategy(spec)


def test_get_strategy_returns_registry_functions():
    assert get_strategy("baseline") is baseline
    composed = get_strategy("entropy_weighted+ta_filter")
    assert composed.__name__ == "entropy_weighted+ta_filter"


def test_vocab_mismatch_raises():
    with pytest.raises(ValueError, match="share a vocabulary"):
        baseline(torch.zeros(2, 5), torch.zeros(2, 4), torch.ones(2), StepContext())


# -- adaptive strategies -----------------------------------------------------------------------------


def test_calibrated_entropy_weights_have_mean_one():
    teacher, student, mask = tensors()
    gamma = 2.0
    raw = [(1 - entropy(softmax(t)) / math.log(4)) ** gamma for t in TEACHER[:2]]
    mean = sum(raw) / 2
    kls = [kl(softmax(t), softmax(s)) for t, s in zip(TEACHER[:2], STUDENT[:2])]
    expected = sum(w / mean * k for w, k in zip(raw, kls)) / 2
    output = get_strategy("calibrated_entropy")(student, teacher, mask, StepContext(entropy_gamma=gamma))
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)
    assert output.stats["mean_weight"] == pytest.approx(1.0, rel=1e-6)


def test_calibrated_entropy_of_uniform_teacher_falls_back_to_ones():
    teacher = torch.ones(2, 4)
    student = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    output = get_strategy("calibrated_entropy")(student, teacher, torch.ones(2), StepContext())
    expected = sum(kl([0.25] * 4, softmax(s)) for s in student.tolist()) / 2
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)


def test_entropy_gated_blend_matches_hand():
    teacher, student, mask = tensors()
    ctx = StepContext(gated_alpha_min=0.4, gated_alpha_max=0.8)
    total, alphas = 0.0, []
    for t, s in zip(TEACHER[:2], STUDENT[:2]):
        p, q = softmax(t), softmax(s)
        alpha = 0.4 + 0.4 * (1 - entropy(p) / math.log(4))
        alphas.append(alpha)
        total += kl([alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)], q)
    output = get_strategy("entropy_gated_blend")(student, teacher, mask, ctx)
    assert output.loss.item() == pytest.approx(total / 2, rel=1e-5)
    assert output.stats["alpha"] == pytest.approx(sum(alphas) / 2, rel=1e-5)
    assert output.per_token["alpha"][:2].tolist() == pytest.approx(alphas, rel=1e-5)


@pytest.mark.parametrize(
    "step, expected_k, expected_p",
    [(0, 0, 1.0), (50, 2, 0.8), (100, 1, 0.6)],
)
def test_scheduled_filter_moves_top_k_and_top_p(step, expected_k, expected_p):
    from promptkd.losses import scheduled_top_k_top_p

    ctx = StepContext(step=step, total_steps=100, scheduled_top_k_start=0, scheduled_top_k_end=1,
                      scheduled_top_p_start=1.0, scheduled_top_p_end=0.6)
    # Over a 4-token vocabulary, a start of 0 (no cut) counts as 4: halfway is round(2.5) = 2.
    top_k, top_p = scheduled_top_k_top_p(ctx, vocab_size=4)
    assert top_k == expected_k
    assert top_p == pytest.approx(expected_p)


def test_scheduled_filter_equals_ta_filter_at_end_values():
    teacher, student, mask = tensors()
    ctx = StepContext(step=10, total_steps=10, scheduled_top_k_start=0, scheduled_top_k_end=2,
                      scheduled_top_p_start=1.0, scheduled_top_p_end=0.9)
    scheduled = get_strategy("scheduled_filter")(student, teacher, mask, ctx).loss
    fixed = ta_filter(student, teacher, mask, StepContext(top_k=2, top_p=0.9)).loss
    assert scheduled.item() == pytest.approx(fixed.item(), rel=1e-6)
    start = get_strategy("scheduled_filter")(student, teacher, mask, StepContext(step=0, total_steps=10)).loss
    assert start.item() == pytest.approx(baseline(student, teacher, mask, StepContext()).loss.item(), rel=1e-6)


def test_adaptive_strategies_compose_and_conflict():
    teacher, student, mask = tensors()
    output = get_strategy("scheduled_filter+entropy_gated_blend+calibrated_entropy")(student, teacher, mask, StepContext(step=5, total_steps=10))
    assert torch.isfinite(output.loss)
    with pytest.raises(ConfigError, match="two filter rules"):
        parse_strategy("ta_filter+scheduled_filter")
    with pytest.raises(ConfigError, match="two weighting rules"):
        parse_strategy("entropy_weighted+calibrated_entropy")
