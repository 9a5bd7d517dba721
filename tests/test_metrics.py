import pytest

from promptkd.metrics import (
    bertscore_f1,
    exact_match,
    hub_reachable,
    normalize_answer,
    offline_bertscore_folder,
    resolve_bertscore_model,
    rouge_l_f1,
    score_predictions,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat sat.", "cat sat"),
        ("  an apple,   a pear and THE plum!  ", "apple pear and plum"),
        ("Theater is a theme", "theater is theme"),
        ("", ""),
        ("U.S.A.", "usa"),
        ("tab\tand\nnewline", "tab and newline"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("Paris", "paris.", 1.0),
        ("The Eiffel Tower", "eiffel tower", 1.0),
        ("Paris, France", "Paris", 0.0),
        ("", "", 1.0),
        ("", "Paris", 0.0),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_rouge_l_hand_computed():
    predictions = ["The cat sat on the mat.", "running fast", "blue", ""]
    references = ["the cat sat on a mat", "runs fast", "The sky is blue today", "anything"]

    scores = rouge_l_f1(predictions, references)

    # LCS "the cat sat on mat" = 5 of 6 tokens on both sides: P = R = F1 = 5/6.
    assert scores[0] == pytest.approx(5 / 6)
    # The Porter stemmer maps running and runs to run: LCS = 2, P = R = 1.
    assert scores[1] == pytest.approx(1.0)
    # LCS = 1, P = 1/1, R = 1/5, F1 = 2 * 1 * 0.2 / 1.2.
    assert scores[2] == pytest.approx(1 / 3)
    assert scores[3] == 0.0


def test_rouge_l_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_l_f1(["a", "b"], ["a"])


def test_bertscore_offline_scores():
    predictions = ["The cat sat on the mat.", "Paris is the capital of France.", "I like green apples."]
    references = ["The cat sat on the mat.", "The capital of France is Paris.", "Stock markets fell sharply on Monday."]

    scores, name = bertscore_f1(predictions, references, model="offline")

    assert name == "all-MiniLM-L6-v2 (layer 6)"
    assert len(scores) == 3
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[1] > scores[2]
    assert scores[1] < scores[0]


def test_bertscore_batch_size_keeps_scores():
    # Sentences of very different lengths, so batches of 2 and one batch of 8 pad them differently.
    predictions = ["Yes.", "The cat sat on the mat by the door all afternoon.", "Paris.", "Stock markets fell on Monday."]
    references = ["No.", "A cat was sitting on a mat.", "The capital of France is Paris, on the Seine.", "Markets fell."]

    small, _ = bertscore_f1(predictions, references, model="offline", batch_size=2)
    default, _ = bertscore_f1(predictions, references, model="offline")
    large, _ = bertscore_f1(predictions, references, model="offline", batch_size=64)

    assert small == pytest.approx(large, abs=1e-5)
    assert default == pytest.approx(large, abs=1e-5)
    assert len(set(round(value, 3) for value in large)) == 4


def test_bertscore_empty_prediction_scores_zero():
    scores, _ = bertscore_f1(["", "A dog barks."], ["Some answer.", "A dog barks."], model="offline")

    assert scores[0] == 0.0
    assert scores[1] == pytest.approx(1.0, abs=1e-4)


def test_bertscore_auto_offline():
    assert not hub_reachable()

    scores, name = bertscore_f1(["hello there"], ["hello there"], model="auto")

    assert name.startswith("all-MiniLM-L6-v2")
    assert scores[0] == pytest.approx(1.0, abs=1e-4)


def test_bertscore_none():
    assert bertscore_f1(["a"], ["b"], model="none") == (None, None)


def test_bertscore_local_folder_needs_layers():
    folder = str(offline_bertscore_folder())

    with pytest.raises(ValueError, match="bertscore_num_layers"):
        resolve_bertscore_model(folder)

    assert resolve_bertscore_model(folder, num_layers=3) == (folder, 3, "model (layer 3)")


def test_bertscore_unknown_hub_id_needs_layers():
    with pytest.raises(ValueError, match="no default layer"):
        resolve_bertscore_model("promptkd-tests/unknown-encoder")

    assert resolve_bertscore_model("roberta-large") == ("roberta-large", 17, "roberta-large (layer 17)")


def test_score_predictions():
    predictions = ["Paris.", "blue", "the cat sat on the mat"]
    references = ["Paris", "The sky is blue today", "The cat sat on a mat."]

    result = score_predictions(predictions, references, bertscore_model="offline")

    assert result["count"] == 3
    assert result["exact_match"] == pytest.approx(200 / 3)
    assert result["rouge_l"] == pytest.approx(100 * (1 + 1 / 3 + 5 / 6) / 3)
    assert result["per_example"]["exact_match"] == [100.0, 0.0, 100.0]
    assert result["per_example"]["rouge_l"][1] == pytest.approx(100 / 3)
    assert result["bertscore_model"] == "all-MiniLM-L6-v2 (layer 6)"
    assert result["bertscore_f1"] == pytest.approx(sum(result["per_example"]["bertscore_f1"]) / 3)
    assert result["per_example"]["bertscore_f1"][0] > result["per_example"]["bertscore_f1"][1]
    assert all(0.0 <= value <= 100.0 + 1e-3 for value in result["per_example"]["bertscore_f1"])


def test_score_predictions_without_bertscore():
    result = score_predictions(["a b"], ["a b"], bertscore_model="none")

    assert result["bertscore_f1"] is None
    assert result["bertscore_model"] is None
    assert result["per_example"]["bertscore_f1"] is None
    assert result["rouge_l"] == pytest.approx(100.0)
