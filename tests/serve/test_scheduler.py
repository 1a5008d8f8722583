"""The scheduler and the step executor in one process (ds_spd.serve.scheduler, .executor, .step): continuous
batching proved by equality with ``generate``, chunked prefill, stop strings, a sequence that fails alone."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer
from serve_helpers import PROMPTS

from ds_spd.serve.executor import StepExecutor
from ds_spd.serve.sampling import SamplingParams
from ds_spd.serve.scheduler import Scheduler, Sequence
from ds_spd.serve.step import STOP, StepPlan


def _spd_model(family="llama", lag=False, **extra):
    """The tiny model in virtual tp 2 with blocks 0 and 2 in SPD form; ``lag``: lagged attention there (its state
    per slot and position in the slot cache)."""
    import ds_spd
    model = ds_spd.virtualize(tiny_model(family, **extra), 2, [0, 2])
    ds_spd.set_lag(model, lag)
    return model


def _run_all(model, tok, seqs, slots=4, step_tokens=2048, max_len=256, executor=None):
    ex = executor or StepExecutor(model, torch.device("cpu"), slots, max_len)
    sched = Scheduler(tok, set(), slots, max_len, step_tokens, granule=ex.cache.copy_granule)
    sched.add(seqs)
    moves = forwards = 0
    while sched.has_work():
        plan = sched.plan()
        if plan is None:
            break
        moves += len(plan.moves)
        forwards += len(plan.forwards)
        wired = StepPlan.from_wire(json.loads(json.dumps(plan.to_wire())))   # as the other ranks receive it
        assert wired == plan
        sched.complete(plan, ex.run(wired))
    return moves, forwards


@pytest.mark.parametrize("step_tokens,lag", [(2048, False), (5, False), (2048, True), (5, True)])
def test_continuous_batching_greedy_equals_generate(step_tokens, lag):
    """Sequences joining and leaving a batch of 4 slots (different lengths, compaction moves, prefill split
    into 4-token chunks with step_tokens 5) produce exactly HF generate's greedy tokens, prompt by prompt; with
    lagged attention too (each chunk and decode row starts from the state its slot kept at the position before)."""
    model, tok = _spd_model(lag=lag), tiny_tokenizer()
    lengths = [20, 5, 13, 20, 2, 9, 17, 11]
    ref = []
    for p, n in zip(PROMPTS, lengths):
        ids = tok(p, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        ref.append(out[0, ids.shape[1]:].tolist())
    seqs = [Sequence(f"r{i}", 0, tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0))
            for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    moves, forwards = _run_all(model, tok, seqs, step_tokens=step_tokens)
    assert [s.output for s in seqs] == ref
    assert all(s.finish_reason == "length" for s in seqs)
    assert moves > 0   # sequences finished out of order: the running ones were compacted
    if step_tokens == 5:   # "import os and sys and then" cannot prefill in one step
        assert forwards > _run_all(model, tok, [Sequence("a", 0, tok(PROMPTS[3]).input_ids,
                                                         SamplingParams(max_tokens=2, temperature=0))])[1]


@pytest.mark.parametrize("lag", [False, True])
def test_choices_of_one_prompt_share_its_prefill(lag):
    """n > 1: the other choices copy the first one's prompt cache and prefill only the last prompt token; greedy,
    every choice still equals HF generate's tokens. Lagged attention: the copy, rounded down to the slot cache's
    granule (16 positions), carries the state at its end; the choices prefill the rest."""
    model, tok = _spd_model(lag=lag), tiny_tokenizer()
    prompt = tok(SYSTEM + PROMPTS[3]).input_ids
    ids = torch.tensor([prompt])
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(prompt):]
    ex = StepExecutor(model, torch.device("cpu"), 4, 256)
    g = ex.cache.copy_granule
    assert g == (16 if lag else 1)
    sched = Scheduler(tok, set(), 4, 256, 2048, granule=g)
    fork = (len(prompt) - 1) // g * g
    assert fork > 0
    seqs = [Sequence("r", i, prompt, SamplingParams(max_tokens=10, temperature=0)) for i in range(3)]
    sched.add(seqs)
    prefilled, forks = 0, 0
    while sched.has_work():
        plan = sched.plan()
        if plan is None:
            break
        forks += sum(m.length == fork for m in plan.moves)
        prefilled += sum(len(f.tokens[0]) for f in plan.forwards if f.kind == "prefill")
        sched.complete(plan, ex.run(plan))
    assert [s.output for s in seqs] == [ref.tolist()] * 3
    assert forks == 2 and prefilled == len(prompt) + 2 * (len(prompt) - fork)


def test_step_plan_wire_and_shutdown_rules():
    """The stop plan survives the wire (every other field is checked by the batching tests' round trip); a
    signal within SAME_STOP of the first is the same stop, a later one ends the grace period at once."""
    from ds_spd.serve.engine import Shutdown
    assert StepPlan.from_wire(json.loads(json.dumps(STOP.to_wire()))) is STOP
    with pytest.raises(ValueError, match="unknown forward kind"):
        StepPlan.from_wire({"moves": [], "done": [], "forwards": [
            {"kind": "verify", "slot": 0, "offsets": [0], "tokens": [[1]], "seqs": ["a/0"]}]})
    stop = Shutdown(timeout=10.0, same_stop=2.0)
    assert not stop.requested and stop.request(100.0) and stop.deadline == 110.0
    assert not stop.request(101.5) and stop.deadline == 110.0 and stop.signals == 1   # the launcher's copy
    assert stop.request(103.0) and stop.deadline == 103.0 and stop.signals == 2


def test_a_sequence_that_cannot_be_sampled_fails_alone():
    """One sequence's failure in a step ends that sequence with an error event; the others in the step go on."""
    sched = Scheduler(tiny_tokenizer(), set(), 2, 64, 32)
    bad, good = (Sequence(r, 0, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0)) for r in ("bad", "good"))
    sched.add([bad, good])
    plan = sched.plan()
    assert [f.seqs for f in plan.forwards] == [[bad.id], [good.id]]
    events = sched.complete(plan, [torch.full((1, 384), float("nan")), torch.randn(1, 384)])
    assert [(e.seq.request_id, e.error is not None) for e in events] == [("bad", True), ("good", False)]
    assert bad.finish_reason == "error" and "no finite logit" in events[0].error and len(good.output) == 1
    plan = sched.plan()
    assert plan.done == [bad.id] and plan.forwards[0].seqs == [good.id]


