"""KServe v2 / Open Inference Protocol: pure tensor decoding and encoding, no I/O.

The model's tensors follow Triton's vLLM backend: inputs `text_input` (BYTES), `stream` (BOOL),
`sampling_parameters` (BYTES holding JSON), `exclude_input_in_output` (BOOL) and the optional
`return_*` flags; outputs `text_output` (BYTES), `finish_reason` (BYTES) and the token counts.
Requests arrive over HTTP as JSON (optionally followed by binary tensor data, the
`binary_tensor_data` extension), over HTTP as the flat JSON of Triton's generate extension, or
over gRPC; all three end up as one `GenerateRequest`. The model's signature and the documents
that describe it: serving/signature.py.

Every function here raises `ProtocolError` (a user-facing message, answered 400 /
INVALID_ARGUMENT) for bad input and never anything else for anything a client can send.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_runtime.serving.signature import DEFAULT_OUTPUTS, MODEL_INPUTS, MODEL_OUTPUTS, MODEL_VERSION

# Request parameters the protocol itself uses; never taken as sampling parameters.
RESERVED_PARAMETERS = {
    "binary_data_output",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "headers",
}

# Element count a tensor may declare; the model takes scalars, so this only bounds garbage.
MAX_ELEMENTS = 1 << 16

# numpy dtype of each fixed-size KServe datatype (BYTES is length-prefixed, BF16 has none).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = set(NUMPY_DTYPES) | {"BYTES", "BF16"}


# Sampling parameters a request may set (names as in vLLM), and the type each one takes.
SAMPLING_PARAMETER_TYPES: dict[str, type] = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "stop": list,
    "stop_token_ids": list,
    "ignore_eos": bool,
    "logprobs": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
    "min_p": float,
    "logit_bias": dict,
    "priority": int,
}


class ProtocolError(ValueError):
    """A request that does not follow the protocol; the message tells the client what to fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: list[Any]  # flat, row-major; BYTES values are `bytes`


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request's binary_data_output decides


@dataclass
class InferRequest:
    id: str
    parameters: dict[str, Any]
    inputs: dict[str, Tensor]
    outputs: list[RequestedOutput] | None  # None: all default outputs
    binary_data_output: bool = False


@dataclass
class GenerateRequest:
    """What the model is asked to do, whichever protocol asked."""

    prompt: str
    sampling: dict[str, Any] = field(default_factory=dict)  # keyword arguments of SamplingParams
    stream: bool = False
    prepend_input: bool = True  # text_output starts with the prompt (vLLM backend default)
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False

    def text_output(self, generated: str) -> str:
        """The answer's `text_output`: the prompt leads the generated text unless it is excluded."""
        return self.prompt + generated if self.prepend_input else generated


async def stream_pieces(
    gen: GenerateRequest, outputs: AsyncIterator[Any]
) -> AsyncIterator[tuple[Any, str, int]]:
    """(output, text, output tokens) for each response of a generate stream: every output's new text
    when `gen.stream`, else only the finished output's whole text; the prompt leads the first piece
    when `gen.prepend_input` asks for it."""
    first = True
    async for output in outputs:
        if gen.stream:
            text, count = output.new_text, len(output.new_token_ids)
        elif output.finished:
            text, count = output.text, len(output.token_ids)
        else:
            continue
        if not text and not output.finished:
            continue
        yield output, gen.text_output(text) if first else text, count
        first = False


# --- tensors ---------------------------------------------------------------------------------


def element_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if element_count(shape) > MAX_ELEMENTS:
        raise ProtocolError(f"input '{name}': shape {shape} has more than {MAX_ELEMENTS} elements")
    return shape


