"""Startup and shutdown as Kubernetes sees them: not ready until the model is loaded and warmed
up; on SIGTERM not ready at once, new requests refused, every stream in flight finished, exit 0."""

from __future__ import annotations

import json
import queue
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"  # the served name of builtin:tiny-mixtral, conftest's model

REVISION = "5e1d0c4b2a"  # given with --revision: a refusal while draining names it too
LONG = 160  # tokens per stream: long enough to be mid-stream when SIGTERM lands


def poll(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{what} not reached in {timeout_s}s")


def sse_stream(url: str, body: dict, started: threading.Event, sink: dict, key: str) -> None:
    events = []
    try:
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            sink[key + ".status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started.set()
    except Exception as e:  # recorded: the assertions below say what was lost
        sink[key + ".error"] = repr(e)
    sink[key] = events
    started.set()


def test_ready_only_after_load_and_sigterm_loses_no_stream(server_process):
    server = server_process(
        "--max-model-len", "512", "--drain-timeout", "60", "--revision", REVISION, startup_timeout_s=None
    )
    try:
        _check_startup_and_drain(server)
    finally:
        server.stop()


def _check_startup_and_drain(server) -> None:
    base = server.base_url

    def status(path: str) -> int | None:
        try:
            return httpx.get(base + path, timeout=2).status_code
        except httpx.HTTPError:
            return None

    # Startup: live before ready; inference refused with 503 until the model is loaded and warm.
    poll(lambda: status("/v2/health/live") == 200, 120, "live")
    seen_not_ready = status("/v2/health/ready") == 503
    early = httpx.post(f"{base}/v2/models/{MODEL_NAME}/generate", json={"text_input": "x"}, timeout=10)
    poll(lambda: status("/v2/health/ready") == 200, 120, "ready")
    assert seen_not_ready, "ready before the model was loaded"
    assert early.status_code in (503, 200)
    if early.status_code == 503:
        assert "loading" in early.json()["error"]

    # Streams over three protocols, all mid-flight when SIGTERM lands.
    sink: dict = {}
    started = [threading.Event() for _ in range(2)]
    body = {"max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    threads = [
        threading.Thread(
            target=sse_stream,
            args=(
                f"{base}/v1/completions",
                {"model": MODEL_NAME, "prompt": "drain me", "stream": True, **body},
                started[0],
                sink,
                "openai",
            ),
        ),
        threading.Thread(
            target=sse_stream,
            args=(
                f"{base}/v2/models/{MODEL_NAME}/generate_stream",
                {"text_input": "and me", **body},
                started[1],
                sink,
                "generate",
            ),
        ),
    ]
    for t in threads:
        t.start()
    grpc_results: queue.Queue = queue.Queue()
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    grpc_client.start_stream(callback=lambda result, error: grpc_results.put((result, error)))
    tensors = []
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([b"grpc too"], dtype=np.object_)),
        ("stream", "BOOL", np.array([True])),
        ("sampling_parameters", "BYTES", np.array([json.dumps(body).encode()], dtype=np.object_)),
    ):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    grpc_client.async_stream_infer(MODEL_NAME, tensors, request_id="g")
    first_grpc = grpc_results.get(timeout=60)
    for event in started:
        assert event.wait(60)

    server.terminate()

    # At once: not ready, new requests refused (HTTP 503, gRPC UNAVAILABLE), in-flight continue.
    poll(lambda: status("/v2/health/ready") == 503, 5, "not ready after SIGTERM")
    refused = httpx.post(f"{base}/v1/completions", json={"model": MODEL_NAME, "prompt": "late"}, timeout=10)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert refused.headers["x-moe-revision"] == REVISION
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        request = pb.ModelInferRequest(model_name=MODEL_NAME)
        request.inputs.add(
            name="text_input",
            datatype="BYTES",
            shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[b"late"]),
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    grpc_pieces = [first_grpc]
    while True:
        result, error = grpc_pieces[-1]
        assert error is None, error
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
        grpc_pieces.append(grpc_results.get(timeout=60))
    grpc_client.stop_stream()
    grpc_client.close()
    for t in threads:
        t.join(60)

    assert server.proc.wait(60) == 0, server.logs()

    # Nothing lost: every stream ran to its last token.
    assert grpc_pieces[-1][0].as_numpy("finish_reason")[0] == b"length"
    assert sum(len(r.as_numpy("text_output")[0]) > 0 for r, _ in grpc_pieces) > 1
    assert "openai.error" not in sink and "generate.error" not in sink, sink
    openai_events = sink["openai"]
    assert openai_events[-1] == "[DONE]"
    assert json.loads(openai_events[-2])["usage"]["completion_tokens"] == LONG
    generate_events = [json.loads(e) for e in sink["generate"]]
    assert generate_events[-1]["finish_reason"] == "length"
    assert "draining" in server.logs()
