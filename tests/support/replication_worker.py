"""Run under ``deepspeed --num_gpus N`` with N above the models' KV-head count (KV heads replicated): for each
model dir, the real-TP checks of tp_worker.py (== HF, == virtual TP, generation) and the sharded-loading checks
of sharded_worker.py (meta model, each rank reads its slices == full load), in one launch.

Usage: replication_worker.py MODEL_DIR[,MODEL_DIR...] OUT_PREFIX SPD_BLOCKS
(writes OUT_PREFIX.tp.<i>.rank<r>.json and OUT_PREFIX.sharded.<i>.rank<r>.json)
"""
import sys

import sharded_worker   # beside this script, on its sys.path
import tp_worker


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    model_dirs, out_prefix, blocks = args
    spd_blocks = [int(b) for b in blocks.split(",") if b]
    for i, model_dir in enumerate(model_dirs.split(",")):
        tp_worker.check(model_dir, f"{out_prefix}.tp.{i}", spd_blocks, "auto")
        sharded_worker.check(model_dir, f"{out_prefix}.sharded.{i}", spd_blocks, None)


if __name__ == "__main__":
    main()
