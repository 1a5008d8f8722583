"""Fixtures of the serving tests."""
import pytest
from helpers import save_tiny
from serve_helpers import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """The tiny random model with a chat template, saved as an HF directory (one per test module)."""
    path = save_tiny(str(tmp_path_factory.mktemp("tiny_chat")))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path
