"""The docs are reference, not history: no work-item numbers, commit hashes or dates in the README, docs/ (but the
changelog, where history belongs, and the generated results) or the package's docstrings and comments. An upstream
project's issue is cited as owner/repo#N; a link's target (a changelog anchor) is not prose."""
import glob
import os
import re

from helpers import ROOT

FORBIDDEN = {
    "work-item number": re.compile(r"(?<![\w/])(?:[Ii]ssues? #?\d+|#\d{2,}\b)"),
    "commit hash": re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b"),
    "date": re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b"),
}
LINK_TARGET = re.compile(r"\]\([^)]*\)")


def reference_files() -> list[str]:
    docs = [p for p in glob.glob(os.path.join(ROOT, "docs", "*.md")) if not p.endswith("changelog.md")]
    code = glob.glob(os.path.join(ROOT, "ds_spd", "**", "*.py"), recursive=True)
    return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "scripts", "README.md"), *docs, *code]


def findings(path: str) -> list[str]:
    found = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            text = LINK_TARGET.sub("]()", line)
            for what, pattern in FORBIDDEN.items():
                for m in pattern.finditer(text):
                    found.append(f"{os.path.relpath(path, ROOT)}:{n}: {what} {m.group(0)!r}")
    return found


def test_reference_docs_hold_no_history():
    assert [f for p in reference_files() for f in findings(p)] == []


def test_the_check_finds_what_it_forbids(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Against issue 30's targets, at bf4c055, on 2026-12-03.\nSee deepspeedai/DeepSpeed#7259 and "
                    "[history](changelog.md#test-suite-time-2026-11-to-2026-12-03); 2.0000001, 1e-4, 0xdeadbeef1.\n")
    assert [f.split(": ", 1)[1] for f in findings(str(page))] == [
        "work-item number 'issue 30'", "commit hash 'bf4c055'", "date '2026-12-03'"]


# ---------------------------------------------------------------- headline figures: one source, quoted exactly

def _pct(r: dict) -> str:
    return f"{100 * (r['ratio'] - 1):+.1f}% [{100 * (r['ci95'][0] - 1):+.1f}, {100 * (r['ci95'][1] - 1):+.1f}]"


def test_the_readme_quotes_the_readme_path_and_demo_figures_of_their_artefacts():
    """Each headline figure lives in its artefact (docs/results/); the README and docs/experiments.md quote it, and a
    quote that drifts from the artefact fails here."""
    import json

    from ds_spd.tools.evaluation import paired_ratio_ci
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    recovery = open(os.path.join(ROOT, "docs", "experiments.md"), encoding="utf-8").read()
    for run in ("default_tp2", "gemma3-270m_tp2", "gemma3-270m_tp4"):
        summary = json.load(open(os.path.join(ROOT, "docs", "results", "readme_path", run, "summary.json")))
        for n, row in summary["counts"].items():
            quoted = _pct(row["distilled"])
            assert quoted in readme and quoted in recovery, (run, n, quoted)
    demo = os.path.join(ROOT, "docs", "results", "demo")
    tp, distilled, zero = (json.load(open(os.path.join(demo, f"eval_{k}.json"))) for k in ("tp", "distilled", "zero_shot"))
    r = paired_ratio_ci(tp, distilled)
    assert f"{r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" in readme
    assert f"zero-shot {paired_ratio_ci(tp, zero)['ratio']:.3f}" in readme
