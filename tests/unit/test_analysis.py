"""Analysis providers against real runtime metrics text (model_runtime.metrics produces it) and
Prometheus API answers; the verdict's counting; the state survives a JSON round trip (restart)."""

import json
import urllib.parse
from dataclasses import replace

import pytest
from moe_operator import names
from moe_operator.analysis import Context, analyse, judge_slo
from moe_operator.analysis import metrics_text as mt
from moe_operator.analysis.builtin import ScrapeProvider
from moe_operator.analysis.prometheus import PrometheusProvider, queries
from moe_operator.observe import observed_from
from moe_operator.rollout import FAIL, INCONCLUSIVE, PASS, PENDING
from moe_operator.spec import AnalysisSpec, ModelDeployment, SLOSpec

from model_runtime import metrics as runtime_metrics
from model_runtime.metrics import RuntimeMetrics

pytestmark = pytest.mark.unit

SLO = SLOSpec(p99_latency_ms=500, ttft_p99_ms=300, max_error_rate=0.05)


def test_metric_names_match_the_runtime():
    assert mt.E2E_REQUEST_LATENCY == runtime_metrics.E2E_REQUEST_LATENCY
    assert mt.TIME_TO_FIRST_TOKEN == runtime_metrics.TIME_TO_FIRST_TOKEN
    assert mt.REQUEST_SUCCESS == runtime_metrics.REQUEST_SUCCESS
    assert mt.REQUEST_FAILURE == runtime_metrics.REQUEST_FAILURE
    assert mt.SERVER_FAILURE_REASONS == runtime_metrics.SERVER_FAILURE_REASONS


def serve(m, n, latency, ttft=None, failures=0, reason="injected"):
    for _ in range(n):
        m.e2e.observe(latency)
        m.ttft.observe(latency / 2 if ttft is None else ttft)
        m.request_succeeded("stop")
    for _ in range(failures):
        m.request_failed(reason)


def test_snapshot_delta_and_quantile_from_real_exposition():
    m = RuntimeMetrics("chat")
    serve(m, 100, 0.3)
    first = mt.snapshot(m.exposition().decode())
    assert first["ok"] == 100 and first["failedAll"] == 0
    # 99th of 100 observations in (0.25, 0.5]: interpolated as histogram_quantile does.
    assert mt.quantile(0.99, first["e2e"]) == pytest.approx(0.25 + 0.25 * 0.99)
    serve(m, 50, 2.5, failures=5)
    serve(m, 0, 0, failures=3, reason="cancelled")
    d = mt.delta(mt.snapshot(m.exposition().decode()), first)
    assert d["ok"] == 50 and d["failed"] == 5 and d["failedAll"] == 8
    assert 2.0 < mt.quantile(0.99, d["e2e"]) <= 3.0
    assert mt.error_rate(d) == pytest.approx(5 / 58)
    # A restarted pod (counters back to zero) counts from its restart.
    fresh = RuntimeMetrics("chat")
    serve(fresh, 3, 0.1)
    assert mt.delta(mt.snapshot(fresh.exposition().decode()), first)["ok"] == 3
    assert mt.quantile(0.99, {"0.1": 0.0, "+Inf": 0.0}) is None
    assert mt.quantile(0.5, {"0.1": 0.0, "+Inf": 4.0}) == 0.1     # beyond the last bucket: its bound


@pytest.mark.parametrize("p99,ttft,err,samples,result", [
    (0.1, 0.05, 0.0, 100, "pass"),
    (0.9, 0.05, 0.0, 100, "fail"),
    (0.1, 0.5, 0.0, 100, "fail"),
    (0.1, 0.05, 0.2, 100, "fail"),
    (0.1, 0.05, 0.0, 3, "inconclusive"),
    (None, None, None, 0, "inconclusive"),
    (0.9, 0.05, 0.0, 4, "fail"),          # few requests, every one of them far too slow
])
def test_judge_slo(p99, ttft, err, samples, result):
    assert judge_slo(SLO, p99, ttft, err, samples, min_samples=10).result == result


