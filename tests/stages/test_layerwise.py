"""Layer-wise distillation (ds_spd.stages.distill.layerwise): one block resident at a time, activations over the
budget spilled to files, equal to the joint trainer (resumable per block and per epoch: tests/cli/test_safety.py)."""
import copy
import json
import os

import pytest
import torch
from helpers import tiny_model

import ds_spd
from ds_spd.plan import Plan
from ds_spd.stages.distill.joint import distill
from ds_spd.stages.distill.kit import DistillSettings
from ds_spd.stages.distill.layerwise import distill_layerwise
from ds_spd.stages.streaming import ActivationBudget, ActivationStore, BlockSource

CPU_ZERO2 = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
             "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.0, "torch_adam": True}}}


def _plan(config, classes):
    plan = Plan.from_blocks("tiny", config, 2, [])
    for b, c in zip(plan.blocks, classes):
        b.cls = c
    return plan


@pytest.mark.parametrize("family,source,budget,classes", [
    ("llama", "original", 0, ["SB", "ISB", "ESB", "TP"]),       # every activation spilled to files
    ("llama", "prefix", None, ["SB", "ISB", "ESB", "TP"]),      # inputs from the plan's zero-shot SPD prefix
    ("llama", "lag", None, ["SB", "ISB", "ESB", "TP"]),         # original inputs, students with lagged attention
    # scaled embeddings, sandwich norms, sliding windows; gradient norms above 1, where DeepSpeed's default
    # clipping (1.0) acts on the joint engine's global norm over both blocks: equal without clipping only
    ("gemma3_text", "original", None, ["SB", "ISB", "ESB", "TP"]),
])
def test_layerwise_equals_joint_trainer(family, source, budget, classes, tmp_path):
    overrides = dict(sliding_window=8, query_pre_attn_scalar=16,
                     layer_types=["sliding_attention", "full_attention"] * 2) if family == "gemma3_text" else {}
    base = tiny_model(family, **overrides)
    segments = torch.randint(0, 384, (8, 24), generator=torch.Generator().manual_seed(1))
    plan = _plan(base.config, classes)
    lag, source = source == "lag", "original" if source == "lag" else source
    settings = DistillSettings(epochs=3, lr=2e-3, micro_batch=4, input_source=source, patience=3)   # no early stop
    ds_config = {**CPU_ZERO2, "gradient_clipping": 0.0}
    virtual = ds_spd.virtualize(copy.deepcopy(base), 2)
    ds_spd.set_lag(virtual, lag)
    joint = distill(virtual, plan, segments, copy.deepcopy(ds_config), settings, progress=False)

    def layerwise(lag: bool, work: str):
        return distill_layerwise(BlockSource.from_model(base, 2, 64, lag=lag), plan, segments,
                                 copy.deepcopy(ds_config), settings, work_dir=str(tmp_path / work),
                                 budget_bytes=budget, progress=False)
    layer = layerwise(lag, "work")
    trained = [i for i, c in enumerate(classes) if c in ("SB", "ESB")]   # blocks 0 (SB) and 2 (ESB)
    assert sorted(layer.block_states) == sorted(joint.block_states) == trained
    for i in trained:
        for k, v in joint.block_states[i].items():
            assert (layer.block_states[i][k] - v).abs().max() <= 1e-6, (i, k)
        assert layer.initial_mse[i] == pytest.approx(joint.initial_mse[i], rel=1e-6)
        for a, b in zip(joint.history, layer.history):
            assert b["loss"][i] == pytest.approx(a["loss"][i], rel=1e-5)
    assert sorted(layer.groupings) == sorted(joint.groupings) == [0, 2]   # head_grouping "all": SB blocks too
    assert all(layer.groupings[i] == joint.groupings[i] for i in (0, 2))
    assert (layer.spilled_bytes > 0) == (budget == 0)
    assert not (tmp_path / "work" / "activations").exists()   # spill files and their directory removed
    # the distilled weights really changed (not the teacher's)
    assert not torch.equal(layer.block_states[0]["mlp.up_proj.weight"], base.model.layers[0].mlp.up_proj.weight)
    if lag:   # the students trained with the lag: another starting error, other weights
        plain = layerwise(False, "plain")
        assert all(plain.initial_mse[i] != layer.initial_mse[i] for i in trained)
        assert not torch.equal(plain.block_states[0]["mlp.up_proj.weight"], layer.block_states[0]["mlp.up_proj.weight"])


