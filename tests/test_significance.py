"""Paired bootstrap and mean ± std, checked on cases whose results are known by hand."""

import numpy as np
import pytest

from promptkd.significance import format_p_value, interval_excludes_zero, mean_std, paired_bootstrap


def test_identical_scores_give_zero_and_p_one():
    scores = [0.0, 12.5, 100.0, 33.3, 50.0]
    result = paired_bootstrap(scores, list(scores), num_resamples=500, seed=3)
    assert result == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
    assert not interval_excludes_zero(result)


def test_constant_shift_gives_exact_interval():
    base = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    other = [value + 5.0 for value in base]
    result = paired_bootstrap(base, other, num_resamples=1000, seed=0)
    assert result["diff"] == pytest.approx(5.0)
    assert result["ci_low"] == pytest.approx(5.0)
    assert result["ci_high"] == pytest.approx(5.0)
    assert result["p_value"] < 1 / 1000
    assert interval_excludes_zero(result)


def test_constant_negative_shift():
    base = [3.0, 4.0, 5.0]
    result = paired_bootstrap(base, [value - 2.0 for value in base], num_resamples=200, seed=1)
    assert result["diff"] == pytest.approx(-2.0)
    assert result["ci_high"] == pytest.approx(-2.0)
    assert result["p_value"] == 0.0
    assert interval_excludes_zero(result)


def test_two_prompt_distribution_matches_hand_values():
    # Differences d = (0, 2). A resample of 2 prompts has mean 0 (prob 1/4), 1 (1/2) or 2 (1/4), so
    # P(d* <= 0) = 1/4, P(d* >= 0) = 1, p = 2 * 1/4 = 0.5 and the 2.5/97.5 percentiles are 0 and 2.
    result = paired_bootstrap([1.0, 1.0], [1.0, 3.0], num_resamples=20000, seed=7)
    assert result["diff"] == pytest.approx(1.0)
    assert result["ci_low"] == 0.0
    assert result["ci_high"] == 2.0
    assert result["p_value"] == pytest.approx(0.5, abs=0.03)
    assert not interval_excludes_zero(result)


def test_skewed_three_prompt_distribution():
    # Differences d = (0, 0, 3). A resample draws k threes, k ~ Binomial(3, 1/3), so its mean is 3k/3 = k:
    # P(k=0) = 8/27, P(k=1) = 12/27, P(k=2) = 6/27, P(k=3) = 1/27. So p = 2 * 8/27 = 16/27 (a test centred
    # on the observed mean would give 15/27), the 2.5th percentile is 0, and the 97.5th is 3 because
    # P(k <= 2) = 26/27 < 0.975.
    result = paired_bootstrap([5.0, 5.0, 5.0], [5.0, 5.0, 8.0], num_resamples=20000, seed=1)
    assert result["diff"] == pytest.approx(1.0)
    assert result["ci_low"] == 0.0
    assert result["ci_high"] == pytest.approx(3.0)
    assert result["p_value"] == pytest.approx(16 / 27, abs=0.02)


def test_sign_flip_is_symmetric():
    rng = np.random.default_rng(0)
    base = rng.normal(50.0, 10.0, size=40)
    other = base + rng.normal(1.0, 5.0, size=40)
    forward = paired_bootstrap(base, other, num_resamples=400, seed=11)
    backward = paired_bootstrap(other, base, num_resamples=400, seed=11)
    assert backward["diff"] == pytest.approx(-forward["diff"])
    assert backward["ci_low"] == pytest.approx(-forward["ci_high"])
    assert backward["ci_high"] == pytest.approx(-forward["ci_low"])
    assert backward["p_value"] == pytest.approx(forward["p_value"])


def test_same_seed_reproduces_and_other_seed_differs():
    rng = np.random.default_rng(5)
    base = rng.uniform(0, 100, size=30)
    other = base + rng.normal(0.5, 10.0, size=30)
    first = paired_bootstrap(base, other, num_resamples=600, seed=42)
    again = paired_bootstrap(base, other, num_resamples=600, seed=42)
    other_seed = paired_bootstrap(base, other, num_resamples=600, seed=43)
    assert first == again
    assert first["diff"] == other_seed["diff"]
    assert (first["ci_low"], first["ci_high"]) != (other_seed["ci_low"], other_seed["ci_high"])


def test_p_value_agrees_with_interval_on_clear_cases():
    rng = np.random.default_rng(4)
    base = rng.normal(0.0, 1.0, size=200)
    noise = rng.normal(0.0, 1.0, size=200)
    clear = paired_bootstrap(base, base + 1.0 + noise, num_resamples=1000, seed=0)
    null = paired_bootstrap(base, base + noise - noise.mean(), num_resamples=1000, seed=0)
    assert clear["p_value"] < 0.05
    assert interval_excludes_zero(clear)
    assert null["diff"] == pytest.approx(0.0, abs=1e-12)
    assert null["p_value"] > 0.5
    assert not interval_excludes_zero(null)


@pytest.mark.parametrize(
    "base, other, kwargs, message",
    [
        ([1.0, 2.0], [1.0], {}, "same length"),
        ([1.0], [2.0], {}, "at least 2 prompts"),
        ([1.0, float("nan")], [1.0, 2.0], {}, "NaN or infinite"),
        ([1.0, 2.0], [1.0, 2.0], {"num_resamples": 0}, "num_resamples=0 is invalid"),
        ([1.0, 2.0], [1.0, 2.0], {"confidence_level": 1.0}, "confidence_level=1.0 is invalid"),
    ],
)
def test_bootstrap_rejects_bad_input(base, other, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(base, other, **kwargs)


def test_mean_std_uses_sample_std():
    mean, std = mean_std([2.0, 4.0, 6.0])
    assert mean == pytest.approx(4.0)
    assert std == pytest.approx(2.0)  # sqrt(((-2)^2 + 0 + 2^2) / (3 - 1))


def test_mean_std_of_one_seed_is_zero():
    assert mean_std([7.5]) == (7.5, 0.0)


def test_mean_std_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="non-empty"):
        mean_std([])
    with pytest.raises(ValueError, match="NaN"):
        mean_std([1.0, float("nan")])


def test_bootstrap_rejects_too_many_resamples():
    with pytest.raises(ValueError, match="num_resamples=100001 is too many: use at most 100000"):
        paired_bootstrap([0.0, 1.0], [1.0, 1.0], num_resamples=100_001)


def test_format_p_value():
    assert format_p_value(0.0, 1000) == "p<0.002"
    assert format_p_value(0.0482, 1000) == "p=0.0482"
    assert format_p_value(1.0, 1000) == "p=1"
