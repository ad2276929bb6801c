"""Analysis providers against real runtime metrics text (model_runtime.serving.metrics produces it) and
Prometheus API answers; the verdict's counting; the state survives a JSON round trip (restart), holds
no per-pod snapshots and does not change when an interval reaches the same verdict; selectors keep
their own braces; a configuration error is a verdict naming the field, not an exception."""

import json
import urllib.parse
from dataclasses import replace

import pytest
from moe_operator.analysis import STATE_KEYS, Baselines, Context, analyse, judge_slo
from moe_operator.analysis import metrics_text as mt
from moe_operator.analysis.builtin import ScrapeProvider
from moe_operator.analysis.prometheus import PrometheusProvider, fill_selector, queries
from moe_operator.analysis.verdict import FAIL, INCONCLUSIVE, PASS, PENDING
from moe_operator.api import names
from moe_operator.api.spec import AnalysisSpec, ModelDeployment, SLOSpec
from moe_operator.world.observe import observed_from

from model_runtime.serving import metrics as runtime_metrics
from model_runtime.serving.metrics import RuntimeMetrics

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
    verdict, state, memo = analyse(context(observed, 100.0), None, provider)
    assert verdict.result == PASS and state["measurements"][-1]["result"] == "pass"
    assert pods.urls == ["http://127.100.0.5:8000/metrics", "http://127.100.0.6:8000/metrics"]
    # Not due yet: no scrape.
    verdict, state, memo = analyse(context(observed, 105.0), roundtrip(state), provider, memo)
    assert len(pods.urls) == 2 and verdict.result == PASS
    # The next interval is slow: one failure is tolerated (failureLimit 1), two are not.
    serve(a, 30, 2.0)
    verdict, state, memo = analyse(context(observed, 110.0), roundtrip(state), provider, memo)
    assert verdict.result == PENDING and state["failures"] == 1
    serve(a, 30, 2.0)
    verdict, state, memo = analyse(context(observed, 120.0), roundtrip(state), provider, memo)
    assert verdict.result == FAIL and "p99 latency" in verdict.message
    assert verdict.figures["p99LatencyMs"] > 500


