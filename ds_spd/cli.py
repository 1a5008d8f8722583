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

from ds_spd.choices import COMM_PATHS, DTYPES, LOAD_MODES, SCAN_METHODS
from ds_spd.config import DistillConfig, ScanConfig, resolve_spd_config
from ds_spd.errors import SPDInputError
from ds_spd.outputs import check_output_dir, check_output_file
from ds_spd.ranks import is_main_rank, same_build_tools
from ds_spd.settings import add_flags, from_args


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


#: The flags commands share, by dest: (flag, argparse keywords). Each command offers only the ones it honours
#: (HONOURS); argparse refuses the rest by name.
MODEL_FLAGS: dict[str, tuple[str, dict]] = {
    "config": ("--config", {"help": "DeepSpeed JSON config with an \"spd\" section"}),
    "model": ("--model", {"help": "'default' (embedded SmolLM2-135M), 'gemma3-270m' (embedded Gemma 3 270M), a local "
                                  "HF directory or a hub id"}),
    "tp_size": ("--tp", {"type": int, "help": "tensor-parallel size (must equal the ranks started)"}),
    "spd_blocks": ("--spd-blocks", {"type": parse_blocks, "help": "blocks in SPD form, e.g. 3,4,27 or 15-29"}),
    "plan": ("--plan", {"help": "plan.json choosing the SPD blocks"}),
    "checkpoint": ("--checkpoint", {"help": "SPD checkpoint dir from `ds-spd distill` (distilled blocks and their "
                                            "plan)"}),
    "dtype": ("--dtype", {"choices": DTYPES}),
    "comm": ("--comm", {"choices": COMM_PATHS, "help": "real TP's all-reduce path: auto (DeepSpeed's inference "
                                                       "all-reduce: shm on CPU, NCCL on CUDA) or gloo"}),
    "load": ("--load", {"choices": LOAD_MODES, "help": "real TP weights: sharded (default; each rank reads only its "
                                                       "slices from safetensors) or full (every rank loads the whole "
                                                       "model, then AutoTP shards it)"}),
    "virtual_tp": ("--virtual-tp", {"type": int, "metavar": "N",
                                    "help": "simulate TP of size N in one process (no launcher), same SPD math"}),
    "json": ("--json", {"action": "store_true", "help": "print one JSON object as the last line of stdout"}),
}
DATA_FLAGS: dict[str, tuple[str, dict]] = {
    "text": ("--text", {"nargs": "+", "help": "local text file(s)"}),
    "dataset": ("--dataset", {"help": "shipped corpus (pydoc, shakespeare, docstrings) or hub dataset name[:config]"}),
    "split": ("--split", {"help": "train, validation or test"}),
    "seq_len": ("--seq-len", {"type": int}),
    "max_samples": ("--max-samples", {"type": int}),
    "batch_size": ("--batch-size", {"type": int}),
    "seed": ("--seed", {"type": int, "help": "draw random segments with this seed (else the first ones)"}),
}
_REAL = ("comm", "load")             # real TP only
_MODEL = ("config", "model", "dtype")
#: per command: the shared flags it honours (scan, plan and distill run virtual TP of the plan's or --tp's size)
HONOURS: dict[str, tuple[str, ...]] = {
    "generate": (*MODEL_FLAGS,),
    "eval": (*MODEL_FLAGS, *DATA_FLAGS),
    "scan": (*_MODEL, "tp_size", "checkpoint", "virtual_tp", "json", *DATA_FLAGS),
    "plan": (*_MODEL, "plan", "checkpoint", "json", *DATA_FLAGS),
    "distill": (*_MODEL, "plan", "json", *(d for d in DATA_FLAGS if d != "batch_size")),  # micro-batch: DeepSpeed's
    "bench": (*_MODEL, "tp_size", "spd_blocks", "plan", "json"),
    "serve": tuple(d for d in MODEL_FLAGS if d != "json"),
    "bench-serve": (*_MODEL, "tp_size", "plan", "checkpoint"),
}
#: which config section a command's data flags override
DATA_SECTION = {"scan": "calibration", "distill": "calibration"}


