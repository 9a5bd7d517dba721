"""A bounded end-to-end run on the real SmolLM2-135M-Instruct teacher and a few real Dolly records."""

import math

import pytest

from promptkd.config import DistillConfig, EvalConfig
from promptkd.distill import distill
from promptkd.evaluate import evaluate
from promptkd.models import SMOLLM2
from promptkd.runs import read_json, read_jsonl

pytestmark = pytest.mark.slow


def test_distill_and_evaluate_on_real_teacher(tmp_path):
    root = tmp_path / "runs"
    config = DistillConfig(
        output_dir=str(root),
        run_name="real",
        teacher=SMOLLM2,
        student=f"{SMOLLM2}:layers=0,1,28,29",
        strategy="ta_filter+soft_blend+entropy_weighted",
        train_limit=4,
        per_device_batch_size=2,
        max_steps=2,
        max_new_tokens=8,
        max_length=128,
        probe_every=2,
        probe_size=1,
        mixed_precision="no",
    )
    run = distill(config)
    assert read_json(run.path / "status.json")["state"] == "completed"
    rows = [row for row in read_jsonl(run.path / "metrics.jsonl") if "loss" in row]
    assert len(rows) == 2
    log_vocab = math.log(49152)
    for row in rows:
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert math.isfinite(row["prompt_loss"])
        assert 0 < row["teacher_entropy"] < log_vocab
        assert 1 <= row["kept_size"] <= 200
        assert row["alpha"] == pytest.approx(0.7)

    # The real teacher is confident on a real reference response: most tokens are far below log|V| nats.
    probe = read_jsonl(run.path / "probes.jsonl")[0]["examples"][0]
    mean_normalized_entropy = sum(probe["normalized_entropy"]) / len(probe["normalized_entropy"])
    assert mean_normalized_entropy < 0.5

    evaluation = evaluate(EvalConfig(
        output_dir=str(root), run_name="eval", models=[f"teacher={SMOLLM2}", str(run.path)], eval_limit=4,
        max_new_tokens=8, bertscore_model="offline", mixed_precision="no",
    ))
    results = read_json(evaluation.path / "results.json")
    assert results["indices"] == [14500, 14501, 14502, 14503]
    teacher_row = results["models"][0]
    assert 0.0 <= teacher_row["rouge_l"] <= 100.0
    assert 0.0 < teacher_row["bertscore"] <= 100.0
    predictions = [row for row in read_jsonl(evaluation.path / "predictions.jsonl") if row["model"] == "teacher"]
    assert len(predictions) == 4
    assert all(row["prediction"] for row in predictions)
