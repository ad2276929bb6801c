"""The gRPC front end: `inference.GRPCInferenceService` (KServe v2), on the server's event loop.

Built on the servicer and messages that `tritonclient` ships, so `tritonclient.grpc` works as
against Triton: outputs travel in `raw_output_contents`; `ModelStreamInfer` sends one response
per new piece of text (or one with the whole text when the request's `stream` input is false),
the last one flagged `triton_final_response`, and reports a failed request as the response's
`error_message` while the stream stays open. Unary calls fail with the status code of the error
(unknown model NOT_FOUND, bad input INVALID_ARGUMENT, full queue RESOURCE_EXHAUSTED, draining
UNAVAILABLE, request timeout DEADLINE_EXCEEDED). Every call's initial metadata carries
`x-moe-revision` where the pod has a revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from model_runtime.serving import protocol, signature
from model_runtime.serving.config import VERSION
from model_runtime.serving.protocol import ProtocolError, Tensor
from model_runtime.serving.service import InferenceService, ServiceError

log = logging.getLogger("model_runtime.grpc")

# Which InferTensorContents field carries each datatype.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "BYTES": "bytes_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def parameter_value(parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    """One input of a gRPC request, from raw_input_contents (`raw`) or from its typed contents."""
    name = tensor.name
    if tensor.datatype not in protocol.DATATYPES:
        raise ProtocolError(f"input '{name}': unknown datatype {tensor.datatype!r}")
    shape = protocol.check_shape(name, [int(d) for d in tensor.shape])
    empty = Tensor(name, tensor.datatype, shape, [])
    if raw is not None:
        return protocol.decode_binary_tensor(empty, raw)
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise ProtocolError(f"input '{name}': {tensor.datatype} data must be sent in raw_input_contents")
    values = list(getattr(tensor.contents, field))
    if len(values) != protocol.element_count(shape):
        raise ProtocolError(
            f"input '{name}': shape {shape} needs {protocol.element_count(shape)} elements, got {len(values)}"
        )
    return Tensor(name, tensor.datatype, shape, values)


def decode_request(
    request: pb.ModelInferRequest,
) -> tuple[protocol.GenerateRequest, list[protocol.RequestedOutput]]:
    raw_contents = list(request.raw_input_contents)
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raw_contents)} entries for {len(request.inputs)} inputs: "
            "send every input's data there, or none"
        )
    inputs: dict[str, Tensor] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise ProtocolError(f"input '{tensor.name}' appears twice")
        inputs[tensor.name] = decode_input(tensor, raw_contents[i] if raw_contents else None)
    parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
    gen = protocol.generate_request_from_tensors(inputs, parameters)
    requested = [protocol.RequestedOutput(o.name) for o in request.outputs] or None
    protocol.check_outputs(requested)
    return gen, requested or protocol.default_outputs(gen)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: list[tuple[Tensor, bool]],
    final: bool | None = None,
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for tensor, _ in outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(protocol.encode_tensor_binary(tensor))
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService):
        self.service = service

    async def _abort(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        if isinstance(error, ServiceError):
            self.service.count_failure(error)
            await context.abort(grpc.StatusCode[error.grpc_code], error.message)
        self.service.metrics.request_failed("invalid_request")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    async def _check_model(self, request, context) -> None:
        """Abort the call when it names a model (or version) this server does not serve."""
        try:
            self.service.check_model(request.name, request.version)
        except ServiceError as e:
            await self._abort(context, e)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.service.live)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context):
        await self._check_model(request, context)
        return pb.ModelReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request, context):
        meta = signature.server_metadata(VERSION)
        return pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    async def ModelMetadata(self, request, context):
        await self._check_model(request, context)
        meta = signature.model_metadata(self.service.model_name, self.service.model_version)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
        )

    async def ModelConfig(self, request, context):
        await self._check_model(request, context)
        config = json_format.ParseDict(
            signature.model_config(self.service.model_name), model_config_pb2.ModelConfig()
        )
        return pb.ModelConfigResponse(config=config)

    async def _start(self, request: pb.ModelInferRequest):
        self.service.check_model(request.model_name, request.model_version)
        self.service.admit()
        gen, requested = decode_request(request)
        return gen, requested, self.service.sampling_params(**gen.sampling)

    async def ModelInfer(self, request, context):
        try:
            gen, requested, params = await self._start(request)
            final = await self.service.complete(gen.prompt, params)
        except (ServiceError, ProtocolError) as e:
            await self._abort(context, e)
        text = gen.text_output(final.text)
        tensors = protocol.result_tensors(
            gen, text, final.finish_reason, len(final.prompt_token_ids), len(final.token_ids)
        )
        return encode_response(
            self.service.model_name,
            self.service.model_version,
            request.id,
            protocol.select_outputs(tensors, requested, True),
        )

    async def _stream_one(self, request: pb.ModelInferRequest, send) -> None:
        """Run one request of a stream, sending its responses (or its error) through `send`."""
        try:
            gen, requested, params = await self._start(request)
            async for output, text, count in protocol.stream_pieces(
                gen, self.service.generate(gen.prompt, params)
            ):
                tensors = protocol.result_tensors(
                    gen, text, output.finish_reason, len(output.prompt_token_ids), count
                )
                response = encode_response(
                    self.service.model_name,
                    self.service.model_version,
                    request.id,
                    protocol.select_outputs(tensors, requested, True),
                    final=output.finished,
                )
                await send(pb.ModelStreamInferResponse(infer_response=response))
        except ProtocolError as e:
            self.service.metrics.request_failed("invalid_request")
            await send(pb.ModelStreamInferResponse(error_message=str(e)))
        except ServiceError as e:
            self.service.count_failure(e)
            await send(pb.ModelStreamInferResponse(error_message=e.message))

    async def ModelStreamInfer(self, request_iterator, context):
        queue: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def read_requests():
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._stream_one(request, queue.put))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*list(running), return_exceptions=True)
            finally:
                queue.put_nowait(None)  # the stream ends when the client's side has and all are answered

        reader = asyncio.create_task(read_requests())
        try:
            while True:
                response = await queue.get()
                if response is None:
                    break
                yield response
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            with contextlib.suppress(BaseException):
                await reader
            if running:
                await asyncio.gather(*list(running), return_exceptions=True)
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                log.warning("stream reader failed: %s", reader.exception())


class InitialMetadata(grpc.aio.ServerInterceptor):
    """Sends `metadata` first on every call (the revision, as HTTP sends it in every response's
    headers), before the handler's answer or error."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self.metadata = tuple(metadata)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        metadata = self.metadata

        def unary(behavior):
            async def call(request, context):
                await context.send_initial_metadata(metadata)
                return await behavior(request, context)

            return call

        def streaming(behavior):
            async def call(request, context):
                await context.send_initial_metadata(metadata)
                async for response in behavior(request, context):
                    yield response

            return call

        serializers = (handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), *serializers)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), *serializers)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), *serializers)
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), *serializers)


async def start_grpc_server(
    service: InferenceService, hosts: list[tuple[str, bool]], port: int, max_message_bytes: int
) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server on `hosts` (port 0: one free port for all); returns it and the port."""
    revision_headers = service.config.revision_headers
    server = grpc.aio.server(
        interceptors=[InitialMetadata(revision_headers)] if revision_headers else None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", 64 * 2**20),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), server)
    for host, required in hosts:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as e:
            if required:
                raise OSError(f"cannot listen for gRPC on {address}: {e}") from None
            log.info("not listening for gRPC on %s as well (%s)", address, e)
            continue
        if bound == 0:
            if required:
                raise OSError(f"cannot listen for gRPC on {address}")
            continue
        port = bound
    await server.start()
    return server, port
