"""The app's Compare and Inspect tabs driven through a real Gradio server with the tiny presets."""

import socket

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from promptkd.data import load_split
from promptkd.webui import build_app

TEACHER = "tiny-llama"
STUDENT = "tiny-llama:layers=0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """Serve the app on 127.0.0.1 and yield (url, Blocks), so tests can read the app's model cache."""
    runs = tmp_path_factory.mktemp("webui_compare") / "runs"
    demo = build_app(root=runs)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", demo
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    client = Client(app[0], verbose=False, analytics_enabled=False)
    yield client
    client.close()


@pytest.fixture(scope="module")
def record():
    return load_split("dolly", "test", limit=1)[0]


def compare(client, record, models, **decoding):
    settings = dict(max_new_tokens=6, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=0, bertscore="offline")
    settings.update(decoding)
    return client.predict(
        record.instruction, record.context, record.response, record.index, models,
        settings["max_new_tokens"], settings["do_sample"], settings["temperature"], settings["top_k"],
        settings["top_p"], settings["seed"], settings["bertscore"], api_name="/compare",
    )


def test_pick_and_search_records(client, record):
    instruction, context, reference = client.predict(record.index, api_name="/compare_pick")
    assert instruction == record.instruction
    assert reference == record.response

    word = record.instruction.split()[-1].strip("?.!,")
    found = client.predict(word, api_name="/compare_search")
    assert found["value"] is not None
    assert any(choice[1] == record.index for choice in found["choices"])

    with pytest.raises(AppError) as error:
        client.predict(13, api_name="/compare_pick")
    assert "not in the test split" in str(error.value)


def test_compare_two_models_greedy(app, client, record):
    first = compare(client, record, [TEACHER, STUDENT])
    boxes, table, result = first[:4], first[4], first[5]
    assert boxes[0]["label"] == TEACHER
    assert boxes[1]["label"] == STUDENT
    assert boxes[2]["visible"] is False
    assert [row["model"] for row in result["models"]] == [TEACHER, STUDENT]
    for row in result["models"]:
        assert 1 <= row["new_tokens"] <= 6
        assert row["output"] == boxes[result["models"].index(row)]["value"]
        assert 0.0 <= row["rouge_l"] <= 100.0
        assert 0.0 <= row["bertscore"] <= 100.0
    assert result["bertscore_model"].startswith("all-MiniLM-L6-v2")
    assert len(table["data"]) == 2

    # Greedy decoding is deterministic, and the cached models are reused rather than loaded again.
    cache = app[1].promptkd_context.models
    loads = cache.loads
    again = compare(client, record, [TEACHER, STUDENT])
    assert [row["output"] for row in again[5]["models"]] == [row["output"] for row in result["models"]]
    assert cache.loads == loads
    assert set(cache.cached_specs()) >= {TEACHER, STUDENT}


def test_compare_sampling_is_seeded(client, record):
    runs = [compare(client, record, [TEACHER, STUDENT], do_sample=True, seed=7, bertscore="none")[5] for _ in range(2)]
    assert [row["output"] for row in runs[0]["models"]] == [row["output"] for row in runs[1]["models"]]
    assert runs[0]["decoding"]["seed"] == 7
    assert runs[0]["models"][0]["bertscore"] is None


def test_compare_rejects_bad_model_choices(client, record, tmp_path):
    with pytest.raises(AppError) as error:
        compare(client, record, [TEACHER])
    assert "choose between 2 and 4 models" in str(error.value)

    with pytest.raises(AppError) as error:
        compare(client, record, [TEACHER, str(tmp_path)])
    assert "outside the app's folders" in str(error.value)

    with pytest.raises(AppError) as error:
        compare(client, record, [TEACHER, "no-such-model"])
    assert "not a preset" in str(error.value)


def inspect(client, record, response, student_a=STUDENT, student_b="", soft_prompt="", top_k=5, top_p=0.9):
    return client.predict(
        "test", record.index, record.instruction, record.context, response, TEACHER, student_a, student_b,
        soft_prompt, "ta_filter", top_k, top_p, 2.0, 0.7, 3, api_name="/inspect",
    )


def test_inspect_reference(client, record):
    summary, highlighted, heatmap, movement, table, report = inspect(client, record, record.response)
    count = len(report["tokens"])
    assert count > 1
    assert [item["token"] for item in highlighted] == report["tokens"]
    for value in report["normalized_entropy"]:
        assert 0.0 <= value <= 1.0
    for item in highlighted:
        assert 0.0 <= item["class_or_confidence"] <= 1.0
    for size, fallback in zip(report["kept_size"], report["fallback"]):
        if not fallback:
            assert 1 <= size <= 5
    for kept in report["kept_tokens"]:
        assert len(kept) <= 3
    for p_t, p_s in zip(report["teacher_prob"], report["student_prob"]):
        assert 0.0 <= p_t <= 1.0
        assert 0.0 <= p_s <= 1.0
    assert len(table["data"]) == count
    assert heatmap["type"] == "plotly"
    assert f"{count} response tokens" in summary


def test_inspect_two_students(client, record):
    response = "A typed answer for the inspector."
    *_, movement, table, report = inspect(client, record, response, student_a=STUDENT, student_b=TEACHER)
    assert report["student_b"] == TEACHER
    # Student B is the teacher itself, so its probabilities equal the teacher's on every token.
    for p_t, p_b in zip(report["teacher_prob"], report["student_b_prob"]):
        assert p_b == pytest.approx(p_t, rel=1e-4, abs=1e-7)
    deltas = [row[10] for row in table["data"]]
    assert all(delta >= -1e-6 for delta in deltas)
    assert '"type":"bar"' in movement["plot"].replace(" ", "")


def test_inspect_rejects_bad_inputs(client, record, tmp_path):
    with pytest.raises(AppError) as error:
        inspect(client, record, "")
    assert "response is empty" in str(error.value)

    with pytest.raises(AppError) as error:
        inspect(client, record, "text", soft_prompt=str(tmp_path))
    assert "outside the app's folders" in str(error.value)

    with pytest.raises(AppError) as error:
        inspect(client, record, "text", student_a="tiny-gpt2:layers=0")
    assert "cannot be compared with teacher" in str(error.value)


def test_inspect_generated_response(client, record):
    output = client.predict(record.instruction, record.context, STUDENT, api_name="/inspect_generate")
    assert isinstance(output, str)
    reference = client.predict("test", record.index, api_name="/inspect_use_reference")
    assert reference == record.response
