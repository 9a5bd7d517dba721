"""Peak memory of the distillation loss: promptkd's kd_loss on response-only logits against full-sequence losses.

Each variant creates float32 logits as a model head would return them, computes the loss and runs its
backward, so the peak covers the logits of both models, the loss's intermediates and the gradient of the
student logits. The inputs are random: the memory of these ops does not depend on the values.

Variants:
  promptkd: losses.kd_loss (strategy baseline, forward KL) on (B, R, V) response logits.
  naive: float32 log_softmax of both models over the full (B, T, V) sequence, then the KL on response positions.
  trl_gkd: TRL's GKDTrainer.generalized_jsd_loss with beta=0 (forward KL) on the full sequence, when trl is installed.

On CPU the peak comes from torch.profiler's allocation records in this process, on CUDA from
torch.cuda.max_memory_allocated. On CPU, `--rss-check` repeats each variant in a fresh subprocess and
reads the growth of its peak RSS (VmHWM), a check that does not rely on the profiler.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import peak_memory_bytes
from promptkd.losses import StepContext, kd_loss

logger = logging.getLogger(__name__)

VARIANTS = ("promptkd", "naive", "trl_gkd")


CPU = torch.device("cpu")


def _response_mask(batch_size: int, length: int, response_length: int, device: torch.device) -> torch.Tensor:
    """(B, T - 1) mask of the shifted positions whose logits predict the last `response_length` tokens."""
    mask = torch.zeros(batch_size, length - 1, device=device)
    mask[:, length - 1 - response_length :] = 1.0
    return mask


def promptkd_loss(batch_size: int, length: int, response_length: int, vocab_size: int, device: torch.device = CPU) -> None:
    student = torch.randn(batch_size, response_length, vocab_size, device=device, requires_grad=True)  # (B, R, V)
    teacher = torch.randn(batch_size, response_length, vocab_size, device=device)
    mask = torch.ones(batch_size, response_length, device=device)
    output = kd_loss(student, teacher, mask, StepContext())
    output.loss.backward()


def naive_loss(batch_size: int, length: int, response_length: int, vocab_size: int, device: torch.device = CPU) -> None:
    student = torch.randn(batch_size, length, vocab_size, device=device, requires_grad=True)  # (B, T, V)
    teacher = torch.randn(batch_size, length, vocab_size, device=device)
    student_log_probs = F.log_softmax(student[:, :-1].float(), dim=-1)
    teacher_log_probs = F.log_softmax(teacher[:, :-1].float(), dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(dim=-1)  # (B, T - 1)
    mask = _response_mask(batch_size, length, response_length, device)
    loss = (kl * mask).sum() / mask.sum()
    loss.backward()


def trl_gkd_loss(batch_size: int, length: int, response_length: int, vocab_size: int, device: torch.device = CPU) -> None:
    from trl.experimental.gkd import GKDTrainer

    student = torch.randn(batch_size, length, vocab_size, device=device, requires_grad=True)
    teacher = torch.randn(batch_size, length, vocab_size, device=device)
    labels = torch.full((batch_size, length - 1), -100, dtype=torch.long, device=device)
    labels[_response_mask(batch_size, length, response_length, device).bool()] = 1
    # The slices match GKDTrainer.compute_loss, which shifts logits and labels by one position.
    loss = GKDTrainer.generalized_jsd_loss(student[:, :-1, :], teacher[:, :-1, :], labels=labels, beta=0.0)
    loss.backward()


LOSSES: dict[str, Callable[..., None]] = {
    "promptkd": promptkd_loss,
    "naive": naive_loss,
    "trl_gkd": trl_gkd_loss,
}


def logits_bytes(variant: str, batch_size: int, length: int, response_length: int, vocab_size: int) -> int:
    """Bytes of the float32 logits of both models that the variant starts from."""
    positions = response_length if variant == "promptkd" else length
    return 2 * batch_size * positions * vocab_size * 4


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="utf-8") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _disable_transparent_huge_pages() -> None:
    """Ask Linux not to back this process with 2 MiB pages, which would round the RSS of large tensors up."""
    import ctypes

    PR_SET_THP_DISABLE = 41
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    except (OSError, AttributeError) as error:
        logger.warning("Could not disable transparent huge pages (%s): the RSS check may read high.", error)


def _peak_rss_bytes() -> int:
    """VmHWM of /proc/self/status: the peak RSS of this process image.

    getrusage's ru_maxrss is not used because Linux carries it over from the parent across fork and exec,
    so a probe started by a large benchmark process would report the parent's size.
    """
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the line is in kB
    raise RuntimeError("VmHWM not found in /proc/self/status: the RSS check needs Linux.")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux 4.0+); without it the peak of the warm-up stays."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear_refs:
            clear_refs.write("5")
    except OSError as error:
        logger.warning("Could not reset the peak RSS (%s): the RSS check may read high.", error)


def _probe(variant: str, batch_size: int, length: int, response_length: int, vocab_size: int) -> dict:
    """Run one variant in this (fresh) process and return the growth of its peak RSS."""
    _disable_transparent_huge_pages()
    LOSSES[variant](1, 8, 2, 16)  # load lazily initialised code paths before the baseline is read
    _reset_peak_rss()
    before = _rss_bytes()
    LOSSES[variant](batch_size, length, response_length, vocab_size)
    return {"variant": variant, "rss_peak_growth_bytes": _peak_rss_bytes() - before}


def rss_check(variant: str, shape: dict) -> dict:
    """Run `_probe` in a subprocess with glibc's mmap threshold fixed at 64 KiB, so freed tensors leave the RSS."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "benchmarks.memory", "--probe", variant,
        "--batch-size", str(shape["batch_size"]), "--length", str(shape["length"]),
        "--response-length", str(shape["response_length"]), "--vocab-size", str(shape["vocab_size"]),
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    completed = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"Memory probe {variant} failed with exit code {completed.returncode}: {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_memory_section(
    batch_size: int, length: int, response_length: int, vocab_size: int, with_trl: bool, with_rss: bool, device: torch.device = CPU
) -> dict:
    """Peak memory of each loss variant on one shape; ratios are relative to the naive variant.

    The RSS check runs on CPU only, so `with_rss` is ignored for another device.
    """
    shape = {"batch_size": batch_size, "length": length, "response_length": response_length, "vocab_size": vocab_size}
    variants = [v for v in VARIANTS if v != "trl_gkd" or with_trl]
    with_rss = with_rss and device.type == "cpu"
    results = {}
    for variant in variants:
        LOSSES[variant](1, 8, 2, 16, device)  # warm-up outside the measurement
        peak = peak_memory_bytes(lambda: LOSSES[variant](batch_size, length, response_length, vocab_size, device), device)
        inputs = logits_bytes(variant, batch_size, length, response_length, vocab_size)
        results[variant] = {"peak_bytes": peak, "logits_bytes": inputs, "loss_working_bytes": peak - inputs}
        if with_rss:
            results[variant]["rss_peak_growth_bytes"] = rss_check(variant, shape)["rss_peak_growth_bytes"]

    naive = results["naive"]
    for variant, values in results.items():
        values["peak_vs_naive"] = values["peak_bytes"] / naive["peak_bytes"]
        if with_rss:
            values["rss_vs_naive"] = values["rss_peak_growth_bytes"] / naive["rss_peak_growth_bytes"]
    return {"shape": shape, "dtype": "fp32", "device": str(device), "variants": results}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one loss variant and print the growth of its peak RSS (VmHWM) as JSON.")
    parser.add_argument("--probe", choices=VARIANTS, required=True, help="Loss variant to run.")
    parser.add_argument("--batch-size", type=int, required=True, help="Sequences in the batch (B).")
    parser.add_argument("--length", type=int, required=True, help="Prompt plus response tokens (T).")
    parser.add_argument("--response-length", type=int, required=True, help="Response tokens (R).")
    parser.add_argument("--vocab-size", type=int, required=True, help="Vocabulary size (V).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(_probe(args.probe, args.batch_size, args.length, args.response_length, args.vocab_size)))


if __name__ == "__main__":
    main()
