"""From sensitivities to a plan: which blocks become SPD, and their class (docs/method.md section 2).

Blocks are ranked by sensitivity (least sensitive first); the chosen ones are classed by two thresholds
on the *size* of the relative sensitivity |r|, r = s / baseline (ppl metric; for the KL metric r = s, in
nats per token):

    ISB  |r| <= t1        zero-shot SPD
    SB   t1 < |r| <= t2   SPD + block-to-block distillation
    ESB  |r| > t2         head-grouping initialisation, then distillation

By size, not sign: a negative r is a change of the model's function that happened to lower the metric on the
calibration text (a cumulative scan scores a block with the blocks after it already in SPD form, so a block
that undoes part of their damage scores below zero: Gemma 3 270M at tp 2, block 4 at -55.7 perplexity
points; an isolated scan of Gemma 3 gives block 6 -22% on the calibration mixture). Neither is a measured
zero cost, and distillation, which matches the TP block's outputs, is what carries to other text.

The paper gives no rule for t1, t2 or the number of SPD blocks. Ours: t1 = 0 (only a block whose zero-shot
SPD costs nothing stays untrained: small zero-shot costs add up, e.g. SmolLM2 tp 2 with 20 blocks at the
earlier t1 = 1% lost +13.6% against +5.9% with every block distilled), t2 = 5% (a block that alone costs
more than 5% is an outlier: in the SmolLM2 tp-2 cumulative scan blocks 0, 1 and 16, at +379%, +88% and
+5.3%; with ``head_grouping: all``, the distill default, SB blocks get head grouping too); then:
- ``count`` / ``fraction``: the N least sensitive blocks;
- thresholds alone: every block with |r| <= t2 (all that B2B is expected to recover), no ESB;
- ``max_increase`` (accuracy budget, e.g. 0.01 = +1% perplexity): start at the largest N whose predicted
  increase (baseline + sum of the N sensitivities; for a KL scan the summed KL in nats, a first-order proxy
  of the log-perplexity increase) is within budget, then *validate by evaluating*: step
  down one block at a time until the measured increase is within budget, then up while the next block
  still fits. The measure is zero-shot SPD, or (``plan --checkpoint``) SPD with the checkpoint's distilled
  weights: distillation in the loop, so the budget holds for the distilled model.
"""
from __future__ import annotations

from typing import Callable, Iterable

from ds_spd.errors import PlanError
from ds_spd.plan import BlockEntry, Plan

DEFAULT_THRESHOLDS = (0.0, 0.05)


def relative(plan: Plan) -> list[float | None]:
    """Relative sensitivity per block; None for a block a partial scan (``scan --last N``) did not measure."""
    scan = plan.scan or {}
    if all(b.sensitivity is None for b in plan.blocks):
        raise PlanError("the plan has no sensitivities: run `ds-spd scan` first")
    base = scan.get("baseline") if scan.get("metric", "ppl") == "ppl" else None
    return [None if b.sensitivity is None else b.sensitivity / base if base else b.sensitivity for b in plan.blocks]


def ranking(plan: Plan) -> list[int]:
    """Scanned block indices, least sensitive first (ties: later block first, as the paper converts from the end)."""
    rel = relative(plan)
    return sorted((i for i in range(len(rel)) if rel[i] is not None), key=lambda i: (rel[i], -i))


def classify(r: float, thresholds: tuple[float, float]) -> str:
    """The class of a chosen block, by the size of its relative sensitivity (see the module docstring)."""
    t1, t2 = thresholds
    size = abs(r)
    return "ISB" if size <= t1 else "SB" if size <= t2 else "ESB"


def _with_selection(plan: Plan, chosen: Iterable[int], thresholds, selection: dict) -> Plan:
    """Re-class the blocks. A block's head / MLP permutations describe distilled weights of that class: they
    are kept, both, where the class is unchanged and dropped, both, where it changes."""
    rel, chosen = relative(plan), set(chosen)
    blocks = []
    for b in plan.blocks:
        cls = classify(rel[b.index], thresholds) if b.index in chosen else "TP"
        keep = cls == b.cls
        blocks.append(BlockEntry(index=b.index, sensitivity=b.sensitivity, **{"class": cls},
                                 head_permutation=b.head_permutation if keep else None,
                                 mlp_permutation=b.mlp_permutation if keep else None))
    return plan.model_copy(update={"blocks": blocks, "selection": {
        "thresholds": list(thresholds), "spd_count": len(chosen), **selection}})


