"""Command line: python -m promptkd {prepare,sft,distill,evaluate,inspect,runs,pipeline,report}."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import yaml

from promptkd.allocator import keep_freed_memory
from promptkd.config import ConfigError, DistillConfig, EvalConfig, SFTConfig, home_dir, load_config
from promptkd.runs import RunError, list_runs, setup_logging

logger = logging.getLogger("promptkd.cli")

_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float, "Optional[str]": str}


# Settings of the shared base config that only the training loops read.
TRAINING_ONLY_FIELDS = ("train_limit", "log_every", "save_every", "stop_after_steps")
# The DistillConfig fields that `inspect` reads: data and template, the models, and the strategy settings.
INSPECT_FIELDS = (
    "dataset", "template", "max_length", "teacher", "student", "strategy", "kl_direction", "alpha",
    "alpha_start", "alpha_end", "top_k", "top_p", "fallback_temperature", "entropy_gamma", "gated_alpha_min",
    "gated_alpha_max", "scheduled_top_k_start", "scheduled_top_k_end", "scheduled_top_p_start", "scheduled_top_p_end",
)


def add_config_arguments(parser: argparse.ArgumentParser, cls, only: Optional[tuple] = None, exclude: tuple = ()) -> None:
    """Add one flag per dataclass field (--field-name), defaulting to None so unset flags don't override the file.

    `only` limits the flags to those fields and `exclude` leaves fields out, for commands that use part of a config.
    """
    parser.add_argument("--config", help="YAML or JSON file with field values; flags override it.")
    for spec in dataclasses.fields(cls):
        if (only is not None and spec.name not in only) or spec.name in exclude:
            continue
        flag = "--" + spec.name.replace("_", "-")
        help_text = spec.metadata.get("help", "")
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        if "Default:" not in help_text:  # a help text that explains its own default keeps that explanation only
            help_text = f"{help_text} (default: {default!r})"
        help_text = help_text.replace("%", "%%")
        if spec.type == "bool":
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif spec.type == "list":
            parser.add_argument(flag, dest=spec.name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=spec.name, type=_TYPES[spec.type], default=None, help=help_text)


def config_from_args(cls, args: argparse.Namespace):
    """Build the config from --config and the flags given; --resume without --config reuses the run's config.yaml."""
    overrides = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls) if getattr(args, spec.name, None) is not None}
    path = args.config
    if path is None and overrides.get("resume") and overrides.get("run_name"):
        root = Path(overrides["output_dir"]) if overrides.get("output_dir") else home_dir() / "runs"
        stored = root / overrides["run_name"] / "config.yaml"
        if stored.is_file():
            changed = sorted(set(overrides) - {"resume", "run_name", "output_dir"})
            logger.info("Resuming with the settings stored in %s", stored)
            if changed:
                logger.warning("Flags given with --resume override the stored settings: %s", ", ".join(changed))
            values = yaml.safe_load(stored.read_text(encoding="utf-8")) or {}
            # A pause at stop_after_steps applies to the invocation that asked for it, not to the resumption.
            values.pop("stop_after_steps", None)
            values.update(overrides)
            return load_config(cls, None, values)
    return load_config(cls, path, overrides)


def cli_command(command: str, config) -> str:
    """Return the shell command that reproduces `config` (fields that differ from the defaults only)."""
    defaults = type(config)()
    parts = ["python", "-m", "promptkd", command]
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if value == getattr(defaults, spec.name) or value is None:
            continue
        flag = "--" + spec.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + spec.name.replace("_", "-"))
        elif isinstance(value, list):
            parts.extend([flag, *map(_quote, map(str, value))])
        else:
            parts.extend([flag, _quote(str(value))])
    return " ".join(parts)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# -- commands ----------------------------------------------------------------------------------------


def cmd_prepare(args) -> int:
    from promptkd.models import GPT2_HUB_IDS, PRESETS, load_model, load_tokenizer, preset_folder

    if args.list:
        for name, description in PRESETS.items():
            print(f"{name:<24} {description}")
        return 0
    for name in args.presets:
        if name not in PRESETS:
            raise ConfigError(f"Unknown preset {name!r}: choose from {', '.join(PRESETS)}.")
        if name in GPT2_HUB_IDS:
            # Hub presets are downloaded into the Hugging Face cache once.
            load_tokenizer(name)
            load_model(name)
            print(f"{name}: cached from the hub ({GPT2_HUB_IDS[name]})")
        else:
            print(f"{name}: {preset_folder(name)}")
    return 0


