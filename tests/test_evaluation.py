"""Evaluation through the offline `evaluate` module, and data loading through `datasets`."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model, tiny_tokenizer

from ds_spd.data import load_texts, shipped_corpus_file, token_segments
from ds_spd.errors import DataError
from ds_spd.tools.evaluation import evaluate_lm


def test_metric_module_equals_direct_computation():
    model = tiny_model()
    segments = torch.randint(0, 384, (5, 20), generator=torch.Generator().manual_seed(2))
    result = evaluate_lm(model, segments, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(segments).logits[:, :-1]
    targets = segments[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert result["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-6)
    assert result["accuracy"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    assert result["tokens"] == targets.numel()


def test_shipped_corpus_splits_are_disjoint_and_segments_deterministic(tmp_path):
    train, test = open(shipped_corpus_file("pydoc", "train")).read(), open(shipped_corpus_file("pydoc", "test")).read()
    train_paragraphs = set(train.split("\n\n"))
    test_paragraphs = [p for p in test.split("\n\n") if len(p) > 40]
    assert len(test_paragraphs) > 100 and not any(p in train_paragraphs for p in test_paragraphs)
    tok = tiny_tokenizer()
    lines = load_texts(None, "pydoc", "validation")
    a = token_segments(lines, tok, 32, 4, seed=7)
    assert a.shape == (4, 32) and torch.equal(a, token_segments(lines, tok, 32, 4, seed=7))
    assert not torch.equal(a, token_segments(lines, tok, 32, 4))
    f = tmp_path / "t.txt"
    f.write_text("one line\nanother line\n")
    assert load_texts([str(f)]) == ["one line", "another line"]
    with pytest.raises(DataError, match="not found"):
        load_texts([str(tmp_path / "missing.txt")])
