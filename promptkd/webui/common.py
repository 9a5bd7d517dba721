"""Helpers shared by the tabs: allowed folders, model and record choices, the model cache and the charts."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import gradio as gr
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from promptkd.config import home_dir
from promptkd.data import DollyRecord, load_split
from promptkd.losses import STRATEGIES
from promptkd.models import PRESETS, SMOLLM2, TINY_GPT2, TINY_LLAMA, split_model_spec
from promptkd.runs import read_json

if TYPE_CHECKING:  # promptkd.webui.runner imports this module
    from promptkd.webui.runner import Runner

logger = logging.getLogger("promptkd.webui")

# Model specs offered in every model dropdown, before the run folders.
MODEL_PRESET_CHOICES = [
    SMOLLM2,
    f"{SMOLLM2}:layers=default",
    TINY_LLAMA,
    f"{TINY_LLAMA}:layers=0",
    TINY_GPT2,
    f"{TINY_GPT2}:layers=0",
]
# Every strategy that promptkd.losses defines, in its order.
STRATEGY_NAMES = list(STRATEGIES)
DATASET = "dolly"
RECORD_SPLITS = ("test", "validation")
# Matches shown in a record dropdown after a text search.
MAX_SEARCH_RESULTS = 100
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 64 * 1024


# ----- allowed folders ---------------------------------------------------------------------------


@dataclass
class AppPaths:
    """The folders the app reads and writes; every path typed into the app must lie under `allowed`."""

    home: Path
    runs: Path
    models: Path
    configs: Path
    allowed: list[Path] = field(default_factory=list)

    @classmethod
    def from_root(cls, root: Optional[str | Path] = None) -> "AppPaths":
        """Build the folders from the runs root (default $PROMPTKD_HOME/runs); configs go beside it."""
        home = home_dir().expanduser().resolve()
        runs = Path(root).expanduser().resolve() if root else home / "runs"
        paths = cls(home=home, runs=runs, models=home / "models", configs=runs.parent / "configs")
        for folder in (home, runs, paths.models, paths.configs):
            if folder not in paths.allowed:
                paths.allowed.append(folder)
        runs.mkdir(parents=True, exist_ok=True)
        return paths

    def describe_roots(self) -> str:
        return ", ".join(str(folder) for folder in self.allowed)

    def is_allowed(self, path: Path) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved == root or resolved.is_relative_to(root) for root in self.allowed)

    def check(self, text: str, label: str, must_exist: bool = True) -> Path:
        """Resolve a typed path (symlinks followed) and raise gr.Error unless it lies under an allowed folder."""
        text = (text or "").strip()
        if not text:
            raise gr.Error(f"{label} is empty: enter a path under {self.describe_roots()}.")
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.runs / path
        resolved = path.resolve()
        if not self.is_allowed(resolved):
            raise gr.Error(
                f"{label} {text!r} is outside the app's folders: use a path under {self.describe_roots()}."
            )
        if must_exist and not resolved.exists():
            raise gr.Error(f"{label} {resolved} not found: pick an existing path under {self.describe_roots()}.")
        return resolved


@dataclass
class AppContext:
    """Shared state of one app: the folders, the runner, the model cache and the Spaces switch."""

    paths: AppPaths
    runner: "Runner"
    models: "ModelCache"
    spaces: bool = False


def _looks_like_path(text: str) -> bool:
    """True for text that can only be a local path: hub ids are 'name' or 'owner/name'."""
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(paths: AppPaths, text: str, label: str) -> str:
    """Check a model field (preset, run name, folder or hub id) and return the spec to pass to promptkd.

    A bare run name becomes its run folder. Folders must lie under the app's folders, and a run folder must
    already hold a saved model. Raises gr.Error with the value and the fix.
    """
    from promptkd.models import resolve_model_source

    text = (text or "").strip()
    if not text:
        raise gr.Error(f"{label} is empty: pick a preset or a run from the list, or type a model folder under {paths.describe_roots()}.")
    try:
        base, layers = split_model_spec(text)
    except ValueError as error:
        raise gr.Error(f"{label}: {error}") from error
    suffix = "" if layers is None else f":layers={layers}"
    if base in PRESETS:
        return text

    run_folder = paths.runs / base
    if "/" not in base and base not in (".", "..") and run_folder.is_dir():
        base = str(run_folder)
    elif _looks_like_path(base) or Path(base).expanduser().exists():
        base = str(paths.check(base, f"{label} folder"))
    elif hub_offline():
        raise gr.Error(
            f"{label} {text!r} is not a preset, a run under {paths.runs} or a model folder, and the Hugging Face Hub "
            f"is offline (HF_HUB_OFFLINE=1): choose one of {', '.join(MODEL_PRESET_CHOICES)} or a finished run."
        )
    else:
        return text

    try:
        resolve_model_source(base)
    except FileNotFoundError as error:
        raise gr.Error(f"{label}: {error}") from error
    return base + suffix


# ----- choices -------------------------------------------------------------------------------------


def run_folders(paths: AppPaths) -> list[Path]:
    """Run folders under the runs root (with status.json or a launch record), newest first."""
    from promptkd.webui.runner import LAUNCH_FILE

    if not paths.runs.is_dir():
        return []
    folders = [p for p in paths.runs.iterdir() if p.is_dir() and ((p / "status.json").is_file() or (p / LAUNCH_FILE).is_file())]
    return sorted(folders, key=lambda p: _started_at(p), reverse=True)


def _started_at(path: Path) -> str:
    from promptkd.webui.runner import LAUNCH_FILE

    status = read_json(path / "status.json", None) or {}
    launch = read_json(path / LAUNCH_FILE, None) or {}
    return status.get("started_at") or launch.get("started_at") or ""


def run_config(path: Path) -> dict:
    import yaml

    for name in ("config.yaml", "launch.yaml"):
        try:
            return yaml.safe_load((Path(path) / name).read_text(encoding="utf-8")) or {}
        except (FileNotFoundError, yaml.YAMLError):
            continue
    return {}


def model_run_choices(paths: AppPaths) -> list[tuple[str, str]]:
    """(label, folder) of SFT and distillation runs that have saved a student model."""
    choices = []
    for folder in run_folders(paths):
        status = read_json(folder / "status.json", None) or {}
        if status.get("command") not in ("sft", "distill") or not (folder / "model" / "config.json").is_file():
            continue
        if status.get("state") not in ("completed", "stopped"):
            continue
        strategy = run_config(folder).get("strategy")
        detail = ", ".join(part for part in (status.get("command"), strategy, status.get("state")) if part)
        choices.append((f"run: {folder.name} ({detail})", str(folder)))
    return choices


def model_choices(paths: AppPaths) -> list[tuple[str, str]]:
    return [(spec, spec) for spec in MODEL_PRESET_CHOICES] + model_run_choices(paths)


def soft_prompt_choices(paths: AppPaths) -> list[tuple[str, str]]:
    """(label, folder) of distillation runs with a saved soft prompt, after a 'none' entry."""
    choices = [("none", "")]
    for folder in run_folders(paths):
        if (folder / "soft_prompt.safetensors").is_file():
            choices.append((f"run: {folder.name}", str(folder)))
    return choices


def config_file_choices(paths: AppPaths) -> list[str]:
    if not paths.configs.is_dir():
        return []
    return sorted(str(p) for p in paths.configs.glob("*.yaml"))


# ----- Dolly records ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=len(RECORD_SPLITS))
def split_records(split: str) -> tuple[DollyRecord, ...]:
    """Load the shipped Dolly records of a split without echo records, once per process."""
    return tuple(load_split(DATASET, split))


def record_label(record: DollyRecord) -> str:
    instruction = " ".join(record.instruction.split())
    return f"{record.index}: {instruction[:90]}{'…' if len(instruction) > 90 else ''}"


def record_choices(split: str, query: str = "") -> list[tuple[str, int]]:
    """(label, original index) of the split's records; a query keeps records whose text contains it."""
    query = (query or "").strip().lower()
    records = split_records(split)
    if query:
        records = [r for r in records if query in f"{r.instruction}\n{r.context}\n{r.response}".lower()][:MAX_SEARCH_RESULTS]
    return [(record_label(r), r.index) for r in records]


