"""PromptKD distillation.

Each optimizer step:
  1. the student samples a pseudo-target response y for each prompt x (no gradient);
  2. the soft prompt P in front of the frozen teacher is updated to minimise
     KL(p_T^P || p_S) + w_reg * KL(p_T^P || p_T^0) on the response tokens, with w_reg falling from 1 to 0;
  3. the student is updated on (x, y) toward the prompted teacher under the chosen strategy.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import GenerationConfig

from promptkd import data as dolly
from promptkd.config import DistillConfig
from promptkd.losses import LossOutput, StepContext, get_strategy, prompt_loss, regularizer_weight
from promptkd.models import check_same_vocab, load_model_and_tokenizer, position_ids_from_mask
from promptkd.runs import MODEL_DIR, Run, StopRequest
from promptkd.soft_prompt import SoftPrompt, load_soft_prompt, teacher_forward
from promptkd.training import (
    BatchPlan,
    LoopState,
    average_gradients,
    clip_and_norm,
    finish_run,
    grads_finite,
    iterate_steps,
    load_trainer_state,
    make_optimizer,
    record_step_outcome,
    restore_trainer_state,
    run_with_status,
    save_checkpoint,
    save_final_model,
    seed_everything,
    should_pause,
    total_optimizer_steps,
)

logger = logging.getLogger(__name__)

SOFT_PROMPT_FILE = "soft_prompt.safetensors"


@dataclass
class Rollout:
    """A prompt batch with the student's sampled response appended."""

    input_ids: torch.Tensor  # (B, T) left-padded prompt followed by the response
    attention_mask: torch.Tensor  # (B, T) 0 on padding and on tokens after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first EOS

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())


