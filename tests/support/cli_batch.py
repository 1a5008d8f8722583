"""Run many ds-spd command lines in one process (``ds_spd.cli.main``): one interpreter start instead of one per
command (each costs seconds of imports), for the quick refusals of tests/support/bad_inputs.py and for sequences
of commands (a training run, what a user does next, the next run).

    python tests/support/cli_batch.py CASES.json RESULTS.json

CASES.json: a list of cases, each an argv ``[arg, ...]`` or ``{"argv": [...], "snapshot": [PATH, ...]}``.
RESULTS.json: per case its exit code, what it printed to stdout and stderr (a traceback if it raised), its seconds,
and for a case with "snapshot" what each PATH held after it: every file and folder under it, a JSON file as its
parsed content, any other file (or JSON that does not parse) as its sha256, a folder as null.
"""
import contextlib
import hashlib
import io
import json
import os
import sys
import time
import traceback


def snapshot(path: str) -> dict:
    """What ``path`` holds (see the module docstring)."""
    snap = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            snap[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                data = fh.read()
            snap[os.path.relpath(os.path.join(root, f), path)] = _content(f, data)
    return snap


def _content(name: str, data: bytes):
    if name.endswith(".json"):
        try:
            return json.loads(data)
        except ValueError:
            pass
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    from ds_spd.cli import main as cli
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        argv = case["argv"] if isinstance(case, dict) else case
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
        if isinstance(case, dict) and case.get("snapshot"):
            results[-1]["snapshot"] = {path: snapshot(path) for path in case["snapshot"]}
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
