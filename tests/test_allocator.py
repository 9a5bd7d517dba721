"""keep_freed_memory: page faults of repeated allocations, in fresh processes so the pytest process keeps glibc's defaults."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Allocates and frees a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) and its double,
# 12 times, and prints the minor page faults of each round.
PROBE = """
import json, resource, torch
from promptkd.allocator import keep_freed_memory
applied = keep_freed_memory()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20).fill_(1.0)
    y = x * 2
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")


def run_probe(setting: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PROMPTKD_KEEP_FREED_MEMORY=setting, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)


@linux_only
def test_kept_memory_stops_refaulting():
    glibc_defaults = run_probe("0")
    kept_memory = run_probe("1")
    assert glibc_defaults.returncode == 0, glibc_defaults.stderr
    assert kept_memory.returncode == 0, kept_memory.stderr
    default_result = json.loads(glibc_defaults.stdout)
    kept_result = json.loads(kept_memory.stdout)

    assert default_result["applied"] is False
    assert kept_result["applied"] is True
    # glibc's defaults map each 64 MiB block anew: 16,384 faults of 4 KiB pages per block.
    assert min(default_result["faults"]) >= 16384
    # Kept memory is reused once the heap has grown (alignment can still cost a round now and then).
    assert sum(kept_result["faults"][-4:]) < sum(default_result["faults"][-4:]) / 2


def test_invalid_setting_names_value_and_fix():
    result = run_probe("yes")
    assert result.returncode != 0
    assert "PROMPTKD_KEEP_FREED_MEMORY='yes' is invalid" in result.stderr
    assert "use 1" in result.stderr


@linux_only
def test_cli_applies_setting(tmp_path):
    # `promptkd runs` on an empty folder is the cheapest command, and neither setting may break it.
    for setting in ("1", "0"):
        env = dict(os.environ, PROMPTKD_KEEP_FREED_MEMORY=setting, PYTHONPATH=str(REPO))
        result = subprocess.run(
            [sys.executable, "-m", "promptkd", "runs", "--log-level", "DEBUG", "--root", str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        if setting == "1":
            assert "glibc malloc keeps freed memory" in result.stderr
        else:
            assert "PROMPTKD_KEEP_FREED_MEMORY=0" in result.stderr
