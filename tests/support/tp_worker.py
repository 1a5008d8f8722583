"""Run on N CPU ranks (torchrun, or ``deepspeed --num_gpus N``): real TP (tp N) against HF and virtual TP, and
where asked sharded loading against the full load (sharded_worker.py), for several models in one launch; one
JSON per rank and check.

Usage: tp_worker.py SPEC_JSON OUT_PREFIX SPD_BLOCKS(comma list)
SPEC_JSON: a list of {"dir": MODEL_DIR, "comm": "auto" | "gloo", "sharded": bool}; for the i-th model the real-TP
checks go to OUT_PREFIX.tp.<i>.rank<r>.json and the sharded-loading ones to OUT_PREFIX.sharded.<i>.rank<r>.json
"""
import copy
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import ds_spd
from ds_spd.core.inject import lag_refusal


def main():
    import sharded_worker   # beside this script, on its sys.path
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    spec_file, out_prefix, blocks = args
    blocks = [int(b) for b in blocks.split(",") if b]
    with open(spec_file) as f:
        for i, model in enumerate(json.load(f)):
            check(model["dir"], f"{out_prefix}.tp.{i}", blocks, model["comm"])
            if model["sharded"]:
                sharded_worker.check(model["dir"], f"{out_prefix}.sharded.{i}", blocks, None)


def check(model_dir, out_prefix, blocks, comm):
    rank, tp = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_layers = base.config.num_hidden_layers
    torch.manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        hf_logits = base(ids).logits
        virtual = ds_spd.virtualize(copy.deepcopy(base), tp, blocks)
        virtual_logits = virtual(ids).logits

    engine = ds_spd.init_inference(copy.deepcopy(base), {"tp_size": tp, "spd_blocks": blocks, "comm": comm})
    res = {"rank": rank, "tp": tp, "n_layers": n_layers}
    layers = engine.module.model.layers   # AutoTP's actual shards, every layer
    res["local_o_proj_cols_per_layer"] = [layer.self_attn.o_proj.weight.shape[1] for layer in layers]
    res["local_mlp_cols_per_layer"] = [layer.mlp.down_proj.weight.shape[1] for layer in layers]
    res["layout_attn_cols"] = list(engine.spd_layout.attn_cols)
    res["layout_mlp_cols"] = list(engine.spd_layout.mlp_cols)
    with torch.no_grad():
        engine.spd_stats.reset()
        real_logits = engine(ids).logits
        res["spd_allreduce"] = engine.spd_stats.summary()
        res["real_vs_virtual"] = (real_logits - virtual_logits).abs().max().item()
        res["spd_vs_hf"] = (real_logits - hf_logits).abs().max().item()

        engine.set_spd_blocks(range(n_layers))
        engine.spd_stats.reset()
        engine(ids)
        res["all_spd_allreduce"] = engine.spd_stats.summary()

        engine.set_spd_blocks([])
        engine.spd_stats.reset()
        off_logits = engine(ids).logits
        res["off_allreduce"] = engine.spd_stats.summary()
        res["off_vs_hf"] = (off_logits - hf_logits).abs().max().item()

        engine.set_spd_blocks(blocks)
        prompt = ids[:1, :5]
        g_real = engine.module.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        g_virtual = virtual.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        g_nocache = virtual.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False)
    res["gen_real"], res["gen_virtual"], res["gen_nocache"] = g_real.tolist(), g_virtual.tolist(), g_nocache.tolist()
    if lag_refusal(virtual.model.layers[0].adapter) is None:   # lagged attention: real == virtual, cached == not
        ds_spd.set_lag(virtual)
        ds_spd.set_lag(engine.module)
        with torch.no_grad():
            engine.spd_stats.reset()
            res["lag_real_vs_virtual"] = (engine(ids).logits - virtual(ids).logits).abs().max().item()
            res["lag_allreduce"] = engine.spd_stats.summary()
            g = [m.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, **kw)
                 for m, kw in ((engine.module, {}), (virtual, {}), (virtual, {"use_cache": False}))]
        res["lag_gen"] = [t.tolist() for t in g]
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
