"""Pieces shared by the SFT and distillation loops: accelerator, batching, schedule, checkpoints."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from transformers import get_linear_schedule_with_warmup

from promptkd.config import ConfigError
from promptkd.runs import (
    CHECKPOINT_DIR,
    MODEL_DIR,
    Run,
    RunError,
    StopRequest,
    atomic_write_dir,
    atomic_write_text,
    existing_dir,
)

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
# Test-only switch: with PROMPTKD_DEBUG_CHECKSUMS=1 every process writes checksum_rank<r>.txt into the run
# folder when it saves the final model, so a test can check that all processes hold the same weights.
DEBUG_CHECKSUMS_ENV = "PROMPTKD_DEBUG_CHECKSUMS"
# Sharding backends need the models wrapped by accelerator.prepare, which the loops do not do.
UNSUPPORTED_DISTRIBUTED_TYPES = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(config) -> Accelerator:
    """Accelerator for this run; gradient accumulation is done by the loops themselves.

    A multi-process launch (WORLD_SIZE > 1) on a machine without an accelerator device runs on the CPU with
    the gloo backend. Without cpu=True, accelerate would start every process as its own single-process run.
    """
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = multi_process and not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision), cpu=cpu)
    # NOTE: untested, because the project's CPU-only test machines cannot start DeepSpeed or FSDP runs.
    if accelerator.distributed_type in UNSUPPORTED_DISTRIBUTED_TYPES:
        raise ConfigError(
            f"accelerate distributed_type={accelerator.distributed_type.value} is not supported: promptkd calls the "
            "models directly and averages gradients itself, so DeepSpeed, FSDP and Megatron-LM would not shard "
            "anything. Launch with a plain multi-GPU config (configs/accelerate/multi_gpu.yaml) instead."
        )
    return accelerator


def agree_run_name(config, command: str, accelerator: Accelerator) -> None:
    """Make every process use the main process's run name (a generated name contains a timestamp)."""
    if config.run_name is None and accelerator.is_main_process:
        from datetime import datetime, timezone

        config.run_name = f"{command}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    names = [config.run_name]
    if accelerator.num_processes > 1:
        broadcast_object_list(names, from_process=0)
    config.run_name = names[0]


def create_run(config, command: str, accelerator: Accelerator) -> Run:
    """Create the run folder (or reopen it with config.resume) on the main process, then open it everywhere.

    Only the main process checks the folder: a check on another process could read the status the main
    process has just written and reject the run as already existing or still running.
    """
    agree_run_name(config, command, accelerator)
    if accelerator.num_processes == 1:
        return Run.create(config, command)

    run, main_error = None, None
    outcome = [None, None]  # [error message, run id], sent from the main process
    if accelerator.is_main_process:
        try:
            run = Run.create(config, command, is_main=True)
            outcome = [None, run.run_id]
        except Exception as error:
            main_error = error
            outcome = [f"{type(error).__name__}: {error}", None]
    broadcast_object_list(outcome, from_process=0)
    if main_error is not None:
        raise main_error
    if outcome[0] is not None:
        raise RunError(f"The main process could not create the run folder: {outcome[0]}")
    if run is None:
        run = Run(config.runs_root / config.run_name, command, outcome[1], is_main=False)
    return run