def serialize_bytes_tensor(values: list[bytes]) -> bytes:
    """BYTES elements as the binary extension carries them: a 4-byte little-endian length each."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def deserialize_bytes_tensor(raw: bytes, name: str = "tensor") -> list[bytes]:
    values, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(f"input '{name}': truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(
                f"input '{name}': BYTES element of {length} bytes runs past the {len(raw)}-byte tensor data"
            )
        values.append(bytes(raw[offset : offset + length]))
        offset += length
    return values


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > MAX_ELEMENTS:
                raise ProtocolError(f"tensor data has more than {MAX_ELEMENTS} elements")
        else:
            stack.pop()
    return flat


def _json_value(name: str, datatype: str, value: Any) -> Any:
    """One element of JSON tensor data, checked against the datatype."""
    if datatype == "BYTES":
        if not isinstance(value, str):
            raise ProtocolError(f"input '{name}': BYTES data must be strings, got {type(value).__name__}")
        return value.encode("utf-8", errors="surrogatepass")
    if datatype == "BOOL":
        if not isinstance(value, bool):
            raise ProtocolError(f"input '{name}': BOOL data must be true or false, got {value!r}")
        return value
    if datatype == "BF16":
        raise ProtocolError(f"input '{name}': BF16 data must be sent as binary data")
    dtype = NUMPY_DTYPES[datatype]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"input '{name}': {datatype} data must be numbers, got {value!r}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not isinstance(value, int) or not info.min <= value <= info.max:
            raise ProtocolError(f"input '{name}': {value!r} is not a valid {datatype}")
    return value


def decode_json_tensor(obj: Any) -> tuple[Tensor, int | None]:
    """One entry of a request's `inputs`; returns the tensor and, for binary data, its byte size
    (the values are then filled in by `decode_binary_tensor`)."""
    if not isinstance(obj, dict):
        raise ProtocolError("each entry of 'inputs' must be an object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError("each input needs a 'name' (string)")
    datatype = obj.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(
            f"input '{name}': unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}"
        )
    shape = check_shape(name, obj.get("shape"))
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"input '{name}': 'parameters' must be an object")
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if type(binary_size) is not int or binary_size < 0:
            raise ProtocolError(f"input '{name}': binary_data_size must be a non-negative integer")
        if "data" in obj:
            raise ProtocolError(f"input '{name}': has both 'data' and binary_data_size")
        return Tensor(name, datatype, shape, []), binary_size
    if "shared_memory_region" in parameters:
        raise ProtocolError(f"input '{name}': shared memory is not supported; send the data inline", 400)
    if "data" not in obj:
        raise ProtocolError(f"input '{name}': needs 'data' or the binary_data_size parameter")
    values = [_json_value(name, datatype, v) for v in _flatten(obj["data"])]
    if len(values) != element_count(shape):
        raise ProtocolError(
            f"input '{name}': shape {shape} needs {element_count(shape)} elements, data has {len(values)}"
        )
    return Tensor(name, datatype, shape, values), None


def decode_binary_tensor(tensor: Tensor, raw: bytes) -> Tensor:
    """Fill `tensor` from its raw bytes (binary extension or gRPC raw_input_contents)."""
    count = element_count(tensor.shape)
    if tensor.datatype == "BYTES":
        values: list[Any] = deserialize_bytes_tensor(raw, tensor.name)
    elif tensor.datatype == "BF16":
        if len(raw) != 2 * count:
            raise ProtocolError(
                f"input '{tensor.name}': {count} BF16 elements need {2 * count} bytes, got {len(raw)}"
            )
        values = [struct.unpack_from("<H", raw, 2 * i)[0] for i in range(count)]
    else:
        dtype = NUMPY_DTYPES[tensor.datatype]
        if len(raw) != dtype.itemsize * count:
            raise ProtocolError(
                f"input '{tensor.name}': {count} {tensor.datatype} elements need {dtype.itemsize * count} bytes, got {len(raw)}"
            )
        values = np.frombuffer(raw, dtype=dtype).tolist()
    if len(values) != count:
        raise ProtocolError(
            f"input '{tensor.name}': shape {tensor.shape} needs {count} elements, data has {len(values)}"
        )
    return Tensor(tensor.name, tensor.datatype, tensor.shape, values)


def encode_tensor_binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return serialize_bytes_tensor(tensor.values)
    return np.asarray(tensor.values, dtype=NUMPY_DTYPES[tensor.datatype]).tobytes()


def encode_tensor_json_data(tensor: Tensor) -> list[Any]:
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") for v in tensor.values]
    return list(tensor.values)


# --- HTTP infer ------------------------------------------------------------------------------


def _bool_parameter(parameters: dict[str, Any], key: str, default: bool = False) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"parameter '{key}' must be true or false, got {value!r}")
    return value


def parse_json(body: bytes) -> Any:
    """A request body's JSON (ProtocolError for one that is not valid JSON, or nested too deeply)."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("request body is nested too deeply") from None


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """An HTTP infer request body: JSON, or JSON of `header_length` bytes followed by the binary
    data of the inputs that declare `binary_data_size`, in order."""
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise ProtocolError(
            f"Inference-Header-Content-Length {header_length} does not fit the {len(body)}-byte body"
        )
    request = parse_json(body[:header_length])
    if not isinstance(request, dict):
        raise ProtocolError("request body must be a JSON object")
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")

    binary = memoryview(body)[header_length:]
    offset = 0
    inputs: dict[str, Tensor] = {}
    for raw_input in raw_inputs:
        tensor, binary_size = decode_json_tensor(raw_input)
        if binary_size is not None:
            if offset + binary_size > len(binary):
                raise ProtocolError(
                    f"input '{tensor.name}': binary_data_size {binary_size} runs past the "
                    f"{len(binary)} bytes of binary data after the JSON header"
                )
            tensor = decode_binary_tensor(tensor, bytes(binary[offset : offset + binary_size]))
            offset += binary_size
        if tensor.name in inputs:
            raise ProtocolError(f"input '{tensor.name}' appears twice")
        inputs[tensor.name] = tensor
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")

    outputs = None
    raw_outputs = request.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise ProtocolError("'outputs' must be a list")
        outputs = []
        for raw_output in raw_outputs:
            if not isinstance(raw_output, dict) or not isinstance(raw_output.get("name"), str):
                raise ProtocolError("each entry of 'outputs' must be an object with a 'name'")
            output_parameters = raw_output.get("parameters") or {}
            if not isinstance(output_parameters, dict):
                raise ProtocolError(f"output '{raw_output['name']}': 'parameters' must be an object")
            if "shared_memory_region" in output_parameters:
                raise ProtocolError(f"output '{raw_output['name']}': shared memory is not supported")
            binary_flag = output_parameters.get("binary_data")
            if binary_flag is not None and not isinstance(binary_flag, bool):
                raise ProtocolError(f"output '{raw_output['name']}': binary_data must be true or false")
            outputs.append(RequestedOutput(raw_output["name"], binary_flag))
    return InferRequest(
        id=request_id,
        parameters=parameters,
        inputs=inputs,
        outputs=outputs,
        binary_data_output=_bool_parameter(parameters, "binary_data_output"),
    )


