"""What a provider measures in one interval, against the SLO: the shared types of the analysis
(the context it reads, the measurement it returns, the provider protocol, the SLO judgement)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..api.spec import AnalysisSpec, ModelDeployment, SLOSpec
from ..world.observe import Observed

MEASURE_PASS, MEASURE_FAIL, MEASURE_INCONCLUSIVE = "pass", "fail", "inconclusive"


class AnalysisConfigError(ValueError):
    """The analysis cannot run as the spec configures it; `field` names what to fix. Waiting does
    not help, so the verdict is Inconclusive at once (the rollout pauses, or aborts with
    `inconclusive: Abort`) with this message, instead of an exception out of the reconcile."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


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

    def measure(self, ctx: Context, memory: Mapping[str, Any] | None
                ) -> tuple[Measurement | None, dict[str, Any] | None]:
        """One interval's measurement (None when there is nothing to compare yet, e.g. the first
        baseline) and the provider's memory for the next one. `memory` is what the last call
        returned, `{}` at a rollout's first interval, and None when it was lost (the operator
        restarted): then deltas have no baseline and the provider takes new ones. Raises
        AnalysisConfigError when the spec asks for something that cannot work."""
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