def _count_walks(monkeypatch) -> list[int]:
    """The segment count of every walk started from now on (each starts at the embedding's first inputs)."""
    walked = []
    first_inputs = BlockSource.first_inputs
    monkeypatch.setattr(BlockSource, "first_inputs", lambda self, segs, *a, **k: (walked.append(len(segs)),
                                                                                  first_inputs(self, segs, *a, **k)))
    return walked


def _chain_run(base, segments, plan, settings, work_dir=None, seen=None, monkeypatch=None):
    """distill_layerwise in chain mode; ``seen``: block -> (student inputs, targets) as handed to training."""
    from ds_spd.stages.distill import layerwise
    if seen is not None:
        train = layerwise._train_block

        def spy(i, teacher, rotary, layout, cls, x, y, *rest):
            seen[i] = (x.read(0, len(x)).clone(), y.read(0, len(y)).clone())
            return train(i, teacher, rotary, layout, cls, x, y, *rest)
        monkeypatch.setattr(layerwise, "_train_block", spy)
    return distill_layerwise(BlockSource.from_model(base, 2, 64), plan, segments, copy.deepcopy(CPU_ZERO2), settings,
                             work_dir=work_dir, progress=False)


def test_chain_trains_on_the_chain_as_it_runs_against_the_teachers_outputs(monkeypatch):
    """input_source "chain": block 2 (ESB) trains on the outputs of block 0 with its distilled weights and block 1 in
    zero-shot SPD form (the model as it will run), against the original model's block-2 outputs; block 0, before
    any SPD block, on the original inputs."""
    from ds_spd.core.inject import distilled_in
    from ds_spd.stages.scan import BlockInputs
    base = tiny_model("llama")
    segments = torch.randint(0, 384, (8, 24), generator=torch.Generator().manual_seed(3))
    plan = _plan(base.config, ["SB", "ISB", "ESB", "TP"])
    seen = {}
    result = _chain_run(base, segments, plan, DistillSettings(epochs=2, lr=2e-3, micro_batch=4, input_source="chain"),
                        seen=seen, monkeypatch=monkeypatch)
    assert sorted(seen) == sorted(result.block_states) == [0, 2]
    model = ds_spd.virtualize(copy.deepcopy(base), 2)
    original = BlockInputs.capture(model, segments, 4, progress=False).inputs   # the teacher chain
    with distilled_in(model, result.block_states, [0, 1]):
        chain = BlockInputs.capture(model, segments, 4, progress=False).inputs
    assert torch.equal(seen[0][0], original[0]) and torch.allclose(seen[0][1], original[1], atol=1e-5)
    assert torch.allclose(seen[2][0], chain[2], atol=1e-5), (seen[2][0] - chain[2]).abs().max()
    assert torch.allclose(seen[2][1], original[3], atol=1e-5)
    assert (chain[2] - original[2]).abs().max() > 1e-2      # the chain really drifted: a different input


def test_chain_retrains_the_blocks_after_a_changed_one(tmp_path, capsys, monkeypatch):
    """A block's chain inputs depend on the weights trained before it: asking for more epochs retrains block 0
    (its training state was removed when it finished), so block 2, after it in the chain, is trained again
    too; the result is bitwise a fresh run's. The same run again trains nothing and walks nothing."""
    base = tiny_model("llama")
    segments = torch.randint(0, 384, (8, 24), generator=torch.Generator().manual_seed(4))
    plan = _plan(base.config, ["SB", "ISB", "ESB", "TP"])
    settings = DistillSettings(epochs=2, lr=2e-3, micro_batch=4, input_source="chain", patience=3)
    work = str(tmp_path / "work")
    first = _chain_run(base, segments, plan, settings, work)
    walked = _count_walks(monkeypatch)
    again = _chain_run(base, segments, plan, settings, work)
    assert walked == []   # every block's key (the digest of the blocks before it included) found: no walk
    assert all(torch.equal(first.block_states[i][k], again.block_states[i][k]) for i in (0, 2)
               for k in first.block_states[i])
    capsys.readouterr()
    more = settings.model_copy(update={"epochs": 3})
    resumed = _chain_run(base, segments, plan, more, work)
    assert "block 2: the blocks before it changed since it was trained" in capsys.readouterr().err
    fresh = _chain_run(base, segments, plan, more, str(tmp_path / "fresh"))
    for i in (0, 2):
        for k, v in fresh.block_states[i].items():
            assert torch.equal(resumed.block_states[i][k], v), (i, k)
    assert not torch.equal(resumed.block_states[2]["mlp.up_proj.weight"], first.block_states[2]["mlp.up_proj.weight"])


