"""Nothing lost, nothing silent: output safety, atomic checkpoints, resume integrity, bad input."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from bad_inputs import CASES, ENV, TINY_DATA
from helpers import (ROOT, assert_no_shm_left, file_tree as _tree, last_json, run_cli, run_cli_batch, shm_buffers,
                     tiny_config, tiny_plan_file)

from ds_spd import outputs
from ds_spd.checkpoint import FILES, WEIGHTS, open_checkpoint, save_checkpoint
from ds_spd.errors import OutputError, PlanError
from ds_spd.plan import Plan

ZERO2 = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
         "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.0, "torch_adam": True}}}
DATA = ["--max-samples", "8", "--seq-len", "24"]


# ---------------------------------------------------------------- bad input: one clear line, exit 2, no work

@pytest.fixture(scope="module")
def refusals(tiny_dir, tmp_path_factory):
    """Every bad-input case through the CLI's main, all in one process (tests/support/cli_batch.py): per case its
    directory, that directory's files before, and the result."""
    root = tmp_path_factory.mktemp("bad_inputs")
    dirs, argvs, before = [], [], []
    for i, (_, _, setup, _) in enumerate(CASES):
        d = root / f"case{i}"
        d.mkdir()
        argvs.append(setup(str(d), tiny_dir))
        dirs.append(d)
        before.append(_tree(d))
    return list(zip(dirs, before, run_cli_batch(argvs, str(root), ENV)))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(i, refusals):
    name, expected = CASES[i][0], CASES[i][3]
    directory, before, result = refusals[i]
    assert result["code"] == 2, (name, result["stderr"][-3000:])
    assert expected in result["stderr"], (name, result["stderr"][-3000:])
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert len([line for line in result["stderr"].splitlines() if line.startswith("ds-spd")]) == 1, result
    assert _tree(directory) == before, f"{name}: files changed"   # nothing written, nothing deleted
    assert result["seconds"] < 60, f"{name}: took {result['seconds']:.0f} s to refuse"


