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


def poll(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)  # polling with a deadline


def test_full_queue(server_process):
    server = server_process("--max-num-seqs", "1", "--max-waiting", "1")
    base = server.base_url
    try:
        release = threading.Event()
        results: dict = {}

        def hold_the_slot():  # a long stream, left (disconnected) once the test is done with it
            body = {
                "model": MODEL_NAME,
                "prompt": "hold",
                "max_tokens": 2000,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json=body) as r:
                for _ in r.iter_lines():
                    if release.is_set():
                        break

        def wait_in_the_queue():
            body = {"text_input": "wait", "max_tokens": 3}
            results["queued"] = httpx.post(f"{base}/v2/models/{MODEL_NAME}/generate", timeout=60, json=body)

        holder = threading.Thread(target=hold_the_slot)
        holder.start()
        poll(lambda: metric(base, "moe_num_requests_running") == 1)
        waiter = threading.Thread(target=wait_in_the_queue)
        waiter.start()
        poll(lambda: metric(base, "moe_num_requests_waiting") == 1)

        # One running, one waiting: the queue is full.
        refused = httpx.post(
            f"{base}/v1/completions", json={"model": MODEL_NAME, "prompt": "more"}, timeout=30
        )
        assert refused.status_code == 429, refused.text
        assert "retry" in refused.json()["error"]["message"]
        error = grpc_infer(server.grpc_url, "and another", 4)
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        release.set()
        holder.join(60)
        waiter.join(60)
        assert results["queued"].status_code == 200  # served once the slot was freed
        assert metric(base, "moe_request_failure_total", reason="overloaded") == 2
        assert metric(base, "moe_request_failure_total", reason="cancelled") == 1
    finally:
        assert server.stop() == 0, server.logs()


def test_faults_and_timeouts_in_a_pod(server_process):
    """As in a pod (POD_IP set, no --host: the pod IP and loopback are bound): injected errors
    and latency, and the request timeout, for whole responses and inside a stream."""
    server = server_process(
        "--inject-error-rate", "0.5", "--inject-latency-ms", "300", "--request-timeout", "1.5",
        pod_ip="127.0.0.7",
    )  # fmt: skip
    base = server.base_url
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
        with httpx.Client(base_url=base, timeout=60) as client:
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
            assert slow == len(statuses)  # the latency lands before the first token of every request
            assert metric(base, "moe_request_failure_total", reason="injected") == statuses.count(500)
            assert metric(base, "moe_time_to_first_token_seconds_sum") >= 0.3 * statuses.count(200)

            # Past --request-timeout: 408 for a whole response; an error event inside a stream.
            long = {"text_input": "long", "max_tokens": 2000, "ignore_eos": True}
            for _ in range(20):  # past the injected errors
                r = client.post(f"/v2/models/{MODEL_NAME}/generate", json=long)
                if r.status_code != 500:
                    break
            assert r.status_code == 408 and "timed out" in r.json()["error"], r.text
            for _ in range(20):
                with client.stream("POST", f"/v2/models/{MODEL_NAME}/generate_stream", json=long) as r:
                    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
                if r.status_code != 500:
                    break
            assert r.status_code == 200 and len(events) > 1
            assert "timed out" in events[-1]["error"]
            assert metric(base, "moe_request_failure_total", reason="timeout") == 2
    finally:
        assert server.stop() == 0, server.logs()
