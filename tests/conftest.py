"""Shared fixtures: offline environment, a temporary PROMPTKD_HOME, real tokenizers and tiny random models."""

import os

# Set before transformers, huggingface_hub or gradio are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Test processes share 2 cores; idle OpenMP threads that sleep instead of spinning keep them from
# starving each other (a matmul loop ran about 2.5x faster with this on a loaded 2-core machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from promptkd.models import TINY_GPT2, TINY_LLAMA, tiny_model
from promptkd.tokenizers import gpt2_tokenizer, smollm2_tokenizer


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real pretrained model (seconds to a minute on CPU)")


@pytest.fixture(scope="session", autouse=True)
def promptkd_home(tmp_path_factory):
    """Point PROMPTKD_HOME at a session temp folder so tests never write into the repository's checkpoints/."""
    home = tmp_path_factory.mktemp("promptkd_home")
    previous = os.environ.get("PROMPTKD_HOME")
    os.environ["PROMPTKD_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("PROMPTKD_HOME", None)
    else:
        os.environ["PROMPTKD_HOME"] = previous


@pytest.fixture(scope="session")
def gpt2_tok(promptkd_home):
    """The real GPT-2 tokenizer (shared by the session: do not change its settings in a test)."""
    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def smollm2_tok(promptkd_home):
    """The real SmolLM2-135M-Instruct tokenizer (shared by the session: do not change its settings in a test)."""
    return smollm2_tokenizer()


@pytest.fixture
def tiny_gpt2(gpt2_tok):
    """(model, tokenizer): a fresh tiny random GPT-2 (2 layers, hidden 32, fp32, eval) with the real GPT-2 tokenizer."""
    return tiny_model(TINY_GPT2, len(gpt2_tok)), gpt2_tok


@pytest.fixture
def tiny_llama(smollm2_tok):
    """(model, tokenizer): a fresh tiny random llama (2 layers, hidden 64, fp32, eval) with the real SmolLM2 tokenizer."""
    return tiny_model(TINY_LLAMA, len(smollm2_tok)), smollm2_tok
