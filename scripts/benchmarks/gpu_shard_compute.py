"""Measure, on one CUDA GPU, the compute time of one tensor-parallel rank's share of a LLaMA2-70B forward
(TP 8: 8 query heads, 1 KV head, 3584 MLP columns per block, 80 blocks, bf16, random weights), with the
all-reduces left out: the C of scripts/benchmarks/latency_model.py, which the projection otherwise *assumes* from the
A100's datasheet bandwidth. Decode steps are captured in a CUDA graph (as serving engines run them) and
timed eagerly too; prefill runs eagerly.

    python scripts/benchmarks/gpu_shard_compute.py --out runs/gpu_shard/compute.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, VOCAB, TP = 8192, 64, 8, 128, 28672, 80, 32000, 8


class ShardBlock(torch.nn.Module):
    """One rank's columns/rows of a LLaMA block; no communication (the partial sums stay local)."""

    def __init__(self):
        super().__init__()
        q, kv, inter = HEADS // TP, KV_HEADS // TP, INTER // TP
        self.q, self.kv = q, kv
        self.norm1, self.norm2 = torch.nn.RMSNorm(HIDDEN), torch.nn.RMSNorm(HIDDEN)
        self.wqkv = torch.nn.Linear(HIDDEN, (q + 2 * kv) * HEAD_DIM, bias=False)
        self.wo = torch.nn.Linear(q * HEAD_DIM, HIDDEN, bias=False)
        self.w13 = torch.nn.Linear(HIDDEN, 2 * inter, bias=False)
        self.w2 = torch.nn.Linear(inter, HIDDEN, bias=False)

    def forward(self, x, k_cache, v_cache, start: int):
        b, t, _ = x.shape
        qkv = self.wqkv(self.norm1(x)).view(b, t, self.q + 2 * self.kv, HEAD_DIM).transpose(1, 2)
        q, k, v = qkv.split([self.q, self.kv, self.kv], dim=1)
        k_cache[:, :, start:start + t] = k
        v_cache[:, :, start:start + t] = v
        keys, values = k_cache[:, :, :start + t], v_cache[:, :, :start + t]
        attn = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, enable_gqa=True)
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.w13(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


def weight_bytes(blocks) -> int:
    return sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=512, help="tokens already in the KV cache for decode")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    blocks = [ShardBlock().to(dev, dt) for _ in range(LAYERS)]
    for b in blocks:
        for w in b.parameters():
            w.normal_(0, 0.02) if w.dim() > 1 else w.fill_(1.0)
    lm_head = torch.nn.Linear(HIDDEN, VOCAB // TP, bias=False).to(dev, dt)
    total_bytes = weight_bytes(blocks) + lm_head.weight.numel() * 2
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "weight_bytes_per_rank": total_bytes,
              "context": args.context, "repeats": args.repeats, "rows": []}

    def run(x, caches, start):
        for blk, (kc, vc) in zip(blocks, caches):
            x = blk(x, kc, vc, start)
        return lm_head(x[:, -1])

    for batch in (1, 16):
        caches = [(torch.zeros(batch, 1, args.context + 1, HEAD_DIM, device=dev, dtype=dt),
                   torch.zeros(batch, 1, args.context + 1, HEAD_DIM, device=dev, dtype=dt)) for _ in range(LAYERS)]
        x = torch.randn(batch, 1, HIDDEN, device=dev, dtype=dt)
        step = lambda: run(x, caches, args.context)  # noqa: E731
        for _ in range(3):
            step()
        eager = timed(step, args.repeats)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graphed = timed(graph.replay, args.repeats)
        for mode, xs in (("eager", eager), ("cuda_graph", graphed)):
            ms = 1e3 * sorted(xs)[len(xs) // 2]
            result["rows"].append({"workload": f"decode_b{batch}", "mode": mode, "median_ms": ms,
                                   "min_ms": 1e3 * min(xs), "max_ms": 1e3 * max(xs),
                                   "effective_weight_GB_s": total_bytes / (ms * 1e-3) / 1e9})
        del caches, graph
    caches = [(torch.zeros(1, 1, 2048, HEAD_DIM, device=dev, dtype=dt),
               torch.zeros(1, 1, 2048, HEAD_DIM, device=dev, dtype=dt)) for _ in range(LAYERS)]
    x = torch.randn(1, 2048, HIDDEN, device=dev, dtype=dt)
    prefill = lambda: run(x, caches, 0)  # noqa: E731
    prefill()
    xs = timed(prefill, max(3, args.repeats // 4))
    ms = 1e3 * sorted(xs)[len(xs) // 2]
    flops = 2 * (total_bytes / 2) * 2048
    result["rows"].append({"workload": "prefill_1x2048", "mode": "eager", "median_ms": ms, "min_ms": 1e3 * min(xs),
                           "max_ms": 1e3 * max(xs), "weight_TFLOP_s": flops / (ms * 1e-3) / 1e12})
    result["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
