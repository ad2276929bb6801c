"""Structured output and tool calls through the `openai` SDK, on a tiny model with random weights:
whatever such a model prefers, the output must match what was asked (that is what constrained
decoding is for), greedy and sampled, streamed and not; a constraint that cannot be used is a 400
naming its field."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.runtime

MODEL_NAME = "tiny-mixtral"
MESSAGES = [{"role": "user", "content": "Describe a person."}]

# Bounded (strings with maxLength, enums, integers in a range), so that any path through the
# grammar ends well within max_tokens, even a random model's.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]
SAMPLINGS = [{"temperature": 0}, {"temperature": 1.0, "seed": 7}, {"temperature": 1.0, "seed": 8, "top_p": 0.9}]


@pytest.fixture(scope="module")
def client(runtime_server):
    with openai.OpenAI(base_url=f"{runtime_server.base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_chat_json_schema_output_validates(client, sampling):
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=120, response_format=person_format(), **sampling
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop"  # the grammar ended the output, not max_tokens
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_streamed_equals_non_streamed_and_validates(client):
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 120, "temperature": 0,
              "response_format": person_format(strict=False)}
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(streamed), PERSON)


def test_completions_take_response_format_and_n(client):
    result = client.completions.create(
        model=MODEL_NAME, prompt="A person:", max_tokens=120, temperature=1.0, seed=3, n=3,
        extra_body={"response_format": person_format()},
    )
    assert len(result.choices) == 3
    for choice in result.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), PERSON)


def test_json_object_output_parses_and_the_mask_beats_logit_bias(client):
    """`logit_bias` pushes the model to "}" (125) and "x" (120): the grammar still decides what may
    come, so the output opens with "{" (not "x") and the bias only picks among allowed tokens."""
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=60, temperature=0,
        response_format={"type": "json_object"}, logit_bias={"125": 100, "120": 100},
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_guided_choice_is_one_of_the_choices(client, sampling):
    choices = ["red", "green", "blue violet"]
    result = client.completions.create(
        model=MODEL_NAME, prompt="Colour:", max_tokens=30, extra_body={"guided_choice": choices}, **sampling
    )
    assert result.choices[0].text in choices and result.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_guided_regex_output_fullmatches(client, sampling):
    pattern = r"[a-z]{3,6}-[0-9]{2,4}"
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=30, extra_body={"guided_regex": pattern}, **sampling
    )
    assert re.fullmatch(pattern, result.choices[0].message.content)
    assert result.choices[0].finish_reason == "stop"


def test_grammar_and_vllms_structured_outputs(client):
    lark = 'start: "yes" | "no" | "n" DIGIT\nDIGIT: /[0-9]/'
    text = client.completions.create(
        model=MODEL_NAME, prompt="?", max_tokens=10, temperature=1.0, seed=1, extra_body={"guided_grammar": lark}
    ).choices[0].text
    assert re.fullmatch(r"yes|no|n[0-9]", text)
    text = client.completions.create(
        model=MODEL_NAME, prompt="?", max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"regex": "[0-9]{4}"}},
    ).choices[0].text
    assert re.fullmatch("[0-9]{4}", text)


@pytest.mark.parametrize("sampling", SAMPLINGS[:2])
def test_named_tool_choice_returns_a_call_matching_the_schema(client, sampling):
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=80, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **sampling,
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_named_tool_call_streams_its_arguments(client):
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 80, "temperature": 0, "tools": TOOLS,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    full = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert first.id and first.function.name == "get_weather" and first.type == "function"
    arguments = "".join(c.choices[0].delta.tool_calls[0].function.arguments
                        for c in chunks if c.choices[0].delta.tool_calls)
    assert arguments == full.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_calls_one_of_the_tools(client, stream):
    kwargs = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 100, "temperature": 1.0, "seed": 5,
              "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    if stream:
        chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        finish_reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls, finish_reason = choice.message.tool_calls, choice.finish_reason
    assert finish_reason == "tool_calls" and len(calls) == 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(calls[0].function.arguments), schemas[calls[0].function.name])


def test_a_conversation_with_tool_calls_and_results_is_rendered(client, runtime_server):
    """An assistant's tool calls and the tool's answer are taken (not dropped): the byte-level
    template has no tool syntax, so the calls are written into the assistant's turn as JSON."""
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    result = client.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=3, temperature=0,
                                            tools=TOOLS, tool_choice="none")
    assert result.choices[0].message.tool_calls is None and result.choices[0].finish_reason
    r = httpx.post(f"{runtime_server.base_url}/tokenize", json={"messages": history, "return_token_strs": True})
    prompt = "".join(r.json()["token_strs"])
    assert '"get_weather"' in prompt and "Paris" in prompt and "21 degrees" in prompt


def test_constraints_that_cannot_be_served_are_400s_naming_the_field(client):
    chat = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4}
    refused = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        ({"extra_body": {"guided_grammar": "start: undefined_rule"}}, "guided_grammar"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "bogus": 1}}}, "structured_outputs.bogus"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
         "response_format and guided_regex"),
        ({"tools": TOOLS}, "tool_choice"),  # "auto", the default: no tool-call parser, refused
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
          "tool_choice": {"type": "function", "function": {"name": "f"}}}, r"tools\[0\].function.parameters"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice and response_format"),
    ]
    for extra, field in refused:
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(**chat, **extra)
    with pytest.raises(openai.BadRequestError, match="tools"):  # completions take no tools
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2,
                                  extra_body={"tools": TOOLS})


def test_kserve_generate_refuses_guided_parameters(runtime_server):
    """KServe's and Triton's paths do not take structured output: refused by name, never ignored."""
    r = httpx.post(f"{runtime_server.base_url}/v2/models/{MODEL_NAME}/generate",
                   json={"text_input": "x", "parameters": {"max_tokens": 2, "guided_json": PERSON}})
    assert r.status_code == 400 and "guided_json" in r.text
