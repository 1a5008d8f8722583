import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import EVEN, KV1, save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA (6 q / 3 KV heads: uneven at tp 2) saved as an HF directory."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_even_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny_llama_even")), **EVEN)


@pytest.fixture(scope="session")
def kv1_dir(tmp_path_factory):
    """A tiny random LLaMA with one KV head and 4 query heads (tp 2 and 4 replicate the KV head)."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny_llama_kv1")), **KV1)
