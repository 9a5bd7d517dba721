"""Run folders: one per SFT, distillation or evaluation run.

Layout of `<runs root>/<run name>/`:

    config.yaml        the full config of the run
    status.json        state (running, completed, failed, stopped), step, total steps, error, pid
    metrics.jsonl      one JSON object per logged optimizer step
    probes.jsonl       per-token teacher statistics of a fixed probe batch (distillation)
    run.log            the run's log
    checkpoint/        the latest resumable state: model/, soft_prompt.safetensors, trainer_state.pt
    model/             the final (or, after a stop, latest) student, loadable by from_pretrained
    soft_prompt.safetensors, results.json, results.md

Every file is written to a temporary name first and then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import yaml

logger = logging.getLogger(__name__)

STATES = ("running", "completed", "failed", "stopped")
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
LOG_FORMAT = "%(asctime)s %(levelname)s [run %(run_id)s] %(name)s: %(message)s"


class RunError(RuntimeError):
    """A run folder cannot be created, resumed or read."""


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_dir) and then swap tmp_dir into place; the old folder is kept until the swap is done."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def existing_dir(path: Path) -> Optional[Path]:
    """Return `path`, or its `.old` copy left by a swap that was interrupted, or None."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(f".{path.name}.old")
    return old if old.is_dir() else None


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as error:
        logger.warning("Skipping %s: invalid JSON (%s)", path, error)
        return default


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file, skipping a partly written last line."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunIdFilter(logging.Filter):
    def __init__(self, run_id: str):
        super().__init__()
        self.run_id = run_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = self.run_id
        return True


# The console handler's filter; a run that starts sets its id here so console lines carry it too.
CONSOLE_RUN_ID = RunIdFilter("-")


def setup_logging(level: int = logging.INFO, run_id: str = "-") -> None:
    """Send promptkd's log records to stderr with the run id in every line."""
    root = logging.getLogger("promptkd")
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_promptkd_console", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._promptkd_console = True
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    CONSOLE_RUN_ID.run_id = run_id
    handler.addFilter(CONSOLE_RUN_ID)
    root.addHandler(handler)
    root.propagate = False


class Run:
    """A run folder. Only the main process writes; other processes get a Run whose writes do nothing."""

    def __init__(self, path: Path, command: str, run_id: str, is_main: bool = True):
        self.path = Path(path)
        self.command = command
        self.run_id = run_id
        self.is_main = is_main
        self._status: dict = read_json(self.path / "status.json", {}) or {}
        self._file_handler: Optional[logging.Handler] = None

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, config, command: str, is_main: bool = True) -> "Run":
        """Create the run folder for `config`, or reopen it when config.resume is set.

        Raises RunError before any heavy work when the folder exists without resume, or is missing with it.
        """
        name = config.run_name or f"{command}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
        config.run_name = name
        path = config.runs_root / name
        status = read_json(path / "status.json", None)

        if config.resume:
            if status is None:
                raise RunError(f"Cannot resume {path}: no run folder with a status.json there. Drop --resume to start it.")
            if status.get("command") != command:
                raise RunError(f"Cannot resume {path} with '{command}': it is a '{status.get('command')}' run.")
            if status.get("state") == "completed":
                raise RunError(f"Run {path} has already completed; there is nothing to resume.")
            if status.get("state") == "running" and _pid_alive(status.get("pid"), status.get("host")):
                raise RunError(f"Run {path} is still running (pid {status.get('pid')}); stop it before resuming.")
        elif status is not None and not _failed_before_training(path, status):
            # A folder without status.json is accepted: the app creates it first to hold the launch log.
            raise RunError(
                f"Run folder {path} already exists. Pass --resume to continue it, or choose another --run-name."
            )

        run_id = (status or {}).get("run_id") or f"{name}-{uuid.uuid4().hex[:6]}"
        run = cls(path, command, run_id, is_main=is_main)
        if is_main:
            path.mkdir(parents=True, exist_ok=True)
            from promptkd.config import save_config

            save_config(config, path / "config.yaml")
            run.attach_log_file()
            run.set_status(
                "running",
                started_at=(status or {}).get("started_at") or utc_now(),
                resumed_at=utc_now() if config.resume else None,
                error=None,
            )
        return run

    @classmethod
    def open(cls, path: Path) -> "Run":
        status = read_json(Path(path) / "status.json", None)
        if status is None:
            raise RunError(f"{path} is not a run folder: status.json not found.")
        return cls(Path(path), status.get("command", "?"), status.get("run_id", Path(path).name))

    # -- logging -------------------------------------------------------------------------------

    def attach_log_file(self) -> None:
        handler = logging.FileHandler(self.path / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(RunIdFilter(self.run_id))
        logging.getLogger("promptkd").addHandler(handler)
        self._file_handler = handler
        CONSOLE_RUN_ID.run_id = self.run_id

    def close(self) -> None:
        if self._file_handler is not None:
            logging.getLogger("promptkd").removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None
            CONSOLE_RUN_ID.run_id = "-"

    # -- status and metrics ----------------------------------------------------------------------

    @property
    def status(self) -> dict:
        return dict(self._status)

    def set_status(self, state: Optional[str] = None, **fields) -> None:
        if state is not None:
            if state not in STATES:
                raise ValueError(f"state={state!r} is invalid: choose one of {', '.join(STATES)}.")
            self._status["state"] = state
        self._status.update(
            command=self.command,
            run_id=self.run_id,
            pid=os.getpid(),
            host=socket.gethostname(),
            updated_at=utc_now(),
        )
        self._status.update(fields)
        if self.is_main:
            atomic_write_json(self.path / "status.json", self._status)

    def log_metrics(self, metrics: dict) -> None:
        if not self.is_main:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics, default=float) + "\n")

    def log_probe(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path / "probes.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")

    def truncate_logs(self, step: int) -> None:
        """Drop metrics and probe rows logged after `step`, the step a resumed run restarts from."""
        if not self.is_main:
            return
        for name in ("metrics.jsonl", "probes.jsonl"):
            rows = [row for row in read_jsonl(self.path / name) if row.get("step", 0) <= step]
            if (self.path / name).exists():
                atomic_write_text(self.path / name, "".join(json.dumps(row) + "\n" for row in rows))

    def write_json(self, name: str, obj) -> None:
        if self.is_main:
            atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        if self.is_main:
            atomic_write_text(self.path / name, text)

    @property
    def checkpoint_dir(self) -> Optional[Path]:
        return existing_dir(self.path / CHECKPOINT_DIR)