def test_scrape_provider_counts_server_errors():
    a = RuntimeMetrics("chat")
    provider = ScrapeProvider(fetch=Pods(**{"127.100.0.5": a}).fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5")]
    state, memo = None, None
    for t in (0.0, 10.0):
        serve(a, 20, 0.1, failures=10)
        verdict, state, memo = analyse(context(observed, t), roundtrip(state or {}), provider, memo)
    assert verdict.result == FAIL and "error rate" in verdict.message


def test_no_traffic_is_inconclusive_never_a_pass():
    a = RuntimeMetrics("chat")
    provider = ScrapeProvider(fetch=Pods(**{"127.100.0.5": a}).fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5")]
    state, memo, results = None, None, []
    for t in (0.0, 10.0, 20.0):
        verdict, state, memo = analyse(context(observed, t), state, provider, memo)
        results.append(verdict.result)
    assert results == [PENDING, PENDING, INCONCLUSIVE]


def test_nothing_serving_yet_is_not_measured():
    provider = ScrapeProvider(fetch=Pods().fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5", ready=False), pod("s-0", "rev-a", "127.100.0.7")]
    for t in (0.0, 10.0, 20.0, 30.0):
        verdict, state, _ = analyse(context(observed, t), None, provider)
        assert verdict.result == PENDING and state["inconclusive"] == 0


def test_ratio_to_stable():
    canary, stable = RuntimeMetrics("chat"), RuntimeMetrics("chat")
    provider = ScrapeProvider(fetch=Pods(**{"127.100.0.5": canary, "127.100.0.7": stable}).fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5"), pod("s-0", "rev-a", "127.100.0.7")]
    serve(canary, 40, 0.45)           # within the SLO, but 4x stable
    serve(stable, 40, 0.09)
    spec = md()
    config = AnalysisSpec(interval_seconds=10, slo=spec.rollout.analysis.slo, failure_limit=0, stable_ratio=2.0)
    verdict, state, _ = analyse(context(observed, 0.0, config), None, provider)
    assert verdict.result == FAIL and "x stable" in verdict.message
    assert state["measurements"][-1]["figures"]["ratioToStable"] > 2


def test_no_thresholds_means_no_analysis():
    spec = ModelDeployment.from_body({"metadata": {"name": "chat"}, "spec": {"model": {"source": "builtin:x"}}})
    verdict, state, memo = analyse(context([], 0.0, spec=spec), None, ScrapeProvider(fetch=Pods().fetch))
    assert verdict is None and state == {} and memo is None


def test_an_interval_with_the_same_verdict_changes_nothing_in_status():
    """A rollout waiting at a pause is analysed every interval; only a change of count or result is
    written to status, and per-pod snapshots never are (they are the memo, in the operator's memory)."""
    a = RuntimeMetrics("chat")
    provider = ScrapeProvider(fetch=Pods(**{"127.100.0.5": a}).fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5")]
    states, memo = [], None

    def interval(t, requests, latency=0.1):
        nonlocal memo
        serve(a, requests, latency)
        verdict, state, memo = analyse(context(observed, t), roundtrip(states[-1]) if states else None,
                                       provider, memo)
        states.append(state)
        return verdict.result

    assert [interval(t, 30) for t in (0.0, 10.0, 20.0, 30.0)] == [PASS] * 4
    assert states[0] == states[1] == states[2] == states[3], "passing at a pause writes nothing"
    assert set(states[0]) <= set(STATE_KEYS) and "e2e" not in json.dumps(states[0])
    assert memo["lastAt"] == 30.0 and set(memo["memory"]["canary"]) == {"c-0"}
    assert interval(40.0, 30, latency=2.0) == PENDING and states[-1]["failures"] == 1     # a count changed
    assert interval(50.0, 30) == PASS and states[-1] != states[-2]                        # the result changed
    assert interval(60.0, 30) == PASS and states[-1] == states[-2]
    # No traffic: inconclusive intervals are counted up to the limit, then nothing changes.
    assert [interval(t, 0) for t in (70.0, 80.0, 90.0, 100.0, 110.0)] == [PENDING, PENDING] + [INCONCLUSIVE] * 3
    assert [s["inconclusive"] for s in states[-5:]] == [1, 2, 3, 3, 3] and states[-1] == states[-3]
    assert [m["result"] for m in states[-1]["measurements"]] == ["fail", "pass"] + ["inconclusive"] * 3


def test_a_restarted_operator_takes_new_baselines_first():
    a = RuntimeMetrics("chat")
    provider = ScrapeProvider(fetch=Pods(**{"127.100.0.5": a}).fetch)
    observed = [pod("c-0", "rev-b", "127.100.0.5")]
    serve(a, 30, 0.1)
    verdict, state, memo = analyse(context(observed, 0.0), None, provider)
    assert verdict.result == PASS
    serve(a, 200, 3.0)        # slow, while the operator was down: no interval measured it
    # Restarted: the state comes back from status, the memo is gone. The first interval is a baseline
    # (counting from the pod's start would judge its whole life as one interval).
    verdict, after_restart, memo = analyse(context(observed, 100.0), roundtrip(state), provider, None)
    assert verdict.result == PASS and after_restart == state and memo["memory"]["canary"]
    serve(a, 30, 0.1)
    verdict, state, memo = analyse(context(observed, 110.0), after_restart, provider, memo)
    assert verdict.result == PASS and state["failures"] == 0


def test_baselines_keep_one_memo_per_object_in_memory():
    baselines = Baselines(forget_after=600)
    baselines.put(("ns", "chat", "rev-b"), {"lastAt": 1.0}, now=1.0)
    baselines.put(("ns", "other", "rev-x"), {"lastAt": 1.0}, now=1.0)
    baselines.put(("ns", "chat", "rev-c"), {"lastAt": 2.0}, now=2.0)     # a newer revision replaces it
    assert baselines.get(("ns", "chat", "rev-b")) is None and baselines.get(("ns", "chat", "rev-c"))
    baselines.put(("ns", "chat", "rev-c"), {"lastAt": 700.0}, now=700.0)  # untouched for long: forgotten
    assert baselines.get(("ns", "other", "rev-x")) is None
    baselines.put(("ns", "chat", "rev-c"), None, now=701.0)               # nothing judged: nothing kept
    assert baselines.get(("ns", "chat", "rev-c")) is None


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
    verdict, _, _ = analyse(ctx, None, provider)
    assert verdict.result == PASS and len(fake.seen) == 4
    assert 'serving_moe_dev_revision="rev-b"' in fake.seen[1] and "[10s]" in fake.seen[1]

    ctx, provider, _ = prom_ctx(0.0, {"samples": 120, "p99": 0.9, "ttftP99": 0.1, "errorRate": 0.0})
    ctx = Context(ctx.md, ctx.observed, ctx.revision, ctx.stable_revision, 0.0,
                  replace(ctx.md.rollout.analysis, failure_limit=0))
    assert analyse(ctx, None, provider)[0].result == FAIL

    state, memo, results = None, None, []
    for t in (0.0, 10.0, 20.0):
        ctx, provider, _ = prom_ctx(t, {})          # no data at all
        verdict, state, memo = analyse(ctx, state, provider, memo)
        results.append(verdict.result)
    assert results == [PENDING, PENDING, INCONCLUSIVE] and "no data" in verdict.message


def test_promql_unreachable_is_inconclusive():
    spec = md(prometheus={"url": "http://127.0.0.1:1"})

    def refuse(url):
        raise OSError("connection refused")

    verdict, state, _ = analyse(context([pod("c-0", "rev-b", "127.100.0.5")], 0.0, spec=spec), None,
                                PrometheusProvider(fetch=refuse))
    assert verdict.result == PENDING and state["measurements"][-1]["result"] == "inconclusive"
    assert "did not answer" in state["measurements"][-1]["message"]


def answering(seen):
    """A Prometheus that answers every query of the analysis with passing figures."""
    def fetch(url):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["query"][0]
        seen.append(query)
        value = 0.1 if query.startswith("histogram_quantile") else 0.0 if " / " in query else 120
        return vector(value)
    return fetch


def test_a_selector_keeps_its_own_braces():
    selector = 'namespace="{namespace}",serving_moe_dev_revision="{revision}",model_name=~"chat-.{3}"'
    spec = md(prometheus={"url": "http://127.0.0.1:9090", "selector": selector})
    seen = []
    verdict, _, _ = analyse(context([pod("c-0", "rev-b", "127.100.0.5")], 0.0, spec=spec), None,
                            PrometheusProvider(fetch=answering(seen)))
    assert verdict.result == PASS and len(seen) == 4
    assert all('namespace="ns",serving_moe_dev_revision="rev-b",model_name=~"chat-.{3}"' in q for q in seen)
    assert fill_selector(r'a=~"x{2,5}",b="\\{name}",c="{name}"', "f", name="chat") == \
        r'a=~"x{2,5}",b="\\{name}",c="chat"'


@pytest.mark.parametrize("selector,answer,message", [
    ('serving_moe_dev_revision="{revison}"', None, "unknown placeholder {revison}"),
    ('model_name=~"chat-(.{3}"', {"status": "error", "errorType": "bad_data",
                                  "error": "invalid regular expression"}, "refused the query"),
])
def test_a_configuration_error_is_a_verdict_naming_the_field(selector, answer, message):
    """Not an exception out of the reconcile: Inconclusive at once (waiting does not help), which
    pauses the rollout, with the spec field to fix in the message."""
    spec = md(prometheus={"url": "http://127.0.0.1:9090", "selector": selector})
    seen = []
    fetch = (lambda url: answer) if answer else answering(seen)
    verdict, state, memo = analyse(context([pod("c-0", "rev-b", "127.100.0.5")], 0.0, spec=spec), None,
                                   PrometheusProvider(fetch=fetch))
    assert verdict.result == INCONCLUSIVE and seen == []
    assert verdict.message.startswith("spec.rollout.analysis.prometheus.selector: ") and message in verdict.message
    again, same, _ = analyse(context([pod("c-0", "rev-b", "127.100.0.5")], 10.0, spec=spec), roundtrip(state),
                             PrometheusProvider(fetch=fetch), memo)
    assert again == verdict and same == state, "the same error again writes nothing"
    # Fixed in the spec: the next interval measures, and the verdict follows it.
    fixed = md(prometheus={"url": "http://127.0.0.1:9090"})
    verdict, state, _ = analyse(context([pod("c-0", "rev-b", "127.100.0.5")], 20.0, spec=fixed), same,
                                PrometheusProvider(fetch=answering(seen)), memo)
    assert verdict.result == PASS and "invalid" not in state


def test_a_provider_that_throws_does_not_throw_out_of_the_analysis():
    class Broken:
        name = "broken"

        def measure(self, ctx, memory):
            raise KeyError("le")

    verdict, state, _ = analyse(context([pod("c-0", "rev-b", "127.100.0.5")], 0.0), None, Broken())
    assert verdict.result == PENDING and state["inconclusive"] == 1
    assert "the broken analysis failed: KeyError('le')" in state["measurements"][-1]["message"]