def check_outputs(requested: list[RequestedOutput] | None) -> None:
    for output in requested or []:
        if output.name not in MODEL_OUTPUTS:
            raise ProtocolError(f"unknown output '{output.name}'; the model has {sorted(MODEL_OUTPUTS)}")


def select_outputs(
    available: list[Tensor], requested: list[RequestedOutput], binary_default: bool
) -> list[tuple[Tensor, bool]]:
    """The requested outputs (names checked by `check_outputs`) and whether each goes as binary."""
    by_name = {t.name: t for t in available}
    return [
        (by_name[output.name], binary_default if output.binary is None else output.binary)
        for output in requested
        if output.name in by_name
    ]


def encode_infer_response(
    model_name: str, request_id: str, outputs: list[tuple[Tensor, bool]], model_version: str = MODEL_VERSION
) -> tuple[bytes, int | None]:
    """The HTTP infer response body, and the JSON header's length when binary data follows."""
    json_outputs, blobs = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            blob = encode_tensor_binary(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = encode_tensor_json_data(tensor)
        json_outputs.append(entry)
    response: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": json_outputs,
    }
    if request_id:
        response["id"] = request_id
    header = json.dumps(response, ensure_ascii=False).encode("utf-8")
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


# --- the vLLM backend's semantics -------------------------------------------------------------


def _coerce(key: str, kind: type, value: Any) -> Any:
    """One sampling parameter; strings are accepted for scalars, as Triton clients send them."""
    if kind in (int, float) and isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            pass
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 1 << 63:
                raise ProtocolError(f"sampling parameter '{key}' is out of range: {value}")
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ProtocolError(f"sampling parameter '{key}' must be a finite number, got {value!r}")
            return float(value)
    elif key == "stop":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ProtocolError("sampling parameter 'stop' must be a string or a list of strings")
    elif key == "stop_token_ids":
        if isinstance(value, list) and all(type(t) is int for t in value):
            return value
        raise ProtocolError("sampling parameter 'stop_token_ids' must be a list of integers")
    elif key == "logit_bias":
        if isinstance(value, dict):
            return value   # token ids and biases are checked with the other parameters
        raise ProtocolError("sampling parameter 'logit_bias' must be an object of token id -> bias")
    raise ProtocolError(f"sampling parameter '{key}' must be {kind.__name__}, got {value!r}")


def sampling_kwargs(parameters: dict[str, Any]) -> dict[str, Any]:
    """Sampling parameters (vLLM names) from a request, typed; unknown names are an error."""
    kwargs = {}
    for key, value in parameters.items():
        if key in RESERVED_PARAMETERS or key.startswith("triton_"):
            continue
        kind = SAMPLING_PARAMETER_TYPES.get(key)
        if kind is None:
            raise ProtocolError(
                f"unsupported sampling parameter '{key}'; supported: {sorted(SAMPLING_PARAMETER_TYPES)}"
            )
        if value is None:
            continue
        kwargs[key] = _coerce(key, kind, value)
    return kwargs


