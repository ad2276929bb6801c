"""The HTTP front end (FastAPI): KServe v2, Triton's generate extension, OpenAI, /metrics.

`/v2/models/{m}/infer` answers once with the whole text (a `stream` input of true only drops the
prompt from `text_output`, as in Triton's vLLM backend); streams are `generate_stream` (SSE),
gRPC ModelStreamInfer and OpenAI `stream: true`. `/v2/models/{m}/generate_stream` streams unless
the body says `"stream": false`.

Errors: under /v1 in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`),
elsewhere in KServe's (`{"error": "message"}`). Bodies above --max-body-bytes are refused with 413
before they are read in full.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_runtime.serving import protocol, signature
from model_runtime.serving.config import VERSION
from model_runtime.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from model_runtime.serving.openai_api import create_openai_router, create_tokenizer_router
from model_runtime.serving.protocol import ProtocolError
from model_runtime.serving.service import InferenceService, ServiceError, first_and_rest
from model_runtime.serving.signature import GENERATE_REQUEST_SCHEMA, INFER_REQUEST_SCHEMA
from model_runtime.serving.sse import event_stream, sse

log = logging.getLogger("model_runtime.http")


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error_response(
    path: str, status: int, message: str, error_type: str = "invalid_request_error"
) -> JSONResponse:
    if path.startswith("/v1"):
        body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for bodies above `max_bytes`, by Content-Length or as they arrive.
    Also takes a POST body under /v1 as JSON whatever its Content-Type says (`curl -d` sends a
    form type), as the OpenAI API does."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body larger than {self.max_bytes} bytes (--max-body-bytes)"
        for key, value in scope["headers"]:
            if key == b"content-length":
                if not value.isdigit():
                    return await _error_response(scope["path"], 400, "invalid Content-Length")(
                        scope, receive, send
                    )
                if int(value) > self.max_bytes:
                    return await _error_response(scope["path"], 413, message)(scope, receive, send)
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return event

        # The app answers BodyTooLarge itself (413); `send` is not wrapped, as it runs per token.
        await self.app(scope, limited_receive, send)


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding '{encoding}' (gzip, deflate)", 415)
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(f"request body is not valid {encoding}: {e}") from None
    if len(data) > limit:
        raise ProtocolError(f"decompressed request body larger than {limit} bytes", 413)
    return data


def _header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ProtocolError(f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}")
    return int(value)


async def _json(request: Request, limit: int) -> Any:
    return protocol.parse_json(_decompress(await request.body(), request.headers.get("content-encoding"), limit))


def create_app(service: InferenceService) -> BodyLimit:
    """The ASGI app over `service` (the OpenAPI document, at /openapi.json, lists every route)."""
    app = FastAPI(
        title="moe-runtime",
        version=VERSION,
        description="KServe v2 (Open Inference Protocol), Triton's generate extension and the OpenAI API "
        "in front of one Mixture-of-Experts model.",
    )
    model_name = service.model_name
    model_version = service.model_version
    limit = service.config.max_body_bytes

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError):
        service.count_failure(exc)
        return _error_response(request.url.path, exc.http_status, exc.message, exc.openai_type)

    @app.exception_handler(ProtocolError)
    async def on_protocol_error(request: Request, exc: ProtocolError):
        service.metrics.request_failed("invalid_request")
        return _error_response(request.url.path, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        service.metrics.request_failed("invalid_request")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
            for e in exc.errors()[:5]
        )
        return _error_response(request.url.path, 400, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(request.url.path, exc.status_code, str(exc.detail), error_type)

    @app.exception_handler(BodyTooLarge)
    async def on_body_too_large(request: Request, exc: BodyTooLarge):
        return _error_response(
            request.url.path, 413, f"request body larger than {limit} bytes (--max-body-bytes)"
        )

    @app.exception_handler(RecursionError)
    async def on_too_deep(request: Request, exc: RecursionError):
        return _error_response(request.url.path, 400, "request body is nested too deeply")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        service.metrics.request_failed("internal")
        return _error_response(request.url.path, 500, f"internal error: {type(exc).__name__}", "server_error")

    # -- health and metadata --------------------------------------------------------------------

    @app.get("/v2/health/live", tags=["kserve"])
    @app.get("/health", tags=["health"], include_in_schema=False)
    async def server_live():
        return JSONResponse({}, status_code=200 if service.live else 503)

    @app.get("/v2/health/ready", tags=["kserve"])
    async def server_ready():
        return JSONResponse({}, status_code=200 if service.ready else 503)

    @app.get("/v2", tags=["kserve"])
    async def server_metadata():
        return signature.server_metadata(VERSION)

    @app.get("/v2/models/{model_name}", tags=["kserve"])
    @app.get("/v2/models/{model_name}/versions/{version}", tags=["kserve"])
    async def model_metadata(model_name: str, version: str | None = None):
        service.check_model(model_name, version)
        return signature.model_metadata(model_name, model_version)

    @app.get("/v2/models/{model_name}/config", tags=["kserve"])
    @app.get("/v2/models/{model_name}/versions/{version}/config", tags=["kserve"])
    async def model_config(model_name: str, version: str | None = None):
        service.check_model(model_name, version)
        return signature.model_config(model_name)

    @app.get("/v2/models/{model_name}/ready", tags=["kserve"])
    @app.get("/v2/models/{model_name}/versions/{version}/ready", tags=["kserve"])
    async def model_ready(model_name: str, version: str | None = None):
        service.check_model(model_name, version)
        return JSONResponse({}, status_code=200 if service.ready else 503)

    @app.get("/metrics", tags=["metrics"])
    async def metrics():
        return Response(service.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    # -- inference ------------------------------------------------------------------------------

    @app.post(
        "/v2/models/{model_name}/infer", tags=["kserve"], openapi_extra=_json_body(INFER_REQUEST_SCHEMA)
    )
    @app.post(
        "/v2/models/{model_name}/versions/{version}/infer",
        tags=["kserve"],
        openapi_extra=_json_body(INFER_REQUEST_SCHEMA),
    )
    async def infer(model_name: str, request: Request, version: str | None = None):
        service.check_model(model_name, version)
        service.admit()
        body = _decompress(await request.body(), request.headers.get("content-encoding"), limit)
        infer_request = protocol.parse_infer_request(body, _header_length(request))
        protocol.check_outputs(infer_request.outputs)
        gen = protocol.generate_request_from_tensors(infer_request.inputs, infer_request.parameters)
        params = service.sampling_params(**gen.sampling)
        final = await service.complete(gen.prompt, params)
        text = gen.text_output(final.text)
        tensors = protocol.result_tensors(
            gen, text, final.finish_reason, len(final.prompt_token_ids), len(final.token_ids)
        )
        outputs = protocol.select_outputs(
            tensors, infer_request.outputs or protocol.default_outputs(gen), infer_request.binary_data_output
        )
        content, header_length = protocol.encode_infer_response(
            model_name, infer_request.id, outputs, model_version
        )
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    async def start_generate(model_name: str, version: str | None, request: Request, stream_default: bool):
        service.check_model(model_name, version)
        service.admit()
        body = await _json(request, limit)
        if isinstance(body, dict) and stream_default and "stream" not in body:
            body = {**body, "stream": True}
        gen = protocol.generate_request_from_json(body)
        request_id = body.get("id") if isinstance(body.get("id"), str) else None
        return gen, service.sampling_params(**gen.sampling), request_id

    def generate_body(gen, request_id, text, finish_reason, input_tokens, output_tokens) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model_name": model_name,
            "model_version": model_version,
            "text_output": text,
        }
        if request_id:
            body["id"] = request_id
        if finish_reason is not None:
            body["finish_reason"] = finish_reason
        if gen.return_num_input_tokens:
            body["num_input_tokens"] = input_tokens
        if gen.return_num_output_tokens:
            body["num_output_tokens"] = output_tokens
        return body

    @app.post(
        "/v2/models/{model_name}/generate",
        tags=["generate"],
        openapi_extra=_json_body(GENERATE_REQUEST_SCHEMA),
    )
    @app.post(
        "/v2/models/{model_name}/versions/{version}/generate",
        tags=["generate"],
        openapi_extra=_json_body(GENERATE_REQUEST_SCHEMA),
    )
    async def generate(model_name: str, request: Request, version: str | None = None):
        gen, params, request_id = await start_generate(model_name, version, request, stream_default=False)
        final = await service.complete(gen.prompt, params)
        text = gen.text_output(final.text)
        return JSONResponse(
            generate_body(
                gen, request_id, text, final.finish_reason, len(final.prompt_token_ids), len(final.token_ids)
            )
        )

    @app.post(
        "/v2/models/{model_name}/generate_stream",
        tags=["generate"],
        openapi_extra=_json_body(GENERATE_REQUEST_SCHEMA),
    )
    @app.post(
        "/v2/models/{model_name}/versions/{version}/generate_stream",
        tags=["generate"],
        openapi_extra=_json_body(GENERATE_REQUEST_SCHEMA),
    )
    async def generate_stream(model_name: str, request: Request, version: str | None = None):
        gen, params, request_id = await start_generate(model_name, version, request, stream_default=True)
        outputs = await first_and_rest(service.generate(gen.prompt, params))

        async def events():
            try:
                async for output, text, count in protocol.stream_pieces(gen, outputs):
                    finish_reason = output.finish_reason if output.finished else None
                    yield sse(
                        generate_body(
                            gen, request_id, text, finish_reason, len(output.prompt_token_ids), count
                        )
                    )
            except ServiceError as e:
                yield sse({"error": e.message})

        return event_stream(events())

    app.include_router(create_openai_router(service))
    app.include_router(create_tokenizer_router(service))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            # One model is served: say so, so that clients (and fuzzers) know the one valid name.
            for component in schema.get("components", {}).get("schemas", {}).values():
                if component.get("title") in ("CompletionRequest", "ChatCompletionRequest"):
                    component["properties"]["model"] = {"type": "string", "enum": [model_name]}
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    for parameter in operation.get("parameters", []):
                        if parameter.get("name") == "model_name":
                            parameter["schema"] = {"type": "string", "enum": [model_name]}
                        if parameter.get("name") == "version":
                            parameter["schema"] = {"type": "string", "enum": [model_version]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return BodyLimit(app, limit)