def test_stop_string_is_cut_and_never_streamed():
    tok = tiny_tokenizer()
    ids = tok("the value of x STOP then more text").input_ids
    sched = Scheduler(tok, set(), 2, 128, 64)
    s = Sequence("r", 0, [1], SamplingParams(max_tokens=100, stop=("STOP",)))
    streamed = ""
    for t in ids:
        s.output.append(t)
        streamed += sched._advance(s, t).delta
        assert "STOP"[:2] not in streamed.replace("the value of x", "")
        if s.finished:
            break
    assert s.finish_reason == "stop" and streamed == s.text == "the value of x "


def test_prompt_logprobs_survive_chunked_prefill():
    """A prompt prefilled in 4-token chunks (step budget 5) is scored exactly as in one forward: each chunk's
    positions score the tokens after them, the last of a chunk the next chunk's first."""
    import ds_spd
    model, tok = ds_spd.virtualize(tiny_model(), 2, [0, 2]), tiny_tokenizer()
    ids = tok(PROMPTS[3] + " and more words here").input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    seq = Sequence("r", 0, ids, SamplingParams(max_tokens=1, temperature=0, logprobs=2, prompt_logprobs=2))
    _run_all(model, tok, [seq], step_tokens=5)
    assert [t for t, _, _ in seq.prompt_logprobs] == ids and seq.prompt_logprobs[0][1] is None
    got = [lp for _, lp, _ in seq.prompt_logprobs[1:]]
    assert got == pytest.approx([float(ref[j, ids[j + 1]]) for j in range(len(ids) - 1)], abs=1e-5)
    assert all(alts[0][1] == pytest.approx(float(ref[j].max()), abs=1e-5)
               for j, (_, _, alts) in enumerate(seq.prompt_logprobs[1:]))


# ---------------------------------------------------------------- prefix caching
SYSTEM = "def main of the class lambda x while True pass import os and sys and then return x "