def find_record(split: str, index) -> DollyRecord:
    """Find the record with this original index. A typed '14500: …' label counts as index 14500."""
    match = re.match(r"\s*(\d+)", str(index)) if isinstance(index, str) else None
    try:
        index = int(match.group(1)) if match else int(index)
    except (TypeError, ValueError) as error:
        raise gr.Error(f"Record index {index!r} is invalid: pick a record from the list or type its original Dolly index.") from error
    for record in split_records(split):
        if record.index == index:
            return record
    records = split_records(split)
    raise gr.Error(
        f"Record {index} is not in the {split} split: pick an index between {records[0].index} and {records[-1].index}."
    )


def prompt_record(instruction: str, context: str, reference: str, index=None) -> DollyRecord:
    """Build a record from the prompt boxes. Index -1 marks a prompt that is not a Dolly record."""
    instruction = (instruction or "").strip()
    if not instruction:
        raise gr.Error("The instruction is empty: pick a Dolly record or type an instruction.")
    try:
        index = int(index) if index not in (None, "") else -1
    except (TypeError, ValueError):
        index = -1
    return DollyRecord(index=index, instruction=instruction, context=(context or "").strip(), response=(reference or "").strip(), category="")


# ----- models --------------------------------------------------------------------------------------


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_stamp(spec: str) -> Optional[int]:
    """Modification time of a run's or folder's saved weights, so a re-saved model is loaded again."""
    base, _ = split_model_spec(spec)
    path = Path(base)
    if not path.is_dir():
        return None
    folder = path / "model" if (path / "status.json").is_file() else path
    stamps = [f.stat().st_mtime_ns for f in folder.glob("*.safetensors")] + [f.stat().st_mtime_ns for f in folder.glob("config.json")]
    return max(stamps) if stamps else None


