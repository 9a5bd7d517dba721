"""Two-process data-parallel runs on the CPU through a real `accelerate launch`.

Each run uses the tiny presets, 1 torch thread per process and the shipped configs/accelerate/multi_gpu.yaml,
which runs its processes on the CPU with the gloo backend when no GPU is visible. PROMPTKD_DEBUG_CHECKSUMS=1
makes every process write a checksum of its final student weights, so the tests can compare the ranks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from promptkd.distill import SOFT_PROMPT_FILE
from promptkd.models import load_model
from promptkd.runs import read_jsonl
from promptkd.training import DEBUG_CHECKSUMS_ENV, parameter_checksum

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG = REPO / "configs" / "accelerate" / "multi_gpu.yaml"
NUM_PROCESSES = 2
# Upper bounds that only turn a hang into a failure; a healthy launch here finishes in well under a minute.
LAUNCH_TIMEOUT_S = 300
STOP_TIMEOUT_S = 180

DISTILL_ARGS = [
    "--teacher", "tiny-llama", "--student", "tiny-llama:layers=0",
    "--train-limit", "16", "--per-device-batch-size", "2", "--max-new-tokens", "8", "--max-length", "96",
    "--probe-every", "0", "--mixed-precision", "no", "--learning-rate", "1e-3", "--prompt-learning-rate", "1e-3",
    "--seed", "7",
]
SFT_ARGS = [
    "--model", "tiny-llama:layers=0", "--train-limit", "16", "--per-device-batch-size", "2",
    "--gradient-accumulation-steps", "1", "--max-length", "96", "--mixed-precision", "no",
    "--learning-rate", "1e-3", "--seed", "7",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_argv(*promptkd_args: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIG),
        "--num_processes", str(NUM_PROCESSES),
        "--num_cpu_threads_per_process", "1",
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()),
        "-m", "promptkd", *promptkd_args,
    ]


def launch_env(home: Path | None = None) -> dict:
    """Environment of a launch; `home` replaces the session's PROMPTKD_HOME (for a cold preset cache)."""
    env = dict(os.environ)
    if home is not None:
        env["PROMPTKD_HOME"] = str(home)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        GRADIO_ANALYTICS_ENABLED="False",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # CPU processes even on a machine with GPUs
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )
    env[DEBUG_CHECKSUMS_ENV] = "1"
    return env


def run_launch(home: Path, *promptkd_args: str) -> str:
    """Run one `accelerate launch` to completion and return its combined output."""
    result = subprocess.run(
        launch_argv(*promptkd_args), cwd=REPO, env=launch_env(home), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=LAUNCH_TIMEOUT_S,
    )
    assert result.returncode == 0, f"accelerate launch exited with {result.returncode}:\n{result.stdout[-6000:]}"
    return result.stdout


def read_status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text(encoding="utf-8"))


