"""How ``serve`` compiles its decode step: every setting that shapes the graphs, in one place.

- Dynamic shapes: a batch's rows and its keys are symbols, so two graphs (one row; several rows: the compiler
  specializes a size of 1) serve every step.
- Attention packs a KV head's query group inside the graph too (ds_spd.models.attention).
- Float constants (norm eps, attention scale) specialized: traced as symbols they make dynamo trace the step
  twice (half the warm-up on SmolLM2); a process-wide setting, which suits a server.
- In the one-row graph every matrix product multiplies one row by a weight matrix: memory-bound. MKL's one-row
  products (``sgemv``) read the weights at about half of what one core streams on the 2-core EPYC measured here;
  :class:`RowProducts` rewrites each into a multiply-and-sum that inductor generates itself (one vectorized
  pass over the weight).
- In the graph of several rows MKL's products read the weights at half their one-row rate. There each product
  becomes ds_spd's own kernel (``ds_spd::row_products``, ds_spd.serve.row_kernel: a tile of weight rows held
  while every row passes over it), an external call inductor places but does not fuse. Rewriting them as
  multiply-and-sums instead (``several_rows="reductions"``) loses in the decode graph: inductor fuses each with
  its neighbours into loops that read the activations across the reduction (1.34-1.37x the step's time).
  Figures and commands: docs/serving.md and docs/latency.md (``scripts/experiments/decode_shapes.py``).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

from ds_spd.errors import brief

aten = torch.ops.aten
_ONE_ROW = PatternMatcherPass(pass_name="ds_spd_one_row_products")
_SEVERAL_ROWS = PatternMatcherPass(pass_name="ds_spd_several_row_products")
_KERNEL = PatternMatcherPass(pass_name="ds_spd_several_row_kernel")
_ONE_ROW_KERNEL = PatternMatcherPass(pass_name="ds_spd_one_row_kernel")
SEVERAL_ROWS = ("kernel", "library", "reductions")   # how the several-rows graph multiplies: RowProducts
ONE_ROW = ("reductions", "kernel", "library")         # how the one-row graph multiplies


def _rows(rows: torch.fx.Node, weight: torch.fx.Node) -> int | torch.SymInt | None:
    """The activation rows of a product of rows by a CPU weight matrix (an int, or a symbol in the graph of several
    rows); None for any other product."""
    a, w = rows.meta.get("val"), weight.meta.get("val")
    if a is None or w is None or a.ndim != 2 or w.ndim != 2 or a.device.type != "cpu":
        return None
    return a.shape[0]


def _one_row(rows: torch.fx.Node, weight: torch.fx.Node) -> bool:
    n = _rows(rows, weight)
    return isinstance(n, int) and n == 1


def _several_rows(rows: torch.fx.Node, weight: torch.fx.Node) -> bool:
    n = _rows(rows, weight)
    return n is not None and not (isinstance(n, int) and n == 1)


def _kernel_takes(rows: torch.fx.Node, weight: torch.fx.Node) -> bool:
    """Float32 rows by a weight stored [N, K] (the graph's operand is its transpose, strides (1, K))."""
    a, w = rows.meta["val"], weight.meta["val"]
    return a.dtype == w.dtype == torch.float32 and tuple(w.stride()) == (1, w.shape[0])


def _for_kernel(rows: torch.fx.Node, weight: torch.fx.Node) -> bool:
    return _several_rows(rows, weight) and _kernel_takes(rows, weight)


def _one_row_for_kernel(rows: torch.fx.Node, weight: torch.fx.Node) -> bool:
    return _one_row(rows, weight) and _kernel_takes(rows, weight)


def _as_reduction(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight.t() * row).sum(-1)[None]   # [K, N] = W.t(): out[n] = sum_k W[n, k] x[k]


def _as_row_reductions(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight.t()[:, None, :] * rows[None]).sum(-1).t()   # [N, rows]: each weight row once, for every row


def _as_kernel(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from ds_spd.serve.row_kernel import row_products
    return row_products(rows, weight.t())


def _register(pass_dict: PatternMatcherPass, applies: Callable, product: Callable, counter: str) -> None:
    """Rewrite ``pass_dict``'s matrix products that ``applies`` to as ``product(rows, weight)``; with a bias, its
    add stays a pointwise op beside it (addmm's bias may come broadcast to ``[rows, N]``)."""
    def rewrite(match: Match, fn: Callable, args: list[torch.fx.Node]) -> None:
        match.replace_by_example(fn, args)
        counters["ds_spd"][counter] += 1

    @register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=pass_dict)
    def _mm(match: Match, rows: torch.fx.Node, weight: torch.fx.Node) -> None:
        if applies(rows, weight):
            rewrite(match, product, [rows, weight])

    @register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=pass_dict)
    def _addmm(match: Match, bias: torch.fx.Node, rows: torch.fx.Node, weight: torch.fx.Node) -> None:
        if not match.kwargs and applies(rows, weight):   # beta = alpha = 1
            rewrite(match, lambda b, x, w: b + product(x, w), [bias, rows, weight])


