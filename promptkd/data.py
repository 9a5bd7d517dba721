"""Dolly records: loading, the echo filter, index splits, prompt templates and token encoding.

Sources: the real Dolly records shipped in promptkd/data/dolly (offline), a hub id loaded with
`datasets`, or a local .jsonl/.json/.parquet file with the Dolly fields. The standard split is by
the record's row index in databricks-dolly-15k (see SPLIT_RANGES).
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

HUB_ID = "databricks/databricks-dolly-15k"
SHIPPED_SOURCE = "dolly"
SHIPPED_DIR = Path(__file__).parent / "data" / "dolly"
SHIPPED_FILES = ("train_head.jsonl", "validation_14000_14499.jsonl", "test_14500_14999.jsonl")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# Inclusive ranges of the original row index in databricks-dolly-15k (15,011 rows; rows 15000+ are unused).
SPLIT_RANGES = {"train": (0, 13999), "validation": (14000, 14499), "test": (14500, 14999)}

TEXT_FIELDS = ("instruction", "context", "response", "category")
IGNORE_INDEX = -100  # label value that torch's cross-entropy skips

TEMPLATES = ("dolly", "alpaca")
ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)

# An echo's normalised response must cover at least this share of the normalised instruction's characters.
# Real short answers quoted from the instruction cover at most 0.37 of it in the shipped records
# ("Tope" of "Which is a species of fish? Tope or Rope" covers 0.10); the one real echo covers 0.58.
ECHO_MIN_COVERAGE = 0.5


@dataclass(frozen=True)
class DollyRecord:
    """One Dolly record; `index` is its row in databricks-dolly-15k (or in the source file)."""

    index: int
    instruction: str
    context: str
    response: str
    category: str


class DataError(ValueError):
    """Invalid or unavailable Dolly data. The message names the source and, for a bad record, its line or row and field."""

    def __init__(self, message: str, source: str = "", line: Optional[int] = None, field: Optional[str] = None):
        super().__init__(message)
        self.source = source
        self.line = line
        self.field = field


# ----- loading ---------------------------------------------------------------------------------


def load_records(source: str = SHIPPED_SOURCE) -> list[DollyRecord]:
    """Load all records of a source, sorted by index.

    `source` is "dolly" (the shipped real records), a local .jsonl/.json/.parquet file, or a hub id
    such as "databricks/databricks-dolly-15k" (its `train` split; index = row number).
    Files need the string fields instruction, context, response and category. An integer `index`
    field is kept when present, else the record's 0-based row in the file is used.
    Raises DataError for an invalid record, a duplicate index or an empty source, and
    FileNotFoundError for a missing file.
    """
    path = Path(source)
    if source == SHIPPED_SOURCE:
        records = []
        for name in SHIPPED_FILES:
            records.extend(_load_file(SHIPPED_DIR / name))
    elif path.is_file() or path.suffix.lower() in FILE_SUFFIXES:
        records = _load_file(path)
    elif path.is_dir():
        raise DataError(f"{source} is a folder: give a .jsonl, .json or .parquet file inside it.", source)
    elif HUB_ID_PATTERN.fullmatch(source):
        records = _load_hub(source)
    else:
        raise DataError(
            f"Dolly source {source!r} is not '{SHIPPED_SOURCE}', an existing file or a hub id (owner/name): "
            f"use '{SHIPPED_SOURCE}' for the shipped records, '{HUB_ID}', or a .jsonl/.json/.parquet file.",
            source,
        )

    _check_unique_indices(records, source)
    return sorted(records, key=lambda record: record.index)


def _load_file(path: Path) -> list[DollyRecord]:
    if not path.is_file():
        raise FileNotFoundError(
            f"Dolly file {path} not found. Give an existing .jsonl/.json/.parquet file, "
            f"'{SHIPPED_SOURCE}' for the shipped records, or a hub id such as '{HUB_ID}'."
        )

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    elif suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
    else:
        raise DataError(f"{path} has an unsupported file type {suffix!r}: use .jsonl, .json or .parquet.", str(path))

    unit = "row" if suffix == ".parquet" else "line"
    records = [_make_record(row, position, str(path), line, unit) for position, (line, row) in enumerate(rows)]
    if not records:
        raise DataError(f"{path} contains no records: add one JSON object (or parquet row) per record.", str(path))
    logger.info("Loaded %d records from %s", len(records), path)
    return records


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Return an iterator of (1-based line, value) over the records of a JSON Lines or JSON array file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}): save it as UTF-8 JSON.", str(path)) from error

    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _json_array_rows(path, text)
    return _json_lines_rows(path, text)


def _json_lines_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {line_number}: malformed JSON ({error.msg} at column {error.colno}). "
                "The file must be JSON Lines (one JSON object with the Dolly fields per line)"
                + (" or, for .json, one JSON array of such objects." if path.suffix.lower() == ".json" else "."),
                str(path),
                line_number,
            ) from error
        yield line_number, value


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}, line {error.lineno}: malformed JSON ({error.msg} at column {error.colno}).",
            str(path),
            error.lineno,
        ) from error

    # The text is valid JSON, so a scan with raw_decode finds where each array element starts.
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    for value in values:
        while text[position] in " \t\r\n,":
            position += 1
        line_number = text.count("\n", 0, position) + 1
        _, position = decoder.raw_decode(text, position)
        yield line_number, value


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for row_number, row in enumerate(table.to_pylist(), start=1):
        yield row_number, row


def _load_hub(hub_id: str) -> list[DollyRecord]:
    import datasets

    logger.info("Loading %s (split 'train') from the Hugging Face Hub", hub_id)
    try:
        dataset = datasets.load_dataset(hub_id, split="train")
    except Exception as error:  # datasets raises many types here: offline, not found, auth, network
        raise DataError(
            f"Could not load the dataset {hub_id!r} from the Hugging Face Hub: {type(error).__name__}: {error}. "
            f"Without hub access use source '{SHIPPED_SOURCE}' (the shipped real records) or a local "
            ".jsonl/.json/.parquet file; a local file path must exist.",
            hub_id,
        ) from error

    records = [_make_record(row, position, hub_id, position + 1, "row") for position, row in enumerate(dataset)]
    if not records:
        raise DataError(f"The dataset {hub_id!r} has no rows in its 'train' split.", hub_id)
    return records


def _make_record(row: Any, position: int, source: str, line: int, unit: str = "line") -> DollyRecord:
    """Validate one raw row and build its record.

    `position` is the 0-based row (the default index); `line` is the 1-based line or row named in
    errors, and `unit` names which of the two it is.
    """
    where = f"{source}, {unit} {line}"
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected a JSON object with the Dolly fields, got {type(row).__name__}.", source, line
        )

    values = {}
    for name in TEXT_FIELDS:
        if name not in row:
            raise DataError(
                f"{where}: field {name!r} is missing. Every record needs the string fields "
                f"{', '.join(TEXT_FIELDS)} (use \"\" for an empty context).",
                source,
                line,
                name,
            )
        if not isinstance(row[name], str):
            raise DataError(
                f"{where}: field {name!r} must be a string, got {type(row[name]).__name__} {row[name]!r:.60}.",
                source,
                line,
                name,
            )
        values[name] = row[name]

    index = row.get("index", position)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise DataError(
            f"{where}: field 'index' must be a non-negative integer (the row in databricks-dolly-15k), got {index!r}. "
            "Remove it to number the records by their row in the file.",
            source,
            line,
            "index",
        )
    return DollyRecord(index=index, **values)


def _check_unique_indices(records: list[DollyRecord], source: str) -> None:
    seen = set()
    for record in records:
        if record.index in seen:
            raise DataError(
                f"{source}: index {record.index} appears more than once. Each record needs a unique index.",
                source,
                field="index",
            )
        seen.add(record.index)


# ----- echo filter and splits -------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Lowercase, collapse whitespace runs to one space and strip surrounding punctuation and whitespace."""
    text = re.sub(r"\s+", " ", text.lower())
    start, end = 0, len(text)
    while start < end and _is_punctuation_or_space(text[start]):
        start += 1
    while end > start and _is_punctuation_or_space(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_punctuation_or_space(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def is_echo(record: DollyRecord) -> bool:
    """Return whether the response only repeats the instruction.

    With normalize_text applied to both (lowercase, collapsed whitespace, surrounding punctuation
    and whitespace stripped), a record is an echo when:
      1. the response is empty, or
      2. the response equals the instruction, or
      3. the response is contained in the instruction and covers at least ECHO_MIN_COVERAGE (half)
         of its characters.
    Rule 3 keeps real answers quoted from the instruction, such as "Tope" for "Which is a species
    of fish? Tope or Rope". Records dropped per rule in the shipped files (train_head /
    validation / test): rule 1: 0/0/0, rule 2: 0/0/0, rule 3: 1/0/0 (index 1012, whose response
    repeats the second half of its instruction). Containment without the coverage bound would also
    drop 16/8/4 real short answers.
    """
    response = normalize_text(record.response)
    instruction = normalize_text(record.instruction)
    if not response or response == instruction:
        return True
    return response in instruction and len(response) >= ECHO_MIN_COVERAGE * len(instruction)


def split_records(records: list[DollyRecord], split: str) -> list[DollyRecord]:
    """Return the records whose index lies in SPLIT_RANGES[split], in index order."""
    if split not in SPLIT_RANGES:
        raise ValueError(f"Unknown split {split!r}: choose one of {', '.join(SPLIT_RANGES)}.")
    low, high = SPLIT_RANGES[split]
    return sorted((record for record in records if low <= record.index <= high), key=lambda record: record.index)


def load_split(
    source: str = SHIPPED_SOURCE, split: str = "train", limit: Optional[int] = None, drop_echo: bool = True
) -> list[DollyRecord]:
    """Load one split of a source, drop echoes (see is_echo) and keep the first `limit` records by index."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} is invalid: use a positive record count or None for all records.")

    records = load_records(source)
    selected = split_records(records, split)
    if drop_echo:
        kept = [record for record in selected if not is_echo(record)]
        logger.info(
            "Split %r of %s: dropped %d of %d records whose response only repeats the instruction",
            split, source, len(selected) - len(kept), len(selected),
        )
        selected = kept

    if not selected:
        low, high = SPLIT_RANGES[split]
        raise DataError(
            f"Split {split!r} of source {source!r} is empty: it has no usable records with index {low}-{high} "
            f"(the source's indices span {records[0].index}-{records[-1].index}). "
            "Use a source that covers this range (the shipped 'dolly' records or the hub dataset) or another split.",
            source,
        )
    return selected[:limit] if limit is not None else selected


# ----- templates --------------------------------------------------------------------------------


def _prompt_parts(instruction: str, context: str, template: str) -> tuple[str, str, str]:
    """Split a prompt into (text before the context, context, text after); context "" drops the Context part."""
    if template == "dolly":
        if context:
            return f"User: {instruction}\nContext:", f" {context}", "\nAssistant:"
        return "User:", f" {instruction}", "\nAssistant:"
    if template == "alpaca":
        if context:
            return (
                f"{ALPACA_HEADER_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n",
                context,
                "\n\n### Response:\n",
            )
        return f"{ALPACA_HEADER}### Instruction:\n", instruction, "\n\n### Response:\n"
    raise ValueError(f"Unknown template {template!r}: choose one of {', '.join(TEMPLATES)}.")


def format_prompt(record: DollyRecord, template: str = "dolly") -> str:
    """Return the prompt text of a record.

    dolly: "User: {instruction}\\nContext: {context}\\nAssistant:", without the Context line when the
    context is empty or whitespace. alpaca: the Alpaca prompt with an "### Input:" section only when
    there is a context. Instruction and context are stripped of surrounding whitespace.
    """
    head, middle, tail = _prompt_parts(record.instruction.strip(), record.context.strip(), template)
    return head + middle + tail


def format_target(record: DollyRecord, template: str = "dolly") -> str:
    """Return the response text that follows the prompt (the caller appends the EOS token).

    dolly: " " + response, because its prompt ends with "Assistant:". alpaca: the response alone,
    because its prompt ends with a newline. The response is stripped of surrounding whitespace.
    """
    if template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}: choose one of {', '.join(TEMPLATES)}.")
    response = record.response.strip()
    return f" {response}" if template == "dolly" else response


# ----- token encoding ---------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def min_prompt_tokens(tokenizer, template: str = "dolly") -> int:
    """Return the fewest tokens a prompt can have: the template's fixed text plus one instruction token."""
    head, _, tail = _prompt_parts("", "", template)
    return len(_encode(tokenizer, head)) + len(_encode(tokenizer, tail)) + 1


def check_prompt_room(tokenizer, template: str, max_length: int, max_new_tokens: int) -> int:
    """Return max_length - max_new_tokens, the prompt budget, or raise ValueError when no prompt fits in it."""
    needed = min_prompt_tokens(tokenizer, template)
    room = max_length - max_new_tokens
    if room < needed:
        raise ValueError(
            f"max_length={max_length} leaves {room} prompt tokens after max_new_tokens={max_new_tokens}, but the "
            f"{template!r} template needs at least {needed}: use --max-length {needed + max_new_tokens} or more."
        )
    return room


def encode_prompt(record: DollyRecord, tokenizer, template: str = "dolly", max_prompt_tokens: int = 480) -> list[int]:
    """Return the prompt's token ids, at most `max_prompt_tokens` long.

    No special tokens are added: neither GPT-2 nor SmolLM2 (add_bos_token is false in its GGUF
    metadata) prepends a BOS token. A prompt that fits is encoded as one string. A longer one loses
    the end of its context first. When not even one context token fits, the context part is
    dropped, and then the end of the instruction is cut if the prompt is still too long. The
    template text, including the final "Assistant:" or "### Response:" marker, is never cut.
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} is invalid: use a positive token count.")
    instruction = record.instruction.strip()
    context = record.context.strip()

    ids = _encode(tokenizer, format_prompt(record, template))
    if len(ids) <= max_prompt_tokens:
        return ids

    # Cut the context: the pieces are encoded separately, so their lengths add up exactly.
    if context:
        head, middle, tail = (_encode(tokenizer, part) for part in _prompt_parts(instruction, context, template))
        room = max_prompt_tokens - len(head) - len(tail)
        if room >= 1:
            logger.debug("Record %d: context cut from %d to %d tokens", record.index, len(middle), room)
            return head + middle[:room] + tail

        ids = _encode(tokenizer, format_prompt(DollyRecord(record.index, instruction, "", "", ""), template))
        if len(ids) <= max_prompt_tokens:
            logger.debug("Record %d: context dropped to fit %d prompt tokens", record.index, max_prompt_tokens)
            return ids

    # Cut the instruction.
    head, middle, tail = (_encode(tokenizer, part) for part in _prompt_parts(instruction, "", template))
    room = max_prompt_tokens - len(head) - len(tail)
    if room < 1:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} is too small for the {template!r} template: its fixed text "
            f"alone takes {len(head) + len(tail)} tokens. Use at least {min_prompt_tokens(tokenizer, template)}."
        )
    logger.debug("Record %d: context dropped and instruction cut to %d tokens", record.index, room)
    return head + middle[:room] + tail


def encode_example(record: DollyRecord, tokenizer, template: str = "dolly", max_length: int = 512) -> dict:
    """Encode prompt + response + EOS for supervised training, at most `max_length` tokens.

    Returns {"input_ids", "labels", "prompt_length"}: labels are IGNORE_INDEX (-100) over the prompt
    and equal input_ids over the response and the final EOS, so the EOS is learned even when the
    pad token is the EOS token. When too long, the context is cut first, then the end of the
    response (the EOS stays), then the instruction as in encode_prompt. At least one response
    token is kept when the response is not empty.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS token: set tokenizer.eos_token before encoding.")
    shortest = min_prompt_tokens(tokenizer, template) + 2
    if max_length < shortest:
        raise ValueError(
            f"max_length={max_length} is too small for the {template!r} template: use at least {shortest} tokens "
            "(its fixed text, one instruction token, one response token and EOS)."
        )

    response_ids = _encode(tokenizer, format_target(record, template))

    # The prompt budget is the room that the full response and EOS leave. While the response can still
    # shrink, the budget never drops below the instruction-only prompt: the response is cut before the instruction.
    instruction_only = DollyRecord(record.index, record.instruction, "", "", "")
    min_prompt = len(_encode(tokenizer, format_prompt(instruction_only, template)))
    min_response = min(len(response_ids), 1)
    prompt_budget = max(max_length - len(response_ids) - 1, min(min_prompt, max_length - min_response - 1))
    prompt_ids = encode_prompt(record, tokenizer, template, max_prompt_tokens=prompt_budget)

    response_ids = response_ids[: max_length - len(prompt_ids) - 1] + [eos_id]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "prompt_length": len(prompt_ids),
    }


def collate_left(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch of encoded examples into LongTensors of shape (B, T).

    Returns "input_ids" (padded with pad_token_id), "attention_mask" (1 on real tokens) and, when
    the examples have them, "labels" (padded with -100).
    """
    if not batch:
        raise ValueError("collate_left got an empty batch: pass at least one example.")
    has_labels = ["labels" in example for example in batch]
    if any(has_labels) and not all(has_labels):
        raise ValueError("collate_left got a batch where only some examples have 'labels': give all or none.")

    lengths = [len(example["input_ids"]) for example in batch]
    width = max(lengths)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if all(has_labels) else None

    for row, (example, length) in enumerate(zip(batch, lengths)):
        if length == 0:
            continue
        input_ids[row, width - length :] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, width - length :] = 1
        if labels is not None:
            if len(example["labels"]) != length:
                raise ValueError(
                    f"Example {row} has {len(example['labels'])} labels for {length} input ids: they must match."
                )
            labels[row, width - length :] = torch.as_tensor(example["labels"], dtype=torch.long)

    result = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        result["labels"] = labels
    return result
