"""Pieces shared by the benchmark sections: model pairs, prompt batches, timing, FLOPs and peak memory."""

from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from promptkd import data as dolly
from promptkd.models import decoder_layers, load_model, load_model_and_tokenizer
from promptkd.tokenizers import gpt2_tokenizer
from promptkd.training import BatchPlan

logger = logging.getLogger(__name__)

# Teacher and student of each preset pair, loaded with promptkd.models.load_model_and_tokenizer.
PRESET_PAIRS = {
    "tiny": ("tiny-llama", "tiny-llama:layers=first1"),
    "smollm2": ("smollm2-135m-instruct", "smollm2-135m-instruct:layers=default"),
}

# Randomly initialised GPT-2 shapes (n_layer, n_embd, n_head) with the real GPT-2 BPE.
# gpt2-reference: gpt2-large teacher and gpt2-medium student. gpt2-tiny runs the same code on CPU in tests.
GPT2_SHAPES = {
    "gpt2-reference": {"teacher": (36, 1280, 20), "student": (24, 1024, 16)},
    "gpt2-tiny": {"teacher": (2, 64, 4), "student": (1, 64, 4)},
}

SHAPES = tuple(PRESET_PAIRS) + tuple(GPT2_SHAPES)

# Dense bf16 tensor-core peak FLOP/s (NVIDIA's data sheet figures without sparsity), matched against
# torch.cuda.get_device_name(). The first matching key wins, so the more specific names come first.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
)


@dataclass
class ModelPair:
    """The frozen teacher, the student and their tokenizer, with the facts the report needs."""

    shapes: str
    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    teacher_name: str
    student_name: str

    def fresh_student(self) -> torch.nn.Module:
        """Return a copy of the initial student, so each benchmarked trainer updates its own weights."""
        return copy.deepcopy(self.student)

    def describe(self) -> dict:
        return {
            "shapes": self.shapes,
            "teacher": self.teacher_name,
            "student": self.student_name,
            "teacher_params": count_params(self.teacher),
            "student_params": count_params(self.student),
            "teacher_layers": len(decoder_layers(self.teacher)[1]),
            "student_layers": len(decoder_layers(self.student)[1]),
            "vocab_size": self.teacher.get_output_embeddings().weight.shape[0],
        }


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def _random_gpt2(tokenizer, shape: tuple[int, int, int], seed: int) -> torch.nn.Module:
    n_layer, n_embd, n_head = shape
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def load_pair(shapes: str, device: torch.device) -> ModelPair:
    """Load the teacher and student of `shapes` in float32 (mixed precision is applied by autocast)."""
    if shapes in PRESET_PAIRS:
        teacher_spec, student_spec = PRESET_PAIRS[shapes]
        teacher, tokenizer = load_model_and_tokenizer(teacher_spec)
        student = load_model(student_spec)
        teacher_name, student_name = teacher_spec, student_spec
    elif shapes in GPT2_SHAPES:
        tokenizer = gpt2_tokenizer()
        sizes = GPT2_SHAPES[shapes]
        teacher = _random_gpt2(tokenizer, sizes["teacher"], seed=0)
        student = _random_gpt2(tokenizer, sizes["student"], seed=1)
        teacher_name = "random GPT-2 n_layer={} n_embd={} n_head={}".format(*sizes["teacher"])
        student_name = "random GPT-2 n_layer={} n_embd={} n_head={}".format(*sizes["student"])
    else:
        raise ValueError(f"Unknown shapes {shapes!r}: choose one of {', '.join(SHAPES)}.")

    teacher.requires_grad_(False)
    teacher.eval().to(device)
    student.train().to(device)
    return ModelPair(shapes, teacher, student, tokenizer, teacher_name, student_name)


# Training prompts that the batches are drawn from: the first records of the shipped Dolly train split.
PROMPT_POOL = 512


def prompt_batches(tokenizer, batch_size: int, count: int, max_length: int, max_new_tokens: int, seed: int = 0) -> list[dict]:
    """Return the first `count` micro-batches that promptkd's trainer would form from the Dolly train prompts.

    They come from BatchPlan with length grouping (DistillConfig.group_by_length is on by default), so
    each batch contains prompts of similar length. Each is {"input_ids", "attention_mask"} of shape (B, T), left-padded.
    """
    records = dolly.load_split(dolly.SHIPPED_SOURCE, "train", limit=max(PROMPT_POOL, batch_size * count))
    max_prompt_tokens = max_length - max_new_tokens
    prompts = [{"input_ids": dolly.encode_prompt(r, tokenizer, "dolly", max_prompt_tokens)} for r in records]
    plan = BatchPlan(len(prompts), batch_size, seed=seed, lengths=[len(p["input_ids"]) for p in prompts])
    batches = []
    for counter in range(count):
        indices = plan.micro_batch(counter)
        batches.append(dolly.collate_left([prompts[i] for i in indices], tokenizer.pad_token_id))
    return batches


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), so two trainers sample the same responses from the same weights."""
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """Run fn() and return (result, seconds), waiting for queued GPU work before and after."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def spread(values: list[float]) -> Optional[dict]:
    """Median, minimum and maximum of repeated measurements."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ----- FLOPs and MFU -----------------------------------------------------------------------------


def body_params(model: torch.nn.Module) -> int:
    """Parameters of the decoder layers, whose matmuls run on every position (embeddings and head excluded)."""
    return sum(p.numel() for p in decoder_layers(model)[1].parameters())


def head_flops_per_position(model: torch.nn.Module) -> int:
    weight = model.get_output_embeddings().weight  # (V, D)
    return 2 * weight.shape[0] * weight.shape[1]


def forward_flops(model: torch.nn.Module, positions: int, head_positions: int) -> float:
    """Matmul FLOPs of one forward pass: 2 * body params per position plus the output head where it runs.

    Attention score FLOPs (quadratic in length) are left out; they are small next to the matmuls for
    sequences of a few hundred tokens.
    """
    return 2.0 * body_params(model) * positions + head_flops_per_position(model) * head_positions


def generation_flops(model: torch.nn.Module, batch_size: int, prompt_length: int, new_tokens: int) -> float:
    """FLOPs of KV-cached generation: the body over prompt and new positions, the head once per new token."""
    positions = batch_size * (prompt_length + max(new_tokens - 1, 0))
    return 2.0 * body_params(model) * positions + head_flops_per_position(model) * batch_size * new_tokens


def peak_flops(device: torch.device, dtype: str, override: Optional[float]) -> tuple[Optional[float], str]:
    """Return (peak FLOP/s, source) for MFU, or (None, reason) where no peak is known."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak FLOP/s is known for CPUs; pass --peak-tflops to set one"
    if dtype != "bf16":
        return None, "the peak table holds bf16 tensor-core numbers only; run with --dtype bf16"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value, f"dense bf16 peak of {key} (NVIDIA data sheet)"
    return None, f"{name} is not in the peak table; pass --peak-tflops"


# ----- peak memory --------------------------------------------------------------------------------


def peak_memory_bytes(fn: Callable, device: torch.device) -> int:
    """Peak bytes of tensor memory that fn() allocates above what is allocated when it starts.

    On CUDA this reads torch.cuda.max_memory_allocated. On CPU, torch.profiler with profile_memory=True
    records every allocation and free of the CPU allocator, and the peak is the maximum running sum.
    Memory that fn() keeps after it returns counts while it is live.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    live, peak = 0, 0
    for event in events:
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


# ----- machine --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    """CPU, GPU, library versions and the load average when the run started."""
    import accelerate
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "trl": trl_version,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info
