"""Supervised fine-tuning on Dolly responses (stage 0, for the teacher or the student)."""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from promptkd import data as dolly
from promptkd.config import SFTConfig
from promptkd.models import load_model_and_tokenizer, position_ids_from_mask
from promptkd.runs import MODEL_DIR, Run, StopRequest
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


def response_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the response tokens of a left-padded batch, and their count.

    The head runs only on the last positions that can predict a labelled token.
    """
    labels = batch["labels"]  # (B, T), -100 on prompt and padding
    labelled = labels != -100
    first_labelled = torch.where(labelled.any(dim=1), labelled.float().argmax(dim=1), torch.full_like(labels[:, 0], labels.shape[1]))
    keep = int(labels.shape[1] - first_labelled.min()) + 1  # head positions needed, incl. the one before
    keep = min(keep, labels.shape[1])

    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
        logits_to_keep=keep,
    ).logits  # (B, keep, V)
    predictions = logits[:, :-1].float()  # (B, keep - 1, V): position t predicts token t + 1
    targets = labels[:, labels.shape[1] - (keep - 1):]  # (B, keep - 1)
    loss = F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


@torch.no_grad()
def response_perplexity(model, tokenizer, records, template: str, max_length: int, batch_size: int = 8) -> float:
    """exp(mean cross-entropy) over the response tokens (with the final EOS) of `records`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    examples = [dolly.encode_example(r, tokenizer, template, max_length) for r in records]
    for start in range(0, len(examples), batch_size):
        batch = dolly.collate_left(examples[start : start + batch_size], tokenizer.pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        loss, tokens = response_loss_sum(model, batch)
        total_loss += float(loss)
        total_tokens += tokens
    model.train(was_training)
    return math.exp(total_loss / max(total_tokens, 1))


def sft(config: SFTConfig) -> Run:
    """Fine-tune config.model on the responses; returns the finished Run."""
    return run_with_status(config, "sft", _train)


def _train(config: SFTConfig, accelerator, run: Run, stop: StopRequest) -> LoopState:
    seed_everything(config.seed + accelerator.process_index)
    device = accelerator.device

    records = dolly.load_split(config.dataset, "train", limit=config.train_limit)
    state = load_trainer_state(run, accelerator) if config.resume else None
    # save_pretrained (transformers 5.25) writes files on rank 0 only, so the main process builds missing presets first.
    with accelerator.main_process_first():
        model, tokenizer = load_model_and_tokenizer(str(state["folder"] / MODEL_DIR) if state else config.model)
    model.train().to(device)
    examples = [dolly.encode_example(r, tokenizer, config.template, config.max_length) for r in records]
    validation = _validation_records(config)

    lengths = [len(item["input_ids"]) for item in examples] if config.group_by_length else None
    plan = BatchPlan(
        len(examples), config.per_device_batch_size, accelerator.num_processes, accelerator.process_index, config.seed, lengths
    )
    total_steps = total_optimizer_steps(config, plan)
    optimizer, scheduler = make_optimizer(model.parameters(), config.learning_rate, config.weight_decay, total_steps, config.warmup_ratio)
    loop = LoopState()
    if state:
        loop = restore_trainer_state(state, accelerator, {"model": optimizer}, {"model": scheduler})
        run.truncate_logs(loop.step)
    run.set_status(total_steps=total_steps, step=loop.step, num_examples=len(examples))
    logger.info("%d training examples, %d steps", len(examples), total_steps)

    if validation and loop.step == 0 and accelerator.is_main_process:
        ppl = response_perplexity(model, tokenizer, validation, config.template, config.max_length)
        run.log_metrics({"step": 0, "val_ppl": ppl})
        logger.info("Validation perplexity before training: %.2f", ppl)

    accumulation = config.gradient_accumulation_steps
    started = time.perf_counter() - loop.elapsed_s
    final_state = "completed"
    for step in iterate_steps(loop.step, total_steps, disable=not accelerator.is_main_process):
        step_started = time.perf_counter()
        batches = []
        for micro in range(accumulation):
            indices = plan.micro_batch(step * accumulation + micro)
            batch = dolly.collate_left([examples[i] for i in indices], tokenizer.pad_token_id)
            batches.append({key: value.to(device) for key, value in batch.items()})
        group_tokens = sum(int((b["labels"] != -100).sum()) for b in batches) or 1

        # Each micro-batch's summed loss is divided by the tokens of the whole group, so the accumulated
        # gradient equals that of one batch holding all the micro-batches.
        loss_total, finite = 0.0, True
        for batch in batches:
            with accelerator.autocast():
                loss_sum, _ = response_loss_sum(model, batch)
            loss = loss_sum / group_tokens
            finite &= bool(torch.isfinite(loss))
            if finite:
                accelerator.backward(loss)
            loss_total += float(loss.detach())

        parameters = list(model.parameters())
        average_gradients(parameters, accelerator)
        finite = finite and grads_finite(parameters)
        grad_norm = 0.0
        if finite:
            grad_norm = clip_and_norm(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()  # a skipped update leaves the learning rate schedule where it was
        optimizer.zero_grad(set_to_none=True)

        loop.step = step + 1
        loop.elapsed_s = time.perf_counter() - started
        record_step_outcome(loop, finite, config.max_nonfinite_steps, "Lower learning_rate or use mixed_precision=no.")

        if loop.step % config.log_every == 0 or loop.step == total_steps:
            step_time = time.perf_counter() - step_started
            run.log_metrics({
                "step": loop.step, "epoch": loop.step * accumulation / plan.micro_batches_per_epoch,
                "loss": loss_total, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                "tokens": group_tokens, "tokens_per_s": group_tokens * accelerator.num_processes / max(step_time, 1e-9),
                "step_time_s": step_time, "elapsed_s": loop.elapsed_s, "nonfinite_skipped": loop.nonfinite_total,
            })
        run.set_status(step=loop.step, elapsed_s=loop.elapsed_s)

        if should_pause(config, loop, stop, accelerator) and loop.step < total_steps:
            final_state = "stopped"
            break
        if config.save_every and loop.step % config.save_every == 0 and loop.step < total_steps:
            save_checkpoint(run, accelerator, model, tokenizer, {"model": optimizer}, {"model": scheduler}, loop)

    if validation and accelerator.is_main_process:
        ppl = response_perplexity(model, tokenizer, validation, config.template, config.max_length)
        run.log_metrics({"step": loop.step, "val_ppl": ppl})
        logger.info("Validation perplexity after %d steps: %.2f", loop.step, ppl)

    save_checkpoint(run, accelerator, model, tokenizer, {"model": optimizer}, {"model": scheduler}, loop)
    save_final_model(run, accelerator, model, tokenizer)
    finish_run(run, accelerator, loop, total_steps, final_state, stop)
    return loop


def _validation_records(config: SFTConfig):
    if config.eval_limit is None:
        return []
    try:
        return dolly.load_split(config.dataset, "validation", limit=config.eval_limit)
    except ValueError as error:
        logger.warning("No validation records (%s): skipping validation perplexity.", error)
        return []
