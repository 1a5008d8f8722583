"""Evaluation through the offline `evaluate` module, and data loading through `datasets`."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model, tiny_tokenizer

from ds_spd.data import SHIPPED_CORPORA, SPLITS, load_texts, shipped_corpus_file, token_segments
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


def test_bootstrap_intervals_over_segments():
    """The intervals resample whole segments: recomputed here with the same seeded draws, they match; they
    contain the point estimate; and they widen when the segments disagree more."""
    import numpy as np
    model = tiny_model()
    segments = torch.randint(0, 384, (12, 20), generator=torch.Generator().manual_seed(3))
    result = evaluate_lm(model, segments, batch_size=4, progress=False)
    with torch.no_grad():
        logits = model(segments).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), segments[:, 1:], reduction="none").double().sum(1).numpy()
    idx = np.random.default_rng(0).integers(0, 12, size=(1000, 12))
    ppl = np.exp(nll[idx].sum(1) / (12 * 19))
    assert result["perplexity_ci95"] == pytest.approx(list(np.percentile(ppl, [2.5, 97.5])), rel=1e-6)
    lo, hi = result["perplexity_ci95"]
    assert lo < result["perplexity"] < hi
    lo_a, hi_a = result["accuracy_ci95"]
    assert lo_a <= result["accuracy"] <= hi_a and "12 segments" in result["ci"]
    # half the segments made predictable (repeated token): segment NLLs spread out, the interval widens
    mixed = segments.clone()
    mixed[::2] = 7
    wide = evaluate_lm(model, mixed, batch_size=4, progress=False)["perplexity_ci95"]
    assert (wide[1] - wide[0]) / result["perplexity"] > (hi - lo) / result["perplexity"]


@pytest.mark.parametrize("corpus", sorted(SHIPPED_CORPORA))
def test_shipped_corpus_splits_are_disjoint(corpus):
    train, test = (open(shipped_corpus_file(corpus, split)).read() for split in ("train", "test"))
    train_paragraphs = set(train.split("\n\n"))
    test_paragraphs = [p for p in test.split("\n\n") if len(p) > 40]
    assert len(test_paragraphs) > 100 and not any(p in train_paragraphs for p in test_paragraphs)


def test_docstrings_corpus_is_the_stdlib_api_prose():
    import ast
    import inspect
    import textwrap
    text = "\n\n".join(open(shipped_corpus_file("docstrings", split)).read() for split in SPLITS)
    first = inspect.getdoc(textwrap.dedent).split("\n\n")[0]
    assert first in text                              # a library function's docstring is in it
    support = pytest.importorskip("test.support")   # the stdlib's own tests are left out: fixtures, not API prose
    tree = ast.parse(inspect.getsource(support))
    assert ast.get_docstring(tree).split("\n\n")[0] not in text


def test_code_corpus_is_the_stdlib_source_without_its_docstrings():
    import inspect
    import textwrap
    text = "\n\n".join(open(shipped_corpus_file("code", split)).read() for split in SPLITS)
    source = inspect.getsource(textwrap.dedent)
    body = [line for line in source.splitlines() if line.strip().startswith("# ")]
    assert "def dedent(text):" in text and body and all(line in text for line in body)   # code and its comments
    assert inspect.getdoc(textwrap.dedent).split("\n\n")[0] not in text             # not its docstring


def test_segments_deterministic(tmp_path):
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


def test_paired_ratio_interval_and_verdict():
    from ds_spd.tools.bench import paired_ratio
    base = [1.0, 1.1, 0.9, 1.05, 0.95]
    faster = paired_ratio([b * 0.8 for b in base], base)       # every pair 20% faster: a tight interval
    assert faster["ratio"] == pytest.approx(0.8) and faster["effect"] == "faster"
    assert faster["ratio_ci95"] == pytest.approx([0.8, 0.8])
    noisy = paired_ratio([0.7, 1.3, 0.8, 1.25, 1.0], [1.0] * 5)   # pairs disagree: no effect can be claimed
    assert noisy["effect"] == "no effect" and noisy["ratio_ci95"][0] < 1 < noisy["ratio_ci95"][1]


def test_paired_perplexity_ratio_is_tighter_than_unpaired_intervals():
    """Two models on the same segments: a uniform 5% NLL increase is 'higher' with a tight paired interval,
    even though their per-model intervals overlap; different segment sets are refused."""
    import numpy as np

    from ds_spd.tools.evaluation import paired_ratio_ci
    rng = np.random.default_rng(0)
    nll = rng.uniform(200, 900, size=8)            # segments of very different difficulty
    a = {"segment_nll": list(nll), "tokens": 8 * 255}
    b = {"segment_nll": list(nll * 1.05), "tokens": 8 * 255}
    r = paired_ratio_ci(a, b)
    assert r["verdict"] == "higher" and r["ci95"][0] > 1
    assert r["ratio"] == pytest.approx(math.exp(0.05 * nll.sum() / (8 * 255)))
    same = paired_ratio_ci(a, a)
    assert same["ratio"] == 1 and same["verdict"] == "no difference"
    with pytest.raises(ValueError, match="same segments"):
        paired_ratio_ci(a, {"segment_nll": list(nll[:4]), "tokens": 4 * 255})


def test_token_cache_equals_tokenizing_and_misses_on_any_change(tmp_path, monkeypatch):
    from ds_spd.data import token_ids
    monkeypatch.setenv("DS_SPD_CACHE", str(tmp_path))
    tok = tiny_tokenizer()
    text = "\n".join(load_texts(dataset="pydoc", split="validation"))
    direct = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert torch.equal(token_ids(text, tok), direct)                  # computed, then written
    entries = list((tmp_path / "tokens").iterdir())
    assert len(entries) == 1
    assert torch.equal(token_ids(text, tok), direct)                  # read back
    assert token_ids(text + " x", tok).numel() > direct.numel()       # other text: another entry
    assert len(list((tmp_path / "tokens").iterdir())) == 2
    entries[0].write_bytes(b"damaged")                                # a damaged entry is recomputed
    assert torch.equal(token_ids(text, tok), direct)


@pytest.mark.parametrize("budget", [None, 4 * 384 * 5])   # the whole batch at once; 5 tokens per chunk
def test_head_in_chunks_equals_whole_logits(budget, monkeypatch):
    """Scores and the KL (value and gradient) from the head applied chunk by chunk == from the model's whole
    logits; Gemma 2 also soft-caps its final logits."""
    from ds_spd.models import head
    if budget:
        monkeypatch.setattr(head, "LOGITS_BYTES", budget)
    assert len(head.token_chunks(2 * 11, 384)) == (1 if budget is None else 5)
    model = tiny_model("gemma2", sliding_window=8, query_pre_attn_scalar=16, final_logit_softcapping=5.0)
    other = copy.deepcopy(model)   # the base: another block, the same head (as the scan's and KL stage's bases)
    with torch.no_grad():
        for p in other.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:]
    with torch.no_grad():
        logits, base_logits = model(ids).logits[:, :-1], other(ids).logits[:, :-1]
        h, base_h = head.final_hidden(model, input_ids=ids)[:, :-1], head.final_hidden(other, input_ids=ids)[:, :-1]
    lp, base_lp = F.log_softmax(logits, -1), F.log_softmax(base_logits, -1)
    scores = head.score_tokens(model, h, targets, base_h)
    torch.testing.assert_close(scores.logprobs, lp.gather(-1, targets[..., None])[..., 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(scores.top1, logits.argmax(-1))
    assert scores.kl_sum == pytest.approx(F.kl_div(lp, base_lp, log_target=True, reduction="sum").item(), rel=1e-5)
    # a kept reference (the streamed scan scores every stream of a batch against one): the same sums, bitwise,
    # its log-probs computed once
    reference = head.Reference(model, base_h)
    for _ in range(2):
        assert head.score_tokens(model, h, targets, reference).kl_sum == scores.kl_sum
    assert len(reference._chunks) == len(head.token_chunks(targets.numel(), 384))
    # differentiable KL: the same value and gradient as the whole-logits computation
    h1 = h.clone().requires_grad_(True)
    h2 = h.clone().requires_grad_(True)
    chunked = head.kl_to(model, h1, base_h)
    whole = F.kl_div(F.log_softmax(head.head_logits(model, h2), -1), base_lp, log_target=True,
                     reduction="none").sum(-1).mean()
    chunked.backward()
    whole.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-4)
