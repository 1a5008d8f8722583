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
import time

from .config import resolve_spd_config
from .errors import SPDInputError
from .outputs import check_output_dir, check_output_file
from .runtime import build_runner, is_main_rank


def parse_blocks(text: str) -> list[int]:
    """argparse type for block lists (``"3,4,27"``, ``"20-29"``, ``"none"``)."""
    from .config import parse_block_list
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
    g.add_argument("--model", help="'default' (embedded SmolLM2-135M), a local HF directory or a hub id")
    g.add_argument("--tp", type=int, dest="tp_size", help="tensor-parallel size (must equal the ranks started)")
    g.add_argument("--spd-blocks", type=parse_blocks, help="blocks in SPD form, e.g. 3,4,27 or 15-29")
    g.add_argument("--plan", help="plan.json choosing the SPD blocks")
    g.add_argument("--checkpoint", help="SPD checkpoint dir from `ds-spd distill` (distilled blocks and their plan)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--comm", choices=["auto", "gloo"],
                   help="all-reduce path: auto (DeepSpeed's inference all-reduce: shm on CPU, NCCL on CUDA) or gloo")
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
    sc.add_argument("--method", choices=["cumulative", "isolated"], default="cumulative",
                    help="cumulative: the paper's, last block first; isolated: each block alone")
    sc.add_argument("--metric", choices=["ppl", "kl"], default="ppl")
    sc.add_argument("--no-cache", action="store_true", help="naive scan: a full forward per measurement")
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
                    help="relative sensitivity thresholds ISB|SB|ESB (default 0.01,0.05)")
    pl.add_argument("--out", help="output plan (default: overwrite --plan)")
    pl.add_argument("--plot", help="PNG of the plan (default: next to --out)")
    di = sub.add_parser("distill", help="B2B distillation (ZeRO) of the plan's SB/ESB blocks -> SPD checkpoint")
    _common(di)
    _data(di, "calibration")
    di.add_argument("--epochs", type=int)
    di.add_argument("--lr", type=float)
    di.add_argument("--input-source", choices=["original", "prefix"],
                    help="block inputs from the original model (paper) or the plan's zero-shot SPD prefix")
    di.add_argument("--out", help="SPD checkpoint directory to write")
    di.add_argument("--work-dir", help="ZeRO training checkpoints (resume from here); default OUT.work")
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
    prep = sub.add_parser("prepare-model", help="convert and cache the embedded default model")
    prep.add_argument("--model", default="default")
    return parser


def config_from_args(args: argparse.Namespace):
    data = {k: getattr(args, k, None)
            for k in ("text", "dataset", "split", "seq_len", "max_samples", "batch_size", "seed")}
    return resolve_spd_config(args.config, model=args.model, tp_size=args.tp_size, spd_blocks=args.spd_blocks,
                              plan=args.plan, checkpoint=getattr(args, "checkpoint", None), dtype=args.dtype,
                              comm=args.comm, data=data,
                              data_section=getattr(args, "data_section", "data"))


def _report(args, result: dict, runner=None) -> None:
    """With --json, rank 0 prints ``result`` (plus the runner's model, SPD blocks and all-reduce accounting)."""
    if runner is not None:
        result = {**result, "mode": runner.mode, "model": runner.config.model, "tp_size": runner.config.tp_size,
                  "spd_blocks": list(runner.spd_blocks), **runner.stats.summary()}
    if args.json and is_main_rank():
        print(json.dumps(result), flush=True)


def cmd_generate(args) -> None:
    import torch
    runner = build_runner(config_from_args(args), args.virtual_tp)
    tok = runner.tokenizer
    outputs = []
    for prompt in args.prompt:
        if args.chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt").input_ids
        ids = ids.to(runner.device)
        runner.stats.reset()
        start = time.perf_counter()
        with torch.no_grad():
            out = runner.hf_model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                           pad_token_id=tok.pad_token_id or tok.eos_token_id)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        text = tok.decode(new, skip_special_tokens=True)
        outputs.append({"prompt": prompt, "completion": text, "new_tokens": len(new),
                        "ms_per_token": 1e3 * seconds / max(len(new), 1), "token_ids": new})
        if is_main_rank() and not args.json:
            print(f"{prompt}{text}\n  [{len(new)} tokens, {outputs[-1]['ms_per_token']:.1f} ms/token, "
                  f"{runner.stats.summary()['allreduce_per_forward']:.0f} all-reduces/forward]", flush=True)
    _report(args, {"generations": outputs}, runner)


def cmd_eval(args) -> None:
    from .data import segments_for
    from .evaluation import evaluate_lm
    runner = build_runner(config_from_args(args), args.virtual_tp, data_section="data")
    d = runner.config.data
    segments = segments_for(d, runner.tokenizer)
    runner.stats.reset()
    result = evaluate_lm(runner.model, segments, d.batch_size, progress=is_main_rank())
    result["data"] = {"text": d.text, "dataset": None if d.text else d.dataset, "split": d.split}
    if is_main_rank() and not args.json:
        print(f"{runner.mode} tp={runner.config.tp_size} spd_blocks={list(runner.spd_blocks)}: "
              f"perplexity {result['perplexity']:.3f}, top-1 accuracy {result['accuracy']:.4f} "
              f"on {result['tokens']} tokens, {runner.stats.summary()['allreduce_per_forward']:.0f} all-reduces/forward",
              flush=True)
    _report(args, result, runner)


