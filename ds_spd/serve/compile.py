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

import warnings
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


def _argument_guards(names: set[str]) -> Callable[[list], list[bool]]:
    """Which dynamo guards an ahead-of-time graph keeps: its tensor arguments' (dtype, device, rank, strides;
    ``TENSOR_MATCH``) and the symbolic sizes' constraints (``SHAPE_ENV``); not the thousands on the model's modules
    and parameters (nor those on tensors reached through them, which a virtual-TP model's could not even save)."""
    return lambda entries: [not e.is_global and (e.guard_type == "SHAPE_ENV" or e.guard_type == "TENSOR_MATCH" and
                                                 e.name in names) for e in entries]


class AheadOfTimeDecode:
    """The decode step's graphs compiled ahead of time (dynamo's full-graph AOT compile), one per bucket (one row;
    several rows), each called with only its inputs' guards evaluated. ``torch.compile``'s own call evaluates some
    7,000 guards a step (every module's hooks, types and attributes, every parameter: that the model has not
    changed since the graph was traced). A server's model does not change after its warm-up, so those are skipped:
    the model's form (SPD blocks, weights) is what it was when the graphs compiled. A step whose inputs fail the
    kept guards gets None (the caller runs it eagerly); a bucket whose step cannot compile as one graph (a graph
    break in some model family) takes ``torch.compile``'s guarded call instead, with a warning. Measured against
    that call on 2 CPU ranks: no gain established (docs/latency.md); an experiment's variant, not serve's step."""

    def __init__(self, fn: Callable, options: dict):
        import inspect
        self.owner = fn.__self__   # a bound method: the graph takes its object as the first argument
        guards = _argument_guards(set(inspect.signature(fn).parameters))
        self.compiler = torch.compile(fn, dynamic=True, fullgraph=True, options={**options, "guard_filter_fn": guards})
        self.guarded = torch.compile(fn, dynamic=True, options=options)
        self.graphs: dict[int, Any] = {}

    def _compile(self, *args) -> Any:
        try:
            with torch.no_grad():
                return self.compiler.aot_compile((args, {}))
        except Exception as err:   # dynamo's Unsupported, or guards it cannot save: the same on every rank
            warnings.warn(f"decode step for {args[0].shape[0]} row(s) not compiled ahead of time "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                          "using torch.compile's guarded call", stacklevel=3)
            return None

    def __call__(self, ids: torch.Tensor, *args) -> torch.Tensor | None:
        bucket = min(int(ids.shape[0]), 2)
        if bucket not in self.graphs:   # at the warm-up, on every rank in the same order
            self.graphs[bucket] = self._compile(ids, *args)
        graph = self.graphs[bucket]
        if graph is None:
            return self.guarded(ids, *args)
        if not graph.guard_check(self.owner, ids, *args):
            return None
        return graph.fn(self.owner, ids, *args)


def compile_decode(fn: Callable, model: torch.nn.Module, ahead_of_time: bool = False) -> Callable:
    """``fn`` (a decode step of ``model``) under ``torch.compile`` as above; ``ahead_of_time``: as
    :class:`AheadOfTimeDecode` (``fn`` a bound method; measured, not adopted: docs/latency.md)."""
    import torch._dynamo.config as dynamo

    from ds_spd.models.attention import use_packed_decode_attention
    use_packed_decode_attention(model)
    dynamo.specialize_float = True
    options = {"post_grad_custom_post_pass": OneRowProducts()}
    return AheadOfTimeDecode(fn, options) if ahead_of_time else torch.compile(fn, dynamic=True, options=options)
