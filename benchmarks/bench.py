"""Run the promptkd benchmarks and write the results JSON, the markdown block and the chart.

    python -m benchmarks.bench --shapes smollm2 --threads 1
    python -m benchmarks.bench --shapes gpt2-reference --device cuda --dtype bf16 --sections kd,memory

Sections: kd (step throughput against TRL's GKDTrainer, step overhead, per-stage tokens/s, FLOPs, MFU
and peak memory), eval (batched against per-example greedy decoding, BERTScore time) and memory
(peak memory of the KD loss). See docs/benchmarks.md for the recorded runs.
"""

from __future__ import annotations

import os

# Set before transformers or huggingface_hub are imported: the benchmarks never use the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.common import SHAPES, load_pair, machine_info, prompt_batches  # noqa: E402
from benchmarks.evaluation import check_identical, run_eval_section  # noqa: E402
from benchmarks.kd_step import KDSettings, run_kd_section, trl_available  # noqa: E402
from benchmarks.memory import run_memory_section  # noqa: E402
from promptkd.allocator import keep_freed_memory  # noqa: E402

logger = logging.getLogger("benchmarks")

SECTIONS = ("kd", "eval", "memory")
ROOT = Path(__file__).resolve().parent.parent
TITLES = {
    "tiny": "Tiny random pair (smoke size)",
    "smollm2": "SmolLM2-135M-Instruct teacher and its layers=default student",
    "gpt2-reference": "Random GPT-2 large teacher, GPT-2 medium student (reference shapes)",
    "gpt2-tiny": "Random tiny GPT-2 pair (reference code path at smoke size)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", choices=SHAPES, default="smollm2", help="Teacher and student pair.")
    parser.add_argument("--sections", default="kd,eval,memory", help="Comma list of sections to run: kd, eval, memory.")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda.")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="Training precision (bf16: autocast, float32 weights).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; None leaves torch's choice.")

    parser.add_argument("--batch-size", type=int, default=4, help="Prompts per KD step.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Sampled response tokens per prompt (and greedy tokens in eval).")
    parser.add_argument("--max-length", type=int, default=512, help="Prompt plus response tokens; longer prompts lose context.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed KD rounds before the timed ones.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed KD rounds.")

    parser.add_argument(
        "--memory-prompt-widths", type=lambda text: [int(w) for w in text.split(",")], default=[32, 128, 480],
        help="Comma list of padded prompt widths (tokens) at which the loss memory is measured.",
    )

    parser.add_argument("--eval-records", type=int, default=32, help="Dolly test records decoded in the eval section.")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="Batch size of generate_greedy.")
    parser.add_argument("--eval-repeats", type=int, default=1, help="Timed rounds of both decoding loops.")

    parser.add_argument("--no-trl", action="store_true", help="Skip the TRL GKDTrainer comparison.")
    parser.add_argument("--no-bertscore", action="store_true", help="Skip the BERTScore timing.")
    parser.add_argument("--rss-check", action="store_true", help="Also measure loss memory as the peak RSS growth of fresh subprocesses (Linux).")
    parser.add_argument("--profile", action="store_true", help="Add a torch.profiler table of one PromptKD step.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Peak dense TFLOP/s for MFU where the built-in table has none.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the sampled responses.")

    parser.add_argument("--name", default=None, help="Results name; None gives <shapes>-<device>-<dtype>.")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results", help="Folder of the results JSON files.")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown file that gets the generated block.")
    parser.add_argument("--chart-dir", type=Path, default=ROOT / "docs", help="Folder of the PNG charts (benchmarks_<name>.png).")
    parser.add_argument("--render-only", action="store_true", help="Measure nothing: re-render markdown and charts from the results folder.")

    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats {args.repeats} or --warmup {args.warmup} is invalid: use --repeats 1 or more and --warmup 0 or more")
    return args


def run(args: argparse.Namespace) -> dict:
    """Run the requested sections and return the results dict."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    results = {
        "name": args.name or f"{args.shapes}-{device.type}-{args.dtype}",
        "title": TITLES[args.shapes] + f", {device.type} {args.dtype}",
        "command": "python -m benchmarks.bench " + shlex.join(sys.argv[1:]),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "shapes": args.shapes,
        "device": str(device),
        "dtype": args.dtype,
        "machine": machine_info(device),
    }

    logger.info("Loading the %s pair", args.shapes)
    pair = load_pair(args.shapes, device)
    results["pair"] = pair.describe()

    if "kd" in args.sections:
        logger.info("KD step section: %d warm-up and %d timed rounds", args.warmup, args.repeats)
        settings = KDSettings(
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
            warmup=args.warmup, repeats=args.repeats, dtype=args.dtype, seed=args.seed, peak_tflops=args.peak_tflops,
        )
        results["kd"] = run_kd_section(pair, settings, device, use_trl=not args.no_trl, profile=args.profile)

    if "eval" in args.sections:
        logger.info("Eval section: %d test records", args.eval_records)
        results["evaluation"] = run_eval_section(
            pair.fresh_student(), pair.tokenizer, device, num_records=args.eval_records, batch_size=args.eval_batch_size,
            max_new_tokens=args.max_new_tokens, max_length=args.max_length, repeats=args.eval_repeats,
            bertscore=not args.no_bertscore,
        )

    if "memory" in args.sections:
        logger.info("Memory section: prompt widths %s", args.memory_prompt_widths)
        results["memory"] = [
            run_memory_section(
                batch_size=args.batch_size,
                length=width + args.max_new_tokens,
                response_length=args.max_new_tokens,
                vocab_size=results["pair"]["vocab_size"],
                with_trl=not args.no_trl and trl_available(),
                with_rss=args.rss_check,
                device=device,
            )
            for width in args.memory_prompt_widths
        ]

    results["duration_s"] = time.time() - started
    results["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def render(results: dict, markdown: Path, chart_dir: Path) -> None:
    chart = chart_dir / f"benchmarks_{results['name']}.png"
    report.draw_chart(results, chart)
    relative = os.path.relpath(chart, markdown.parent)
    report.update_markdown(markdown, results["name"], report.render_block(results, relative))


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("transformers", "trl", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    if args.render_only:
        paths = sorted(args.results_dir.glob("*.json"))
        if not paths:
            raise SystemExit(f"No results JSON files in {args.results_dir}: run a benchmark first.")
        for path in paths:
            results = json.loads(path.read_text(encoding="utf-8"))
            if "pair" not in results:
                continue  # before/after files of benchmarks.ab_versions render their own block
            render(results, args.markdown, args.chart_dir)
            logger.info("Rendered %s", path)
        return

    # As in promptkd's command line, so TRL's steps and promptkd's run with the same malloc settings.
    keep_freed_memory()
    results = run(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{results['name']}.json"
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    render(results, args.markdown, args.chart_dir)
    logger.info("Wrote %s, %s and the chart in %s", path, args.markdown, args.chart_dir)
    if "evaluation" in results:
        check_identical(results["evaluation"])


if __name__ == "__main__":
    main()
