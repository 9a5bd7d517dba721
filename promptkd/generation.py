"""Batched generation with left padding and a KV cache: greedy decoding for evaluation, sampling for pseudo-targets."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

logger = logging.getLogger(__name__)


def generation_config(
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> GenerationConfig:
    """Build a GenerationConfig that sets every decoding option used here, so a model's own defaults do not apply.

    `top_k=0` and `top_p=1.0` sample from the full vocabulary. Fields left as None (for example min_p or
    suppress_tokens) are still filled from `model.generation_config` by `model.generate`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: use 1 or more tokens.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} is invalid: use a positive value (greedy decoding: do_sample=False).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} is invalid: use 0 (full vocabulary) or a positive count.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is invalid: use a value in (0, 1].")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS or pad token: pass it through prepare_tokenizer first.")

    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=do_sample,
        num_beams=1,
        num_return_sequences=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
    )


def _max_positions(model: PreTrainedModel) -> Optional[int]:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _check_prompts(model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int) -> None:
    limit = _max_positions(model)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"Prompt {i} is empty: every prompt needs at least one token.")
        if limit is not None and len(prompt) + max_new_tokens > limit:
            raise ValueError(
                f"Prompt {i} has {len(prompt)} tokens, and with max_new_tokens={max_new_tokens} it exceeds the "
                f"model's {limit} positions: truncate the prompt or lower max_new_tokens."
            )


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)  # (B, T)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


# Prompt tokens per packed prefill run. Packing short prompts gives the matmuls enough rows, and the
# block-diagonal mask costs (tokens)^2 per pack, so packs stay short. On 2 CPU cores, 128 to 512 tokens
# took the same time (32 Dolly test prompts, SmolLM2 student).
PACK_TOKENS = 256

# Attention implementations that take a custom 4D mask: sdpa a boolean one (True attends), eager an additive one.
_PACKABLE_ATTENTION = ("sdpa", "eager")