_register(_ONE_ROW, _one_row, _as_reduction, "one_row_products")
_register(_SEVERAL_ROWS, _several_rows, _as_row_reductions, "several_row_products")
_register(_KERNEL, _for_kernel, _as_kernel, "several_row_kernel")
_register(_ONE_ROW_KERNEL, _one_row_for_kernel, _as_kernel, "one_row_kernel")


class RowProducts(CustomGraphPass):
    """Inductor post-grad pass: products of one row by a weight become multiply-and-sums (``one_row="reductions"``),
    go to ds_spd's kernel (``"kernel"``) or stay the library's (``"library"``); products of several rows go to
    ds_spd's kernel (``several_rows="kernel"``), stay the library's (``"library"``), or become multiply-and-sums
    too (``"reductions"``, an experiment's variant). Where the kernel cannot be built the library's stay."""

    def __init__(self, several_rows: str = "kernel", one_row: str = "reductions"):
        for name, value, allowed in (("several_rows", several_rows, SEVERAL_ROWS), ("one_row", one_row, ONE_ROW)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if "kernel" in (several_rows, one_row):   # loaded here, not in the pass: a cached graph runs no pass
            from ds_spd.serve import row_kernel
            if not row_kernel.load():
                several_rows, one_row = (("library" if v == "kernel" else v) for v in (several_rows, one_row))
        self.several_rows, self.one_row = several_rows, one_row

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.one_row != "library":
            (_ONE_ROW if self.one_row == "reductions" else _ONE_ROW_KERNEL).apply(graph)
        if self.several_rows != "library":
            (_SEVERAL_ROWS if self.several_rows == "reductions" else _KERNEL).apply(graph)

    def uuid(self) -> Any:   # inductor's cache key: this pass's code, the kernel's, and the settings
        from ds_spd.serve import row_kernel
        return get_hash_for_files((__file__, row_kernel.__file__, row_kernel.SOURCE)), self.several_rows, self.one_row


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
            warnings.warn(f"decode step for {args[0].shape[0]} row(s) not compiled ahead of time ({brief(err)}); "
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


def compile_decode(fn: Callable, model: torch.nn.Module, ahead_of_time: bool = False,
                   several_rows: str = "kernel", one_row: str = "reductions") -> Callable:
    """``fn`` (a decode step of ``model``) under ``torch.compile`` as above; ``ahead_of_time``: as
    :class:`AheadOfTimeDecode` (``fn`` a bound method; measured, not adopted: docs/latency.md); ``several_rows``,
    ``one_row``: how the several-rows and the one-row graphs multiply (:class:`RowProducts`)."""
    import torch._dynamo.config as dynamo

    from ds_spd.models.attention import use_packed_decode_attention
    use_packed_decode_attention(model)
    dynamo.specialize_float = True
    options = {"post_grad_custom_post_pass": RowProducts(several_rows, one_row)}
    return AheadOfTimeDecode(fn, options) if ahead_of_time else torch.compile(fn, dynamic=True, options=options)
