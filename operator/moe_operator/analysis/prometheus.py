"""PromQL analysis (`analysis.prometheus.url`): each interval, query the new revision's p99 latency,
p99 TTFT, error rate and request count over the last window. No data is never a pass."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from .measure import AnalysisConfigError, Context, Measurement, judge_slo
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
SELECTOR_FIELD = "spec.rollout.analysis.prometheus.selector"

# `{word}` not preceded by a backslash: a placeholder (PromQL's own braces hold no bare words inside
# a matcher's value, and a regex repetition such as `.{3}` or `{2,5}` holds digits).
_PLACEHOLDER = re.compile(r"(?<!\\)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_selector(template: str, field: str, **values: str) -> str:
    """The selector with the operator's placeholders (`{namespace}`, ...) replaced, and nothing else
    touched: a user's PromQL keeps its own braces (`model_name=~"chat-.{3}"`), which str.format would
    take for fields. An unknown placeholder (a typo such as `{revison}`) is an AnalysisConfigError
    naming `field`, not a selector that silently matches nothing."""
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if unknown:
        known = " ".join(f"{{{k}}}" for k in values)
        raise AnalysisConfigError(field, f"unknown placeholder {', '.join(f'{{{u}}}' for u in unknown)} in "
                                         f"{template!r} (the placeholders are {known})")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class QueryRejected(ValueError):
    """Prometheus refused a query as invalid (errorType bad_data): retrying will not help."""


def http_get_json(url: str, timeout: float = 3.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        # Prometheus' API answers 400 (bad_data) and 422 (execution) with its JSON error body:
        # hand that on, so the caller can tell an invalid query from a server that is down.
        if error.code in (400, 422):
            try:
                return json.loads(error.read())
            except ValueError:
                pass
        raise


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
        message = response.get("error") or "query failed"
        if response.get("errorType") == "bad_data":
            raise QueryRejected(message)
        raise ValueError(message)
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

    def measure(self, ctx: Context, memory: Mapping[str, Any] | None
                ) -> tuple[Measurement | None, dict[str, Any] | None]:
        # Prometheus keeps the window itself: no baselines here, so a restart loses nothing.
        memory = memory or {}
        if not (ctx.revision and ctx.observed.serving_leaders(ctx.revision)):
            return None, dict(memory)
        cfg = ctx.config
        selector = fill_selector(cfg.prometheus_selector or DEFAULT_SELECTOR, SELECTOR_FIELD,
                                 namespace=ctx.md.namespace, name=ctx.md.name, revision=ctx.revision)
        window = f"{max(10, math.ceil(cfg.interval_seconds))}s"
        values: dict[str, float | None] = {}
        base = cfg.prometheus_url.rstrip("/") + "/api/v1/query?"
        try:
            for key, query in queries(selector, window).items():
                values[key] = scalar(self.fetch(base + urllib.parse.urlencode({"query": query})))
        except QueryRejected as error:
            if cfg.prometheus_selector:
                raise AnalysisConfigError(SELECTOR_FIELD, f"Prometheus refused the query with selector "
                                                          f"{selector!r}: {error}") from None
            return Measurement("inconclusive", f"Prometheus at {cfg.prometheus_url} refused the query: {error}",
                               {"samples": 0}), dict(memory or {})
        except Exception as error:
            return Measurement("inconclusive", f"Prometheus at {cfg.prometheus_url} did not answer: {error}",
                               {"samples": 0}), dict(memory)
        if values["samples"] is None:
            return Measurement("inconclusive", "no data for the new revision in Prometheus", {"samples": 0}), \
                dict(memory)
        m = judge_slo(cfg.slo, values["p99"], values["ttftP99"], values["errorRate"], values["samples"],
                      cfg.min_samples)
        return m, dict(memory)