def any_process(flag: bool, accelerator: Accelerator) -> bool:
    """Return True on every process when `flag` is True on any of them.

    A stop signal can reach the processes between different steps; agreeing on it keeps them in step.
    """
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(count.item() > 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class BatchPlan:
    """Deterministic micro-batch order: a seeded permutation per epoch, sharded across processes.

    Every process takes `batch_size` items of each global micro-batch of `batch_size * num_processes`.
    The last global micro-batch of an epoch is filled up from the start of the same permutation, so every
    process sees the same number of micro-batches. With `lengths`, items are grouped by length: the
    permutation is cut into windows of GROUP_WINDOW global micro-batches, each window is sorted by length
    and cut into micro-batches, and the micro-batches are shuffled, so little padding is computed.
    """

    num_items: int
    batch_size: int
    num_processes: int = 1
    process_index: int = 0
    seed: int = 0
    lengths: Optional[list] = None

    GROUP_WINDOW = 32

    def __post_init__(self):
        self._cached_epoch: Optional[int] = None
        self._cached_order: list[int] = []

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.num_items / self.global_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """Item indices of one epoch, padded to whole global micro-batches."""
        if self._cached_epoch == epoch:
            return self._cached_order
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        padded_size = self.micro_batches_per_epoch * self.global_batch_size
        order = [order[i % self.num_items] for i in range(padded_size)]
        if self.lengths is not None:
            window = self.GROUP_WINDOW * self.global_batch_size
            batches = []
            for start in range(0, padded_size, window):
                chunk = sorted(order[start : start + window], key=lambda i: self.lengths[i])
                batches += [chunk[i : i + self.global_batch_size] for i in range(0, len(chunk), self.global_batch_size)]
            shuffled = torch.randperm(len(batches), generator=generator).tolist()
            order = [index for b in shuffled for index in batches[b]]
        self._cached_epoch, self._cached_order = epoch, order
        return order

    def micro_batch(self, counter: int) -> list[int]:
        """Indices of this process's items in global micro-batch number `counter` (0-based, across epochs)."""
        epoch, position = divmod(counter, self.micro_batches_per_epoch)
        order = self.epoch_order(epoch)
        start = position * self.global_batch_size + self.process_index * self.batch_size
        return order[start : start + self.batch_size]


def total_optimizer_steps(config, plan: BatchPlan) -> int:
    if config.max_steps is not None:
        return config.max_steps
    steps_per_epoch = math.ceil(plan.micro_batches_per_epoch / config.gradient_accumulation_steps)
    return max(1, math.ceil(steps_per_epoch * config.num_epochs))


# Devices with a fused (single-kernel) AdamW in torch. On 2 CPU cores it updated 99 M parameters in
# 0.06-0.08 s against 0.40-0.48 s for the default multi-tensor AdamW.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(params, learning_rate: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW with a linear warmup and decay, fused where every parameter is a float tensor on a supported device."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)
    warmup_steps = int(round(warmup_ratio * total_steps))
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return optimizer, scheduler


def average_gradients(parameters, accelerator: Accelerator) -> None:
    """Average gradients over processes. The loops call models directly (no DDP wrapper), so they sync here."""
    if accelerator.num_processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


def clip_and_norm(parameters, max_norm: float) -> float:
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
    return float(norm)


def grads_finite(parameters) -> bool:
    return all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None)


@dataclass
class LoopState:
    """Counters saved with every checkpoint."""

    step: int = 0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    elapsed_s: float = 0.0
    extra: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run: Run,
    accelerator: Accelerator,
    model,
    tokenizer,
    optimizers: dict,
    schedulers: dict,
    loop: LoopState,
    extra_tensors: Optional[dict] = None,
) -> None:
    """Write `<run>/checkpoint/` atomically: model/, optional safetensors files and the trainer state."""
    rng_states = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if accelerator.is_main_process:
        state = {
            "loop": loop.__dict__,
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
            "rng": rng_states,
        }

        def write(folder: Path) -> None:
            save_model(model, tokenizer, folder / MODEL_DIR)
            for filename, tensors in (extra_tensors or {}).items():
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / filename))
            torch.save(state, folder / TRAINER_STATE)

        atomic_write_dir(run.path / CHECKPOINT_DIR, write)
        logger.info("Saved checkpoint at step %d to %s", loop.step, run.path / CHECKPOINT_DIR)
    accelerator.wait_for_everyone()


def load_trainer_state(run: Run, accelerator: Accelerator) -> Optional[dict]:
    folder = existing_dir(run.path / CHECKPOINT_DIR)
    if folder is None or not (folder / TRAINER_STATE).is_file():
        return None
    state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)
    state["folder"] = folder
    return state


def restore_trainer_state(state: dict, accelerator: Accelerator, optimizers: dict, schedulers: dict) -> LoopState:
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(state["schedulers"][name])
    rng = state["rng"]
    set_rng_state(rng[min(accelerator.process_index, len(rng) - 1)])
    return LoopState(**state["loop"])


