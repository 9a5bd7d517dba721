"""Spaces mode: `python app.py` with SPACE_ID set, driven through its real server."""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError

from promptkd.webui.spaces import SPACES_MAX_STEPS, SPACES_MAX_TRAIN_LIMIT

REPO = Path(__file__).resolve().parent.parent
STARTUP_WAIT_S = 300
FORM = dict(teacher="tiny-llama", student="tiny-llama:layers=0", strategies=["baseline"], max_new_tokens=8, max_length=128)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_finished_run(runs: Path) -> None:
    """Write a completed distillation run folder with the status and config files the trainer leaves."""
    folder = runs / "finished"
    folder.mkdir(parents=True)
    (folder / "status.json").write_text('{"state": "completed", "command": "distill", "step": 3, "total_steps": 3, "started_at": "2026-01-01T00:00:00Z"}')
    (folder / "config.yaml").write_text(yaml.safe_dump({"strategy": "ta_filter", "teacher": "tiny-llama", "student": "tiny-llama:layers=0"}))


@pytest.fixture(scope="module")
def spaces_app(tmp_path_factory, promptkd_home):
    runs = tmp_path_factory.mktemp("webui_spaces") / "runs"
    write_finished_run(runs)
    port = free_port()
    env = dict(os.environ, SPACE_ID="promptkd/demo", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PROMPTKD_HOME=str(promptkd_home))
    log = open(runs.parent / "app.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--root", str(runs)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}: {(runs.parent / 'app.log').read_text()}")
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    yield url, runs
    process.terminate()
    process.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def client(spaces_app):
    client = Client(spaces_app[0], verbose=False, analytics_enabled=False)
    yield client
    client.close()


def test_spaces_hides_run_actions(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    for hidden in ("/train_stop", "/runs_stop", "/runs_resume", "/runs_evaluate"):
        assert hidden not in endpoints
    for present in ("/train_launch", "/compare", "/inspect", "/runs_refresh"):
        assert present in endpoints


def test_spaces_limits_training(client, spaces_app):
    runs = spaces_app[1]
    with pytest.raises(AppError) as error:
        client.predict(**dict(FORM, max_steps=SPACES_MAX_STEPS + 1, train_limit=8, run_name="long"), api_name="/train_launch")
    assert f"max_steps={SPACES_MAX_STEPS + 1} is not allowed on Spaces" in str(error.value)

    with pytest.raises(AppError) as error:
        client.predict(**dict(FORM, max_steps=5, train_limit=0, run_name="all-records"), api_name="/train_launch")
    assert "train_limit=None is not allowed on Spaces" in str(error.value)
    assert not (runs / "long").exists()
    assert not (runs / "all-records").exists()

    command = client.predict(**dict(FORM, max_steps=5, train_limit=SPACES_MAX_TRAIN_LIMIT), api_name="/train_preview")
    assert "--max-steps 5" in command


def test_spaces_lists_finished_runs(client):
    table = client.predict(api_name="/runs_refresh")[0]
    assert [row[0] for row in table["data"]] == ["finished"]
    assert table["data"][0][2] == "completed"


def test_spaces_inspect_available(client):
    report = client.predict(
        "test", 14500, "What is a fish?", "", "A fish lives in water.", "tiny-llama", "", "", "", "baseline",
        5, 0.9, 2.0, 0.7, 2, api_name="/inspect",
    )[5]
    assert report["student_prob"] is None
    assert all(0.0 <= value <= 1.0 for value in report["normalized_entropy"])
