"""Structured output and tool calls in the OpenAI API: the request fields (OpenAI's
`response_format`, `tools`, `tool_choice`; vLLM's `guided_*` and `structured_outputs`), what they ask
the engine to hold the output to (an engine/structured.StructuredOutput), and tool calls read back
from the constrained output.

Tool calling is constrained decoding, never guessing: with `tool_choice` naming a function, the
output is that function's arguments (JSON matching its `parameters` schema); with "required", a JSON
list of calls, each one of the tools with its arguments. `tool_choice` "auto" (OpenAI's default when
tools are given) would need a parser for each model family's own tool-call syntax, which this
server does not have: it is refused with 400 rather than served as text that may or may not hold a
call. The tools go into the chat template (`tools`) where the template takes them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model_runtime.engine.structured import StructuredOutput
from model_runtime.serving.service import InvalidRequest

NAME_PATTERN = r"^[a-zA-Z0-9_.-]{1,64}$"  # OpenAI's rule for schema and function names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    # The output always follows the schema (it is enforced token by token), so `strict` true and
    # false are served alike: both get output that matches.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` (its newer name for the guided_* fields): exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class GuidedFields(BaseModel):
    """The request fields that ask for structured output (completions and chat)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # as `json_schema.strict`: the arguments always follow `parameters`


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def _json_schema(value: dict | str, field: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{field}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field}: a JSON schema must be a JSON object")
    return value


def structured_output_of(req: GuidedFields) -> StructuredOutput | None:
    """What the request's output must match (None: free text); InvalidRequest naming the fields
    when it asks for more than one."""
    asked: list[StructuredOutput] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append(StructuredOutput("json", {"type": "object"}, "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InvalidRequest('response_format.json_schema: required when type is "json_schema"')
        asked.append(StructuredOutput("json", fmt.json_schema.schema_, "response_format.json_schema.schema"))
    if req.guided_json is not None:
        asked.append(StructuredOutput("json", _json_schema(req.guided_json, "guided_json"), "guided_json"))
    if req.guided_regex is not None:
        asked.append(StructuredOutput("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        asked.append(StructuredOutput("choice", req.guided_choice, "guided_choice"))
    if req.guided_grammar is not None:
        asked.append(StructuredOutput("grammar", req.guided_grammar, "guided_grammar"))
    if (so := req.structured_outputs) is not None:
        named = [
            StructuredOutput("json", _json_schema(so.json_, "structured_outputs.json"), "structured_outputs.json")
            if so.json_ is not None else None,
            StructuredOutput("regex", so.regex, "structured_outputs.regex") if so.regex is not None else None,
            StructuredOutput("choice", so.choice, "structured_outputs.choice") if so.choice is not None else None,
            StructuredOutput("grammar", so.grammar, "structured_outputs.grammar") if so.grammar is not None else None,
            StructuredOutput("json", {"type": "object"}, "structured_outputs.json_object") if so.json_object else None,
        ]
        named = [n for n in named if n is not None]
        if not named:
            raise InvalidRequest("structured_outputs: set one of json, regex, choice, grammar or json_object")
        asked.extend(named)
    if len(asked) > 1:
        raise InvalidRequest(
            f"{' and '.join(a.field for a in asked)}: a request can ask for one structured output only"
        )
    return asked[0] if asked else None


# -- tools ----------------------------------------------------------------------------------------


def _parameters_schema(function: FunctionDefinition) -> dict:
    # OpenAI: leaving `parameters` out defines a function that takes no arguments
    return function.parameters if function.parameters is not None else {"type": "object", "properties": {},
                                                                         "additionalProperties": False}


def forced_tool_calls(
    tools: list[Tool] | None, tool_choice, parallel_tool_calls: bool | None
) -> tuple[StructuredOutput | None, str | None]:
    """(what the output must match, the function it calls: its name, or "" for "required"), or
    (None, None) when the output is free text; InvalidRequest naming the field for a choice that
    cannot be served."""
    if not tools:
        if tool_choice in (None, "none", "auto"):  # nothing to call: free text, as OpenAI
            return None, None
        raise InvalidRequest("tool_choice: names a tool call, but the request has no tools")
    if tool_choice == "none":
        return None, None
    if tool_choice in (None, "auto"):
        raise InvalidRequest(
            'tool_choice: "auto" (the default when tools are given) is not supported: this server has no '
            "parser for the model family's own tool-call syntax, so it cannot tell a call from text. Set "
            'tool_choice to "required" or {"type": "function", "function": {"name": ...}} (the output is '
            'then constrained to a call that matches the schema) or to "none"'
        )
    if tool_choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "parameters": _parameters_schema(t.function)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return StructuredOutput("json", schema, "tools"), ""
    name = tool_choice.function.name
    for i, tool in enumerate(tools):
        if tool.function.name == name:
            return StructuredOutput("json", _parameters_schema(tool.function), f"tools[{i}].function.parameters"), name
    raise InvalidRequest(f"tool_choice.function.name: {name!r} is not one of the request's tools")


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_calls_of(text: str, function: str) -> list[dict[str, Any]] | None:
    """The tool calls in a constrained output (`function`: the named function, or "" for
    "required"'s list of calls); None when the output is not a whole call (cut by max_tokens)."""
    if function:
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return None
        return [tool_call(function, text)]
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [tool_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls]


# -- the chat template ----------------------------------------------------------------------------


def template_reads_tool_calls(template: str) -> bool:
    return "tool_calls" in template  # a message attribute, which jinja's meta cannot see


def _arguments_value(arguments: str) -> Any:
    # templates (and transformers' convention) take the arguments as an object
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def template_message(
    role: str, content: str, tool_calls: list[ToolCall] | None, tool_call_id: str | None, template: str
) -> dict[str, Any]:
    """One chat message as the template reads it. An assistant message's tool calls go in
    `tool_calls` where the template reads them, else into its content as JSON (so that the model
    still sees what it called); a tool message keeps its `tool_call_id`."""
    message: dict[str, Any] = {"role": role, "content": content}
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    if tool_calls:
        values = [{"name": c.function.name, "arguments": _arguments_value(c.function.arguments)} for c in tool_calls]
        if template_reads_tool_calls(template):
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": v} for c, v in zip(tool_calls, values, strict=True)
            ]
        else:
            message["content"] = "\n".join(part for part in (content, json.dumps(values, ensure_ascii=False)) if part)
    return message
