import copy

import pytest
import torch

import promptkd.generation as generation
from promptkd.generation import _packed_mask, _packs, generate_greedy, generate_token_ids, generation_config

PROMPT_TEXTS = [
    "Hi",
    "User: Explain in two sentences why the sky looks blue during the day and red at sunset, "
    "and mention Rayleigh scattering.\nContext: The sky is blue because molecules in the air scatter "
    "short wavelengths of sunlight more strongly than long ones.\nAssistant:",
    "User: Name three primary colors.\nAssistant:",
    "Once upon a time",
]


def _prompts(tokenizer):
    prompts = [tokenizer.encode(text) for text in PROMPT_TEXTS]
    assert len(prompts[0]) <= 2
    assert len(prompts[1]) >= 50
    return prompts


def _greedy_without_cache(model, prompt, max_new_tokens):
    """Reference decoding: a full forward pass per step, argmax, no KV cache and no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits  # (1, T, V)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_greedy_batched_equals_single(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    prompts = _prompts(tokenizer)

    batched = generate_greedy(model, tokenizer, prompts, batch_size=4, max_new_tokens=16, progress=False)
    pairs = generate_greedy(model, tokenizer, prompts, batch_size=2, max_new_tokens=16, progress=False)
    singles = [generate_greedy(model, tokenizer, [p], batch_size=1, max_new_tokens=16, progress=False)[0] for p in prompts]

    assert batched == singles
    assert pairs == singles
    assert len(set(singles)) == len(singles)  # the outputs differ, so the order is checked too


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_token_ids_match_reference_decoding(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    prompts = _prompts(tokenizer)

    generated = generate_token_ids(model, tokenizer, prompts, batch_size=4, max_new_tokens=10, progress=False)

    for prompt, ids in zip(prompts, generated):
        assert ids == _greedy_without_cache(model, prompt, 10)


def test_packs_group_rows_in_order():
    # Rows of 3, 0, 2, 5 and 1 tokens into packs of at most 6: the empty row is skipped.
    assert _packs([3, 0, 2, 5, 1], 6) == [[0, 2], [3, 4]]
    # A row longer than a pack gets a pack of its own.
    assert _packs([300, 10, 10], 256) == [[0], [1, 2]]
    assert _packs([0, 0], 256) == []


def test_packed_mask_block_diagonal():
    allowed = _packed_mask([2, 1], torch.float32, torch.device("cpu"), additive=False)
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert allowed.shape == (1, 1, 3, 3)
    assert torch.equal(allowed[0, 0], expected)

    additive = _packed_mask([2, 1], torch.float32, torch.device("cpu"), additive=True)
    minimum = torch.finfo(torch.float32).min
    assert torch.equal(additive[0, 0], torch.where(expected, 0.0, minimum))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_tokens", [8, 256])
def test_packed_prefill_matches_reference(tiny_llama, attention, pack_tokens, monkeypatch):
    # With 8 tokens the longer prefixes run alone and the shortest share a pack. With 256 all share one pack.
    model, tokenizer = tiny_llama
    model.set_attn_implementation(attention)
    monkeypatch.setattr(generation, "PACK_TOKENS", pack_tokens)
    prompts = _prompts(tokenizer) + [tokenizer.encode("User: Why is the sea salty?\nAssistant:")]

    generated = generate_token_ids(model, tokenizer, prompts, batch_size=5, max_new_tokens=8, progress=False)

    for prompt, ids in zip(prompts, generated):
        assert ids == _greedy_without_cache(model, prompt, 8)


def test_unpackable_attention_runs_prompts_alone(tiny_llama, monkeypatch):
    # An attention implementation outside sdpa and eager gets no custom mask: each prefix runs alone.
    model, tokenizer = tiny_llama
    monkeypatch.setattr(generation, "_PACKABLE_ATTENTION", ())
    prompts = _prompts(tokenizer)

    generated = generate_token_ids(model, tokenizer, prompts, batch_size=4, max_new_tokens=8, progress=False)

    for prompt, ids in zip(prompts, generated):
        assert ids == _greedy_without_cache(model, prompt, 8)


def test_greedy_returns_stripped_text(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    prompts = _prompts(tokenizer)

    texts = generate_greedy(model, tokenizer, prompts, max_new_tokens=8, progress=False)
    ids = generate_token_ids(model, tokenizer, prompts, max_new_tokens=8, progress=False)

    assert texts == [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]
    assert all(len(i) == 8 for i in ids)


def test_stops_at_eos(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    prompts = _prompts(tokenizer)
    free = generate_token_ids(model, tokenizer, prompts, max_new_tokens=12, progress=False)
    stop_id = free[2][3]
    assert stop_id not in free[2][:3]

    # A tokenizer whose EOS is a token the model emits at step 4 of prompt 2.
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = stopping.convert_ids_to_tokens(stop_id)
    with_eos = generate_token_ids(model, stopping, prompts, max_new_tokens=12, progress=False)
    without_eos = generate_token_ids(model, stopping, prompts, max_new_tokens=12, include_eos=False, progress=False)

    assert with_eos[2] == free[2][:4]
    assert without_eos[2] == free[2][:3]
    for row, ids in enumerate(free):
        expected = ids[: ids.index(stop_id) + 1] if stop_id in ids else ids
        assert with_eos[row] == expected


def test_model_generation_defaults_ignored(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = _prompts(tokenizer)
    clean = generate_token_ids(model, tokenizer, prompts, max_new_tokens=12, progress=False)

    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.3
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.max_new_tokens = 3
    configured = generate_token_ids(model, tokenizer, prompts, max_new_tokens=12, progress=False)

    assert configured == clean


def test_sampling_seed_reproducible(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    prompts = _prompts(tokenizer)

    first = generate_token_ids(model, tokenizer, prompts, do_sample=True, seed=1, max_new_tokens=8, progress=False)
    again = generate_token_ids(model, tokenizer, prompts, do_sample=True, seed=1, max_new_tokens=8, progress=False)
    other = generate_token_ids(model, tokenizer, prompts, do_sample=True, seed=2, max_new_tokens=8, progress=False)

    assert first == again
    assert first != other


def test_sampling_generator_reproducible(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    prompts = _prompts(tokenizer)

    first = generate_token_ids(
        model, tokenizer, prompts, do_sample=True, generator=torch.Generator().manual_seed(7), max_new_tokens=8, progress=False
    )
    again = generate_token_ids(
        model, tokenizer, prompts, do_sample=True, generator=torch.Generator().manual_seed(7), max_new_tokens=8, progress=False
    )

    assert first == again


def test_seeded_sampling_keeps_global_rng(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    state = torch.get_rng_state()

    generate_token_ids(model, tokenizer, _prompts(tokenizer), do_sample=True, seed=3, max_new_tokens=4, progress=False)

    assert torch.equal(torch.get_rng_state(), state)


def test_sampling_top_k_one_is_greedy(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = _prompts(tokenizer)

    greedy = generate_token_ids(model, tokenizer, prompts, max_new_tokens=8, progress=False)
    top1 = generate_token_ids(model, tokenizer, prompts, do_sample=True, top_k=1, seed=0, max_new_tokens=8, progress=False)

    assert top1 == greedy


def test_sampling_full_vocabulary_default(gpt2_tok):
    config = generation_config(gpt2_tok, max_new_tokens=4, do_sample=True)

    assert config.top_k == 0
    assert config.top_p == 1.0
    assert config.temperature == 1.0
    assert config.pad_token_id == 50256
    assert config.eos_token_id == 50256


def test_training_mode_restored(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    model.train()

    generate_token_ids(model, tokenizer, _prompts(tokenizer), max_new_tokens=2, progress=False)

    assert model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid"),
        ({"do_sample": True, "temperature": 0.0}, "temperature=0.0 is invalid"),
        ({"do_sample": True, "top_p": 0.0}, r"top_p=0.0 is invalid: use a value in \(0, 1\]"),
        ({"do_sample": True, "top_p": 1.5}, "top_p=1.5 is invalid"),
        ({"do_sample": True, "top_k": -1}, "top_k=-1 is invalid"),
        ({"batch_size": 0}, "batch_size=0 is invalid"),
        ({"do_sample": True, "seed": 1, "generator": torch.Generator()}, "either generator or seed"),
    ],
)
def test_invalid_arguments(tiny_gpt2, kwargs, message):
    model, tokenizer = tiny_gpt2

    with pytest.raises(ValueError, match=message):
        generate_token_ids(model, tokenizer, [[1, 2]], progress=False, **kwargs)


def test_empty_prompt_rejected(tiny_gpt2):
    model, tokenizer = tiny_gpt2

    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        generate_token_ids(model, tokenizer, [[1], []], progress=False)


def test_too_long_prompt_rejected(tiny_gpt2):
    model, tokenizer = tiny_gpt2

    with pytest.raises(ValueError, match="Prompt 0 has 1000 tokens"):
        generate_token_ids(model, tokenizer, [[5] * 1000], max_new_tokens=32, progress=False)
