"""Prometheus metrics with vLLM's names under the `pagedinfer:` prefix, so dashboards port by a rename.

Gauges are set on the engine thread after every step; counters and histograms when a request finishes.
Each server has its own registry (no global state shared between apps)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedinfer.engine.async_engine import RequestTiming
from pagedinfer.engine.llm_engine import LLMEngine
from pagedinfer.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pagedinfer:{name}", doc, list(labels), registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"pagedinfer:{name}", doc, list(labels), registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"pagedinfer:{name}", doc, list(labels), buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(**labels)

        self.num_requests_running = gauge("num_requests_running", "Requests with sequences running.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.num_requests_swapped = gauge("num_requests_swapped", "Requests with sequences swapped to CPU.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).")
        self.num_free_blocks = gauge("num_free_blocks", "KV cache blocks without a reference.")
        self.num_total_blocks = gauge("num_total_blocks", "KV cache blocks in the pool.")
        self.num_preemptions = counter("num_preemptions", "Sequences preempted (recomputed or swapped).")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.time_per_output_token = histogram("time_per_output_token_seconds",
                                               "Mean time between output tokens, one sample a request.")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.")
        # Counters only go up: remember the engine's totals last seen, add the difference.
        self._seen = {"preemptions": 0, "queried": 0, "hits": 0}

    def record_step(self, engine: LLMEngine) -> None:
        scheduler = engine.scheduler
        running = {seq.request_id for seq in scheduler.running}
        waiting = {seq.request_id for seq in scheduler.waiting} - running  # preempted ones included
        self.num_requests_running.set(len(running))
        self.num_requests_waiting.set(len(waiting))
        self.num_requests_swapped.set(len({seq.request_id for seq in scheduler.swapped} - running))
        blocks = scheduler.block_manager
        self.num_total_blocks.set(blocks.num_blocks)
        self.num_free_blocks.set(blocks.num_free_blocks)
        self.kv_cache_usage_perc.set(1 - blocks.num_free_blocks / blocks.num_blocks)
        totals = {"preemptions": scheduler.num_preemptions, "queried": blocks.stats.queried_tokens,
                  "hits": blocks.stats.hit_tokens}
        for key, metric in (("preemptions", self.num_preemptions), ("queried", self.prefix_cache_queries),
                            ("hits", self.prefix_cache_hits)):
            metric.inc(totals[key] - self._seen[key])
        self._seen = totals

    def record_finished(self, output: RequestOutput, timing: RequestTiming) -> None:
        now = time.monotonic()
        num_generated = sum(len(completion.token_ids) for completion in output.outputs)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(num_generated)
        first_token = timing.first_token if timing.first_token is not None else now
        self.time_to_first_token.observe(first_token - timing.arrival)
        self.e2e_request_latency.observe(now - timing.arrival)
        longest = max(len(completion.token_ids) for completion in output.outputs)
        if longest > 1:
            self.time_per_output_token.observe((now - first_token) / (longest - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
