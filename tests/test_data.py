"""Tests of the Dolly data layer on the shipped real records, real tokenizers and real files."""

import hashlib
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from promptkd import data
from promptkd.data import DataError, DollyRecord

LONG_CONTEXT = " ".join(f"Sentence {i} of a long passage about the history of the airline." for i in range(60))


def make_record(instruction="What is the capital of France?", context="", response="Paris.", index=0, category="open_qa"):
    return DollyRecord(index=index, instruction=instruction, context=context, response=response, category=category)


def row(index=None, **overrides):
    values = {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}
    if index is not None:
        values["index"] = index
    values.update(overrides)
    return values


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(value) + "\n" for value in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shipped():
    return data.load_records("dolly")


def by_index(records):
    return {record.index: record for record in records}


# ----- shipped records -------------------------------------------------------------------------


def test_shipped_records_indices(shipped):
    indices = [record.index for record in shipped]
    assert len(shipped) == 3009
    assert indices == list(range(0, 2009)) + list(range(14000, 15000))
    assert all(isinstance(record.response, str) for record in shipped)


def test_shipped_checksums_match_readme():
    readme = (data.SHIPPED_DIR / "README.md").read_text(encoding="utf-8")
    for name in data.SHIPPED_FILES:
        digest = hashlib.sha256((data.SHIPPED_DIR / name).read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(name)}` \| `{digest}`", readme), f"{name}: sha256 {digest} not in README"


def test_shipped_split_sizes():
    train = data.load_split("dolly", "train")
    validation = data.load_split("dolly", "validation")
    test = data.load_split("dolly", "test")

    assert [record.index for record in train] == [i for i in range(2009) if i != 1012]
    assert [record.index for record in validation] == list(range(14000, 14500))
    assert [record.index for record in test] == list(range(14500, 15000))


def test_split_without_echo_filter():
    train = data.load_split("dolly", "train", drop_echo=False)
    assert len(train) == 2009
    assert train[1012].index == 1012


# ----- echo filter -----------------------------------------------------------------------------


def test_echo_real_records(shipped):
    records = by_index(shipped)
    assert data.is_echo(records[1012])
    assert [record.index for record in shipped if data.is_echo(record)] == [1012]


@pytest.mark.parametrize("index", [1, 129, 572, 882, 14105, 14207, 14320, 14869, 14704])
def test_echo_keeps_real_short_answers(shipped, index):
    record = by_index(shipped)[index]
    assert not data.is_echo(record), f"record {index} ({record.response!r}) is a real answer"


@pytest.mark.parametrize(
    "instruction, response, expected",
    [
        ("Name a fruit.", "", True),
        ("Name a fruit.", " \n\t ", True),
        ("Name a fruit.", "...!", True),
        ("What is the capital of France?", "what is the   capital of france", True),
        ("  Tell me about  Rome.  ", "TELL ME ABOUT ROME", True),
        ("“Quote this line”", "quote this line", True),
        ("List three colours. Red, green and blue are colours.", "Red, green and blue are colours.", True),
        ("Which is a species of fish? Tope or Rope", "Tope", False),
        ("Is 7 a prime number?", "Yes", False),
        ("What is 2 + 2?", "4", False),
        ("Name a fruit.", "Apple.", False),
    ],
)
def test_echo_hand_cases(instruction, response, expected):
    assert data.is_echo(make_record(instruction=instruction, response=response)) is expected


def test_normalize_text():
    assert data.normalize_text("  «Hello,\n\tWORLD!»  ") == "hello, world"
    assert data.normalize_text("?!") == ""


# ----- splits and limits -----------------------------------------------------------------------


def test_split_records_boundaries():
    records = [make_record(index=i) for i in (15000, 14999, 14500, 14499, 14000, 13999, 0)]
    assert [r.index for r in data.split_records(records, "train")] == [0, 13999]
    assert [r.index for r in data.split_records(records, "validation")] == [14000, 14499]
    assert [r.index for r in data.split_records(records, "test")] == [14500, 14999]


def test_split_unknown_name():
    with pytest.raises(ValueError, match="'dev'.*train, validation, test"):
        data.split_records([make_record()], "dev")


def test_partial_copy_keeps_ranges(tmp_path):
    rows = [row(index=i, response=f"Answer {i}.") for i in (5, 13999, 14000, 14001, 14600)]
    path = write_jsonl(tmp_path / "partial.jsonl", rows)

    assert [r.index for r in data.load_split(str(path), "train")] == [5, 13999]
    assert [r.index for r in data.load_split(str(path), "validation")] == [14000, 14001]
    assert [r.index for r in data.load_split(str(path), "test")] == [14600]


def test_limit_takes_first_by_index(tmp_path):
    rows = [row(index=i, response=f"Answer {i}.") for i in (9, 3, 7, 1)]
    path = write_jsonl(tmp_path / "unordered.jsonl", rows)

    assert [r.index for r in data.load_split(str(path), "train", limit=2)] == [1, 3]
    assert [r.index for r in data.load_split("dolly", "test", limit=3)] == [14500, 14501, 14502]


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_limit_invalid(limit):
    with pytest.raises(ValueError, match="limit="):
        data.load_split("dolly", "test", limit=limit)


def test_empty_split_names_range(tmp_path):
    path = write_jsonl(tmp_path / "train_only.jsonl", [row(index=i) for i in range(3)])
    with pytest.raises(DataError) as caught:
        data.load_split(str(path), "validation")
    message = str(caught.value)
    assert "'validation'" in message
    assert "14000-14499" in message
    assert "train_only.jsonl" in message
    assert "0-2" in message


def test_split_of_only_echoes_is_empty(tmp_path):
    path = write_jsonl(tmp_path / "echoes.jsonl", [row(instruction="Say hello.", response="Say hello")])
    assert len(data.load_split(str(path), "train", drop_echo=False)) == 1
    with pytest.raises(DataError, match="'train'"):
        data.load_split(str(path), "train")


# ----- templates -------------------------------------------------------------------------------


def test_dolly_template_with_context():
    record = make_record(instruction="When was it founded?", context="It was founded in 1990.")
    assert data.format_prompt(record) == "User: When was it founded?\nContext: It was founded in 1990.\nAssistant:"


def test_dolly_template_without_context():
    assert data.format_prompt(make_record(context="")) == "User: What is the capital of France?\nAssistant:"
    assert data.format_prompt(make_record(context=" \n ")) == "User: What is the capital of France?\nAssistant:"


def test_alpaca_template_with_context():
    record = make_record(instruction="Summarise the text.", context="A short text.")
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise the text.\n\n### Input:\nA short text.\n\n### Response:\n"
    )
    assert data.format_prompt(record, "alpaca") == expected


def test_alpaca_template_without_context():
    expected = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
    )
    assert data.format_prompt(make_record(), "alpaca") == expected


def test_format_target():
    record = make_record(response="  Paris.\n")
    assert data.format_target(record) == " Paris."
    assert data.format_target(record, "alpaca") == "Paris."


def test_unknown_template():
    with pytest.raises(ValueError, match="'chatml'.*dolly, alpaca"):
        data.format_prompt(make_record(), "chatml")
    with pytest.raises(ValueError, match="'chatml'"):
        data.format_target(make_record(), "chatml")


# ----- encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("template", data.TEMPLATES)
def test_encode_prompt_fits_unchanged(gpt2_tok, shipped, template):
    record = shipped[0]
    ids = data.encode_prompt(record, gpt2_tok, template)
    assert ids == gpt2_tok(data.format_prompt(record, template), add_special_tokens=False)["input_ids"]


def test_encode_prompt_cuts_context(gpt2_tok):
    record = make_record(instruction="When did the airline start?", context=LONG_CONTEXT)
    ids = data.encode_prompt(record, gpt2_tok, max_prompt_tokens=40)
    text = gpt2_tok.decode(ids)

    assert len(ids) == 40
    assert text.startswith("User: When did the airline start?\nContext: Sentence 0 of a long passage")
    assert text.endswith("\nAssistant:")
    assert "Sentence 59" not in text


@pytest.mark.parametrize("template", data.TEMPLATES)
def test_encode_prompt_cuts_instruction_last(gpt2_tok, template):
    instruction = "Explain " + "very " * 80 + "carefully."
    record = make_record(instruction=instruction, context=LONG_CONTEXT)
    budget = data.min_prompt_tokens(gpt2_tok, template) + 4
    ids = data.encode_prompt(record, gpt2_tok, template, max_prompt_tokens=budget)
    text = gpt2_tok.decode(ids)

    assert len(ids) == budget
    assert "Sentence" not in text
    assert "Explain very" in text
    assert "carefully" not in text
    assert text.endswith("\nAssistant:" if template == "dolly" else "\n\n### Response:\n")


def test_encode_prompt_budget_too_small(gpt2_tok):
    with pytest.raises(ValueError, match=r"max_prompt_tokens=3 .*Use at least 6"):
        data.encode_prompt(make_record(instruction="Explain " * 20), gpt2_tok, max_prompt_tokens=3)


def test_encode_example_masks_prompt(gpt2_tok, shipped):
    record = shipped[2]
    example = data.encode_example(record, gpt2_tok)
    prompt_length = example["prompt_length"]
    prompt_ids = data.encode_prompt(record, gpt2_tok)
    response_ids = gpt2_tok(" " + record.response, add_special_tokens=False)["input_ids"]

    assert example["input_ids"] == prompt_ids + response_ids + [gpt2_tok.eos_token_id]
    assert prompt_length == len(prompt_ids)
    assert example["labels"][:prompt_length] == [-100] * prompt_length
    assert example["labels"][prompt_length:] == response_ids + [gpt2_tok.eos_token_id]


def test_encode_example_cuts_context_first(gpt2_tok):
    response = "The airline started flying in 2000 with two aircraft on one route."
    record = make_record(instruction="When did the airline start?", context=LONG_CONTEXT, response=response)
    example = data.encode_example(record, gpt2_tok, max_length=60)
    ids = example["input_ids"]
    prompt_text = gpt2_tok.decode(ids[: example["prompt_length"]])

    assert len(ids) == 60
    assert "\nContext: Sentence 0" in prompt_text
    assert prompt_text.endswith("\nAssistant:")
    assert gpt2_tok.decode(ids[example["prompt_length"] :]) == " " + response + "<|endoftext|>"


def test_encode_example_cuts_response_keeps_eos(gpt2_tok):
    # GPT-2's pad token is its EOS token, so the EOS label must survive any masking of padding.
    assert gpt2_tok.pad_token_id == gpt2_tok.eos_token_id
    record = make_record(instruction="Tell a story.", context=LONG_CONTEXT, response=LONG_CONTEXT)
    example = data.encode_example(record, gpt2_tok, max_length=48)
    ids, labels = example["input_ids"], example["labels"]
    prompt_text = gpt2_tok.decode(ids[: example["prompt_length"]])

    assert len(ids) == 48
    assert prompt_text == "User: Tell a story.\nAssistant:"
    assert ids[-1] == gpt2_tok.eos_token_id
    assert labels[-1] == gpt2_tok.eos_token_id
    assert gpt2_tok.decode(ids[example["prompt_length"] : -1]).startswith(" Sentence 0 of a long passage")


def test_encode_example_too_short(gpt2_tok):
    with pytest.raises(ValueError, match="max_length=5 .*at least 8"):
        data.encode_example(make_record(), gpt2_tok, max_length=5)


@pytest.mark.parametrize("template", data.TEMPLATES)
def test_encode_shipped_within_limits(gpt2_tok, shipped, template):
    for record in shipped[:300] + shipped[-100:]:
        example = data.encode_example(record, gpt2_tok, template, max_length=96)
        prompt_length = example["prompt_length"]

        assert len(example["input_ids"]) <= 96
        assert example["input_ids"][-1] == gpt2_tok.eos_token_id
        assert example["input_ids"][:prompt_length] == data.encode_prompt(record, gpt2_tok, template, prompt_length)
        assert len(data.encode_prompt(record, gpt2_tok, template, max_prompt_tokens=64)) <= 64


def test_encode_example_smollm2(smollm2_tok, shipped):
    record = shipped[0]
    example = data.encode_example(record, smollm2_tok)
    prompt_length = example["prompt_length"]

    assert example["input_ids"][0] != smollm2_tok.bos_token_id
    assert example["input_ids"][:prompt_length] == data.encode_prompt(record, smollm2_tok)
    assert smollm2_tok.decode(example["input_ids"][:prompt_length]) == data.format_prompt(record)
    assert example["input_ids"][-1] == smollm2_tok.eos_token_id
    assert example["labels"][-1] == smollm2_tok.eos_token_id


# ----- collate_left ----------------------------------------------------------------------------


def test_collate_left_pads_on_left():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_length": 1},
        {"input_ids": [1, 2, 3, 4, 9], "labels": [-100, -100, 3, 4, 9], "prompt_length": 2},
    ]
    out = data.collate_left(batch, pad_token_id=0)

    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.dtype == torch.long for tensor in out.values())
    assert out["input_ids"].tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 9]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, -100, -100, 6, 7], [-100, -100, 3, 4, 9]]


def test_collate_left_without_labels(gpt2_tok, shipped):
    prompts = [{"input_ids": data.encode_prompt(record, gpt2_tok)} for record in shipped[1:3]]
    out = data.collate_left(prompts, pad_token_id=gpt2_tok.pad_token_id)
    lengths = [len(prompt["input_ids"]) for prompt in prompts]

    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape == (2, max(lengths))
    assert out["attention_mask"].sum(dim=1).tolist() == lengths
    assert out["input_ids"][0, -lengths[0] :].tolist() == prompts[0]["input_ids"]


def test_collate_left_invalid_batches():
    with pytest.raises(ValueError, match="empty batch"):
        data.collate_left([], pad_token_id=0)
    with pytest.raises(ValueError, match="only some examples have 'labels'"):
        data.collate_left([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], pad_token_id=0)
    with pytest.raises(ValueError, match="2 labels for 3 input ids"):
        data.collate_left([{"input_ids": [1, 2, 3], "labels": [2, 3]}], pad_token_id=0)


# ----- local files and bad records -------------------------------------------------------------


def bad_jsonl_cases():
    good = json.dumps(row())
    missing = row()
    del missing["context"]
    return [
        ("missing field", [good, json.dumps(missing)], 2, "context", "is missing"),
        ("non-string value", [good, good, json.dumps(row(response=42))], 3, "response", "must be a string, got int"),
        ("null value", [json.dumps(row(category=None))], 1, "category", "must be a string, got NoneType"),
        ("malformed line", [good, '{"instruction": "Hi", "context": ""'], 2, None, "malformed JSON"),
        ("not an object", [good, "[1, 2]"], 2, None, "expected a JSON object"),
        ("negative index", [json.dumps(row(index=-4))], 1, "index", "non-negative integer"),
        ("string index", [json.dumps(row(index="7"))], 1, "index", "non-negative integer"),
    ]


@pytest.mark.parametrize("case", bad_jsonl_cases(), ids=lambda case: case[0])
def test_bad_jsonl_records(tmp_path, case):
    _, lines, line_number, field, phrase = case
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(DataError) as caught:
        data.load_records(str(path))
    message = str(caught.value)
    assert f"{path}, line {line_number}:" in message
    assert phrase in message
    assert caught.value.line == line_number
    assert caught.value.field == field
    if field is not None:
        assert repr(field) in message


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(row()) + "\n\n" + json.dumps(row(instruction=3)) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"gaps.jsonl, line 3: field 'instruction'"):
        data.load_records(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.jsonl contains no records"):
        data.load_records(str(path))


def test_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match=r"absent.jsonl not found"):
        data.load_records(str(path))


def test_duplicate_index(tmp_path):
    path = write_jsonl(tmp_path / "twice.jsonl", [row(index=3), row(index=3)])
    with pytest.raises(DataError, match="index 3 appears more than once"):
        data.load_records(str(path))


def test_jsonl_index_defaults_to_row(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [row(response="A."), row(response="B."), row(index=14000)])
    records = data.load_records(str(path))
    assert [(r.index, r.response) for r in records] == [(0, "A."), (1, "B."), (14000, "Blue.")]


def test_json_array_file(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([row(response="A."), row(index=14500, response="B.")], indent=2), encoding="utf-8")
    records = data.load_records(str(path))
    assert [(r.index, r.response) for r in records] == [(0, "A."), (14500, "B.")]
    assert data.load_split(str(path), "test")[0].response == "B."


def test_json_array_bad_record_line(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([row(), row(), row(context=["x"])], indent=2), encoding="utf-8")
    object_lines = [number for number, line in enumerate(path.read_text().splitlines(), start=1) if line == "  {"]
    expected_line = object_lines[2]
    with pytest.raises(DataError) as caught:
        data.load_records(str(path))
    assert f"records.json, line {expected_line}: field 'context' must be a string, got list" in str(caught.value)


def test_json_array_malformed(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "Hi"},\n  {oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.json, line 3: malformed JSON"):
        data.load_records(str(path))


def test_json_lines_in_json_file(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", [row(), row(response="Red.")])
    assert [r.response for r in data.load_records(str(path))] == ["Blue.", "Red."]


def test_parquet_file(tmp_path):
    path = tmp_path / "records.parquet"
    pq.write_table(pa.Table.from_pylist([row(response="A."), row(response="B.")]), path)
    records = data.load_records(str(path))
    assert [(r.index, r.response) for r in records] == [(0, "A."), (1, "B.")]


def test_parquet_bad_type_names_row(tmp_path):
    path = tmp_path / "typed.parquet"
    table = pa.table(
        {
            "instruction": ["Name a colour.", "Name a number."],
            "context": ["", ""],
            "response": ["Blue.", "Two."],
            "category": [1, 2],
        }
    )
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"typed.parquet, row 1: field 'category' must be a string, got int"):
        data.load_records(str(path))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("instruction,context,response,category\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        data.load_records(str(path))


# ----- hub ids ---------------------------------------------------------------------------------


def test_hub_id_offline_fails_clearly():
    # conftest sets HF_HUB_OFFLINE=1 before datasets is imported, so this fails without a network request.
    with pytest.raises(DataError) as caught:
        data.load_records(data.HUB_ID)
    message = str(caught.value)
    assert data.HUB_ID in message
    assert "source 'dolly'" in message


def test_unknown_source_name():
    with pytest.raises(DataError, match="'not a source' is not 'dolly'"):
        data.load_records("not a source")


def test_prompt_room_names_max_length(smollm2_tok):
    needed = data.min_prompt_tokens(smollm2_tok, "dolly")

    assert data.check_prompt_room(smollm2_tok, "dolly", needed + 32, 32) == needed
    with pytest.raises(ValueError, match=rf"max_length=5 leaves 1 prompt tokens after max_new_tokens=4.*--max-length {needed + 4} or more"):
        data.check_prompt_room(smollm2_tok, "dolly", 5, 4)
