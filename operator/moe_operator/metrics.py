"""The operator's own Prometheus metrics, on a registry of their own (no import-time globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "moe_operator_reconcile_total", "Reconciles of ModelDeployments, by result (ok, error).",
            ["result"], registry=self.registry)
        self.reconcile_seconds = Histogram(
            "moe_operator_reconcile_duration_seconds", "Duration of one reconcile.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.writes = Counter(
            "moe_operator_writes_total", "API writes, by kind of object and verb (apply, delete, status).",
            ["kind", "verb"], registry=self.registry)
        self.deployments = Gauge(
            "moe_operator_modeldeployments", "ModelDeployments the operator watches.", registry=self.registry)
