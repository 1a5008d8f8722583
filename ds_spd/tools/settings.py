"""The measuring tools' settings, declared once (ds_spd.settings): the CLI generates their flags from these fields.
Light to import (no torch), so ``ds-spd --help`` stays fast."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ds_spd.choices import COMM_PATHS
from ds_spd.settings import check_bounds, comma_list, setting


@dataclass
class BenchSettings:
    """``ds-spd bench``: what is timed, how often."""

    fractions: tuple[float, ...] = setting((0.0, 0.25, 0.5, 0.75, 1.0), "SPD fractions (of the plan's order if "
                                           "--plan)", parse=comma_list(float),
                                           check=lambda v, s: bool(v) and all(0 <= f <= 1 for f in v),
                                           bound="each in [0, 1]")
    comm_paths: tuple[str, ...] = setting(("auto", "gloo"), "all-reduce paths: auto (shared memory / NCCL), gloo",
                                          parse=comma_list(str), check=lambda v, s: bool(v) and set(v) <= set(COMM_PATHS),
                                          bound=", ".join(COMM_PATHS))
    prefill_len: int = setting(512, "prompt tokens of the timed prefill", check=lambda v, s: v >= 1, bound=">= 1")
    decode_batches: tuple[int, ...] = setting((1, 8), "batch sizes of the timed decode steps",
                                              parse=comma_list(int), check=lambda v, s: bool(v) and min(v) >= 1,
                                              bound="each >= 1")
    decode_prompt: int = setting(16, "prompt tokens before the timed decode steps", cli=False)
    decode_tokens: int = setting(16, "decode steps timed per repeat", check=lambda v, s: v >= 1, bound=">= 1")
    repeats: int = setting(5, "timed repeats (paired: every variant once per repeat)", check=lambda v, s: v >= 1,
                           bound=">= 1; an interval needs 2")
    warmup: int = setting(1, "untimed repeats first", cli=False)
    seed: int = setting(0, "seed of the random prompts", cli=False)

    def __post_init__(self):
        check_bounds(self)


@dataclass
class BenchServeSettings:
    """``ds-spd bench-serve``: servers started side by side, or one running server (``url``), and the load."""

    url: Optional[str] = setting(None, "benchmark this running server instead of starting servers")
    api_key: Optional[str] = setting(None, "with --url: the server's API key (default: $DS_SPD_API_KEY, else "
                                     "$OPENAI_API_KEY)", env=("DS_SPD_API_KEY", "OPENAI_API_KEY"), secret=True)
    backend: str = setting("auto", "with --url: the request form; auto: the first the server accepts (token ids + "
                           "ignore_eos, ...); openai: text prompts, no extensions (the same requests for different "
                           "servers)", choices=("auto", "full", "openai"),
                           check=lambda v, s: v == "auto" or s.url is not None,
                           refusal="--backend chooses the request form for a running server: it needs --url")
    engines: Optional[str] = setting(None, "servers to start: tp, plan (the --plan/--checkpoint blocks), all (every "
                                     "block SPD), eager (tp with serve --enforce-eager); default tp,plan with a "
                                     "plan or checkpoint, else tp,all")
    paths: str = setting("shm,gloo", "all-reduce paths: shm, gloo, 2hosts (two simulated hosts)")
    rates: str = setting("1,4,inf", "request rates (Poisson arrivals per second; inf: all at once)")
    concurrency: str = setting("", "more loads: all at once with at most this many in flight, e.g. 1,8")
    num_requests: int = setting(16, "requests per load", check=lambda v, s: v >= 1, bound=">= 1")
    prompt_len: str = setting("32,256", "prompt lengths in tokens, uniform in MIN,MAX")
    output_len: int = setting(32, "tokens generated per request (end-of-sequence ignored)",
                              check=lambda v, s: v >= 1, bound=">= 1")
    repeats: int = setting(3, "repeats of every load (paired by repeat)", check=lambda v, s: v >= 1, bound=">= 1")
    bench_seed: int = setting(0, "seed of the prompts, their lengths and the arrivals")
    corpus: str = setting("shakespeare", "shipped corpus the prompts are cut from (its test split; every repeat "
                          "and load gets prompts of its own, so a prefix cache cannot answer one from another: "
                          "pydoc's split holds about 30 prompts of 256 tokens)")
    out: str = setting("runs/bench_serve", "directory for bench_serve.json, .md and .png")

    def __post_init__(self):
        check_bounds(self)