def _plot_path(args, out: str) -> str:
    return args.plot or os.path.splitext(out)[0] + ".png"


def cmd_scan(args) -> None:
    from .data import segments_for
    from .plan import Plan
    from .plots import plot_plan
    from .runtime import init_data_parallel
    from .scan import cache_bytes, scan
    cfg = config_from_args(args)
    check_output_file(args.out, "plan output")
    check_output_file(_plot_path(args, args.out), "plot output")
    tp = args.virtual_tp or cfg.tp_size
    runner = build_runner(cfg.model_copy(update={"spd_blocks": None}), tp, data_parallel=True,
                          data_section="calibration")
    rank, world = init_data_parallel()
    d = runner.config.calibration
    segments = segments_for(d, runner.tokenizer, rank, world)
    need = cache_bytes(runner.hf_model.config, segments.shape[0], d.seq_len, runner.config.torch_dtype, args.metric)
    if is_main_rank():
        print(f"scan: {args.method} / {args.metric}, virtual tp={tp}, {segments.shape[0]} x {d.seq_len} tokens per "
              f"rank on {world} rank(s); activation cache {need / 2**30:.2f} GiB per rank", file=sys.stderr)
    result = scan(runner.hf_model, segments, d.batch_size, args.method, args.metric, use_cache=not args.no_cache,
                  progress=is_main_rank())
    plan = Plan.from_blocks(runner.config.model, runner.hf_model.config, tp, [],
                            data={"text": d.text, "dataset": None if d.text else d.dataset, "split": d.split},
                            seq_len=d.seq_len, segments=d.max_samples, seed=d.seed, dtype=runner.config.dtype,
                            ranks=world, tp_grain_size=runner.config.tp_grain_size)
    for b in plan.blocks:
        b.sensitivity = result.sensitivity[b.index]
    plan.scan = {"method": result.method, "metric": result.metric, "baseline": result.baseline,
                 "order": result.order, "after": result.after, "seconds": result.seconds,
                 "forwards_equivalent": result.forwards_equivalent, "cached": not args.no_cache}
    if is_main_rank():
        plan.save(args.out)
        png = plot_plan(plan, _plot_path(args, args.out))
        if not args.json:
            print(f"wrote {args.out} and {png}: baseline {args.metric} {result.baseline:.4f}, "
                  f"{result.seconds:.1f} s ({result.forwards_equivalent:.1f} forward-equivalents)")
    _report(args, {"plan": args.out, "baseline": result.baseline, "sensitivity": result.sensitivity,
                   "seconds": result.seconds, "forwards_equivalent": result.forwards_equivalent}, runner)


def cmd_plan(args) -> None:
    from .evaluation import evaluate_lm
    from .inject import set_spd_blocks
    from .plan import load_plan
    from .planner import select
    from .plots import plot_plan
    from .data import segments_for
    if not args.plan:
        raise SPDInputError("plan needs --plan plan.json (written by `ds-spd scan`)")
    if args.max_ppl_increase is None:
        given = [f"--{k.replace('_', '-')}" for k in ("model", "dtype", "text", "dataset", "split", "seq_len",
                                                     "max_samples", "batch_size", "seed", "config")
                 if getattr(args, k, None) is not None]
        if given:
            raise SPDInputError(f"{', '.join(given)}: only used to validate a budget (--max-ppl-increase)")
    plan = load_plan(args.plan)
    out = args.out or args.plan
    check_output_file(out, "plan output")
    check_output_file(_plot_path(args, out), "plot output")
    measure = None
    if args.max_ppl_increase is not None:
        if args.split is None:
            args.split = "validation"  # the budget is validated on text the scan did not calibrate on
        cfg = config_from_args(args).model_copy(update={"model": args.model or plan.model, "plan": None})
        runner = build_runner(cfg, plan.tp_size, data_section="data")
        plan.check_compatible(runner.hf_model.config, plan.tp_size)
        segments = segments_for(runner.config.data, runner.tokenizer)

        def measure(blocks):
            set_spd_blocks(runner.hf_model, blocks)
            return evaluate_lm(runner.hf_model, segments, runner.config.data.batch_size, progress=False)["perplexity"]
    new = select(plan, count=args.spd_count, fraction=args.spd_fraction, thresholds=args.thresholds,
                 max_increase=args.max_ppl_increase, measure=measure)
    new.save(out)
    png = plot_plan(new, _plot_path(args, out))
    classes = {c: [b.index for b in new.blocks if b.cls == c] for c in ("ISB", "SB", "ESB")}
    summary = {"plan": out, "plot": png, "spd_blocks": new.spd_blocks, "classes": classes,
               "selection": new.selection}
    _report(args, summary)
    if not args.json:
        print(f"wrote {out} and {png}: {len(new.spd_blocks)} SPD blocks of {len(new.blocks)} "
              f"({new.selection['rule']}); " + ", ".join(f"{c} {v}" for c, v in classes.items()))
        if new.selection.get("rule") == "max_increase":
            print(f"validated: perplexity {new.selection['measured']:.3f} "
                  f"({100 * new.selection['measured_increase']:+.2f}% vs {new.selection['validation_baseline']:.3f})")