# --- the built-in scrape provider ----------------------------------------------------------------

def pod(name, revision, ip, ready=True, rank=0):
    return {"metadata": {"name": name, "uid": name, "labels": {
        names.LABEL_REVISION: revision, names.LABEL_TRACK: "canary", names.LABEL_REPLICA: name[-1],
        names.LABEL_RANK: str(rank), names.LABEL_IN_ROTATION: "true"}},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def md(**analysis):
    return ModelDeployment.from_body({"metadata": {"name": "chat", "namespace": "ns"}, "spec": {
        "replicas": 2, "model": {"source": "builtin:tiny-deepseek-v3"},
        "rollout": {"analysis": {"interval": "10s", "slo": {"p99LatencyMs": 500, "ttftP99Ms": 300,
                                                            "maxErrorRate": 0.05}, **analysis}}}})


class Pods:
    """Runtime metrics per pod IP, served as `/metrics` text by the real metrics module."""

    def __init__(self, **by_ip):
        self.by_ip = by_ip
        self.urls = []

    def fetch(self, url):
        self.urls.append(url)
        ip = url.split("//")[1].split(":")[0]
        if ip not in self.by_ip:
            raise OSError("connection refused")
        return self.by_ip[ip].exposition().decode()


def context(observed_pods, now, config=None, spec=None):
    spec = spec or md()
    return Context(spec, observed_from(observed_pods, [], 1), "rev-b", "rev-a", now,
                   config or spec.rollout.analysis)


def roundtrip(state):
    return json.loads(json.dumps(state))


def test_scrape_provider_passes_then_fails_after_the_failure_limit():
    a, b = RuntimeMetrics("chat"), RuntimeMetrics("chat")
    pods = Pods(**{"127.100.0.5": a, "127.100.0.6": b})
    provider = ScrapeProvider(fetch=pods.fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5"), pod("c-1", "rev-b", "127.100.0.6"),
                pod("s-0", "rev-a", "127.100.0.7")]
    serve(a, 30, 0.1)
    serve(b, 30, 0.2)
    verdict, state = analyse(context(observed, 100.0), None, provider)
    assert verdict.result == PASS and state["passes"] == 1
    assert pods.urls == ["http://127.100.0.5:8000/metrics", "http://127.100.0.6:8000/metrics"]
    # Not due yet: no scrape.
    verdict, state = analyse(context(observed, 105.0), roundtrip(state), provider)
    assert len(pods.urls) == 2 and verdict.result == PASS
    # The next interval is slow: one failure is tolerated (failureLimit 1), two are not.
    serve(a, 30, 2.0)
    verdict, state = analyse(context(observed, 110.0), roundtrip(state), provider)
    assert verdict.result == PENDING and state["failures"] == 1
    serve(a, 30, 2.0)
    verdict, state = analyse(context(observed, 120.0), roundtrip(state), provider)
    assert verdict.result == FAIL and "p99 latency" in verdict.message
    assert verdict.figures["p99LatencyMs"] > 500


def test_scrape_provider_counts_server_errors():
    a = RuntimeMetrics("chat")
    provider = ScrapeProvider(fetch=Pods(**{"127.100.0.5": a}).fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5")]
    state = None
    for t in (0.0, 10.0):
        serve(a, 20, 0.1, failures=10)
        verdict, state = analyse(context(observed, t), roundtrip(state or {}), provider)
    assert verdict.result == FAIL and "error rate" in verdict.message


def test_no_traffic_is_inconclusive_never_a_pass():
    a = RuntimeMetrics("chat")
    provider = ScrapeProvider(fetch=Pods(**{"127.100.0.5": a}).fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5")]
    state, results = None, []
    for t in (0.0, 10.0, 20.0):
        verdict, state = analyse(context(observed, t), state, provider)
        results.append(verdict.result)
    assert results == [PENDING, PENDING, INCONCLUSIVE]


def test_nothing_serving_yet_is_not_measured():
    provider = ScrapeProvider(fetch=Pods().fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5", ready=False), pod("s-0", "rev-a", "127.100.0.7")]
    for t in (0.0, 10.0, 20.0, 30.0):
        verdict, state = analyse(context(observed, t), None, provider)
        assert verdict.result == PENDING and state["inconclusive"] == 0


def test_ratio_to_stable():
    canary, stable = RuntimeMetrics("chat"), RuntimeMetrics("chat")
    provider = ScrapeProvider(fetch=Pods(**{"127.100.0.5": canary, "127.100.0.7": stable}).fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5"), pod("s-0", "rev-a", "127.100.0.7")]
    serve(canary, 40, 0.45)           # within the SLO, but 4x stable
    serve(stable, 40, 0.09)
    spec = md()
    config = AnalysisSpec(interval_seconds=10, slo=spec.rollout.analysis.slo, failure_limit=0, stable_ratio=2.0)
    verdict, state = analyse(context(observed, 0.0, config), None, provider)
    assert verdict.result == FAIL and "x stable" in verdict.message
    assert state["measurements"][-1]["figures"]["ratioToStable"] > 2


def test_no_thresholds_means_no_analysis():
    spec = ModelDeployment.from_body({"metadata": {"name": "chat"}, "spec": {"model": {"source": "builtin:x"}}})
    verdict, state = analyse(context([], 0.0, spec=spec), None, ScrapeProvider(fetch=Pods().fetch))
    assert verdict is None and state == {}


# --- PromQL --------------------------------------------------------------------------------------

def vector(value):
    return {"status": "success", "data": {"resultType": "vector", "result": [] if value is None else [
        {"metric": {}, "value": [1700000000.0, str(value)]}]}}


class FakePrometheus:
    def __init__(self, answers):
        self.answers = answers     # key in queries() -> value or None
        self.seen = []

    def fetch(self, url):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["query"][0]
        self.seen.append(query)
        for key, text in queries(self.selector, self.window).items():
            if text == query:
                return vector(self.answers.get(key))
        raise AssertionError(query)


def prom_ctx(now, answers):
    spec = md(prometheus={"url": "http://127.0.0.1:9090"})
    fake = FakePrometheus(answers)
    fake.selector = 'namespace="ns",serving_moe_dev_deployment="chat",serving_moe_dev_revision="rev-b"'
    fake.window = "10s"
    return context([pod("c-0", "rev-b", "127.100.0.5")], now, spec=spec), PrometheusProvider(fetch=fake.fetch), fake


def test_promql_pass_fail_and_no_data():
    ctx, provider, fake = prom_ctx(0.0, {"samples": 120, "p99": 0.2, "ttftP99": 0.1, "errorRate": 0.0})
    verdict, _ = analyse(ctx, None, provider)
    assert verdict.result == PASS and len(fake.seen) == 4
    assert 'serving_moe_dev_revision="rev-b"' in fake.seen[1] and "[10s]" in fake.seen[1]

    ctx, provider, _ = prom_ctx(0.0, {"samples": 120, "p99": 0.9, "ttftP99": 0.1, "errorRate": 0.0})
    ctx = Context(ctx.md, ctx.observed, ctx.revision, ctx.stable_revision, 0.0,
                  replace(ctx.md.rollout.analysis, failure_limit=0))
    assert analyse(ctx, None, provider)[0].result == FAIL

    state, results = None, []
    for t in (0.0, 10.0, 20.0):
        ctx, provider, _ = prom_ctx(t, {})          # no data at all
        verdict, state = analyse(ctx, state, provider)
        results.append(verdict.result)
    assert results == [PENDING, PENDING, INCONCLUSIVE] and "no data" in verdict.message


def test_promql_unreachable_is_inconclusive():
    spec = md(prometheus={"url": "http://127.0.0.1:1"})

    def refuse(url):
        raise OSError("connection refused")

    verdict, state = analyse(context([pod("c-0", "rev-b", "127.100.0.5")], 0.0, spec=spec), None,
                             PrometheusProvider(fetch=refuse))
    assert verdict.result == PENDING and state["measurements"][-1]["result"] == "inconclusive"
    assert "did not answer" in state["measurements"][-1]["message"]
