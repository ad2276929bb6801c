"""The autoscaler's signal: `collect(...) -> (Signal, memory)`.

By default the operator scrapes the runtime's `/metrics` on the ready, in-rotation group leaders
(rank 0: the pods the Services send to) directly, with the analysis package's parsing
(moe_operator.analysis.metrics_text); with `spec.autoscaling.prometheus.url` it asks Prometheus
instead (and metric PromQL always does). Gauges (requests running and waiting, KV-cache use) are
read as they are; TTFT's p99 comes from the histogram's deltas since the previous sample, so the
caller keeps `memory` (JSON-able: the last snapshot per pod) between samples.

Only `fetch` and `fetch_json` do I/O; tests pass their own.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ..analysis import AnalysisConfigError
from ..analysis.builtin import http_get
from ..analysis.metrics_text import TIME_TO_FIRST_TOKEN, delta, merge, quantile, snapshot
from ..analysis.prometheus import QueryRejected, fill_selector, http_get_json, scalar
from ..api import names
from ..world.observe import Observed, ObservedPod
from .decision import KV_CACHE_USAGE, PROMQL, REQUESTS_WAITING, TTFT_P99, Settings, Signal

# Gauges of model_runtime.serving.metrics (the operator does not import the runtime; a unit test checks
# that the names agree).
NUM_REQUESTS_RUNNING = "moe_num_requests_running"
NUM_REQUESTS_WAITING = "moe_num_requests_waiting"
KV_CACHE_USAGE_PERC = "moe_kv_cache_usage_perc"
_GAUGES = {NUM_REQUESTS_RUNNING: "running", NUM_REQUESTS_WAITING: "waiting", KV_CACHE_USAGE_PERC: "kv"}

# A busy runtime answers /metrics late (its engine thread holds the GIL for long stretches): allow
# for that, and scrape the pods in parallel so one slow pod does not hold the others up.
SCRAPE_TIMEOUT_SECONDS = 3.0
MAX_PARALLEL_SCRAPES = 16

# Labels as the project's Prometheus configuration writes them (pod labels, sanitised).
DEFAULT_SELECTOR = ('namespace="{namespace}",serving_moe_dev_deployment="{name}",'
                    'serving_moe_dev_in_rotation="true",serving_moe_dev_rank="0"')


def gauges(text: str) -> dict[str, float]:
    """running, waiting and kv of one pod's /metrics (summed over label sets; absent ones left out)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        key = _GAUGES.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name == family.name:
                out[key] = out.get(key, 0.0) + sample.value
    return out


def from_scrapes(metric: str, texts: Mapping[str, str], memory: Mapping[str, Any]
                 ) -> tuple[Signal, dict[str, Any]]:
    """Pure: the signal from the /metrics texts of the serving leaders (pod uid -> text)."""
    per_pod = {uid: gauges(text) for uid, text in texts.items()}
    groups = len(per_pod)
    if not groups:
        return Signal(metric, groups=0, error="no ready group in rotation answered on /metrics"), {}
    running = sum(g.get("running", 0.0) for g in per_pod.values())
    waiting = sum(g.get("waiting", 0.0) for g in per_pod.values())
    queued = [g.get("running", 0.0) for g in per_pod.values() if g.get("waiting", 0.0) > 0]
    saturated = sum(queued) / len(queued) if queued and sum(queued) > 0 else None
    common = dict(groups=groups, running=running, waiting=waiting, saturated_slots=saturated)
    if metric == REQUESTS_WAITING:
        return Signal(metric, value=waiting / groups, **common), {}
    if metric == KV_CACHE_USAGE:
        kv = [g["kv"] for g in per_pod.values() if "kv" in g]
        if not kv:
            return Signal(metric, error=f"no {KV_CACHE_USAGE_PERC} in the scrape", **common), {}
        return Signal(metric, value=sum(kv) / len(kv), total=sum(kv) * groups / len(kv), **common), {}
    if metric == TTFT_P99:
        snaps = {uid: snapshot(text) for uid, text in texts.items()}
        idle = running + waiting == 0
        if not memory:
            # After a restart (or the first sample) there is no interval yet, unless nothing runs.
            if idle:
                return Signal(metric, value=0.0, **common), snaps
            return Signal(metric, error="first sample: no interval to measure TTFT over yet", **common), snaps
        # A pod seen for the first time counts from its start (its counters began with it).
        d = merge(delta(snap, memory.get(uid)) for uid, snap in snaps.items())
        if max(d["ttft"].values(), default=0.0) <= 0:
            if idle:
                return Signal(metric, value=0.0, **common), snaps
            return Signal(metric, error="no request got its first token in the interval", **common), snaps
        p99 = quantile(0.99, d["ttft"])
        return Signal(metric, value=None if p99 is None else p99 * 1000, **common), snaps
    raise ValueError(f"metric {metric} is not scraped from the pods")


