"""The autoscaler's signal (moe_operator.autoscaling.signals) from real runtime metrics text (model_runtime.serving.metrics
produces it) and from Prometheus API answers; which pods are scraped."""

import json
import urllib.parse
from types import SimpleNamespace

import pytest
from moe_operator.autoscaling import signals
from moe_operator.autoscaling.decision import Settings
from moe_operator.world.observe import observed_from

from model_runtime.serving import metrics as runtime_metrics
from model_runtime.serving.metrics import RuntimeMetrics

pytestmark = pytest.mark.unit


def test_gauge_names_match_the_runtime():
    assert signals.NUM_REQUESTS_RUNNING == runtime_metrics.NUM_REQUESTS_RUNNING
    assert signals.NUM_REQUESTS_WAITING == runtime_metrics.NUM_REQUESTS_WAITING
    assert signals.KV_CACHE_USAGE_PERC == runtime_metrics.KV_CACHE_USAGE


def exposition(running, waiting, kv=0.25, ttft=(), metrics=None):
    stats = SimpleNamespace(num_running=running, num_waiting=waiting, kv_cache_usage=kv, expert_tokens={})
    m = metrics or RuntimeMetrics("chat", engine_stats=lambda: stats)
    for t in ttft:
        m.ttft.observe(t)
        m.request_succeeded("stop")
    return m, m.exposition().decode()


def test_requests_waiting_from_the_runtime_gauges():
    _, a = exposition(2, 3)
    _, b = exposition(2, 1)
    _, c = exposition(1, 0)
    sig, memory = signals.from_scrapes("requestsWaiting", {"a": a, "b": b, "c": c}, {})
    assert sig.groups == 3 and sig.running == 5 and sig.waiting == 4
    assert sig.value == pytest.approx(4 / 3)
    assert sig.saturated_slots == 2          # groups with a queue run 2 at once
    assert memory == {}


def test_kv_cache_usage_mean_and_total():
    _, a = exposition(1, 0, kv=0.5)
    _, b = exposition(1, 0, kv=0.9)
    sig, _ = signals.from_scrapes("kvCacheUsage", {"a": a, "b": b}, {})
    assert sig.value == pytest.approx(0.7) and sig.total == pytest.approx(1.4)


def test_ttft_p99_from_histogram_deltas_between_samples():
    m, first = exposition(1, 0, ttft=[0.05] * 50)
    sig, memory = signals.from_scrapes("ttftP99", {"a": first}, {})
    assert sig.error and "first sample" in sig.error          # no interval yet, and something runs
    # The next interval's first tokens are slow: only they count.
    _, second = exposition(1, 0, ttft=[1.5] * 20, metrics=m)
    memory = json.loads(json.dumps(memory))                    # kept in status between samples
    sig, memory = signals.from_scrapes("ttftP99", {"a": second}, memory)
    assert 1000 < sig.value <= 2500
    # Nothing new and nothing running: idle reads as 0, not as "no data".
    idle = RuntimeMetrics("chat", engine_stats=lambda: SimpleNamespace(
        num_running=0, num_waiting=0, kv_cache_usage=0.0, expert_tokens={}))
    for _ in range(70):
        idle.ttft.observe(0.05)
        idle.request_succeeded("stop")
    text = idle.exposition().decode()
    sig, memory = signals.from_scrapes("ttftP99", {"a": text}, {"a": signals.snapshot(text)})
    assert sig.value == 0.0
    # Requests in flight but no first token in the interval: no signal (hold).
    _, busy = exposition(3, 2)
    sig, _ = signals.from_scrapes("ttftP99", {"a": busy}, {"a": signals.snapshot(busy)})
    assert sig.value is None and "no request got its first token" in sig.error


def test_no_answer_is_no_signal():
    sig, _ = signals.from_scrapes("requestsWaiting", {}, {})
    assert not sig.usable and "no ready group" in sig.error


def _pod(replica, rank=0, ready=True, in_rotation=True, ip=True):
    labels = {"serving.moe.dev/deployment": "chat", "serving.moe.dev/revision": "r1",
              "serving.moe.dev/track": "stable", "serving.moe.dev/replica": str(replica),
              "serving.moe.dev/rank": str(rank), "serving.moe.dev/in-rotation": str(in_rotation).lower()}
    status = {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]}
    if ip:
        status["podIP"] = f"127.100.0.{replica * 4 + rank + 1}"
    return {"metadata": {"name": f"chat-r1-{replica}-{rank}", "uid": f"u{replica}{rank}", "labels": labels},
            "status": status}


