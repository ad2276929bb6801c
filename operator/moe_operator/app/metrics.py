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
            "moe_operator_reconcile_duration_seconds",
            "Duration of one reconcile, by result (ok; requeue: ok, and asked to run again soon; error).",
            ["result"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        for result in ("ok", "requeue", "error"):   # every series from the start
            self.reconcile_seconds.labels(result)
        self.workqueue_depth = Gauge(
            "moe_operator_workqueue_depth",
            "ModelDeployments being reconciled or due to be reconciled again at once (a trigger arrived "
            "while their reconcile ran), as controller-runtime's workqueue_depth.", registry=self.registry)
        self.gang_waiting_groups = Gauge(
            "moe_operator_gang_waiting_groups", "Replica groups whose pods wait behind the gang scheduling gate "
            "because not all of them fit now (--gang-scheduling gates).", registry=self.registry)
        self.workqueue_timers = Gauge(
            "moe_operator_workqueue_delayed", "ModelDeployments with a reconcile scheduled later (a pause, an "
            "analysis interval, a drain).", registry=self.registry)
        self.client_throttled = Counter(
            "moe_operator_client_throttled_seconds_total",
            "Time API requests waited for the client-side rate limit (--kube-api-qps, --kube-api-burst).",
            registry=self.registry)
        self.writes = Counter(
            "moe_operator_writes_total", "API writes, by kind of object and verb (apply, delete, status).",
            ["kind", "verb"], registry=self.registry)
        self.deployments = Gauge(
            "moe_operator_modeldeployments", "ModelDeployments the operator watches.", registry=self.registry)
        self.rollbacks = Counter(
            "moe_operator_rollbacks_total", "Rollouts aborted, by reason (AlertFiring, AnalysisFailed, "
            "AbortedByUser, ProgressDeadlineExceeded, ...).", ["reason"], registry=self.registry)
        self.rollback_latency = Histogram(
            "moe_operator_rollback_latency_seconds",
            "From an abort request (an alert's arrival at /alerts, a user's abort, a failed analysis) to "
            "the write that took the new revision's last pod out of rotation.",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30), registry=self.registry)
        self.rollout_duration = Histogram(
            "moe_operator_rollout_duration_seconds", "From a rollout's start to its promotion, by strategy.",
            ["strategy"], buckets=(5, 10, 30, 60, 120, 300, 600, 1200, 3600), registry=self.registry)
        self.alerts = Counter(
            "moe_operator_alert_posts_total", "Posts to /alerts, by result (ok, unauthorized, bad_request, error).",
            ["result"], registry=self.registry)
        self.autoscaler_decisions = Counter(
            "moe_operator_autoscaler_decisions_total",
            "Samples of the built-in autoscaler, by decision reason (ScaleUp, ScaleDown, WithinTolerance, "
            "WaitingForLoadingGroups, InsufficientGPUCapacity, NoSignal, ...).", ["reason"], registry=self.registry)
        self.autoscaler_scales = Counter(
            "moe_operator_autoscaler_scale_total", "Replica count changes by the built-in autoscaler, by direction.",
            ["direction"], registry=self.registry)
        self.autoscaler_desired = Gauge(
            "moe_operator_autoscaler_desired_replicas", "Replica groups the built-in autoscaler asks for.",
            ["namespace", "name"], registry=self.registry)
        self.autoscaler_signal = Gauge(
            "moe_operator_autoscaler_signal", "The built-in autoscaler's signal at its last sample (per its metric).",
            ["namespace", "name", "metric"], registry=self.registry)
