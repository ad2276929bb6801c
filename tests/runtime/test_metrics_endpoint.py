"""/metrics as Prometheus scrapes it: the contract's names with label model_name, LLM-sized
histogram buckets, token and outcome counters that move with traffic, expert routing counts."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_runtime.serving import metrics

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"  # the served name of builtin:tiny-mixtral, conftest's model


def scrape(base_url: str) -> dict[str, list]:
    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_follow_traffic(runtime_server):
    before = scrape(runtime_server.base_url)
    for name in (metrics.NUM_REQUESTS_RUNNING, metrics.NUM_REQUESTS_WAITING, metrics.KV_CACHE_USAGE):
        assert [s.labels for s in before[name]] == [{"model_name": MODEL_NAME}]
    assert "process_resident_memory_bytes" in before

    r = httpx.post(
        f"{runtime_server.base_url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": "count me", "max_tokens": 7, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200
    after = scrape(runtime_server.base_url)

    assert (
        value(after, metrics.GENERATION_TOKENS, model_name=MODEL_NAME)
        - value(before, metrics.GENERATION_TOKENS, model_name=MODEL_NAME)
        == 7
    )
    assert value(after, metrics.PROMPT_TOKENS) > value(before, metrics.PROMPT_TOKENS)
    assert (
        value(after, metrics.REQUEST_SUCCESS, finished_reason="length")
        == value(before, metrics.REQUEST_SUCCESS, finished_reason="length") + 1
    )
    for histogram, buckets in (
        (metrics.TIME_TO_FIRST_TOKEN, metrics.TTFT_BUCKETS),
        (metrics.INTER_TOKEN_LATENCY, metrics.ITL_BUCKETS),
        (metrics.E2E_REQUEST_LATENCY, metrics.E2E_BUCKETS),
    ):
        assert value(after, histogram + "_count") > value(before, histogram + "_count")
        edges = [s.labels["le"] for s in after[histogram + "_bucket"]]
        assert len(edges) == len(buckets) + 1 and edges[-1] == "+Inf"
    assert (
        value(after, metrics.INTER_TOKEN_LATENCY + "_count")
        - value(before, metrics.INTER_TOKEN_LATENCY + "_count")
        == 6
    )  # gaps between 7 tokens

    experts = after[metrics.EXPERT_TOKENS]
    assert {s.labels["layer"] for s in experts} and all(s.labels["model_name"] == MODEL_NAME for s in experts)
    assert value(after, metrics.EXPERT_TOKENS) > value(before, metrics.EXPERT_TOKENS)
    assert value(after, metrics.NUM_REQUESTS_RUNNING) == 0
