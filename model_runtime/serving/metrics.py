"""The runtime's Prometheus metrics: the one place their names, labels and buckets are defined.

Every series carries the label `model_name` (the served model name). Request-level series
(latencies, token counts, outcomes) are recorded by the server as requests finish; engine-level
series (running / waiting requests, KV cache use and capacity, prefix cache lookups and hits in
tokens, tokens routed to each expert) are read from the engine front's `stats()` at scrape time,
so they are never stale and cost nothing between scrapes.

Failures: `moe_request_failure_total{reason}` counts requests that did not finish, with `reason`
one of FAILURE_REASONS. A rollout's error rate is failures with a server-side reason
(SERVER_FAILURE_REASONS) over all finished requests:

    sum(rate(moe_request_failure_total{reason=~"internal|injected|timeout|overloaded"}[1m]))
    / (sum(rate(moe_request_success_total[1m])) + sum(rate(moe_request_failure_total[1m])))
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Names (the runtime contract; the operator's alert rules and analysis query these).
TIME_TO_FIRST_TOKEN = "moe_time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "moe_inter_token_latency_seconds"
E2E_REQUEST_LATENCY = "moe_e2e_request_latency_seconds"
NUM_REQUESTS_RUNNING = "moe_num_requests_running"
NUM_REQUESTS_WAITING = "moe_num_requests_waiting"
KV_CACHE_USAGE = "moe_kv_cache_usage_perc"
PROMPT_TOKENS = "moe_prompt_tokens_total"
GENERATION_TOKENS = "moe_generation_tokens_total"
REQUEST_SUCCESS = "moe_request_success_total"
REQUEST_FAILURE = "moe_request_failure_total"
EXPERT_TOKENS = "moe_expert_tokens_total"
WEIGHT_BYTES = "moe_weight_bytes"
KV_CACHE_CAPACITY_TOKENS = "moe_kv_cache_capacity_tokens"
PREFIX_CACHE_QUERIES = "moe_prefix_cache_queries_total"
PREFIX_CACHE_HITS = "moe_prefix_cache_hits_total"

# Why a request failed. `invalid_request` and `cancelled` are the client's doing.
FAILURE_REASONS = (
    "invalid_request",
    "overloaded",
    "timeout",
    "injected",
    "internal",
    "cancelled",
    "unavailable",
)
SERVER_FAILURE_REASONS = ("internal", "injected", "timeout", "overloaded")

# Buckets for LLM serving: first tokens from milliseconds (small models, warm GPU) to a minute
# (long prompts under load); gaps between tokens from a millisecond to seconds; whole requests
# up to ten minutes.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
E2E_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


class EngineStatsCollector(Collector):
    """Gauges and the expert routing counter, read from the engine when Prometheus scrapes."""

    def __init__(self, model_name: str, stats: Callable[[], Any]):
        self.model_name = model_name
        self.stats = stats  # returns EngineStats, or None while the model is loading

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        running = GaugeMetricFamily(
            NUM_REQUESTS_RUNNING, "Requests in the running batch.", labels=["model_name"]
        )
        waiting = GaugeMetricFamily(
            NUM_REQUESTS_WAITING, "Requests waiting to be scheduled.", labels=["model_name"]
        )
        kv = GaugeMetricFamily(
            KV_CACHE_USAGE, "Fraction of KV cache blocks in use (0..1).", labels=["model_name"]
        )
        experts = CounterMetricFamily(
            EXPERT_TOKENS,
            "Tokens routed to each expert of each MoE layer.",
            labels=["model_name", "layer", "expert"],
        )
        weights = weight_bytes_family()
        capacity = GaugeMetricFamily(
            KV_CACHE_CAPACITY_TOKENS,
            "Tokens the KV cache holds (blocks x block size), as sized at start.",
            labels=["model_name"],
        )
        prefix_queries = CounterMetricFamily(
            PREFIX_CACHE_QUERIES,
            "Prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries).",
            labels=["model_name"],
        )
        prefix_hits = CounterMetricFamily(
            PREFIX_CACHE_HITS,
            "Prompt tokens found in the prefix cache, whose keys/values were not computed again.",
            labels=["model_name"],
        )
        if stats is not None:
            prefix_queries.add_metric([self.model_name], getattr(stats, "prefix_cache_queries", 0))
            prefix_hits.add_metric([self.model_name], getattr(stats, "prefix_cache_hits", 0))
            if getattr(stats, "kv_capacity_tokens", 0):
                capacity.add_metric([self.model_name], stats.kv_capacity_tokens)
            for rank, n in sorted((getattr(stats, "weight_bytes", None) or {}).items()):
                weights.add_metric([self.model_name, str(rank)], n)
            running.add_metric([self.model_name], stats.num_running)
            waiting.add_metric([self.model_name], stats.num_waiting)
            kv.add_metric([self.model_name], stats.kv_cache_usage)
            for layer, counts in sorted((stats.expert_tokens or {}).items()):
                for expert, count in enumerate(counts):
                    experts.add_metric([self.model_name, str(layer), str(expert)], count)
        else:
            for family in (running, waiting, kv, prefix_queries, prefix_hits):
                family.add_metric([self.model_name], 0)
        yield from (running, waiting, kv, experts, weights, capacity, prefix_queries, prefix_hits)

    def describe(self) -> list[Metric]:
        return []


def weight_bytes_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        WEIGHT_BYTES,
        "Bytes of model weights each of this pod's ranks holds (a tensor/expert parallel rank: its share).",
        labels=["model_name", "rank"],
    )


class RankMetrics:
    """A follower pod's /metrics: its ranks' weight bytes and the process's own series (it serves
    no requests: rank 0's pod reports those)."""

    def __init__(self, model_name: str, weight_bytes: Callable[[], dict[int, int]]):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_WeightBytes(model_name, weight_bytes))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _WeightBytes(Collector):
    def __init__(self, model_name: str, weight_bytes: Callable[[], dict[int, int]]):
        self.model_name, self.weight_bytes = model_name, weight_bytes

    def collect(self) -> Iterator[Metric]:
        family = weight_bytes_family()
        for rank, n in sorted(self.weight_bytes().items()):
            family.add_metric([self.model_name, str(rank)], n)
        yield family

    def describe(self) -> list[Metric]:
        return []


