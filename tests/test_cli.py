"""The command line, run in-process through promptkd.cli.main and once as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from promptkd.cli import cli_command, main
from promptkd.config import DistillConfig
from promptkd.runs import read_json

REPO = Path(__file__).resolve().parents[1]
TINY = ["--teacher", "tiny-llama", "--student", "tiny-llama:layers=0"]


def test_module_help_runs_as_subprocess():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "promptkd", "distill", "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--strategy", "--alpha", "--top-k", "--top-p", "--kl-direction", "--soft-prompt-length", "--resume", "--config"):
        assert flag in result.stdout


@pytest.mark.parametrize("command", ["prepare", "sft", "distill", "evaluate", "inspect", "runs", "pipeline"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_inspect_help_lists_strategy_flags_only(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    output = capsys.readouterr().out
    for flag in ("--teacher", "--strategy", "--top-k", "--gated-alpha-min", "--scheduled-top-p-end", "--index", "--soft-prompt"):
        assert flag in output
    for flag in ("--learning-rate", "--max-steps", "--save-every", "--per-device-batch-size"):
        assert flag not in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["distill", "--alpha", "1.5"], "alpha=1.5 is invalid"),
        (["distill", "--top-p", "0"], "top_p=0.0 is invalid"),
        (["distill", "--strategy", "blend"], "Unknown strategy 'blend'"),
        (["sft", "--max-length", "0"], "max_length=0 is invalid"),
        (["evaluate", "--split", "train"], "split='train' is invalid"),
        (["distill", "--config", "no_such_file.yaml"], "no_such_file.yaml not found"),
    ],
)
def test_bad_values_exit_2_with_message(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_prepare_lists_presets(capsys):
    assert main(["prepare", "--list"]) == 0
    out = capsys.readouterr().out
    for preset in ("smollm2-135m-instruct", "tiny-llama", "gpt2-medium", "gpt2-large"):
        assert preset in out


def test_cli_command_reproduces_config():
    config = DistillConfig(strategy="ta_filter+soft_blend", top_k=100, prompt_tuning=False, run_name="r1")
    command = cli_command("distill", config)
    assert command.startswith("python -m promptkd distill")
    assert "--strategy ta_filter+soft_blend" in command
    assert "--top-k 100" in command
    assert "--no-prompt-tuning" in command
    assert "--alpha" not in command  # defaults are left out


def test_distill_evaluate_inspect_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    args = ["distill", *TINY, "--output-dir", str(root), "--run-name", "cli", "--train-limit", "4", "--per-device-batch-size", "2",
            "--max-steps", "2", "--max-new-tokens", "4", "--max-length", "96", "--probe-every", "0", "--mixed-precision", "no"]
    assert main(args) == 0
    assert read_json(root / "cli" / "status.json")["state"] == "completed"

    args = ["evaluate", "--models", "teacher=tiny-llama", str(root / "cli"), "--output-dir", str(root), "--run-name", "eval",
            "--eval-limit", "3", "--max-new-tokens", "4", "--bertscore-model", "offline"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| method | EM | ROUGE-L | BERTScore |" in out
    assert "| teacher |" in out
    assert "| cli (baseline) |" in out
    results = read_json(root / "eval" / "results.json")
    assert [row["label"] for row in results["models"]] == ["teacher", "cli (baseline)"]
    assert results["bertscore_model"].startswith("all-MiniLM-L6-v2")
    assert "evaluations" in read_json(root / "cli" / "results.json")  # the evaluated run records its scores

    args = ["inspect", *TINY, "--index", "14500", "--top-k", "3", "--top-p", "0.9", "--with-student", "--soft-prompt", str(root / "cli"), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["index"] == 14500
    assert len(report["tokens"]) == len(report["entropy"]) == len(report["student_prob"])
    assert all(1 <= size <= 3 for size, fallback in zip(report["kept_size"], report["fallback"]) if not fallback)
    assert all(0.0 <= h <= 1.0 for h in report["normalized_entropy"])

    assert main(["runs", "--root", str(root)]) == 0
    listing = capsys.readouterr().out
    assert "cli" in listing and "completed" in listing


def test_runs_missing_root_fails(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["runs", "--root", str(missing)]) == 2
    error = capsys.readouterr().err
    assert f"Runs folder {missing} not found" in error
    assert "--root" in error


def test_evaluate_unknown_bertscore_model_fails_first(tmp_path, capsys):
    root = tmp_path / "runs"
    args = ["evaluate", "--models", "tiny-llama", "--output-dir", str(root), "--eval-limit", "2", "--bertscore-model", "nosuch-model"]

    assert main(args) == 2
    assert "BERTScore model 'nosuch-model' is not a local folder" in capsys.readouterr().err
    assert not root.exists()  # rejected before a run folder was created


def test_inspect_text_table_has_legend(capsys):
    assert main(["inspect", *TINY, "--index", "14500", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("#"))
    for column in ("H", "H/logV", "w", "kept", "fb", "p_T", "p_S"):
        assert column in header.split()
    assert "H: teacher entropy (nats)." in out
    assert "fb: y where that set was empty" in out


def test_inspect_unknown_index_is_reported(capsys):
    assert main(["inspect", *TINY, "--index", "3"]) == 2
    error = capsys.readouterr().err
    assert "--index 3 is not in the test split" in error
    assert "indices 14500-14999" in error


def test_pipeline_on_tiny_models(tmp_path, capsys):
    root = tmp_path / "runs"
    args = ["pipeline", *TINY, "--output-dir", str(root), "--train-limit", "4", "--eval-limit", "3", "--sft-steps", "2",
            "--sft-batch-size", "2", "--distill-steps", "1", "--distill-batch-size", "2", "--strategies", "baseline", "ta_filter",
            "--max-length", "96", "--bertscore-model", "none", "--mixed-precision", "no"]
    assert main(args) == 0
    table = capsys.readouterr().out
    for label in ("| teacher |", "| SFT student |", "| PromptKD baseline |", "| PromptKD ta_filter |"):
        assert label in table
    assert "total:" in table
    # A second invocation reuses every completed stage.
    assert main(args) == 0
    assert sorted(p.name for p in root.iterdir()) == ["demo-baseline", "demo-eval", "demo-sft", "demo-ta_filter"]


def test_pipeline_halts_on_stopped_stage(tmp_path):
    from promptkd.distill import distill
    from promptkd.pipeline import _require_completed
    from promptkd.runs import RunError

    config = DistillConfig(output_dir=str(tmp_path), run_name="halted", teacher="tiny-llama", student="tiny-llama:layers=0",
                           train_limit=4, per_device_batch_size=2, max_steps=3, stop_after_steps=1, max_new_tokens=3,
                           max_length=96, probe_every=0, mixed_precision="no")
    run = distill(config)
    with pytest.raises(RunError, match="ended as 'stopped' at step 1. Run the same pipeline command again"):
        _require_completed(run)


def test_resume_reuses_stored_settings(tmp_path, capsys):
    root = str(tmp_path / "runs")
    args = ["distill", *TINY, "--output-dir", root, "--run-name", "paused", "--strategy", "ta_filter", "--top-k", "7",
            "--train-limit", "4", "--per-device-batch-size", "2", "--max-steps", "3", "--stop-after-steps", "1",
            "--max-new-tokens", "3", "--max-length", "96", "--probe-every", "0", "--mixed-precision", "no"]
    assert main(args) == 0  # a pause at stop_after_steps is not an error
    assert read_json(tmp_path / "runs" / "paused" / "status.json")["state"] == "stopped"

    # Only --resume and the run's name: everything else comes from the stored config.yaml.
    assert main(["distill", "--output-dir", root, "--run-name", "paused", "--resume"]) == 0
    status = read_json(tmp_path / "runs" / "paused" / "status.json")
    assert status["state"] == "completed"
    assert status["step"] == 3
    import yaml

    stored = yaml.safe_load((tmp_path / "runs" / "paused" / "config.yaml").read_text())
    assert stored["strategy"] == "ta_filter"
    assert stored["top_k"] == 7
    assert stored["teacher"] == "tiny-llama"


def test_failed_setup_leaves_name_reusable(tmp_path, capsys):
    root = str(tmp_path / "runs")
    bad = ["distill", "--output-dir", root, "--run-name", "retry", "--teacher", "tiny-llama", "--student", str(tmp_path / "missing")]
    assert main(bad) == 2
    assert "missing" in capsys.readouterr().err
    assert read_json(tmp_path / "runs" / "retry" / "status.json")["state"] == "failed"
    good = ["distill", *TINY, "--output-dir", root, "--run-name", "retry", "--train-limit", "2", "--per-device-batch-size", "2",
            "--max-steps", "1", "--max-new-tokens", "2", "--max-length", "96", "--probe-every", "0", "--mixed-precision", "no"]
    assert main(good) == 0
    assert read_json(tmp_path / "runs" / "retry" / "status.json")["state"] == "completed"


def test_evaluate_checks_every_model_first(tmp_path, capsys):
    args = ["evaluate", "--models", "teacher=tiny-llama", str(tmp_path / "no_run"), "--output-dir", str(tmp_path / "runs"),
            "--eval-limit", "2", "--bertscore-model", "none"]
    assert main(args) == 2
    assert "no_run" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was evaluated or written
