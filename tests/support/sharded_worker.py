"""Run on N CPU ranks (torchrun, or ``deepspeed --num_gpus N``; tp N): sharded loading (meta model, each rank reads
its slices) against the full load (every rank loads the model, AutoTP shards it). Writes OUT_PREFIX.<i>.rank<r>.json
per model dir.

Usage: sharded_worker.py MODEL_DIR[@CHECKPOINT_DIR][,...] OUT_PREFIX SPD_BLOCKS
(a model with @CHECKPOINT_DIR runs with that SPD checkpoint overlaid instead of SPD_BLOCKS)
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

import ds_spd
from ds_spd.models.sharded import meta_model


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    model_dirs, out_prefix, blocks = args
    blocks = [int(b) for b in blocks.split(",") if b]
    for i, entry in enumerate(model_dirs.split(",")):
        model_dir, _, checkpoint = entry.partition("@")
        check(model_dir, f"{out_prefix}.{i}", blocks, checkpoint or None)


def check(model_dir, out_prefix, blocks, checkpoint):
    rank, tp = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = {"model": model_dir, "tp_size": tp}
    config.update({"checkpoint": checkpoint} if checkpoint else {"spd_blocks": blocks})
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, full.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    full_engine = ds_spd.init_inference(full, config)
    sharded_engine = ds_spd.init_inference(meta_model(full.config, torch.float32), config)
    res = {"rank": rank}
    with torch.no_grad():
        a, b = full_engine(ids).logits, sharded_engine(ids).logits
        res["max_diff"] = (a - b).abs().max().item()
        res["logit_scale"] = a.abs().max().item()
        params_full = dict(full_engine.module.named_parameters())
        # an empty shard (lm_head columns at a coarse grain) is equal when the shapes agree, else infinitely off
        res["param_diffs"] = {n: (p - params_full[n]).abs().max().item() if p.numel()
                              else (0.0 if p.shape == params_full[n].shape else float("inf"))
                              for n, p in sharded_engine.module.named_parameters()}
        res["buffer_diffs"] = {n: (b_ - dict(full_engine.module.named_buffers())[n]).abs().max().item()
                               for n, b_ in sharded_engine.module.named_buffers() if b_.is_floating_point()}
        res["local_shapes"] = {n: list(p.shape) for n, p in sharded_engine.module.named_parameters()
                               if ".layers.0." in n or "lm_head" in n}
        if checkpoint:   # the distilled weights really changed the function (the overlay is not a no-op)
            same_blocks = {"model": model_dir, "tp_size": tp, "spd_blocks": sharded_engine.get_spd_blocks()}
            plain = ds_spd.init_inference(meta_model(full.config, torch.float32), same_blocks)
            res["overlay_effect"] = (plain(ids).logits - b).abs().max().item()
        g_full = full_engine.module.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
        g_sharded = sharded_engine.module.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
        res["same_generation"] = g_full.tolist() == g_sharded.tolist()
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
