import os

import pytest

from promptkd.config import home_dir
from promptkd.tokenizers import build_cached_folder, gpt2_tokenizer, prepare_tokenizer, smollm2_gguf_path

UNICODE_TEXT = "Héllo wörld — 日本語 🤖 naïve café\n\tTabs, two  spaces and 1234.5 numbers!"


def test_gpt2_known_ids(gpt2_tok):
    assert gpt2_tok.encode("Hello world") == [15496, 995]
    assert gpt2_tok.encode(" the") == [262]
    assert gpt2_tok.encode("\n") == [198]
    assert gpt2_tok.encode(" ") == [220]
    assert gpt2_tok.encode("!") == [0]


def test_gpt2_special_tokens(gpt2_tok):
    assert len(gpt2_tok) == 50257
    assert gpt2_tok.eos_token == "<|endoftext|>"
    assert gpt2_tok.eos_token_id == 50256
    assert gpt2_tok.bos_token_id == 50256
    assert gpt2_tok.pad_token_id == 50256
    assert gpt2_tok.padding_side == "left"
    assert gpt2_tok.model_max_length == 1024


def test_gpt2_decode_round_trip(gpt2_tok):
    ids = gpt2_tok.encode(UNICODE_TEXT)

    assert gpt2_tok.decode(ids) == UNICODE_TEXT
    assert len(ids) < len(UNICODE_TEXT.encode("utf-8"))  # merges happened, not one token per byte


def test_gpt2_merges_cover_vocab(gpt2_tok):
    # Every multi-byte token must be reachable, so each token's own text encodes to that single token.
    vocab = gpt2_tok.get_vocab()
    sample = [token for token, rank in vocab.items() if rank % 997 == 0 and rank < 50256]

    for token in sample:
        text = gpt2_tok.convert_tokens_to_string([token])
        assert gpt2_tok.encode(text) == [vocab[token]], token


def test_gpt2_cache_reused(gpt2_tok):
    folder = home_dir() / "tokenizers" / "gpt2"
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns

    again = gpt2_tokenizer()

    assert again.encode("Hello world") == [15496, 995]
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp


def test_smollm2_tokenizer(smollm2_tok):
    assert len(smollm2_tok) == 49152
    assert smollm2_tok.eos_token == "<|im_end|>"
    assert smollm2_tok.pad_token_id == smollm2_tok.eos_token_id
    assert smollm2_tok.padding_side == "left"
    assert smollm2_tok.decode(smollm2_tok.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_smollm2_gguf_path():
    path = smollm2_gguf_path()

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_prepare_tokenizer_sets_pad(tmp_path, gpt2_tok):
    gpt2_tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"

    prepared = prepare_tokenizer(tokenizer)

    assert prepared is tokenizer
    assert prepared.pad_token == "<|endoftext|>"
    assert prepared.padding_side == "left"


def test_build_cached_folder_failure_leaves_nothing(tmp_path):
    final = tmp_path / "cache"

    def failing_build(folder):
        (folder / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_cached_folder(final, failing_build)

    assert not final.exists()
    assert os.listdir(tmp_path) == []


def test_build_cached_folder_builds_once(tmp_path):
    final = tmp_path / "cache"
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "done").write_text("ok")

    build_cached_folder(final, build)
    build_cached_folder(final, build)

    assert len(calls) == 1
    assert (final / "done").read_text() == "ok"
