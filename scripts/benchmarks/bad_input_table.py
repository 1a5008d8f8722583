"""Try every bad-input class of tests/bad_inputs.py through the CLI and record what a user sees.

    python scripts/benchmarks/bad_input_table.py --out docs/results

Per case: exit code, the error line, seconds until refused, whether a traceback was printed, and whether any
file in the case's directory changed (written, replaced or deleted). Writes bad_input.json and bad_input.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))

from bad_inputs import CASES, ENV  # noqa: E402
from helpers import file_tree as _tree, run_cli, save_tiny  # noqa: E402

from ds_spd.outputs import MD_MARK, write_atomic, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/results")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        model = save_tiny(os.path.join(root, "tiny"))
        for i, (name, cls, setup, expected) in enumerate(CASES):
            tmp = os.path.join(root, f"case{i}")
            os.makedirs(tmp)
            argv = setup(tmp, model)
            before = _tree(tmp)
            start = time.perf_counter()
            proc = run_cli(argv, check=False, env=ENV)
            seconds = time.perf_counter() - start
            error = next((line for line in proc.stderr.splitlines() if line.startswith("ds-spd")), "")
            error = error.replace(root, "$TMP")
            rows.append({"case": name, "class": cls, "exit_code": proc.returncode, "error": error,
                         "seconds": round(seconds, 2), "traceback": "Traceback" in proc.stderr,
                         "files_unchanged": _tree(tmp) == before, "expected_text_found": expected in proc.stderr})
            print(f"{rows[-1]['exit_code']} {seconds:5.1f}s {name}: {error}", file=sys.stderr)
    ok = [r for r in rows if r["exit_code"] == 2 and not r["traceback"] and r["files_unchanged"]
          and r["expected_text_found"]]
    summary = {"cases": len(rows), "clear_error_nothing_changed": len(ok),
               "command": "python scripts/benchmarks/bad_input_table.py --out " + args.out}
    write_json(os.path.join(args.out, "bad_input.json"), {"summary": summary, "rows": rows}, "bad_input/1")
    lines = [MD_MARK, f"Command: `{summary['command']}`", "",
             "| bad input | class | exit | refused after | traceback | files unchanged | error line |", "|---" * 7 + "|"]
    for r in rows:
        err = r["error"].replace("|", "\\|")
        lines.append(f"| {r['case']} | {r['class']} | {r['exit_code']} | {r['seconds']:.1f} s | "
                     f"{'yes' if r['traceback'] else 'no'} | {'yes' if r['files_unchanged'] else 'NO'} | `{err}` |")
    lines += ["", f"Total: {len(ok)} of {len(rows)} classes are one clear error line (exit 2, no traceback) with "
                  "no file written, replaced or deleted."]
    write_atomic(os.path.join(args.out, "bad_input.md"), "\n".join(lines) + "\n")
    print("\n".join(lines[1:]))


if __name__ == "__main__":
    main()
