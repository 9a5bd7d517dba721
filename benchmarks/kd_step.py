"""On-policy KD step throughput: promptkd's Distiller.step against TRL's GKDTrainer, and step overhead.

Every round uses one prompt batch for all trainers. TRL runs its own `Trainer.train()` loop.
promptkd's steps and the separately timed model passes run inside that loop, before TRL's step in
odd rounds and after it in even rounds, so slow phases of a shared machine hit all of them alike.
TRL's step time runs from `on_step_begin` to `on_step_end` of a TrainerCallback, minus the
promptkd work done inside that window. Each trainer updates its own copy of the student, and all
of them sample with the same seed in a round.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from benchmarks.common import (
    ModelPair,
    forward_flops,
    generation_flops,
    median,
    peak_flops,
    peak_memory_bytes,
    prompt_batches,
    seed_all,
    spread,
    timed,
    to_device,
)
from promptkd.config import DistillConfig
from promptkd.distill import Distiller, response_logits, sample_rollout, teacher_response_logits
from promptkd.soft_prompt import SoftPrompt
from promptkd.training import make_accelerator

logger = logging.getLogger(__name__)

VARIANTS = ("promptkd_baseline", "promptkd_full")
PASSES = (
    "generation",
    "teacher_forward",
    "prompted_teacher_forward_backward",
    "prompted_teacher_forward",
    "student_forward_backward",
)
# The model passes a step cannot avoid: with prompt tuning off only the student's generation, one
# unprompted teacher forward and the student's forward and backward remain.
BASELINE_PASSES = ("generation", "teacher_forward", "student_forward_backward")


@dataclass
class KDSettings:
    """Batch, lengths, rounds and precision of the KD step section."""

    batch_size: int = 4
    max_new_tokens: int = 32
    max_length: int = 512
    warmup: int = 1
    repeats: int = 5
    dtype: str = "fp32"
    learning_rate: float = 1e-5
    seed: int = 1234
    peak_tflops: Optional[float] = None


def distill_config(pair: ModelPair, settings: KDSettings, prompt_tuning: bool) -> DistillConfig:
    return DistillConfig(
        teacher=pair.teacher_name,
        student=pair.student_name,
        per_device_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        max_length=settings.max_length,
        max_new_tokens=settings.max_new_tokens,
        sampling_temperature=1.0,
        strategy="baseline",
        kl_direction="forward",
        kl_scale=1.0,
        prompt_tuning=prompt_tuning,
        learning_rate=settings.learning_rate,
        mixed_precision="bf16" if settings.dtype == "bf16" else "no",
    )


def make_distiller(pair: ModelPair, settings: KDSettings, student, prompt_tuning: bool, total_steps: int) -> Distiller:
    config = distill_config(pair, settings, prompt_tuning)
    accelerator = make_accelerator(config)
    soft_prompt = SoftPrompt.from_text(pair.teacher, pair.tokenizer, config.soft_prompt_init, config.soft_prompt_length)
    soft_prompt.to(next(pair.teacher.parameters()).device)
    return Distiller(config, accelerator, pair.teacher, student, pair.tokenizer, soft_prompt, total_steps)


# ----- the model passes of one step, timed one by one ---------------------------------------------------


def _backward(output: torch.Tensor) -> None:
    # A fixed small upstream gradient, so the backward pass runs without a loss in front of it.
    output.backward(torch.full_like(output, 1e-6))


def _sample(distiller: Distiller, batch: dict):
    """Sample the student's pseudo-targets as Distiller.step does, in the run's autocast precision."""
    with distiller.accelerator.autocast():
        return sample_rollout(distiller.student, distiller.tokenizer, batch, distiller.config)


def time_model_passes(distiller: Distiller, batch: dict, seed: int, device: torch.device) -> dict:
    """Time the passes a PromptKD step cannot avoid, on one batch; returns seconds per pass and the rollout shape."""
    accelerator = distiller.accelerator
    teacher, student, soft_prompt = distiller.teacher, distiller.student, distiller.soft_prompt
    seconds = {}

    seed_all(seed)
    rollout, seconds["generation"] = timed(lambda: _sample(distiller, batch), device)

    with accelerator.autocast(), torch.no_grad():
        _, seconds["teacher_forward"] = timed(lambda: teacher_response_logits(teacher, rollout, None), device)
        _, seconds["prompted_teacher_forward"] = timed(lambda: teacher_response_logits(teacher, rollout, soft_prompt), device)

    with accelerator.autocast():
        prompted, forward_s = timed(lambda: teacher_response_logits(teacher, rollout, soft_prompt), device)
    _, backward_s = timed(lambda: _backward(prompted), device)
    seconds["prompted_teacher_forward_backward"] = forward_s + backward_s
    del prompted

    with accelerator.autocast():
        student_logits, forward_s = timed(lambda: response_logits(student, rollout), device)
    _, backward_s = timed(lambda: _backward(student_logits), device)
    seconds["student_forward_backward"] = forward_s + backward_s
    del student_logits

    soft_prompt.zero_grad(set_to_none=True)
    student.zero_grad(set_to_none=True)
    batch_size, total_length = rollout.input_ids.shape
    return {
        "seconds": seconds,
        "batch_size": batch_size,
        "prompt_length": total_length - rollout.response_length,
        "response_length": rollout.response_length,
        "response_tokens": rollout.num_tokens,
    }


def pass_flops(distiller: Distiller, batch_size: int, prompt_length: int, response_length: int) -> dict:
    """Model FLOPs of each pass: 2 per parameter and position forward, 4 for the teacher's forward and backward
    (its weights are frozen, so the backward computes input gradients only) and 6 for the student's."""
    teacher, student = distiller.teacher, distiller.student
    total = prompt_length + response_length
    head_positions = batch_size * (response_length + 1)  # logits_to_keep = R + 1 per row
    prompt_vectors = distiller.soft_prompt.length
    teacher_forward = forward_flops(teacher, batch_size * total, head_positions)
    prompted_forward = forward_flops(teacher, batch_size * (total + prompt_vectors), head_positions)
    return {
        "generation": generation_flops(student, batch_size, prompt_length, response_length),
        "teacher_forward": teacher_forward,
        "prompted_teacher_forward": prompted_forward,
        "prompted_teacher_forward_backward": 2 * prompted_forward,
        "student_forward_backward": 3 * forward_flops(student, batch_size * total, head_positions),
    }


