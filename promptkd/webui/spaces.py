"""Hugging Face Spaces mode: short training runs only, read-only run management, optional ZeroGPU.

Spaces sets the SPACE_ID environment variable in every Space. In that mode the app

  - accepts training runs of at most SPACES_MAX_STEPS optimizer steps on at most
    SPACES_MAX_TRAIN_LIMIT training records (both must be set), so a public demo cannot hold the
    device for long;
  - offers compare and inspect as usual;
  - shows finished runs read-only: the stop, resume and evaluate events are not registered, so
    neither the buttons nor their API endpoints exist.

The `spaces` package (ZeroGPU) is optional: `gpu` wraps a function in `spaces.GPU` only where that
package can be imported, and returns it unchanged elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, Optional

logger = logging.getLogger(__name__)

SPACES_MAX_STEPS = 20
SPACES_MAX_TRAIN_LIMIT = 64
# Seconds of ZeroGPU time requested per compare or inspect call.
GPU_DURATION_S = 60


def is_spaces(env: Optional[dict] = None) -> bool:
    """Return True when the app runs on Hugging Face Spaces (SPACE_ID is set and not empty)."""
    env = os.environ if env is None else env
    return bool(env.get("SPACE_ID"))


def check_spaces_limits(max_steps: Optional[int], train_limit: Optional[int]) -> None:
    """Raise ValueError unless a training run fits the Spaces limits."""
    if max_steps is None or max_steps > SPACES_MAX_STEPS:
        raise ValueError(
            f"max_steps={max_steps} is not allowed on Spaces: set max_steps between 1 and {SPACES_MAX_STEPS}, "
            "or run the app on your own machine for longer runs."
        )
    if train_limit is None or train_limit > SPACES_MAX_TRAIN_LIMIT:
        raise ValueError(
            f"train_limit={train_limit} is not allowed on Spaces: set train_limit between 1 and "
            f"{SPACES_MAX_TRAIN_LIMIT}, or run the app on your own machine for larger runs."
        )


def spaces_notice() -> str:
    """Markdown shown at the top of the app in Spaces mode."""
    return (
        f"**Spaces mode.** Training runs are limited to {SPACES_MAX_STEPS} steps on at most "
        f"{SPACES_MAX_TRAIN_LIMIT} training records. Finished runs are read-only here: stop, resume and "
        "evaluate are available when you run the app yourself (`python app.py`)."
    )


def spaces_package_available() -> bool:
    return importlib.util.find_spec("spaces") is not None


def gpu(fn: Callable, duration: int = GPU_DURATION_S) -> Callable:
    """Wrap `fn` in `spaces.GPU(duration=...)` where the `spaces` package is importable; else return `fn`."""
    if not spaces_package_available():
        return fn
    try:
        import spaces
    except ImportError as error:  # the package refuses to import after some gradio builds
        logger.warning("The spaces package is installed but failed to import (%s): running %s without ZeroGPU.", error, fn.__name__)
        return fn
    return spaces.GPU(duration=duration)(fn)
