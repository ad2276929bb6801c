"""Client-side rate limits on the operator's own API calls, as controller-runtime's client has
(`--kube-api-qps`, `--kube-api-burst`): a token bucket in front of every request the reconciles make
(reads and writes), so a resync of thousands of ModelDeployments, or a bug that loops, cannot flood
the API server; the API server's priority and fairness then has the last word.

The defaults are set by what a converged operator needs (nothing: it reads from its caches) and by
what a mass change costs: a new ModelDeployment of 2 one-GPU groups takes 11 writes until Available
(2 pods, 2 Services, 2 status patches, 2 pod relabels into rotation, the revision record and its
result, an Event; `python -m benchmarks.operator_scale` prints them), so 500 applied at once are
5,500 writes: 110 s at 50 a second, 55 s at 100. controller-runtime has since dropped its
client-side limit altogether in favour of priority and fairness; 100 keeps a bound (a looping bug
costs the API server at most that) while a mass apply is not held back by it (decision 28).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEFAULT_QPS = 100.0   # sustained requests per second
DEFAULT_BURST = 200   # requests that may go at once after a quiet spell


class TokenBucket:
    """`qps` tokens a second, at most `burst` saved up; `acquire()` blocks until one is there and
    returns how long it waited. qps <= 0: no limit."""

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.qps, self.burst = float(qps), int(burst)
        self.clock, self.sleep = clock, sleep
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        if self.qps <= 0:
            return 0.0
        with self._lock:   # reserve a token now (possibly going into debt), then sleep off the debt
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)
        return wait


def limit_api_client(api_client, bucket: TokenBucket, on_wait: Callable[[float], None] | None = None):
    """Make every request of a kubernetes `ApiClient` (and of the dynamic client built on it) take a
    token first. Returns the client."""
    call = api_client.call_api

    def limited(*args, **kwargs):
        waited = bucket.acquire()
        if waited and on_wait is not None:
            on_wait(waited)
        return call(*args, **kwargs)

    api_client.call_api = limited
    return api_client