class ModelCache:
    """Least-recently-used cache of loaded (model, tokenizer) pairs, keyed by spec and weight file time."""

    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, spec: str):
        from promptkd.models import load_model_and_tokenizer

        key = (spec, _model_stamp(spec))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            for old in [k for k in self._items if k[0] == spec]:
                del self._items[old]
            logger.info("Loading model %s", spec)
            try:
                model, tokenizer = load_model_and_tokenizer(spec)
            except (OSError, ValueError) as error:
                raise gr.Error(f"Could not load model {spec!r}: {error}") from error
            model.to(compute_device()).eval()
            self.loads += 1
            self._items[key] = (model, tokenizer)
            while len(self._items) > self.capacity:
                evicted, _ = self._items.popitem(last=False)
                logger.info("Model cache full: dropped %s", evicted[0])
            return model, tokenizer

    def cached_specs(self) -> list[str]:
        with self._lock:
            return [key[0] for key in self._items]


# ----- text ------------------------------------------------------------------------------------------


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log; of a line rewritten with carriage returns (progress bars) the last state only."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            data = handle.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    rows = [row.rstrip("\r").split("\r")[-1] for row in text.split("\n")]
    rows = [row for row in rows if row.strip()]
    return "\n".join(rows[-lines:])


def last_error_line(log_text: str) -> Optional[str]:
    """Return the last log line that reports an error: an 'error:' line of the CLI or a Python exception."""
    for row in reversed(log_text.splitlines()):
        stripped = row.strip()
        if stripped.startswith("error:") or (": " in stripped and stripped.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt"))):
            return stripped
    return None


def markdown_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----- charts ----------------------------------------------------------------------------------------

# (metrics.jsonl key, chart title) of the training curves, in display order.
METRIC_PANELS = [
    ("loss", "student loss"),
    ("prompt_loss", "prompt loss"),
    ("prompt_kl_teacher", "prompt KL to teacher (regulariser)"),
    ("alpha", "alpha"),
    ("teacher_entropy", "teacher entropy (nats)"),
    ("kept_size", "kept-set size"),
    ("fallbacks", "fallback tokens"),
    ("tokens_per_s", "tokens/s"),
    ("kl", "student KL (unweighted)"),
]
PROBE_QUANTITIES = {
    "teacher entropy (nats)": "entropy",
    "normalized entropy H/log|V|": "normalized_entropy",
    "entropy weight": "weight",
    "kept-set size (log10)": "kept_size",
}
# Positions drawn in a probe heatmap; longer probe responses are cut for readability.
MAX_HEATMAP_POSITIONS = 64


def empty_figure(message: str) -> go.Figure:
    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.update_layout(height=260, margin=dict(l=20, r=20, t=30, b=20))
    return figure


def metrics_figure(rows: list[dict], title: str = "") -> go.Figure:
    """Draw the training curves of one run, one panel per metric of METRIC_PANELS."""
    if not rows:
        return empty_figure("No metrics yet: the first point appears after the first optimizer step.")
    columns = 3
    panel_rows = math.ceil(len(METRIC_PANELS) / columns)
    figure = make_subplots(rows=panel_rows, cols=columns, subplot_titles=[name for _, name in METRIC_PANELS])
    for position, (key, name) in enumerate(METRIC_PANELS):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float)) and "step" in row]
        if not points:
            continue
        steps, values = zip(*points)
        figure.add_trace(
            go.Scatter(x=list(steps), y=list(values), mode="lines+markers", name=name, showlegend=False, marker=dict(size=4)),
            row=position // columns + 1,
            col=position % columns + 1,
        )
    figure.update_layout(height=230 * panel_rows, title=title or None, margin=dict(l=40, r=20, t=60, b=30))
    figure.update_xaxes(title_text="step", title_standoff=2)
    return figure