# ----- one round of promptkd work ------------------------------------------------------------------------


class PromptKDRounds:
    """promptkd's two distillers, with the step and model pass times recorded for each round's batch."""

    def __init__(self, pair: ModelPair, settings: KDSettings, device: torch.device, total_rounds: int):
        self.settings = settings
        self.device = device
        # Each gets its own copy of the student, so pair.student keeps its initial weights.
        self.distillers = {
            "promptkd_baseline": make_distiller(pair, settings, pair.fresh_student(), False, total_rounds),
            "promptkd_full": make_distiller(pair, settings, pair.fresh_student(), True, total_rounds),
        }
        self.records: dict[int, dict] = {}

    def run(self, round_index: int, batch: dict) -> float:
        """Run both promptkd steps and the timed passes on `batch`; returns the seconds spent."""
        started = time.perf_counter()
        seed = self.settings.seed + round_index
        record = self.records.setdefault(round_index, {})
        order = VARIANTS if round_index % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            seed_all(seed)
            (metrics, finite), seconds = timed(lambda: self.distillers[name].step([batch], round_index), self.device)
            record[name] = {"seconds": seconds, "response_tokens": int(metrics["response_tokens"]), "finite": finite}
        record["passes"] = time_model_passes(self.distillers["promptkd_full"], batch, seed, self.device)
        record["prompt_width"] = int(batch["input_ids"].shape[1])
        return time.perf_counter() - started


# ----- TRL ---------------------------------------------------------------------------------------------------


def trl_available() -> bool:
    try:
        import trl.experimental.gkd  # noqa: F401
    except ImportError:
        return False
    return True


