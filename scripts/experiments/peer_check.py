"""Is the peer in the peer table running as it should? HF's own ``generate`` on the same weights and threads
(ms a token over 64 greedy tokens after a 64-token prompt, dynamic and static cache), and a running server's
one-stream time per token as the ``openai`` client sees it (4 streamed completions of 64 tokens).

    OMP_NUM_THREADS=2 python scripts/experiments/peer_check.py generate 2
    python scripts/experiments/peer_check.py serve http://127.0.0.1:PORT   # e.g. `transformers serve` started by hand
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_spd.models.loading import default_model_dir
    mode, arg = sys.argv[1], sys.argv[2]
    model_dir = default_model_dir()
    prompt = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()[:600]
    if mode == "generate":
        torch.set_num_threads(int(arg))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ids = AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt").input_ids[:, :64]
        for cache in ("dynamic", "static"):
            for _ in range(3):
                with torch.no_grad():   # 65 tokens less the first one's time (the prefill): 64 decode steps
                    t0 = time.perf_counter()
                    model.generate(ids, max_new_tokens=1, do_sample=False, cache_implementation=cache)
                    t1 = time.perf_counter()
                    model.generate(ids, max_new_tokens=65, min_new_tokens=65, do_sample=False,
                                   cache_implementation=cache)
                    t2 = time.perf_counter()
                print(f"generate, {cache} cache, {torch.get_num_threads()} threads: "
                      f"{((t2 - t1) - (t1 - t0)) / 64 * 1e3:.1f} ms a token", flush=True)
        return
    from openai import OpenAI
    client = OpenAI(base_url=arg + "/v1", api_key="none")
    for _ in range(4):
        start, times = time.perf_counter(), []
        for _event in client.completions.create(model=model_dir, prompt=prompt[:300], max_tokens=64, stream=True,
                                                temperature=0):
            times.append(time.perf_counter())
        gaps = [b - a for a, b in zip(times, times[1:])]
        print(f"server: {len(times)} events, TTFT {(times[0] - start) * 1e3:.0f} ms, "
              f"{(times[-1] - times[0]) / max(1, len(times) - 1) * 1e3:.1f} ms a token "
              f"(median gap {statistics.median(gaps) * 1e3:.1f})", flush=True)


if __name__ == "__main__":
    main()
