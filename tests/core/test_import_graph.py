"""The layering docs/design.md states, kept true: ds_spd.core (TP math, policy, communication) imports no weight
loading, checkpoint, stage, serving or tool code, at module level or inside a function."""
import ast
import os

from helpers import ROOT

CORE = os.path.join(ROOT, "ds_spd", "core")
FORBIDDEN = ("ds_spd.checkpoint", "ds_spd.models.loading", "ds_spd.models.sharded", "ds_spd.models.weights", "ds_spd.build", "ds_spd.run",
             "ds_spd.stages", "ds_spd.serve", "ds_spd.tools", "ds_spd.cli")


def imports_of(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_core_imports_no_loader_checkpoint_or_stage_code():
    found = {}
    for name in sorted(os.listdir(CORE)):
        if name.endswith(".py"):
            bad = sorted(m for m in imports_of(os.path.join(CORE, name)) if m.startswith(FORBIDDEN))
            if bad:
                found[name] = bad
    assert found == {}


def test_the_check_sees_function_level_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from ds_spd.models import sharded\n    from ds_spd.checkpoint import x\n")
    assert {"ds_spd.models.sharded", "ds_spd.checkpoint"} <= imports_of(str(path))


def test_the_engine_imports_no_http_framework():
    """The serve loop (and every follower rank) gets its queue and deltas from ds_spd.serve.state, not from the HTTP
    side: importing it loads no web framework and no pydantic."""
    import subprocess
    import sys
    code = ("import sys, ds_spd.serve.engine, ds_spd.serve.server; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'pydantic', 'uvicorn'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
