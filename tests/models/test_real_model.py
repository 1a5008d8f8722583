"""The embedded SmolLM2-135M (9 heads / 3 KV heads: uneven at tp 2), where results must mean something."""
import pytest
from helpers import cli_json, launch, last_json

pytestmark = [pytest.mark.real_model, pytest.mark.multirank]


def test_smollm2_real_tp_equals_virtual_and_spd_costs_accuracy(capsys):
    common = ["--max-samples", "2", "--seq-len", "128", "--batch-size", "2"]
    base, virtual = (cli_json(["eval", "--virtual-tp", "2", "--spd-blocks", blocks, *common], capsys)
                     for blocks in ("none", "0,15,29"))   # in this process
    real = last_json(launch(["ds_spd", "eval", "--spd-blocks", "0,15,29", *common, "--json"], module=True).stdout)
    assert real["perplexity"] == pytest.approx(virtual["perplexity"], rel=1e-4)
    assert real["accuracy"] == pytest.approx(virtual["accuracy"], abs=1e-3)
    assert 5 < base["perplexity"] < 40          # a working language model on English prose
    assert virtual["perplexity"] > base["perplexity"] * 1.01  # block 0 is among the most sensitive
    assert base["allreduce_per_forward"] - virtual["allreduce_per_forward"] == 3