def test_loss_window_measures_the_error_after_the_next_original_block(monkeypatch):
    """loss_window 1: block 0 (SB) trains against the original model's output after block 1 (its target), through
    block 1 frozen in TP form; its reported starting MSE is exactly that (the student's output through the original
    block 1, against the teacher's); block 1's weights are not trained."""
    from ds_spd.stages.scan import BlockInputs
    base = tiny_model("llama")
    segments = torch.randint(0, 384, (8, 24), generator=torch.Generator().manual_seed(5))
    plan = _plan(base.config, ["SB", "TP", "TP", "TP"])
    settings = DistillSettings(epochs=1, lr=2e-3, micro_batch=4, loss_window=1, val_segments=0)
    seen = {}
    result = _chain_run(base, segments, plan, settings, seen=seen, monkeypatch=monkeypatch)
    model = ds_spd.virtualize(copy.deepcopy(base), 2)
    original = BlockInputs.capture(model, segments, 4, progress=False).inputs
    assert torch.equal(seen[0][0], original[0]) and torch.allclose(seen[0][1], original[2], atol=1e-5)
    from ds_spd.core.inject import decoder_layers
    layers = decoder_layers(model)
    student = copy.deepcopy(layers[0])
    student.spd = True
    from ds_spd.stages.headgroup import attention_kwargs, find_grouping, permute_block
    grouping = find_grouping(student, model.model.rotary_emb, original[0][:8], BlockSource.from_model(base, 2, 64).layout,
                             "neuron")
    permute_block(student, grouping, BlockSource.from_model(base, 2, 64).layout)
    x = original[0][:4]
    with torch.no_grad():
        h = student(x, **attention_kwargs(model.model.rotary_emb, x, student))
        h = layers[1](h, **attention_kwargs(model.model.rotary_emb, h, layers[1]))
    assert result.initial_mse[0] == pytest.approx(torch.nn.functional.mse_loss(h, original[2][:4]).item(), rel=1e-5)
    assert sorted(result.block_states) == [0]


def test_esb_blocks_train_on_their_own_segments(tmp_path, monkeypatch):
    """esb_segments: the ESB block (2) is trained exactly as it would be alone on those segments (bitwise); the
    other trained block (0) exactly as without the option; a second run takes both from the work dir, without
    walking the model on the ESB segments again."""
    base = tiny_model("llama")
    draw = lambda n, seed: torch.randint(0, 384, (n, 24), generator=torch.Generator().manual_seed(seed))
    segments, esb = draw(8, 6), draw(16, 7)
    plan = _plan(base.config, ["SB", "ISB", "ESB", "TP"])
    settings = DistillSettings(epochs=1, lr=2e-3, micro_batch=4)

    def run(plan, segments, esb=None, work=None):
        return distill_layerwise(BlockSource.from_model(base, 2, 64), plan, segments, copy.deepcopy(CPU_ZERO2),
                                 settings, work_dir=work, progress=False, esb_segments=esb)
    both = run(plan, segments, esb, str(tmp_path / "work"))
    without = run(plan, segments)
    alone = run(_plan(base.config, ["TP", "TP", "ESB", "TP"]), esb)
    assert sorted(both.block_states) == [0, 2] and sorted(both.groupings) == [0, 2]
    for mine, ref, i in ((both, without, 0), (both, alone, 2)):
        for k, v in ref.block_states[i].items():
            assert torch.equal(mine.block_states[i][k], v), (i, k)
        assert mine.final_mse[i] == ref.final_mse[i] and mine.groupings[i] == ref.groupings[i]
    assert not torch.equal(both.block_states[2]["mlp.up_proj.weight"], without.block_states[2]["mlp.up_proj.weight"])
    walked = _count_walks(monkeypatch)
    again = run(plan, segments, esb, str(tmp_path / "work"))   # both blocks finished: nothing trained again
    assert again.seconds == both.seconds and again.final_mse == both.final_mse
    assert walked == []   # every trained block finished: no walk at all, on either set of segments
    (tmp_path / "work" / "block000.json").unlink()   # block 0 unfinished: only the main walk runs
    run(plan, segments, esb, str(tmp_path / "work"))
    assert walked == [8]
    assert not (tmp_path / "work" / "activations_esb").exists()


