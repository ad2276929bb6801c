"""Pure builder of a ModelDeployment's PrometheusRule (`monitoring.coreos.com/v1`, `<name>-latency`).

Where prometheus-operator's CRDs exist, the operator renders, per ModelDeployment whose rollout
analysis sets an `slo`, one alert per threshold the spec sets (p99 latency, p99 TTFT, error rate) over
the canary/preview track's series. Each alert carries the labels the `/alerts` webhook matches
(`namespace`, `modeldeployment`, `revision`, `track`), so Alertmanager posting it aborts the rollout
in seconds. The PromQL is the PromQL analysis' (`analysis.prometheus.queries`): one source.
No slo: no rule (a stale one is deleted as any object no longer wanted).
"""

from __future__ import annotations

from typing import Any

from ..analysis.prometheus import queries
from ..api import names
from ..api.spec import ModelDeployment
from .pods import common_labels, owner_reference

API_VERSION = names.RULE_API_VERSION
KIND = names.RULE_KIND
PLURAL = "prometheusrules"
SUFFIX = "-latency"
WINDOW = "1m"        # the rate() window, as the chart's PrometheusRule
FOR = "0s"           # the first evaluation that fires aborts the rollout

# Series labels as the project's Prometheus config and the chart's PodMonitor write the pod labels.
SERIES_NAMESPACE = "namespace"
SERIES_DEPLOYMENT = "serving_moe_dev_deployment"
SERIES_REVISION = "serving_moe_dev_revision"
SERIES_TRACK = "serving_moe_dev_track"
BY = (SERIES_NAMESPACE, SERIES_DEPLOYMENT, SERIES_REVISION, SERIES_TRACK)

ALERT_P99 = "MoECanaryLatencyHigh"
ALERT_TTFT = "MoECanaryTimeToFirstTokenHigh"
ALERT_ERRORS = "MoECanaryErrorRateHigh"


def rule_name(deployment: str) -> str:
    return f"{deployment}{SUFFIX}"


def selector(md: ModelDeployment) -> str:
    return (f'{SERIES_NAMESPACE}="{md.namespace}",{SERIES_DEPLOYMENT}="{md.name}",'
            f'{SERIES_TRACK}=~"{names.TRACK_CANARY}|{names.TRACK_PREVIEW}"')


def _alert(md: ModelDeployment, alert: str, expr: str, summary: str) -> dict[str, Any]:
    return {
        "alert": alert,
        "expr": expr,
        "for": FOR,
        "labels": {
            "namespace": md.namespace,
            "modeldeployment": md.name,
            "revision": _template(SERIES_REVISION),
            "track": _template(SERIES_TRACK),
        },
        "annotations": {
            "summary": summary,
            "description": (f"Revision {{{{ $labels.{SERIES_REVISION} }}}} of ModelDeployment "
                            f"{md.namespace}/{md.name} is above its slo; the operator aborts its rollout."),
        },
    }


def desired_rule(md: ModelDeployment) -> dict[str, Any] | None:
    """The PrometheusRule for `md`, or None when its analysis sets no slo threshold."""
    slo = md.rollout.analysis.slo
    q = queries(selector(md), WINDOW, BY)
    rules = []
    if slo.p99_latency_ms is not None:
        seconds = _num(slo.p99_latency_ms / 1000.0)
        rules.append(_alert(md, ALERT_P99, f"{q['p99']} > {seconds}",
                            f"p99 request latency {{{{ $value | humanizeDuration }}}} above {seconds}s"))
    if slo.ttft_p99_ms is not None:
        seconds = _num(slo.ttft_p99_ms / 1000.0)
        rules.append(_alert(md, ALERT_TTFT, f"{q['ttftP99']} > {seconds}",
                            f"p99 time to first token {{{{ $value | humanizeDuration }}}} above {seconds}s"))
    if slo.max_error_rate is not None:
        rate = _num(slo.max_error_rate)
        rules.append(_alert(md, ALERT_ERRORS, f"{q['errorRate']} > {rate}",
                            f"error rate {{{{ $value | humanizePercentage }}}} above {rate}"))
    if not rules:
        return None
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": rule_name(md.name),
            "namespace": md.namespace,
            "labels": common_labels(md),
            "ownerReferences": [owner_reference(md)],
        },
        "spec": {"groups": [{"name": f"moe-operator.{md.namespace}.{md.name}", "rules": rules}]},
    }


def _template(series_label: str) -> str:
    """Prometheus' template of a series label, expanded when the alert fires."""
    return "{{ $labels." + series_label + " }}"


def _num(value: float) -> str:
    """A threshold as PromQL reads it, without float noise (0.25, not 0.25000000000000006)."""
    return f"{value:.6g}"
