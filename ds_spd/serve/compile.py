"""How ``serve`` compiles its decode step: every setting that shapes the graphs, in one place.

- Dynamic shapes: a batch's rows and its keys are symbols, so two graphs (one row; several rows: the compiler
  specializes a size of 1) serve every step.
- Attention packs a KV head's query group inside the graph too (ds_spd.models.attention).
- Float constants (norm eps, attention scale) specialized: traced as symbols they make dynamo trace the step
  twice (half the warm-up on SmolLM2); a process-wide setting, which suits a server.
- In the one-row graph every matrix product multiplies one row by a weight matrix: memory-bound. MKL's one-row
  products (``sgemv``) read the weights at about half of what one core streams on the 2-core EPYC measured here;
  :class:`OneRowProducts` rewrites each into a multiply-and-sum that inductor generates itself (one vectorized
  pass over the weight). The graph of several rows keeps the library's products: the same rewrite there (each
  weight row reused for every sequence from the L1 cache) measured no faster at 8 rows. Figures and commands:
  docs/serving.md and docs/latency.md (``scripts/experiments/decode_shapes.py``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

aten = torch.ops.aten
_PATTERNS = PatternMatcherPass(pass_name="ds_spd_one_row_products")


def _one_row(rows: torch.fx.Node, weight: torch.fx.Node) -> bool:
    """A product of one activation row (a static size of 1: the one-row graph) by a CPU weight matrix."""
    a, w = rows.meta.get("val"), weight.meta.get("val")
    return a is not None and w is not None and a.ndim == 2 and w.ndim == 2 and a.device.type == "cpu" and \
        isinstance(a.shape[0], int) and a.shape[0] == 1


def _rewrite(match: Match, fn: Callable, args: list[torch.fx.Node]) -> None:
    match.replace_by_example(fn, args)
    counters["ds_spd"]["one_row_products"] += 1


def _as_reduction(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight.t() * row).sum(-1)[None]   # [K, N] = W.t(): out[n] = sum_k W[n, k] x[k]


@register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=_PATTERNS)
def _mm(match: Match, rows: torch.fx.Node, weight: torch.fx.Node) -> None:
    if _one_row(rows, weight):
        _rewrite(match, _as_reduction, [rows, weight])


@register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=_PATTERNS)
def _addmm(match: Match, bias: torch.fx.Node, rows: torch.fx.Node, weight: torch.fx.Node) -> None:
    if not match.kwargs and _one_row(rows, weight):   # beta = alpha = 1
        _rewrite(match, lambda b, x, w: b + _as_reduction(x, w), [bias, rows, weight])


class OneRowProducts(CustomGraphPass):
    """Inductor post-grad pass: products of one row by a weight become multiply-and-sums (module docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        _PATTERNS.apply(graph)

    def uuid(self) -> Any:   # inductor's cache key: this file's code
        return get_hash_for_files((__file__,))


def compile_decode(fn: Callable, model: torch.nn.Module) -> Callable:
    """``fn`` (a decode step of ``model``) under ``torch.compile`` as above."""
    import torch._dynamo.config as dynamo

    from ds_spd.models.attention import use_packed_decode_attention
    use_packed_decode_attention(model)
    dynamo.specialize_float = True
    return torch.compile(fn, dynamic=True, options={"post_grad_custom_post_pass": OneRowProducts()})
