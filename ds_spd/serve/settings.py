"""``ds-spd serve``'s settings, declared once (ds_spd.settings): the CLI generates its flags from these fields, the
server reads them. Light to import (no torch), so ``ds-spd --help`` stays fast."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ds_spd.settings import check_bounds, setting


@dataclass(frozen=True)
class ServeSettings:
    """Every ``serve`` setting, declared once: the flags are generated from these fields (ds_spd.settings)."""

    host: str = setting("127.0.0.1", "address rank 0 listens on (0.0.0.0: every interface)")
    port: int = setting(8000, "HTTP port (0: any free port, printed at start)", check=lambda v, s: 0 <= v <= 65535,
                        bound="0-65535")
    model_name: Optional[str] = setting(None, "the model name clients send (default: the model directory's name)",
                                        flag="--served-model-name")
    max_seqs: int = setting(8, "sequences in the running batch (KV-cache slots)", check=lambda v, s: v >= 1,
                            bound=">= 1")
    max_model_len: Optional[int] = setting(None, "tokens per sequence, prompt and completion (default: 2048 or the "
                                           "model's limit if lower)", check=lambda v, s: v is None or v >= 2,
                                           bound=">= 2", parse=int)
    max_step_tokens: int = setting(2048, "tokens per engine step: one per running sequence, the rest prefill (a "
                                   "longer prompt is prefilled in chunks across steps)",
                                   check=lambda v, s: v > s.max_seqs, bound="more than --max-seqs")
    prefix_cache_gb: float = setting(1.0, "GiB of KV per rank that keeps finished sequences for prefix reuse, least "
                                     "recently used evicted first (0: only running sequences' prefixes are reused)",
                                     check=lambda v, s: v >= 0, bound=">= 0")
    no_prefix_cache: bool = setting(False, "prefill every prompt from its first token (the n choices of one prompt "
                                    "still share its prefill)")
    enforce_eager: bool = setting(False, "decode steps eager (as prefill): no torch.compile, which otherwise runs "
                                  "them as two graphs with dynamic shapes (one row; several), compiled before the "
                                  "server is ready (its ready line says how long that took)")
    shutdown_timeout: float = setting(10.0, "after SIGTERM / Ctrl-C, seconds running requests may take to finish",
                                      check=lambda v, s: v >= 0, bound=">= 0")
    exit_linger: float = setting(2.0, "after a rank died, seconds rank 0 answers 503 before it exits",
                                 check=lambda v, s: v >= 0, bound=">= 0")
    token_log: Optional[str] = setting(None, "at exit, every rank writes the tokens it ran per sequence",
                                       metavar="DIR")
    api_key: Optional[str] = setting(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $DS_SPD_API_KEY; "
                                     "prefer the variable: a flag shows in ps)", env=("DS_SPD_API_KEY",), secret=True,
                                     check=lambda v, s: v is None or bool(v.strip()), bound="not empty")
    max_request_mb: float = setting(4.0, "request bodies over this many MiB get 413 before they are read whole",
                                    check=lambda v, s: v > 0, bound="> 0")
    max_queue: int = setting(256, "sequences that may wait for a slot; beyond, requests get 429 with Retry-After",
                             check=lambda v, s: v >= 0, bound=">= 0")

    def __post_init__(self):
        check_bounds(self)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)