def test_esb_segments_min_sensitivity_picks_the_blocks_that_read_them():
    """esb_segments_min_sensitivity: of two ESB blocks only the one at or above the floor (relative sensitivity 2.0
    against 0.1) reads the ESB segments (bitwise as alone on them); the other trains as without the option."""
    from ds_spd.stages.distill.layerwise import esb_own_blocks
    base = tiny_model("llama")
    draw = lambda n, seed: torch.randint(0, 384, (n, 24), generator=torch.Generator().manual_seed(seed))
    segments, esb = draw(8, 6), draw(16, 7)
    plan = _plan(base.config, ["ESB", "ISB", "ESB", "TP"])
    plan.scan = {"metric": "ppl", "baseline": 10.0}
    for b, s in zip(plan.blocks, (20.0, 0.1, 1.0, 0.0)):
        b.sensitivity = s
    assert esb_own_blocks(plan) == [0, 2] and esb_own_blocks(plan, 0.5) == [0] and esb_own_blocks(plan, 3.0) == []

    def run(plan, segments, esb=None):
        settings = DistillSettings(epochs=1, lr=2e-3, micro_batch=4, esb_segments=None if esb is None else 16,
                                   esb_segments_min_sensitivity=None if esb is None else 0.5)
        return distill_layerwise(BlockSource.from_model(base, 2, 64), plan, segments, copy.deepcopy(CPU_ZERO2),
                                 settings, progress=False, esb_segments=esb).block_states
    picked = run(plan, segments, esb)
    alone, without = run(_plan(base.config, ["ESB", "TP", "TP", "TP"]), esb), run(plan, segments)
    for ref, i in ((alone, 0), (without, 2)):
        for k, v in ref[i].items():
            assert torch.equal(picked[i][k], v), (i, k)
    assert not torch.equal(picked[0]["mlp.up_proj.weight"], without[0]["mlp.up_proj.weight"])


def test_chain_and_loss_window_need_the_layerwise_trainer():
    from ds_spd.config import DistillConfig
    with pytest.raises(ValueError, match="esb_segments .* input_source 'original' only"):
        DistillConfig(esb_segments=64, input_source="chain")
    with pytest.raises(ValueError, match="esb_segments .* layerwise trainer"):
        DistillConfig(esb_segments=64, trainer="joint")
    with pytest.raises(ValueError, match="esb_segments_min_sensitivity .* set esb_segments"):
        DistillConfig(esb_segments_min_sensitivity=0.5)
    with pytest.raises(ValueError, match="input_source 'chain' .* layerwise trainer only"):
        DistillConfig(input_source="chain", trainer="joint")
    with pytest.raises(ValueError, match="loss_window applies to the layerwise trainer only"):
        DistillConfig(loss_window=1, trainer="joint")


