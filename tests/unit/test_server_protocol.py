"""Pure protocol functions of the runtime's servers: KServe v2 tensors, the binary extension,
the vLLM backend's semantics, listen addresses, sizes and metric names."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http import InferResult
from tritonclient.http._utils import _get_inference_request

from model_runtime.cli import parse_size
from model_runtime.serving import metrics, protocol
from model_runtime.serving.config import default_model_name
from model_runtime.serving.protocol import ProtocolError, Tensor
from model_runtime.serving.server import bind_sockets, listen_hosts

pytestmark = pytest.mark.unit


def client_body(binary: bool, outputs=None, text="Hello", sampling=None, stream=None):
    """The exact body tritonclient.http sends."""
    inputs = []
    t = httpclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=np.object_), binary_data=binary)
    inputs.append(t)
    if sampling is not None:
        s = httpclient.InferInput("sampling_parameters", [1], "BYTES")
        s.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_), binary_data=binary)
        inputs.append(s)
    if stream is not None:
        b = httpclient.InferInput("stream", [1], "BOOL")
        b.set_data_from_numpy(np.array([stream]), binary_data=binary)
        inputs.append(b)
    return _get_inference_request(inputs, "id-1", outputs, 0, False, False, 0, None, None)


@pytest.mark.parametrize("binary", [True, False])
def test_client_request_decodes_to_generate_request(binary):
    body, header_length = client_body(binary, sampling={"max_tokens": "7", "temperature": 0}, stream=False)
    request = protocol.parse_infer_request(body, header_length)
    assert request.id == "id-1"
    assert request.binary_data_output  # no outputs named: tritonclient asks for binary outputs
    gen = protocol.generate_request_from_tensors(request.inputs, request.parameters)
    assert gen.prompt == "Hello"
    assert gen.sampling == {"max_tokens": 7, "temperature": 0.0}
    assert gen.prepend_input and not gen.stream


def test_stream_excludes_the_prompt_and_refuses_to_include_it():
    inputs = {
        "text_input": Tensor("text_input", "BYTES", [1], [b"Hi"]),
        "stream": Tensor("stream", "BOOL", [1], [True]),
    }
    assert not protocol.generate_request_from_tensors(inputs, {}).prepend_input
    inputs["exclude_input_in_output"] = Tensor("exclude_input_in_output", "BOOL", [1], [False])
    with pytest.raises(ProtocolError, match="exclude_input_in_output"):
        protocol.generate_request_from_tensors(inputs, {})


@pytest.mark.parametrize("binary", [True, False])
def test_response_reads_back_with_the_client(binary):
    outputs = [
        (Tensor("text_output", "BYTES", [1], ["héllo".encode()]), binary),
        (Tensor("num_input_tokens", "UINT32", [1], [5]), binary),
    ]
    body, header_length = protocol.encode_infer_response("m", "rid", outputs)
    assert (header_length is not None) == binary
    result = InferResult.from_response_body(body, header_length=header_length)
    text = result.as_numpy("text_output")[0]
    assert (text if isinstance(text, str) else text.decode()) == "héllo"
    assert result.as_numpy("num_input_tokens").tolist() == [5]
    assert result.get_response()["id"] == "rid"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(inputs=[]), "non-empty list"),
        (lambda r: r["inputs"][0].update(datatype="INT32", data=[5]), "must be BYTES"),
        (lambda r: r["inputs"][0].update(datatype="FLOAT"), "unknown datatype"),
        (lambda r: r["inputs"][0].update(shape=[2]), "needs 2 elements"),
        (lambda r: r["inputs"][0].update(shape=[-1]), "non-negative"),
        (lambda r: r["inputs"][0].update(data=[5]), "must be strings"),
        (lambda r: r["inputs"][0].update(name="prompt"), "unknown input 'prompt'"),
        (lambda r: r["inputs"].append(dict(r["inputs"][0])), "appears twice"),
        (lambda r: r["inputs"][0].pop("data"), "needs 'data'"),
        (lambda r: r.update(parameters={"binary_data_output": "yes"}), "true or false"),
        (lambda r: r.update(id=5), "'id' must be a string"),
    ],
)
def test_malformed_json_requests_are_protocol_errors(mutate, message):
    request = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hi"]}]}
    mutate(request)
    with pytest.raises(ProtocolError, match=message):
        parsed = protocol.parse_infer_request(json.dumps(request).encode(), None)
        protocol.generate_request_from_tensors(parsed.inputs, parsed.parameters)


def test_binary_data_must_match_the_declared_sizes():
    body, header_length = client_body(True)
    with pytest.raises(ProtocolError, match="runs past"):
        protocol.parse_infer_request(body[:-2], header_length)
    with pytest.raises(ProtocolError, match="not claimed"):
        protocol.parse_infer_request(body + b"xx", header_length)
    with pytest.raises(ProtocolError, match="does not fit"):
        protocol.parse_infer_request(body, len(body) + 1)
    with pytest.raises(ProtocolError, match="truncated"):
        protocol.deserialize_bytes_tensor(b"\x01\x00")
    with pytest.raises(ProtocolError, match="runs past"):
        protocol.deserialize_bytes_tensor(struct.pack("<I", 10) + b"abc")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        protocol.parse_infer_request(b"\xff\xfe{", None)


def test_sampling_parameters_are_typed_and_checked():
    assert protocol.sampling_kwargs(
        {"max_tokens": 5.0, "top_p": "0.5", "ignore_eos": "true", "stop": "\n", "binary_data_output": True}
    ) == {"max_tokens": 5, "top_p": 0.5, "ignore_eos": True, "stop": ["\n"]}
    assert protocol.sampling_kwargs({"frequency_penalty": "1", "logit_bias": {"3": -5}}) == {
        "frequency_penalty": 1.0, "logit_bias": {"3": -5}}
    with pytest.raises(ProtocolError, match="unsupported sampling parameter 'best_of'"):
        protocol.sampling_kwargs({"best_of": 2})
    for bad in (
        {"max_tokens": "many"},
        {"max_tokens": True},
        {"temperature": float("nan")},
        {"stop": [1]},
        {"stop_token_ids": "1"},
        {"seed": 2**70},
    ):
        with pytest.raises(ProtocolError):
            protocol.sampling_kwargs(bad)


def test_generate_extension_body():
    gen = protocol.generate_request_from_json(
        {"text_input": "Hi", "max_tokens": 3, "parameters": {"temperature": 0}, "id": "x", "stream": True}
    )
    assert (gen.prompt, gen.stream, gen.prepend_input) == ("Hi", True, False)
    assert gen.sampling == {"max_tokens": 3, "temperature": 0.0}
    assert protocol.generate_request_from_json(
        {"text_input": "Hi", "sampling_parameters": {"max_tokens": 2}}
    ).sampling == {"max_tokens": 2}
    for bad in ([], {"max_tokens": 3}, {"text_input": 5}, {"text_input": "a", "stream": "yes"}):
        with pytest.raises(ProtocolError):
            protocol.generate_request_from_json(bad)


def test_requested_outputs():
    tensors = protocol.result_tensors(protocol.GenerateRequest("p"), "text", "stop", 3, 4)
    gen = protocol.GenerateRequest("p", return_num_output_tokens=True)
    chosen = protocol.select_outputs(tensors, protocol.default_outputs(gen), binary_default=True)
    assert [(t.name, b) for t, b in chosen] == [
        ("text_output", True),
        ("finish_reason", True),
        ("num_output_tokens", True),
    ]
    requested = [protocol.RequestedOutput("text_output", binary=False)]
    assert [(t.name, b) for t, b in protocol.select_outputs(tensors, requested, True)] == [
        ("text_output", False)
    ]
    with pytest.raises(ProtocolError, match="unknown output"):
        protocol.check_outputs([protocol.RequestedOutput("logits")])


def test_listen_hosts_follow_the_pod_ip():
    assert listen_hosts(None, None) == [("0.0.0.0", True)]
    assert listen_hosts(None, "127.100.0.7") == [("127.100.0.7", True), ("127.0.0.1", False)]
    assert listen_hosts(None, "127.0.0.1") == [("127.0.0.1", True)]
    assert listen_hosts("10.0.0.1", "127.100.0.7") == [("10.0.0.1", True)]


def test_pods_starting_together_share_loopback_without_failing():
    """Two local pods' servers that bind 127.0.0.1 as well at the same moment: the first holds it, the
    second skips it (SO_REUSEADDR lets both bind until one listens; a listen failing later, inside
    uvicorn, stopped the second server)."""
    first = bind_sockets([("127.0.0.1", False)], 0)
    port = first[0].getsockname()[1]
    try:
        assert bind_sockets([("127.0.0.1", False)], port) == []
    finally:
        first[0].close()


def test_names_and_sizes():
    assert default_model_name("builtin:tiny-mixtral") == "tiny-mixtral"
    assert default_model_name("hf://org/Name@main") == "Name"
    assert default_model_name("/models/qwen/") == "qwen"
    assert parse_size("256Mi") == 256 * 2**20
    assert parse_size("2G") == 2 * 10**9
    assert parse_size("1024") == 1024


def test_metric_names_and_engine_gauges():
    stats = SimpleNamespace(num_running=2, num_waiting=1, kv_cache_usage=0.25, expert_tokens={0: [3, 4]})
    m = metrics.RuntimeMetrics("m", lambda: stats)
    m.ttft.observe(0.1)
    m.request_succeeded("stop")
    m.request_failed("injected")
    text = m.exposition().decode()
    for name in (
        metrics.TIME_TO_FIRST_TOKEN,
        metrics.INTER_TOKEN_LATENCY,
        metrics.E2E_REQUEST_LATENCY,
        metrics.NUM_REQUESTS_RUNNING,
        metrics.NUM_REQUESTS_WAITING,
        metrics.KV_CACHE_USAGE,
        metrics.PROMPT_TOKENS,
        metrics.GENERATION_TOKENS,
        metrics.REQUEST_SUCCESS,
        metrics.REQUEST_FAILURE,
        metrics.EXPERT_TOKENS,
        "process_cpu_seconds_total",
    ):
        assert f"\n{name}" in text, name
    assert 'moe_num_requests_running{model_name="m"} 2.0' in text
    assert 'moe_expert_tokens_total{expert="1",layer="0",model_name="m"} 4.0' in text
    assert 'moe_request_failure_total{model_name="m",reason="injected"} 1.0' in text