def _trl_collator(pad_token_id: int) -> Callable[[list[dict]], dict]:
    from promptkd.data import collate_left

    def collate(examples: list[dict]) -> dict:
        batch = collate_left([{"input_ids": e["prompt_ids"]} for e in examples], pad_token_id)
        # No "labels": with lmbda=1 GKDTrainer replaces input_ids, attention_mask and labels by the student's
        # sample, and without labels the Trainer passes no token count, so the loss is a mean over sampled tokens.
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "prompts": batch["input_ids"],
            "prompt_attention_mask": batch["attention_mask"],
        }

    return collate


def run_with_trl(pair: ModelPair, settings: KDSettings, device: torch.device, batches: list[dict], rounds: PromptKDRounds) -> dict:
    """Train with GKDTrainer for len(batches) steps and run the promptkd rounds inside its loop."""
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    state = {"round": 0, "promptkd_s": 0.0, "started": 0.0}
    trl_records: dict[int, dict] = {}

    class RecordingGKDTrainer(GKDTrainer):
        """GKDTrainer that counts the sampled response tokens of each step and runs promptkd's round around it."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            round_index = state["round"]
            # The prompts of this step: accelerate's data loader fetches one batch ahead, so the batch
            # is read here and not in a callback.
            batch = {"input_ids": inputs["prompts"], "attention_mask": inputs["prompt_attention_mask"]}
            if round_index % 2 == 1:
                state["promptkd_s"] += rounds.run(round_index, to_device(batch, device))
            seed_all(settings.seed + round_index)
            loss = super().training_step(model, inputs, num_items_in_batch)
            trl_records[round_index] = {"response_tokens": int((inputs["labels"] != -100).sum())}
            if round_index % 2 == 0:
                state["promptkd_s"] += rounds.run(round_index, to_device(batch, device))
            return loss

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, trainer_state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            state["promptkd_s"] = 0.0
            state["started"] = time.perf_counter()

        def on_step_end(self, args, trainer_state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - state["started"] - state["promptkd_s"]
            record = trl_records[state["round"]]
            record["seconds"] = elapsed
            if device.type == "cuda":
                # NOTE: on CUDA the peak also covers the promptkd work inside the window.
                record["peak_memory_bytes_with_promptkd"] = torch.cuda.max_memory_allocated(device)
            state["round"] += 1

    flat_prompts = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            flat_prompts.append({"prompt_ids": ids[mask.bool()].tolist()})
    config = distill_config(pair, settings, prompt_tuning=False)
    with tempfile.TemporaryDirectory(prefix="trl-gkd-") as output_dir:
        args = GKDConfig(
            output_dir=output_dir,
            per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=1,
            max_steps=len(batches),
            learning_rate=settings.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=int(round(config.warmup_ratio * len(batches))),  # as promptkd's make_optimizer
            lr_scheduler_type="linear",
            max_grad_norm=config.max_grad_norm,
            optim="adamw_torch_fused",  # the default of transformers, and the AdamW kernel promptkd uses on CPU and CUDA
            # TRL's SFTConfig turns activation (gradient) checkpointing on by default, and GKDTrainer then samples
            # without the KV cache. promptkd uses neither, so it is off here.
            activation_checkpointing=False,
            lmbda=1.0,  # always train on the student's own samples
            beta=0.0,  # generalized JSD with beta=0 is the forward KL(teacher || student)
            temperature=1.0,
            max_new_tokens=settings.max_new_tokens,
            bf16=settings.dtype == "bf16",
            use_cpu=device.type == "cpu",
            seed=settings.seed,
            data_seed=settings.seed,
            report_to="none",
            logging_steps=10**6,
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",  # the dataset is already in promptkd's batch order
        )
        # With mixed precision, accelerate wraps the teacher's forward in autocast and an fp32 output cast. That
        # would also change promptkd's teacher calls, so TRL then gets its own copy. In fp32 it shares the teacher.
        teacher = copy.deepcopy(pair.teacher) if settings.dtype != "fp32" else pair.teacher
        trainer = RecordingGKDTrainer(
            model=pair.fresh_student(),
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(flat_prompts),
            processing_class=pair.tokenizer,
            data_collator=_trl_collator(pair.tokenizer.pad_token_id),
            callbacks=[StepTimer()],
        )
        trainer.train()
        trl_details = {
            "generation_kwargs": dict(trainer.generation_kwargs),
            "eos_token_id": trainer.generation_config.eos_token_id,
            "activation_checkpointing": bool(trainer.model.is_activation_checkpointing),
        }
        del trainer
    return {"records": trl_records, "details": trl_details}


# ----- the section ---------------------------------------------------------------------------------------------


def _summarize(rounds: list[dict], with_trl: bool) -> dict:
    """Per-round spreads and paired per-round ratios, plus totals over all timed rounds.

    The totals (all response tokens over all seconds) are the training throughput over the batches. They
    weight each round by its time, so the rounds with long prompts count most.
    """
    names = (("trl_gkd",) if with_trl else ()) + VARIANTS
    summary: dict = {"variants": {}}
    for name in names:
        seconds = [r[name]["seconds"] for r in rounds]
        tokens = [r[name]["response_tokens"] for r in rounds]
        summary["variants"][name] = {
            "seconds": spread(seconds),
            "tokens_per_s": spread([t / s for t, s in zip(tokens, seconds)]),
            "response_tokens": spread(tokens),
            "total_tokens_per_s": sum(tokens) / sum(seconds),
        }

    def tokens_per_s(record: dict) -> float:
        return record["response_tokens"] / record["seconds"]

    if with_trl:
        trl_total = summary["variants"]["trl_gkd"]["total_tokens_per_s"]
        for name in VARIANTS:
            ratios = [tokens_per_s(r[name]) / tokens_per_s(r["trl_gkd"]) for r in rounds]
            summary[f"{name}_vs_trl"] = spread(ratios)
            summary[f"{name}_vs_trl_total"] = summary["variants"][name]["total_tokens_per_s"] / trl_total
        # The ceiling of the speed-up over TRL for a step made of the model passes it cannot avoid (sampling,
        # teacher forward, student forward + backward), each as fast as when timed alone, with no other work.
        passes_only = [
            {"response_tokens": r["passes"]["response_tokens"], "seconds": sum(r["passes"]["seconds"][p] for p in BASELINE_PASSES)}
            for r in rounds
        ]
        summary["passes_only_vs_trl"] = spread([tokens_per_s(p) / tokens_per_s(r["trl_gkd"]) for p, r in zip(passes_only, rounds)])
        passes_total = sum(p["response_tokens"] for p in passes_only) / sum(p["seconds"] for p in passes_only)
        summary["passes_only_vs_trl_total"] = passes_total / trl_total

    for name, passes in (("full", PASSES), ("baseline", BASELINE_PASSES)):
        steps = [r[f"promptkd_{name}"]["seconds"] for r in rounds]
        pass_sums = [sum(r["passes"]["seconds"][p] for p in passes) for r in rounds]
        summary[f"overhead_{name}"] = spread([step / total for step, total in zip(steps, pass_sums)])
        summary[f"overhead_{name}_total"] = sum(steps) / sum(pass_sums)
    return summary


def _stage_table(rounds: list[dict], distiller: Distiller, peak: Optional[float], step_flops_names: dict) -> list[dict]:
    """Per stage: median seconds, response tokens/s, model FLOPs, achieved FLOP/s and MFU."""
    table = []
    stages = list(PASSES) + list(step_flops_names)
    for stage in stages:
        seconds, flops, tokens = [], [], []
        for r in rounds:
            passes = r["passes"]
            per_pass = pass_flops(distiller, passes["batch_size"], passes["prompt_length"], passes["response_length"])
            if stage in PASSES:
                seconds.append(passes["seconds"][stage])
                flops.append(per_pass[stage])
                tokens.append(passes["response_tokens"])
            else:
                seconds.append(r[stage]["seconds"])
                flops.append(sum(per_pass[p] for p in step_flops_names[stage]))
                tokens.append(r[stage]["response_tokens"])
        achieved = [f / s for f, s in zip(flops, seconds)]
        table.append({
            "stage": stage,
            "seconds": median(seconds),
            "tokens_per_s": median([t / s for t, s in zip(tokens, seconds)]),
            "model_flops": median(flops),
            "achieved_tflops": median(achieved) / 1e12,
            "mfu": median(achieved) / peak if peak else None,
        })
    return table


def _stage_peak_memory(pair: ModelPair, rounds_runner: PromptKDRounds, batch: dict, device: torch.device) -> dict:
    """Peak tensor memory of each pass and of both steps, measured in extra runs after the timed rounds."""
    distiller = rounds_runner.distillers["promptkd_full"]
    accelerator = distiller.accelerator
    teacher, student, soft_prompt = distiller.teacher, distiller.student, distiller.soft_prompt
    rollout = _sample(distiller, batch)

    def teacher_forward(prompt):
        with accelerator.autocast(), torch.no_grad():
            teacher_response_logits(teacher, rollout, prompt)

    def prompted_forward_backward():
        with accelerator.autocast():
            logits = teacher_response_logits(teacher, rollout, soft_prompt)
        _backward(logits)

    def student_forward_backward():
        with accelerator.autocast():
            logits = response_logits(student, rollout)
        _backward(logits)

    measured = {
        "generation": lambda: _sample(distiller, batch),
        "teacher_forward": lambda: teacher_forward(None),
        "prompted_teacher_forward_backward": prompted_forward_backward,
        "prompted_teacher_forward": lambda: teacher_forward(soft_prompt),
        "student_forward_backward": student_forward_backward,
    }
    peaks = {}
    for name, fn in measured.items():
        peaks[name] = peak_memory_bytes(fn, device)
        soft_prompt.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
    for name in VARIANTS:
        peaks[name] = peak_memory_bytes(lambda: rounds_runner.distillers[name].step([batch], 0), device)
    return peaks


def run_kd_section(pair: ModelPair, settings: KDSettings, device: torch.device, use_trl: bool = True, profile: bool = False) -> dict:
    """Benchmark the on-policy KD step; returns raw rounds, summary, stage table and settings."""
    total_rounds = settings.warmup + settings.repeats
    batches = prompt_batches(
        pair.tokenizer, settings.batch_size, total_rounds, settings.max_length, settings.max_new_tokens, settings.seed
    )
    if settings.warmup and settings.repeats:
        # The first warm-up round runs the widest timed batch, so the heap has grown to its peak before timing
        # starts, as it has after the first steps of a training run. Otherwise the first step to reach a new
        # peak pays the page faults of the new memory while the model passes timed after it reuse that memory.
        widest = max(batches[settings.warmup :], key=lambda batch: batch["input_ids"].shape[1])
        batches[0] = {key: value.clone() for key, value in widest.items()}
    runner = PromptKDRounds(pair, settings, device, total_rounds)
    with_trl = use_trl and trl_available()
    if use_trl and not with_trl:
        logger.warning("trl is not installed (pip install -r benchmarks/requirements.txt): the TRL comparison is skipped.")

    trl_details = None
    if with_trl:
        result = run_with_trl(pair, settings, device, batches, runner)
        trl_details = result["details"]
        for index, record in result["records"].items():
            runner.records[index]["trl_gkd"] = record
    else:
        for index, batch in enumerate(batches):
            runner.run(index, to_device(batch, device))

    all_rounds = [dict(round=index, **runner.records[index]) for index in range(total_rounds)]
    timed_rounds = all_rounds[settings.warmup :]
    peak, peak_source = peak_flops(device, settings.dtype, settings.peak_tflops * 1e12 if settings.peak_tflops else None)
    step_passes = {"promptkd_baseline": BASELINE_PASSES, "promptkd_full": PASSES}
    section = {
        "settings": dict(settings.__dict__),
        "trl": trl_details,
        "rounds": all_rounds,
        "summary": _summarize(timed_rounds, with_trl),
        "stages": _stage_table(timed_rounds, runner.distillers["promptkd_full"], peak, step_passes),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
    }
    last_batch = to_device(batches[-1], device)
    section["peak_memory_bytes"] = _stage_peak_memory(pair, runner, last_batch, device)
    if profile:
        section["profile"] = profile_step(runner.distillers["promptkd_full"], last_batch)
    return section


def profile_step(distiller: Distiller, batch: dict, rows: int = 20) -> str:
    """torch.profiler table of one full PromptKD step, the ops with the most self CPU time first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        distiller.step([batch], 0)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