def _waves(model, tok, waves, cache_slots, slots=3, step_tokens=2048):
    """Requests in waves (each wave's prompts from the finished earlier ones' outputs, as a chat's turns); the
    prefill tokens run, each wave's sequences and the cache (None: off)."""
    from ds_spd.serve.prefix_cache import PrefixCache
    cache = None if cache_slots is None else PrefixCache(slots, cache_slots)
    ex = StepExecutor(model, torch.device("cpu"), slots, 256, pool_slots=cache_slots or 0)
    sched = Scheduler(tok, set(), slots, 256, step_tokens, cache, granule=ex.cache.copy_granule)
    prefilled, done, steps = 0, [], []
    for wave in waves:
        seqs = wave(done)
        sched.add(seqs)
        while sched.has_work():
            plan = sched.plan()
            wired = StepPlan.from_wire(json.loads(json.dumps(plan.to_wire())))
            assert wired == plan
            prefilled += sum(len(f.tokens[0]) for f in plan.forwards if f.kind == "prefill")
            steps.append((plan, [t.id for t in sched.prefilling]))
            sched.complete(plan, ex.run(wired))
        done.append(seqs)
    _waves.steps = steps   # each plan, and the sequences being prefilled when it ran
    return prefilled, done, cache


def _chat_waves(tok, scored=None):
    params = dict(max_tokens=6, temperature=0, prompt_logprobs=scored, logprobs=scored)
    first = [tok(SYSTEM + p).input_ids for p in PROMPTS[:4]]

    def wave1(done):   # 4 prompts behind one system prompt, 3 slots: the 4th waits for a slot
        return [Sequence(f"a{i}", 0, ids, SamplingParams(**params)) for i, ids in enumerate(first)]

    def wave2(done):   # the next turn of each: its whole conversation, then new words
        return [Sequence(f"b{i}", 0, s.prompt + s.output + tok(" then " + PROMPTS[i + 4]).input_ids,
                         SamplingParams(**params)) for i, s in enumerate(done[0])]
    return [wave1, wave2]


@pytest.mark.parametrize("family,scored,lag", [("llama", None, False), ("llama", 2, False),
                                              ("gemma3_text", None, False), ("llama", None, True)])
def test_prefix_cache_reuses_prefixes_and_changes_no_result(family, scored, lag):
    """Chats behind one system prompt, then their next turns (each resends its conversation), through a pool of 2
    slots (so the 4 finished first turns evict each other): the greedy tokens equal the uncached run's, and with
    ``echo`` + ``logprobs`` every prompt token's score too; far fewer tokens are prefilled, and each sequence says
    how many it reused. Gemma 3's family with an 8-token sliding window on every other layer: a copied prefix
    far longer than the window gives the same tokens. Lagged attention: a reused prefix carries its state."""
    extra = dict(sliding_window=8, query_pre_attn_scalar=16,
                 layer_types=["sliding_attention", "full_attention"] * 2) if family == "gemma3_text" else {}
    model, tok = _spd_model(family, lag, **extra), tiny_tokenizer()
    plain, ref, _ = _waves(model, tok, _chat_waves(tok, scored), None)
    cached, got, cache = _waves(model, tok, _chat_waves(tok, scored), 2)
    assert [[s.output for s in w] for w in got] == [[s.output for s in w] for w in ref]
    assert plain == sum(len(s.prompt) for w in ref for s in w) and cached < plain * 0.6
    assert [s.cached for s in ref[0] + ref[1]] == [0] * 8
    system = len(tok(SYSTEM).input_ids)
    assert got[0][0].cached == 0 and all(s.cached >= system - 2 for s in got[0][1:])   # behind the first
    assert sum(s.cached for s in got[1]) > 0 and cache.hits == sum(s.cached for w in got for s in w)
    assert len(cache.entries) == 2
    if scored:
        for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
            assert [t for t, _, _ in a.prompt_logprobs] == [t for t, _, _ in b.prompt_logprobs] == a.prompt
            assert [lp for _, lp, _ in b.prompt_logprobs[1:]] == pytest.approx(
                [lp for _, lp, _ in a.prompt_logprobs[1:]], abs=1e-5)
            assert [[i for i, _ in alts] for _, _, alts in b.prompt_logprobs] == \
                [[i for i, _ in alts] for _, _, alts in a.prompt_logprobs]


