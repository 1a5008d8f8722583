"""Sharded loading (ds_spd.models.sharded): each real TP rank reads only its AutoTP slices from safetensors.
Proved by equality with the full load (every rank loads the model, AutoTP shards it) on 2 CPU ranks, for
LLaMA (uneven GQA split), Qwen2 (q/k/v biases, even split) and Mistral (tied embeddings, one file), saved in
several shard files; the SPD checkpoint overlay; bad weight directories refused before any allocation."""
import json
import os

import pytest
import torch
from helpers import EVEN, launch_workers, spd_checkpoint, tiny_model, tiny_tokenizer

from ds_spd.errors import DataError
from ds_spd.models.sharded import check_weight_files, meta_model
from ds_spd.models.weights import weight_files

MODELS = {   # name: (model type, overrides, max shard size; None: one model.safetensors)
    "llama-uneven": ("llama", {}, "60KB"),
    "qwen2-bias-even": ("qwen2", EVEN, "40KB"),
    "mistral-tied": ("mistral", dict(tie_word_embeddings=True), None),
}


def _save(path, model_type, overrides, shard_size, seed=0):
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    dirs = {}
    for name, (model_type, overrides, shard) in MODELS.items():
        _save(str(root / name), model_type, overrides, shard)
        dirs[name] = str(root / name)
    return dirs


@pytest.mark.multirank
def test_sharded_load_equals_full_load(model_dirs, tmp_path):
    assert len([f for f in os.listdir(model_dirs["llama-uneven"]) if f.endswith(".safetensors")]) > 3
    prefix = str(tmp_path / "res")
    ck = spd_checkpoint(model_dirs["llama-uneven"], str(tmp_path / "ck"), [1], tuned=(2,))   # block 2: TP form
    entries = [*model_dirs.values(), f"{model_dirs['llama-uneven']}@{ck}"]   # the last with the overlay
    launch_workers(["tests/support/sharded_worker.py", ",".join(entries), prefix, "1,2"])   # one launch
    for i, name in enumerate([*MODELS, "llama+checkpoint"]):
        results = [json.load(open(f"{prefix}.{i}.rank{r}.json")) for r in (0, 1)]
        for res in results:
            assert res["max_diff"] <= 1e-6 * max(1.0, res["logit_scale"]), (name, res["max_diff"])
            assert all(v == 0 for v in res["param_diffs"].values()), (name, res["param_diffs"])  # bitwise
            assert all(v == 0 for v in res["buffer_diffs"].values()), (name, res["buffer_diffs"])
            assert res["same_generation"], name
        if name == "llama+checkpoint":
            assert all(r["overlay_effect"] > 1e-3 for r in results)
        shapes = [r["local_shapes"] for r in results]
        q = "model.layers.0.self_attn.q_proj.weight"
        assert shapes[0][q][0] + shapes[1][q][0] == (96 if name != "qwen2-bias-even" else 64), name
        if name == "llama-uneven":
            assert shapes[0][q][0] != shapes[1][q][0]            # uneven GQA split: 4 + 2 heads
        if name == "qwen2-bias-even":
            assert "model.layers.0.self_attn.q_proj.bias" in shapes[0]


def test_missing_shard_file_refused_before_loading(model_dirs, tmp_path, capsys):
    import shutil

    from ds_spd.cli import main
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["llama-uneven"], broken)
    victim = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))[2]
    os.remove(broken / victim)
    with pytest.raises(DataError, match=f"shard file '{victim}' named by .* is missing"):
        weight_files(str(broken))
    # the CLI's refusal, in this process (an error other than the user's would raise here)
    assert main(["eval", "--model", str(broken), "--tp", "1", "--max-samples", "1", "--seq-len", "8"]) == 2
    assert "is missing" in capsys.readouterr().err


def test_index_naming_a_missing_tensor_refused(model_dirs, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["llama-uneven"], broken)
    index_path = broken / "model.safetensors.index.json"
    index = json.load(open(index_path))
    first = sorted(index["weight_map"])[0]
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = index["weight_map"][first]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(DataError, match="model.layers.0.self_attn.extra.weight.*does not hold it"):
        weight_files(str(broken))


def test_stored_weights_checked_against_the_config(model_dirs, tmp_path):
    """A parameter the config needs but no file holds, or a stored shape the config does not imply, is a
    clear error from the headers (nothing allocated: the model is on the meta device)."""
    from transformers import AutoConfig
    stored = weight_files(model_dirs["llama-uneven"])
    cfg = AutoConfig.from_pretrained(model_dirs["llama-uneven"])
    check_weight_files(meta_model(cfg, torch.float32), stored)   # the right config passes
    bigger = meta_model(AutoConfig.from_pretrained(model_dirs["llama-uneven"], intermediate_size=256), torch.float32)
    with pytest.raises(DataError, match="do not match the model config: .*mlp"):
        check_weight_files(bigger, stored)
    deeper = meta_model(AutoConfig.from_pretrained(model_dirs["llama-uneven"], num_hidden_layers=5), torch.float32)
    with pytest.raises(DataError, match="do not hold .* e.g. .*layers.4"):
        check_weight_files(deeper, stored)
    assert all(p.device.type == "meta" for p in deeper.parameters())


def test_no_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match="no model.safetensors or model.safetensors.index.json.*--load full"):
        weight_files(str(tmp_path))


def test_load_flag_refused_where_it_cannot_apply(model_dirs, tmp_path):
    from helpers import run_cli_batch
    ev, scan = run_cli_batch([["eval", "--model", model_dirs["llama-uneven"], "--virtual-tp", "2", "--load", "full"],
                              ["scan", "--model", model_dirs["llama-uneven"], "--virtual-tp", "2", "--load", "full"]],
                             str(tmp_path))
    assert ev["code"] == 2 and "--load does not apply with --virtual-tp" in ev["stderr"]
    assert scan["code"] == 2 and "--load" in scan["stderr"]
