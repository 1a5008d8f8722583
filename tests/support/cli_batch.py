"""Run many ds-spd command lines in one process (``ds_spd.cli.main``), for the quick refusals of
tests/bad_inputs.py: one interpreter start instead of one per case (each costs seconds of imports).

    python tests/support/cli_batch.py CASES.json RESULTS.json     # CASES.json: [[arg, ...], ...]

RESULTS.json: per case its exit code, what it printed to stdout and stderr (a traceback if it raised) and its
seconds. At most one command per batch may train (distill): DeepSpeed's process groups do not survive a
second training engine in one process.
"""
import contextlib
import io
import json
import sys
import time
import traceback


def main() -> None:
    from ds_spd.cli import main as cli
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for argv in cases:
        out, err, start = io.StringIO(), io.StringIO(), time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = cli(argv)
            except SystemExit as exc:   # argparse's own errors
                code = exc.code
            except BaseException:
                traceback.print_exc()
                code = 1
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                        "seconds": time.perf_counter() - start})
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