def test_collect_scrapes_ready_in_rotation_group_leaders_only():
    pods = [_pod(0), _pod(0, rank=1), _pod(1, ready=False), _pod(2, in_rotation=False), _pod(3, ip=False),
            _pod(4)]
    observed = observed_from(pods, [], 2)
    fetched = []
    _, text = exposition(2, 2)

    def fetch(url):
        fetched.append(url)
        if "127.100.0.17" in url:
            raise OSError("connection refused")          # an unreachable pod is not counted
        return text

    sig, _ = signals.collect(Settings(metric="requestsWaiting"), "ns", "chat", observed, {}, fetch=fetch)
    assert set(fetched) == {"http://127.100.0.1:8000/metrics", "http://127.100.0.17:8000/metrics"}
    assert sig.groups == 1 and sig.waiting == 2 and sig.source == "scrape"


def prometheus(answers):
    asked = []

    def fetch_json(url):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["query"][0]
        asked.append(query)
        for needle, value in answers.items():
            if needle in query:
                result = [] if value is None else [{"metric": {}, "value": [0, str(value)]}]
                return {"status": "success", "data": {"resultType": "vector", "result": result}}
        return {"status": "success", "data": {"resultType": "vector", "result": []}}

    return fetch_json, asked


def test_promql_metric_asks_prometheus():
    fetch_json, asked = prometheus({"my_queue": 42})
    s = Settings(metric="PromQL", target=10, query="sum(my_queue)", prometheus_url="http://127.0.0.1:9090")
    sig, _ = signals.collect(s, "ns", "chat", observed_from([_pod(0)], [], 1), {}, fetch_json=fetch_json)
    assert asked == ["sum(my_queue)"] and sig.value == 42 and sig.source == "prometheus"
    fetch_json, _ = prometheus({"my_queue": None})
    sig, _ = signals.collect(s, "ns", "chat", observed_from([], [], 1), {}, fetch_json=fetch_json)
    assert not sig.usable and "no data" in sig.error


def test_builtin_metrics_from_prometheus_select_the_serving_leaders():
    fetch_json, asked = prometheus({"count(": 2, "sum(moe_num_requests_running": 4, "sum(moe_num_requests_waiting": 6})
    s = Settings(metric="requestsWaiting", prometheus_url="http://127.0.0.1:9090")
    sig, _ = signals.collect(s, "ns", "chat", observed_from([], [], 1), {}, fetch_json=fetch_json)
    assert (sig.groups, sig.running, sig.waiting, sig.value) == (2, 4, 6, 3)
    assert all('serving_moe_dev_deployment="chat"' in q and 'serving_moe_dev_in_rotation="true"' in q
               for q in asked)
    assert not signals.from_prometheus(Settings(metric="PromQL", query="x"), "ns", "chat", 1).usable


def test_prometheus_down_is_no_signal():
    def down(url):
        raise OSError("connection refused")

    s = Settings(metric="kvCacheUsage", prometheus_url="http://127.0.0.1:1")
    sig = signals.from_prometheus(s, "ns", "chat", 1, fetch_json=down)
    assert not sig.usable and "did not answer" in sig.error


def test_a_selector_keeps_its_own_braces():
    fetch_json, asked = prometheus({"count(": 2, "sum(moe_num_requests_running": 4, "sum(moe_num_requests_waiting": 6})
    s = Settings(metric="requestsWaiting", prometheus_url="http://127.0.0.1:9090")
    sig = signals.from_prometheus(s, "ns", "chat", 2, fetch_json=fetch_json,
                                  selector='namespace="{namespace}",model_name=~"{name}-.{3}"')
    assert sig.usable and sig.value == 3 and len(asked) == 3
    assert all('{namespace="ns",model_name=~"chat-.{3}"}' in q for q in asked)
    sig = signals.from_prometheus(s, "ns", "chat", 2, fetch_json=fetch_json, selector='model_name="{nmae}"')
    assert not sig.usable and "unknown placeholder {nmae}" in sig.error and len(asked) == 3
