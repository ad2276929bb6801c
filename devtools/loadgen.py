"""Steady, bounded load through a Service (KServe v2 infer with NVIDIA's tritonclient), for the demo,
the end-to-end tests and the rollback benchmark.

Each request opens its own connection, so the Service (kube-proxy, or the devcluster's proxy, which
balances connections) spreads requests over the replica groups in rotation as a real client fleet
would. Every loop is bounded in count and time. Each result keeps the revision that answered it
(the runtime's `x-moe-revision` response header), so a test can tell which revision served when.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

REVISION_HEADER = "x-moe-revision"   # = model_runtime.serving.config.REVISION_HEADER (the operator image has no runtime)


@dataclass
class Result:
    at: float            # time.time() when the request finished
    ok: bool
    seconds: float
    error: str = ""
    revision: str = ""   # the answering pod's x-moe-revision header ("" when none came back)


@dataclass
class Load:
    url: str                         # host:port of the Service's http port
    model: str
    rate: float = 4.0                # requests per second over all workers
    workers: int = 2
    max_requests: int = 20_000
    max_seconds: float = 1800.0
    prompt: str = "The experts of a mixture route each token to"
    max_tokens: int = 8
    timeout: float = 30.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._issued = 0

    # --- the requests --------------------------------------------------------------------------
    def _inputs(self):
        text = httpclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([self.prompt.encode()], dtype=np.object_))
        params = httpclient.InferInput("sampling_parameters", [1], "BYTES")
        sampling = {"max_tokens": self.max_tokens, "temperature": 0}
        params.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        stream = httpclient.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([False]))
        return [text, params, stream]

    def one(self) -> Result:
        started = time.monotonic()
        revision = ""
        try:
            client = httpclient.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                      network_timeout=self.timeout)
            post = client._post

            def post_keeping_revision(*args, **kwargs):
                # InferResult keeps the body only; the header is read off the raw response here.
                nonlocal revision
                response = post(*args, **kwargs)
                revision = response.get(REVISION_HEADER) or ""
                return response

            client._post = post_keeping_revision
            try:
                response = client.infer(self.model, self._inputs())
                response.as_numpy("text_output")
            finally:
                client.close()
            return Result(time.time(), True, time.monotonic() - started, revision=revision)
        except Exception as error:     # every failure a client would see counts
            return Result(time.time(), False, time.monotonic() - started, f"{type(error).__name__}: {error}"[:200],
                          revision)

    def _worker(self, index: int) -> None:
        period = self.workers / self.rate
        next_at = time.monotonic() + index * period / self.workers
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self._issued >= self.max_requests:
                    return
                self._issued += 1
            result = self.one()
            with self._lock:
                self.results.append(result)
            next_at = max(next_at + period, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    # --- control -------------------------------------------------------------------------------
    def start(self) -> Load:
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *_):
        self.stop()

    # --- figures -------------------------------------------------------------------------------
    def counts(self, since: float = 0.0) -> tuple[int, int]:
        """(failed, total) of the requests that finished after `since` (time.time())."""
        with self._lock:
            done = [r for r in self.results if r.at >= since]
        return sum(not r.ok for r in done), len(done)

    def recent(self, seconds: float = 5.0) -> tuple[int, int, float | None]:
        """(failed, total, p50 latency) over the last seconds."""
        now = time.time()
        with self._lock:
            done = [r for r in self.results if r.at >= now - seconds]
        ok = sorted(r.seconds for r in done if r.ok)
        return sum(not r.ok for r in done), len(done), (ok[len(ok) // 2] if ok else None)

    def served(self, since: float = 0.0) -> list[Result]:
        """The results that finished after `since` (time.time()), in order: each with its revision."""
        with self._lock:
            return [r for r in self.results if r.at >= since]

    def errors(self, limit: int = 5) -> list[str]:
        with self._lock:
            return [r.error for r in self.results if not r.ok][-limit:]


def service_port(state_dir: Path, namespace: str, name: str, port: str = "http", timeout: float = 30.0) -> int:
    """The devcluster proxy's local port of a Service (from its state file), polled until known."""
    path = Path(state_dir) / "services.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            ports = json.loads(path.read_text()).get(f"{namespace}/{name}") or {}
            if port in ports:
                return int(ports[port])
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the devcluster proxy has no port for Service {namespace}/{name} ({port})")
        time.sleep(0.2)
