"""Smoke tests of the benchmark script at its smallest sizes: structure of its outputs, no timing asserts."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import report
from benchmarks.common import peak_memory_bytes
from promptkd import losses

ROOT = Path(__file__).resolve().parent.parent
HAS_TRL = importlib.util.find_spec("trl") is not None
SMALL = ["--warmup", "0", "--repeats", "1", "--batch-size", "2", "--max-new-tokens", "4", "--max-length", "64", "--threads", "1"]


def run_bench(tmp_path: Path, *args: str) -> dict:
    """Run `python -m benchmarks.bench` into tmp_path and return its results JSON."""
    command = [
        sys.executable, "-m", "benchmarks.bench", *args, "--name", "smoke",
        "--results-dir", str(tmp_path), "--markdown", str(tmp_path / "benchmarks.md"), "--chart-dir", str(tmp_path),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((tmp_path / "smoke.json").read_text(encoding="utf-8"))


def test_ab_versions_tiny_writes_its_block(tmp_path):
    # HEAD as "before": the tool runs both versions of every section except the slow greedy decoding loop.
    command = [
        sys.executable, "-m", "benchmarks.ab_versions", "--ref", "HEAD", "--pair", "tiny", "--threads", "1",
        "--sections", "kd_loss,prompt_loss,gradient_checks,optimizer,sampling", "--loss-repeats", "1", "--sampling-repeats", "1",
        "--results-dir", str(tmp_path), "--markdown", str(tmp_path / "benchmarks.md"),
    ]
    completed = subprocess.run(command, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (results_file,) = tmp_path.glob("ab-*.json")
    results = json.loads(results_file.read_text(encoding="utf-8"))
    for name in ("kd_loss", "prompt_loss"):
        assert results[name]["before_peak_bytes"] > 0
        assert results[name]["after_peak_bytes"] > 0
    assert results["optimizer"]["fused_after"] is True
    assert results["sampling"]["tokens"]["before"] > 0
    assert results["sampling"]["tokens"]["after"] > 0
    assert "generation" not in results
    page = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")
    assert f"BEGIN GENERATED: {results_file.stem}" in page
    for row in ("prompt_loss forward + backward peak memory", "AdamW update", "student sampling"):
        assert row in page


def test_ab_versions_rejects_unknown_section():
    command = [sys.executable, "-m", "benchmarks.ab_versions", "--ref", "HEAD", "--sections", "kd_loss,speed"]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "speed" in completed.stderr
    assert "prompt_loss" in completed.stderr


def test_bench_tiny_writes_all_sections(tmp_path):
    results = run_bench(tmp_path, "--shapes", "tiny", *SMALL, "--eval-records", "4", "--eval-batch-size", "2", "--no-bertscore", "--memory-prompt-widths", "8,16")

    kd = results["kd"]
    variants = kd["summary"]["variants"]
    assert set(variants) == ({"trl_gkd"} if HAS_TRL else set()) | {"promptkd_baseline", "promptkd_full"}
    for values in variants.values():
        assert values["tokens_per_s"]["median"] > 0
        assert values["total_tokens_per_s"] > 0
        assert values["response_tokens"]["median"] > 0
    if HAS_TRL:
        assert kd["summary"]["promptkd_baseline_vs_trl"]["n"] == 1
        assert kd["summary"]["promptkd_baseline_vs_trl_total"] > 0
        assert kd["summary"]["passes_only_vs_trl_total"] > 0
        assert kd["trl"]["generation_kwargs"]["top_k"] == 0
        assert kd["trl"]["activation_checkpointing"] is False
    assert kd["summary"]["overhead_full"]["median"] > 0
    assert kd["summary"]["overhead_full_total"] > 0
    assert [row["stage"] for row in kd["stages"]][:5] == [
        "generation", "teacher_forward", "prompted_teacher_forward_backward", "prompted_teacher_forward", "student_forward_backward",
    ]
    assert all(value > 0 for value in kd["peak_memory_bytes"].values())

    evaluation = results["evaluation"]
    assert evaluation["num_records"] == 4
    assert evaluation["identical"] is True
    assert evaluation["batched_s"]["median"] > 0

    assert [memory["shape"]["length"] for memory in results["memory"]] == [12, 20]
    for memory in results["memory"]:
        variants = memory["variants"]
        assert variants["naive"]["peak_vs_naive"] == 1.0
        assert variants["promptkd"]["peak_bytes"] > variants["promptkd"]["logits_bytes"]
        assert ("trl_gkd" in variants) == HAS_TRL

    markdown = (tmp_path / "benchmarks.md").read_text(encoding="utf-8")
    assert "<!-- BEGIN GENERATED: smoke -->" in markdown
    assert "On-policy KD step throughput" in markdown
    assert (tmp_path / "benchmarks_smoke.png").stat().st_size > 0


def test_bench_gpt2_reference_path_on_cpu(tmp_path):
    results = run_bench(tmp_path, "--shapes", "gpt2-tiny", "--sections", "kd", "--no-trl", "--peak-tflops", "1", *SMALL)

    assert results["pair"]["teacher_layers"] == 2
    assert results["pair"]["vocab_size"] == 50257
    stages = results["kd"]["stages"]
    assert all(row["mfu"] is not None and row["model_flops"] > 0 for row in stages)
    assert "trl_gkd" not in results["kd"]["summary"]["variants"]
    assert "evaluation" not in results
    assert "memory" not in results


def test_update_markdown_replaces_only_its_block(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nHand-written notes.\n", encoding="utf-8")

    report.update_markdown(path, "run-a", "first\n")
    report.update_markdown(path, "run-b", "other\n")
    report.update_markdown(path, "run-a", "second\n")

    text = path.read_text(encoding="utf-8")
    assert "Hand-written notes." in text
    assert "first" not in text
    assert text.count("<!-- BEGIN GENERATED: run-a -->\nsecond\n<!-- END GENERATED: run-a -->") == 1
    assert "other" in text


def test_peak_memory_counts_live_tensors():
    size = 4 * 2**20

    def allocate():
        first = torch.ones(size // 4)  # float32: `size` bytes
        second = torch.ones(size // 4)
        return first, second

    peak = peak_memory_bytes(allocate, torch.device("cpu"))
    assert 2 * size <= peak < 3 * size


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize(
    "spec", ["baseline", "ta_filter+soft_blend+entropy_weighted", "scheduled_filter+entropy_gated_blend+calibrated_entropy"]
)
def test_kd_loss_chunks_match_one_chunk(monkeypatch, spec, direction):
    # The loss memory benchmark relies on kd_loss working in chunks; the results must not depend on the chunk size.
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 64, generator=generator) * 3
    teacher = torch.randn(3, 5, 64, generator=generator) * 3
    student[0, 1] = float("nan")
    teacher[1, 2] = float("-inf")
    mask = (torch.rand(3, 5, generator=generator) > 0.3).long()
    ctx = losses.StepContext(kl_direction=direction, step=3, total_steps=10, top_k=10)

    outputs, grads = [], []
    for chunk_elements in (2**20, 2 * 64):  # one chunk, then 2 rows per chunk
        monkeypatch.setattr(losses, "KD_CHUNK_ELEMENTS", chunk_elements)
        logits = student.clone().requires_grad_()
        output = losses.get_strategy(spec)(logits, teacher, mask, ctx)
        output.loss.backward()
        outputs.append(output)
        grads.append(logits.grad)

    single, chunked = outputs
    assert torch.equal(single.loss, chunked.loss)
    assert single.stats == chunked.stats
    for key in single.per_token:
        torch.testing.assert_close(single.per_token[key], chunked.per_token[key], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