def cmd_sft(args) -> int:
    from promptkd.sft import sft

    config = config_from_args(SFTConfig, args)
    run = sft(config)
    if run.is_main:
        print(f"SFT run {run.status.get('state')}: {run.path}")
    return exit_code(run)


def cmd_distill(args) -> int:
    from promptkd.distill import distill

    config = config_from_args(DistillConfig, args)
    run = distill(config)
    if run.is_main:
        print(f"Distillation run {run.status.get('state')}: {run.path}")
    return exit_code(run)


def exit_code(run) -> int:
    """0 for a completed run and for a clean stop with a checkpoint (signal or stop_after_steps), else 1."""
    return 0 if run.status.get("state") in ("completed", "stopped") else 1


def cmd_evaluate(args) -> int:
    from promptkd.evaluate import evaluate

    config = config_from_args(EvalConfig, args)
    run = evaluate(config)
    print((run.path / "results.md").read_text(encoding="utf-8"))
    print(f"Results: {run.path / 'results.json'}")
    return 0


def cmd_inspect(args) -> int:
    from promptkd.data import DollyRecord, load_split
    from promptkd.inspection import format_report, token_report
    from promptkd.models import load_model_and_tokenizer
    from promptkd.soft_prompt import load_soft_prompt

    config = config_from_args(DistillConfig, args)
    if args.instruction is not None:
        record = DollyRecord(index=-1, instruction=args.instruction, context=args.context or "", response=args.response or "", category="")
    else:
        split_records = load_split(config.dataset, args.split)
        if not split_records:
            raise ConfigError(f"The {args.split} split of {config.dataset} has no records: pick another --split.")
        records = [r for r in split_records if r.index == args.index] if args.index is not None else split_records[:1]
        if not records:
            indices = [r.index for r in split_records]
            raise ConfigError(
                f"--index {args.index} is not in the {args.split} split of {config.dataset}, whose {len(indices)} records "
                f"have indices {min(indices)}-{max(indices)} (echo responses dropped): pick an index in that range."
            )
        record = records[0]
    response = args.response if args.response is not None else record.response
    if not response:
        raise ConfigError("No response to inspect: pass --response TEXT or pick a record with a reference.")

    teacher, tokenizer = load_model_and_tokenizer(config.teacher)
    student = load_model_and_tokenizer(config.student)[0] if args.with_student else None
    soft_prompt = None
    if args.soft_prompt:
        path = Path(args.soft_prompt)
        soft_prompt = load_soft_prompt(path / "soft_prompt.safetensors" if path.is_dir() else path)
    report = token_report(teacher, student, tokenizer, record, config, soft_prompt=soft_prompt, response=response, top_n=args.top_n)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(f"Prompt: {report['prompt']!r}\n")
        print(format_report(report))
    return 0


def cmd_runs(args) -> int:
    root = Path(args.root) if args.root else home_dir() / "runs"
    if args.root and not root.is_dir():
        raise RunError(f"Runs folder {root} not found: pass an existing folder to --root, or leave it out for {home_dir() / 'runs'}.")
    runs = list_runs(root)
    if args.json:
        print(json.dumps(runs, indent=2, default=str))
        return 0
    if not runs:
        print(f"No runs under {root}.")
        return 0
    print(f"{'name':<36} {'command':<9} {'state':<10} {'step':>10} {'strategy':<28} last loss")
    for run in runs:
        step = f"{run['step'] or 0}/{run['total_steps'] or '?'}"
        loss = run["last_metrics"].get("loss")
        print(f"{run['name']:<36.36} {run['command'] or '':<9} {run['state'] or '':<10} {step:>10} {run['strategy'] or '':<28.28} {'' if loss is None else f'{loss:.4f}'}")
        if run["state"] == "failed" and run.get("error"):
            print(f"    error: {run['error']}")
    return 0


def cmd_pipeline(args) -> int:
    from promptkd.pipeline import PipelineConfig, run_pipeline

    config = config_from_args(PipelineConfig, args)
    table = run_pipeline(config)
    print(table)
    return 0


