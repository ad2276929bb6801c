"""Runs reconciles: at most one at a time per ModelDeployment, with triggers that arrive meanwhile
coalesced into one more pass (as controller-runtime's work queue does).

Triggers come from kopf handlers (the ModelDeployment's own events, its pods' and Services' events)
and from the resync loop. The latest body of every ModelDeployment is kept here, fed by its watch
events and by the operator's own status writes, so a pod event can reconcile its owner without a read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from .metrics import OperatorMetrics
from .reconcile import Outcome, Reads, reconcile

Key = tuple[str, str]   # (namespace, name)


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
        self._bodies: dict[Key, Mapping[str, Any]] = {}
        self._running: dict[Key, list[bool]] = {}   # key -> [dirty]

    # The store of ModelDeployment bodies.
    def remember(self, body: Mapping[str, Any]) -> None:
        """Keep the newer of the stored and the given body (resourceVersions are etcd revisions)."""
        key = key_of(body)
        with self._lock:
            old = self._bodies.get(key)
            if old is None or _resource_version(body) >= _resource_version(old):
                self._bodies[key] = body
            self.metrics.deployments.set(len(self._bodies))

    def forget(self, key: Key) -> None:
        with self._lock:
            self._bodies.pop(key, None)
            self.metrics.deployments.set(len(self._bodies))

    def keys(self) -> list[Key]:
        with self._lock:
            return sorted(self._bodies)

    # Reconciles.
    def run(self, key: Key) -> Outcome | None:
        """Reconcile `key` now, or, if a reconcile of it is running, make that one go once more."""
        with self._lock:
            if key in self._running:
                self._running[key][0] = True
                return None
            state = self._running[key] = [False]
        outcome = None
        try:
            while True:
                with self._lock:
                    body = self._bodies.get(key)
                if body is None:
                    break
                outcome = self._reconcile_once(body)
                with self._lock:
                    if not state[0]:
                        break
                    state[0] = False
        finally:
            with self._lock:
                del self._running[key]
        return outcome

    def _reconcile_once(self, body: Mapping[str, Any]) -> Outcome:
        started = time.perf_counter()

        def emit(type_: str, reason: str, message: str) -> None:
            try:
                self.writer.event(body, type_, reason, message)
            except Exception as error:   # an Event is a courtesy: never fail a reconcile over one
                self.log.warning("could not post event %s on %s: %s", reason, key_of(body), error)

        try:
            outcome = reconcile(body, self.reader, self.writer, emit)
        except Exception:
            self.metrics.reconciles.labels("error").inc()
            raise
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        self.metrics.reconciles.labels("ok").inc()
        if outcome.written is not None:
            self.remember(outcome.written)
        if outcome.wrote:
            self.log.info("%s/%s: %d applied, %d relabelled, %d deleted, status %s", *key_of(body),
                          len(outcome.changes.applies), len(outcome.changes.relabels), len(outcome.changes.delete),
                          sorted(outcome.status_patch) or "unchanged")
        return outcome
