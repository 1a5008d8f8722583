"""``python -m ds_spd`` / ``ds-spd``: generate and eval, under the deepspeed launcher or in virtual TP.

    deepspeed --num_gpus 2 --module ds_spd generate --config configs/spd_smollm2_tp2.json --prompt "..."
    deepspeed --num_gpus 2 --module ds_spd eval --config configs/spd_smollm2_tp2.json --json
    python -m ds_spd eval --virtual-tp 2 --spd-blocks 20-29 --json

Flags override the config file; with no ``--config`` the defaults are the demo's (SmolLM2, tp 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ds_spd.choices import (COMM_PATHS, DISTILL_TRAINERS, DTYPES, HEAD_GROUPINGS, INPUT_SOURCES, LOAD_MODES,
                            LR_SCHEDULES, MLP_MATCHINGS, SCAN_HEAD_DTYPES, SCAN_METHODS, SCAN_METRICS,
                            SCAN_RANKINGS)
from ds_spd.config import resolve_spd_config
from ds_spd.errors import SPDInputError
from ds_spd.outputs import check_output_dir, check_output_file
from ds_spd.ranks import is_main_rank


def parse_blocks(text: str) -> list[int]:
    """argparse type for block lists (``"3,4,27"``, ``"20-29"``, ``"none"``)."""
    from ds_spd.config import parse_block_list
    try:
        return parse_block_list(text)
    except SPDInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_fraction(text: str) -> float:
    """``"1%"`` -> 0.01, ``"0.01"`` -> 0.01."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad fraction {text!r}: use e.g. 1% or 0.01") from None


