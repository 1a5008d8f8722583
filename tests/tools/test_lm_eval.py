"""The lm-evaluation-harness adapter, offline, on a tiny local task."""
import json
import os

import pytest
import torch
from helpers import ROOT, run_cli

pytest.importorskip("lm_eval")


def test_adapter_scores_the_spd_model(tiny_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ds_spd.tools.lm_eval_adapter import SPDLM
    lm = SPDLM(model=tiny_dir, virtual_tp=2, spd_blocks="0:2-3", batch_size=2)
    assert lm.spd_runner.spd_blocks == (0, 2, 3)
    # loglikelihood through lm_eval == the SPD model's own log-probabilities
    context, continuation = "def main", " return"
    (ll, _), = lm.loglikelihood([_request(context, continuation)])
    tok, model = lm.spd_runner.tokenizer, lm.spd_runner.hf_model
    ctx, cont = tok(context).input_ids, tok(context + continuation).input_ids[len(tok(context).input_ids):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0, len(ctx) - 1:-1]
    assert ll == pytest.approx(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        res = simple_evaluate(model=lm, tasks=["ds_spd_tiny_choice"],
                              task_manager=TaskManager(include_path=os.path.join(ROOT, "tests/data/lm_eval")))
    finally:
        os.chdir(cwd)
    acc = res["results"]["ds_spd_tiny_choice"]["acc,none"]
    assert res["n-samples"]["ds_spd_tiny_choice"]["effective"] == 6
    assert acc == pytest.approx(_independent_accuracy(tok, model))


def _independent_accuracy(tok, model) -> float:
    """The task's accuracy computed without lm_eval: per question, the choice whose continuation tokens have
    the highest summed log-probability under the SPD model (lm_eval's ``acc``), compared with the label."""
    docs = [json.loads(line) for line in open(os.path.join(ROOT, "tests/data/lm_eval/tiny_choice.jsonl"))]
    correct = 0
    for doc in docs:
        ctx = tok(doc["question"]).input_ids
        scores = []
        for choice in doc["choices"]:
            full = tok(doc["question"] + choice).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([full])).logits.log_softmax(-1)[0, len(ctx) - 1:-1]
            scores.append(logp.gather(-1, torch.tensor(full[len(ctx):])[:, None]).sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


def _request(context, continuation):
    from lm_eval.api.instance import Instance
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def test_adapter_command_line(tiny_dir, tmp_path):
    proc = run_cli(["--help"], check=False)  # the package imports without lm_eval on the path too
    assert proc.returncode == 0
    import subprocess
    import sys

    from helpers import clean_env
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "ds_spd.tools.lm_eval_adapter", "--model", "ds_spd",
           "--model_args", f"model={tiny_dir},virtual_tp=2,spd_blocks=1:3", "--tasks", "ds_spd_tiny_choice",
           "--include_path", "tests/data/lm_eval", "--output_path", str(out), "--batch_size", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=clean_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
    assert files and "ds_spd_tiny_choice" in json.load(open(files[0]))["results"]


def test_the_shipped_next_text_task_scores_offline(tiny_dir):
    """configs/lm_eval's ds_spd_next_text (the prefix-cache benchmark's task, built offline from the shipped
    corpora): 240 questions of four continuations; the in-process adapter scores a pydoc and a Shakespeare one."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ds_spd.tools.lm_eval_adapter import SPDLM
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "configs/lm_eval/next_text.jsonl"))]
    assert len(rows) == 240 and {r["corpus"] for r in rows} == {"pydoc", "shakespeare"}
    assert all(len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for r in rows)
    cwd = os.getcwd()
    os.chdir(ROOT)   # the task names its data relative to the repository root
    try:
        res = simple_evaluate(model=SPDLM(model=tiny_dir, virtual_tp=2, spd_blocks="0", batch_size=4),
                              tasks=["ds_spd_next_text"], samples={"ds_spd_next_text": [0, 30]},
                              task_manager=TaskManager(include_path=os.path.join(ROOT, "configs/lm_eval")),
                              log_samples=True)
    finally:
        os.chdir(cwd)
    scored = res["samples"]["ds_spd_next_text"]
    assert sorted(s["doc_id"] for s in scored) == [0, 30] and all(len(s["resps"]) == 4 for s in scored)
    assert 0 <= res["results"]["ds_spd_next_text"]["acc,none"] <= 1
