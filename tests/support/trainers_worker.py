"""Run on N CPU ranks (torchrun, or ``deepspeed --num_gpus N``): ``ds-spd distill ARGS --trainer T --out
OUT_PREFIX/T`` for the joint, then the layer-wise trainer, in one launch (the CLI's command, twice in one process
group, which ``cli.main`` would shut down after the first).

Usage: trainers_worker.py OUT_PREFIX DISTILL_ARGS...
"""
import sys

from ds_spd import cli
from ds_spd.core.comm import finish_comm


def main():
    out, *argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]   # the deepspeed launcher adds it
    for trainer in ("joint", "layerwise"):
        cli.cmd_distill(cli.build_parser().parse_args(["distill", *argv, "--out", f"{out}/{trainer}",
                                                        "--trainer", trainer]))
    finish_comm()


if __name__ == "__main__":
    main()
