"""Start, watch and stop run processes (`python -m promptkd ...`), one job at a time per device.

Each job is its own process in its own session (`start_new_session=True`), so it outlives the browser
tab and the app. Its stdout and stderr go to `<run>/stdout.log`, a file rather than a pipe, so the
trainer's writes do not depend on anyone reading them. The runner writes `<run>/launch.json` (argv, pid, start
time) before anything else, and finds running jobs again from the run folders after a restart: a job
is active while its launched process or the pid in its status.json is alive.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import promptkd
from promptkd.config import DistillConfig, save_config
from promptkd.runs import atomic_write_json, read_json, read_jsonl, run_state, utc_now
from promptkd.webui.common import last_error_line, read_log_tail

logger = logging.getLogger("promptkd.webui.runner")

LAUNCH_FILE = "launch.json"
LAUNCH_CONFIG = "launch.yaml"
LOG_FILE = "stdout.log"
ACTIVE_STATES = ("running", "starting")
RESUMABLE_STATES = ("stopped", "failed")

# Processes started by any Runner in this app process: the device is shared by every runs root.
_children: dict[int, subprocess.Popen] = {}
_device_lock = threading.Lock()


class RunnerError(RuntimeError):
    """A job cannot be started or stopped. The message names the cause and the fix."""


class RunnerBusy(RunnerError):
    """Another job already uses the device."""


@dataclass
class Job:
    name: str
    path: Path
    command: str
    pid: Optional[int]
    state: str


def _promptkd_process_alive(pid, host: Optional[str] = None) -> bool:
    """True when `pid` is alive on this host and, where /proc exists, runs promptkd (guards against pid reuse)."""
    if not pid or (host and host != socket.gethostname()):
        return False
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.is_dir():
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        if b"promptkd" not in text:
            return False
        stat = Path(f"/proc/{pid}/stat")
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":  # an exited child not yet reaped
                return False
        except (OSError, IndexError):
            pass
    return True


def folder_status(path: Path) -> dict:
    """Return the status of a run folder as the app shows it.

    Beyond `runs.run_state`, the state is 'starting' while the launched process lives but has not marked the
    run running (it is loading, or resuming a stopped run). A folder whose process exited before it wrote
    status.json is 'failed', or 'stopped' when a stop was requested, with the error taken from stdout.log.
    """
    path = Path(path)
    has_status = (path / "status.json").is_file()
    status = run_state(path) if has_status else {}
    launch = read_json(path / LAUNCH_FILE, None) or {}
    launched_alive = _promptkd_process_alive(launch.get("pid"), launch.get("host"))

    if launched_alive and status.get("state") != "running":
        status = dict(status, state="starting", pid=launch.get("pid"), command=status.get("command") or launch.get("command"))
    elif not has_status and launch:
        state = "stopped" if launch.get("stop_requested_at") else "failed"
        error = last_error_line(read_log_tail(path / LOG_FILE)) or "The process exited before it created status.json; see stdout.log."
        status = {"state": state, "command": launch.get("command"), "error": error, "pid": launch.get("pid"), "started_at": launch.get("started_at")}
    if status.get("state") == "failed" and (not status.get("error") or "ended without updating its status" in status.get("error", "")):
        log_error = last_error_line(read_log_tail(path / LOG_FILE))
        if log_error:
            status["error"] = f"{status.get('error') or 'failed'} Last error in stdout.log: {log_error}"
    status.setdefault("command", launch.get("command"))
    status["launch"] = launch
    return status


def describe_run(path: Path) -> dict:
    """Collect the state, progress, timing and metrics of a run folder for the UI and the API."""
    path = Path(path)
    status = folder_status(path)
    metrics = read_jsonl(path / "metrics.jsonl")
    probes = read_jsonl(path / "probes.jsonl")
    step = status.get("step") or 0
    total = status.get("total_steps")
    elapsed = status.get("elapsed_s")
    eta = None
    if status.get("state") in ACTIVE_STATES and total and step and elapsed:
        eta = elapsed / step * max(total - step, 0)
    return {
        "name": path.name,
        "folder": str(path),
        "command": status.get("command"),
        "state": status.get("state"),
        "step": step,
        "total_steps": total,
        "elapsed_s": elapsed,
        "eta_s": eta,
        "error": status.get("error"),
        "pid": status.get("pid"),
        "started_at": status.get("started_at"),
        "updated_at": status.get("updated_at"),
        "metrics_rows": len(metrics),
        "last_metrics": metrics[-1] if metrics else {},
        "probe_steps": [record.get("step") for record in probes],
        "metrics": metrics,
        "probes": probes,
    }


def _package_root() -> str:
    return str(Path(promptkd.__file__).resolve().parent.parent)


def promptkd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "promptkd", *args]


class Runner:
    """Starts jobs as processes under one runs root and finds, describes and stops them."""

    def __init__(self, runs_root: Path, home: Path):
        self.runs_root = Path(runs_root)
        self.home = Path(home)

    # ----- queries --------------------------------------------------------------------------------

    def active_job(self) -> Optional[Job]:
        """Return the job that uses the device: a live process this app started, or a running folder under the root."""
        for pid, process in list(_children.items()):
            if process.poll() is None:
                path = Path(getattr(process, "promptkd_run_path", ""))
                return Job(path.name, path, getattr(process, "promptkd_command", "?"), pid, "running")
        if not self.runs_root.is_dir():
            return None
        for path in self.runs_root.iterdir():
            if not path.is_dir():
                continue
            if not ((path / "status.json").is_file() or (path / LAUNCH_FILE).is_file()):
                continue
            status = folder_status(path)
            if status.get("state") in ACTIVE_STATES:
                return Job(path.name, path, status.get("command") or "?", status.get("pid"), status["state"])
        return None

    def _check_idle(self) -> None:
        job = self.active_job()
        if job is None:
            return
        summary = describe_run(job.path) if job.path.name else {}
        progress = f"step {summary.get('step')}/{summary.get('total_steps')}" if summary.get("total_steps") else "loading"
        raise RunnerBusy(
            f"Run {job.name!r} ({job.command}, {progress}, pid {job.pid}) is using the device: one job runs at a "
            "time. Wait for it to finish, or stop it, before starting another."
        )

    # ----- starting jobs -----------------------------------------------------------------------------

    def child_env(self) -> dict:
        env = dict(os.environ)
        env["PROMPTKD_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
        env.setdefault("TQDM_MININTERVAL", "5")  # fewer progress-bar rewrites in stdout.log
        return env

    def _start(self, path: Path, command: str, argv: list[str]) -> Job:
        """Start `argv` with output appended to <run>/stdout.log and record it in <run>/launch.json."""
        path.mkdir(parents=True, exist_ok=True)
        with open(path / LOG_FILE, "ab") as log:
            log.write(f"\n$ {shlex.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.child_env(),
                cwd=os.getcwd(),
            )
        process.promptkd_run_path = str(path)
        process.promptkd_command = command
        _children[process.pid] = process
        atomic_write_json(
            path / LAUNCH_FILE,
            {"command": command, "argv": argv, "pid": process.pid, "host": socket.gethostname(), "started_at": utc_now()},
        )
        threading.Thread(target=_reap, args=(process, path), name=f"reap-{process.pid}", daemon=True).start()
        logger.info("Started %s job for run %s (pid %d): %s", command, path.name, process.pid, shlex.join(argv))
        return Job(path.name, path, command, process.pid, "starting")

    def launch_distill(self, config: DistillConfig) -> Job:
        """Create <root>/<run_name>/, write launch.yaml and start `promptkd distill --config launch.yaml`."""
        if not config.run_name:
            config.run_name = f"distill-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        config.output_dir = str(self.runs_root)
        path = self.runs_root / config.run_name
        with _device_lock:
            self._check_idle()
            if path.exists() and any(path.iterdir()):
                raise RunnerError(f"Run folder {path} already exists: choose another run name, or resume that run from the Runs tab.")
            path.mkdir(parents=True, exist_ok=True)
            save_config(config, path / LAUNCH_CONFIG)
            return self._start(path, "distill", promptkd_argv("distill", "--config", str(path / LAUNCH_CONFIG)))

    def resume(self, path: Path) -> Job:
        """Continue a stopped or failed SFT or distillation run from its last checkpoint."""
        path = Path(path)
        with _device_lock:
            self._check_idle()
            status = folder_status(path)
            command = status.get("command")
            if command not in ("distill", "sft"):
                raise RunnerError(f"Run {path.name} is a {command!r} run: only SFT and distillation runs can be resumed.")
            if status.get("state") not in RESUMABLE_STATES:
                raise RunnerError(f"Run {path.name} is {status.get('state')}: only stopped or failed runs can be resumed.")
            if not (path / "config.yaml").is_file():
                raise RunnerError(f"Run {path.name} has no config.yaml: it never started, so launch it again instead of resuming.")
            argv = promptkd_argv(
                command, "--config", str(path / "config.yaml"), "--resume",
                "--output-dir", str(path.parent), "--run-name", path.name,
            )
            return self._start(path, command, argv)

    def evaluate(self, path: Path, eval_limit: int, split: str = "test", bertscore_model: str = "offline", max_new_tokens: int = 32) -> Job:
        """Start `promptkd evaluate` of one run's student in a new evaluation run folder."""
        path = Path(path)
        name = f"eval-{path.name}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        with _device_lock:
            self._check_idle()
            status = folder_status(path)
            if status.get("state") not in ("completed", "stopped") or not (path / "model" / "config.json").is_file():
                raise RunnerError(
                    f"Run {path.name} is {status.get('state')} and has no saved student in {path / 'model'}: "
                    "evaluate a completed or stopped SFT or distillation run."
                )
            argv = promptkd_argv(
                "evaluate", "--models", str(path), "--eval-limit", str(eval_limit), "--split", split,
                "--bertscore-model", bertscore_model, "--max-new-tokens", str(max_new_tokens),
                "--run-name", name, "--output-dir", str(self.runs_root),
            )
            return self._start(self.runs_root / name, "evaluate", argv)

    # ----- stopping ------------------------------------------------------------------------------------

    def stop(self, path: Path) -> str:
        """Send SIGINT to the run's process group; the trainer saves a checkpoint and marks the run stopped."""
        path = Path(path)
        status = folder_status(path)
        if status.get("state") not in ACTIVE_STATES:
            raise RunnerError(f"Run {path.name} is {status.get('state') or 'not started'}: there is no process to stop.")
        launch = status.get("launch") or {}
        pid = launch.get("pid") if _promptkd_process_alive(launch.get("pid"), launch.get("host")) else status.get("pid")
        if not _promptkd_process_alive(pid, status.get("host")):
            raise RunnerError(f"Run {path.name} has no live process (pid {pid}): refresh to see its final state.")
        if launch.get("stop_requested_at") and launch.get("pid") == pid:
            raise RunnerError(
                f"A stop of run {path.name} was already requested at {launch['stop_requested_at']}: it stops after the "
                "current step and saves a checkpoint. Wait for the state to change."
            )
        pid = int(pid)
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGINT)
            else:
                os.kill(pid, signal.SIGINT)
        except ProcessLookupError as error:
            raise RunnerError(f"Run {path.name}: process {pid} exited before the stop request ({error}).") from error
        if launch and launch.get("pid") == pid:
            atomic_write_json(path / LAUNCH_FILE, dict(launch, stop_requested_at=utc_now()))
        logger.info("Sent SIGINT to run %s (pid %d)", path.name, pid)
        return f"Stop requested for run {path.name} (pid {pid}): it stops after the current step and saves a checkpoint."


def _reap(process: subprocess.Popen, path: Path) -> None:
    """Wait for a job so it does not linger as a zombie, and log how it ended."""
    started = time.monotonic()
    code = process.wait()
    with _device_lock:
        _children.pop(process.pid, None)
    state = (read_json(path / "status.json", None) or {}).get("state")
    log = logger.info if code == 0 else logger.warning
    log("Job for run %s (pid %d) exited with code %d after %.0f s; run state %s", path.name, process.pid, code, time.monotonic() - started, state)


_runners: dict[Path, Runner] = {}


def get_runner(runs_root: Path, home: Path) -> Runner:
    """Return the app-wide Runner of a runs root (one per root, shared by every browser session)."""
    key = Path(runs_root).resolve()
    with _device_lock:
        if key not in _runners:
            _runners[key] = Runner(key, home)
        return _runners[key]
