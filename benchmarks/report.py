"""Markdown tables and a PNG chart from a benchmark results JSON.

docs/benchmarks.md holds one generated block per results file, between the markers
`<!-- BEGIN GENERATED: <name> -->` and `<!-- END GENERATED: <name> -->`. Rendering replaces that
block and leaves the hand-written text around it alone; a missing block is appended.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# Targets, as ratios measured side by side in one run.
TARGET_SPEEDUP_VS_TRL = 1.5  # promptkd tokens/s over TRL's, at least
TARGET_OVERHEAD = 1.10  # step time over the sum of its unavoidable model passes, at most
TARGET_EVAL_SPEEDUP = 5.0  # batched over per-example greedy decoding, at least
TARGET_MEMORY_RATIO = 0.25  # promptkd loss peak over the naive full-sequence loss peak, at most
VERDICT_PROMPT_WIDTH = 128  # the memory target is judged at this prompt width (the ratio falls as prompts grow)

STAGE_LABELS = {
    "generation": "student generation (sampling, KV cache)",
    "teacher_forward": "teacher forward, no soft prompt",
    "prompted_teacher_forward_backward": "teacher forward + backward with soft prompt",
    "prompted_teacher_forward": "teacher forward with soft prompt, after the update",
    "student_forward_backward": "student forward + backward",
    "promptkd_baseline": "promptkd step, prompt tuning off",
    "promptkd_full": "promptkd step, prompt tuning on (PromptKD)",
    "trl_gkd": "TRL GKDTrainer step",
}


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _range(values: Optional[dict], digits: int = 2) -> str:
    """'median (min–max)' of a spread dict."""
    if not values:
        return "–"
    if values["n"] == 1:
        return _fmt(values["median"], digits)
    return f"{_fmt(values['median'], digits)} ({_fmt(values['min'], digits)}–{_fmt(values['max'], digits)})"


def _mib(value: Optional[float]) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _verdict(value: Optional[float], target: float, at_least: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if at_least else value <= target
    return "met" if met else "missed"


def block_name(results: dict) -> str:
    return results["name"]


# ----- sections ------------------------------------------------------------------------------------


def _layers(count: int) -> str:
    return f"{count} decoder layer" + ("" if count == 1 else "s")


def _machine_lines(results: dict) -> list[str]:
    machine = results["machine"]
    pair = results["pair"]
    load = machine.get("load_average_start")
    load_text = ", ".join(f"{value:.1f}" for value in load) if load else "unknown"
    lines = [
        f"- Command: `{results['command']}`",
        f"- Date (UTC): {results['started_utc']}, {results['duration_s'] / 60:.1f} min",
        f"- Machine: {machine['cpu']}, {machine['cpu_cores']} cores, torch threads {machine['torch_threads']}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
        f"- Load average (1, 5, 15 min) at start: {load_text}; at end: "
        + (", ".join(f"{value:.1f}" for value in results["load_average_end"]) if results.get("load_average_end") else "unknown"),
        f"- Versions: Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"accelerate {machine['accelerate']}, trl {machine['trl'] or 'not installed'}",
        f"- Models: teacher {pair['teacher']} ({pair['teacher_params'] / 1e6:.1f} M parameters, "
        f"{_layers(pair['teacher_layers'])}), student {pair['student']} "
        f"({pair['student_params'] / 1e6:.1f} M parameters, {_layers(pair['student_layers'])}), "
        f"vocabulary {pair['vocab_size']}",
        f"- Precision: {results['dtype']} on {results['device']}",
    ]
    return lines


def _kd_lines(kd: dict) -> list[str]:
    settings = kd["settings"]
    summary = kd["summary"]
    widths = [r["prompt_width"] for r in kd["rounds"][settings["warmup"] :]]
    lines = [
        "#### On-policy KD step throughput",
        "",
        f"Each round trains on one batch of {settings['batch_size']} Dolly train prompts, formed as promptkd's trainer "
        f"forms them (grouped by length). The padded prompt widths of the {settings['repeats']} timed rounds were "
        f"{', '.join(map(str, widths))} tokens, after {settings['warmup']} warm-up round(s), the first on a copy of the widest timed batch. Each step samples "
        f"{settings['max_new_tokens']} new tokens at temperature 1.0 and uses the forward KL. Tokens/s counts sampled "
        "response tokens (up to and including the first EOS) per second of a full optimizer step. \"All rounds\" is "
        "total tokens over total seconds, the training throughput over these batches. The per-round columns give "
        "the median and range of each round's own value.",
        "",
        "| trainer | s/step, median (min–max) | tokens/s, all rounds | tokens/s per round | vs TRL, all rounds | "
        "vs TRL per round | target ≥ 1.5× |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, values in summary["variants"].items():
        if name == "trl_gkd":
            total_text, ratio_text, verdict = "1.00", "1.00", ""
        elif f"{name}_vs_trl" in summary:
            total = summary[f"{name}_vs_trl_total"]
            total_text, ratio_text = _fmt(total), _range(summary[f"{name}_vs_trl"])
            verdict = _verdict(total, TARGET_SPEEDUP_VS_TRL, True) if name == "promptkd_baseline" else ""
        else:
            total_text, ratio_text, verdict = "–", "–", ""
        lines.append(
            f"| {STAGE_LABELS[name]} | {_range(values['seconds'])} | {_fmt(values['total_tokens_per_s'])} | "
            f"{_range(values['tokens_per_s'])} | {total_text} | {ratio_text} | {verdict} |"
        )
    if "passes_only_vs_trl_total" in summary:
        lines += [
            "",
            "Ceiling: the step with prompt tuning off cannot avoid sampling, the teacher forward and the student "
            "forward + backward, and TRL's step runs the same passes. A step made only of those passes, each as "
            f"timed alone, would reach {_fmt(summary['passes_only_vs_trl_total'])}× TRL's tokens/s over all rounds "
            f"({_range(summary['passes_only_vs_trl'])} per round).",
        ]
    if kd.get("trl"):
        lines += ["", f"TRL generation settings as run: `{kd['trl']['generation_kwargs']}`."]
    lines += ["", *_round_lines(kd)]

    lines += [
        "",
        "#### Step overhead",
        "",
        "Step wall time divided by the summed time of the model passes the step cannot avoid, each timed "
        "alone on the same batch in the same round.",
        "",
        "| step | passes in the denominator | overhead, all rounds | per round, median (min–max) | target ≤ 1.10 |",
        "|---|---|---:|---:|---|",
    ]
    for name, passes_text in (("full", "all five passes below"), ("baseline", "generation, teacher forward, student forward + backward")):
        total = summary[f"overhead_{name}_total"]
        lines.append(
            f"| {STAGE_LABELS['promptkd_' + name]} | {passes_text} | {_fmt(total, 3)} | "
            f"{_range(summary[f'overhead_{name}'], 3)} | {_verdict(total, TARGET_OVERHEAD, False)} |"
        )

    if kd["peak_flops"]:
        mfu_text = f"model FLOP/s over {_fmt(kd['peak_flops'] / 1e12, 0)} TFLOP/s ({kd['peak_flops_source']})"
    else:
        mfu_text = kd["peak_flops_source"]
    lines += [
        "",
        "#### Stages",
        "",
        "Medians over the timed rounds. Model FLOPs count 2 per parameter and position for a forward pass, "
        "with the decoder layers on every position and the output head only where it runs. The frozen teacher's "
        "forward + backward counts 4 and the student's 6. Attention score FLOPs are left out. "
        f"MFU: {mfu_text}. Peak memory is the tensor memory allocated by the stage, from one extra run after the "
        "timed rounds.",
        "",
        "| stage | s | response tokens/s | model GFLOP | achieved TFLOP/s | MFU | peak memory MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    peaks = kd.get("peak_memory_bytes", {})
    for row in kd["stages"]:
        mfu = "–" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        lines.append(
            f"| {STAGE_LABELS[row['stage']]} | {_fmt(row['seconds'], 3)} | {_fmt(row['tokens_per_s'], 1)} | "
            f"{_fmt(row['model_flops'] / 1e9, 1)} | {_fmt(row['achieved_tflops'], 4)} | {mfu} | {_mib(peaks.get(row['stage']))} |"
        )
    return lines


def _round_lines(kd: dict) -> list[str]:
    """Build the per-round table: prompt width, step times and the per-round ratios."""
    passes = ("generation", "teacher_forward", "prompted_teacher_forward_backward", "prompted_teacher_forward", "student_forward_backward")
    with_trl = "trl_gkd" in kd["summary"]["variants"]
    lines = [
        "| round | prompt width | "
        + ("TRL s | " if with_trl else "")
        + "promptkd, prompt tuning off, s | PromptKD s | sum of passes s | "
        + ("prompt tuning off vs TRL | " if with_trl else "")
        + "PromptKD overhead |",
    ]
    columns = 6 + (2 if with_trl else 0)
    lines.append("|" + "---:|" * columns)
    for record in kd["rounds"][kd["settings"]["warmup"] :]:
        baseline, full = record["promptkd_baseline"]["seconds"], record["promptkd_full"]["seconds"]
        pass_sum = sum(record["passes"]["seconds"][name] for name in passes)
        row = f"| {record['round']} | {record['prompt_width']} | "
        if with_trl:
            row += f"{_fmt(record['trl_gkd']['seconds'], 1)} | "
        row += f"{_fmt(baseline, 1)} | {_fmt(full, 1)} | {_fmt(pass_sum, 1)} | "
        if with_trl:
            trl = record["trl_gkd"]
            ratio = (record["promptkd_baseline"]["response_tokens"] / baseline) / (trl["response_tokens"] / trl["seconds"])
            row += f"{_fmt(ratio)} | "
        row += f"{_fmt(full / pass_sum, 3)} |"
        lines.append(row)
    return lines


def _eval_lines(evaluation: dict) -> list[str]:
    speedup = evaluation["speedup"]
    lines = [
        "#### Evaluation",
        "",
        f"Greedy decoding of the first {evaluation['num_records']} Dolly test prompts "
        f"({_range(evaluation['prompt_tokens'], 0)} prompt tokens), {evaluation['max_new_tokens']} new tokens, "
        f"{evaluation['dtype']}, with the student. Outputs identical: {'yes' if evaluation['identical'] else 'NO'} "
        f"({evaluation['mismatches']} mismatches).",
        "",
        "| decoding | s | speed-up | target ≥ 5× |",
        "|---|---:|---:|---|",
        f"| per-example `model.generate` loop | {_range(evaluation['per_example_s'])} | 1.00 | |",
        f"| `generate_greedy`, batch {evaluation['batch_size']} | {_range(evaluation['batched_s'])} | {_range(speedup)} | "
        f"{_verdict(speedup['median'], TARGET_EVAL_SPEEDUP, True)} |",
    ]
    bertscore = evaluation.get("bertscore")
    if bertscore and "error" not in bertscore:
        lines += [
            "",
            f"BERTScore F1 ({bertscore['model']}) of the {bertscore['pairs']} batched outputs: "
            f"{_fmt(bertscore['first_call_s'])} s on the first call (loads the model), "
            f"{_fmt(bertscore['second_call_s'])} s on a second call.",
        ]
    elif bertscore:
        lines += ["", f"BERTScore not timed: {bertscore['error']}"]
    return lines


def _memory_lines(memories: list[dict]) -> list[str]:
    first = memories[0]
    has_rss = any("rss_peak_growth_bytes" in values for memory in memories for values in memory["variants"].values())
    shape = first["shape"]
    lines = [
        "#### Loss memory",
        "",
        f"Peak tensor memory of the loss forward and backward, including the float32 logits of both models "
        f"and the gradient of the student's: B={shape['batch_size']}, R={shape['response_length']} response tokens, "
        f"V={shape['vocab_size']}, T = prompt width + R. promptkd's `kd_loss` works on the response logits (B, R, V), the naive "
        "float32 log-softmax of both models and TRL's `generalized_jsd_loss` (beta=0) on the full sequence (B, T, V). "
        f"Measured with {'torch.profiler (profile_memory=True) in this process' if first.get('device', 'cpu') == 'cpu' else 'torch.cuda.max_memory_allocated'}"
        + ("; the RSS columns are the growth of the peak RSS (VmHWM) of a fresh subprocess per variant, a cross-check." if has_rss else "."),
        "\"Loss working\" is the peak minus the logits the loss receives. \"vs naive\" compares peaks. "
        + (
            f"The target row is the {VERDICT_PROMPT_WIDTH}-token prompt."
            if any(m["shape"]["length"] - m["shape"]["response_length"] == VERDICT_PROMPT_WIDTH for m in memories)
            else f"No row is graded: the target applies to a {VERDICT_PROMPT_WIDTH}-token prompt, which this run did not measure."
        ),
        "",
        "| T (prompt + R) | loss | peak MiB | loss working MiB | vs naive | target ≤ 0.25 |" + (" RSS MiB | RSS vs naive |" if has_rss else ""),
        "|---:|---|---:|---:|---:|---|" + ("---:|---:|" if has_rss else ""),
    ]
    labels = {"promptkd": "promptkd `kd_loss`", "naive": "naive full-sequence", "trl_gkd": "TRL `generalized_jsd_loss`"}
    for memory in memories:
        length = memory["shape"]["length"]
        for name, values in memory["variants"].items():
            verdict = ""
            if name == "promptkd" and length - memory["shape"]["response_length"] == VERDICT_PROMPT_WIDTH:
                verdict = _verdict(values["peak_vs_naive"], TARGET_MEMORY_RATIO, False)
            row = (
                f"| {length} | {labels[name]} | {_mib(values['peak_bytes'])} | {_mib(values['loss_working_bytes'])} | "
                f"{_fmt(values['peak_vs_naive'], 3)} | {verdict} |"
            )
            if has_rss:
                row += f" {_mib(values.get('rss_peak_growth_bytes'))} | {_fmt(values.get('rss_vs_naive'), 3)} |"
            lines.append(row)
    return lines


def render_block(results: dict, chart_path: Optional[str]) -> str:
    """Markdown block for one results file."""
    lines = [f"### {results['title']}", ""] + _machine_lines(results) + [""]
    if chart_path:
        lines += [f"![{results['title']}]({chart_path})", ""]
    if "kd" in results:
        lines += _kd_lines(results["kd"]) + [""]
    if "evaluation" in results:
        lines += _eval_lines(results["evaluation"]) + [""]
    if "memory" in results:
        lines += _memory_lines(results["memory"]) + [""]
    if results["kd"].get("profile") if "kd" in results else False:
        lines += ["#### Profile of one PromptKD step (torch.profiler, top ops by self CPU time)", "", "```", results["kd"]["profile"].rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_markdown(path: Path, name: str, block: str) -> None:
    """Replace the generated block `name` in the markdown file, or append it."""
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    wrapped = f"{begin}\n{block}{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: wrapped, text)
    else:
        text = text.rstrip("\n") + "\n\n" + wrapped
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# ----- chart ----------------------------------------------------------------------------------------


def draw_chart(results: dict, path: Path) -> None:
    """Write a PNG with one panel per measured section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("kd", "overhead", "evaluation", "memory") if (name if name != "overhead" else "kd") in results]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        if panel == "kd":
            _bar_panel(axis, results["kd"]["summary"]["variants"], "response tokens/s, all rounds", "KD step throughput")
        elif panel == "overhead":
            _overhead_panel(axis, results["kd"])
        elif panel == "evaluation":
            evaluation = results["evaluation"]
            _simple_bars(axis, ["per-example", f"batch {evaluation['batch_size']}"],
                         [evaluation["per_example_s"]["median"], evaluation["batched_s"]["median"]],
                         "seconds", f"Greedy decoding, {evaluation['num_records']} prompts")
        elif panel == "memory":
            _memory_panel(axis, results["memory"])
    figure.suptitle(results["title"], fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _short(name: str) -> str:
    return {"trl_gkd": "TRL GKD", "promptkd_baseline": "promptkd\nbaseline", "promptkd_full": "PromptKD\n(full)"}.get(name, name)


def _bar_panel(axis, variants: dict, ylabel: str, title: str) -> None:
    """Bars of the total tokens/s over all timed rounds, labelled with their ratio to the first bar."""
    names = list(variants)
    totals = [variants[n]["total_tokens_per_s"] for n in names]
    bars = axis.bar([_short(n) for n in names], totals, color=["#999999", "#4c72b0", "#55a868"][: len(names)])
    for bar, total in zip(bars, totals):
        axis.annotate(f"{total / totals[0]:.2f}×", (bar.get_x() + bar.get_width() / 2, total), ha="center", va="bottom", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.tick_params(axis="x", labelsize=8)


def _overhead_panel(axis, kd: dict) -> None:
    """Pass times summed over the timed rounds, stacked, next to the summed PromptKD step times."""
    rounds = kd["rounds"][kd["settings"]["warmup"] :]
    passes = ["generation", "teacher_forward", "prompted_teacher_forward_backward", "prompted_teacher_forward", "student_forward_backward"]
    bottom = 0.0
    for stage in passes:
        total = sum(r["passes"]["seconds"][stage] for r in rounds)
        axis.bar(["sum of passes"], [total], bottom=[bottom], label=stage.replace("_", " "))
        bottom += total
    steps = sum(r["promptkd_full"]["seconds"] for r in rounds)
    axis.bar(["PromptKD steps"], [steps], color="#55a868")
    axis.set_ylim(0, 1.5 * max(steps, bottom))  # room for the legend above the bars
    axis.set_ylabel("seconds, all timed rounds")
    axis.set_title("Step time vs its model passes", fontsize=9)
    axis.legend(fontsize=6, loc="upper left")


def _memory_panel(axis, memories: list[dict]) -> None:
    """Peak MiB of each loss against T, one line per loss."""
    lengths = [memory["shape"]["length"] for memory in memories]
    for name in memories[0]["variants"]:
        axis.plot(lengths, [memory["variants"][name]["peak_bytes"] / 2**20 for memory in memories], marker="o", label=name)
    axis.set_xlabel("T = prompt + response tokens")
    axis.set_ylabel("peak MiB")
    axis.set_title("KD loss memory (fp32, forward + backward)", fontsize=9)
    axis.legend(fontsize=7)


def _simple_bars(axis, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    axis.bar([_short(label) for label in labels], values, color="#4c72b0")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.tick_params(axis="x", labelsize=8)
