"""The app's Train and Runs tabs driven through a real Gradio server, with real run processes."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from promptkd.webui import build_app
from promptkd.webui.train import FORM_FIELDS

# Generous bounds for waits on run processes: they only stop a hung test, they are not timing checks.
WAIT_S = 900
POLL_S = 0.5
QUANTITY = "teacher entropy (nats)"

# A tiny-llama run small enough for CI. Its 30 steps take seconds even on an idle machine (a tiny-llama step
# took about 0.13 s on 2 CPU cores), so a stop sent after the first metrics arrives before the last step.
FORM = dict(
    teacher="tiny-llama",
    student="tiny-llama:layers=0",
    strategies=["ta_filter", "entropy_weighted"],
    alpha=0.7,
    top_k=20,
    top_p=0.9,
    kl_direction="forward",
    prompt_tuning=True,
    soft_prompt_length=4,
    mixed_precision="no",
    max_steps=30,
    per_device_batch_size=2,
    learning_rate=1e-4,
    train_limit=8,
    alpha_start=0.9,
    alpha_end=0.5,
    fallback_temperature=2.0,
    kl_scale=0.5,
    prompt_learning_rate=1e-4,
    max_new_tokens=8,
    max_length=128,
    gradient_accumulation_steps=1,
    probe_every=5,
    save_every=50,
    seed=1,
    run_name="",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect(url: str) -> Client:
    return Client(url, verbose=False, analytics_enabled=False)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Serve the app on 127.0.0.1 with its own runs folder and yield (url, runs folder)."""
    runs = tmp_path_factory.mktemp("webui_train") / "runs"
    demo = build_app(root=runs)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", runs
    demo.close()


def refresh(client: Client, name: str) -> dict:
    return client.predict(name, QUANTITY, 0, api_name="/train_refresh")[4]


