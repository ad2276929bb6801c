"""Leader election on a `coordination.k8s.io` Lease, as client-go's leaderelection does it.

Several operator replicas run; only the one holding the Lease reconciles, watches (kopf) and scrapes.
The others serve `/healthz` and `/alerts` (an alert at a standby is written to its ModelDeployment as
the abort annotation, durably, and the leader acts on it), and wait:

- a candidate takes the Lease when it does not exist, or when its holder has not renewed it for
  `lease_duration` seconds (an update with the Lease's resourceVersion: of two candidates only one
  wins);
- the leader renews it every `retry_period`; if it cannot renew for `renew_deadline` it stops
  leading (the process exits, as controller-runtime's managers do, and restarts as a candidate), so
  two replicas never reconcile at once for longer than the clock skew allows;
- on a clean shutdown the leader releases the Lease (holder emptied), and a standby takes over at
  its next try instead of after `lease_duration`.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("moe_operator.leader")

LEASE_NAME = "moe-operator-leader"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def default_identity() -> str:
    """The pod's name (POD_NAME from the downward API, as the chart sets it) or the host name, with a
    suffix so that a restarted container never mistakes the Lease for its own."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


@dataclass
class LeaderElector:
    api: client.CoordinationV1Api
    namespace: str
    name: str = LEASE_NAME
    identity: str = field(default_factory=default_identity)
    lease_duration: float = 10.0
    renew_deadline: float = 7.0
    retry_period: float = 2.0
    clock: Callable[[], float] = time.monotonic
    on_lost: Callable[[], None] | None = None  # called (in the renewing thread) when leadership is lost

    def __post_init__(self) -> None:
        self._leading = threading.Event()
        self._stop = threading.Event()
        self._observed: tuple[str | None, object] | None = None   # (holder, renewTime) as last seen
        self._observed_at = 0.0                                   # our clock when it last changed

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    # -- one attempt ------------------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """One round: True when this candidate holds the Lease afterwards."""
        now = _now()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=int(self.lease_duration),
                                        acquire_time=now, renew_time=now, lease_transitions=0))
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except ApiException as created:
                if created.status == 409:   # another candidate created it first
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or None
        seen = (holder, spec.renew_time)
        if seen != self._observed:   # judge expiry by our own clock since the record last changed
            self._observed, self._observed_at = seen, self.clock()
        if holder not in (None, self.identity) and self.clock() - self._observed_at < self.lease_duration:
            return False   # someone else holds it and renews it
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        lease.spec = client.V1LeaseSpec(
            holder_identity=self.identity, lease_duration_seconds=int(self.lease_duration),
            acquire_time=spec.acquire_time if holder == self.identity else now, renew_time=now,
            lease_transitions=transitions)
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)   # carries resourceVersion
        except ApiException as e:
            if e.status == 409:   # changed since we read it: someone else renewed or took it
                return False
            raise
        if holder != self.identity:
            log.info("took the lease %s/%s from %s", self.namespace, self.name, holder or "nobody")
        return True

    def release(self) -> None:
        """Give the Lease up (a clean shutdown): the next candidate need not wait for it to expire."""
        if not self.leading:
            return
        self._leading.clear()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if (lease.spec.holder_identity or None) == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = _now()
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as e:
            log.warning("could not release the lease: %s", e.reason)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Acquire, then renew until stopped or lost (blocking; run it in a thread)."""
        while not self._stop.is_set() and not self.leading:
            try:
                if self.try_acquire_or_renew():
                    self._leading.set()
                    log.info("leading as %s (lease %s/%s)", self.identity, self.namespace, self.name)
            except Exception as e:   # the API server unreachable: a candidate keeps trying
                log.warning("leader election: %s", e)
            if not self.leading:
                self._stop.wait(self.retry_period)
        last_renewed = self.clock()
        while not self._stop.wait(self.retry_period):
            try:
                if self.try_acquire_or_renew():
                    last_renewed = self.clock()
                    continue
                lost = "another replica holds the lease"
            except Exception as e:
                lost = f"cannot renew the lease: {e}"
                if self.clock() - last_renewed < self.renew_deadline:
                    log.warning("%s (retrying)", lost)
                    continue
            log.error("leadership lost: %s", lost)
            self._leading.clear()
            if self.on_lost is not None:
                self.on_lost()
            return

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="leader-election", daemon=True)
        thread.start()
        return thread

    def wait_until_leading(self, timeout: float | None = None) -> bool:
        return self._leading.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self.release()
