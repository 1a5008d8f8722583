"""``ds-spd serve``: a resident TP + SPD engine behind the OpenAI-compatible API, every rank in lockstep.

One launch starts every rank (deepspeed launcher, torchrun, ``launch/node.sh`` across hosts; or one process in
virtual TP). Order of events, so that a bad start fails fast and with a message:

1. every rank resolves the run (config, model, plan or checkpoint, tp size: ds_spd.run);
2. rank 0 binds the HTTP port: a port in use is an error on every rank before any weight loads;
3. rank 0 starts HTTP at once (``/health`` answers 503 "loading" while the weights load);
4. every rank builds the same engine as ``eval``/``generate`` (sharded loading, checkpoint overlay, ``--comm``);
5. rank 0 runs the engine loop (ds_spd.serve.engine) and sends one plan per step to the others
   (ds_spd.serve.channel), which run the same forwards and never sample or wait inside a collective for requests.

Shutdown: SIGTERM or Ctrl-C on rank 0 stops accepting (``/health`` 503 "draining"), lets running requests
finish for ``--shutdown-timeout`` seconds, cancels the rest, tells the other ranks to stop and exits 0 (a
second signal, more than :data:`SAME_STOP` seconds after the first, cancels at once: the copies a launcher
forwards right after a Ctrl-C are the same stop). The other ranks ignore SIGINT/SIGTERM (Ctrl-C reaches the
whole process group; rank 0 decides) and exit on its stop message, or at once if rank 0 disappears. Rank 0
also drains when the deepspeed runner that started it goes away (SIGTERM to the runner kills it without
passing the signal on). Supervisors should run ``launch/tp.sh`` (ds_spd.launch): it passes SIGTERM/SIGINT to
the ranks and exits with their status. If any other rank dies, rank 0 fails
every pending request with 503, answers ``/health`` with 503, and exits after ``--exit-linger`` seconds; the
launcher then ends the rest. Nothing is left in /dev/shm: the shared-memory all-reduce buffers' names are
removed as soon as every rank has mapped them (ds_spd.core.comm).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time

from ds_spd.errors import SPDInputError
from ds_spd.serve.settings import ServeSettings
from ds_spd.ports import bind_http
from ds_spd.serve.engine import Engine, Shutdown, follow


#: signals this close together (seconds) are one stop request: Ctrl-C reaches the launcher and rank 0 at once,
#: and DeepSpeed's launcher answers its copy with a SIGTERM to every rank right after
SAME_STOP = 2.0


def _loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log(text: str) -> None:
    print(f"ds-spd serve: {text}", file=sys.stderr, flush=True)


def _broadcast_object(obj):
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def served_name(model: str, given: str | None) -> str:
    if given:
        return given
    from ds_spd.models.loading import embedded
    if embedded(model) is not None:
        return embedded(model).name
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def serve(spec, settings: ServeSettings) -> None:
    """Run the server of a resolved run (ds_spd.run.RunSpec) until it is stopped."""
    rank = int(os.environ.get("RANK", "0"))
    world = 1 if spec.virtual else spec.world
    limit = getattr(spec.model_config, "max_position_embeddings", None) or 2048
    if settings.max_model_len is None:
        settings = dataclasses.replace(settings, max_model_len=min(2048, limit))
    elif settings.max_model_len > limit:
        raise SPDInputError(f"--max-model-len {settings.max_model_len} exceeds the model's {limit} positions")
    if world > 1:
        from ds_spd.core.comm import init_comm
        init_comm()   # the process group, so every rank learns whether rank 0 could bind
    sock, err = None, None
    if rank == 0:
        try:
            sock = bind_http(settings.host, settings.port)
        except SPDInputError as e:
            err = str(e)
    if world > 1:
        err = _broadcast_object(err)
    if err:
        raise SPDInputError(err)
    if rank == 0:
        _serve_rank0(spec, settings, sock, world)
    else:
        _serve_other(spec, settings, rank)


# ---------------------------------------------------------------- rank 0
def _engine(spec, settings: ServeSettings):
    """The run's engine (the same as eval's and generate's) and the step executor over it, on any rank."""
    from ds_spd.build import build_runner
    from ds_spd.serve.executor import StepExecutor
    runner = build_runner(spec)
    executor = StepExecutor(runner.hf_model, runner.device, settings.max_seqs, settings.max_model_len,
                            _pool_slots(spec, settings, runner.hf_model.dtype.itemsize),
                            compiled=not settings.enforce_eager)
    executor.log_tokens = settings.token_log is not None
    executor.warm_up()   # every rank, before any plan: the graphs compile in lockstep
    return runner, executor


def _pool_slots(spec, settings: ServeSettings, element_size: int) -> int:
    """The prefix cache's pool slots within ``--prefix-cache-gb`` (the same on every rank: from the config)."""
    from ds_spd.serve.prefix_cache import pool_slots, slot_bytes
    if settings.no_prefix_cache:
        return 0
    one = slot_bytes(spec.layout, spec.model_config.num_hidden_layers, spec.virtual, settings.max_model_len,
                     element_size, lagged=len(spec.spd_blocks) if spec.lag else 0,
                     hidden=spec.model_config.hidden_size)
    return pool_slots(settings.prefix_cache_gb, one)


