"""Sampling (ds_spd.serve.sampling): seeded per choice, total on extreme values and non-finite logits, vLLM's
penalties and bias."""
from __future__ import annotations

import pytest
import torch

from ds_spd.serve.sampling import SamplingParams, generator_for, sample

def test_sampling_is_seeded_per_choice_and_filters():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    hot = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    draw = lambda p, i: [sample(logits, p, g) for g in [generator_for(p.seed, i)] for _ in range(20)]  # noqa: E731
    assert draw(hot, 0) == draw(hot, 0)            # the same seed and choice: the same tokens
    assert draw(hot, 0) != draw(hot, 1)            # another choice of the same request: another stream
    best = int(logits.argmax())
    for p in (SamplingParams(1, temperature=0), SamplingParams(1, temperature=1.5, top_k=1, seed=1),
              SamplingParams(1, temperature=1.0, top_p=1e-6, seed=1)):
        assert set(draw(p, 0)) == {best}
    top3 = set(torch.topk(logits, 3).indices.tolist())
    assert set(draw(SamplingParams(1, temperature=5.0, top_k=3, seed=2), 0)) <= top3


def test_sampler_is_total_on_extreme_values_and_non_finite_logits():
    """Values that once raised inside torch.multinomial (and killed every rank) give the best token; NaN never
    wins; a row with no finite logit is a SamplingError for its sequence, not a crash."""
    from ds_spd.serve.sampling import SamplingError
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    for p in (SamplingParams(1, temperature=1e-39), SamplingParams(1, temperature=0.5, top_p=1e-300),
              SamplingParams(1, temperature=1e-5, top_p=1e-300, top_k=3)):
        assert {sample(logits, p, generator_for(1, i)) for i in range(10)} == {best}, p
    assert SamplingParams(1, temperature=1e-39).greedy
    poisoned = logits.clone()
    poisoned[3], poisoned[4] = float("nan"), float("inf")
    assert sample(poisoned, SamplingParams(1, temperature=0), generator_for(1, 0)) == 4
    assert {sample(poisoned, SamplingParams(1, temperature=1.0, seed=2), generator_for(2, i)) for i in range(20)} \
        .isdisjoint({3})
    with pytest.raises(SamplingError):
        sample(torch.full((50,), float("nan")), SamplingParams(1), generator_for(1, 0))


def test_sampling_adjustments_are_vllms():
    """Penalties and bias as vLLM and OpenAI define them; end-of-sequence barred before min_tokens."""
    from ds_spd.serve.sampling import adjust
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    p = SamplingParams(1, presence_penalty=0.5, frequency_penalty=0.25)
    out = adjust(logits, p, output=[3, 3, 1], prompt=[0], eos_ids={4})
    assert out.tolist() == pytest.approx([2.0, -1.0 - 0.75, 0.5, 3.0 - 1.0, -2.0])
    out = adjust(logits, SamplingParams(1, repetition_penalty=2.0), output=[1], prompt=[0], eos_ids=set())
    assert out.tolist() == pytest.approx([1.0, -2.0, 0.5, 3.0, -2.0])   # prompt and output: > 0 divided, else times
    out = adjust(logits, SamplingParams(1, logit_bias=((2, 10.0), (99, 5.0))), output=[], prompt=[], eos_ids=set())
    assert out.tolist() == pytest.approx([2.0, -1.0, 10.5, 3.0, -2.0])   # an id past the vocabulary is ignored
    held = SamplingParams(1, min_tokens=2)
    assert adjust(logits, held, output=[1], prompt=[], eos_ids={4})[4] == float("-inf")
    assert adjust(logits, held, output=[1, 2], prompt=[], eos_ids={4})[4] == -2.0
    assert adjust(logits, SamplingParams(1), output=[1], prompt=[], eos_ids={4}) is logits   # nothing asked: no copy
