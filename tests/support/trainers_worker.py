"""Run under ``deepspeed --num_gpus N``: ``ds-spd distill ARGS --trainer T --out OUT_PREFIX/T`` for the joint, then
the layer-wise trainer, in one launch (the CLI's command, twice in one process group: ``cli.main`` shuts the group
down at its end, and DeepSpeed's groups do not come back for a second training in the same process).

Usage: trainers_worker.py OUT_PREFIX DISTILL_ARGS...
"""
import sys

from ds_spd import cli


def main():
    out, *argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]   # the launcher adds it
    for trainer in ("joint", "layerwise"):
        cli.cmd_distill(cli.build_parser().parse_args(["distill", *argv, "--out", f"{out}/{trainer}",
                                                        "--trainer", trainer]))
    cli._finish_distributed()


if __name__ == "__main__":
    main()