def test_default_clipping_couples_the_joint_trainers_blocks():
    """DeepSpeed clips gradients at 1.0 by default; the joint engine clips the global norm over all its blocks,
    the layer-wise trainer each block's own. Where norms exceed 1 (tiny Gemma 3 here) block 0 trained with
    block 2 in one joint engine differs from block 0 trained alone; layer-wise, it does not."""
    base = tiny_model("gemma3_text", sliding_window=8, query_pre_attn_scalar=16,
                      layer_types=["sliding_attention", "full_attention"] * 2)
    segments = torch.randint(0, 384, (8, 24), generator=torch.Generator().manual_seed(1))
    settings = DistillSettings(epochs=2, lr=2e-3, micro_batch=4, val_segments=0)   # the last epoch's weights
    states = {}
    for name, classes in (("both", ["SB", "TP", "SB", "TP"]), ("alone", ["SB", "TP", "TP", "TP"])):
        plan = _plan(base.config, classes)
        states["joint", name] = distill(ds_spd.virtualize(copy.deepcopy(base), 2), plan, segments,
                                        copy.deepcopy(CPU_ZERO2), settings, progress=False).block_states[0]
        states["layerwise", name] = distill_layerwise(BlockSource.from_model(base, 2, 64), plan, segments,
                                                      copy.deepcopy(CPU_ZERO2), settings, progress=False).block_states[0]
    w = "mlp.up_proj.weight"
    assert torch.equal(states["layerwise", "both"][w], states["layerwise", "alone"][w])
    assert torch.equal(states["joint", "alone"][w], states["layerwise", "alone"][w])
    assert not torch.equal(states["joint", "both"][w], states["joint", "alone"][w])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spilled_activations_round_trip(dtype, tmp_path):
    budget = ActivationBudget(100)
    store = ActivationStore((5, 3, 4), dtype, budget, str(tmp_path), "x")
    assert not store.in_ram and os.path.getsize(store.path) == 5 * 3 * 4 * dtype.itemsize
    values = torch.randn(5, 3, 4).to(dtype)
    store.write(0, values[:2])
    store.write(2, values[2:])
    assert torch.equal(store.read(0, 5), values) and torch.equal(store.read(3, 4), values[3:4])
    store.close()
    assert not os.listdir(tmp_path)
    ram = ActivationStore((1, 2, 2), dtype, ActivationBudget(10**6), str(tmp_path), "y")
    assert ram.in_ram and not os.listdir(tmp_path)


def test_first_inputs_match_the_models_own_block_inputs():
    """Block 0's inputs come from the model's own forward (Gemma scales its embeddings)."""
    from ds_spd.stages.scan import BlockInputs
    base = tiny_model("gemma", hidden_act="gelu_pytorch_tanh")
    segments = torch.randint(0, 384, (3, 10), generator=torch.Generator().manual_seed(2))
    store = ActivationStore((3, 10, base.config.hidden_size), torch.float32, ActivationBudget(10**9), None, "x")
    BlockSource.from_model(base, 2, 64).first_inputs(segments, 2, store)
    expected = BlockInputs.capture(ds_spd.virtualize(copy.deepcopy(base), 2), segments, 2, progress=False).inputs[0]
    assert torch.equal(store.read(0, 3), expected)
    # the scale (a buffer of the embedding module, which materialising must keep) is applied
    assert not torch.equal(expected, base.model.embed_tokens.weight[segments])


@pytest.fixture
def lw_setup(tiny_dir, tmp_path):
    from transformers import AutoConfig
    plan = _plan(AutoConfig.from_pretrained(tiny_dir), ["SB", "TP", "ESB", "SB"])
    plan.model = tiny_dir
    plan_path = str(tmp_path / "plan.json")
    plan.save(plan_path)
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({**CPU_ZERO2, "spd": {"distill": {"lr": 2e-3}}}))
    return ["distill", "--config", str(cfg), "--plan", plan_path, "--max-samples", "8", "--seq-len", "24",
            "--json"], tmp_path


@pytest.mark.multirank
def test_two_ranks_layerwise_equals_joint(lw_setup):
    """`--trainer joint` and `--trainer layerwise` on 2 ranks: each rank computes a share of the activation
    batches and the owners broadcast them, so every rank still trains on exactly the activations the joint
    trainer captures (bitwise equal weights, gradient clipping off)."""
    from helpers import launch_workers
    from safetensors.torch import load_file

    from ds_spd.checkpoint import WEIGHTS
    args, tmp = lw_setup
    cfg = tmp / "ds_noclip.json"
    cfg.write_text(json.dumps({**CPU_ZERO2, "gradient_clipping": 0.0, "spd": {"distill": {"lr": 2e-3}}}))
    args = [a if a != str(tmp / "ds.json") else str(cfg) for a in args]
    launch_workers(["tests/support/trainers_worker.py", str(tmp), *args[1:], "--epochs", "2"])   # both, one launch
    a, b = load_file(str(tmp / "joint" / WEIGHTS)), load_file(str(tmp / "layerwise" / WEIGHTS))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for trainer in ("joint", "layerwise"):   # the --trainer flag chose the trainer
        prov = json.load(open(tmp / trainer / "provenance.json"))
        assert prov["ranks"] == 2 and prov["trainer"] == trainer
