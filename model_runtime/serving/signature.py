"""What the served model looks like to KServe clients: its tensors (the signature of Triton's vLLM
backend) and the documents that describe them: KServe server and model metadata, Triton's model
configuration (what perf_analyzer and genai-perf read), and the OpenAPI schemas of the request
bodies the HTTP handlers read raw (binary extension, the generate extension's free keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODEL_VERSION = "1"  # the model's version where the pod has no revision (serving/config.py)
PLATFORM = "moe_runtime"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "generate"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]
    optional: bool = False


# Triton's vLLM backend signature (max_batch_size 0: no batch dimension).
MODEL_INPUTS: dict[str, TensorSpec] = {
    spec.name: spec
    for spec in (
        TensorSpec("text_input", "BYTES", [1]),
        TensorSpec("stream", "BOOL", [1], optional=True),
        TensorSpec("sampling_parameters", "BYTES", [1], optional=True),
        TensorSpec("exclude_input_in_output", "BOOL", [1], optional=True),
        TensorSpec("return_finish_reason", "BOOL", [1], optional=True),
        TensorSpec("return_num_input_tokens", "BOOL", [1], optional=True),
        TensorSpec("return_num_output_tokens", "BOOL", [1], optional=True),
    )
}
MODEL_OUTPUTS: dict[str, TensorSpec] = {
    spec.name: spec
    for spec in (
        TensorSpec("text_output", "BYTES", [-1]),
        TensorSpec("finish_reason", "BYTES", [-1]),
        TensorSpec("num_input_tokens", "UINT32", [1]),
        TensorSpec("num_output_tokens", "UINT32", [-1]),
    )
}
# Outputs sent when a request names none (finish_reason always: `return_finish_reason` is
# accepted for compatibility and changes nothing).
DEFAULT_OUTPUTS = ("text_output", "finish_reason")


# --- documents ---------------------------------------------------------------------------------


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "moe-runtime", "version": version, "extensions": EXTENSIONS}


def model_metadata(model_name: str, model_version: str = MODEL_VERSION) -> dict[str, Any]:
    def entry(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}

    return {
        "name": model_name,
        "versions": [model_version],
        "platform": PLATFORM,
        "inputs": [entry(s) for s in MODEL_INPUTS.values()],
        "outputs": [entry(s) for s in MODEL_OUTPUTS.values()],
    }


def model_config(model_name: str) -> dict[str, Any]:
    """The model's configuration in Triton's JSON form (`/config`, gRPC ModelConfig): what
    perf_analyzer and genai-perf read. Decoupled: one request may get many responses (streams)."""

    def entry(spec: TensorSpec) -> dict[str, Any]:
        data_type = "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}"
        return {"name": spec.name, "data_type": data_type, "dims": spec.shape, "optional": spec.optional}

    return {
        "name": model_name,
        "backend": PLATFORM,
        "max_batch_size": 0,
        "input": [entry(s) for s in MODEL_INPUTS.values()],
        "output": [{k: v for k, v in entry(s).items() if k != "optional"} for s in MODEL_OUTPUTS.values()],
        "model_transaction_policy": {"decoupled": True},
    }


# OpenAPI schemas of the bodies the HTTP handlers read raw (binary extension, generate's free keys).
def input_schema(spec: TensorSpec) -> dict[str, Any]:
    item = {"type": "string"} if spec.datatype == "BYTES" else {"type": "boolean"}
    return {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"type": "string", "enum": [spec.name]},
            "datatype": {"type": "string", "enum": [spec.datatype]},
            "shape": {
                "type": "array",
                "items": {"type": "integer", "enum": [1]},
                "minItems": 1,
                "maxItems": 1,
            },
            "parameters": {
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
            "data": {"type": "array", "items": item, "minItems": 1, "maxItems": 1},
        },
    }


INFER_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {"oneOf": [input_schema(spec) for spec in MODEL_INPUTS.values()]},
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": list(MODEL_OUTPUTS)},
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                },
            },
        },
    },
}
GENERATE_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["text_input"],
    "properties": {
        "id": {"type": "string"},
        "text_input": {"type": "string"},
        "stream": {"type": "boolean"},
        "exclude_input_in_output": {"type": "boolean"},
        "sampling_parameters": {"type": "string", "description": "JSON object of sampling parameters"},
        "parameters": {"type": "object"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1},
        "seed": {"type": "integer"},
        "stop": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "ignore_eos": {"type": "boolean"},
    },
    "additionalProperties": False,
}