def response_mask_from(new_tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on each generated token up to and including the first EOS, 0 after it. (B, R) -> (B, R)."""
    is_eos = (new_tokens == eos_token_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).long()


@torch.no_grad()
def sample_rollout(student, tokenizer, batch: dict, config: DistillConfig) -> Rollout:
    """Step 1: the student samples pseudo-targets with a KV cache."""
    # top_k=0 and top_p=1.0 mean "no cut"; passing None skips those logits processors, which on
    # transformers 5.25 made 32-token sampling about 8x slower on a 49k vocabulary when left in.
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=config.sampling_temperature,
        top_k=config.sampling_top_k or None,
        top_p=config.sampling_top_p if config.sampling_top_p < 1.0 else None,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    was_training = student.training
    student.eval()
    sequences = student.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=None,
        generation_config=generation_config,
    )  # (B, T_prompt + R)
    student.train(was_training)

    prompt_length = batch["input_ids"].shape[1]
    response_mask = response_mask_from(sequences[:, prompt_length:], tokenizer.eos_token_id)  # (B, R)
    attention_mask = torch.cat([batch["attention_mask"], response_mask], dim=1)
    return Rollout(sequences, attention_mask, response_mask)


def response_logits(model, rollout: Rollout) -> torch.Tensor:
    """Logits that predict the response tokens: (B, R, V). The head runs on those positions only."""
    position_ids = position_ids_from_mask(rollout.attention_mask)
    logits = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids,
        logits_to_keep=rollout.response_length + 1,
    ).logits  # (B, R + 1, V)
    return logits[:, :-1]


def teacher_response_logits(teacher, rollout: Rollout, soft_prompt: Optional[SoftPrompt]) -> torch.Tensor:
    logits = teacher_forward(
        teacher, rollout.input_ids, rollout.attention_mask, soft_prompt, logits_to_keep=rollout.response_length + 1
    )  # (B, R + 1, V)
    return logits[:, :-1]


def combine_stats(outputs: list[tuple[int, dict]]) -> dict:
    """Token-weighted mean of per-micro-batch statistics; counts are summed."""
    total_tokens = sum(tokens for tokens, _ in outputs) or 1
    combined: dict = {}
    for tokens, stats in outputs:
        for key, value in stats.items():
            if key in ("fallbacks", "tokens"):
                combined[key] = combined.get(key, 0) + value
            elif key in ("alpha", "reg_weight"):
                combined[key] = value
            else:
                combined[key] = combined.get(key, 0.0) + value * tokens / total_tokens
    return combined


class Distiller:
    """Holds the models and optimizers of one distillation run and performs its steps."""

    def __init__(self, config: DistillConfig, accelerator, teacher, student, tokenizer, soft_prompt, total_steps):
        self.config = config
        self.accelerator = accelerator
        self.teacher = teacher
        self.student = student
        self.tokenizer = tokenizer
        self.soft_prompt = soft_prompt
        self.total_steps = total_steps
        self.strategy = get_strategy(config.strategy)

        self.student_optimizer, self.student_scheduler = make_optimizer(
            student.parameters(), config.learning_rate, config.weight_decay, total_steps, config.warmup_ratio
        )
        self.optimizers = {"student": self.student_optimizer}
        self.schedulers = {"student": self.student_scheduler}
        if config.prompt_tuning:
            self.prompt_optimizer, self.prompt_scheduler = make_optimizer(
                soft_prompt.parameters(), config.prompt_learning_rate, 0.0, total_steps, config.warmup_ratio
            )
            self.optimizers["prompt"] = self.prompt_optimizer
            self.schedulers["prompt"] = self.prompt_scheduler

    def step(self, batches: list[dict], step: int) -> tuple[dict, bool]:
        """Run one optimizer step over the micro-batches and return (metrics, finite)."""
        config = self.config
        ctx = StepContext.from_config(config, step=step, total_steps=self.total_steps)
        reg_weight = regularizer_weight(step, self.total_steps)
        keep_student_graph = len(batches) == 1
        started = time.perf_counter()

        # 1. Pseudo-targets from the student.
        with self.accelerator.autocast():  # sampling runs in the precision of the training passes
            rollouts = [sample_rollout(self.student, self.tokenizer, batch, config) for batch in batches]
        total_tokens = sum(rollout.num_tokens for rollout in rollouts) or 1

        # 2. Soft prompt update toward the student, regularised toward the unprompted teacher.
        prompt_stats, prompt_finite, prompt_grad_norm = [], True, 0.0
        student_logits_kept: list[Optional[torch.Tensor]] = [None] * len(rollouts)
        unprompted: list[Optional[torch.Tensor]] = [None] * len(rollouts)
        if config.prompt_tuning:
            for index, rollout in enumerate(rollouts):
                share = rollout.num_tokens / total_tokens
                with self.accelerator.autocast():
                    with torch.no_grad():
                        unprompted[index] = teacher_response_logits(self.teacher, rollout, None)
                    with torch.set_grad_enabled(keep_student_graph):
                        student_logits = response_logits(self.student, rollout)
                    prompted = teacher_response_logits(self.teacher, rollout, self.soft_prompt)
                if keep_student_graph:
                    student_logits_kept[index] = student_logits
                output = prompt_loss(prompted, student_logits.detach(), unprompted[index], rollout.response_mask, reg_weight)
                prompt_finite &= bool(torch.isfinite(output.loss))
                if prompt_finite:
                    self.accelerator.backward(output.loss * share)
                prompt_stats.append((rollout.num_tokens, dict(output.stats, prompt_loss=output.loss.item())))
            prompt_finite, prompt_grad_norm = self._apply(
                self.soft_prompt.parameters(), self.prompt_optimizer, self.prompt_scheduler, prompt_finite
            )

        # 3. Student update toward the prompted teacher.
        student_stats, student_finite = [], True
        for index, rollout in enumerate(rollouts):
            share = rollout.num_tokens / total_tokens
            with self.accelerator.autocast():
                with torch.no_grad():
                    prompt = self.soft_prompt if config.prompt_tuning else None
                    teacher_logits = teacher_response_logits(self.teacher, rollout, prompt)
                student_logits = student_logits_kept[index]
                if student_logits is None:
                    student_logits = response_logits(self.student, rollout)
            output: LossOutput = self.strategy(student_logits, teacher_logits, rollout.response_mask, ctx)
            loss = config.kl_scale * output.loss
            student_finite &= bool(torch.isfinite(loss))
            if student_finite:
                self.accelerator.backward(loss * share)
            student_stats.append((rollout.num_tokens, dict(output.stats, loss=loss.item())))
        student_finite, grad_norm = self._apply(
            self.student.parameters(), self.student_optimizer, self.student_scheduler, student_finite
        )

        elapsed = time.perf_counter() - started
        metrics = combine_stats(student_stats)
        if prompt_stats:
            metrics.update({k: v for k, v in combine_stats(prompt_stats).items() if k.startswith("prompt") or k == "reg_weight"})
            metrics["prompt_grad_norm"] = prompt_grad_norm
            metrics["prompt_lr"] = self.prompt_scheduler.get_last_lr()[0]
        metrics.update(
            grad_norm=grad_norm,
            lr=self.student_scheduler.get_last_lr()[0],
            response_tokens=total_tokens * self.accelerator.num_processes,
            tokens_per_s=total_tokens * self.accelerator.num_processes / max(elapsed, 1e-9),
            step_time_s=elapsed,
        )
        return metrics, prompt_finite and student_finite

    def _apply(self, parameters, optimizer, scheduler, finite: bool) -> tuple[bool, float]:
        """Average, check, clip and apply gradients; a non-finite loss or gradient skips the update."""
        parameters = list(parameters)
        average_gradients(parameters, self.accelerator)
        grad_norm = 0.0
        if finite:
            grad_norm = clip_and_norm(parameters, self.config.max_grad_norm)
            # A NaN or inf gradient makes the norm non-finite, so the per-parameter check runs only then. It
            # distinguishes such a gradient (which clipping turned into NaN) from a norm that overflowed.
            finite = math.isfinite(grad_norm) or grads_finite(parameters)
        if finite:
            optimizer.step()
            scheduler.step()  # a skipped update leaves the learning rate schedule where it was
        else:
            grad_norm = 0.0
        optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm


def load_models(config: DistillConfig, student_source: str, device):
    """Load the frozen teacher and the student, and check that they share a vocabulary."""
    teacher, teacher_tokenizer = load_model_and_tokenizer(config.teacher)
    student, student_tokenizer = load_model_and_tokenizer(student_source)
    check_same_vocab(teacher, student, teacher_tokenizer, student_tokenizer)

    teacher.requires_grad_(False)
    teacher.eval().to(device)
    student.train().to(device)
    return teacher, student, student_tokenizer


def encode_prompts(config: DistillConfig, records, tokenizer) -> list[dict]:
    max_prompt_tokens = dolly.check_prompt_room(tokenizer, config.template, config.max_length, config.max_new_tokens)
    return [{"input_ids": dolly.encode_prompt(r, tokenizer, config.template, max_prompt_tokens)} for r in records]


def distill(config: DistillConfig) -> Run:
    """Run PromptKD distillation as configured; returns the finished Run."""
    return run_with_status(config, "distill", _train)


def _train(config: DistillConfig, accelerator, run: Run, stop: StopRequest) -> LoopState:
    seed_everything(config.seed + accelerator.process_index)
    device = accelerator.device

    # Cheap checks first: data and resume state, before any model is loaded.
    records = dolly.load_split(config.dataset, "train", limit=config.train_limit)
    state = load_trainer_state(run, accelerator) if config.resume else None
    if config.resume and state is None:
        logger.warning("No checkpoint in %s: starting from step 0.", run.path)
    student_source = str(state["folder"] / MODEL_DIR) if state else config.student
    # save_pretrained (transformers 5.25) writes files on rank 0 only, so the main process builds missing presets first.
    with accelerator.main_process_first():
        teacher, student, tokenizer = load_models(config, student_source, device)
    prompts = encode_prompts(config, records, tokenizer)
    probes = _probe_batch(config, tokenizer) if config.probe_every else None

    if state and (state["folder"] / SOFT_PROMPT_FILE).is_file():
        soft_prompt = load_soft_prompt(state["folder"] / SOFT_PROMPT_FILE)
    else:
        soft_prompt = SoftPrompt.from_text(teacher, tokenizer, config.soft_prompt_init, config.soft_prompt_length)
    soft_prompt.to(device)

    lengths = [len(item["input_ids"]) for item in prompts] if config.group_by_length else None
    plan = BatchPlan(
        len(prompts), config.per_device_batch_size, accelerator.num_processes, accelerator.process_index, config.seed, lengths
    )
    total_steps = total_optimizer_steps(config, plan)
    distiller = Distiller(config, accelerator, teacher, student, tokenizer, soft_prompt, total_steps)
    loop = LoopState()
    if state:
        loop = restore_trainer_state(state, accelerator, distiller.optimizers, distiller.schedulers)
        run.truncate_logs(loop.step)
        logger.info("Resumed at step %d of %d", loop.step, total_steps)
    run.set_status(total_steps=total_steps, step=loop.step, num_prompts=len(prompts))
    logger.info(
        "%d training prompts, %d steps, strategy %s, prompt tuning %s",
        len(prompts), total_steps, config.strategy, "on" if config.prompt_tuning else "off",
    )

    if probes is not None and loop.step == 0:
        _record_probe(run, distiller, probes, 0)

    started = time.perf_counter() - loop.elapsed_s
    accumulation = config.gradient_accumulation_steps
    final_state = "completed"
    for step in iterate_steps(loop.step, total_steps, disable=not accelerator.is_main_process):
        batches = []
        for micro in range(accumulation):
            indices = plan.micro_batch(step * accumulation + micro)
            batch = dolly.collate_left([prompts[i] for i in indices], tokenizer.pad_token_id)
            batches.append({key: value.to(device) for key, value in batch.items()})

        metrics, finite = distiller.step(batches, step)
        loop.step = step + 1
        loop.elapsed_s = time.perf_counter() - started
        record_step_outcome(
            loop, finite, config.max_nonfinite_steps, "Lower learning_rate, use mixed_precision=no, or check the models' outputs."
        )

        if loop.step % config.log_every == 0 or loop.step == total_steps:
            metrics.update(step=loop.step, epoch=loop.step * accumulation / plan.micro_batches_per_epoch,
                           elapsed_s=loop.elapsed_s, nonfinite_skipped=loop.nonfinite_total)
            run.log_metrics(metrics)
        run.set_status(step=loop.step, elapsed_s=loop.elapsed_s)
        if probes is not None and loop.step % config.probe_every == 0:
            _record_probe(run, distiller, probes, loop.step)

        if should_pause(config, loop, stop, accelerator) and loop.step < total_steps:
            final_state = "stopped"
            break
        if config.save_every and loop.step % config.save_every == 0 and loop.step < total_steps:
            _save(run, accelerator, distiller, loop)

    _save(run, accelerator, distiller, loop)
    save_final_model(run, accelerator, student, tokenizer, {SOFT_PROMPT_FILE: soft_prompt.state_tensors()})
    finish_run(run, accelerator, loop, total_steps, final_state, stop)
    return loop


def _save(run: Run, accelerator, distiller: Distiller, loop: LoopState) -> None:
    save_checkpoint(
        run, accelerator, distiller.student, distiller.tokenizer, distiller.optimizers, distiller.schedulers, loop,
        {SOFT_PROMPT_FILE: distiller.soft_prompt.state_tensors()},
    )


def _probe_batch(config: DistillConfig, tokenizer) -> Optional[list]:
    """Return the first `probe_size` validation records, used unchanged at every probe."""
    try:
        records = dolly.load_split(config.dataset, "validation", limit=config.probe_size)
    except ValueError as error:
        logger.warning("No probe batch (%s); per-token probes are off for this run.", error)
        return None
    return records


def _record_probe(run: Run, distiller: Distiller, records, step: int) -> None:
    from promptkd.inspection import token_report

    if not run.is_main:
        return
    ctx = StepContext.from_config(distiller.config, step=step, total_steps=distiller.total_steps)
    examples = []
    for record in records:
        report = token_report(
            distiller.teacher, distiller.student, distiller.tokenizer, record, distiller.config,
            ctx=ctx, soft_prompt=distiller.soft_prompt if distiller.config.prompt_tuning else None,
        )
        examples.append(report)
    run.log_probe({"step": step, "examples": examples})
