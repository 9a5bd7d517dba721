"""Before/after comparison of promptkd's loss and batched generation against a git revision.

    python -m benchmarks.ab_versions --ref db13f6b~1 --threads 1

The "before" code is `promptkd/losses.py` and `promptkd/generation.py` as stored at `--ref` (a
commit before the change), loaded as separate modules next to the working tree's. Old and new run
alternately in one process:
  - kd_loss (strategy baseline) forward and backward on random float32 logits (B, R, V): peak tensor
    memory (torch.profiler) and median time,
  - the gradient checks of Distiller._apply on finite gradients: isfinite per parameter plus clipping
    before, clipping alone after,
  - generate_greedy with batch 16 on the first Dolly test records with the untrained SmolLM2 student,
    against the per-example generate loop, with the outputs of all three checked for equality.
The results JSON goes to benchmarks/results/ab-<ref>.json and a generated block to docs/benchmarks.md.
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
from promptkd import generation, losses  # noqa: E402
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


def compare_loss(old, new, batch_size: int, response_length: int, vocab_size: int, repeats: int) -> dict:
    """Peak memory and time of kd_loss forward + backward, old and new alternating."""
    cpu = torch.device("cpu")

    def run(module) -> None:
        student = torch.randn(batch_size, response_length, vocab_size, requires_grad=True)  # (B, R, V)
        teacher = torch.randn(batch_size, response_length, vocab_size)
        output = module.kd_loss(student, teacher, torch.ones(batch_size, response_length), module.StepContext())
        output.loss.backward()

    run(old)
    run(new)
    result = {"shape": [batch_size, response_length, vocab_size]}
    for label, module in (("before", old), ("after", new)):
        result[f"{label}_peak_bytes"] = peak_memory_bytes(lambda: run(module), cpu)
    times = {"before": [], "after": []}
    for index in range(repeats):
        order = (("before", old), ("after", new)) if index % 2 == 0 else (("after", new), ("before", old))
        for label, module in order:
            times[label].append(timed(lambda: run(module), cpu)[1])
    result["before_s"] = spread(times["before"])
    result["after_s"] = spread(times["after"])
    result["time_ratio"] = spread([a / b for a, b in zip(times["after"], times["before"])])
    return result


def compare_gradient_checks(model, repeats: int) -> dict:
    """Seconds of Distiller._apply's checks on finite gradients: per-parameter isfinite and clipping (before)
    against clipping alone, whose finite norm now makes the per-parameter check unnecessary (after)."""
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, 1e-3)
    cpu = torch.device("cpu")
    times = {"before": [], "after": []}
    for _ in range(repeats):
        times["before"].append(timed(lambda: grads_finite(parameters) and clip_and_norm(parameters, 0.5), cpu)[1])
        times["after"].append(timed(lambda: math.isfinite(clip_and_norm(parameters, 0.5)), cpu)[1])
    model.zero_grad(set_to_none=True)
    return {"parameters": sum(p.numel() for p in parameters), "before_s": spread(times["before"]), "after_s": spread(times["after"])}


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


def render_block(results: dict) -> str:
    loss, gen, checks = results["loss"], results["generation"], results["gradient_checks"]
    mib = 2**20
    lines = [
        f"### Before/after: working tree against `{results['ref']}` ({results['ref_commit'][:10]})",
        "",
        f"- Command: `{results['command']}`",
        f"- Date (UTC): {results['started_utc']}; load average at start "
        + ", ".join(f"{value:.1f}" for value in results["machine"]["load_average_start"]),
        "",
        "| measurement | before | after | after / before |",
        "|---|---:|---:|---:|",
        f"| kd_loss forward + backward peak memory, logits {tuple(loss['shape'])} fp32 (MiB) | "
        f"{loss['before_peak_bytes'] / mib:.1f} | {loss['after_peak_bytes'] / mib:.1f} | "
        f"{loss['after_peak_bytes'] / loss['before_peak_bytes']:.2f} |",
        f"| kd_loss forward + backward time, median of {loss['before_s']['n']} (s) | {loss['before_s']['median']:.3f} | "
        f"{loss['after_s']['median']:.3f} | {loss['time_ratio']['median']:.2f} |",
        f"| gradient checks of one student update, {checks['parameters'] / 1e6:.0f} M parameters, median (s) | "
        f"{checks['before_s']['median']:.3f} | {checks['after_s']['median']:.3f} | "
        f"{checks['after_s']['median'] / checks['before_s']['median']:.2f} |",
        f"| generate_greedy, batch 16, {gen['num_records']} test prompts (s) | {gen['seconds']['before']:.1f} | "
        f"{gen['seconds']['after']:.1f} | {gen['seconds']['after'] / gen['seconds']['before']:.2f} |",
        f"| speed-up over the per-example loop ({gen['seconds']['per_example']:.1f} s) | {gen['speedup_before']:.2f}× | "
        f"{gen['speedup_after']:.2f}× | |",
        "",
        f"Greedy outputs of before, after and the per-example loop identical: {'yes' if gen['identical'] else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Compare kd_loss and generate_greedy of the working tree with a git revision.")
    parser.add_argument("--ref", required=True, help="git revision with the 'before' code, e.g. db13f6b~1.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--loss-repeats", type=int, default=7, help="Timed kd_loss runs of each version.")
    parser.add_argument("--eval-records", type=int, default=32, help="Dolly test prompts decoded by each version.")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results", help="Folder of the results JSON.")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown file that gets the block.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    commit = subprocess.run(["git", "rev-parse", args.ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    results = {
        "ref": args.ref,
        "ref_commit": commit,
        "command": "python -m benchmarks.ab_versions " + " ".join(sys.argv[1:]),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(torch.device("cpu")),
    }
    with tempfile.TemporaryDirectory(prefix="promptkd-before-") as folder:
        old_losses = load_module_at(args.ref, "promptkd/losses.py", "promptkd_losses_before", Path(folder))
        old_generation = load_module_at(args.ref, "promptkd/generation.py", "promptkd_generation_before", Path(folder))

        student, tokenizer = load_model_and_tokenizer(PRESET_PAIRS["smollm2"][1])
        vocab_size = student.get_output_embeddings().weight.shape[0]
        logger.info("Comparing kd_loss")
        results["loss"] = compare_loss(old_losses, losses, 4, 32, vocab_size, args.loss_repeats)
        results["gradient_checks"] = compare_gradient_checks(student, args.loss_repeats)
        logger.info("Comparing generate_greedy on %d records", args.eval_records)
        results["generation"] = compare_generation(old_generation, generation, student, tokenizer, args.eval_records, 32)

    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = f"ab-{commit[:10]}"
    (args.results_dir / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    report.update_markdown(args.markdown, name, render_block(results))
    logger.info("Wrote %s and the block %s in %s", args.results_dir / f"{name}.json", name, args.markdown)


if __name__ == "__main__":
    main()