def save_model(model, tokenizer, folder: Path) -> None:
    """save_pretrained as safetensors plus the tokenizer, so plain from_pretrained loads the folder."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_final_model(run: Run, accelerator: Accelerator, model, tokenizer, extra_tensors: Optional[dict] = None) -> None:
    if accelerator.is_main_process:
        atomic_write_dir(run.path / MODEL_DIR, lambda folder: save_model(model, tokenizer, folder))
        for filename, tensors in (extra_tensors or {}).items():
            from safetensors.torch import save_file

            tmp = run.path / f".{filename}.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            tmp.replace(run.path / filename)
    if os.environ.get(DEBUG_CHECKSUMS_ENV) == "1":
        checksum = parameter_checksum(model, extra_tensors)
        atomic_write_text(run.path / f"checksum_rank{accelerator.process_index}.txt", checksum + "\n")
    accelerator.wait_for_everyone()


def parameter_checksum(model, extra_tensors: Optional[dict] = None) -> str:
    """SHA-256 of the model's parameters and the extra tensors, over names and raw bytes in name order."""
    tensors = dict(model.named_parameters())
    for filename, group in (extra_tensors or {}).items():
        tensors.update({f"{filename}:{name}": tensor for name, tensor in group.items()})
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode("utf-8"))
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_error(error: BaseException) -> str:
    """Return a one-line error for status.json, with a hint for out-of-memory errors."""
    text = f"{type(error).__name__}: {error}".strip()
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower():
        text += " (out of memory: lower per_device_batch_size or max_length, or use mixed_precision=bf16)"
    return text[:2000]


def iterate_steps(start_step: int, total_steps: int, disable: bool = False) -> Iterator[int]:
    from tqdm.auto import tqdm

    with tqdm(total=total_steps, initial=start_step, desc="steps", disable=disable, dynamic_ncols=True) as bar:
        for step in range(start_step, total_steps):
            yield step
            bar.update(1)


def run_with_status(config, command: str, train: Callable) -> Run:
    """Create the run folder, call train(config, accelerator, run, stop) and record how it ended.

    SIGINT/SIGTERM become a stop request that `train` honours after a step. An exception that escapes
    `train` marks a still-running run 'failed' (or 'stopped' for KeyboardInterrupt) with the error.
    """
    config.validate()
    accelerator = make_accelerator(config)
    run = create_run(config, command, accelerator)
    logger.info("%s run %s in %s", command, run.run_id, run.path)
    try:
        with StopRequest() as stop:
            train(config, accelerator, run, stop)
        return run
    except BaseException as error:
        if run.status.get("state") == "running":
            state = "stopped" if isinstance(error, KeyboardInterrupt) else "failed"
            run.set_status(state, error=describe_error(error))
            logger.error("Run %s %s: %s", run.run_id, state, describe_error(error))
        raise
    finally:
        run.close()


def record_step_outcome(loop: LoopState, finite: bool, max_nonfinite_steps: int, hint: str) -> None:
    """Count a skipped (non-finite) update; raise FloatingPointError after too many in a row."""
    if finite:
        loop.nonfinite_in_row = 0
        return
    loop.nonfinite_in_row += 1
    loop.nonfinite_total += 1
    logger.warning("Step %d: non-finite loss or gradient, update skipped (%d in a row)", loop.step, loop.nonfinite_in_row)
    if loop.nonfinite_in_row >= max_nonfinite_steps:
        raise FloatingPointError(
            f"{loop.nonfinite_in_row} non-finite losses in a row up to step {loop.step}: stopping. {hint}"
        )


def should_pause(config, loop: LoopState, stop: StopRequest, accelerator: Accelerator) -> bool:
    """True when a stop signal reached any process or stop_after_steps is reached."""
    requested = any_process(stop.requested, accelerator)
    return requested or (config.stop_after_steps is not None and loop.step >= config.stop_after_steps)


def finish_run(run: Run, accelerator: Accelerator, loop: LoopState, total_steps: int, state: str, stop: StopRequest) -> None:
    """Mark the run completed or stopped; a completed run no longer needs its resumable checkpoint."""
    if state == "completed" and accelerator.is_main_process and (run.path / CHECKPOINT_DIR).exists():
        shutil.rmtree(run.path / CHECKPOINT_DIR, ignore_errors=True)
        logger.info("Removed the resumable checkpoint %s: the final model is in %s", run.path / CHECKPOINT_DIR, run.path)
    error = f"stopped at step {loop.step} ({stop.signal_name or 'stop_after_steps'})" if state == "stopped" else None
    run.set_status(state, step=loop.step, elapsed_s=loop.elapsed_s, error=error)
    logger.info("Run %s %s at step %d/%d after %.1f s", run.run_id, state, loop.step, total_steps, loop.elapsed_s)
