"""The CLI stays a shell (docs/design.md): every ``cmd_*`` parses, resolves, calls a stage or tool, reports, in at
most 30 lines; what a command needs beyond that belongs to the stage or tool it calls."""
import ast
import os

from helpers import ROOT


def test_every_command_is_at_most_30_lines():
    with open(os.path.join(ROOT, "ds_spd", "cli.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in tree.body
               if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")}
    assert len(lengths) >= 9 and {k: v for k, v in lengths.items() if v > 30} == {}