def overlay_figure(curves: dict[str, list[dict]], key: str) -> go.Figure:
    """Draw one metric of several runs on shared axes."""
    figure = go.Figure()
    for name, rows in curves.items():
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float)) and "step" in row]
        if points:
            steps, values = zip(*points)
            figure.add_trace(go.Scatter(x=list(steps), y=list(values), mode="lines+markers", name=name))
    if not figure.data:
        return empty_figure(f"None of the selected runs logged {key!r}.")
    figure.update_layout(height=380, xaxis_title="step", yaxis_title=key, margin=dict(l=50, r=20, t=30, b=40))
    return figure


def token_label(position: int, token: str) -> str:
    return f"{position} {token!r}"


def probe_heatmap(probes: list[dict], quantity: str, example: int = 0) -> go.Figure:
    """Position x step heatmap of one probe example's per-token values from probes.jsonl."""
    key = PROBE_QUANTITIES.get(quantity, quantity)
    columns = [(record["step"], record["examples"][example]) for record in probes if len(record.get("examples", [])) > example]
    if not columns:
        return empty_figure("No probe records yet: they are written every probe_every steps (0 turns them off).")

    tokens = columns[-1][1]["tokens"][:MAX_HEATMAP_POSITIONS]
    positions = len(tokens)
    z = []
    for position in range(positions):
        row = []
        for _, report in columns:
            values = report.get(key) or []
            value = values[position] if position < len(values) else None
            if value is not None and key == "kept_size":
                value = math.log10(max(value, 1))
            row.append(value)
        z.append(row)

    steps = [step for step, _ in columns]
    figure = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(step) for step in steps],
            y=[token_label(i, t) for i, t in enumerate(tokens)],
            colorscale="Viridis",
            colorbar=dict(title=quantity),
            hovertemplate="step %{x}<br>%{y}<br>" + quantity + " %{z:.4g}<extra></extra>",
        )
    )

    figure.update_layout(
        height=max(320, 14 * positions + 120),
        xaxis_title="step",
        yaxis=dict(autorange="reversed", title="response position"),
        margin=dict(l=140, r=20, t=30, b=40),
    )
    return figure

