"""Runs reconciles: at most one at a time per ModelDeployment, with triggers that arrive meanwhile
coalesced into one more pass (as controller-runtime's work queue does).

Triggers come from kopf handlers (the ModelDeployment's own events, its pods' and Services' events)
and from the resync loop. The latest body of every ModelDeployment is kept here, fed by its watch
events and by the operator's own status writes, so a pod event can reconcile its owner without a read.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..analysis import Baselines
from ..api.spec import AUTOSCALING_METRICS
from ..reconcile import Outcome, Reads, reconcile
from ..world.cache import lean, pack
from .metrics import OperatorMetrics

Key = tuple[str, str]   # (namespace, name)
TIMED_WORKERS = 16       # timed reconciles that may run at once (as many as kopf's and the caches' triggers)


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return meta.get("namespace", "default"), meta["name"]


def _resource_version(body: Mapping[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


class Controller:
    def __init__(self, reader: Reads, writer, metrics: OperatorMetrics | None = None,
                 logger: logging.Logger | None = None):
        self.reader, self.writer = reader, writer
        self.metrics = metrics or OperatorMetrics()
        self.log = logger or logging.getLogger("moe_operator")
        self._lock = threading.Lock()
        self._bodies: dict[Key, tuple[int, bytes]] = {}   # key -> (resourceVersion, the body as compact JSON)
        self._running: dict[Key, list[bool]] = {}   # key -> [dirty]
        # Timed reconciles (controller-runtime's delaying queue): one thread waits for the earliest
        # due time and hands keys to a bounded pool, so thousands of ModelDeployments waiting on a
        # pause or a retry cost a heap entry each, not a thread each, and never run all at once.
        self._timers: dict[Key, float] = {}            # key -> due (monotonic), the earliest wins
        self._heap: list[tuple[float, Key]] = []
        self._wake = threading.Condition(self._lock)
        self._timer_thread: threading.Thread | None = None
        self._timed = ThreadPoolExecutor(max_workers=TIMED_WORKERS, thread_name_prefix="timed")
        self.baselines = Baselines()       # the analysis' per-pod baselines, this process' memory

    # The store of ModelDeployment bodies.
    def remember(self, body: Mapping[str, Any]) -> None:
        """Keep the newer of the stored and the given body (resourceVersions are etcd revisions)."""
        key = key_of(body)
        version, packed = _resource_version(body), pack(lean(dict(body)))
        with self._lock:
            old = self._bodies.get(key)
            if old is None or version >= old[0]:
                self._bodies[key] = (version, packed)
            self.metrics.deployments.set(len(self._bodies))

    def body(self, key: Key) -> dict[str, Any] | None:
        """The newest body of `key` (a fresh copy), or None."""
        with self._lock:
            stored = self._bodies.get(key)
        return json.loads(stored[1]) if stored is not None else None

    def forget(self, key: Key) -> None:
        with self._lock:
            self._bodies.pop(key, None)
            self.metrics.deployments.set(len(self._bodies))
        self._forget_scaling(key)

    def _forget_scaling(self, key: Key) -> None:
        series = [(self.metrics.autoscaler_desired, key)] + [
            (self.metrics.autoscaler_signal, (*key, metric)) for metric in AUTOSCALING_METRICS]
        for gauge, labels in series:
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    def keys(self) -> list[Key]:
        with self._lock:
            return sorted(self._bodies)

    # Reconciles.
    def run(self, key: Key) -> Outcome | None:
        """Reconcile `key` now, or, if a reconcile of it is running, make that one go once more."""
        with self._lock:
            if key in self._running:
                self._running[key][0] = True
                self._depth()
                return None
            state = self._running[key] = [False]
            self._depth()
        outcome = None
        try:
            while True:
                body = self.body(key)
                if body is None:
                    break
                outcome = self._reconcile_once(body)
                with self._lock:
                    if not state[0]:
                        break
                    state[0] = False
                    self._depth()
        finally:
            with self._lock:
                del self._running[key]
                self._depth()
        return outcome

    def _depth(self) -> None:
        """The work-queue gauges (callers hold the lock)."""
        self.metrics.workqueue_depth.set(len(self._running) + sum(d for d, in self._running.values()))
        self.metrics.workqueue_timers.set(len(self._timers))

    def _reconcile_once(self, body: Mapping[str, Any]) -> Outcome:
        started = time.perf_counter()

        def emit(type_: str, reason: str, message: str) -> None:
            try:
                self.writer.event(body, type_, reason, message)
            except Exception as error:   # an Event is a courtesy: never fail a reconcile over one
                self.log.warning("could not post event %s on %s: %s", reason, key_of(body), error)

        try:
            outcome = reconcile(body, self.reader, self.writer, emit, self.baselines)
        except Exception:
            self.metrics.reconciles.labels("error").inc()
            self.metrics.reconcile_seconds.labels("error").observe(time.perf_counter() - started)
            raise
        result = "requeue" if outcome.requeue_after is not None else "ok"
        self.metrics.reconcile_seconds.labels(result).observe(time.perf_counter() - started)
        self.metrics.reconciles.labels("ok").inc()
        if outcome.written is not None:
            self.remember(outcome.written)
        self._record(outcome)
        self._record_scaling(key_of(body), outcome)
        if outcome.requeue_after is not None:
            self.run_after(key_of(body), outcome.requeue_after)
        if outcome.wrote:
            self.log.info("%s/%s: %d applied, %d relabelled, %d deleted, status %s", *key_of(body),
                          len(outcome.changes.applies), len(outcome.changes.relabels), len(outcome.changes.delete),
                          sorted(outcome.status_patch) or "unchanged")
        return outcome

    def _record(self, outcome: Outcome) -> None:
        report = outcome.report
        if report.rollback:
            reason, seconds = report.rollback
            self.metrics.rollbacks.labels(reason).inc()
            if seconds is not None:
                self.metrics.rollback_latency.observe(max(0.0, seconds))
        if report.completed:
            strategy, seconds = report.completed
            if seconds is not None:
                self.metrics.rollout_duration.labels(strategy).observe(max(0.0, seconds))

    def _record_scaling(self, key: Key, outcome: Outcome) -> None:
        decision = outcome.scaling
        if decision is None:
            return
        self.metrics.autoscaler_decisions.labels(decision.reason).inc()
        if decision.scales:
            self.metrics.autoscaler_scales.labels(decision.direction).inc()
            self.log.info("%s/%s: autoscaler %d -> %d (%s): %s", *key, decision.current, decision.desired,
                          decision.reason, decision.message)
        self.metrics.autoscaler_desired.labels(*key).set(decision.desired)
        value = decision.state.get("currentValue")
        if value is not None:
            self.metrics.autoscaler_signal.labels(*key, decision.state.get("metric", "")).set(value)

    def run_after(self, key: Key, seconds: float) -> None:
        """Reconcile `key` again in `seconds` (a pause ending, a delay, an analysis interval); one
        timer per key, the earliest wins."""
        due = time.monotonic() + seconds
        with self._lock:
            current = self._timers.get(key)
            if current is not None and current <= due + 0.01:
                return
            self._timers[key] = due
            heapq.heappush(self._heap, (due, key))
            self._depth()
            if self._timer_thread is None:
                self._timer_thread = threading.Thread(target=self._timer_loop, name="timers", daemon=True)
                self._timer_thread.start()
            self._wake.notify()

    def _timer_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    while self._heap and self._timers.get(self._heap[0][1]) != self._heap[0][0]:
                        heapq.heappop(self._heap)          # replaced by an earlier one, or fired
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, key = heapq.heappop(self._heap)
                        del self._timers[key]
                        self._depth()
                        break
                    self._wake.wait(self._heap[0][0] - now if self._heap else None)
            self._timed.submit(self._timer_fired, key)

    def _timer_fired(self, key: Key) -> None:
        try:
            self.run(key)
        except Exception as error:     # the resync retries; a timer never dies loudly
            self.log.warning("timed reconcile of %s/%s failed: %s", *key, error)
