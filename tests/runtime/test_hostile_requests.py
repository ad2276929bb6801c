"""Malformed and hostile requests: each answered 4xx with a message, the server staying ready;
then a schemathesis fuzz run over the server's own OpenAPI document with no 5xx."""

from __future__ import annotations

import gzip
import json
import struct
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"  # the served name of builtin:tiny-mixtral, conftest's model

INFER = f"/v2/models/{MODEL_NAME}/infer"
GENERATE = f"/v2/models/{MODEL_NAME}/generate"


def tensor(name="text_input", datatype="BYTES", shape=(1,), data=("Hi",), **extra):
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": list(data), **extra}


def infer_body(*tensors, **extra) -> bytes:
    return json.dumps({"inputs": list(tensors) or [tensor()], **extra}).encode()


def binary_request(data: bytes) -> tuple[bytes, dict[str, str]]:
    """An infer body with text_input as binary data, and its Inference-Header-Content-Length."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text_input",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(data)},
                }
            ]
        }
    ).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


# (name, method, path, body, headers, expected status)
CORPUS = [
    ("broken json infer", "POST", INFER, b'{"inputs": [', {}, 400),
    ("broken json generate", "POST", GENERATE, b"{text_input: hi}", {}, 400),
    ("broken json completions", "POST", "/v1/completions", b'{"model": ', {}, 400),
    ("broken json chat", "POST", "/v1/chat/completions", b"\xff\xfe\x00", {}, 400),
    ("json array body", "POST", INFER, b"[1, 2, 3]", {}, 400),
    ("not utf-8 text_input", "POST", INFER, *binary_request(struct.pack("<I", 2) + b"\xff\xfe"), 400),
    ("truncated bytes element", "POST", INFER, *binary_request(struct.pack("<I", 9) + b"abc"), 400),
    ("wrong datatype", "POST", INFER, infer_body(tensor(datatype="FP32", data=[1.5])), {}, 400),
    ("unknown datatype", "POST", INFER, infer_body(tensor(datatype="STRING")), {}, 400),
    ("bool as string", "POST", INFER, infer_body(tensor(), tensor("stream", "BOOL", data=["yes"])), {}, 400),
    ("wrong shape", "POST", INFER, infer_body(tensor(shape=(2,))), {}, 400),
    ("two prompts", "POST", INFER, infer_body(tensor(shape=(2,), data=["a", "b"])), {}, 400),
    ("empty shape data", "POST", INFER, infer_body(tensor(shape=(0,), data=[])), {}, 400),
    ("giant shape", "POST", INFER, infer_body(tensor(shape=(2**40, 2**40))), {}, 400),
    ("negative shape", "POST", INFER, infer_body(tensor(shape=(-1,))), {}, 400),
    (
        "unknown input",
        "POST",
        INFER,
        infer_body(tensor(), tensor("temperature", "FP32", data=[0.5])),
        {},
        400,
    ),
    ("missing text_input", "POST", INFER, infer_body(tensor("stream", "BOOL", data=[False])), {}, 400),
    ("unknown output", "POST", INFER, infer_body(outputs=[{"name": "logits"}]), {}, 400),
    (
        "bad sampling json",
        "POST",
        INFER,
        infer_body(tensor(), tensor("sampling_parameters", data=["{max_tokens"])),
        {},
        400,
    ),
    (
        "unknown sampling parameter",
        "POST",
        INFER,
        infer_body(tensor(), tensor("sampling_parameters", data=['{"beam_width": 4}'])),
        {},
        400,
    ),
    (
        "binary size past the body",
        "POST",
        INFER,
        json.dumps({"inputs": [tensor(data=(), parameters={"binary_data_size": 999})]})
        .encode()
        .replace(b', "data": []', b""),
        {},
        400,
    ),
    ("header length garbage", "POST", INFER, infer_body(), {"Inference-Header-Content-Length": "-5"}, 400),
    (
        "header length too large",
        "POST",
        INFER,
        infer_body(),
        {"Inference-Header-Content-Length": "99999"},
        400,
    ),
    ("unknown model infer", "POST", "/v2/models/gpt-5/infer", infer_body(), {}, 404),
    ("unknown model version", "GET", f"/v2/models/{MODEL_NAME}/versions/7", None, {}, 404),
    (
        "unknown model openai",
        "POST",
        "/v1/completions",
        json.dumps({"model": "x", "prompt": "a"}).encode(),
        {},
        404,
    ),
    (
        "negative max_tokens",
        "POST",
        GENERATE,
        json.dumps({"text_input": "a", "max_tokens": -1}).encode(),
        {},
        400,
    ),
    (
        "huge max_tokens",
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL_NAME, "prompt": "a", "max_tokens": 2**62}).encode(),
        {},
        400,
    ),
    (
        "max_tokens too big for the model",
        "POST",
        GENERATE,
        json.dumps({"text_input": "a", "max_tokens": 100000}).encode(),
        {},
        400,
    ),
    (
        "out-of-vocabulary token ids",
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL_NAME, "prompt": [1, 2, 10**9]}).encode(),
        {},
        400,
    ),
    (
        "negative token ids",
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL_NAME, "prompt": [-4]}).encode(),
        {},
        400,
    ),
    (
        "empty token list",
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL_NAME, "prompt": []}).encode(),
        {},
        400,
    ),
    (
        "prompt longer than the model",
        "POST",
        GENERATE,
        json.dumps({"text_input": "x" * 300}).encode(),
        {},
        400,
    ),
    (
        "nan temperature",
        "POST",
        "/v1/completions",
        b'{"model": "%s", "prompt": "a", "temperature": NaN}' % MODEL_NAME.encode(),
        {},
        400,
    ),
    ("infinite top_p", "POST", GENERATE, b'{"text_input": "a", "top_p": 1e999}', {}, 400),
    (
        "n above the limit",
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL_NAME, "prompt": "a", "n": 1000}).encode(),
        {},
        400,
    ),
    (
        "logprobs too many",
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL_NAME, "prompt": "a", "logprobs": 500}).encode(),
        {},
        400,
    ),
    (
        "empty stop string",
        "POST",
        "/v1/completions",
        json.dumps({"model": MODEL_NAME, "prompt": "a", "stop": [""]}).encode(),
        {},
        400,
    ),
    (
        "bad chat role",
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        {},
        400,
    ),
    ("deeply nested json", "POST", "/v1/completions", b"[" * 100000 + b"]" * 100000, {}, 400),
    (
        "deeply nested tensor data",
        "POST",
        INFER,
        b'{"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": '
        + b"[" * 50000
        + b"]" * 50000
        + b"}]}",
        {},
        400,
    ),
    ("oversized body", "POST", INFER, b"x" * (2 * 2**20), {}, 413),
    ("gzip bomb", "POST", GENERATE, gzip.compress(b" " * (8 * 2**20)), {"Content-Encoding": "gzip"}, 413),
    ("bad content encoding", "POST", GENERATE, b"{}", {"Content-Encoding": "br"}, 415),
    ("wrong method", "GET", INFER, None, {}, 405),
    ("unknown route", "GET", "/v2/models/%00/../../etc/passwd", None, {}, 404),
]


@pytest.mark.parametrize("name, method, path, body, headers, status", CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_request_gets_a_4xx_with_a_message(runtime_server, name, method, path, body, headers, status):
    with httpx.Client(base_url=runtime_server.base_url, timeout=60) as client:
        r = client.request(method, path, content=body, headers=headers)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert isinstance(message, str) and len(message) > 5
        assert client.get("/v2/health/ready").status_code == 200


def test_chunked_oversized_body_is_refused(runtime_server):
    def chunks():
        for _ in range(40):
            yield b"x" * 65536

    with httpx.Client(base_url=runtime_server.base_url, timeout=60) as client:
        r = client.post(GENERATE, content=chunks())  # no Content-Length: counted as it arrives
        assert r.status_code == 413
        assert client.get("/v2/health/ready").status_code == 200


def test_server_still_serves_after_the_corpus(runtime_server):
    r = httpx.post(
        runtime_server.base_url + GENERATE, json={"text_input": "still alive", "max_tokens": 3}, timeout=60
    )
    assert r.status_code == 200 and r.json()["text_output"].startswith("still alive")
    metrics = httpx.get(runtime_server.base_url + "/metrics").text
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith("moe_request_failure_total") and 'reason="invalid_request"' in ln
    )
    assert float(line.rsplit(" ", 1)[1]) > 0


def test_fuzz_openapi_no_server_errors(runtime_server):
    """Every operation of /openapi.json, with valid and invalid inputs (bounded examples)."""
    schema = schemathesis.openapi.from_url(f"{runtime_server.base_url}/openapi.json")
    schema.config.update(base_url=runtime_server.base_url)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=6,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
                phases=[Phase.generate],
            )
            def check(case):
                response = case.call(timeout=60)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} {case.body!r}: "
                        f"{response.status_code} {response.text[:200]}"
                    )

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode == GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures)
    assert httpx.get(f"{runtime_server.base_url}/v2/health/ready").status_code == 200


def _failures(base_url: str, reason: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith("moe_request_failure_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_that_walks_away_mid_stream_frees_its_slot(runtime_server):
    base = runtime_server.base_url
    cancelled = _failures(base, "cancelled")
    body = {"text_input": "walk away", "max_tokens": 250, "ignore_eos": True}
    with httpx.stream("POST", base + GENERATE + "_stream", json=body, timeout=60) as r:
        next(r.iter_lines())  # one event, then the connection closes
    deadline = time.monotonic() + 30
    while _failures(base, "cancelled") == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)  # polling with a deadline
    assert _failures(base, "cancelled") == cancelled + 1
    running = next(
        ln
        for ln in httpx.get(f"{base}/metrics").text.splitlines()
        if ln.startswith("moe_num_requests_running{")
    )
    assert float(running.rsplit(" ", 1)[1]) == 0
