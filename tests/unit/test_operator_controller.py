"""The controller's run loop (coalescing, body store), the kopf settings, the HTTP port and the CLI."""

import threading

import kopf
import pytest
from aiohttp.test_utils import TestClient, TestServer
from moe_operator.api import names
from moe_operator.app.cli import parser
from moe_operator.app.controller import Controller
from moe_operator.app.handlers import configure
from moe_operator.app.metrics import OperatorMetrics
from moe_operator.app.server import build_app
from moe_operator.world.observe import Observed

pytestmark = pytest.mark.unit


def md_body(rv="1", name="m"):
    return {"metadata": {"name": name, "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": rv},
            "spec": {"model": {"source": "builtin:tiny-mixtral"}}, "status": {}}


class SlowReader:
    """Blocks the first observe until released, to make triggers arrive while a reconcile runs."""

    def __init__(self):
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def observe(self, namespace, name, pods_per_replica):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(5)
        return Observed(pods_per_replica=pods_per_replica)


class RecordingWriter:
    def __init__(self):
        self.status = []
        self.events = []

    def write(self, namespace, changes):
        pass

    def patch_status(self, namespace, name, patch, resource_version=None):
        self.status.append(patch)
        body = md_body(rv="100")
        body["status"] = dict(patch)
        return body

    def event(self, body, type_, reason, message):
        self.events.append(reason)


def test_triggers_during_a_reconcile_coalesce_into_one_more_pass():
    reader, writer = SlowReader(), RecordingWriter()
    controller = Controller(reader, writer)
    controller.remember(md_body())
    first = threading.Thread(target=controller.run, args=(("ns", "m"),))
    first.start()
    assert reader.entered.wait(5)
    for _ in range(5):                       # five pod events while the first pass runs
        assert controller.run(("ns", "m")) is None
    reader.release.set()
    first.join(5)
    assert reader.calls == 2                  # one more pass, not five
    # The status write's result is remembered: the second pass saw it and wrote nothing more.
    assert len(writer.status) == 1


def test_store_keeps_the_newest_body_and_forgets_deleted():
    controller = Controller(SlowReader(), RecordingWriter())
    controller.remember(md_body(rv="5"))
    controller.remember(md_body(rv="3"))
    assert controller.body(("ns", "m"))["metadata"]["resourceVersion"] == "5"
    controller.forget(("ns", "m"))
    assert controller.keys() == []
    assert controller.run(("ns", "m")) is None


def test_kopf_bookkeeping_lives_under_the_project_prefix():
    settings = configure(kopf.OperatorSettings())
    assert settings.persistence.finalizer == "serving.moe.dev/finalizer"
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert settings.persistence.progress_storage.prefix == names.PREFIX
    assert settings.persistence.diffbase_storage.prefix == names.PREFIX
    assert settings.queueing.worker_limit == 64     # bounded: a relist of thousands must not run all at once


def test_cli_flags():
    args = parser().parse_args(["run", "-n", "a", "-n", "b", "--port", "9000", "--resync-seconds", "2"])
    assert (args.namespace, args.port, args.resync_seconds, args.all_namespaces) == (["a", "b"], 9000, 2, False)
    assert parser().parse_args(["run", "--all-namespaces"]).all_namespaces
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "-n", "a", "-A"])


async def test_healthz_and_metrics():
    metrics = OperatorMetrics()
    metrics.reconciles.labels("ok").inc()
    ready = threading.Event()
    async with TestClient(TestServer(build_app(metrics, ready.is_set))) as http:
        assert (await http.get("/healthz")).status == 503
        ready.set()
        assert (await http.get("/healthz")).status == 200
        text = await (await http.get("/metrics")).text()
        assert 'moe_operator_reconcile_total{result="ok"} 1.0' in text
        assert "moe_operator_reconcile_duration_seconds_bucket" in text


def test_work_queue_depth_and_reconcile_latency_by_result():
    import time as _time

    from moe_operator.app.controller import Controller

    started, release = threading.Event(), threading.Event()

    class SlowReader:
        def observe(self, *args):
            started.set()
            release.wait(5)
            raise RuntimeError("the API server is down")

    metrics = OperatorMetrics()
    controller = Controller(SlowReader(), writer=None, metrics=metrics)
    body = {"metadata": {"name": "a", "namespace": "ns", "resourceVersion": "1"},
            "spec": {"model": {"source": "builtin:tiny-mixtral"}}}
    controller.remember(body)
    worker = threading.Thread(target=lambda: pytest.raises(RuntimeError, controller.run, ("ns", "a")))
    worker.start()
    assert started.wait(5)
    controller.run(("ns", "a"))   # a trigger while it runs: one more pass is due
    assert metrics.workqueue_depth._value.get() == 2
    release.set()
    worker.join(5)
    deadline = _time.monotonic() + 5
    while metrics.workqueue_depth._value.get() and _time.monotonic() < deadline:
        _time.sleep(0.01)
    assert metrics.workqueue_depth._value.get() == 0
    assert metrics.reconcile_seconds.labels("error")._sum.get() > 0
