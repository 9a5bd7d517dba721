"""Before/after comparison of promptkd's core code against a git revision.

    python -m benchmarks.ab_versions --ref db13f6b~1 --threads 1
    python -m benchmarks.ab_versions --ref 0123abc --sections prompt_loss,optimizer,sampling --threads 1

The "before" code is `promptkd/losses.py`, `promptkd/generation.py` and `promptkd/training.py` as stored
at `--ref` (a commit before the change), loaded as separate modules next to the working tree's. Old and
new run alternately in one process. The sections (`--sections`, all by default):
  - kd_loss, prompt_loss: forward and backward on random float32 logits (B, R, V), peak tensor memory
    (torch.profiler) and median time,
  - gradient_checks: the checks of Distiller._apply on finite gradients, isfinite per parameter plus
    clipping before, clipping alone after,
  - optimizer: one AdamW update of the untrained SmolLM2 student's parameters from make_optimizer,
  - sampling: sample_rollout of the student in a bf16 run, outside the bf16 autocast (before) and
    inside it (after), as Distiller.step now calls it,
  - generation: generate_greedy with batch 16 on the first Dolly test records with the student, against
    the per-example generate loop, with the outputs of all three checked for equality.
The results JSON goes to benchmarks/results/ab-<commit>.json and a generated block to docs/benchmarks.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import PRESET_PAIRS, machine_info, peak_memory_bytes, spread, timed  # noqa: E402
from benchmarks.evaluation import generate_one_by_one  # noqa: E402
from promptkd import data as dolly  # noqa: E402
from promptkd import generation, losses, training  # noqa: E402
from promptkd.config import DistillConfig  # noqa: E402
from promptkd.distill import sample_rollout  # noqa: E402
from promptkd.models import load_model_and_tokenizer  # noqa: E402
from promptkd.training import clip_and_norm, grads_finite  # noqa: E402

logger = logging.getLogger("benchmarks.ab_versions")
ROOT = Path(__file__).resolve().parent.parent


def load_module_at(ref: str, path: str, name: str, folder: Path):
    """Import the file `path` as stored at git revision `ref`, under the module name `name`."""
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    file = folder / f"{name}.py"
    file.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while the file runs
    spec.loader.exec_module(module)
    return module


def _alternate(runs: dict, repeats: int, device: torch.device) -> dict:
    """Seconds of each callable in `runs` ({"before": fn, "after": fn}), run alternately in changing order."""
    times = {label: [] for label in runs}
    labels = list(runs)
    for index in range(repeats):
        for label in labels if index % 2 == 0 else labels[::-1]:
            times[label].append(timed(runs[label], device)[1])
    result = {f"{label}_s": spread(values) for label, values in times.items()}
    result["time_ratio"] = spread([a / b for a, b in zip(times["after"], times["before"])])
    return result


def compare_loss(old, new, name: str, batch_size: int, response_length: int, vocab_size: int, repeats: int) -> dict:
    """Peak memory and time of kd_loss or prompt_loss forward + backward, old and new alternating."""
    cpu = torch.device("cpu")

    def run(module) -> None:
        logits = torch.randn(batch_size, response_length, vocab_size, requires_grad=True)  # (B, R, V)
        other = torch.randn(batch_size, response_length, vocab_size)
        mask = torch.ones(batch_size, response_length)
        if name == "kd_loss":
            output = module.kd_loss(logits, other, mask, module.StepContext())
        else:
            output = module.prompt_loss(logits, other, torch.randn(batch_size, response_length, vocab_size), mask, 0.5)
        output.loss.backward()

    run(old)
    run(new)
    result = {"shape": [batch_size, response_length, vocab_size]}
    for label, module in (("before", old), ("after", new)):
        result[f"{label}_peak_bytes"] = peak_memory_bytes(lambda: run(module), cpu)
    result.update(_alternate({"before": lambda: run(old), "after": lambda: run(new)}, repeats, cpu))
    return result


def compare_gradient_checks(model, repeats: int) -> dict:
    """Seconds of Distiller._apply's checks on finite gradients: per-parameter isfinite and clipping (before)
    against clipping alone, whose finite norm now makes the per-parameter check unnecessary (after)."""
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, 1e-3)
    runs = {
        "before": lambda: grads_finite(parameters) and clip_and_norm(parameters, 0.5),
        "after": lambda: math.isfinite(clip_and_norm(parameters, 0.5)),
    }
    result = _alternate(runs, repeats, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    return {"parameters": sum(p.numel() for p in parameters), **result}


def compare_optimizer(old_training, model, repeats: int) -> dict:
    """Seconds of one AdamW update of every student parameter with make_optimizer before and after."""
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, 1e-3)
    before, _ = old_training.make_optimizer(parameters, 1e-5, 0.0, 10, 0.0)
    after, _ = training.make_optimizer(parameters, 1e-5, 0.0, 10, 0.0)
    before.step()  # the first step creates the moment buffers
    after.step()
    with torch.no_grad():
        original = [parameter.clone() for parameter in parameters]
        result = _alternate({"before": before.step, "after": after.step}, repeats, torch.device("cpu"))
        for parameter, value in zip(parameters, original):
            parameter.copy_(value)
    model.zero_grad(set_to_none=True)
    return {"parameters": sum(p.numel() for p in parameters), "fused_after": bool(after.defaults.get("fused")), **result}


def compare_sampling(model, tokenizer, batch_size: int, max_new_tokens: int, repeats: int) -> dict:
    """Seconds of sample_rollout in a bf16 run: outside the bf16 autocast (before) and inside it (after)."""
    records = dolly.load_split(dolly.SHIPPED_SOURCE, "train", limit=batch_size)
    prompts = [dolly.encode_prompt(r, tokenizer, "dolly", 256 - max_new_tokens) for r in records]
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    config = DistillConfig(max_new_tokens=max_new_tokens, mixed_precision="bf16")
    tokens = {}

    def run(label: str) -> None:
        torch.manual_seed(0)
        if label == "after":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rollout = sample_rollout(model, tokenizer, batch, config)
        else:
            rollout = sample_rollout(model, tokenizer, batch, config)
        tokens[label] = rollout.num_tokens

    run("before")
    run("after")
    result = _alternate({"before": lambda: run("before"), "after": lambda: run("after")}, repeats, torch.device("cpu"))
    return {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "tokens": tokens, **result}


def compare_generation(old, new, model, tokenizer, num_records: int, max_new_tokens: int) -> dict:
    """Seconds of batched greedy decoding before and after, and of the per-example loop."""
    records = dolly.load_split(dolly.SHIPPED_SOURCE, "test", limit=num_records)
    prompts = [dolly.encode_prompt(r, tokenizer, "dolly", 512 - max_new_tokens) for r in records]
    cpu = torch.device("cpu")
    outputs, seconds = {}, {}
    runs = (
        ("before", lambda: old.generate_greedy(model, tokenizer, prompts, 16, max_new_tokens, progress=False)),
        ("after", lambda: new.generate_greedy(model, tokenizer, prompts, 16, max_new_tokens, progress=False)),
        ("per_example", lambda: generate_one_by_one(model, tokenizer, prompts, max_new_tokens)),
    )
    for label, fn in runs:
        outputs[label], seconds[label] = timed(fn, cpu)
    return {
        "num_records": len(records),
        "seconds": seconds,
        "speedup_before": seconds["per_example"] / seconds["before"],
        "speedup_after": seconds["per_example"] / seconds["after"],
        "identical": outputs["before"] == outputs["after"] == outputs["per_example"],
    }


def _time_row(text: str, result: dict) -> str:
    before, after = result["before_s"]["median"], result["after_s"]["median"]
    return f"| {text}, median of {result['before_s']['n']} (s) | {before:.3f} | {after:.3f} | {result['time_ratio']['median']:.2f} |"


def _memory_row(text: str, result: dict) -> str:
    mib = 2**20
    before, after = result["before_peak_bytes"], result["after_peak_bytes"]
    return f"| {text} (MiB) | {before / mib:.1f} | {after / mib:.1f} | {after / before:.2f} |"


def render_block(results: dict) -> str:
    lines = [
        f"### Before/after: working tree against `{results['ref']}` ({results['ref_commit'][:10]})",
        "",
        f"- Command: `{results['command']}`",
        f"- Date (UTC): {results['started_utc']}; load average at start "
        + ", ".join(f"{value:.1f}" for value in results["machine"]["load_average_start"]),
        "",
        "| measurement | before | after | after / before |",
        "|---|---:|---:|---:|",
    ]
    for name in ("kd_loss", "prompt_loss"):
        result = results.get(name) or (results.get("loss") if name == "kd_loss" else None)  # "loss": older files
        if result:
            shape = tuple(result["shape"])
            lines.append(_memory_row(f"{name} forward + backward peak memory, logits {shape} fp32", result))
            lines.append(_time_row(f"{name} forward + backward time", result))
    if "gradient_checks" in results:
        checks = results["gradient_checks"]
        lines.append(_time_row(f"gradient checks of one student update, {checks['parameters'] / 1e6:.0f} M parameters", checks))
    if "optimizer" in results:
        optimizer = results["optimizer"]
        lines.append(_time_row(f"AdamW update of {optimizer['parameters'] / 1e6:.0f} M student parameters", optimizer))
    if "sampling" in results:
        sampling = results["sampling"]
        lines.append(_time_row(
            f"student sampling in a bf16 run, batch {sampling['batch_size']}, {sampling['max_new_tokens']} new tokens", sampling
        ))
    notes = []
    if "generation" in results:
        gen = results["generation"]
        lines += [
            f"| generate_greedy, batch 16, {gen['num_records']} test prompts (s) | {gen['seconds']['before']:.1f} | "
            f"{gen['seconds']['after']:.1f} | {gen['seconds']['after'] / gen['seconds']['before']:.2f} |",
            f"| speed-up over the per-example loop ({gen['seconds']['per_example']:.1f} s) | {gen['speedup_before']:.2f}× | "
            f"{gen['speedup_after']:.2f}× | |",
        ]
        notes.append(f"Greedy outputs of before, after and the per-example loop identical: {'yes' if gen['identical'] else 'NO'}.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


SECTIONS = ("kd_loss", "prompt_loss", "gradient_checks", "optimizer", "sampling", "generation")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compare promptkd's losses, optimizer, sampling and greedy decoding with a git revision.")
    parser.add_argument("--ref", required=True, help="git revision with the 'before' code, e.g. db13f6b~1.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {', '.join(SECTIONS)}.")
    parser.add_argument(
        "--pair", choices=sorted(PRESET_PAIRS), default="smollm2", help="Model pair whose student is measured (tiny: smoke test size)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--loss-repeats", type=int, default=7, help="Timed runs of each version for the losses, checks and optimizer.")
    parser.add_argument("--sampling-repeats", type=int, default=4, help="Timed sample_rollout calls of each version.")
    parser.add_argument("--eval-records", type=int, default=32, help="Dolly test prompts decoded by each version.")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results", help="Folder of the results JSON.")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown file that gets the block.")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections {args.sections!r} names {', '.join(unknown)}: choose from {', '.join(SECTIONS)}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    commit = subprocess.run(["git", "rev-parse", args.ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    results = {
        "ref": args.ref,
        "ref_commit": commit,
        "command": "python -m benchmarks.ab_versions " + " ".join(sys.argv[1:] if argv is None else argv),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(torch.device("cpu")),
    }
    with tempfile.TemporaryDirectory(prefix="promptkd-before-") as folder:
        old_losses = load_module_at(args.ref, "promptkd/losses.py", "promptkd_losses_before", Path(folder))
        old_generation = load_module_at(args.ref, "promptkd/generation.py", "promptkd_generation_before", Path(folder))
        old_training = load_module_at(args.ref, "promptkd/training.py", "promptkd_training_before", Path(folder))

        student, tokenizer = load_model_and_tokenizer(PRESET_PAIRS[args.pair][1])
        vocab_size = student.get_output_embeddings().weight.shape[0]
        for name in ("kd_loss", "prompt_loss"):
            if name in sections:
                logger.info("Comparing %s", name)
                results[name] = compare_loss(old_losses, losses, name, 4, 32, vocab_size, args.loss_repeats)
        if "gradient_checks" in sections:
            results["gradient_checks"] = compare_gradient_checks(student, args.loss_repeats)
        if "optimizer" in sections:
            logger.info("Comparing make_optimizer's AdamW update")
            results["optimizer"] = compare_optimizer(old_training, student, args.loss_repeats)
        if "sampling" in sections:
            logger.info("Comparing sample_rollout in a bf16 run")
            results["sampling"] = compare_sampling(student, tokenizer, 4, 32, args.sampling_repeats)
        if "generation" in sections:
            logger.info("Comparing generate_greedy on %d records", args.eval_records)
            results["generation"] = compare_generation(old_generation, generation, student, tokenizer, args.eval_records, 32)

    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = f"ab-{commit[:10]}"
    (args.results_dir / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    report.update_markdown(args.markdown, name, render_block(results))
    logger.info("Wrote %s and the block %s in %s", args.results_dir / f"{name}.json", name, args.markdown)


if __name__ == "__main__":
    main()
