"""Multi-seed report over real tiny evaluation runs, the `report` command and the multi-seed pipeline."""

import json
import statistics

import pytest
import torch

from promptkd import data as dolly
from promptkd.cli import main
from promptkd.config import ConfigError, EvalConfig
from promptkd.evaluate import evaluate
from promptkd.models import TINY_LLAMA, tiny_model
from promptkd.pipeline import PipelineConfig
from promptkd.report import ReportError, build_report, load_eval_run, make_report, report_markdown
from promptkd.runs import read_json, read_jsonl
from promptkd.sft import response_loss_sum

LIMIT = 4
MAX_LENGTH = 128
FIT_STEPS = 6


def _save_tiny(folder, tokenizer, seed, fit_records=()):
    """Save a random tiny llama, first trained so that its greedy output for each of `fit_records` starts with the reference's first 3 tokens."""
    model = tiny_model(TINY_LLAMA, len(tokenizer), seed=seed)
    if fit_records:
        examples = []
        for record in fit_records:
            prompt = dolly.encode_prompt(record, tokenizer, "dolly", MAX_LENGTH - 3)
            start = tokenizer(" " + record.response.strip(), add_special_tokens=False)["input_ids"][:3]
            examples.append({"input_ids": prompt + start, "labels": [-100] * len(prompt) + start})
        batch = dolly.collate_left(examples, tokenizer.pad_token_id)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(FIT_STEPS):
            loss, tokens = response_loss_sum(model, batch)
            (loss / tokens).backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _evaluate(root, name, models, eval_limit=LIMIT, calibration=True):
    run = evaluate(EvalConfig(
        output_dir=str(root), run_name=name, models=models, eval_limit=eval_limit, max_new_tokens=3,
        max_length=MAX_LENGTH, batch_size=4, bertscore_model="none", calibration=calibration, mixed_precision="no",
    ))
    return run.path


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory, smollm2_tok):
    """Two evaluation runs standing for seeds 1 and 2. 'base' is a different random model in each run.
    'other' is trained to start the answers of all 4 prompts (run 1) or of 3 of them (run 2), so its
    scores are higher and differ between the runs. 'base again' evaluates the same model as 'base'."""
    root = tmp_path_factory.mktemp("report_runs")
    records = dolly.load_split("dolly", "test", limit=LIMIT)
    paths = []
    for run_seed, (base_seed, other_seed, fitted) in {1: (11, 12, records), 2: (21, 22, records[:1] + records[2:])}.items():
        base = _save_tiny(root / f"base-{run_seed}", smollm2_tok, base_seed)
        other = _save_tiny(root / f"other-{run_seed}", smollm2_tok, other_seed, fitted)
        models = [f"base={base}", f"other={other}", f"base again={base}"]
        paths.append(_evaluate(root / "runs", f"eval-s{run_seed}", models))
    return root, paths


def _per_prompt(path, label, metric):
    rows = [row for row in read_jsonl(path / "predictions.jsonl") if row["model"] == label]
    return {row["index"]: row[metric] for row in rows}


def test_report_means_and_stds_match_hand_computation(eval_runs):
    _, paths = eval_runs
    report = build_report([load_eval_run(path) for path in paths], "base", num_resamples=200, seed=0)
    assert report["num_runs"] == 2
    assert report["num_prompts"] == LIMIT
    assert report["metrics"] == ["em", "rouge_l"]  # BERTScore was off
    assert report["run_metrics"] == ["ece", "mean_entropy"]

    methods = {entry["label"]: entry for entry in report["methods"]}
    assert list(methods) == ["base", "other", "base again"]
    assert methods["other"]["mean"]["rouge_l"] > 0.0  # the fitted model overlaps the references
    assert methods["other"]["std"]["rouge_l"] > 0.0  # and scores differently in the two runs
    for label, entry in methods.items():
        for metric in ("em", "rouge_l"):
            per_run = [statistics.mean(_per_prompt(path, label, metric).values()) for path in paths]
            assert entry["per_run"][metric] == pytest.approx(per_run)
            assert entry["mean"][metric] == pytest.approx(statistics.mean(per_run))
            assert entry["std"][metric] == pytest.approx(statistics.stdev(per_run))
        eces = [next(row["ece"] for row in read_json(path / "results.json")["models"] if row["label"] == label) for path in paths]
        assert entry["mean"]["ece"] == pytest.approx(statistics.mean(eces))
        assert entry["std"]["ece"] == pytest.approx(statistics.stdev(eces))
    assert methods["base"]["vs_baseline"] is None


