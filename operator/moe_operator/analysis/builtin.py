"""The built-in analysis (the default; no Prometheus needed): scrape the runtime's `/metrics` on the
new revision's serving pods (and the stable ones, for a ratio) and judge each interval's deltas."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from ..api import names
from ..world.observe import ObservedPod
from .measure import MEASURE_FAIL, Context, Measurement, judge_slo
from .metrics_text import delta, error_rate, merge, quantile, requests, snapshot


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:   # loopback pod IPs only here
        return response.read().decode("utf-8", "replace")


class ScrapeProvider:
    name = "scrape"

    def __init__(self, fetch: Callable[[str], str] = http_get):
        self.fetch = fetch

    def _scrape(self, pods: list[ObservedPod]) -> dict[str, Any]:
        snaps = {}
        for pod in pods:
            url = f"http://{pod.body['status']['podIP']}:{names.HTTP_PORT}/metrics"
            try:
                snaps[pod.uid or pod.name] = snapshot(self.fetch(url))
            except Exception:       # an unreachable pod this interval is simply not counted
                continue
        return snaps

    def _interval(self, now: Mapping[str, Any], before: Mapping[str, Any]):
        return merge(delta(snap, before.get(uid)) for uid, snap in now.items())

    def measure(self, ctx: Context, memory: Mapping[str, Any] | None
                ) -> tuple[Measurement | None, dict[str, Any] | None]:
        canary_pods = (ctx.observed.serving_leaders(ctx.revision) if ctx.revision else [])
        if not canary_pods:
            return None, dict(memory) if memory is not None else None   # nothing of it serves yet
        cfg = ctx.config
        canary = self._scrape(canary_pods)
        stable = self._scrape(ctx.observed.serving_leaders(ctx.stable_revision) if ctx.stable_revision else []) if cfg.stable_ratio else {}
        new_memory = {"canary": canary, "stable": stable}
        if not canary:
            return Measurement("inconclusive", "no new-revision pod answered on /metrics", {"samples": 0}), \
                dict(memory) if memory is not None else None
        if memory is None:
            # The baselines were lost (an operator restart): the counters' whole life is not one
            # interval, so this scrape is only the next interval's baseline.
            return None, new_memory
        # A pod seen for the first time counts from its start (its counters began with it).
        d = self._interval(canary, memory.get("canary") or {})
        p99, ttft = quantile(0.99, d["e2e"]), quantile(0.99, d["ttft"])
        m = judge_slo(cfg.slo, p99, ttft, error_rate(d), requests(d), cfg.min_samples)
        figures = dict(m.figures, pods=len(canary))
        if cfg.stable_ratio and stable and m.result != MEASURE_FAIL:
            s = self._interval(stable, memory.get("stable") or {})
            stable_p99 = quantile(0.99, s["e2e"])
            if stable_p99 and p99 is not None and requests(s) >= cfg.min_samples:
                ratio = p99 / stable_p99
                figures["ratioToStable"] = round(ratio, 3)
                if ratio > cfg.stable_ratio:
                    return Measurement(MEASURE_FAIL, f"p99 latency {ratio:.2f}x stable's (limit "
                                                     f"{cfg.stable_ratio:g}x)", figures), new_memory
        return Measurement(m.result, m.message, figures), new_memory
