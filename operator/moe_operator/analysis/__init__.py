"""Analysis: is the new revision healthy? Three sources, one verdict.

1. Alerts (push): Alertmanager posts to the operator's `/alerts`; a firing alert that names the
   ModelDeployment becomes an abort request (moe_operator.app.alerts) that the rollout acts on at once.
   It needs no polling, so it is not a `Provider` here: it is the fast path.
2. PromQL (pull, `analysis.prometheus.url`): `PrometheusProvider` queries latency quantiles, error
   rate and sample counts of the new revision every `interval`.
3. Built-in (the default, no Prometheus needed): `ScrapeProvider` reads the runtime's `/metrics` on
   the new revision's pods (and the stable ones for a ratio) and judges the per-interval deltas.

A provider only measures (`Measurement`: pass, fail or inconclusive, with the figures). `analyse()`
folds each interval into two parts:
- the analysis state, stored in status.rollout.analysis (a restarted operator resumes from it): the
  counts of failed and inconclusive intervals and the last results with their figures. It changes
  only when a count or the result changes, so an interval that reaches the same verdict (a rollout
  waiting at a pause while its canary keeps passing) writes nothing to status;
- the memo, kept in the operator's memory (`Baselines`, keyed by namespace, name and revision): when
  the last interval was measured and the provider's memory (the per-pod snapshots the next deltas
  start from). A restarted operator has none, and takes new baselines at its first interval.
It turns them into the rollout's `Verdict`: fail after more than `failure_limit` failed intervals,
inconclusive after `inconclusive_limit` inconclusive intervals in a row (no data is never a pass) or
at once when the analysis cannot run as configured (the message names the spec field), pass once the
last interval passed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ..api.spec import AnalysisSpec
from ..api.timestamps import iso
from .builtin import ScrapeProvider
from .measure import (
    MEASURE_FAIL,
    MEASURE_INCONCLUSIVE,
    MEASURE_PASS,
    AnalysisConfigError,
    Context,
    Measurement,
    Provider,
    judge_slo,
)
from .prometheus import PrometheusProvider
from .verdict import FAIL, INCONCLUSIVE, PASS, PENDING, Verdict

__all__ = ["MEASURE_FAIL", "MEASURE_INCONCLUSIVE", "MEASURE_PASS", "PROVIDERS", "AnalysisConfigError", "Baselines",
           "Context", "Measurement", "Provider", "analyse", "fold", "judge_slo", "provider_for", "verdict_of"]

KEEP_MEASUREMENTS = 5
STATE_KEYS = ("revision", "provider", "failures", "inconclusive", "invalid", "measurements")


# The providers by the spec's choice: `analysis.prometheus.url` set -> PromQL, else the pods' own /metrics.
PROVIDERS: Mapping[str, type] = {"prometheus": PrometheusProvider, "scrape": ScrapeProvider}


def provider_for(config: AnalysisSpec, fetch=None) -> Provider:
    kind = PROVIDERS["prometheus" if config.prometheus_url else "scrape"]
    return kind(fetch=fetch) if fetch else kind()


class Baselines:
    """The analysis memos of one operator process, keyed by (namespace, name, revision): what the
    analysis needs between intervals but a user does not (the time of the last interval, the per-pod
    snapshots its deltas start from). Thread-safe: reconciles of different objects run in parallel.
    One memo per object (a newer revision's replaces the older); memos not touched for
    `forget_after` seconds (a finished or deleted rollout) go."""

    def __init__(self, forget_after: float = 3600.0):
        self.forget_after = forget_after
        self._lock = threading.Lock()
        self._memos: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}

    def get(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        with self._lock:
            kept = self._memos.get(key)
            return kept[1] if kept else None

    def put(self, key: tuple[str, str, str], memo: dict[str, Any] | None, now: float) -> None:
        with self._lock:
            for other, (touched, _) in list(self._memos.items()):
                if other[:2] == key[:2] or now - touched > self.forget_after:
                    del self._memos[other]
            if memo is not None:
                self._memos[key] = (now, memo)


# The operator process' own: what a restart forgets (tests pass theirs).


def analyse(ctx: Context, state: Mapping[str, Any] | None, provider: Provider,
            memo: Mapping[str, Any] | None = None) -> tuple[Verdict | None, dict[str, Any], dict[str, Any] | None]:
    """Run the provider when an interval is due and fold its measurement into the verdict.
    `state` is status.rollout.analysis, `memo` what the last call returned for this revision (None
    after a restart). Returns (verdict, state, memo); the state equals the one given unless a count
    or the result changed. (None, {}, None) when the spec judges nothing (then only alerts decide)."""
    cfg = ctx.config
    if not cfg.judges_anything:
        return None, {}, None
    state = _state_for(state, ctx.revision, provider.name)
    memo = dict(memo) if memo and memo.get("provider") == provider.name else None
    last = memo.get("lastAt") if memo else None
    if last is not None and ctx.now - float(last) < cfg.interval_seconds:
        return verdict_of(state, cfg), state, memo
    if memo is not None:
        memory = memo.get("memory")
    else:
        # No memo: the rollout's first interval (counters count from the new pods' start), or a
        # restarted operator (status shows intervals measured before): then only new baselines.
        memory = None if state["measurements"] else {}
    invalid = False
    try:
        measurement, memory = provider.measure(ctx, memory)
    except AnalysisConfigError as error:
        measurement, invalid = Measurement(MEASURE_INCONCLUSIVE, str(error)), True
    except Exception as error:      # a provider's bug or a surprise answer: an interval without a result
        measurement = Measurement(MEASURE_INCONCLUSIVE, f"the {provider.name} analysis failed: {error!r}")
    memo = {"provider": provider.name, "lastAt": round(ctx.now, 3), "memory": memory}
    if measurement is not None:
        state = fold(state, measurement, ctx.now, cfg, invalid)
    return verdict_of(state, cfg), state, memo


def _state_for(state: Mapping[str, Any] | None, revision: str, provider: str) -> dict[str, Any]:
    """The stored state of this revision and provider (keys of older operators dropped), or a new one."""
    state = state or {}
    if state.get("revision") != revision or state.get("provider") != provider:
        return {"revision": revision, "provider": provider, "failures": 0, "inconclusive": 0, "measurements": []}
    kept = {k: state[k] for k in STATE_KEYS if k in state}
    kept.setdefault("failures", 0)
    kept.setdefault("inconclusive", 0)
    kept["measurements"] = [dict(m) for m in state.get("measurements") or []]
    return kept


def fold(state: Mapping[str, Any], m: Measurement, now: float, cfg: AnalysisSpec,
         invalid: bool = False) -> dict[str, Any]:
    """Pure: the state after one interval's measurement. A measurement is recorded (with its time and
    figures) only when it changes a count or the result; the inconclusive count stops at the limit."""
    new = dict(state)
    if invalid:
        new["invalid"] = m.message
    else:
        new.pop("invalid", None)
        if m.result == MEASURE_FAIL:
            new["failures"] = int(new.get("failures") or 0) + 1
        new["inconclusive"] = min(int(new.get("inconclusive") or 0) + 1, cfg.inconclusive_limit) \
            if m.result == MEASURE_INCONCLUSIVE else 0
    measurements = list(new.get("measurements") or [])
    if new != state or not measurements or measurements[-1]["result"] != m.result:
        entry = {"at": iso(now), "result": m.result, "message": m.message, "figures": dict(m.figures)}
        new["measurements"] = (measurements + [entry])[-KEEP_MEASUREMENTS:]
    return new


def verdict_of(state: Mapping[str, Any], cfg: AnalysisSpec) -> Verdict:
    measurements = state.get("measurements") or []
    last = measurements[-1] if measurements else None
    figures = dict(last["figures"]) if last else {}
    if int(state.get("failures") or 0) > cfg.failure_limit:
        failed = [m for m in measurements if m["result"] == MEASURE_FAIL]
        message = failed[-1]["message"] if failed else "analysis failed"
        return Verdict(FAIL, f"{message} ({state['failures']} failed intervals, limit {cfg.failure_limit})",
                       dict(failed[-1]["figures"]) if failed else figures)
    if state.get("invalid"):
        return Verdict(INCONCLUSIVE, state["invalid"], {})
    if int(state.get("inconclusive") or 0) >= cfg.inconclusive_limit:
        return Verdict(INCONCLUSIVE, last["message"] if last else "no data", figures)
    if last and last["result"] == MEASURE_PASS:
        return Verdict(PASS, last["message"], figures)
    return Verdict(PENDING, last["message"] if last else "waiting for the first interval", figures)