def test_report_difference_uses_seed_averaged_prompts(eval_runs):
    _, paths = eval_runs
    report = build_report([load_eval_run(path) for path in paths], "base", num_resamples=300, seed=5)
    other = next(entry for entry in report["methods"] if entry["label"] == "other")
    for metric in ("em", "rouge_l"):
        base_scores = [_per_prompt(path, "base", metric) for path in paths]
        other_scores = [_per_prompt(path, "other", metric) for path in paths]
        per_prompt_diffs = [
            statistics.mean(scores[index] for scores in other_scores) - statistics.mean(scores[index] for scores in base_scores)
            for index in base_scores[0]
        ]
        comparison = other["vs_baseline"][metric]
        assert comparison["diff"] == pytest.approx(statistics.mean(per_prompt_diffs))
        assert comparison["diff"] == pytest.approx(other["mean"][metric] - report["methods"][0]["mean"][metric])
        assert min(per_prompt_diffs) - 1e-9 <= comparison["ci_low"] <= comparison["ci_high"] <= max(per_prompt_diffs) + 1e-9
        assert 0.0 <= comparison["p_value"] <= 1.0
        assert comparison["significant"] == (comparison["ci_low"] > 0 or comparison["ci_high"] < 0)

    # 'other' was trained to start each answer in at least one run, so its run-averaged ROUGE-L beats the
    # random base on every prompt. Then every resample mean is positive, p = 0 and the interval excludes 0.
    rouge = other["vs_baseline"]["rouge_l"]
    rouge_diffs = [
        statistics.mean(_per_prompt(path, "other", "rouge_l")[index] - _per_prompt(path, "base", "rouge_l")[index] for path in paths)
        for index in _per_prompt(paths[0], "base", "rouge_l")
    ]
    assert min(rouge_diffs) > 0.0
    assert rouge["p_value"] == 0.0
    assert rouge["ci_low"] >= min(rouge_diffs) - 1e-9
    assert rouge["significant"]


def test_report_same_model_gives_zero_difference(eval_runs):
    _, paths = eval_runs
    report = build_report([load_eval_run(path) for path in paths], "base", num_resamples=200, seed=0)
    again = next(entry for entry in report["methods"] if entry["label"] == "base again")
    for metric in ("em", "rouge_l"):
        assert again["vs_baseline"][metric] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "significant": False}


def test_report_is_reproducible_with_seed(eval_runs):
    _, paths = eval_runs
    runs = [load_eval_run(path) for path in paths]
    assert build_report(runs, "base", num_resamples=150, seed=3) == build_report(runs, "base", num_resamples=150, seed=3)


def test_report_with_one_run_has_zero_std(eval_runs):
    _, paths = eval_runs
    report = build_report([load_eval_run(paths[0])], "base", num_resamples=100)
    assert all(value == 0.0 for entry in report["methods"] for value in entry["std"].values())


def test_markdown_marks_intervals_that_exclude_zero(eval_runs):
    _, paths = eval_runs
    report = build_report([load_eval_run(path) for path in paths], "base", num_resamples=200)
    text = report_markdown(report)
    assert "| method | EM | ROUGE-L | ECE | entropy |" in text
    assert "| method | ΔEM | ΔROUGE-L |" in text
    assert "2 evaluation runs: eval-s1 (seed 42), eval-s2 (seed 42)" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if " p=" in line or " p<" in line}
    assert set(rows) == {"other", "base again"}
    assert "+0.00 [0.00, 0.00] p=1" in rows["base again"]
    assert "*" in rows["other"]  # its ROUGE-L interval lies above 0
    assert "*" not in rows["base again"]
    for entry in report["methods"][1:]:
        cells = rows[entry["label"]].strip("| ").split(" | ")[1:]
        for cell, metric in zip(cells, report["metrics"]):
            assert ("*" in cell) == entry["vs_baseline"][metric]["significant"], (entry["label"], metric, cell)


def test_markdown_stars_a_known_shift():
    report = {
        "runs": [{"name": "a", "path": "a", "seed": 1}, {"name": "b", "path": "b", "seed": 2}],
        "num_runs": 2, "split": "test", "num_prompts": 3, "bertscore_model": None, "baseline": "base",
        "num_resamples": 1000, "bootstrap_seed": 0, "confidence_level": 0.95, "metrics": ["em"], "run_metrics": [],
        "methods": [
            {"label": "base", "mean": {"em": 10.0}, "std": {"em": 1.0}, "vs_baseline": None},
            {"label": "kd", "mean": {"em": 15.0}, "std": {"em": 0.0},
             "vs_baseline": {"em": {"diff": 5.0, "ci_low": 5.0, "ci_high": 5.0, "p_value": 0.0, "significant": True}}},
        ],
    }
    text = report_markdown(report)
    assert "| base | 10.00 ± 1.00 |" in text
    assert "| kd | +5.00* [5.00, 5.00] p<0.002 |" in text


