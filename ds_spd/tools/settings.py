"""The measuring tools' settings, declared once (ds_spd.settings): the CLI generates their flags from these fields.
Light to import (no torch), so ``ds-spd --help`` stays fast."""
from __future__ import annotations

from dataclasses import dataclass

from ds_spd.settings import check_bounds, comma_list, setting


@dataclass
class BenchSettings:
    """``ds-spd bench``: what is timed, how often."""

    fractions: tuple[float, ...] = setting((0.0, 0.25, 0.5, 0.75, 1.0), "SPD fractions (of the plan's order if "
                                           "--plan)", parse=comma_list(float),
                                           check=lambda v, s: bool(v) and all(0 <= f <= 1 for f in v),
                                           bound="each in [0, 1]")
    comm_paths: tuple[str, ...] = setting(("auto", "gloo"), "all-reduce paths: auto (shared memory / NCCL), gloo",
                                          parse=comma_list(str), check=lambda v, s: bool(v) and set(v) <= {"auto", "gloo"},
                                          bound="auto, gloo")
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
