"""Tensor parallelism across hosts, simulated: each "node" is a torchrun in its own mount namespace with a
private /dev/shm, so DeepSpeed's shared-memory all-reduce cannot see the other node's ranks (as on two
machines). Without ds_spd's switch (ds_spd.core.comm.init_comm) the first forward died with SIGSEGV."""
import subprocess
import sys

import pytest
from helpers import EVEN, ROOT, clean_env, cli_json, free_port, last_json, save_tiny, tiny_plan_file

from ds_spd.tools.serve_process import namespaces_work

pytestmark = pytest.mark.multirank


needs_namespaces = pytest.mark.skipif(not namespaces_work(),
                                      reason="needs `unshare -m` and mount (root) for a private /dev/shm per node")


def run_nodes(args: list[str], nnodes: int = 2, nproc: int = 1, timeout: int = 600) -> list[str]:
    """``ds_spd ARGS`` on ``nnodes`` simulated hosts of ``nproc`` ranks each; returns each node's stdout."""
    port = free_port()
    procs = []
    for node in range(nnodes):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node),
                    "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port),
                    "-m", "ds_spd", *args]
        inner = "mount -t tmpfs tmpfs /dev/shm && exec " + " ".join(f"'{a}'" for a in torchrun)
        procs.append(subprocess.Popen(["unshare", "-m", "sh", "-c", inner], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=clean_env(OMP_NUM_THREADS="1")))
    outs = []
    for node, p in enumerate(procs):
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"node {node} failed ({p.returncode}):\n{err[-4000:]}"
        outs.append(out)
    return outs


@needs_namespaces
def test_two_hosts_equal_virtual_tp(tmp_path, capsys):
    """eval at tp 4 on two hosts of two ranks each (every all-reduce crosses the hosts: DeepSpeed's shared-memory
    path is off) gives virtual TP's perplexity and accuracy; greedy decoding across hosts: the server test below."""
    # 4 KV heads and 4 x 64 MLP columns: tp 4 over 2 nodes x 2 ranks
    even = save_tiny(str(tmp_path / "even"), **{**EVEN, "intermediate_size": 256})
    common = ["--model", even, "--spd-blocks", "0,2", "--max-samples", "4", "--seq-len", "32"]
    ref = cli_json(["eval", "--virtual-tp", "4", *common], capsys)
    nodes = last_json(run_nodes(["eval", "--tp", "4", *common, "--json"], nproc=2)[0])
    assert nodes["mode"] == "tp" and nodes["tp_size"] == 4 and nodes["spd_blocks"] == [0, 2]
    assert nodes["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert nodes["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)


@needs_namespaces
def test_data_parallel_distill_across_hosts(tiny_dir, tmp_path):
    """The virtual-TP stages spread their data over ranks on different hosts (gloo): ZeRO-2 distillation on 2
    hosts equals the same 2 ranks on one host. (The data-parallel scan equals one process under the launcher:
    tests/stages/test_planner.py; its all-reduce of sums is the same call across hosts.)"""
    plan = tiny_plan_file(tiny_dir, tmp_path, ["SB", "TP", "ESB", "TP"])
    args = ["distill", "--plan", plan, "--model", tiny_dir, "--max-samples", "8", "--seq-len", "24", "--epochs", "2",
            "--lr", "2e-3", "--json"]
    two_hosts = last_json(run_nodes([*args, "--out", str(tmp_path / "ck_hosts")])[0])
    one_host = last_json(run_nodes([*args, "--out", str(tmp_path / "ck_one")], nnodes=1, nproc=2)[0])
    for i in ("0", "2"):
        assert two_hosts["final_mse"][i] == pytest.approx(one_host["final_mse"][i], rel=1e-4)
        assert two_hosts["final_mse"][i] < two_hosts["initial_mse"][i]


@needs_namespaces
def test_serve_across_two_hosts(tiny_dir, capsys):
    """`serve` on two simulated hosts (rank 0's host serves HTTP; the plans cross hosts): greedy text equals
    `generate` in virtual TP, and Ctrl-C stops both nodes."""
    import requests

    from ds_spd.tools.serve_process import ServerProcess
    gen = cli_json(["generate", "--virtual-tp", "2", "--model", tiny_dir, "--spd-blocks", "0,2", "--prompt", "def main",
                   "--max-new-tokens", "8"], capsys)
    srv = ServerProcess(["--model", tiny_dir, "--enforce-eager", "--tp", "2", "--spd-blocks", "0,2",
                         "--served-model-name", "tiny"], hosts=2)
    try:
        r = requests.post(f"{srv.url}/v1/completions", timeout=60, json={"model": "tiny", "prompt": "def main",
                                                                        "max_tokens": 8, "temperature": 0})
        assert r.json()["choices"][0]["text"] == gen["generations"][0]["completion"]
        srv.interrupt(timeout=60)
        assert all(p.returncode is not None for p in srv.procs)
        assert "ds-spd serve: stopped" in srv.output()
    finally:
        srv.kill()
