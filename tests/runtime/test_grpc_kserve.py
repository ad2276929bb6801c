"""KServe v2 over gRPC with tritonclient.grpc: health, metadata, unary infer, streaming, status codes."""

from __future__ import annotations

import json
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"  # the served name of builtin:tiny-mixtral, conftest's model

PROMPT = "Routing tokens to experts"
SAMPLING = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(runtime_server):
    with grpcclient.InferenceServerClient(runtime_server.grpc_url) as c:
        yield c


def inputs(stream: bool = False, prompt: str = PROMPT, sampling=None, exclude_input: bool = True):
    values = {
        "text_input": ("BYTES", np.array([prompt.encode()], dtype=np.object_)),
        "sampling_parameters": (
            "BYTES",
            np.array([json.dumps(sampling or SAMPLING).encode()], dtype=np.object_),
        ),
        "stream": ("BOOL", np.array([stream])),
        "exclude_input_in_output": ("BOOL", np.array([exclude_input])),
    }
    tensors = []
    for name, (datatype, array) in values.items():
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def stream_pieces(client, requests: list[tuple[str, list]], timeout_s: float = 60.0) -> dict[str, list]:
    """Send requests over one stream; each request's responses (or error) by request id."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for request_id, tensors in requests:
            client.async_stream_infer(MODEL_NAME, tensors, request_id=request_id)
        by_id: dict[str, list] = {rid: [] for rid, _ in requests}
        open_ids = set(by_id)
        while open_ids:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                raise error
            response = result.get_response()
            by_id[response.id].append(result)
            if response.parameters["triton_final_response"].bool_param:
                open_ids.discard(response.id)
        return by_id
    finally:
        client.stop_stream()


def text(result) -> bytes:
    return result.as_numpy("text_output")[0]


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    assert "binary_tensor_data" in client.get_server_metadata().extensions
    meta = client.get_model_metadata(MODEL_NAME)
    assert meta.name == MODEL_NAME
    assert {(t.name, t.datatype) for t in meta.inputs} >= {("text_input", "BYTES"), ("stream", "BOOL")}
    config = client.get_model_config(MODEL_NAME).config
    assert config.model_transaction_policy.decoupled
    assert [(i.name, i.optional) for i in config.input][:2] == [("text_input", False), ("stream", True)]


@pytest.mark.parametrize("call", ["get_model_metadata", "get_model_config", "is_model_ready"])
def test_model_calls_refuse_an_unknown_model_or_version(client, call):
    for name, version in (("gpt-5", ""), (MODEL_NAME, "7")):
        with pytest.raises(InferenceServerException) as refused:
            getattr(client, call)(name, model_version=version)
        assert refused.value.status() == "StatusCode.NOT_FOUND"


def test_infer_and_stream_agree(client):
    unary = client.infer(MODEL_NAME, inputs(), request_id="u-1")
    assert unary.get_response().id == "u-1"
    assert unary.as_numpy("finish_reason")[0] == b"length"
    full = text(unary)
    assert full

    streamed = stream_pieces(client, [("s-1", inputs(stream=True))])["s-1"]
    assert len(streamed) > 1  # one response per new piece of text
    assert b"".join(text(r) for r in streamed) == full
    assert [r.get_response().parameters["triton_final_response"].bool_param for r in streamed][-1]
    assert streamed[-1].as_numpy("finish_reason")[0] == b"length"

    whole = stream_pieces(client, [("w-1", inputs(stream=False, exclude_input=False))])["w-1"]
    assert len(whole) == 1 and text(whole[0]) == PROMPT.encode() + full


def test_stream_interleaves_requests_and_reports_errors_in_band(client):
    results = stream_pieces(
        client,
        [
            ("a", inputs(stream=True, prompt="first")),
            ("b", inputs(stream=True, prompt="second")),
        ],
    )
    assert all(results["a"]) and all(results["b"])
    with pytest.raises(InferenceServerException, match="max_tokens"):
        stream_pieces(client, [("bad", inputs(stream=True, sampling={"max_tokens": 0}))], timeout_s=30)


@pytest.mark.parametrize(
    "model, tensors, code",
    [
        ("no-such-model", lambda: inputs(), "StatusCode.NOT_FOUND"),
        (MODEL_NAME, lambda: inputs(sampling={"max_tokens": -3}), "StatusCode.INVALID_ARGUMENT"),
        (MODEL_NAME, lambda: inputs(sampling={"temperature": "hot"}), "StatusCode.INVALID_ARGUMENT"),
        (MODEL_NAME, lambda: inputs()[1:], "StatusCode.INVALID_ARGUMENT"),  # no text_input
    ],
)
def test_status_codes(client, model, tensors, code):
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, tensors())
    assert e.value.status() == code


def test_typed_contents_and_wrong_datatypes(runtime_server):
    """Inputs in InferTensorContents (not raw bytes) work; a wrong datatype is INVALID_ARGUMENT."""
    with grpc.insecure_channel(runtime_server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL_NAME)
        request.inputs.add(
            name="text_input",
            datatype="BYTES",
            shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[b"hello"]),
        )
        request.parameters["max_tokens"].int64_param = 3
        response = stub.ModelInfer(request, timeout=60)
        assert response.outputs[0].name == "text_output"
        assert response.raw_output_contents[0][4:].startswith(b"hello")

        request.inputs[0].datatype = "INT32"
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "text_input" in e.value.details()


def _metric(base_url: str, name: str, **labels: str) -> float:
    import httpx

    total = 0.0
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_cancelled_call_is_aborted_in_the_engine_at_once(runtime_server):
    """A unary ModelInfer the client cancels (a deadline, a closed channel, `call.cancel()`) frees its
    batch slot and KV blocks at once, counted as cancelled, not run to its max_tokens for nobody."""
    import time

    base = runtime_server.base_url
    cancelled = _metric(base, "moe_request_failure_total", reason="cancelled")
    succeeded = _metric(base, "moe_request_success_total")
    with grpc.insecure_channel(runtime_server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL_NAME)
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1],
                           contents=pb.InferTensorContents(bytes_contents=[b"keep going"]))
        request.parameters["max_tokens"].int64_param = 240   # seconds of decoding here
        request.parameters["ignore_eos"].bool_param = True
        call = stub.ModelInfer.future(request, timeout=120)
        deadline = time.monotonic() + 30
        while _metric(base, "moe_num_requests_running") < 1:   # polling with a deadline
            assert not call.done(), call.exception()
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.05)
        call.cancel()
        cancelled_at = time.monotonic()
        while _metric(base, "moe_num_requests_running") > 0:
            assert time.monotonic() < cancelled_at + 2, "the engine kept running a cancelled call"
            time.sleep(0.02)
    assert call.cancelled()
    assert _metric(base, "moe_request_failure_total", reason="cancelled") == cancelled + 1
    assert _metric(base, "moe_request_success_total") == succeeded