def parse_thresholds(text: str) -> tuple[float, float]:
    parts = [parse_fraction(t) for t in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"thresholds need two values T1,T2, got {text!r}")
    return parts[0], parts[1]


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and SPD (override the config file)")
    g.add_argument("--config", help="DeepSpeed JSON config with an \"spd\" section")
    g.add_argument("--model", help="'default' (embedded SmolLM2-135M), 'gemma3-270m' (embedded Gemma 3 270M), "
                                   "a local HF directory or a hub id")
    g.add_argument("--tp", type=int, dest="tp_size", help="tensor-parallel size (must equal the ranks started)")
    g.add_argument("--spd-blocks", type=parse_blocks, help="blocks in SPD form, e.g. 3,4,27 or 15-29")
    g.add_argument("--plan", help="plan.json choosing the SPD blocks")
    g.add_argument("--checkpoint", help="SPD checkpoint dir from `ds-spd distill` (distilled blocks and their plan)")
    g.add_argument("--dtype", choices=DTYPES)
    g.add_argument("--comm", choices=COMM_PATHS,
                   help="all-reduce path: auto (DeepSpeed's inference all-reduce: shm on CPU, NCCL on CUDA) or gloo")
    g.add_argument("--load", choices=LOAD_MODES,
                   help="real TP weights: sharded (default; each rank reads only its slices from safetensors) "
                        "or full (every rank loads the whole model, then AutoTP shards it)")
    g.add_argument("--virtual-tp", type=int, metavar="N",
                   help="simulate TP of size N in one process (no launcher), same SPD math")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def _data(p: argparse.ArgumentParser, section: str = "data") -> None:
    g = p.add_argument_group(f"data (override the config's spd.{section})")
    p.set_defaults(data_section=section)
    g.add_argument("--text", nargs="+", help="local text file(s)")
    g.add_argument("--dataset", help="shipped corpus (pydoc, shakespeare) or hub dataset name[:config]")
    g.add_argument("--split", help="train, validation or test")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--max-samples", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seed", type=int, help="draw random segments with this seed (else the first ones)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-spd", description="Sync-Point Drop for tensor-parallel inference")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="greedy generation with KV cache")
    _common(gen)
    gen.add_argument("--prompt", nargs="+", default=["The tensor-parallel model says"])
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    ev = sub.add_parser("eval", help="perplexity and next-token accuracy")
    _common(ev)
    _data(ev)
    sc = sub.add_parser("scan", help="block sensitivity scan (virtual TP) -> plan.json")
    _common(sc)
    _data(sc, "calibration")
    sc.add_argument("--method", choices=SCAN_METHODS,
                    help="isolated (default): each block alone; cumulative: the paper's, last block first")
    sc.add_argument("--ranking", choices=SCAN_RANKINGS,
                    help="zero-shot (default): each block's cost as it is; distilled: distil every block once (the "
                         "config's distill settings, kept in OUT.ranking/, resumable), then rank by each block's "
                         "cost alone with its distilled weights (Gemma 3 270M's default, docs/recovery.md)")
    sc.add_argument("--metric", choices=SCAN_METRICS, default=SCAN_METRICS[0])
    sc.add_argument("--head-dtype", choices=SCAN_HEAD_DTYPES,
                    help="the head's matmul while scoring (logits and softmax stay fp32): bfloat16 (default) ranks "
                         "the blocks as float32 does at 0.7x the scan's time (docs/recovery.md)")
    sc.add_argument("--no-cache", action="store_true",
                    help="naive scan on the loaded model: a full forward per measurement")
    sc.add_argument("--in-memory", action="store_true",
                    help="load the whole model and cache every block's input in RAM (default: stream the blocks "
                         "one at a time from the safetensors files, activations within --activation-budget)")
    sc.add_argument("--activation-budget", type=float, metavar="GB", dest="activation_budget_gb",
                    help="streamed scan: activations kept in RAM per rank; the rest go to files beside --out")
    sc.add_argument("--last", type=int, metavar="N",
                    help="streamed scan: only the last N blocks (the cumulative scan's first N steps)")
    sc.add_argument("--out", default="plan.json")
    sc.add_argument("--plot", help="PNG of the scan (default: next to --out)")
    pl = sub.add_parser("plan", help="choose the SPD blocks and their classes from a scanned plan")
    _common(pl)
    _data(pl, "data")
    rule = pl.add_mutually_exclusive_group()
    rule.add_argument("--spd-count", type=int, help="the N least sensitive blocks")
    rule.add_argument("--spd-fraction", type=float, help="a fraction of the blocks, e.g. 0.5")
    rule.add_argument("--max-ppl-increase", type=parse_fraction, metavar="PCT",
                      help="accuracy budget, e.g. 1%% (validated by evaluation on --split, default validation)")
    pl.add_argument("--thresholds", type=parse_thresholds, metavar="T1,T2",
                    help="relative sensitivity thresholds ISB|SB|ESB (default 0,0.05: every chosen block with a cost is distilled)")
    pl.add_argument("--out", help="output plan (default: overwrite --plan)")
    pl.add_argument("--plot", help="PNG of the plan (default: next to --out)")
    di = sub.add_parser("distill", help="B2B distillation (ZeRO) of the plan's SB/ESB blocks -> SPD checkpoint")
    _common(di)
    _data(di, "calibration")
    di.add_argument("--epochs", type=int)
    di.add_argument("--lr", type=float, help="AdamW learning rate (default: 1.5e-3 x the trained blocks' weight "
                    "RMS, one digit: 3e-4 on SmolLM2, 5e-5 on Gemma 3 270M)")
    di.add_argument("--input-source", choices=INPUT_SOURCES,
                    help="block inputs from the original model (paper) or the plan's zero-shot SPD prefix")
    di.add_argument("--out", help="SPD checkpoint directory to write")
    di.add_argument("--work-dir", help="ZeRO training checkpoints (resume from here); default OUT.work")
    di.add_argument("--trainer", choices=DISTILL_TRAINERS,
                    help="layerwise (default): one block resident at a time, read from the safetensors files; "
                         "joint: every trained block of the loaded model in one engine (same weights)")
    di.add_argument("--activation-budget", type=float, metavar="GB", dest="activation_budget_gb",
                    help="layerwise: activations kept in RAM per rank; the rest go to files in the work dir")
    di.add_argument("--head-grouping", choices=HEAD_GROUPINGS,
                    help="which trained blocks get head grouping first: all (default) or ESB only (paper)")
    di.add_argument("--mlp-matching", choices=MLP_MATCHINGS,
                    help="head grouping's MLP step: by neuron (default) or by AutoTP slice (paper)")
    di.add_argument("--schedule", choices=LR_SCHEDULES, help="learning-rate schedule (cosine: warm-up, then decay to 0)")
    di.add_argument("--warmup", type=float, help="fraction of the steps with a linear warm-up")
    di.add_argument("--val-segments", type=int,
                    help="calibration segments held out: each block keeps its epoch with the lowest MSE on them")
    di.add_argument("--patience", type=int, help="stop a block after this many epochs without improving")
    di.add_argument("--kl-epochs", type=int,
                    help="end-to-end stage after B2B: epochs of KL to the TP model's next-token distribution")
    di.add_argument("--kl-lr", type=float, help="learning rate of the end-to-end stage")
    di.add_argument("--restart", action="store_true",
                    help="discard the work dir's training state (of another run) and start over")
    be = sub.add_parser("bench", help="latency: DeepSpeed AutoTP vs ds_spd at SPD fractions, shm and gloo paths")
    _common(be)
    be.add_argument("--fractions", default="0,0.25,0.5,0.75,1", help="SPD fractions (of the plan's order if --plan)")
    be.add_argument("--comm-paths", default="auto,gloo")
    be.add_argument("--repeats", type=int, default=5)
    be.add_argument("--decode-tokens", type=int, default=16)
    be.add_argument("--prefill-len", type=int, default=512)
    be.add_argument("--decode-batches", default="1,8")
    be.add_argument("--out", default="runs/bench", help="directory for bench.json, bench.png, bench.md")
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server on a resident TP + SPD engine (continuous batching)")
    _common(sv)
    g = sv.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address rank 0 listens on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port, printed at start)")
    g.add_argument("--served-model-name", help="the model name clients send (default: the model directory's name)")
    g.add_argument("--max-seqs", type=int, default=8, help="sequences in the running batch (KV-cache slots)")
    g.add_argument("--max-model-len", type=int,
                   help="tokens per sequence, prompt and completion (default: 2048 or the model's limit if lower)")
    g.add_argument("--max-step-tokens", type=int, default=2048,
                   help="tokens per engine step: one per running sequence, the rest prefill (a longer prompt is "
                        "prefilled in chunks across steps)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="after SIGTERM / Ctrl-C, seconds running requests may take to finish")
    g.add_argument("--exit-linger", type=float, default=2.0,
                   help="after a rank died, seconds rank 0 answers 503 before it exits")
    g.add_argument("--token-log", metavar="DIR", help="at exit, every rank writes the tokens it ran per sequence")
    g.add_argument("--api-key", default=os.environ.get("DS_SPD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DS_SPD_API_KEY; prefer the "
                        "variable: a flag shows in ps)")
    g.add_argument("--max-request-mb", type=float, default=4.0,
                   help="request bodies over this many MiB get 413 before they are read whole")
    g.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for a slot; beyond, requests get 429 with Retry-After")
    bs = sub.add_parser("bench-serve", help="serving benchmark (vLLM-style): TP vs SPD servers side by side, or one "
                                            "running server (--url)")
    _common(bs)
    g = bs.add_argument_group("serving benchmark")
    g.add_argument("--url", help="benchmark this running server instead of starting servers")
    g.add_argument("--api-key", default=os.environ.get("DS_SPD_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="with --url: the server's API key (default: $DS_SPD_API_KEY, else $OPENAI_API_KEY)")
    g.add_argument("--backend", choices=("auto", "full", "openai"), default="auto",
                   help="with --url: the request form; auto: the first the server accepts (token ids + ignore_eos, "
                        "...); openai: text prompts, no extensions (the same requests for different servers)")
    g.add_argument("--engines", help="servers to start: tp, plan (the --plan/--checkpoint blocks), all (every block "
                                     "SPD); default tp,plan with a plan or checkpoint, else tp,all")
    g.add_argument("--paths", default="shm,gloo", help="all-reduce paths: shm, gloo, 2hosts (two simulated hosts)")
    g.add_argument("--rates", default="1,4,inf", help="request rates (Poisson arrivals per second; inf: all at once)")
    g.add_argument("--concurrency", default="", help="more loads: all at once with at most this many in flight, e.g. 1,8")
    g.add_argument("--num-requests", type=int, default=16, help="requests per load")
    g.add_argument("--prompt-len", default="32,256", help="prompt lengths in tokens, uniform in MIN,MAX")
    g.add_argument("--output-len", type=int, default=32, help="tokens generated per request (end-of-sequence ignored)")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--bench-seed", type=int, default=0, help="seed of the prompts, their lengths and the arrivals")
    g.add_argument("--corpus", default="pydoc", help="shipped corpus the prompts are cut from (its test split)")
    g.add_argument("--out", default="runs/bench_serve", help="directory for bench_serve.json, .md and .png")
    prep = sub.add_parser("prepare-model", help="convert and cache the embedded default model")
    prep.add_argument("--model", default="default")
    return parser


#: flags that set a key of the config's ``scan`` / ``distill`` section (the flag's dest is the key)
SECTION_FLAGS = {"scan": ("method", "ranking", "head_dtype"),
                 "distill": ("epochs", "lr", "input_source", "out", "work_dir", "trainer", "activation_budget_gb",
                             "schedule", "mlp_matching", "head_grouping", "warmup", "val_segments", "patience",
                             "kl_epochs", "kl_lr")}


def config_from_args(args: argparse.Namespace):
    data = {k: getattr(args, k, None)
            for k in ("text", "dataset", "split", "seq_len", "max_samples", "batch_size", "seed")}
    sections = {part: {k: getattr(args, k, None) for k in keys} for part, keys in SECTION_FLAGS.items()
                if part == args.command}
    return resolve_spd_config(args.config, model=args.model, tp_size=args.tp_size, spd_blocks=args.spd_blocks,
                              plan=args.plan, checkpoint=getattr(args, "checkpoint", None), dtype=args.dtype,
                              comm=args.comm, load=args.load, data=data,
                              data_section=getattr(args, "data_section", "data"), **sections)


def _report(args, result: dict, runner=None) -> None:
    """With --json, rank 0 prints ``result`` (plus the runner's model, SPD blocks and all-reduce accounting)."""
    if runner is not None:
        result = {**result, "mode": runner.mode, "model": runner.config.model, "dtype": runner.config.dtype,
                  "tp_size": runner.config.tp_size,
                  "load": runner.config.load if runner.mode == "tp" else "virtual",
                  "load_seconds": round(runner.load_seconds, 3),
                  "spd_blocks": list(runner.spd_blocks), **runner.stats.summary()}
    if args.json and is_main_rank():
        print(json.dumps(result), flush=True)


def _say(args, text: str) -> None:
    """A human-readable line on rank 0 (not with --json)."""
    if is_main_rank() and not args.json:
        print(text, flush=True)


def _hold(path: str, what: str) -> None:
    """Rank 0 locks an output for the rest of the command (ds_spd.locks): a second writer is refused."""
    if is_main_rank():
        from ds_spd.locks import hold
        hold(path, what)


def _plot_path(args, out: str) -> str:
    return args.plot or os.path.splitext(out)[0] + ".png"


def cmd_generate(args) -> None:
    from ds_spd.tools.evaluation import generate_texts
    from ds_spd.build import build_runner
    from ds_spd.run import resolve_run
    spec = resolve_run(config_from_args(args), virtual_tp=args.virtual_tp)
    if args.chat:   # before any weights load: the tokenizer alone says
        from ds_spd.models.loading import load_tokenizer
        if not getattr(load_tokenizer(spec.config.model), "chat_template", None):
            raise SPDInputError(f"--chat: model {spec.config.model!r} has no chat template (a base model): "
                                "drop --chat to continue the prompt as text")
    runner = build_runner(spec)
    outputs = generate_texts(runner, args.prompt, args.max_new_tokens, args.chat)
    for o in outputs:
        _say(args, f"{o['prompt']}{o['completion']}\n  [{o['new_tokens']} tokens, {o['ms_per_token']:.1f} ms/token, "
                   f"{o['allreduce_per_forward']:.0f} all-reduces/forward]")
    _report(args, {"generations": outputs}, runner)


def cmd_eval(args) -> None:
    from ds_spd.tools.evaluation import evaluate_run
    from ds_spd.build import build_runner
    from ds_spd.run import resolve_run
    runner = build_runner(resolve_run(config_from_args(args), virtual_tp=args.virtual_tp, data_section="data"))
    result = evaluate_run(runner, progress=is_main_rank())
    ci = ((f" [{result['perplexity_ci95'][0]:.3f}, {result['perplexity_ci95'][1]:.3f}]",
           f" [{result['accuracy_ci95'][0]:.4f}, {result['accuracy_ci95'][1]:.4f}]") if "ci" in result else ("", ""))
    _say(args, f"{runner.mode} tp={runner.config.tp_size} spd_blocks={list(runner.spd_blocks)}: perplexity "
               f"{result['perplexity']:.3f}{ci[0]}, top-1 accuracy {result['accuracy']:.4f}{ci[1]} on "
               f"{result['tokens']} tokens{' (95% bootstrap intervals over segments)' if ci[0] else ''}, "
               f"{runner.stats.summary()['allreduce_per_forward']:.0f} all-reduces/forward")
    _report(args, result, runner)


def cmd_scan(args) -> None:
    from ds_spd.tools.plots import plot_plan
    cfg = config_from_args(args)
    png = check_output_file(_plot_path(args, check_output_file(args.out, "plan output")), "plot output")
    _hold(args.out, "plan output")
    checkpoint = args.checkpoint
    if checkpoint is None and cfg.scan.ranking == "distilled":
        given = [f for f in ("in_memory", "no_cache", "activation_budget_gb", "last") if getattr(args, f)]
        if given:
            raise SPDInputError(f"--{given[0].replace('_gb', '').replace('_', '-')} does not apply to the distilled "
                                "ranking (the config's, or the model's default): add --ranking zero-shot")
        from ds_spd.stages.ranking import distil_every_block
        checkpoint = distil_every_block(cfg, args.out, args.config, progress=is_main_rank())
    plan, result, runner = _scan(args, cfg, checkpoint)
    if is_main_rank():
        plan.save(args.out)
        plot_plan(plan, png)
    _say(args, f"wrote {args.out} and {png}: baseline {args.metric} {result.baseline:.4f}, {result.seconds:.1f} s "
               f"({result.forwards_equivalent:.1f} forward-equivalents)")
    _report(args, {"plan": args.out, "method": result.method, "ranking": cfg.scan.ranking if checkpoint is None
                   else "distilled", "head_dtype": cfg.scan.head_dtype, "baseline": result.baseline,
                   "sensitivity": result.sensitivity, "seconds": result.seconds,
                   "forwards_equivalent": result.forwards_equivalent, "streamed": runner is None, **result.extra}, runner)


def _scan(args, cfg, checkpoint: str | None):
    """The scan the flags ask for: distill-aware (each block alone with a checkpoint's weights, in memory), in
    memory, or streamed from the weight files; (plan, result, runner or None)."""
    from ds_spd.build import build_runner
    from ds_spd.run import resolve_run
    from ds_spd.stages import scan
    s, progress = cfg.scan, is_main_rank()
    in_memory = args.in_memory or args.no_cache or checkpoint is not None
    calibration = cfg.calibration.model_dump()
    if checkpoint is not None and args.split is None:   # costs with distilled weights: on text not trained on
        calibration["split"] = s.ranking_split
    spec = resolve_run(cfg.updated(checkpoint=None, calibration=calibration), virtual_tp=args.virtual_tp or cfg.tp_size,
                       data_parallel=True, data_section="calibration", read_weights=not in_memory)
    if not in_memory:
        budget = None if args.activation_budget_gb is None else int(args.activation_budget_gb * 2**30)
        return (*scan.streamed_scan_to_plan(spec, s.method, args.metric, budget, f"{args.out}.activations",
                                            args.last, progress, s.head_dtype), None)
    runner = build_runner(spec, data_parallel=True)
    if checkpoint is not None:
        states = _distilled_states(checkpoint, spec)
        return (*scan.distilled_scan_to_plan(runner, states, checkpoint, args.metric, progress, s.head_dtype), runner)
    return (*scan.scan_to_plan(runner, s.method, args.metric, not args.no_cache, progress, s.head_dtype), runner)


def _distilled_states(checkpoint: str | None, spec) -> dict | None:
    """The distilled weights of a checkpoint made for this run's model, tp size and grain (checked first)."""
    if checkpoint is None:
        return None
    from ds_spd.checkpoint import open_checkpoint, read_block_states
    open_checkpoint(checkpoint, spec.model_config, spec.tp_size, spec.config.tp_grain_size)
    return read_block_states(checkpoint)


def cmd_plan(args) -> None:
    from ds_spd.plan import load_plan
    from ds_spd.stages.planner import perplexity_measure, select
    from ds_spd.tools.plots import plot_plan
    plan = load_plan(args.plan)
    out = check_output_file(args.out or args.plan, "plan output")
    png = check_output_file(_plot_path(args, out), "plot output")
    _hold(out, "plan output")
    measure = None
    if args.max_ppl_increase is not None:
        from ds_spd.build import build_runner
        from ds_spd.run import resolve_run
        args.split = args.split or "validation"   # validated on text the scan did not calibrate on
        checkpoint, args.checkpoint = args.checkpoint, None   # read here, not loaded into the model
        cfg = config_from_args(args).updated(model=args.model or plan.model, plan=None)
        spec = resolve_run(cfg, virtual_tp=plan.tp_size, data_section="data")
        measure = perplexity_measure(build_runner(spec), _distilled_states(checkpoint, spec))
    new = select(plan, count=args.spd_count, fraction=args.spd_fraction, thresholds=args.thresholds,
                 max_increase=args.max_ppl_increase, measure=measure)
    new.save(out)
    plot_plan(new, png)
    classes = {c: [b.index for b in new.blocks if b.cls == c] for c in ("ISB", "SB", "ESB")}
    _report(args, {"plan": out, "plot": png, "spd_blocks": new.spd_blocks, "classes": classes,
                   "selection": new.selection})
    _say(args, f"wrote {out} and {png}: {len(new.spd_blocks)} SPD blocks of {len(new.blocks)} "
               f"({new.selection['rule']}); " + ", ".join(f"{c} {v}" for c, v in classes.items()))
    if new.selection.get("rule") == "max_increase":
        _say(args, f"validated: perplexity {new.selection['measured']:.3f} ({100 * new.selection['measured_increase']:+.2f}%"
                   f" vs {new.selection['validation_baseline']:.3f})")


def cmd_distill(args) -> None:
    from ds_spd.stages import recovery
    cfg = config_from_args(args)
    run = recovery.prepare(cfg, args.plan, args.config, model=args.model, restart=args.restart)
    if run.complete:
        if is_main_rank():
            print(f"distill: {run.out} is already complete (same run, {run.settings.epochs} epochs): nothing to do",
                  file=sys.stderr)
        return _report(args, {"checkpoint": run.out, "already_complete": True})
    if is_main_rank():
        for line in recovery.untrained_note(run.plan):
            print(f"distill: {line}", file=sys.stderr, flush=True)
    result = recovery.execute(run, progress=is_main_rank())
    runner = result.pop("runner")
    _say(args, f"wrote {run.out}: {len(result['final_mse'])} blocks, epochs {result['epochs_trained']}, "
               f"{result['seconds']:.1f} s, {result['tokens_per_second']:.0f} block-tokens/s, "
               f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB (rank 0)")
    _report(args, result, runner)


def cmd_bench(args) -> None:
    from ds_spd.tools import bench
    from ds_spd.plan import load_plan
    from ds_spd.stages.planner import ranking
    from ds_spd.run import resolve_run
    cfg = config_from_args(args)
    order = ranking(load_plan(cfg.plan)) if cfg.plan else None
    check_output_dir(args.out, "bench output", names=bench.OUTPUT_FILES)
    _hold(args.out, "bench output")
    spec = resolve_run(cfg.updated(plan=None, spd_blocks=None), read_weights=False)   # bench loads the full model
    settings = bench.BenchSettings(fractions=tuple(float(f) for f in args.fractions.split(",")),
                                   comm_paths=tuple(args.comm_paths.split(",")), prefill_len=args.prefill_len,
                                   decode_batches=tuple(int(b) for b in args.decode_batches.split(",")),
                                   decode_tokens=args.decode_tokens, repeats=args.repeats)
    command = "OMP_NUM_THREADS=%s deepspeed --num_gpus %d --module ds_spd %s" % (
        os.environ.get("OMP_NUM_THREADS", "?"), cfg.tp_size, " ".join(a for a in sys.argv[1:] if "--local_rank" not in a))
    result = bench.bench_run(spec, settings, order, args.out, command, progress=is_main_rank())
    _say(args, bench.markdown(result, command))
    _report(args, {"bench": os.path.join(args.out, "bench.json"), "model": cfg.model, "tp_size": cfg.tp_size})


def cmd_serve(args) -> None:
    from ds_spd.run import resolve_run
    from ds_spd.serve.server import ServeSettings, serve
    settings = ServeSettings(host=args.host, port=args.port, model_name=args.served_model_name,
                             max_seqs=args.max_seqs, max_model_len=args.max_model_len,
                             max_step_tokens=args.max_step_tokens, shutdown_timeout=args.shutdown_timeout,
                             exit_linger=args.exit_linger, token_log=args.token_log, api_key=args.api_key,
                             max_request_mb=args.max_request_mb, max_queue=args.max_queue)
    serve(resolve_run(config_from_args(args), virtual_tp=args.virtual_tp), settings)


def cmd_bench_serve(args) -> None:
    from ds_spd.models.loading import load_tokenizer
    from ds_spd.tools import bench_serve as bs
    if args.backend != "auto" and not args.url:
        raise SPDInputError("--backend chooses the request form for a running server: it needs --url")
    check_output_dir(args.out, "bench-serve output", names=bs.OUTPUT_FILES)
    _hold(args.out, "bench-serve output")
    try:
        loads, (lo, hi), paths = bs.parse_loads(args.rates, args.concurrency, args.prompt_len, args.paths,
                                                args.output_len)
        model = bs.served_model(args.url, args.api_key) if args.url else None
    except (ValueError, RuntimeError) as err:
        raise SPDInputError(str(err)) from None
    cfg = None if args.url else config_from_args(args)
    engines = None if args.url else _managed_engines(args, cfg, paths)   # checked before the tokenizer loads
    tok = load_tokenizer(args.model or "default" if args.url else cfg.model)
    work = bs.make_workload(tok, args.num_requests, (lo, hi), args.output_len, args.bench_seed, args.corpus)
    try:
        result = bs.bench_url(args.url, model, args.api_key, args.backend, tok, work, loads, args.repeats,
                              args.bench_seed) if args.url else bs.bench_side_by_side(
            ["--model", cfg.model, "--tp", str(cfg.tp_size), "--dtype", cfg.dtype, "--max-model-len",
             str(hi + args.output_len)], engines, paths, loads, work, "bench", args.repeats, cfg.tp_size,
            args.bench_seed, progress=True)
    except RuntimeError as err:   # no request form the server at --url accepts
        raise SPDInputError(str(err)) from None
    command = "ds-spd " + " ".join(sys.argv[1:])
    bs.write_outputs(result, command, args.out)
    print(bs.markdown(result, command), f"wrote {args.out}/bench_serve.json, .md, .png", sep="\n", flush=True)


def _managed_engines(args, cfg, paths: list[str]) -> dict[str, list[str]]:
    """bench-serve without --url: the serve arguments of each engine to start, checked (no weights read)."""
    from ds_spd.run import resolve_run
    from ds_spd.tools import bench_serve as bs
    spec = resolve_run(cfg.updated(plan=None, checkpoint=None, spd_blocks=None), virtual_tp=cfg.tp_size,
                       read_weights=False)
    if "2hosts" in paths:
        from ds_spd.tools.serve_process import namespaces_work
        if not namespaces_work():
            raise SPDInputError("--paths 2hosts simulates hosts with private mount namespaces: it needs "
                                "`unshare -m` and mount (root)")
    names = args.engines.split(",") if args.engines else (["tp", "plan"] if cfg.plan or cfg.checkpoint
                                                          else ["tp", "all"])
    try:
        return bs.engines_for(cfg.plan, cfg.checkpoint, spec.model_config.num_hidden_layers, names)
    except ValueError as err:
        raise SPDInputError(str(err)) from None


def cmd_prepare_model(args) -> None:
    from ds_spd.models.loading import resolve_model_path
    print(resolve_model_path(args.model))


_VIRTUAL_LOAD = "it runs virtual TP in one process, which loads the whole model (--load picks how real TP ranks load)"

#: Flags a command accepts through the shared argument groups but cannot honour: refused, never ignored.
NOT_APPLICABLE = {
    "scan": {"plan": "scan measures every block and writes a plan (see --out)",
             "spd_blocks": "scan measures every block", "load": _VIRTUAL_LOAD},
    "plan": {"spd_blocks": "plan chooses the blocks (--spd-count, --spd-fraction, --max-ppl-increase)",
             "virtual_tp": "plan uses the plan's tp size",
             "tp_size": "plan uses the plan's tp size", "load": _VIRTUAL_LOAD},
    "distill": {"spd_blocks": "distill trains the plan's SB/ESB blocks", "checkpoint": "distill writes one (--out)",
                "virtual_tp": "distill simulates the plan's tp size", "tp_size": "distill uses the plan's tp size",
                "batch_size": "distill's micro-batch is the DeepSpeed config's train_micro_batch_size_per_gpu",
                "load": _VIRTUAL_LOAD},
    "bench-serve": {"spd_blocks": "bench-serve starts the engines named by --engines",
                    "comm": "bench-serve runs each path named by --paths", "load": "the servers load sharded",
                    "virtual_tp": "bench-serve starts real ranks (--tp)"},
    "bench": {"checkpoint": "bench times the all-reduce paths; weights do not change latency",
              "load": "bench loads the model once, fully, for both engines (AutoTP baseline and ds_spd)",
              "virtual_tp": "bench measures real TP: run it under `deepspeed --num_gpus N --module ds_spd bench`"},
}


#: Flags a command cannot run without.
REQUIRED = {"plan": {"plan": "plan needs --plan plan.json (written by `ds-spd scan`)"},
            "distill": {"plan": "distill needs --plan plan.json (from `ds-spd scan` and `ds-spd plan`)"}}


def refuse_not_applicable(args) -> None:
    """Refuse flags a command cannot honour, and missing required ones, before any work."""
    for flag, why in REQUIRED.get(args.command, {}).items():
        if getattr(args, flag, None) is None:
            raise SPDInputError(why)
    if args.command == "plan" and args.max_ppl_increase is None:   # no model or data without a budget to validate
        unused = [f"--{k.replace('_', '-')}" for k in ("model", "dtype", "text", "dataset", "split", "seq_len",
                                                      "max_samples", "batch_size", "seed", "config", "checkpoint")
                  if getattr(args, k, None) is not None]
        if unused:
            raise SPDInputError(f"{', '.join(unused)}: only used to validate a budget (--max-ppl-increase)")
    if getattr(args, "load", None) is not None and getattr(args, "virtual_tp", None) is not None:
        raise SPDInputError(f"--load does not apply with --virtual-tp: {_VIRTUAL_LOAD.replace('it runs', 'that is')}")
    if args.command == "scan" and args.checkpoint is not None:
        for flag in ("method", "ranking", "no_cache", "in_memory", "activation_budget_gb", "last"):
            if getattr(args, flag) not in (None, False, SCAN_METHODS[0]):
                raise SPDInputError(f"--{flag.replace('_gb', '').replace('_', '-')} does not apply with --checkpoint: "
                                    "the distill-aware scan measures each block alone, in memory")
    if args.command == "scan" and (args.in_memory or args.no_cache):
        for flag in ("activation_budget_gb", "last"):
            if getattr(args, flag) is not None:
                raise SPDInputError(f"--{flag.replace('_gb', '').replace('_', '-')} applies to the streamed scan "
                                    "only (drop --in-memory / --no-cache)")
    if args.command == "generate":
        if any(not p.strip() for p in args.prompt):
            raise SPDInputError("--prompt: an empty prompt has no token to continue from")
        if args.max_new_tokens < 1:
            raise SPDInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.command in ("serve", "bench-serve") and args.json:
        raise SPDInputError(f"--json does not apply to {args.command}: "
                            + ("it answers over HTTP" if args.command == "serve" else "it writes bench_serve.json"))
    for flag, why in NOT_APPLICABLE.get(args.command, {}).items():
        if getattr(args, flag, None) is not None:
            raise SPDInputError(f"--{flag.replace('_', '-').replace('tp-size', 'tp')} does not apply here: {why}")


COMMANDS = {"generate": cmd_generate, "eval": cmd_eval, "scan": cmd_scan, "plan": cmd_plan, "distill": cmd_distill,
            "bench": cmd_bench, "serve": cmd_serve, "bench-serve": cmd_bench_serve,
            "prepare-model": cmd_prepare_model}


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (the deepspeed launcher's stop signal) into a normal exit, so atexit cleanup runs."""
    import signal
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _finish_distributed() -> None:
    """Leave together and shut the process group down: a rank exiting while another still writes (rank 0
    saves the checkpoint) aborted in gloo's thread teardown ("terminate called without an active exception")."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    _exit_on_sigterm()
    try:
        refuse_not_applicable(args)
        COMMANDS[args.command](args)
        _finish_distributed()
    except SPDInputError as err:
        print(f"ds-spd {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        from ds_spd.locks import release
        release()
    return 0