def test_output_file_rules(tmp_path):
    ours = tmp_path / "plan.json"
    Plan.from_blocks("tiny", tiny_config(), 2, []).save(str(ours))
    assert outputs.check_output_file(str(ours), "plan output")   # ds_spd's own: may be replaced
    foreign = tmp_path / "plan2.json"
    foreign.write_text('{"format": "something else"}')
    with pytest.raises(OutputError, match="was not written by ds_spd"):
        outputs.check_output_file(str(foreign), "plan output")
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(OutputError, match="was not written by ds_spd"):
        outputs.check_output_file(str(png), "plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ds_spd.tools.plots import save_figure
    save_figure(plt.figure(), str(tmp_path / "ours.png"))
    assert outputs.owned(str(tmp_path / "ours.png"))
    # a missing directory is fine (created when written), a file in the way is not
    assert outputs.check_output_file(str(tmp_path / "new" / "sub" / "p.json"), "plan output")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        outputs.check_output_file(str(foreign / "p.json"), "plan output")


def test_plan_out_onto_directory_leaves_no_tmp(tiny_dir, tmp_path, capsys):
    from bad_inputs import _plan

    from ds_spd.cli import main
    plan = _plan(str(tmp_path), tiny_dir)
    target = tmp_path / "d"
    target.mkdir()
    assert main(["plan", "--plan", plan, "--spd-count", "1", "--out", str(target)]) == 2   # in this process
    assert "is a directory" in capsys.readouterr().err
    assert os.listdir(target) == [] and not [f for f in os.listdir(tmp_path) if ".tmp" in f]


@pytest.fixture(scope="module")
def quick_runs(tiny_dir, tmp_path_factory):
    """Commands that must work, in one process (tests/support/cli_batch.py): a scan into a directory that does not
    exist yet, and eval with seeds 1, 2, 1."""
    tmp = tmp_path_factory.mktemp("quick_runs")
    common = ["eval", "--model", tiny_dir, "--virtual-tp", "2", *TINY_DATA, "--json"]
    runs = run_cli_batch([["scan", "--model", tiny_dir, "--virtual-tp", "2", *TINY_DATA, "--out",
                           str(tmp / "new" / "sub" / "plan.json")],
                          *([*common, "--seed", s] for s in ("1", "2", "1"))], str(tmp))
    assert all(r["code"] == 0 for r in runs), [r["stderr"][-2000:] for r in runs]
    return tmp, runs


def test_scan_creates_missing_output_directory(quick_runs):
    out = quick_runs[0] / "new" / "sub" / "plan.json"
    assert out.is_file() and out.with_suffix(".png").is_file() and outputs.owned(str(out.with_suffix(".png")))


# ---------------------------------------------------------------- the checkpoint directory: atomic, never foreign

def _save(path, value: float, tp_grain_size: int = 64):
    cfg = tiny_config()
    plan = Plan.from_blocks("tiny", cfg, 2, [1], tp_grain_size=tp_grain_size)
    plan.blocks[1].cls = "SB"
    save_checkpoint(str(path), plan, {1: {"w.weight": torch.full((2,), value)}}, cfg, {"v": value})


def _value(path) -> float:
    from safetensors.torch import load_file
    return load_file(os.path.join(path, WEIGHTS))["model.layers.1.w.weight"][0].item()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_checkpoint_save_refuses_foreign_directory(tmp_path):
    target = tmp_path / "mine"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("keep me")
    before = _tree(target)
    with pytest.raises(OutputError, match="not written by ds_spd"):
        _save(target, 1.0)
    assert _tree(target) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    _save(empty, 1.0)   # an empty directory made for it is fine
    assert sorted(os.listdir(empty)) == sorted(FILES)


def test_checkpoint_replace_is_atomic(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    _save(ck, 1.0)
    # killed right after the swap, before the old copy is deleted: the new checkpoint is complete at the path
    real_rmtree = outputs.shutil.rmtree

    def die(path, *a, **k):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(outputs.shutil, "rmtree", die)
    with pytest.raises(KeyboardInterrupt):
        _save(ck, 2.0)
    monkeypatch.setattr(outputs.shutil, "rmtree", real_rmtree)
    assert sorted(os.listdir(ck)) == sorted(FILES) and _value(ck) == 2.0
    # the fallback (no renameat2): killed between "old aside" and "new in": the next save restores the old one
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def rename_then_die(a, b):
        calls.append((a, b))
        real_rename(a, b)
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(outputs.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        _save(ck, 3.0)
    monkeypatch.setattr(outputs.os, "rename", real_rename)
    assert not ck.exists()
    aside = tmp_path / f"ck.old{os.getpid()}"
    dead = tmp_path / f"ck.old{_dead_pid()}"
    aside.rename(dead)   # as if that process had died
    outputs.clean_stale(str(ck), FILES)
    assert _value(ck) == 2.0 and not dead.exists()


def test_stale_tmp_dirs_of_dead_processes_are_cleaned(tmp_path):
    ck = tmp_path / "ck"
    _save(ck, 1.0)
    pid = _dead_pid()
    stale = tmp_path / f"ck.tmp{pid}"
    stale.mkdir()
    (stale / WEIGHTS).write_bytes(b"partial")
    foreign = tmp_path / f"ck.tmp{pid + 1 if pid + 1 != os.getpid() else pid + 2}"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    live = tmp_path / f"ck.tmp{os.getppid()}"
    live.mkdir()
    _save(ck, 2.0)
    assert not stale.exists()             # a dead process's partial checkpoint
    assert (foreign / "notes.txt").exists()   # files ds_spd does not write: never deleted
    assert live.exists()                  # a live process may still be writing it


def test_checkpoint_tensors_must_match_plan(tmp_path):
    cfg = tiny_config()
    ck = tmp_path / "ck"
    _save(ck, 1.0)
    info = open_checkpoint(str(ck), cfg, 2, 64)
    assert info.spd_blocks == (1,) and info.weight_blocks == (1,)
    with pytest.raises(PlanError, match=r"blocks \[3\] are not SPD blocks of checkpoint"):
        open_checkpoint(str(ck), cfg, 2, 64, spd_blocks=[1, 3])
    with pytest.raises(PlanError, match="tp_grain_size 64, not 32"):
        open_checkpoint(str(ck), cfg, 2, 32)
    plan = json.loads((ck / "plan.json").read_text())
    plan["blocks"][1]["class"] = "TP"      # weights stored for a block the plan says is TP
    plan["blocks"][2]["class"] = "ESB"     # and none for a distilled one
    (ck / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=r"weights stored for blocks \[1\], the plan's distilled \(SB/ESB\) "
                                        r"blocks are \[2\]"):
        open_checkpoint(str(ck), cfg, 2, 64)


# ---------------------------------------------------------------- distill: refuse, complete, resume, fingerprint

@pytest.fixture
def distill_setup(tiny_dir, tmp_path):
    from bad_inputs import _plan
    plan_path = _plan(str(tmp_path), tiny_dir)
    plan = json.loads(open(plan_path).read())
    for b, c in zip(plan["blocks"], ["SB", "ISB", "ESB", "TP"]):
        b["class"] = c
    open(plan_path, "w").write(json.dumps(plan))
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({**ZERO2, "spd": {"distill": {"lr": 2e-3}}}))
    return ["distill", "--config", str(cfg), "--plan", plan_path, "--model", tiny_dir, *DATA, "--patience", "3",
            "--json"], tmp_path


def test_distill_complete_resume_and_fingerprint(distill_setup, tiny_dir):
    """One 2-epoch run, then what a user does next: the same command again (recognised as complete, nothing
    rewritten), another lr or other data (refused, naming the keys, before any training state is loaded), fewer
    epochs (refused), its checkpoint at another tp size (refused) and in eval, a run of another plan into the
    same --out (refused); more epochs train on from the finished ones; --restart starts over with a new lr.
    Every command through the CLI's main in one process (tests/support/cli_batch.py), as a notebook would."""
    args, tmp = distill_setup
    out = str(tmp / "ck")
    shm_before = shm_buffers()
    os.makedirs(tmp / "other")
    plan = args[args.index("--plan") + 1]
    foreign = [a if a != plan else tiny_plan_file(tiny_dir, tmp / "other", ["ESB", "ISB", "SB", "TP"]) for a in args]
    evals = ["eval", "--model", tiny_dir, "--checkpoint", out, *DATA, "--batch-size", "4"]
    first, done, lr, data, fewer, wrong_tp, ev, other, more, restart = run_cli_batch([
        {"argv": [*args, "--out", out, "--epochs", "2"], "snapshot": [out, out + ".work"]},
        [*args, "--out", out, "--epochs", "2"],
        [*args, "--out", out, "--epochs", "3", "--lr", "1e-2"],
        [*args, "--out", out, "--epochs", "3", "--max-samples", "4"],
        [*args, "--out", out, "--epochs", "1"],
        [*evals, "--virtual-tp", "3"],
        [*evals, "--virtual-tp", "2", "--json"],
        {"argv": [*foreign, "--out", out, "--epochs", "4"], "snapshot": [out]},
        {"argv": [*args, "--out", out, "--epochs", "3"], "snapshot": [out]},
        {"argv": [*args, "--out", out, "--epochs", "3", "--lr", "1e-2", "--restart"], "snapshot": [out]}], str(tmp))
    assert first["code"] == 0, first["stderr"][-3000:]
    first_run = last_json(first["stdout"])
    assert first_run["epochs_trained"] == [1, 2]
    assert_no_shm_left(shm_before, "distill")
    snapshot = first["snapshot"][out]
    assert sorted(snapshot) == ["config.json", "plan.json", "provenance.json", "spd_blocks.safetensors"]
    # a finished block's training state is removed (only its weights stay in the work dir)
    assert not [p for p, content in first["snapshot"][out + ".work"].items() if content is None]
    assert done["code"] == 0 and "already complete" in done["stderr"] and last_json(done["stdout"])["already_complete"]
    assert last_json(done["stdout"])["final_mse"] == first_run["final_mse"]   # what the checkpoint holds, said again
    assert lr["code"] == 2 and "settings.lr: 0.002 -> 0.01" in lr["stderr"] and "--restart" in lr["stderr"]
    assert data["code"] == 2 and "calibration.max_samples: 8 -> 4" in data["stderr"]
    assert fewer["code"] == 2 and "holds 2 trained epochs" in fewer["stderr"]
    assert wrong_tp["code"] == 2 and "tp size 2, not 3" in wrong_tp["stderr"]
    ev = last_json(ev["stdout"])
    assert ev["spd_blocks"] == [0, 1, 2] and ev["dtype"] == "float32"   # what was evaluated, in the JSON
    assert other["code"] == 2 and "holds training state of another run" in other["stderr"] \
        and "plan:" in other["stderr"]
    assert other["snapshot"][out] == snapshot                          # nothing rewritten by any of them
    # more epochs: each block trains on from its finished ones
    assert more["code"] == 0 and "block 0 finished 2 epochs, 3 asked" in more["stderr"], more["stderr"][-3000:]
    resumed, prov = last_json(more["stdout"]), more["snapshot"][out]["provenance.json"]
    assert [h["epoch"] for h in prov["history"]] == [1, 2, 3] and resumed["epochs_trained"] == [1, 2, 3]
    assert prov["settings"]["lr"] == 2e-3 and prov["lr_rule"] == "set by the user"
    assert prov["settings"]["kl_lr"] == 1e-4   # the KL stage's rate: the user's lr / 20
    assert resumed["final_mse"]["0"] < first_run["initial_mse"]["0"]
    saved = more["snapshot"][out]["plan.json"]
    # head grouping (default: every trained block, neuron matching): the plan records both permutations
    assert all(saved["blocks"][i]["head_permutation"] is not None for i in (0, 2))
    assert saved["blocks"][1]["head_permutation"] is None   # ISB: zero-shot, not trained
    assert sorted(saved["blocks"][2]["mlp_permutation"]) == list(range(200))   # every neuron, once
    # --restart starts over with the new lr
    assert restart["code"] == 0 and "resuming" not in restart["stderr"] \
        and "finished 2 epochs" not in restart["stderr"], restart["stderr"][-3000:]
    prov = restart["snapshot"][out]["provenance.json"]
    assert [h["epoch"] for h in prov["history"]] == [1, 2, 3] and prov["run"]["settings"]["lr"] == 0.01


def _killer(when: str) -> list[str]:
    """Runs the CLI and SIGKILLs it right after epoch ``when`` (or finished block ``blockN``) is saved."""
    return [sys.executable, os.path.join(ROOT, "tests", "support", "kill_after_epoch.py"), when]


@pytest.mark.parametrize("trainer,source", [("layerwise", "original"), ("layerwise", "chain"), ("joint", "original")])
def test_resume_after_sigkill_equals_uninterrupted_run(trainer, source, distill_setup):
    """SIGKILL right after epoch 2 of 3 is saved, then resume: bitwise the uninterrupted run. Layer-wise, the resume
    is killed again right after block 0 is stored, and the next one goes on with block 2, never training block 0
    again; its uninterrupted run spills every activation to files (--activation-budget 0): the same weights. In
    chain mode the kill comes inside block 2 (epoch 2 saved), which trains on the outputs of block 0's weights and
    block 1 in zero-shot SPD form: the resumed run rebuilds that chain from block 0's stored weights."""
    args, tmp = distill_setup
    args = [*args, "--trainer", trainer, "--input-source", source]
    out, layerwise, chain = str(tmp / "a"), trainer == "layerwise", source == "chain"
    shm_before = shm_buffers()
    if chain:
        killed = run_cli([*args, "--out", out, "--epochs", "3"], check=False, runner=_killer("block2:2"))
        assert killed.returncode == -9, killed.stderr[-2000:]
        work = tmp / "a.work"
        assert (work / "block000.json").is_file() and (work / "block002" / "latest").read_text().strip() == "epoch2"
        assert (work / "block002" / "upstream").is_file()
        stamp = os.stat(work / "block000.safetensors").st_mtime_ns
        return _resume_equals_uninterrupted(args, tmp, out, trainer, stamp, "resuming from epoch 2 of 3 (block 2")
    killed = run_cli([*args, "--out", out, "--epochs", "3"], check=False, runner=_killer("2"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert_no_shm_left(shm_before, "a SIGKILLed run")
    work = tmp / "a.work"
    state = work / ("block000" if layerwise else "")   # layer-wise: per block
    assert not (tmp / "a").exists() and (state / "latest").read_text().strip() == "epoch2"
    assert not (state / "epoch1").exists()   # only the latest epoch's training state is kept
    if layerwise:
        again = run_cli([*args, "--out", out, "--epochs", "3"], check=False, runner=_killer("block0"))
        assert again.returncode == -9 and "resuming from epoch 2 of 3" in again.stderr, again.stderr[-2000:]
        assert (work / "block000.json").is_file() and not (work / "block002.json").exists()
        stamp = os.stat(work / "block000.safetensors").st_mtime_ns
    _resume_equals_uninterrupted(args, tmp, out, trainer, stamp if layerwise else None,
                                 "block 0 already trained" if layerwise else "resuming from epoch 2 of 3")


def _resume_equals_uninterrupted(args, tmp, out, trainer, stamp, resumed_says):
    """The killed run resumed and an uninterrupted run (layer-wise: every activation spilled), in one process: bitwise
    the same weights and history; a stored block (``stamp``: its file's mtime) never trained again."""
    layerwise = trainer == "layerwise"
    resumed, uninterrupted = run_cli_batch([   # the resume and the uninterrupted run in one process
        [*args, "--out", out, "--epochs", "3"],
        [*args, "--out", str(tmp / "b"), "--epochs", "3", *(["--activation-budget", "0"] if layerwise else [])]],
        str(tmp / "batch"))
    assert resumed["code"] == uninterrupted["code"] == 0, (resumed["stderr"][-3000:], uninterrupted["stderr"][-3000:])
    assert resumed_says in resumed["stderr"], resumed["stderr"][-3000:]
    if stamp is not None:
        assert "block 0 already trained" in resumed["stderr"]
        assert os.stat(tmp / "a.work" / "block000.safetensors").st_mtime_ns == stamp   # never trained again
    from safetensors.torch import load_file
    a, b = load_file(str(tmp / "a" / WEIGHTS)), load_file(str(tmp / "b" / WEIGHTS))
    assert sorted(a) == sorted(b) and {k.split(".")[2] for k in a} == {"0", "2"}
    for k in a:
        assert torch.equal(a[k], b[k]), k          # bitwise
    hist = [json.load(open(tmp / d / "provenance.json")) for d in ("a", "b")]
    assert hist[0]["history"] == hist[1]["history"] and [h["epoch"] for h in hist[0]["history"]] == [1, 2, 3]
    assert hist[0]["trainer"] == trainer


# ---------------------------------------------------------------- values that were silently ignored

def test_eval_seed_is_used(quick_runs):
    one, two, again = (last_json(r["stdout"])["perplexity"] for r in quick_runs[1][1:])
    assert one != two and again == one


def test_reselection_keeps_or_drops_both_permutations():
    from ds_spd.stages.planner import select
    plan = Plan.from_blocks("tiny", tiny_config(), 2, [])
    for b, s in zip(plan.blocks, (0.001, 0.5, 0.5, 0.02)):
        b.sensitivity, b.cls = s, "TP"
    plan.scan = {"metric": "ppl", "baseline": 1.0}
    for i in (1, 2):
        plan.blocks[i].cls, plan.blocks[i].head_permutation, plan.blocks[i].mlp_permutation = "ESB", [1, 0, 2], [1, 0]
    new = select(plan, count=3)        # blocks 0, 3, then one of 1/2: stays ESB; the other becomes TP
    for b in new.blocks:
        if b.index in (1, 2):
            kept = b.cls == "ESB"
            assert (b.head_permutation is not None, b.mlp_permutation is not None) == (kept, kept), b


# ---------------------------------------------------------------- one writer per output
def test_second_writer_is_refused_and_a_dead_holder_is_taken_over(tiny_dir, tmp_path):
    """Two real `distill` processes into one --out: while the first holds it (frozen with SIGSTOP mid-run), the
    second, even with --restart, is refused in one line naming the first's pid, and its work dir is untouched;
    once the first is killed (SIGKILL: its lock file stays behind), a new run takes the lock over and finishes."""
    import signal

    plan = tiny_plan_file(tiny_dir, tmp_path, ["SB", "TP", "SB", "TP"])
    out = str(tmp_path / "ck")
    args = ["distill", "--plan", plan, "--model", tiny_dir, *DATA, "--epochs", "40", "--out", out]
    from helpers import clean_env
    first = subprocess.Popen([sys.executable, "-m", "ds_spd", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=clean_env(OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(out + ".work", "ds_spd_run.json")):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGSTOP)
        work_before = _tree(out + ".work")
        second = run_cli([*args, "--restart"], check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        line = [x for x in second.stderr.splitlines() if "error:" in x]
        assert len(line) == 1 and f"is being written by another run (pid {first.pid} " in line[0], second.stderr
        assert "Traceback" not in second.stderr
        assert _tree(out + ".work") == work_before   # --restart did not wipe the holder's work dir
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert os.path.exists(out + ".lock")          # the dead holder's lock file is left behind ...
        third = run_cli([*args, "--json"])            # ... and taken over: the OS lock died with its process
        assert last_json(third.stdout)["checkpoint"] == out
        assert sorted(os.listdir(out)) == sorted(FILES)
        assert not os.path.exists(out + ".lock") and not os.path.exists(out + ".work.lock")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_lock_leaves_nothing_when_refused_early(tmp_path):
    """A lock on a path in directories that do not exist yet creates them for the lock and removes them again
    if the run wrote nothing there."""
    from ds_spd import locks
    target = tmp_path / "a" / "b" / "plan.json"
    locks.hold(str(target), "plan output")
    assert (tmp_path / "a" / "b" / "plan.json.lock").read_text().startswith(f"pid {os.getpid()} on ")
    locks.release()
    assert list(tmp_path.iterdir()) == []
