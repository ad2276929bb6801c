"""Limits and fault injection: a full waiting queue answers 429 / RESOURCE_EXHAUSTED, a request
past --request-timeout fails with 408 (or an in-band stream error), and --inject-error-rate /
--inject-latency-ms do what they say and are counted."""

from __future__ import annotations

import json
import threading
import time

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"  # the served name of builtin:tiny-mixtral, conftest's model


def metric(base_url: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name}{{{selector}}}")


def grpc_infer(url: str, prompt: str, max_tokens: int) -> grpc.RpcError | pb.ModelInferResponse:
    with grpc.insecure_channel(url) as channel:
        request = pb.ModelInferRequest(model_name=MODEL_NAME)
        request.inputs.add(
            name="text_input",
            datatype="BYTES",
            shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[prompt.encode()]),
        )
        request.parameters["max_tokens"].int64_param = max_tokens
        try:
            return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        except grpc.RpcError as e:
            return e


def test_full_queue_and_request_timeout(server_process):
    server = server_process("--max-num-seqs", "1", "--max-waiting", "1", "--request-timeout", "4")
    base = server.base_url
    try:
        results: dict = {}

        def long_stream():
            with httpx.stream(
                "POST",
                f"{base}/v1/completions",
                timeout=60,
                json={
                    "model": MODEL_NAME,
                    "prompt": "hold the slot",
                    "max_tokens": 1500,
                    "ignore_eos": True,
                    "stream": True,
                },
            ) as r:
                results["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        def queued():
            results["queued"] = httpx.post(
                f"{base}/v2/models/{MODEL_NAME}/generate",
                timeout=60,
                json={"text_input": "wait", "max_tokens": 1500, "ignore_eos": True},
            )

        holder = threading.Thread(target=long_stream)
        holder.start()
        deadline = time.monotonic() + 30
        while metric(base, "moe_num_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        waiter = threading.Thread(target=queued)
        waiter.start()
        while metric(base, "moe_num_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)

        # One running, one waiting: the queue is full.
        refused = httpx.post(
            f"{base}/v1/completions", json={"model": MODEL_NAME, "prompt": "one more"}, timeout=30
        )
        assert refused.status_code == 429, refused.text
        assert "retry" in refused.json()["error"]["message"]
        error = grpc_infer(server.grpc_url, "and another", 4)
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        holder.join(60)
        waiter.join(60)
        # Past --request-timeout: 408 for a whole response, an error event inside a started stream.
        assert results["queued"].status_code == 408 and "timed out" in results["queued"].json()["error"]
        events = results["stream"]
        assert events[-1] == "data: [DONE]"
        assert "timed out" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]

        assert metric(base, "moe_request_failure_total", reason="overloaded") >= 2
        assert metric(base, "moe_request_failure_total", reason="timeout") >= 2
        ok = httpx.post(
            f"{base}/v2/models/{MODEL_NAME}/generate", json={"text_input": "fine", "max_tokens": 2}
        )
        assert ok.status_code == 200
    finally:
        assert server.stop() == 0, server.logs()


def test_fault_injection_in_a_pod(server_process):
    """As in a pod: POD_IP set, no --host: the server binds the pod IP and loopback too."""
    server = server_process("--inject-error-rate", "0.5", "--inject-latency-ms", "300", pod_ip="127.0.0.7")
    try:
        assert "FAULT INJECTION ON" in server.logs()
        assert httpx.get(f"http://127.0.0.1:{server.http_port}/v2/health/ready").status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            assert (
                pb_grpc.GRPCInferenceServiceStub(channel)
                .ServerReady(pb.ServerReadyRequest(), timeout=10)
                .ready
            )
        statuses, slow = [], 0
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            for i in range(16):
                start = time.monotonic()
                r = client.post(
                    f"/v2/models/{MODEL_NAME}/generate", json={"text_input": f"try {i}", "max_tokens": 1}
                )
                statuses.append(r.status_code)
                if r.status_code == 500:
                    assert "injected" in r.json()["error"]
                slow += time.monotonic() - start >= 0.3
        assert set(statuses) == {200, 500}, statuses
        assert slow == len(statuses)  # latency lands before the first token of every request
        assert metric(server.base_url, "moe_request_failure_total", reason="injected") == statuses.count(500)
        assert metric(server.base_url, "moe_time_to_first_token_seconds_sum") >= 0.3 * statuses.count(200)
        error = grpc_infer(server.grpc_url, "grpc", 1)
        assert isinstance(error, pb.ModelInferResponse) or error.code() == grpc.StatusCode.INTERNAL
    finally:
        assert server.stop() == 0, server.logs()