def cmd_report(args) -> int:
    from promptkd.report import make_report

    _, markdown = make_report(args.eval_runs, args.baseline, num_resamples=args.resamples, seed=args.seed, out=args.out)
    print(markdown)
    if args.out:
        print(f"Report: {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m promptkd", description="Prompt-based, uncertainty-aware knowledge distillation.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Logging level.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help: str, details: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=f"{help} {details}".strip(), parents=[common])

    prepare = add_command("prepare", "Convert or build preset models once (e.g. the offline SmolLM2 teacher).")
    prepare.add_argument("presets", nargs="*", default=["smollm2-135m-instruct"], help="Presets to prepare (default: smollm2-135m-instruct).")
    prepare.add_argument("--list", action="store_true", help="List the presets and exit.")
    prepare.set_defaults(func=cmd_prepare)

    sft_parser = add_command("sft", "Supervised fine-tuning on Dolly responses.")
    add_config_arguments(sft_parser, SFTConfig)
    sft_parser.set_defaults(func=cmd_sft)

    distill_parser = add_command("distill", "PromptKD distillation with a chosen strategy.")
    add_config_arguments(distill_parser, DistillConfig)
    distill_parser.set_defaults(func=cmd_distill)

    eval_parser = add_command("evaluate", "Greedy evaluation with EM, ROUGE-L and BERTScore.")
    add_config_arguments(eval_parser, EvalConfig, exclude=TRAINING_ONLY_FIELDS)
    eval_parser.set_defaults(func=cmd_evaluate)

    inspect = add_command(
        "inspect",
        "Per-token teacher entropy and top-k/top-p kept sets for a prompt and response.",
        "Schedules that move over training (dynamic_blend's alpha, scheduled_filter's top-k and top-p) are shown "
        "at their first step.",
    )
    add_config_arguments(inspect, DistillConfig, only=INSPECT_FIELDS)
    inspect.add_argument("--split", default="test", choices=["train", "validation", "test"], help="Split to pick the record from.")
    inspect.add_argument("--index", type=int, help="Original Dolly index of the record (default: the first of the split).")
    inspect.add_argument("--instruction", help="Inspect this instruction instead of a Dolly record.")
    inspect.add_argument("--context", help="Context for --instruction.")
    inspect.add_argument("--response", help="Response to inspect (default: the record's reference).")
    inspect.add_argument("--with-student", action="store_true", help="Also show the student's probability of each token.")
    inspect.add_argument("--soft-prompt", help="Soft prompt file, or a distillation run folder, to prepend to the teacher.")
    inspect.add_argument("--top-n", type=int, default=5, help="Kept tokens to list per position.")
    inspect.add_argument("--json", action="store_true", help="Print the report as JSON.")
    inspect.set_defaults(func=cmd_inspect)

    runs = add_command("runs", "List run folders with their state.")
    runs.add_argument("--root", help="Runs folder (default: $PROMPTKD_HOME/runs).")
    runs.add_argument("--json", action="store_true", help="Print JSON.")
    runs.set_defaults(func=cmd_runs)

    from promptkd.pipeline import PipelineConfig

    pipeline = add_command("pipeline", "The offline demo: prepare, SFT the student, distil with each strategy, evaluate all.")
    add_config_arguments(pipeline, PipelineConfig)
    pipeline.set_defaults(func=cmd_pipeline)

    report = add_command("report", "Mean ± std over evaluation runs (one per seed) and paired bootstrap tests against a baseline.")
    report.add_argument("--eval-runs", nargs="+", required=True, help="Evaluation run folders or run names under $PROMPTKD_HOME/runs, one per seed.")
    report.add_argument("--baseline", required=True, help="Label of the method the others are compared with (as in results.md, e.g. 'SFT student').")
    report.add_argument("--resamples", type=int, default=1000, help="Bootstrap resamples, at most 100000 (default: 1000).")
    report.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resampling (default: 0).")
    report.add_argument("--out", help="Markdown file to write; the JSON report goes next to it with the suffix .json.")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(logging, args.log_level))
    try:
        keep_freed_memory()
        return args.func(args)
    except (ConfigError, RunError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