def test_different_prompt_sets_name_both_runs(eval_runs, smollm2_tok):
    root, paths = eval_runs
    short = _evaluate(root / "runs", "eval-short", [f"base={root / 'base-1'}"], eval_limit=LIMIT - 1, calibration=False)
    with pytest.raises(ReportError, match="eval-s1 .*eval-short.*different prompt indices"):
        build_report([load_eval_run(paths[0]), load_eval_run(short)], "base")


def test_report_rejects_unknown_baseline_and_repeated_run(eval_runs):
    _, paths = eval_runs
    runs = [load_eval_run(path) for path in paths]
    with pytest.raises(ReportError, match="Baseline 'teacher' is not an evaluated method"):
        build_report(runs, "teacher")
    with pytest.raises(ReportError, match="listed twice"):
        build_report([runs[0], load_eval_run(paths[0])], "base")


def test_load_eval_run_needs_predictions(tmp_path):
    with pytest.raises(ReportError, match="no evaluation results.json"):
        load_eval_run(tmp_path)


def test_report_command_writes_markdown_and_json(eval_runs, tmp_path, capsys):
    _, paths = eval_runs
    out = tmp_path / "seeds.md"
    args = ["report", "--eval-runs", str(paths[0]), str(paths[1]), "--baseline", "base", "--resamples", "200", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ΔROUGE-L" in printed
    assert out.read_text(encoding="utf-8") in printed
    saved = json.loads((tmp_path / "seeds.json").read_text(encoding="utf-8"))
    assert saved["baseline"] == "base"
    assert saved["num_resamples"] == 200
    assert saved == make_report([str(paths[0]), str(paths[1])], "base", num_resamples=200)[0]


def test_report_command_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--eval-runs", "--baseline", "--resamples", "--seed", "--out"):
        assert flag in help_text


def test_report_command_errors_exit_2(eval_runs, capsys):
    _, paths = eval_runs
    assert main(["report", "--eval-runs", str(paths[0]), "--baseline", "nobody"]) == 2
    assert "Baseline 'nobody' is not an evaluated method" in capsys.readouterr().err
    assert main(["report", "--eval-runs", "no-such-run", "--baseline", "base"]) == 2
    assert "Evaluation run 'no-such-run' not found" in capsys.readouterr().err


@pytest.mark.parametrize("seeds, message", [(["1", "1"], "repeats a seed"), (["x"], "'x', which is invalid"), ([-1], "-1")])
def test_pipeline_rejects_bad_seeds(seeds, message):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig(seeds=seeds).validate()


def test_pipeline_parses_seed_strings():
    config = PipelineConfig(seeds=["3", "1"])
    config.validate()
    assert config.seeds == [3, 1]


def test_pipeline_report_needs_two_prompts():
    with pytest.raises(ConfigError, match="eval_limit=1 is too small"):
        PipelineConfig(seeds=[1, 2], eval_limit=1).validate()


def test_pipeline_with_two_seeds(tmp_path, capsys):
    root = tmp_path / "runs"
    args = ["pipeline", "--teacher", "tiny-llama", "--student", "tiny-llama:layers=0", "--output-dir", str(root),
            "--train-limit", "2", "--eval-limit", "2", "--sft-steps", "1", "--sft-batch-size", "2", "--distill-steps", "1",
            "--distill-batch-size", "2", "--strategies", "baseline", "--max-length", "96", "--eval-batch-size", "2",
            "--bertscore-model", "none", "--mixed-precision", "no", "--seeds", "1", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| method | EM | ROUGE-L | ECE | entropy |" in printed
    assert "Difference from PromptKD baseline" in printed

    names = sorted(path.name for path in root.iterdir())
    assert names == ["demo-report.json", "demo-report.md", "demo-s1-baseline", "demo-s1-eval", "demo-s2-baseline", "demo-s2-eval", "demo-sft"]
    assert read_json(root / "demo-s2-baseline" / "status.json")["state"] == "completed"
    report = read_json(root / "demo-report.json")
    assert [run["seed"] for run in report["runs"]] == [1, 2]
    assert report["baseline"] == "PromptKD baseline"
    # Teacher and the shared SFT student decode greedily with the same weights in both seeds.
    for entry in report["methods"][:2]:
        assert entry["label"] in ("teacher", "SFT student")
        assert all(value == 0.0 for value in entry["std"].values()), entry


def test_report_rejects_too_many_resamples(eval_runs):
    _, paths = eval_runs
    runs = [load_eval_run(path) for path in paths]

    with pytest.raises(ReportError, match="num_resamples=100001 is invalid: use a whole number from 1 to 100000"):
        build_report(runs, "base", num_resamples=100_001)
