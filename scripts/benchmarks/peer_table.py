"""ds-spd serve against `transformers serve`, side by side: the same weights (the embedded SmolLM2-135M, converted to
safetensors), the same threads in total (2 ranks x 1 thread against 1 process x 2 threads), the same requests
(`bench-serve --url --backend openai`: text prompts, each server's own end-of-sequence), alternated round by
round; paired ratios ds-spd / transformers with 95% intervals (ds_spd.tools.bench_serve.paired_table).

    python scripts/benchmarks/peer_table.py --rounds 3 --out docs/results/serve/peers [--checkpoint CKPT]

llama.cpp's server (llama-cpp-python[server]) is not in it: it builds from source here (no wheel for this
platform), which the project's setup does not do.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from ds_spd.ports import free_port  # noqa: E402
from ds_spd.tools.bench_serve import bench_url_cli, markdown, paired_table  # noqa: E402
from ds_spd.tools.serve_process import ServerProcess  # noqa: E402

LOAD = ["--rates", "", "--concurrency", "1,8", "--num-requests", "16", "--prompt-len", "32,256", "--output-len", "64",
        "--repeats", "1", "--backend", "openai"]


def transformers_serve(model_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen([exe, "serve", "--port", str(port), "--continuous-batching", "--dtype", "float32",
                             model_dir], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("transformers serve exited")
            time.sleep(0.5)
    raise SystemExit("transformers serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint", help="serve this SPD checkpoint with ds-spd (default: TP, no SPD block)")
    ap.add_argument("--serve-args", default="", help="more ds-spd serve flags, e.g. \"--enforce-eager\"")
    ap.add_argument("--out", default="runs/peers")
    args = ap.parse_args()
    from ds_spd.models.loading import default_model_dir
    model_dir = default_model_dir()   # the converted SmolLM2 (safetensors): both servers load these files
    os.makedirs(args.out, exist_ok=True)
    ours = ServerProcess(["--max-model-len", "2048", *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                          *args.serve_args.split()])
    theirs, their_url = transformers_serve(model_dir)
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, url in (("ds-spd", ours.url), ("tp", their_url)):   # warm-up, not recorded: first touches
                bench_url_cli(url, ["--model", model_dir, *LOAD, "--bench-seed", "1000"],
                              os.path.join(tmp, f"warm_{name}"), cwd=ROOT)
            for r in range(args.rounds):
                order = [("ds-spd", ours.url), ("tp", their_url)]   # "tp": the reference of paired_table
                for name, url in (order if r % 2 == 0 else order[::-1]):
                    # each round its own prompts (the same for both): a prefix cache cannot answer a round from
                    # an earlier one
                    for run in bench_url_cli(url, ["--model", model_dir, *LOAD, "--bench-seed", str(r)],
                                             os.path.join(tmp, f"{name}{r}"), cwd=ROOT):
                        runs.append({**run, "engine": name, "path": "cpu", "repeat": r})
                        print(f"round {r} {name} {run['load_name']}: {run['output_throughput']:.1f} tok/s, "
                              f"TTFT p50 {run['ttft']['p50_ms']:.0f} ms, TPOT p50 {run['tpot']['p50_ms']:.0f} ms",
                              flush=True)
    finally:
        ours.kill()
        os.killpg(theirs.pid, signal.SIGKILL)
    command = "python scripts/benchmarks/peer_table.py " + " ".join(sys.argv[1:])
    result = {"runs": runs, "repeats": args.rounds, "paired": paired_table(runs), "command": command,
              "reference": "tp = transformers serve --continuous-batching (1 process, 2 threads)"}
    json.dump(result, open(os.path.join(args.out, "peers.json"), "w"), indent=1)
    text = markdown(result, command).replace("| tp |", "| transformers serve |").replace("vs TP", "vs transformers serve")
    open(os.path.join(args.out, "peers.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