def test_prefix_cache_copy_outlives_the_eviction_of_its_source():
    """A prompt copies a pooled prefix and is prefilled in 4-token chunks; meanwhile a running sequence finishes
    and evicts that entry (a pool of 1 slot), overwriting its slot: the copy was made, the result is the uncached
    one."""
    import ds_spd
    model, tok = ds_spd.virtualize(tiny_model(), 2, [0, 2]), tiny_tokenizer()
    long = tok(SYSTEM + SYSTEM).input_ids
    other = tok(" ".join(reversed(SYSTEM.split()))).input_ids

    def waves():
        return [lambda done: [Sequence("a", 0, long[:40], SamplingParams(max_tokens=2, temperature=0))],
                lambda done: [Sequence("c", 0, tok("x").input_ids, SamplingParams(max_tokens=4, temperature=0)),
                              Sequence("b", 0, long[:40] + other, SamplingParams(max_tokens=3, temperature=0))]]
    _, ref, _ = _waves(model, tok, waves(), None, step_tokens=5)
    _, got, cache = _waves(model, tok, waves(), 1, step_tokens=5)
    b = got[1][1]
    assert b.cached == 40 and b.output == ref[1][1].output
    evicting = [ids for plan, ids in _waves.steps for m in plan.moves if m.dst == 3 and m.length < 40]
    assert evicting and b.id in evicting[0]   # c's KV overwrote the pool slot while b was being prefilled


def test_lagged_state_is_kept_where_a_forward_can_start():
    """A model with lagged blocks: its slot cache keeps their state at each slot's last position and every 16th, so
    copies are rounded to 16 (a slot holds a sixteenth of the per-position state); a forward that would start
    anywhere else is refused by name, never run on a wrong state."""
    from ds_spd.serve.kv_cache import LAG_GRANULE
    model = _spd_model(lag=True)
    ex = StepExecutor(model, torch.device("cpu"), 2, 64)
    assert (ex.cache.copy_granule, StepExecutor(_spd_model(), torch.device("cpu"), 2, 64).cache.copy_granule) == \
        (LAG_GRANULE, 1)
    ex.forward(0, [0], [list(range(3, 23))])            # 20 positions: state at 15 and at 19
    cells, last = ex.cache.lag[0]
    assert cells.shape[2] == 64 // LAG_GRANULE and last.shape[1] == 2
    ex.forward(0, [20], [[5]])                          # the next position reads the slot's last
    ex.cache.copy_slot(0, 1, 16)                        # a prefix of 16: the granule's end
    ex.forward(1, [16], [[7, 8]])
    ex.cache.copy_slot(0, 1, 12)
    with pytest.raises(ValueError, match="starts at position 12: a lagged block's state is kept only"):
        ex.forward(1, [12], [[7]])
    # a granule's end written by decode steps (positions 10..19, one at a time), then copied: the same logits as
    # the whole text prefilled at once
    ids = list(range(30, 51))
    ex = StepExecutor(model, torch.device("cpu"), 2, 64)
    ex.forward(0, [0], [ids[:10]])
    for p in range(10, 20):
        ex.forward(0, [p], [[ids[p]]])
    ex.cache.copy_slot(0, 1, 16)
    got = ex.forward(1, [16], [ids[16:]])
    want = StepExecutor(model, torch.device("cpu"), 2, 64).forward(0, [0], [ids])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_prefix_match_rules():
    """Token-exact matching: the last prompt token is always prefilled; a scored prompt stops one short of the
    shared prefix and needs a source scored with as many alternatives; the pool keeps one entry per prefix."""
    from ds_spd.serve.prefix_cache import PrefixCache, Source, common_prefix, reusable
    a = list(range(200))
    assert common_prefix(a, a[:130] + [7]) == 130 and common_prefix(a, a) == 200 and common_prefix([], a) == 0
    src = Source(5, a, [(t, None, [(t, 0.0)] * 3) for t in a], k=3)
    assert reusable(src, a, None) == 199 and reusable(src, a[:50] + [1, 2], None) == 50
    assert reusable(src, a[:50] + [1, 2], 2) == 49 and reusable(src, a[:50] + [1, 2], 4) == 0
    assert reusable(Source(5, a), a[:60], 1) == 0
    assert reusable(src, a[:50] + [1, 2], None, granule=16) == 48 and reusable(src, a, 2, granule=16) == 192
    pool = PrefixCache(first=4, slots=2)
    assert pool.keep(Source(0, a[:10])).dst == 4
    assert pool.keep(Source(1, a[:5])) is None                       # held by the longer entry
    assert pool.keep(Source(1, a[:20])).dst == 4                     # extends it: replaces it
    assert pool.keep(Source(2, [9, 9, 9])).dst == 5
    hit = pool.best(a[:15] + [3], None, [])
    assert (hit.source.slot, hit.length) == (4, 15)                   # now the most recently used
    assert pool.keep(Source(0, [8, 8])).dst == 5                     # evicts [9, 9, 9], not the one just used


