"""The sensitivity scan agrees with brute-force recomputation; cached == naive."""
import copy

import pytest
import torch
from helpers import tiny_model

import ds_spd
from ds_spd.tools.evaluation import evaluate_lm
from ds_spd.stages.scan import scan


@pytest.fixture(scope="module")
def setup():
    model = ds_spd.virtualize(tiny_model(), 2)
    segments = torch.randint(0, 384, (6, 24), generator=torch.Generator().manual_seed(5))
    return model, segments


@pytest.mark.parametrize("method", ["cumulative", "isolated"])
@pytest.mark.parametrize("metric", ["ppl", "kl"])
def test_cached_scan_equals_naive(setup, method, metric):
    model, segments = setup
    cached = scan(model, segments, 4, method, metric, use_cache=True, progress=False)
    naive = scan(model, segments, 4, method, metric, use_cache=False, progress=False)
    torch.testing.assert_close(torch.tensor(cached.sensitivity), torch.tensor(naive.sensitivity),
                               atol=1e-5, rtol=1e-4)
    assert cached.baseline == pytest.approx(naive.baseline, rel=1e-5)
    assert cached.forwards_equivalent < naive.forwards_equivalent == model.config.num_hidden_layers + 1
    assert ds_spd.get_spd_blocks(model) == ()  # the scan leaves the model as it found it


def test_cumulative_scan_equals_brute_force(setup):
    """Recompute every step from scratch with the plain evaluator: ppl(SPD on i..L-1) - ppl(SPD on i+1..L-1)."""
    model, segments = setup
    result = scan(model, segments, 4, "cumulative", "ppl", progress=False)
    n = model.config.num_hidden_layers
    fresh = ds_spd.virtualize(copy.deepcopy(tiny_model()), 2)
    ppl = {}
    for i in range(n + 1):
        ds_spd.set_spd_blocks(fresh, range(i, n))
        ppl[i] = evaluate_lm(fresh, segments, 4, progress=False)["perplexity"]
    expected = [ppl[i] - ppl[i + 1] for i in range(n)]
    torch.testing.assert_close(torch.tensor(result.sensitivity), torch.tensor(expected), atol=1e-5, rtol=1e-4)
    assert result.order == list(range(n - 1, -1, -1))
    assert result.after[-1] == pytest.approx(ppl[0], rel=1e-5)
    assert any(abs(s) > 1e-3 for s in result.sensitivity)