class LatencyHistogram(Collector):
    """A histogram observed on the event loop, per token: a list of bucket counts, no lock
    (prometheus_client's Histogram takes a lock and two counter updates per observation, a
    tenth of the loop's time per streamed token)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], model_name: str):
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.model_name = model_name
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bucket with value <= le
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric([self.model_name], buckets, self.sum)
        yield family

    def describe(self) -> list[Metric]:
        return []


class RuntimeMetrics:
    """One server's metrics in its own registry (no process-wide globals)."""

    def __init__(self, model_name: str, engine_stats: Callable[[], Any] = lambda: None):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(EngineStatsCollector(model_name, engine_stats))
        label = ["model_name"]
        self.ttft = LatencyHistogram(
            TIME_TO_FIRST_TOKEN, "Time from arrival to the first generated token.", TTFT_BUCKETS, model_name
        )
        self.itl = LatencyHistogram(
            INTER_TOKEN_LATENCY, "Time between consecutive generated tokens.", ITL_BUCKETS, model_name
        )
        self.e2e = LatencyHistogram(
            E2E_REQUEST_LATENCY,
            "Time from arrival to the last token of a finished request.",
            E2E_BUCKETS,
            model_name,
        )
        for histogram in (self.ttft, self.itl, self.e2e):
            self.registry.register(histogram)
        self.prompt_tokens = Counter(
            PROMPT_TOKENS.removesuffix("_total"),
            "Prompt tokens of finished requests.",
            label,
            registry=self.registry,
        ).labels(model_name)
        self.generation_tokens = Counter(
            GENERATION_TOKENS.removesuffix("_total"), "Generated tokens.", label, registry=self.registry
        ).labels(model_name)
        self._success = Counter(
            REQUEST_SUCCESS.removesuffix("_total"),
            "Requests that finished.",
            label + ["finished_reason"],
            registry=self.registry,
        )
        self._failure = Counter(
            REQUEST_FAILURE.removesuffix("_total"),
            "Requests that did not finish, by reason.",
            label + ["reason"],
            registry=self.registry,
        )
        for reason in FAILURE_REASONS:  # every series exists from the start, so rate() works at once
            self._failure.labels(model_name, reason)
        for finished_reason in ("stop", "length"):
            self._success.labels(model_name, finished_reason)

    def request_succeeded(self, finished_reason: str) -> None:
        self._success.labels(self.model_name, finished_reason or "stop").inc()

    def request_failed(self, reason: str) -> None:
        assert reason in FAILURE_REASONS, reason
        self._failure.labels(self.model_name, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