# ---------------------------------------------------------------- the compiled decode step
def _batching_run(model, tok, slots, compiled=None, lengths=(20, 5, 13, 20, 2, 9), warm=False, max_len=512):
    """``compiled``: None (plain executor), "compile", or a function of the executor giving the step to run in
    place of the compiled one (``lambda ex: ex._decode``: the compiled step's form without the compiler)."""
    ex = StepExecutor(model, torch.device("cpu"), slots, max_len, compiled=compiled is not None)
    if callable(compiled):
        ex.compiled = compiled(ex)
    if warm:
        assert ex.warm_up() > 0
    seqs = [Sequence(f"r{i}", 0, tok(p).input_ids, SamplingParams(max_tokens=n, temperature=0))
            for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    _run_all(model, tok, seqs, slots=slots, max_len=max_len, executor=ex)
    return [s.output for s in seqs]


@pytest.mark.parametrize("lag", [False, True])
def test_decode_step_form_changes_no_token(lag):
    """The compiled step's form, run eagerly: every row written by index (one row too), keys up to the longest
    row, the query groups packed onto their KV head even for a compiled trace (ds_spd.models.attention): every
    sequence's greedy tokens equal the plain executor's (run first: the compiled form switches the model's
    attention implementation); with lagged attention's state read and written by index too."""
    model, tok = _spd_model(lag=lag), tiny_tokenizer()
    plain = _batching_run(model, tok, 4, None, (8, 3, 6, 7))
    assert _batching_run(model, tok, 4, lambda ex: ex._decode, (8, 3, 6, 7)) == plain


def test_decode_step_form_fills_the_context():
    """Sequences run to the end of a short context: every decode step, the last one fed included (position
    max_len - 2: keys never fill the whole context, so the executor's eager guard for that shape is not needed),
    goes through the compiled step's form and gives the plain executor's tokens."""
    import ds_spd
    model, tok = ds_spd.virtualize(tiny_model(), 2, [0, 2]), tiny_tokenizer()
    prompts = [len(tok(p).input_ids) for p in PROMPTS[:2]]
    max_len = max(prompts) + 6
    lengths = [max_len - n for n in prompts]     # each sequence ends on the context's last position
    plain = _batching_run(model, tok, 2, None, lengths, max_len=max_len)
    assert [len(o) for o in plain] == lengths
    positions = []

    def recording(ex):   # the compiled step's form, noting the positions it was given
        def form(ids, pos, *masks):
            positions.append(int(pos.max()))
            return ex._decode(ids, pos, *masks)
        return form
    assert _batching_run(model, tok, 2, recording, lengths, max_len=max_len) == plain
    assert max(positions) == max_len - 2   # the last token fed (the one after it is only sampled) went through it


def test_compiled_decode_equals_eager():
    """torch.compile of the decode step on Gemma 3's family with sliding-window layers, in virtual TP: the warm-up
    compiles two graphs (one row, its products as multiply-and-sums; several, its products ds_spd's kernel's); a
    batching run with steps of one
    and two rows compiles nothing more (no stall under traffic) and gives the eager step's greedy tokens.
    (LLaMA's family on 2 real ranks, the all-reduce inside the graph: tests/serve/test_compiled_serve.py.)"""
    import ds_spd
    from torch._dynamo.utils import counters
    extra = dict(sliding_window=8, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"] * 2)
    model, tok = ds_spd.virtualize(tiny_model("gemma3_text", **extra), 2, [0, 2]), tiny_tokenizer()
    plain = _batching_run(model, tok, 2, None, (12, 9, 5))
    before, products = counters["stats"]["unique_graphs"], counters["ds_spd"]["one_row_products"]
    kernel = counters["ds_spd"]["several_row_kernel"]
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):   # a cached graph skips the passes
        assert _batching_run(model, tok, 2, "compile", (12, 9, 5), warm=True) == plain
    assert counters["stats"]["unique_graphs"] - before == 2
    # the one-row graph's products (q/k/v/o, gate/up/down, the head) became multiply-and-sums; the several-rows
    # graph's went to ds_spd's kernel
    assert counters["ds_spd"]["one_row_products"] - products >= 7
    assert counters["ds_spd"]["several_row_kernel"] - kernel >= 7


@pytest.mark.parametrize("several_rows,one_row", [("library", "reductions"), ("reductions", "reductions"),
                                                  ("kernel", "reductions"), ("kernel", "kernel"),
                                                  ("kernel", "library")])
def test_row_products_equal_the_library_products(several_rows, one_row):
    """The decode graphs' product rewrite (ds_spd.serve.compile.RowProducts): the one-row graph's products (with
    and without a bias) and the several-rows graph's as asked (ds_spd's C++ kernel; multiply-and-sums; or left to
    the library; serve's default: one-row multiply-and-sums, several rows through the kernel). The results equal
    the library's products to float rounding, at row counts the kernel takes in one chunk of rows, in two, and with
    a chunk of one row."""
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from ds_spd.serve.compile import RowProducts
    w, b = torch.randn(48, 40), torch.randn(48)

    def f(x):
        return F.linear(x, w, b) + F.linear(x.flip(0), w)

    torch._dynamo.reset()
    names = ("one_row_products", "one_row_kernel", "several_row_products", "several_row_kernel")
    before = {k: counters["ds_spd"][k] for k in names}
    g = torch.compile(f, dynamic=True, options={"post_grad_custom_post_pass": RowProducts(several_rows, one_row)})
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
        for rows in (1, 3, 5, 9, 17):
            x = torch.randn(rows, 40)
            torch.testing.assert_close(g(x), f(x), rtol=1e-5, atol=1e-5)
    added = {k: counters["ds_spd"][k] - before[k] for k in names}
    assert added == {"one_row_products": 2 * (one_row == "reductions"), "one_row_kernel": 2 * (one_row == "kernel"),
                     "several_row_products": 2 * (several_rows == "reductions"),
                     "several_row_kernel": 2 * (several_rows == "kernel")}
    with pytest.raises(ValueError, match="one_row must be one of"):
        RowProducts(several_rows, "gemv")


class _Step:
    """A decode step's stand-in for :class:`AheadOfTimeDecode` (a bound method over tensors)."""

    def __init__(self, graph_break: bool = False):
        self.graph_break = graph_break

    def decode(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        y = x * scale
        if self.graph_break:
            torch._dynamo.graph_break()
        return y + 1


def test_an_ahead_of_time_step_keeps_its_inputs_guards():
    """The ahead-of-time form (``compile_decode(..., ahead_of_time=True)``, an experiment's variant): one graph per
    bucket (one row; several), the other's result equal; inputs that fail a kept guard (another dtype, another
    rank) get None, for the eager step."""
    from ds_spd.serve.compile import AheadOfTimeDecode
    step, scale = AheadOfTimeDecode(_Step().decode, {}), torch.tensor(2.0)
    for rows in (1, 3, 5):
        assert torch.equal(step(torch.ones(rows, 4), scale), torch.full((rows, 4), 3.0))
    assert sorted(step.graphs) == [1, 2] and None not in step.graphs.values()
    assert step(torch.ones(3, 4, dtype=torch.float64), scale) is None
    assert step(torch.ones(3, 4, 1), scale) is None


def test_a_step_with_a_graph_break_takes_the_guarded_call():
    """A decode step that cannot compile as one graph (here a graph break) warns and runs through
    ``torch.compile``'s guarded call, with the same result."""
    from ds_spd.serve.compile import AheadOfTimeDecode
    step = AheadOfTimeDecode(_Step(graph_break=True).decode, {})
    with pytest.warns(UserWarning, match="not compiled ahead of time"):
        out = step(torch.ones(3, 2), torch.tensor(2.0))
    assert step.graphs == {2: None} and torch.equal(out, torch.full((3, 2), 3.0))