def _packs(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """Group row indices in order into packs of at most `pack_tokens` tokens (a longer row gets a pack of its own)."""
    packs: list[list[int]] = []
    size = 0
    for row, length in enumerate(lengths):
        if length == 0:
            continue
        if packs and size + length <= pack_tokens:
            packs[-1].append(row)
            size += length
        else:
            packs.append([row])
            size = length
    return packs


def _packed_mask(lengths: list[int], dtype: torch.dtype, device: torch.device, additive: bool) -> torch.Tensor:
    """Causal mask that keeps each packed sequence to itself: (1, 1, S, S) for S = sum(lengths)."""
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    size = segment.shape[0]
    causal = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    allowed = (segment[:, None] == segment[None, :]) & causal  # (S, S)
    if not additive:
        return allowed[None, None]
    mask = torch.zeros(size, size, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _run_prefixes(model: PreTrainedModel, prefixes: list[list[int]]):
    """Yield (row, cache, start) for each non-empty prefix, whose keys and values are at [start, start + len) of cache.

    Prefixes run packed into one sequence per pack, with positions restarting at 0 for each and a block-diagonal
    mask, when the model's attention takes a custom 4D mask. Otherwise each runs alone.
    """
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in _PACKABLE_ATTENTION:
        for row, prefix in enumerate(prefixes):
            if prefix:
                ids = torch.tensor([prefix], dtype=torch.long, device=model.device)  # (1, T - 1)
                yield row, model.base_model(input_ids=ids, use_cache=True).cache, 0
        return

    lengths = [len(prefix) for prefix in prefixes]
    dtype = model.get_input_embeddings().weight.dtype
    for pack in _packs(lengths, PACK_TOKENS):
        pack_lengths = [lengths[row] for row in pack]
        ids = torch.tensor([[token for row in pack for token in prefixes[row]]], dtype=torch.long, device=model.device)
        positions = torch.tensor([[p for n in pack_lengths for p in range(n)]], dtype=torch.long, device=model.device)
        mask = _packed_mask(pack_lengths, dtype, model.device, additive=attention == "eager")
        cache = model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True).cache
        start = 0
        for row, length in zip(pack, pack_lengths):
            yield row, cache, start
            start += length


def _prefix_cache(model: PreTrainedModel, prompts: list[list[int]], width: int) -> Optional[DynamicCache]:
    """Build the batched KV cache of every prompt without its last token, left-padded to width - 1 positions.

    No padding position is computed, and generate then starts from the last prompt column. A padded
    batched prefill runs the model on every padding position too, which on CPU took most of the time
    for Dolly prompts of mixed lengths. Returns None when all prompts have one length or the model's
    cache is not made of full-attention DynamicLayers, and the caller then lets generate prefill the
    padded batch.
    """
    if len({len(prompt) for prompt in prompts}) == 1:
        return None
    cache_width = width - 1
    prefixes = [prompt[:-1] for prompt in prompts]
    layers = None  # per decoder layer: (keys, values), each (B, heads, cache_width, head_dim)
    for row, cache, start in _run_prefixes(model, prefixes):
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        if layers is None:
            layers = [
                (
                    keys.new_zeros(len(prompts), keys.shape[1], cache_width, keys.shape[3]),
                    values.new_zeros(len(prompts), values.shape[1], cache_width, values.shape[3]),
                )
                for keys, values, _ in cache
            ]
        length = len(prefixes[row])
        for (keys, values, _), (batch_keys, batch_values) in zip(cache, layers):
            batch_keys[row, :, cache_width - length :] = keys[0, :, start : start + length]
            batch_values[row, :, cache_width - length :] = values[0, :, start : start + length]
    return None if layers is None else DynamicCache(ddp_cache_data=layers)


def _cut_at_eos(ids: list[int], eos_id: int, include_eos: bool) -> list[int]:
    if eos_id in ids:
        end = ids.index(eos_id)
        return ids[: end + 1] if include_eos else ids[:end]
    return ids


def _seed_from(generator: Optional[torch.Generator], seed: Optional[int]) -> Optional[int]:
    if generator is not None and seed is not None:
        raise ValueError("Pass either generator or seed, not both.")
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return seed


@torch.inference_mode()
def generate_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    include_eos: bool = True,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """Generate a continuation of each prompt (token ids) and return the new token ids, in prompt order.

    Prompts are batched by length (longest first) and left-padded. Each continuation ends at its first EOS,
    which is kept when `include_eos` is True. In float32 greedy results do not depend on `batch_size`
(tested on CPU). In bf16 or fp16 the padding can change rounding and so, rarely, a token.
    Sampling draws from the torch RNG seeded by `seed` or by a draw from `generator`, inside a forked RNG
    state so the global RNG is left as it was. With neither, it uses the global RNG.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: use 1 or more prompts per batch.")
    config = generation_config(tokenizer, max_new_tokens, do_sample, temperature, top_k, top_p)
    _check_prompts(model, prompts, max_new_tokens)
    sample_seed = _seed_from(generator, seed) if do_sample else None

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Optional[list[int]]] = [None] * len(prompts)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    devices = [model.device] if model.device.type == "cuda" else []

    was_training = model.training
    model.eval()  # no dropout while decoding, also for a student that is being trained
    try:
        with torch.random.fork_rng(devices=devices, enabled=sample_seed is not None):
            if sample_seed is not None:
                torch.manual_seed(sample_seed)
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                batch_prompts = [prompts[i] for i in batch]
                input_ids, attention_mask = _left_pad(batch_prompts, tokenizer.pad_token_id, model.device)
                cache = _prefix_cache(model, batch_prompts, input_ids.shape[1])
                output = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, cache=cache, generation_config=config
                )
                new_tokens = output[:, input_ids.shape[1] :].tolist()  # (B, <= max_new_tokens)
                for i, ids in zip(batch, new_tokens):
                    results[i] = _cut_at_eos(ids, tokenizer.eos_token_id, include_eos)
    finally:
        model.train(was_training)
    return results


def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[str]:
    """Greedy-decode each prompt (token ids) and return the new text, cut at EOS and stripped."""
    token_ids = generate_token_ids(
        model,
        tokenizer,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        include_eos=False,
        progress=progress,
        desc="greedy decoding",
    )
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]