def _failed_before_training(path: Path, status: dict) -> bool:
    """True for a run that failed during setup (bad model path, vocab mismatch): nothing of it is worth keeping."""
    return (
        status.get("state") == "failed"
        and not status.get("step")
        and not (path / CHECKPOINT_DIR).exists()
        and not (path / "metrics.jsonl").exists()
    )


def _pid_alive(pid, host) -> bool:
    if not pid or (host and host != socket.gethostname()):
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()


def run_state(path: Path) -> dict:
    """Status of a run folder, with a 'running' run whose process is gone reported as 'failed'."""
    status = read_json(Path(path) / "status.json", {}) or {}
    if status.get("state") == "running" and status.get("pid") and not _pid_alive(status.get("pid"), status.get("host")):
        status = dict(status, state="failed", error=status.get("error") or "The run's process ended without updating its status (killed?).")
    return status


def list_runs(root: Path) -> list[dict]:
    """Summaries of the run folders under `root`, newest first."""
    root = Path(root)
    runs = []
    if not root.is_dir():
        return runs
    for path in root.iterdir():
        if not (path / "status.json").is_file():
            continue
        status = run_state(path)
        config = {}
        try:
            config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        except (FileNotFoundError, yaml.YAMLError):
            pass
        metrics = read_jsonl(path / "metrics.jsonl")
        runs.append(
            {
                "name": path.name,
                "path": str(path),
                "command": status.get("command"),
                "state": status.get("state"),
                "step": status.get("step"),
                "total_steps": status.get("total_steps"),
                "started_at": status.get("started_at"),
                "updated_at": status.get("updated_at"),
                "error": status.get("error"),
                "strategy": config.get("strategy"),
                "config": config,
                "last_metrics": metrics[-1] if metrics else {},
                "results": read_json(path / "results.json", None),
            }
        )
    runs.sort(key=lambda run: run.get("started_at") or "", reverse=True)
    return runs


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after each step.

    A second SIGINT while a stop is pending raises KeyboardInterrupt at once.
    """

    def __init__(self):
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning(
            "Received %s: stopping after the current step (a step can take minutes on a CPU) and saving a checkpoint. "
            "Press Ctrl-C again to abort without a checkpoint.",
            self.signal_name,
        )

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
