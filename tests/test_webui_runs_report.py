"""The Runs tab's significance report over real tiny evaluation runs, driven through a real Gradio server."""

import socket

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from promptkd.config import EvalConfig
from promptkd.evaluate import evaluate
from promptkd.models import TINY_LLAMA, tiny_model
from promptkd.report import METRIC_NAMES, build_report, load_eval_run, report_markdown
from promptkd.significance import MAX_RESAMPLES, format_p_value
from promptkd.webui import build_app
from promptkd.webui.runs_tab import DIFFERENCE_HEADERS

LIMIT = 4
LABELS = ("SFT student", "PromptKD baseline", "PromptKD soft_blend")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _evaluate(runs, name, seed, models, eval_limit=LIMIT):
    evaluate(EvalConfig(
        output_dir=str(runs), run_name=name, seed=seed, models=models, eval_limit=eval_limit, max_new_tokens=3,
        max_length=128, batch_size=4, bertscore_model="none", calibration=False, mixed_precision="no",
    ))


@pytest.fixture(scope="module")
def app(tmp_path_factory, smollm2_tok):
    """Two evaluation runs (seeds 1 and 2) of three random tiny models each, a third run on fewer prompts, and the app."""
    root = tmp_path_factory.mktemp("webui_report")
    runs = root / "runs"
    for seed in (1, 2):
        models = []
        for offset, label in enumerate(LABELS):
            folder = root / f"model-s{seed}-{offset}"
            tiny_model(TINY_LLAMA, len(smollm2_tok), seed=10 * seed + offset).save_pretrained(folder)
            smollm2_tok.save_pretrained(folder)
            models.append(f"{label}={folder}")
        _evaluate(runs, f"eval-s{seed}", seed, models)
    _evaluate(runs, "eval-short", 3, models, eval_limit=LIMIT - 1)

    demo = build_app(root=runs)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)
    yield client, runs
    client.close()
    demo.close()


def test_report_methods_default_baseline(app):
    client, _ = app
    update = client.predict(["eval-s1", "eval-s2"], api_name="/runs_report_methods")
    assert [choice[0] for choice in update["choices"]] == list(LABELS)
    assert update["value"] == "PromptKD baseline"


def test_report_matches_report_command(app):
    client, runs = app
    markdown, table = client.predict(["eval-s1", "eval-s2"], "PromptKD baseline", 200, api_name="/runs_report")

    expected = build_report([load_eval_run(runs / "eval-s1"), load_eval_run(runs / "eval-s2")], "PromptKD baseline", num_resamples=200)
    assert markdown.strip() == report_markdown(expected).strip()
    assert table["headers"] == DIFFERENCE_HEADERS
    rows = {(row[0], row[1]): row for row in table["data"]}
    assert {label for label, _ in rows} == {"SFT student", "PromptKD soft_blend"}
    for entry in expected["methods"]:
        for metric, comparison in (entry["vs_baseline"] or {}).items():
            row = rows[(entry["label"], METRIC_NAMES[metric])]
            assert row[2] == pytest.approx(comparison["diff"], abs=1e-4)
            assert row[3] == pytest.approx(comparison["ci_low"], abs=1e-4)
            assert row[4] == pytest.approx(comparison["ci_high"], abs=1e-4)
            assert row[5] == format_p_value(comparison["p_value"], 200)
            assert row[6] == comparison["significant"]


def test_report_errors_name_value(app):
    client, _ = app
    with pytest.raises(AppError, match="'eval-s9' not found"):
        client.predict(["eval-s1", "eval-s9"], "PromptKD baseline", 200, api_name="/runs_report")
    with pytest.raises(AppError, match="10 is less than minimum value 100"):  # the Number field checks its minimum
        client.predict(["eval-s1", "eval-s2"], "PromptKD baseline", 10, api_name="/runs_report")
    with pytest.raises(AppError, match=f"greater than maximum value {MAX_RESAMPLES}"):
        client.predict(["eval-s1", "eval-s2"], "PromptKD baseline", 10**9, api_name="/runs_report")
    with pytest.raises(AppError, match="'teacher' is not an evaluated method"):
        client.predict(["eval-s1", "eval-s2"], "teacher", 200, api_name="/runs_report")
    with pytest.raises(AppError, match="No evaluation run selected"):
        client.predict([], "PromptKD baseline", 200, api_name="/runs_report")
    with pytest.raises(AppError) as error:
        client.predict(["eval-s1", "eval-short"], "PromptKD baseline", 200, api_name="/runs_report")
    assert "eval-short" in str(error.value)
