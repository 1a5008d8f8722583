"""Products of a few activation rows by a TP rank's weight matrices, one thread: how fast each form reads the
weights. Rank 0's 210 SmolLM2 layer matrices at tp 2 (q, k, v, o, gate, up, down x 30; 221 MB), distinct, so
none is read from a cache. Forms: the library's product (``F.linear``: MKL), MKL's prepacked product, ds_spd's
C++ kernel (``ds_spd.serve.row_kernel``: what ``serve``'s several-rows graph calls), and the multiply-and-sum with
the weight's rows outermost (``ds_spd.serve.compile``'s ``reductions`` rewrite, compiled by inductor with dynamic
shapes). Then each inside a graph: a 60-layer MLP (RMSNorm, up, SiLU, down, residual) compiled with
``RowProducts(several_rows=...)``. Best of 5 calls, GB/s of weights read.

    OMP_NUM_THREADS=1 python scripts/experiments/row_products.py [--rows 1,2,4,8,16,32] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from ds_spd.serve import row_kernel  # noqa: E402
from ds_spd.serve.compile import RowProducts, _as_row_reductions  # noqa: E402

SHAPES = [(320, 576), (128, 576), (128, 576), (576, 320), (768, 576), (768, 576), (576, 768)] * 30


def best_of(fn, n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def lone_products(rows: int, weights: list[torch.Tensor]) -> dict[str, float]:
    """Each form over every matrix (one compiled graph for the rewrite: no per-call guards)."""
    nbytes = sum(w.numel() for w in weights) * 4
    xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
    rewrite = torch.compile(lambda: [_as_row_reductions(xs[w.shape[1]], w.t()) for w in weights], dynamic=True)
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
    forms = {"library": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
             "mkl_prepacked": lambda: [torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, rows)
                                       for p, w in zip(packed, weights)],
             "kernel": lambda: [row_kernel.row_products(xs[w.shape[1]], w) for w in weights],
             "rows_outermost": rewrite}
    for got, want in zip(rewrite(), forms["library"]()):   # compiles; the rewrite equals the library's products
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return {name: nbytes / best_of(fn) / 1e9 for name, fn in forms.items()}


def mlp_graph(rows: int, several_rows: str) -> float:
    ups, downs = [torch.randn(768, 576) / 24 for _ in range(60)], [torch.randn(576, 768) / 28 for _ in range(60)]
    gain = torch.ones(576)

    def mlp(x):
        for up, down in zip(ups, downs):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
            x = x + F.linear(F.silu(F.linear(h, up)), down)
        return x

    torch._dynamo.reset()
    fn = torch.compile(mlp, dynamic=True, options={"post_grad_custom_post_pass": RowProducts(several_rows)})
    x = torch.randn(rows, 576)
    fn(torch.randn(3, 576))
    torch.testing.assert_close(fn(x), mlp(x), rtol=1e-3, atol=1e-3)
    return sum(w.numel() for w in ups + downs) * 4 / best_of(lambda: fn(x)) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    assert row_kernel.load(), "the kernel did not build"
    torch._inductor.config.fx_graph_cache = False   # the pass's cache key does not see a changed experiment
    weights = [torch.randn(o, i) for o, i in SHAPES]
    res = {"threads": 1, "weights_mb": sum(w.numel() for w in weights) * 4 / 1e6, "lone_gbs": {}, "mlp_graph_gbs": {}}
    with torch.no_grad():
        for rows in map(int, args.rows.split(",")):
            res["lone_gbs"][rows] = lone_products(rows, weights)
            if rows > 1:
                res["mlp_graph_gbs"][rows] = {"library": mlp_graph(rows, "library"),
                                              "kernel": mlp_graph(rows, "kernel"),
                                              "rows_outermost": mlp_graph(rows, "reductions")}
            print(rows, {k: round(v, 2) for k, v in res["lone_gbs"][rows].items()},
                  {k: round(v, 2) for k, v in res["mlp_graph_gbs"].get(rows, {}).items()}, flush=True)
    print(json.dumps(res, indent=1))
    if args.out:
        json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