def select(plan: Plan, *, count: int | None = None, fraction: float | None = None,
           thresholds: tuple[float, float] | None = None, max_increase: float | None = None,
           measure: Callable[[list[int]], float] | None = None) -> Plan:
    """A copy of ``plan`` with SPD blocks and classes chosen by one rule (see the module docstring).

    ``measure(blocks)`` evaluates the metric with those blocks in SPD form; it validates a budget.
    """
    rules = [r for r, v in (("count", count), ("fraction", fraction), ("max_increase", max_increase)) if v is not None]
    if len(rules) > 1:
        raise PlanError(f"choose the SPD blocks by one rule, not {' and '.join(rules)}")
    if thresholds is not None and not 0 <= thresholds[0] <= thresholds[1]:
        raise PlanError(f"thresholds must satisfy 0 <= t1 <= t2, got {thresholds}")
    n = len(plan.blocks)
    order = ranking(plan)
    th = tuple(thresholds or DEFAULT_THRESHOLDS)
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise PlanError(f"spd fraction must be in [0, 1], got {fraction}")
        count = round(fraction * n)
    if count is not None:
        if not 0 <= count <= n:
            raise PlanError(f"spd count must be in [0, {n}], got {count}")
        if count > len(order):
            raise PlanError(f"spd count {count}: the scan measured only {len(order)} blocks ({order}); scan more "
                            "blocks (drop --last) to choose more")
        return _with_selection(plan, order[:count], th, {"rule": "count"})
    if max_increase is None:
        rel = relative(plan)
        return _with_selection(plan, [i for i in order if abs(rel[i]) <= th[1]], th, {"rule": "thresholds"})
    return _budget(plan, order, th, max_increase, measure)


def _budget(plan: Plan, order: list[int], th, max_increase: float, measure) -> Plan:
    if measure is None:
        raise PlanError("an accuracy budget must be validated: pass a measure function")
    rel = relative(plan)
    predicted, total = [], 0.0   # predicted relative increase of the k least sensitive blocks
    for i in order:
        total += rel[i]
        predicted.append(total)
    k = max([j + 1 for j, p in enumerate(predicted) if p <= max_increase], default=0)
    base = measure([])           # on the validation data, which may differ from the calibration data
    tried, fits, failed = [], {0: base}, set()

    def attempt(j: int) -> bool:
        value = measure(order[:j])
        tried.append({"spd_count": j, "predicted_increase": predicted[j - 1], "measured": value,
                      "measured_increase": value / base - 1})
        if value <= base * (1 + max_increase):
            fits[j] = value
        else:
            failed.add(j)
        return j in fits
    # from the predicted count down until a count fits, then up while the next count fits too (with
    # distillation in the loop the measured increase is far below the zero-shot prediction)
    while k > 0 and not attempt(k):
        k -= 1
    while k < len(order) and k + 1 not in failed and attempt(k + 1):
        k += 1
    measured = fits[k]
    return _with_selection(plan, order[:k], th, {
        "rule": "max_increase", "max_increase": max_increase, "validation_baseline": base,
        "measured": measured, "measured_increase": measured / base - 1, "tried": tried})


def validation_measure(cfg, plan, checkpoint: str | None) -> Callable[[list[int]], float]:
    """The budget rule's measure: the plan's model at its tp size (virtual TP) on the config's ``spd.data`` text,
    with a checkpoint's distilled weights (checked against the model, tp size and grain first, then read, not
    loaded)."""
    from ds_spd.build import build_runner
    from ds_spd.run import resolve_run
    spec = resolve_run(cfg, virtual_tp=plan.tp_size, data_section="data")
    states = None
    if checkpoint is not None:
        from ds_spd.checkpoint import open_checkpoint, read_block_states
        open_checkpoint(checkpoint, spec.model_config, spec.tp_size, spec.config.tp_grain_size)
        states = read_block_states(checkpoint)
    return perplexity_measure(build_runner(spec), states)


def perplexity_measure(runner, states: dict | None = None) -> Callable[[list[int]], float]:
    """``measure(blocks)`` for a budget: the runner's perplexity on its ``spd.data`` text with those blocks SPD,
    carrying their distilled weights where ``states`` (a checkpoint's, ds_spd.checkpoint.read_block_states)
    has them: distillation in the loop."""
    from ds_spd.core.inject import distilled_in
    from ds_spd.data import segments_for
    from ds_spd.tools.evaluation import evaluate_lm
    segments = segments_for(runner.config.data, runner.tokenizer)

    def measure(blocks):
        with distilled_in(runner.hf_model, states or {}, blocks):
            return evaluate_lm(runner.hf_model, segments, runner.config.data.batch_size, progress=False)["perplexity"]
    return measure
