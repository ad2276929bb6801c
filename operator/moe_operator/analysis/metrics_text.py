"""The runtime's metrics as the operator reads them: names, a snapshot of one pod's `/metrics` text
(parsed with prometheus_client's parser), deltas between snapshots and quantiles of bucket deltas.

The names mirror model_runtime.serving.metrics (the operator does not import the runtime, which needs torch);
a unit test checks that both agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

E2E_REQUEST_LATENCY = "moe_e2e_request_latency_seconds"
TIME_TO_FIRST_TOKEN = "moe_time_to_first_token_seconds"
REQUEST_SUCCESS = "moe_request_success_total"
REQUEST_FAILURE = "moe_request_failure_total"
SERVER_FAILURE_REASONS = ("internal", "injected", "timeout", "overloaded")

Snapshot = dict[str, Any]   # {"e2e": {le: count}, "ttft": {le: count}, "ok": n, "failed": n, "failedAll": n}


def snapshot(text: str) -> Snapshot:
    """Cumulative histogram buckets and request counters of one scrape (summed over label sets)."""
    snap: Snapshot = {"e2e": {}, "ttft": {}, "ok": 0.0, "failed": 0.0, "failedAll": 0.0}
    histograms = {E2E_REQUEST_LATENCY: "e2e", TIME_TO_FIRST_TOKEN: "ttft"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name in histograms and sample.name == family.name + "_bucket":
                buckets = snap[histograms[family.name]]
                le = _le_key(sample.labels.get("le", "+Inf"))
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == REQUEST_SUCCESS:
                snap["ok"] += sample.value
            elif sample.name == REQUEST_FAILURE:
                snap["failedAll"] += sample.value
                if sample.labels.get("reason") in SERVER_FAILURE_REASONS:
                    snap["failed"] += sample.value
    return snap


def _le_key(le: str) -> str:
    value = float(le)
    return "+Inf" if math.isinf(value) else repr(value)


def delta(current: Snapshot, previous: Snapshot | None) -> Snapshot:
    """What happened between two snapshots of one pod. A counter that went down means the process
    restarted: then everything it counted since is the delta."""
    if not previous:
        return current
    reset = current["ok"] < previous.get("ok", 0) or current["failedAll"] < previous.get("failedAll", 0)
    if reset:
        return current
    out: Snapshot = {k: current[k] - previous.get(k, 0.0) for k in ("ok", "failed", "failedAll")}
    for h in ("e2e", "ttft"):
        before = previous.get(h) or {}
        out[h] = {le: max(0.0, c - before.get(le, 0.0)) for le, c in current[h].items()}
    return out


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    total: Snapshot = {"e2e": {}, "ttft": {}, "ok": 0.0, "failed": 0.0, "failedAll": 0.0}
    for s in snapshots:
        for k in ("ok", "failed", "failedAll"):
            total[k] += s.get(k, 0.0)
        for h in ("e2e", "ttft"):
            for le, c in (s.get(h) or {}).items():
                total[h][le] = total[h].get(le, 0.0) + c
    return total


def quantile(q: float, buckets: Mapping[str, float]) -> float | None:
    """Quantile of cumulative bucket counts, interpolated linearly within the bucket (as PromQL's
    histogram_quantile). None without observations; beyond the last finite bucket, its bound."""
    items = sorted(((float(le), c) for le, c in buckets.items()), key=lambda x: x[0])
    if not items or items[-1][1] <= 0:
        return None
    total = items[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in items:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return items[-1][0]


def requests(s: Snapshot) -> float:
    return s["ok"] + s["failedAll"]


def error_rate(s: Snapshot) -> float | None:
    n = requests(s)
    return s["failed"] / n if n > 0 else None