def _scalar(inputs: dict[str, Tensor], name: str) -> Any:
    tensor = inputs.get(name)
    if tensor is None:
        return None
    if len(tensor.values) != 1:
        raise ProtocolError(
            f"input '{name}' must hold exactly one element (shape [1]), got shape {tensor.shape}"
        )
    return tensor.values[0]


def check_inputs(inputs: dict[str, Tensor]) -> None:
    """Names and datatypes against the model's signature."""
    for name, tensor in inputs.items():
        spec = MODEL_INPUTS.get(name)
        if spec is None:
            raise ProtocolError(f"unknown input '{name}'; the model takes {sorted(MODEL_INPUTS)}")
        if tensor.datatype != spec.datatype:
            raise ProtocolError(f"input '{name}' must be {spec.datatype}, got {tensor.datatype}")
    for name, spec in MODEL_INPUTS.items():
        if not spec.optional and name not in inputs:
            raise ProtocolError(f"missing required input '{name}'")


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"input '{name}' is not valid UTF-8") from None


def generate_request_from_tensors(inputs: dict[str, Tensor], parameters: dict[str, Any]) -> GenerateRequest:
    """KServe v2 inputs (and request parameters, used when no sampling_parameters tensor is sent)."""
    check_inputs(inputs)
    prompt = _text(_scalar(inputs, "text_input"), "text_input")
    stream = bool(_scalar(inputs, "stream") or False)
    raw_sampling = _scalar(inputs, "sampling_parameters")
    if raw_sampling is not None:
        try:
            sampling_dict = json.loads(_text(raw_sampling, "sampling_parameters") or "{}")
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"input 'sampling_parameters' is not valid JSON: {e}") from None
        if not isinstance(sampling_dict, dict):
            raise ProtocolError("input 'sampling_parameters' must be a JSON object")
    else:
        sampling_dict = parameters
    exclude = _scalar(inputs, "exclude_input_in_output")
    # Streams send new text only; otherwise the prompt leads the text unless excluded.
    prepend_input = (not exclude) if exclude is not None else not stream
    if prepend_input and stream:
        raise ProtocolError("when streaming, exclude_input_in_output must be true (or left out)")
    return GenerateRequest(
        prompt=prompt,
        sampling=sampling_kwargs(sampling_dict),
        stream=stream,
        prepend_input=prepend_input,
        return_num_input_tokens=bool(_scalar(inputs, "return_num_input_tokens") or False),
        return_num_output_tokens=bool(_scalar(inputs, "return_num_output_tokens") or False),
    )


def generate_request_from_json(body: Any) -> GenerateRequest:
    """Triton's generate extension: model inputs as top-level keys, everything else a parameter."""
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    inputs: dict[str, Tensor] = {}
    parameters: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("id", "parameters"):
            continue
        spec = MODEL_INPUTS.get(key)
        if spec is None:
            parameters[key] = value
            continue
        if spec.datatype == "BYTES":
            if key == "sampling_parameters" and isinstance(value, dict):
                value = json.dumps(value)
            if not isinstance(value, str):
                raise ProtocolError(f"'{key}' must be a string")
            inputs[key] = Tensor(key, "BYTES", [1], [value.encode("utf-8", errors="surrogatepass")])
        else:
            if not isinstance(value, bool):
                raise ProtocolError(f"'{key}' must be true or false")
            inputs[key] = Tensor(key, "BOOL", [1], [value])
    nested = body.get("parameters")
    if nested is not None:
        if not isinstance(nested, dict):
            raise ProtocolError("'parameters' must be an object")
        parameters.update(nested)
    if "text_input" not in inputs:
        raise ProtocolError("missing 'text_input'")
    return generate_request_from_tensors(inputs, parameters)


def result_tensors(
    request: GenerateRequest,
    text: str,
    finish_reason: str | None,
    num_input_tokens: int,
    num_output_tokens: int,
) -> list[Tensor]:
    """The model's outputs for one response (`text` is the new text of a stream piece, or all of it)."""
    tensors = [Tensor("text_output", "BYTES", [1], [text.encode("utf-8")])]
    tensors.append(Tensor("finish_reason", "BYTES", [1], [(finish_reason or "").encode("utf-8")]))
    tensors.append(Tensor("num_input_tokens", "UINT32", [1], [num_input_tokens]))
    tensors.append(Tensor("num_output_tokens", "UINT32", [1], [num_output_tokens]))
    return tensors


def default_outputs(request: GenerateRequest) -> list[RequestedOutput]:
    names = list(DEFAULT_OUTPUTS)
    if request.return_num_input_tokens:
        names.append("num_input_tokens")
    if request.return_num_output_tokens:
        names.append("num_output_tokens")
    return [RequestedOutput(name) for name in names]
