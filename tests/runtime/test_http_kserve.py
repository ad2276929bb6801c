"""KServe v2 over HTTP with NVIDIA's own client (tritonclient.http), and Triton's generate
extension with plain HTTP, against the real engine and a builtin model."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"  # the served name of builtin:tiny-mixtral, conftest's model

PROMPT = "The experts of a mixture"
SAMPLING = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(runtime_server):
    with httpclient.InferenceServerClient(
        runtime_server.base_url.removeprefix("http://"), concurrency=4
    ) as c:
        yield c


def inputs(binary: bool, prompt: str = PROMPT, sampling=None, exclude_input: bool | None = True):
    text = httpclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_), binary_data=binary)
    params = httpclient.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(
        np.array([json.dumps(sampling or SAMPLING).encode()], dtype=np.object_), binary_data=binary
    )
    stream = httpclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([False]), binary_data=binary)
    tensors = [text, params, stream]
    if exclude_input is not None:
        exclude = httpclient.InferInput("exclude_input_in_output", [1], "BOOL")
        exclude.set_data_from_numpy(np.array([exclude_input]), binary_data=binary)
        tensors.append(exclude)
    return tensors


def as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def reference_text(runtime_server) -> str:
    """The greedy continuation of PROMPT, from the generate extension."""
    r = httpx.post(
        f"{runtime_server.base_url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": PROMPT, "exclude_input_in_output": True, **SAMPLING},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL_NAME and body["finish_reason"] == "length"
    assert body["text_output"]
    return body["text_output"]


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL_NAME)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL_NAME)
    assert {(i["name"], i["datatype"]) for i in meta["inputs"]} >= {
        ("text_input", "BYTES"),
        ("stream", "BOOL"),
        ("sampling_parameters", "BYTES"),
        ("exclude_input_in_output", "BOOL"),
    }
    assert {o["name"] for o in meta["outputs"]} >= {"text_output", "finish_reason"}
    config = client.get_model_config(MODEL_NAME)
    assert config["model_transaction_policy"]["decoupled"] and config["max_batch_size"] == 0
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert e.value.status() == "404"


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_output", [True, False, None], ids=["binary-out", "json-out", "default-out"])
def test_infer_matrix(client, reference_text, binary_input, binary_output):
    outputs = None
    if binary_output is not None:
        outputs = [
            httpclient.InferRequestedOutput("text_output", binary_data=binary_output),
            httpclient.InferRequestedOutput("finish_reason", binary_data=binary_output),
        ]
    result = client.infer(MODEL_NAME, inputs(binary_input), outputs=outputs, request_id=f"req-{binary_input}")
    assert as_text(result.as_numpy("text_output")[0]) == reference_text
    assert as_text(result.as_numpy("finish_reason")[0]) == "length"
    assert result.get_response()["id"] == f"req-{binary_input}"
    assert result.get_response()["model_name"] == MODEL_NAME


def test_prompt_is_prepended_unless_excluded(client, reference_text):
    result = client.infer(MODEL_NAME, inputs(True, exclude_input=None))
    assert as_text(result.as_numpy("text_output")[0]) == PROMPT + reference_text


def test_token_counts_on_request(client):
    flag = httpclient.InferInput("return_num_output_tokens", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True]))
    result = client.infer(MODEL_NAME, [*inputs(True), flag])
    assert result.as_numpy("num_output_tokens").tolist() == [SAMPLING["max_tokens"]]


def test_concurrent_async_infer(client):
    prompts = [f"request number {i}" for i in range(8)]
    pending = [
        client.async_infer(MODEL_NAME, inputs(i % 2 == 0, prompt=p), request_id=str(i))
        for i, p in enumerate(prompts)
    ]
    for i, request in enumerate(pending):
        result = request.get_result(timeout=120)
        assert result.get_response()["id"] == str(i)
        assert as_text(result.as_numpy("finish_reason")[0]) == "length"
        assert len(as_text(result.as_numpy("text_output")[0])) > 0


def test_generate_stream_joins_to_the_generate_text(runtime_server, reference_text):
    pieces, finish = [], None
    with httpx.stream(
        "POST",
        f"{runtime_server.base_url}/v2/models/{MODEL_NAME}/generate_stream",
        json={"text_input": PROMPT, "id": "s-1", **SAMPLING},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            assert event["id"] == "s-1"
            pieces.append(event["text_output"])
            finish = event.get("finish_reason", finish)
    assert len(pieces) > 1
    assert "".join(pieces) == reference_text
    assert finish == "length"


def test_generate_errors_are_kserve_shaped(runtime_server):
    url = f"{runtime_server.base_url}/v2/models/{MODEL_NAME}/generate"
    r = httpx.post(url, json={"text_input": "x", "max_tokens": 100000})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]
    r = httpx.post(f"{runtime_server.base_url}/v2/models/other/generate", json={"text_input": "x"})
    assert r.status_code == 404 and "other" in r.json()["error"]
    r = httpx.post(url + "_stream", json={"text_input": "x", "top_p": 7})
    assert r.status_code == 400 and "top_p" in r.json()["error"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(client, reference_text, algorithm):
    result = client.infer(
        MODEL_NAME,
        inputs(True),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,  # may be ignored: the body then comes plain
    )
    assert as_text(result.as_numpy("text_output")[0]) == reference_text