def wait_for(client: Client, name: str, condition, description: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        summary = refresh(client, name)
        if condition(summary):
            return summary
        time.sleep(POLL_S)
    raise AssertionError(f"run {name} never reached {description}; last summary {summary}")


def test_bad_strategy_combo_rejected(app):
    url, runs = app
    client = connect(url)
    with pytest.raises(AppError) as error:
        client.predict(**dict(FORM, strategies=["soft_blend", "dynamic_blend"], run_name="combo"), api_name="/train_launch")
    assert "soft_blend+dynamic_blend" in str(error.value)
    assert "blend" in str(error.value)
    assert not (runs / "combo").exists()
    client.close()


def test_invalid_values_rejected_before_launch(app):
    url, runs = app
    client = connect(url)
    cases = [
        (dict(top_k=-1), "top_k=-1"),
        (dict(learning_rate=0), "learning_rate="),
        (dict(per_device_batch_size=0), "per_device_batch_size=0"),
        (dict(strategies=[]), "No strategy ticked"),
        (dict(run_name="a/b"), "run_name="),
    ]
    for change, expected in cases:
        with pytest.raises(AppError) as error:
            client.predict(**dict(FORM, **change), api_name="/train_launch")
        assert expected in str(error.value), change
    assert list(runs.iterdir()) == []
    client.close()


def test_paths_outside_roots_rejected(app, tmp_path):
    url, runs = app
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    client = connect(url)
    with pytest.raises(AppError) as error:
        client.predict(**dict(FORM, student=str(outside), run_name="outside"), api_name="/train_launch")
    assert "outside the app's folders" in str(error.value)
    assert str(outside) in str(error.value)

    with pytest.raises(AppError) as error:
        client.predict("/etc/passwd", api_name="/train_load_config")
    assert "outside the app's folders" in str(error.value)

    with pytest.raises(AppError) as error:
        client.predict(str(runs / ".." / ".." / "escape.yaml"), api_name="/train_load_config")
    assert "outside the app's folders" in str(error.value)
    assert not (runs / "outside").exists()
    client.close()


def test_config_save_load_roundtrip(app):
    url, runs = app
    client = connect(url)
    message, files = client.predict("short-ta", **dict(FORM, top_k=33, strategies=["ta_filter"]), api_name="/train_save_config")
    saved = Path(files["value"])
    assert saved == runs.parent / "configs" / "short-ta.yaml"
    assert saved.is_file()

    values = client.predict(str(saved), api_name="/train_load_config")
    loaded = dict(zip(FORM_FIELDS, values))
    assert loaded["top_k"] == 33
    assert loaded["strategies"] == ["ta_filter"]
    assert loaded["teacher"] == "tiny-llama"
    assert loaded["max_steps"] == 30
    assert "Loaded settings" in values[-1]

    command = client.predict(**FORM, api_name="/train_preview")
    assert command.startswith("python -m promptkd distill")
    assert "--strategy ta_filter+entropy_weighted" in command
    assert "--max-steps 30" in command
    client.close()


def test_run_lifecycle(app):
    """Launch, watch, refuse a second launch, reattach, stop, resume with the client closed, evaluate."""
    url, runs = app
    client = connect(url)
    message, selected, command = client.predict(**dict(FORM, run_name="life"), api_name="/train_launch")
    assert "Started run **life**" in message
    assert selected["value"] == "life"
    assert "--run-name life" in command
    run = runs / "life"
    assert (run / "launch.yaml").is_file()
    assert (run / "launch.json").is_file()

    # One job per device: a second launch names the running run.
    with pytest.raises(AppError) as error:
        client.predict(**dict(FORM, run_name="second"), api_name="/train_launch")
    assert "'life'" in str(error.value)
    assert "one job runs at a time" in str(error.value)
    assert not (runs / "second").exists()

    # A fresh page load (a new client) reattaches to the running run.
    reloaded = connect(url)
    attached = reloaded.predict(api_name="/attach")
    assert attached[0]["value"] == "life"
    reloaded.close()

    first = wait_for(client, "life", lambda s: s["metrics_rows"] >= 1, "a first metrics row")
    grown = wait_for(client, "life", lambda s: s["metrics_rows"] > first["metrics_rows"], "more metrics rows")
    assert grown["state"] == "running"
    assert grown["total_steps"] == 30
    assert "loss" in grown["last_metrics"]

    stop_message = client.predict("life", api_name="/train_stop")
    assert "Stop requested for run life" in stop_message
    stopped = wait_for(client, "life", lambda s: s["state"] not in ("running", "starting"), "a final state after stop")
    assert stopped["state"] == "stopped"
    assert 0 < stopped["step"] < 30
    assert "SIGINT" in stopped["error"]
    assert (run / "checkpoint").is_dir()

    status, curves, heatmap, log_tail, details = client.predict("life", QUANTITY, 0, api_name="/train_refresh")
    assert "stopped" in status
    assert curves["type"] == "plotly"
    assert heatmap["type"] == "plotly"
    assert '"type":"heatmap"' in heatmap["plot"].replace(" ", "")
    assert "promptkd distill --config" in log_tail
    assert details["probe_steps"][0] == 0

    # Stop of a stopped run is rejected with the state.
    with pytest.raises(AppError) as error:
        client.predict("life", api_name="/train_stop")
    assert "is stopped" in str(error.value)

    resumed = client.predict("life", api_name="/runs_resume")
    assert "Resumed run **life**" in resumed
    client.close()  # the browser goes away mid-run; the run must still finish

    watcher = connect(url)
    done = wait_for(watcher, "life", lambda s: s["state"] not in ("running", "starting"), "a final state after resume")
    assert done["state"] == "completed", done["error"]
    assert done["step"] == 30
    assert done["metrics_rows"] == 30
    assert 30 in done["probe_steps"]
    assert (run / "model" / "config.json").is_file()
    assert "--resume" in (run / "stdout.log").read_text(encoding="utf-8")

    # A completed run cannot be resumed.
    with pytest.raises(AppError) as error:
        watcher.predict("life", api_name="/runs_resume")
    assert "only stopped or failed runs" in str(error.value)

    started = watcher.predict("life", 2, "test", "none", api_name="/runs_evaluate")
    assert "Started evaluation run" in started
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        summaries = watcher.predict(api_name="/runs_refresh")[3]
        evaluation = [s for s in summaries if s["command"] == "evaluate"]
        if evaluation and evaluation[0]["state"] not in ("running", "starting"):
            break
        time.sleep(POLL_S)
    assert evaluation[0]["state"] == "completed", evaluation[0]["error"]

    table, leaderboard, *_ = watcher.predict(api_name="/runs_refresh")
    life_row = [row for row in table["data"] if row[0] == "life"][0]
    assert life_row[2] == "completed"
    assert life_row[3] == "ta_filter+entropy_weighted"
    assert life_row[12] == "test:2"
    assert 0.0 <= life_row[14] <= 100.0
    assert leaderboard["data"][0][0] == "life (ta_filter+entropy_weighted)"
    assert leaderboard["data"][0][3] == 2

    overlay, diff = watcher.predict(["life", evaluation[0]["name"]], "loss", api_name="/runs_compare")
    assert overlay["type"] == "plotly"
    settings = [row[0] for row in diff["value"]["data"]]
    assert "strategy" in settings
    assert "run_name" not in settings
    watcher.close()


def test_run_started_elsewhere_reattached(app, promptkd_home):
    """A run started outside this app (a CLI run, or one from before a restart) is found from its folder."""
    url, runs = app
    command = [
        sys.executable, "-m", "promptkd", "distill", "--teacher", "tiny-llama", "--student", "tiny-llama:layers=0",
        "--max-steps", "30", "--train-limit", "8", "--per-device-batch-size", "2", "--max-new-tokens", "8",
        "--max-length", "128", "--probe-every", "0", "--mixed-precision", "no",
        "--output-dir", str(runs), "--run-name", "external",
    ]
    log = open(runs.parent / "external.log", "wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PROMPTKD_HOME=str(promptkd_home)),
    )
    client = connect(url)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (runs / "external" / "status.json").is_file() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        running = wait_for(client, "external", lambda s: s["metrics_rows"] >= 1, "a first metrics row")
        assert running["state"] == "running"
        assert running["pid"] == process.pid

        attached = client.predict(api_name="/attach")
        assert attached[0]["value"] == "external"
        with pytest.raises(AppError) as error:
            client.predict(**dict(FORM, run_name="blocked"), api_name="/train_launch")
        assert "'external'" in str(error.value)

        assert "Stop requested for run external" in client.predict("external", api_name="/train_stop")
        stopped = wait_for(client, "external", lambda s: s["state"] not in ("running", "starting"), "a final state")
        assert stopped["state"] == "stopped"
        assert process.wait(timeout=WAIT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        client.close()


def test_folder_without_model_rejected(app):
    url, runs = app
    client = connect(url)
    fake = runs / "not-a-model"
    fake.mkdir()
    with pytest.raises(AppError) as error:
        client.predict(**dict(FORM, teacher=str(fake), run_name="broken"), api_name="/train_launch")
    assert "config.json not found" in str(error.value)
    assert not (runs / "broken").exists()
    client.close()


def test_failed_run_shows_reason(app):
    """A run that fails inside the trainer shows the trainer's error, not a bare 'failed'."""
    url, runs = app
    client = connect(url)
    # tiny-gpt2 has the GPT-2 vocabulary, so the trainer rejects it as a student of tiny-llama.
    client.predict(**dict(FORM, student="tiny-gpt2:layers=0", run_name="mismatch"), api_name="/train_launch")
    failed = wait_for(client, "mismatch", lambda s: s["state"] not in ("running", "starting"), "a final state")
    assert failed["state"] == "failed"
    assert "vocabulary" in failed["error"]
    status = client.predict("mismatch", QUANTITY, 0, api_name="/train_refresh")[0]
    assert "**Error:**" in status
    assert "vocabulary" in status
    client.close()