def rank_checksums(run_dir: Path) -> list[str]:
    return [(run_dir / f"checksum_rank{rank}.txt").read_text(encoding="utf-8").strip() for rank in range(NUM_PROCESSES)]


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and folders of interrupted or duplicated writes (they all start with a dot)."""
    return sorted(path.name for path in run_dir.iterdir() if path.name.startswith("."))


def logged_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]


def saves_at(output: str, step: int) -> int:
    return output.count(f"Saved checkpoint at step {step} to")


def test_distill_stop_and_resume_two_processes(tmp_path):
    # A fresh PROMPTKD_HOME makes both processes find the tiny-llama preset missing at the same time.
    home = tmp_path / "home"
    runs = tmp_path / "runs"
    run_dir = runs / "mp-distill"
    common = [*DISTILL_ARGS, "--output-dir", str(runs), "--run-name", "mp-distill", "--max-steps", "4", "--save-every", "1"]

    output = run_launch(home, "distill", *common, "--stop-after-steps", "2")

    status = read_status(run_dir)
    assert status["state"] == "stopped", status
    assert status["step"] == 2
    assert status["total_steps"] == 4
    assert logged_steps(run_dir) == [1, 2]
    assert saves_at(output, 1) == 1, output[-4000:]
    assert saves_at(output, 2) == 1, output[-4000:]
    assert (run_dir / "checkpoint" / "model" / "config.json").is_file()
    assert (run_dir / "checkpoint" / "trainer_state.pt").is_file()
    assert leftovers(run_dir) == []
    assert (home / "models" / "tiny-llama" / "model.safetensors").is_file()
    stopped_checksums = rank_checksums(run_dir)
    assert stopped_checksums[0] == stopped_checksums[1], "ranks hold different student weights after the stop"

    output = run_launch(home, "distill", *common, "--resume")

    status = read_status(run_dir)
    assert status["state"] == "completed", status
    assert status["step"] == 4
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert saves_at(output, 3) == 1, output[-4000:]
    assert saves_at(output, 4) == 1, output[-4000:]
    assert not (run_dir / "checkpoint").exists()
    assert (run_dir / "model" / "config.json").is_file()
    assert leftovers(run_dir) == []

    checksums = rank_checksums(run_dir)
    assert checksums[0] == checksums[1], "ranks hold different student weights at the end"
    assert checksums[0] != stopped_checksums[0], "the resumed steps did not change the student"
    saved = parameter_checksum(load_model(str(run_dir)), {SOFT_PROMPT_FILE: load_file(str(run_dir / SOFT_PROMPT_FILE))})
    assert saved == checksums[0], "the saved model and soft prompt differ from the weights the processes trained"


def worker_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """Pid of the launched process with RANK=rank, or None while it has not started."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "promptkd" in child.cmdline():
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def wait_for_first_step(launcher: subprocess.Popen, runs: Path, log_path: Path) -> Path:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline:
        assert launcher.poll() is None, f"the launch ended early:\n{log_path.read_text()[-6000:]}"
        for metrics in runs.glob("*/metrics.jsonl"):
            if any("loss" in row for row in read_jsonl(metrics)):
                return metrics.parent
        time.sleep(0.2)
    pytest.fail(f"no training step was logged within {LAUNCH_TIMEOUT_S} s:\n{log_path.read_text()[-6000:]}")


def test_sft_stop_signal_on_one_rank(tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step and save one checkpoint."""
    runs = tmp_path / "runs"
    log_path = tmp_path / "launch.log"
    argv = launch_argv("sft", *SFT_ARGS, "--output-dir", str(runs), "--max-steps", "100000", "--save-every", "0")
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(
            argv, cwd=REPO, env=launch_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        run_dir = wait_for_first_step(launcher, runs, log_path)
        rank1 = worker_pid(launcher, 1)
        assert rank1 is not None, "no process with RANK=1 under the launcher"
        os.kill(rank1, signal.SIGTERM)
        try:
            returncode = launcher.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the ranks did not stop together after SIGTERM to rank 1:\n{log_path.read_text()[-6000:]}")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    output = log_path.read_text()

    assert returncode == 0, output[-6000:]
    assert [path.name for path in runs.iterdir()] == [run_dir.name], "the processes disagreed on the run name"
    assert run_dir.name.startswith("sft-")
    status = read_status(run_dir)
    assert status["state"] == "stopped", status
    step = status["step"]
    assert step >= 1
    assert logged_steps(run_dir) == list(range(1, step + 1))
    assert output.count("Received SIGTERM") == 1, output[-6000:]
    assert saves_at(output, step) == 1, output[-6000:]
    assert output.count("Saved checkpoint at step") == 1, output[-6000:]
    assert (run_dir / "checkpoint" / "trainer_state.pt").is_file()
    assert leftovers(run_dir) == []
    checksums = rank_checksums(run_dir)
    assert checksums[0] == checksums[1], "ranks hold different weights after the stop"