def cmd_distill(args) -> None:
    from . import recovery
    if not args.plan:
        raise SPDInputError("distill needs --plan plan.json (from `ds-spd scan` and `ds-spd plan`)")
    over = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("input_source", args.input_source),
                              ("out", args.out), ("work_dir", args.work_dir)) if v is not None}
    cfg = config_from_args(args)
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update=over)})
    run = recovery.prepare(cfg, args.plan, args.config, model=args.model, restart=args.restart)
    if run.complete:
        if is_main_rank():
            print(f"distill: {run.out} is already complete (same run, {run.settings.epochs} epochs): nothing to do",
                  file=sys.stderr)
        _report(args, {"checkpoint": run.out, "already_complete": True})
        return
    result = recovery.execute(run, progress=is_main_rank())
    runner = result.pop("runner")
    if is_main_rank() and not args.json:
        print(f"wrote {run.out}: {len(result['final_mse'])} blocks, epochs {result['epochs_trained']}, "
              f"{result['seconds']:.1f} s, {result['tokens_per_second']:.0f} block-tokens/s, "
              f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB (rank 0)")
    _report(args, result, runner)


def cmd_bench(args) -> None:
    from . import bench
    from .models import load_model
    from .plan import load_plan
    from .planner import ranking
    from .runtime import preflight
    cfg = config_from_args(args)
    order = None
    if cfg.plan:
        order = ranking(load_plan(cfg.plan))
        cfg = cfg.model_copy(update={"plan": None})
    check_output_dir(args.out, "bench output", names=bench.OUTPUT_FILES)
    preflight(cfg)
    settings = bench.BenchSettings(fractions=tuple(float(f) for f in args.fractions.split(",")),
                                   comm_paths=tuple(args.comm_paths.split(",")), prefill_len=args.prefill_len,
                                   decode_batches=tuple(int(b) for b in args.decode_batches.split(",")),
                                   decode_tokens=args.decode_tokens, repeats=args.repeats)
    model, _ = load_model(cfg.model, cfg.torch_dtype)
    result = bench.run_bench(model, cfg, settings, order, progress=is_main_rank())
    result.update({"model": cfg.model, "tp_size": cfg.tp_size, "dtype": cfg.dtype,
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})
    if is_main_rank():
        command = "OMP_NUM_THREADS=%s deepspeed --num_gpus %d --module ds_spd %s" % (
            os.environ.get("OMP_NUM_THREADS", "?"), cfg.tp_size,
            " ".join(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
        bench.write_outputs(result, command, args.out)
        if not args.json:
            print(bench.markdown(result, command))
    _report(args, {"bench": os.path.join(args.out, "bench.json"), "model": cfg.model, "tp_size": cfg.tp_size})


def cmd_prepare_model(args) -> None:
    from .models import resolve_model_path
    print(resolve_model_path(args.model))


#: Flags a command accepts through the shared argument groups but cannot honour: refused, never ignored.
NOT_APPLICABLE = {
    "scan": {"plan": "scan measures every block and writes a plan (see --out)",
             "spd_blocks": "scan measures every block", "checkpoint": "scan measures the original model's blocks"},
    "plan": {"spd_blocks": "plan chooses the blocks (--spd-count, --spd-fraction, --max-ppl-increase)",
             "checkpoint": "plan reads a scanned plan (--plan)", "virtual_tp": "plan uses the plan's tp size",
             "tp_size": "plan uses the plan's tp size"},
    "distill": {"spd_blocks": "distill trains the plan's SB/ESB blocks", "checkpoint": "distill writes one (--out)",
                "virtual_tp": "distill simulates the plan's tp size", "tp_size": "distill uses the plan's tp size",
                "batch_size": "distill's micro-batch is the DeepSpeed config's train_micro_batch_size_per_gpu"},
    "bench": {"checkpoint": "bench times the all-reduce paths; weights do not change latency",
              "virtual_tp": "bench measures real TP: run it under `deepspeed --num_gpus N --module ds_spd bench`"},
}


def refuse_not_applicable(args) -> None:
    for flag, why in NOT_APPLICABLE.get(args.command, {}).items():
        if getattr(args, flag, None) is not None:
            raise SPDInputError(f"--{flag.replace('_', '-').replace('tp-size', 'tp')} does not apply here: {why}")


COMMANDS = {"generate": cmd_generate, "eval": cmd_eval, "scan": cmd_scan, "plan": cmd_plan, "distill": cmd_distill,
            "bench": cmd_bench,
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
    return 0
