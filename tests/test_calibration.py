"""Expected calibration error, per-token statistics and calibration_stats on a real tiny llama."""

import math

import numpy as np
import pytest
import torch

from promptkd import data as dolly
from promptkd.calibration import calibration_stats, expected_calibration_error, token_statistics
from promptkd.data import DollyRecord
from promptkd.sft import response_loss_sum, response_perplexity


def test_ece_on_hand_made_set():
    # Bins: 0.05 -> (0, 0.1], 0.15 -> (0.1, 0.2], both 0.95 -> (0.9, 1].
    # ECE = 1/4 * |0 - 0.05| + 1/4 * |0 - 0.15| + 2/4 * |0.5 - 0.95| = 0.0125 + 0.0375 + 0.225 = 0.275.
    assert expected_calibration_error([0.05, 0.15, 0.95, 0.95], [0, 0, 1, 0]) == pytest.approx(0.275)


def test_ece_of_calibrated_bin_is_zero():
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)


def test_ece_bin_edges_are_right_closed():
    # 0.3 falls in (0.2, 0.3] and 0.35 in (0.3, 0.4]: 1/2 * |1 - 0.3| + 1/2 * |0 - 0.35| = 0.525.
    # Were 0.3 in the upper bin with 0.35, the result would be |0.5 - 0.325| = 0.175.
    assert expected_calibration_error([0.3, 0.35], [1, 0]) == pytest.approx(0.525)


def test_ece_with_one_bin_is_accuracy_gap():
    assert expected_calibration_error([0.9, 0.6], [1, 1], num_bins=1) == pytest.approx(0.25)


def test_ece_extremes():
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == pytest.approx(1.0)
    assert expected_calibration_error([0.0], [0]) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "confidences, correct, num_bins, message",
    [
        ([0.5, 1.2], [1, 0], 10, "must lie in \\[0, 1\\]"),
        ([0.5], [1, 0], 10, "same length"),
        ([], [], 10, "no predictions"),
        ([0.5], [2], 10, "only 0/1"),
        ([0.5], [1], 0, "num_bins=0 is invalid"),
    ],
)
def test_ece_rejects_bad_input(confidences, correct, num_bins, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(confidences, correct, num_bins)


def test_token_statistics_by_hand():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    stats = token_statistics(probs.log(), torch.tensor([0, 3]))
    assert stats["confidence"].tolist() == pytest.approx([0.7, 0.25], abs=1e-6)
    assert stats["correct"].tolist() == [True, False]  # row 2 ties: argmax picks index 0, not 3
    first_entropy = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert stats["entropy"].tolist() == pytest.approx([first_entropy, math.log(4)], abs=1e-5)
    assert stats["nll"].tolist() == pytest.approx([-math.log(0.7), math.log(4)], abs=1e-5)


RECORDS = [
    DollyRecord(14500, "Say yes a few times.", "", "yes yes yes yes yes yes", "open_qa"),
    DollyRecord(14501, "Answer with one word: is the sky blue?", "It is daytime and clear.", "yes", "closed_qa"),
    DollyRecord(14502, "Repeat yes.", "", "yes yes yes", "open_qa"),
]


def _fit_to_yes(model, tokenizer, steps: int = 30):
    """Train the tiny model on RECORDS so that its argmax matches many reference tokens."""
    examples = [dolly.encode_example(record, tokenizer, "dolly", 128) for record in RECORDS]
    batch = dolly.collate_left(examples, tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss, tokens = response_loss_sum(model, batch)
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _unpadded_reference(model, tokenizer, records):
    """Per-token confidence, correctness, entropy and NLL from one full, unpadded forward pass per record."""
    confidences, correct, entropies, nlls = [], [], [], []
    for record in records:
        example = dolly.encode_example(record, tokenizer, "dolly", 128)
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()  # (T, V)
        probs = torch.softmax(logits, dim=-1)
        for t in range(example["prompt_length"], len(example["input_ids"])):
            row, target = probs[t - 1], example["input_ids"][t]
            confidences.append(float(row.max()))
            correct.append(int(row.argmax()) == target)
            entropies.append(float(-(row * row.clamp_min(1e-300).log()).sum()))
            nlls.append(float(-row[target].log()))
    return confidences, correct, entropies, nlls


def test_calibration_stats_match_unpadded_forward(tiny_llama):
    model, tokenizer = tiny_llama
    _fit_to_yes(model, tokenizer)
    # The fitted records are mostly right, and an unseen Dolly record is mostly wrong.
    records = RECORDS + dolly.load_split("dolly", "test", limit=1)
    stats = calibration_stats(model, tokenizer, records, "dolly", 128, batch_size=3)
    confidences, correct, entropies, nlls = _unpadded_reference(model, tokenizer, records)

    assert stats["num_tokens"] == len(confidences)
    assert len(confidences) > 7 + 2 + 4  # response tokens plus EOS of RECORDS, then the Dolly record's
    assert 0.0 < stats["accuracy"] < 1.0
    assert stats["accuracy"] == pytest.approx(np.mean(correct))
    assert stats["mean_confidence"] == pytest.approx(np.mean(confidences), abs=1e-5)
    assert stats["ece"] == pytest.approx(expected_calibration_error(confidences, correct), abs=1e-5)
    assert stats["mean_entropy"] == pytest.approx(np.mean(entropies), abs=1e-4)
    assert stats["mean_nll"] == pytest.approx(np.mean(nlls), abs=1e-4)


def test_calibration_stats_batch_size_does_not_matter(tiny_llama):
    model, tokenizer = tiny_llama
    records = dolly.load_split("dolly", "test", limit=5)
    batched = calibration_stats(model, tokenizer, records, "dolly", 128, batch_size=3)
    single = calibration_stats(model, tokenizer, records, "dolly", 128, batch_size=1)
    assert batched["num_tokens"] == single["num_tokens"]
    for key in ("ece", "mean_entropy", "mean_nll", "accuracy", "mean_confidence"):
        assert batched[key] == pytest.approx(single[key], abs=1e-5), key
    # The NLL is the log of the response perplexity that SFT reports.
    assert batched["mean_nll"] == pytest.approx(math.log(response_perplexity(model, tokenizer, records, "dolly", 128)), abs=1e-4)


def test_calibration_stats_rejects_empty_records(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="no records"):
        calibration_stats(model, tokenizer, [], "dolly", 128)