def _serve_rank0(spec, settings: ServeSettings, sock, world: int) -> None:
    import uvicorn

    from ds_spd.models.loading import load_tokenizer
    from ds_spd.serve.app import build_app
    from ds_spd.serve.state import ServeState
    from ds_spd.serve.metrics import ServeMetrics

    tokenizer = load_tokenizer(spec.config.model)
    metrics = ServeMetrics(len(spec.spd_blocks), spec.model_config.num_hidden_layers, spec.tp_size)
    state = ServeState(served_name(spec.config.model, settings.model_name), tokenizer, settings.max_model_len,
                       metrics, settings.max_seqs, settings.max_queue)
    app = build_app(state, settings.api_key, settings.max_request_bytes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ds-spd-http", daemon=True)
    http.start()
    host, port = sock.getsockname()[:2]
    _log(f"listening on http://{host}:{port} (loading the model; /health answers 503 until ready)")
    if settings.api_key is None and not _loopback(settings.host):
        _log(f"WARNING: {settings.host} is reachable from other machines and no API key is set: anyone who "
             "reaches the port can use the model (set DS_SPD_API_KEY or --api-key)")

    shutdown = Shutdown(settings.shutdown_timeout, SAME_STOP)

    def on_signal(signum, _frame):
        if state.status == "loading":   # nothing to drain: do not make the user wait for the weights
            _log(f"{signal.Signals(signum).name} while loading: exiting")
            raise SystemExit(128 + signum)
        if not shutdown.request(time.monotonic()):
            return   # a copy of the same stop (launcher forwarding a Ctrl-C): not the "stop now" signal
        if state.status == "ready":
            state.status = "draining"
        then = "now" if shutdown.signals > 1 else \
            f"running requests get {settings.shutdown_timeout:g} s; signal again to stop now"
        _log(f"{signal.Signals(signum).name}: stopping ({then})")
        state.inbox.put(("wake", None))   # an idle loop's wait on the inbox does not return on a signal by itself
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _watch_runner()

    runner, executor = _engine(spec, settings)   # a signal meanwhile exits at once (on_signal)
    metrics.comm.stats = runner.stats
    from ds_spd.serve.scheduler import Scheduler
    sender = None
    closing = threading.Event()
    if world > 1:
        from ds_spd.serve.channel import PlanSender
        sender = PlanSender(world, _broadcast_object)

        def on_death(dead_rank: int) -> None:
            if closing.is_set():
                return
            state.status = "dead"
            failed = state.fail_all(503, f"tensor-parallel rank {dead_rank} died; the server is shutting down")
            _log(f"rank {dead_rank} died: failed {failed} pending request(s); exiting in {settings.exit_linger:g} s")
            threading.Timer(settings.exit_linger, lambda: os._exit(1)).start()
        sender.watch(on_death)
    eos = _eos_ids(tokenizer, runner.hf_model)
    from ds_spd.serve.prefix_cache import PrefixCache
    pool = executor.cache.spare
    cache = None if settings.no_prefix_cache else PrefixCache(settings.max_seqs, pool)
    metrics.prefix.cache = cache
    sched = Scheduler(tokenizer, eos, settings.max_seqs, settings.max_model_len, settings.max_step_tokens, cache,
                      granule=executor.cache.copy_granule)
    state.status = "ready"
    mode = "virtual" if spec.virtual else "real"
    decode = "eager decode" if executor.compiled is None else \
        f"compiled decode ({executor.warm_up_seconds:.0f} s to compile)"
    _log(f"ready on http://{host}:{port}: model '{state.model_name}', {mode} TP {spec.tp_size}, "
         f"SPD blocks {list(spec.spd_blocks) or 'none'} of {spec.model_config.num_hidden_layers}, "
         f"{settings.max_seqs} sequences x {settings.max_model_len} tokens, prefix cache "
         f"{'off' if cache is None else f'on ({pool} finished sequences)'}, "
         f"{decode}, loaded in {runner.load_seconds:.1f} s")
    try:
        Engine(state, sched, executor, sender, metrics, shutdown, _log).run()
    except Exception:
        if state.status == "dead":   # a peer died mid-step: the monitor is failing requests and exits
            while True:
                time.sleep(60)
        state.fail_all(500, "the engine failed; see the server log")
        raise
    finally:
        closing.set()
        if state.status != "dead":
            state.fail_all(503, "the server stopped")
        server.should_exit = True
    http.join(timeout=5)
    _write_token_log(settings, 0, executor)
    _log("stopped")


def _watch_runner() -> None:
    """SIGTERM to the deepspeed runner kills it without passing the signal on (on one node it installs no handler),
    leaving its launcher and the ranks serving, orphaned. Rank 0 watches the runner and stops as if signalled."""
    import psutil
    try:
        runner = next((p for p in psutil.Process().parents()
                       if any("deepspeed.launcher.runner" in a or a.endswith("/deepspeed") for a in p.cmdline())), None)
    except psutil.Error:
        runner = None
    if runner is None:
        return

    def watch():
        while runner.is_running():
            time.sleep(0.5)
        _log("the deepspeed runner that started this server is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="ds-spd-runner-watch", daemon=True).start()


def _eos_ids(tokenizer, model) -> set[int]:
    """The tokens that end a sequence: the model's generation config's (as ``generate`` uses), else the tokenizer's."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen is None:
        gen = tokenizer.eos_token_id
    return set(gen if isinstance(gen, (list, tuple)) else [] if gen is None else [gen])


# ---------------------------------------------------------------- the other ranks
def _serve_other(spec, settings: ServeSettings, rank: int) -> None:
    from ds_spd.serve.channel import PlanReceiver
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # rank 0 decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _, executor = _engine(spec, settings)

    def on_death() -> None:
        _log(f"rank {rank}: rank 0 is gone; exiting")
        os._exit(1)
    follow(PlanReceiver(rank, _broadcast_object, on_death), executor)
    _write_token_log(settings, rank, executor)


def _write_token_log(settings: ServeSettings, rank: int, executor) -> None:
    if settings.token_log is None:
        return
    os.makedirs(settings.token_log, exist_ok=True)
    with open(os.path.join(settings.token_log, f"tokens_rank{rank}.json"), "w") as f:
        json.dump(executor.fed, f)