def _shared(p: argparse.ArgumentParser, command: str) -> None:
    """The shared flags ``command`` honours; the others it does not offer read as None (or False)."""
    honours = HONOURS[command]
    section = DATA_SECTION.get(command, "data")
    for title, flags in ((None, MODEL_FLAGS), (f"data (override the config's spd.{section})", DATA_FLAGS)):
        offered = [d for d in flags if d in honours]
        g = p.add_argument_group(title or "model and SPD (override the config file)") if offered else None
        for dest in offered:
            flag, kwargs = flags[dest]
            (p if dest == "json" else g).add_argument(flag, dest=dest, **kwargs)
    p.set_defaults(data_section=section, **{d: (False if d == "json" else None)
                                            for d in (*MODEL_FLAGS, *DATA_FLAGS) if d not in honours})


def _section_flags(p: argparse.ArgumentParser, section: type) -> None:
    """One flag per field of a config section (ds_spd.config's ScanConfig, DistillConfig): ``--field-name``,
    its type, choices and help from the field, default None so the config (or the model's recipe) applies."""
    import typing
    choices = getattr(section, "CHOICES", {})
    g = p.add_argument_group(f"the config's spd.{section.SECTION} (flags override)")
    for name, field in section.model_fields.items():
        kind = next((t for t in typing.get_args(field.annotation) if t is not type(None)), field.annotation)
        flag = "--" + name.removesuffix("_gb").replace("_", "-")
        if kind is bool:   # --field / --no-field set it; absent, the config (or recipe) does
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=field.description)
            continue
        extra = {"metavar": "GB"} if name.endswith("_gb") else {}
        g.add_argument(flag, dest=name, type=kind, choices=choices.get(name), help=field.description, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-spd", description="Sync-Point Drop for tensor-parallel inference")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="greedy generation with KV cache")
    _shared(gen, "generate")
    gen.add_argument("--prompt", nargs="+", default=["The tensor-parallel model says"])
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    ev = sub.add_parser("eval", help="perplexity and next-token accuracy")
    _shared(ev, "eval")
    sc = sub.add_parser("scan", help="block sensitivity scan (virtual TP) -> plan.json")
    _shared(sc, "scan")
    _section_flags(sc, ScanConfig)
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
    _shared(pl, "plan")
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
    _shared(di, "distill")
    _section_flags(di, DistillConfig)
    di.add_argument("--restart", action="store_true",
                    help="discard the work dir's training state (of another run) and start over")
    be = sub.add_parser("bench", help="latency: DeepSpeed AutoTP vs ds_spd at SPD fractions, shm and gloo paths")
    _shared(be, "bench")
    from ds_spd.tools.settings import BenchSettings
    add_flags(be.add_argument_group("benchmark"), BenchSettings)
    be.add_argument("--out", default="runs/bench", help="directory for bench.json, bench.png, bench.md")
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server on a resident TP + SPD engine (continuous batching)")
    _shared(sv, "serve")
    from ds_spd.serve.settings import ServeSettings
    add_flags(sv.add_argument_group("server"), ServeSettings)
    bs = sub.add_parser("bench-serve", help="serving benchmark (vLLM-style): TP vs SPD servers side by side, or one "
                                            "running server (--url)")
    _shared(bs, "bench-serve")
    from ds_spd.tools.settings import BenchServeSettings
    add_flags(bs.add_argument_group("serving benchmark"), BenchServeSettings)
    prep = sub.add_parser("prepare-model", help="convert and cache the embedded default model")
    prep.add_argument("--model", default="default")
    return parser


#: the config sections whose every field is a flag of the command of the same name
SECTIONS = {"scan": ScanConfig, "distill": DistillConfig}


def config_from_args(args: argparse.Namespace, **given):
    """The command's config: the config file, then the model's recipe, then the flags (``given`` replaces flags)."""
    flags = {**vars(args), **given}
    data = {k: flags[k] for k in DATA_FLAGS}
    sections = {args.command: {k: flags.get(k) for k in SECTIONS[args.command].model_fields}} \
        if args.command in SECTIONS else {}
    return resolve_spd_config(flags["config"], model=flags["model"], tp_size=flags["tp_size"],
                              spd_blocks=flags["spd_blocks"], plan=flags["plan"], checkpoint=flags["checkpoint"],
                              dtype=flags["dtype"], comm=flags["comm"], load=flags["load"], data=data,
                              data_section=args.data_section, **sections)


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
    from ds_spd.stages import scan_run
    from ds_spd.tools.plots import plot_plan
    png = check_output_file(_plot_path(args, check_output_file(args.out, "plan output")), "plot output")
    _hold(args.out, "plan output")
    run = scan_run.prepare(config_from_args(args), args.out, checkpoint=args.checkpoint,
                           in_memory=args.in_memory, no_cache=args.no_cache, last=args.last,
                           activation_budget_gb=args.activation_budget_gb, virtual_tp=args.virtual_tp,
                           split_given=args.split is not None, config_path=args.config)
    report = scan_run.execute(run, progress=is_main_rank())
    plan, result, runner = report.plan, report.result, report.runner
    if is_main_rank():
        plan.save(args.out)
        plot_plan(plan, png)
    _say(args, f"wrote {args.out} and {png}: baseline {run.metric} {result.baseline:.4f}, {result.seconds:.1f} s "
               f"({result.forwards_equivalent:.1f} forward-equivalents)")
    _report(args, {"plan": args.out, "method": result.method, "ranking": "distilled" if run.kind == "distilled"
                   else run.cfg.scan.ranking, "metric": run.metric, "head_dtype": plan.scan["head_dtype"],
                   "baseline": result.baseline, "sensitivity": result.sensitivity, "seconds": result.seconds,
                   "forwards_equivalent": result.forwards_equivalent, "streamed": runner is None, **result.extra}, runner)


def cmd_plan(args) -> None:
    from ds_spd.plan import load_plan
    from ds_spd.stages.planner import select, validation_measure
    from ds_spd.tools.plots import plot_plan
    plan = load_plan(args.plan)
    out = check_output_file(args.out or args.plan, "plan output")
    png = check_output_file(_plot_path(args, out), "plot output")
    _hold(out, "plan output")
    measure = None
    if args.max_ppl_increase is not None:   # validated on text the scan did not calibrate on
        measure = validation_measure(config_from_args(args, split=args.split or "validation", checkpoint=None,
                                                      plan=None, model=args.model or plan.model),
                                     plan, args.checkpoint)
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
    from ds_spd.plan import load_plan
    from ds_spd.stages.distill import run as distill_run
    model = args.model or load_plan(args.plan).model   # the recipe is the trained model's, not the default's
    cfg = config_from_args(args, model=model)
    run = distill_run.prepare(cfg, args.plan, args.config, model=model, restart=args.restart)
    if run.complete:
        if is_main_rank():
            print(f"distill: {run.out} is already complete (same run, {run.settings.epochs} epochs): nothing to do",
                  file=sys.stderr)
        return _report(args, {**run.recorded(), "checkpoint": run.out, "already_complete": True})
    if is_main_rank():
        for line in distill_run.untrained_note(run.plan):
            print(f"distill: {line}", file=sys.stderr, flush=True)
    report = distill_run.execute(run, progress=is_main_rank())
    _say(args, f"wrote {run.out}: {len(report.final_mse)} blocks, epochs {report.epochs_trained}, "
               f"{report.seconds:.1f} s, {report.tokens_per_second:.0f} block-tokens/s, "
               f"peak memory {report.peak_memory_bytes / 2**30:.2f} GiB (rank 0)")
    _report(args, report.to_json(), report.runner)


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
    settings = from_args(bench.BenchSettings, args)
    command = bench.launch_command(cfg.tp_size, sys.argv[1:])
    result = bench.bench_run(spec, settings, order, args.out, command, progress=is_main_rank())
    _say(args, bench.markdown(result, command))
    _report(args, {"bench": os.path.join(args.out, "bench.json"), "model": cfg.model, "tp_size": cfg.tp_size})


def cmd_serve(args) -> None:
    from ds_spd.run import resolve_run
    from ds_spd.serve.server import serve
    from ds_spd.serve.settings import ServeSettings
    settings = from_args(ServeSettings, args)
    serve(resolve_run(config_from_args(args), virtual_tp=args.virtual_tp), settings)


def cmd_bench_serve(args) -> None:
    from ds_spd.models.loading import load_tokenizer
    from ds_spd.tools import bench_serve as bs
    from ds_spd.tools.settings import BenchServeSettings
    s = from_args(BenchServeSettings, args)
    check_output_dir(s.out, "bench-serve output", names=bs.OUTPUT_FILES)
    _hold(s.out, "bench-serve output")
    try:
        loads, (lo, hi), paths = bs.parse_loads(s.rates, s.concurrency, s.prompt_len, s.paths, s.output_len)
        model = bs.served_model(s.url, s.api_key) if s.url else None
    except (ValueError, RuntimeError) as err:
        raise SPDInputError(str(err)) from None
    cfg = None if s.url else config_from_args(args)
    try:   # the engines to start, checked before the tokenizer loads (no weights read)
        engines = None if s.url else bs.managed_engines(cfg, paths, s.engines)
    except ValueError as err:
        raise SPDInputError(str(err)) from None
    tok = load_tokenizer(args.model or "default" if s.url else cfg.model)
    # a workload per repeat and load (and one to warm managed servers up): no prompt repeats (DataError if too few)
    work = bs.make_workload(tok, s.num_requests, (lo, hi), s.output_len, s.bench_seed, s.corpus,
                            s.repeats * len(loads) + (not s.url))
    try:
        result = bs.bench_url(s.url, model, s.api_key, s.backend, tok, work, loads, s.repeats, s.bench_seed) \
            if s.url else bs.bench_side_by_side(bs.server_args(cfg, hi + s.output_len), engines, paths, loads, work,
                                                "bench", s.repeats, cfg.tp_size, s.bench_seed, progress=True)
    except RuntimeError as err:   # no request form the server at --url accepts
        raise SPDInputError(str(err)) from None
    command = "ds-spd " + " ".join(sys.argv[1:])
    bs.write_outputs(result, command, s.out)
    print(bs.markdown(result, command), f"wrote {s.out}/bench_serve.json, .md, .png", sep="\n", flush=True)


def cmd_prepare_model(args) -> None:
    from ds_spd.models.loading import resolve_model_path
    print(resolve_model_path(args.model))


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
    for flag in _REAL:
        if getattr(args, flag, None) is not None and getattr(args, "virtual_tp", None) is not None:
            raise SPDInputError(f"--{flag} does not apply with --virtual-tp: that is virtual TP in one process "
                                "(--load and --comm choose how real TP ranks load and communicate)")
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


COMMANDS = {"generate": cmd_generate, "eval": cmd_eval, "scan": cmd_scan, "plan": cmd_plan, "distill": cmd_distill,
            "bench": cmd_bench, "serve": cmd_serve, "bench-serve": cmd_bench_serve,
            "prepare-model": cmd_prepare_model}


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (the deepspeed launcher's stop signal) into a normal exit, so atexit cleanup runs."""
    import signal
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def entry() -> None:
    """The ``ds-spd`` program (``python -m ds_spd`` too): :func:`main`, then a rank of a multi-rank run that
    finished its command leaves without tearing down the interpreter: atexit handlers run, output is flushed, and
    the process exits with no C++ destructor left to run (ZeRO-3 distillation under the deepspeed launcher once
    aborted in that teardown, after its checkpoint was written: "terminate called without an active exception",
    exit 250). The process group is not destroyed either: every rank passed the final barrier."""
    import atexit
    import threading
    code = main(teardown=False)
    if _MULTI_RANK_DONE:
        for thread in threading.enumerate():   # what interpreter shutdown would wait for
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(code)
    sys.exit(code)


_MULTI_RANK_DONE = False   # set by main(teardown=False) once a multi-rank command passed its final barrier


def main(argv: list[str] | None = None, teardown: bool = True) -> int:
    """Run one ``ds-spd`` command line; the exit status. ``teardown``: destroy the process group at the end (in a
    process that goes on, e.g. a test or a notebook)."""
    global _MULTI_RANK_DONE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    same_build_tools()   # before anything can build DeepSpeed's ops
    args, unknown = build_parser().parse_known_args(argv)
    _exit_on_sigterm()
    try:
        if unknown:   # a flag another command has, or none: refused by name, in one line
            raise SPDInputError(f"unrecognized arguments: {' '.join(unknown)} (ds-spd {args.command} --help lists "
                                "the flags it honours)")
        refuse_not_applicable(args)
        COMMANDS[args.command](args)
        from ds_spd.core.comm import finish_comm
        _MULTI_RANK_DONE = finish_comm(destroy=teardown) and not teardown
    except SPDInputError as err:
        print(f"ds-spd {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        from ds_spd.locks import release
        release()
    return 0
