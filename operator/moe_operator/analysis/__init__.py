"""Analysis: is the new revision healthy? Three sources, one verdict.

1. Alerts (push): Alertmanager posts to the operator's `/alerts`; a firing alert that names the
   ModelDeployment becomes an abort request (moe_operator.alerts) that the rollout acts on at once.
   It needs no polling, so it is not a `Provider` here: it is the fast path.
2. PromQL (pull, `analysis.prometheus.url`): `PrometheusProvider` queries latency quantiles, error
   rate and sample counts of the new revision every `interval`.
3. Built-in (the default, no Prometheus needed): `ScrapeProvider` reads the runtime's `/metrics` on
   the new revision's pods (and the stable ones for a ratio) and judges the per-interval deltas.

A provider only measures (`Measurement`: pass, fail or inconclusive, with the figures);
`analyse()` keeps the counts in a JSON-able state (stored in status.rollout.analysis, so a restarted
operator resumes with its baselines and counts) and turns them into the rollout's `Verdict`:
fail after more than `failure_limit` failed intervals, inconclusive after `inconclusive_limit`
inconclusive intervals in a row (no data is never a pass), pass once the last interval passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..observe import Observed
from ..rollout import FAIL, INCONCLUSIVE, PASS, PENDING, Verdict, iso
from ..spec import AnalysisSpec, ModelDeployment, SLOSpec

MEASURE_PASS, MEASURE_FAIL, MEASURE_INCONCLUSIVE = "pass", "fail", "inconclusive"
KEEP_MEASUREMENTS = 5


@dataclass(frozen=True)
class Context:
    md: ModelDeployment
    observed: Observed
    revision: str                     # the new revision
    stable_revision: str | None
    now: float
    config: AnalysisSpec              # the spec's rollout.analysis


@dataclass(frozen=True)
class Measurement:
    result: str                                       # pass | fail | inconclusive
    message: str = ""
    figures: Mapping[str, Any] = field(default_factory=dict)


class Provider(Protocol):
    name: str

    def measure(self, ctx: Context, memory: Mapping[str, Any]) -> tuple[Measurement | None, dict[str, Any]]:
        """One interval's measurement (None when there is nothing to compare yet, e.g. the first
        baseline) and the provider's memory for the next one (JSON-able)."""
        ...


def judge_slo(slo: SLOSpec, p99_s: float | None, ttft_p99_s: float | None, error_rate: float | None,
              samples: float, min_samples: int) -> Measurement:
    """Pure: one interval's figures against the SLO (None figures are not judged)."""
    figures = {"samples": round(samples, 3)}
    if p99_s is not None:
        figures["p99LatencyMs"] = round(p99_s * 1000, 1)
    if ttft_p99_s is not None:
        figures["ttftP99Ms"] = round(ttft_p99_s * 1000, 1)
    if error_rate is not None:
        figures["errorRate"] = round(error_rate, 4)
    failures = []
    if slo.max_error_rate is not None and error_rate is not None and samples > 0 and error_rate > slo.max_error_rate:
        failures.append(f"error rate {error_rate:.3f} > {slo.max_error_rate}")
    if slo.p99_latency_ms is not None and p99_s is not None and p99_s * 1000 > slo.p99_latency_ms:
        failures.append(f"p99 latency {p99_s * 1000:.0f}ms > {slo.p99_latency_ms:g}ms")
    if slo.ttft_p99_ms is not None and ttft_p99_s is not None and ttft_p99_s * 1000 > slo.ttft_p99_ms:
        failures.append(f"p99 TTFT {ttft_p99_s * 1000:.0f}ms > {slo.ttft_p99_ms:g}ms")
    if samples < min_samples:
        # Too little data never passes; but a clear failure on what there is still counts
        # (every one of a handful of requests failing is not noise).
        if failures and samples >= max(1, min_samples // 4):
            return Measurement(MEASURE_FAIL, "; ".join(failures), figures)
        return Measurement(MEASURE_INCONCLUSIVE, f"{samples:g} requests in the interval, fewer than {min_samples}",
                           figures)
    if failures:
        return Measurement(MEASURE_FAIL, "; ".join(failures), figures)
    return Measurement(MEASURE_PASS, "within the SLO", figures)


def provider_for(config: AnalysisSpec, fetch=None) -> Provider:
    from .builtin import ScrapeProvider
    from .prometheus import PrometheusProvider
    if config.prometheus_url:
        return PrometheusProvider(fetch=fetch) if fetch else PrometheusProvider()
    return ScrapeProvider(fetch=fetch) if fetch else ScrapeProvider()


def analyse(ctx: Context, state: Mapping[str, Any] | None, provider: Provider) -> tuple[Verdict | None, dict[str, Any]]:
    """Run the provider when an interval is due and fold its measurement into the verdict.
    Returns (None, {}) when the spec judges nothing (then only alerts decide)."""
    cfg = ctx.config
    if not cfg.judges_anything:
        return None, {}
    state = dict(state or {})
    if state.get("revision") != ctx.revision or state.get("provider") != provider.name:
        state = {"revision": ctx.revision, "provider": provider.name, "passes": 0, "failures": 0,
                 "inconclusive": 0, "measurements": [], "memory": {}}
    last = state.get("lastAt")
    due = last is None or ctx.now - float(last) >= cfg.interval_seconds
    if due:
        measurement, memory = provider.measure(ctx, state.get("memory") or {})
        state["memory"] = memory
        state["lastAt"] = round(ctx.now, 3)
        if measurement is not None:
            key = {MEASURE_PASS: "passes", MEASURE_FAIL: "failures"}.get(measurement.result)
            if key:
                state[key] = int(state.get(key) or 0) + 1
            state["inconclusive"] = int(state.get("inconclusive") or 0) + 1 \
                if measurement.result == MEASURE_INCONCLUSIVE else 0
            entry = {"at": iso(ctx.now), "result": measurement.result, "message": measurement.message,
                     "figures": dict(measurement.figures)}
            state["measurements"] = (list(state.get("measurements") or []) + [entry])[-KEEP_MEASUREMENTS:]
    return verdict_of(state, cfg), state


def verdict_of(state: Mapping[str, Any], cfg: AnalysisSpec) -> Verdict:
    measurements = state.get("measurements") or []
    last = measurements[-1] if measurements else None
    figures = dict(last["figures"]) if last else {}
    if int(state.get("failures") or 0) > cfg.failure_limit:
        failed = [m for m in measurements if m["result"] == MEASURE_FAIL]
        message = failed[-1]["message"] if failed else "analysis failed"
        return Verdict(FAIL, f"{message} ({state['failures']} failed intervals, limit {cfg.failure_limit})",
                       dict(failed[-1]["figures"]) if failed else figures)
    if int(state.get("inconclusive") or 0) >= cfg.inconclusive_limit:
        return Verdict(INCONCLUSIVE, last["message"] if last else "no data", figures)
    if last and last["result"] == MEASURE_PASS:
        return Verdict(PASS, last["message"], figures)
    return Verdict(PENDING, last["message"] if last else "waiting for the first interval", figures)
