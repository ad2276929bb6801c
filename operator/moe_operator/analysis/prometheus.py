"""PromQL analysis (`analysis.prometheus.url`): each interval, query the new revision's p99 latency,
p99 TTFT, error rate and request count over the last window. No data is never a pass."""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from . import Context, Measurement, judge_slo
from .builtin import serving_pods
from .metrics_text import (
    E2E_REQUEST_LATENCY,
    REQUEST_FAILURE,
    REQUEST_SUCCESS,
    SERVER_FAILURE_REASONS,
    TIME_TO_FIRST_TOKEN,
)

# Labels as the project's Prometheus config writes them (pod labels, sanitised, plus namespace).
# With prometheus-operator's PodMonitor, set analysis.prometheus.selector to your labels.
DEFAULT_SELECTOR = ('namespace="{namespace}",serving_moe_dev_deployment="{name}",'
                    'serving_moe_dev_revision="{revision}"')


def http_get_json(url: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def queries(selector: str, window: str, by: tuple[str, ...] = ()) -> dict[str, str]:
    """The analysis' PromQL (one source: the operator's PrometheusRule alerts use it too, with `by`
    the series labels each alert keeps)."""
    server = "|".join(SERVER_FAILURE_REASONS)
    group = f" by ({', '.join(by)})" if by else ""
    le = f" by ({', '.join((*by, 'le'))})"
    requests = (f"(sum{group}(increase({REQUEST_SUCCESS}{{{selector}}}[{window}]))"
                f" + sum{group}(increase({REQUEST_FAILURE}{{{selector}}}[{window}])))")
    return {
        "samples": requests,
        "p99": f"histogram_quantile(0.99, sum{le} (rate({E2E_REQUEST_LATENCY}_bucket{{{selector}}}[{window}])))",
        "ttftP99": f"histogram_quantile(0.99, sum{le} (rate({TIME_TO_FIRST_TOKEN}_bucket{{{selector}}}[{window}])))",
        "errorRate": (f"sum{group}(increase({REQUEST_FAILURE}{{{selector},reason=~\"{server}\"}}[{window}]))"
                      f" / {requests}"),
    }


def scalar(response: Mapping[str, Any]) -> float | None:
    """The value of a one-element instant vector (or scalar); None for no data or NaN."""
    if response.get("status") != "success":
        raise ValueError(response.get("error") or "query failed")
    data = response.get("data") or {}
    result = data.get("result")
    if data.get("resultType") == "scalar":
        value = float(result[1])
    elif not result:
        return None
    else:
        value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


class PrometheusProvider:
    name = "prometheus"

    def __init__(self, fetch: Callable[[str], Any] = http_get_json):
        self.fetch = fetch

    def measure(self, ctx: Context, memory: Mapping[str, Any]) -> tuple[Measurement | None, dict[str, Any]]:
        if not serving_pods(ctx, ctx.revision):
            return None, dict(memory)
        cfg = ctx.config
        selector = (cfg.prometheus_selector or DEFAULT_SELECTOR).format(
            namespace=ctx.md.namespace, name=ctx.md.name, revision=ctx.revision)
        window = f"{max(10, math.ceil(cfg.interval_seconds))}s"
        values: dict[str, float | None] = {}
        base = cfg.prometheus_url.rstrip("/") + "/api/v1/query?"
        try:
            for key, query in queries(selector, window).items():
                values[key] = scalar(self.fetch(base + urllib.parse.urlencode({"query": query})))
        except Exception as error:
            return Measurement("inconclusive", f"Prometheus at {cfg.prometheus_url} did not answer: {error}",
                               {"samples": 0}), dict(memory)
        if values["samples"] is None:
            return Measurement("inconclusive", "no data for the new revision in Prometheus", {"samples": 0}), \
                dict(memory)
        m = judge_slo(cfg.slo, values["p99"], values["ttftP99"], values["errorRate"], values["samples"],
                      cfg.min_samples)
        return m, dict(memory)
