"""A pod names its revision ($MOE_REVISION, which the operator sets; --revision): in the
`x-moe-revision` header of every HTTP answer (success, stream, error, /metrics), in the initial
metadata of every gRPC call, and as the model's version in its metadata. Without one: no header."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from model_runtime.cli import build_parser, config_from_args

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"  # the served name of builtin:tiny-mixtral, conftest's model
REVISION = "3f2a9c1b7e"  # conftest's runtime_server runs with MOE_REVISION set to it
HEADER = "x-moe-revision"


def infer_body(max_tokens: int = 3) -> dict:
    return {
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["which revision?"]},
            {
                "name": "sampling_parameters",
                "datatype": "BYTES",
                "shape": [1],
                "data": [f'{{"max_tokens": {max_tokens}}}'],
            },
        ]
    }


def test_every_http_answer_names_the_revision(runtime_server):
    base = runtime_server.base_url
    answers = {
        "infer": httpx.post(f"{base}/v2/models/{MODEL_NAME}/infer", json=infer_body(), timeout=60),
        "metrics": httpx.get(f"{base}/metrics", timeout=10),
        "ready": httpx.get(f"{base}/v2/health/ready", timeout=10),
        "unknown model": httpx.post(f"{base}/v2/models/gpt-5/infer", json=infer_body(), timeout=10),
        "no such path": httpx.get(f"{base}/v2/nothing-here", timeout=10),
        "bad request": httpx.post(f"{base}/v2/models/{MODEL_NAME}/infer", json=infer_body(0), timeout=10),
        "openai bad request": httpx.post(f"{base}/v1/completions", json={"prompt": "no model"}, timeout=10),
        # refused by the body limit in front of the app, before any route runs
        "too large": httpx.post(
            f"{base}/v2/models/{MODEL_NAME}/infer", content=b"x" * (2 * 2**20), timeout=10
        ),
    }
    statuses = {what: r.status_code for what, r in answers.items()}
    assert statuses == {
        "infer": 200,
        "metrics": 200,
        "ready": 200,
        "unknown model": 404,
        "no such path": 404,
        "bad request": 400,
        "openai bad request": 400,
        "too large": 413,
    }
    assert {what: r.headers.get(HEADER) for what, r in answers.items()} == dict.fromkeys(answers, REVISION)
    assert answers["infer"].json()["model_version"] == REVISION


def test_openai_stream_and_models_name_the_revision(runtime_server):
    with openai.OpenAI(base_url=f"{runtime_server.base_url}/v1", api_key="unused", max_retries=0) as client:
        with client.completions.with_streaming_response.create(
            model=MODEL_NAME, prompt="which revision?", max_tokens=4, stream=True, seed=7,
            extra_body={"ignore_eos": True},      # a run of 4 tokens ends by length, never by chance
        ) as response:
            assert response.headers[HEADER] == REVISION
            chunks = list(response.parse())
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        [model] = client.models.list().data
        assert model.id == MODEL_NAME and model.revision == REVISION


def test_model_metadata_names_the_revision_as_its_version(runtime_server):
    with httpclient.InferenceServerClient(runtime_server.base_url.removeprefix("http://")) as client:
        assert client.get_model_metadata(MODEL_NAME)["versions"] == [REVISION]
        text = httpclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"pinned to a revision"], dtype=np.object_))
        result = client.infer(MODEL_NAME, [text], model_version=REVISION)
        assert result.get_response()["model_version"] == REVISION
        with pytest.raises(InferenceServerException, match="no version '1'"):
            client.get_model_metadata(MODEL_NAME, model_version="1")
    with grpcclient.InferenceServerClient(runtime_server.grpc_url) as client:
        assert list(client.get_model_metadata(MODEL_NAME).versions) == [REVISION]


def test_grpc_calls_send_the_revision_in_their_initial_metadata(runtime_server):
    with grpc.insecure_channel(runtime_server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ServerReady.with_call(pb.ServerReadyRequest(), timeout=10)
        assert (HEADER, REVISION) in call.initial_metadata()

        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="gpt-5"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert (HEADER, REVISION) in refused.value.initial_metadata()

        request = pb.ModelInferRequest(model_name=MODEL_NAME, id="s")
        request.inputs.add(
            name="text_input",
            datatype="BYTES",
            shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[b"stream it"]),
        )
        stream = stub.ModelStreamInfer(iter([request]), timeout=60)
        assert (HEADER, REVISION) in stream.initial_metadata()
        responses = list(stream)
        assert responses and all(not r.error_message for r in responses)
        assert responses[-1].infer_response.model_version == REVISION


def test_without_a_revision_answers_carry_no_header(server_process):
    server = server_process()  # no MOE_REVISION in its environment, as outside Kubernetes
    try:
        base = server.base_url
        answers = [
            httpx.post(f"{base}/v2/models/{MODEL_NAME}/infer", json=infer_body(), timeout=60),
            httpx.get(f"{base}/v2/models/gpt-5", timeout=10),
            httpx.get(f"{base}/metrics", timeout=10),
        ]
        assert [r.status_code for r in answers] == [200, 404, 200]
        assert [HEADER in r.headers for r in answers] == [False] * 3
        assert httpx.get(f"{base}/v2/models/{MODEL_NAME}", timeout=10).json()["versions"] == ["1"]
        assert "revision" not in httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]
        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            _, call = stub.ServerLive.with_call(pb.ServerLiveRequest(), timeout=10)
            assert HEADER not in dict(call.initial_metadata())
    finally:
        assert server.stop() == 0, server.logs()


def test_revision_flag_defaults_to_moe_revision_and_refuses_what_a_header_cannot_carry(monkeypatch, capsys):
    def revision(*args: str) -> str | None:
        return config_from_args(build_parser().parse_args(["serve", "--model", "x", *args])).revision

    monkeypatch.delenv("MOE_REVISION", raising=False)
    assert revision() is None
    monkeypatch.setenv("MOE_REVISION", "from-env")
    assert revision() == "from-env"
    assert revision("--revision", "from-flag") == "from-flag"
    assert revision("--revision", "") is None
    with pytest.raises(SystemExit):
        revision("--revision", "two words")
    assert "not a revision" in capsys.readouterr().err
