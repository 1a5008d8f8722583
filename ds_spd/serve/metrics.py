"""Prometheus metrics of a serving rank 0 (names under ``ds_spd:``, as vLLM's are under ``vllm:``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60)


class _CommCollector:
    """All-reduces by kind (attn, mlp, spd, lm_head) and forwards, read from the engine's accounting at scrape."""

    stats = None   # the engine's CommStats, once the engine is built

    def collect(self):
        if self.stats is None:
            return
        calls = CounterMetricFamily("ds_spd:allreduce_calls", "All-reduces made by the engine, by kind",
                                    labels=["kind"])
        secs = CounterMetricFamily("ds_spd:allreduce_seconds", "Wall time in all-reduces, by kind", labels=["kind"])
        for kind, n in sorted(dict(self.stats._by_kind).items()):
            calls.add_metric([kind], n)
            secs.add_metric([kind], self.stats._seconds_by_kind.get(kind, 0.0))
        yield calls
        yield secs
        yield CounterMetricFamily("ds_spd:forwards", "Model forwards (decode and prefill)", value=self.stats.forwards)


class _PrefixCollector:
    """The prefix cache's counters (ds_spd.serve.prefix_cache.PrefixCache), read at scrape (token counts, as
    vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``)."""

    cache = None   # the scheduler's PrefixCache, when the cache is on

    def collect(self):
        if self.cache is None:
            return
        c = self.cache
        yield CounterMetricFamily("ds_spd:prefix_cache_queries", "Prompt tokens admitted (looked up in the "
                                  "prefix cache)", value=c.queried)
        yield CounterMetricFamily("ds_spd:prefix_cache_hits", "Prompt tokens copied from a cached prefix instead of "
                                  "prefilled", value=c.hits)
        yield GaugeMetricFamily("ds_spd:prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since "
                                "start", value=c.hit_rate)
        yield GaugeMetricFamily("ds_spd:prefix_cache_entries", "Finished sequences held in the prefix cache's pool",
                                value=len(c.entries))


class ServeMetrics:
    def __init__(self, spd_blocks: int, num_blocks: int, tp_size: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ds_spd:requests", "Finished requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("ds_spd:prompt_tokens", "Prompt tokens received (ds_spd:prefix_cache_hits of "
                                     "them were not prefilled)", registry=r)
        self.generation_tokens = Counter("ds_spd:generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("ds_spd:num_requests_running", "Sequences holding a cache slot", registry=r)
        self.waiting = Gauge("ds_spd:num_requests_waiting", "Sequences queued for a slot (queue depth)", registry=r)
        self.steps = Counter("ds_spd:steps", "Engine steps (one plan each)", registry=r)
        self.forward = Histogram("ds_spd:model_forward_seconds", "Model forwards on rank 0 by kind (decode: one "
                                 "token for every running sequence; prefill: one prompt chunk)", ["kind"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("ds_spd:time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("ds_spd:time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("ds_spd:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("ds_spd:spd_blocks", "Decoder blocks in SPD form (one all-reduce instead of two)",
              registry=r).set(spd_blocks)
        Gauge("ds_spd:num_blocks", "Decoder blocks", registry=r).set(num_blocks)
        Gauge("ds_spd:tp_size", "Tensor-parallel size", registry=r).set(tp_size)
        self.comm = _CommCollector()
        r.register(self.comm)
        self.prefix = _PrefixCollector()
        r.register(self.prefix)
