"""Process-wide glibc malloc settings that keep freed memory mapped for reuse.

On CPU, PyTorch allocates tensors with the C library's malloc. With glibc's defaults, blocks above the
mmap threshold (at most 32 MiB) are mapped for each allocation and unmapped on free, and free memory at
the top of the heap is returned to the kernel. A training step frees its activations and gradients, and
the next step allocates the same sizes again, so each step takes a page fault for every 4 KiB page
again. One example, measured on a 2-core virtual machine: a PromptKD step on 4 prompts of about 260
tokens (SmolLM2-135M-Instruct teacher, 20-layer student, float32) took about 424,000 such faults. With
the settings below it took none after the first steps. The cost is that the process keeps its peak
heap size until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

ENV_VAR = "PROMPTKD_KEEP_FREED_MEMORY"

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def _setting_enabled() -> bool:
    value = os.environ.get(ENV_VAR, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_VAR}={value!r} is invalid: use 1 (keep freed memory, the default) or 0 (glibc's defaults).")
    return value == "1"


def keep_freed_memory() -> bool:
    """Tell glibc to serve every allocation from the heap and never to trim it. Returns True when set.

    `mallopt(M_MMAP_MAX, 0)` stops mapping large blocks one by one and `mallopt(M_TRIM_THRESHOLD, -1)`
    stops returning the top of the heap. Allocations from other threads still use glibc's per-thread
    arenas, where large blocks are still mapped. Does nothing, and returns False, outside Linux with
    glibc or when PROMPTKD_KEEP_FREED_MEMORY=0. Raises ValueError for any other value of that variable.
    """
    global _applied
    if not _setting_enabled():
        logger.info("%s=0: glibc's malloc keeps its default settings.", ENV_VAR)
        return False
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("No mallopt in the C library (not glibc): malloc settings unchanged.")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success and 0 on error.
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, -1) != 1:
        logger.warning("glibc's mallopt rejected the settings that keep freed memory: each step may page-fault again.")
        return False
    _applied = True
    logger.debug("glibc malloc keeps freed memory for reuse (%s=0 turns this off).", ENV_VAR)
    return True