def scrape(pods: Iterable[ObservedPod], fetch: Callable[[str], str]) -> dict[str, str]:
    """/metrics of each pod, fetched in parallel; a pod that does not answer is simply not counted."""
    pods = list(pods)
    if not pods:
        return {}

    def one(pod: ObservedPod) -> tuple[str, str | None]:
        try:
            return pod.uid or pod.name, fetch(f"http://{pod.body['status']['podIP']}:{names.HTTP_PORT}/metrics")
        except Exception:
            return pod.uid or pod.name, None

    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_SCRAPES, len(pods))) as pool:
        return {uid: text for uid, text in pool.map(one, pods) if text is not None}


def prometheus_queries(metric: str, selector: str, window: str) -> dict[str, str]:
    """The queries behind each built-in metric when the signal comes from Prometheus."""
    queries = {"running": f"sum({NUM_REQUESTS_RUNNING}{{{selector}}})",
               "waiting": f"sum({NUM_REQUESTS_WAITING}{{{selector}}})",
               "groups": f"count({NUM_REQUESTS_WAITING}{{{selector}}})"}
    if metric == KV_CACHE_USAGE:
        queries["kv"] = f"sum({KV_CACHE_USAGE_PERC}{{{selector}}})"
    if metric == TTFT_P99:
        queries["ttft"] = (f"histogram_quantile(0.99, sum by (le) "
                           f"(rate({TIME_TO_FIRST_TOKEN}_bucket{{{selector}}}[{window}])))")
    return queries


def from_prometheus(settings: Settings, namespace: str, name: str, ready_groups: int,
                    fetch_json: Callable[[str], Any] = http_get_json, selector: str | None = None) -> Signal:
    metric, url = settings.metric, settings.prometheus_url
    if not url:
        return Signal(metric, source="prometheus", error="no Prometheus URL (spec.autoscaling.prometheus.url)")
    base = url.rstrip("/") + "/api/v1/query?"

    def ask(query: str) -> float | None:
        return scalar(fetch_json(base + urllib.parse.urlencode({"query": query})))

    try:
        if metric == PROMQL:
            value = ask(settings.query or "")
            if value is None:
                return Signal(metric, groups=ready_groups, source="prometheus",
                              error=f"the query returned no data: {settings.query}")
            return Signal(metric, value=value, total=value, groups=ready_groups, source="prometheus")
        # The operator's placeholders only: a selector's own braces (`.{3}`) are PromQL's.
        sel = fill_selector(selector or DEFAULT_SELECTOR, "the autoscaler's selector",
                            namespace=namespace, name=name)
        window = f"{max(10, math.ceil(settings.interval * 2))}s"
        values = {k: ask(q) for k, q in prometheus_queries(metric, sel, window).items()}
    except AnalysisConfigError as error:
        return Signal(metric, source="prometheus", error=str(error))
    except QueryRejected as error:
        return Signal(metric, source="prometheus", error=f"Prometheus at {url} refused the query: {error}")
    except Exception as error:
        return Signal(metric, source="prometheus", error=f"Prometheus at {url} did not answer: {error}")
    groups = int(values.get("groups") or 0)
    running, waiting = values.get("running"), values.get("waiting")
    common = dict(groups=groups, running=running, waiting=waiting, source="prometheus")
    if not groups:
        return Signal(metric, error="no data in Prometheus for the serving pods", **common)
    if metric == REQUESTS_WAITING:
        return Signal(metric, value=(waiting or 0.0) / groups, **common)
    if metric == KV_CACHE_USAGE:
        kv = values.get("kv")
        return Signal(metric, value=None if kv is None else kv / groups, total=kv, **common)
    ttft = values.get("ttft")
    if ttft is None and (running or 0) + (waiting or 0) == 0:
        return Signal(metric, value=0.0, **common)
    return Signal(metric, value=None if ttft is None else ttft * 1000, **common)


def collect(settings: Settings, namespace: str, name: str, observed: Observed, memory: Mapping[str, Any] | None,
            fetch: Callable[[str], str] = lambda url: http_get(url, timeout=SCRAPE_TIMEOUT_SECONDS),
            fetch_json: Callable[[str], Any] = http_get_json) -> tuple[Signal, dict[str, Any]]:
    """The signal now, and the memory to pass to the next call (scrape: the last snapshot per pod)."""
    leaders = observed.serving_leaders(in_rotation_only=True)
    if settings.metric == PROMQL or settings.prometheus_url:
        return from_prometheus(settings, namespace, name, len(leaders), fetch_json), {}
    return from_scrapes(settings.metric, scrape(leaders, fetch), memory or {})
