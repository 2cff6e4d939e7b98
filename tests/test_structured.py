"""Structured output and tool calls: grammar masks, the openai client's JSON and tool round trips.

Every reply is checked by `jsonschema` (an independent validator), never by the grammar that made it.
"""

import concurrent.futures
import json

import httpx
import jsonschema
import openai
import pytest
import torch
from conftest import CHATML, build_tokenizer, start_app, tiny_model
from openai.lib.streaming.chat import ChatCompletionStreamState

from qt_serve.checkpoint import save_checkpoint
from qt_serve.errors import QtError
from qt_serve.sampling import Sampler, SamplingParams, _top_p
from qt_serve.structured import Grammars, closed, json_schema_grammar
from qt_serve.tokenizer import Tokenizer
from qt_serve.tools import CallParser, Plan

# Bounded schemas: a random model samples any allowed token, so an unbounded string never ends.
SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "ok": {"type": "boolean"}},
               "required": ["name", "ok"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
              "minItems": 1, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                                 "x": {"type": "number", "minimum": 0, "maximum": 1,
                                                       "multipleOf": 0.25}},
                "required": ["n", "x"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                                  "tags": {"type": "array", "maxItems": 2,
                                                           "items": {"type": "string", "maxLength": 5}}},
                 "required": ["id", "tags"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tokenizer):
    # A 2048-token context: the generic tool prompt is ~750 tokens of the tiny test tokenizer.
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("s") / "tiny", model, tokenizer)
    server, gens = start_app(ckpt, ("tiny",), ctx=2048, max_batch=8)
    server.served = gens
    yield server
    server.stop()
    for g in gens.values():
        g.engine.shutdown(True, 5)


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def stream_message(chunks):
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(c)
    choices = state.current_completion_snapshot.choices
    return [c.message for c in sorted(choices, key=lambda c: c.index)], [c.finish_reason for c in choices]


# ---- the grammar mask ------------------------------------------------------------------------


def test_mask_follows_a_valid_document_and_allows_eos_only_at_its_end(tokenizer):
    schema = SCHEMAS["nested"]
    doc = '{"user": {"id": 3, "tags": ["ab", "c"]}}'
    grammars = Grammars(tokenizer, tokenizer.vocab_size, [tokenizer.eos_id])
    c = grammars.constraint(json_schema_grammar(schema))
    ids = tokenizer.encode(doc, add_special_tokens=False)
    for t in ids:
        allowed = c.allowed()
        assert allowed[t], f"token {tokenizer.decode([t])!r} of a valid document was masked"
        assert not allowed[tokenizer.eos_id], "EOS allowed before the value is complete"
        c.advance(t)
    allowed = c.allowed()
    assert allowed[tokenizer.eos_id] and int(allowed.sum()) == 1  # complete: EOS and nothing else
    assert "}" not in tokenizer.decode(torch.nonzero(c.allowed())[:, 0].tolist())


def test_a_constrained_sampler_on_random_logits_writes_valid_json(tokenizer):
    grammars = Grammars(tokenizer, tokenizer.vocab_size, [tokenizer.eos_id])
    for name, schema in SCHEMAS.items():
        for seed in range(5):
            s = Sampler(SamplingParams(seed=seed), tokenizer.vocab_size, [tokenizer.eos_id], [],
                        constraint=grammars.constraint(json_schema_grammar(schema)))
            gen = torch.Generator().manual_seed(seed)
            out = []
            while (t := s(torch.randn(tokenizer.vocab_size, generator=gen) * 3).token) != tokenizer.eos_id:
                out.append(t)
                assert len(out) < 300, f"{name}: no end"
            jsonschema.validate(json.loads(tokenizer.decode(out)), schema)


def test_bad_schemas_name_the_problem(tokenizer):
    grammars = Grammars(tokenizer, tokenizer.vocab_size, [tokenizer.eos_id])
    with pytest.raises(QtError, match="Unknown format: zip-code"):
        grammars.check(json_schema_grammar({"type": "string", "format": "zip-code"}, strict=True))
    grammars.check(json_schema_grammar({"type": "string", "format": "zip-code"}, strict=False))  # ignored
    with pytest.raises(QtError, match="Invalid type: text"):
        grammars.check(json_schema_grammar({"type": "text"}))


def test_strict_schemas_close_objects(tokenizer):
    grammars = Grammars(tokenizer, tokenizer.vocab_size, [tokenizer.eos_id])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for strict, more in ((True, False), (False, True)):
        c = grammars.constraint(json_schema_grammar(schema, strict=strict))
        for t in tokenizer.encode('{"a": 1', add_special_tokens=False):
            c.advance(t)
        # after the last required property: another key only if the schema is left open
        assert any(c.allowed()[t] for t in tokenizer.encode(",", add_special_tokens=False)) == more
    nested = {"type": "object", "properties": {"b": {"type": "object", "additionalProperties": True},
                                               "c": {"enum": [{"type": "object"}]}}}
    assert closed(nested) == {"type": "object", "additionalProperties": False, "properties": {
        "b": {"type": "object", "additionalProperties": True}, "c": {"enum": [{"type": "object"}]}}}


def test_top_p_keeps_the_same_set_as_a_full_sort():
    gen = torch.Generator().manual_seed(0)
    for scale, p in [(8.0, 0.9), (0.5, 0.9), (3.0, 0.5), (20.0, 0.99)]:  # peaked and flat distributions
        x = torch.randn(5000, generator=gen) * scale
        probs = x.softmax(-1)
        order = torch.argsort(probs, descending=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        want = set(order[mass_before < p].tolist())
        assert set(torch.nonzero(_top_p(x, p) > float("-inf"))[:, 0].tolist()) == want


# ---- response_format through the openai client ------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_replies_validate(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    kw = dict(model="tiny", messages=ASK, response_format=fmt, temperature=1.0, max_tokens=200, n=10)
    full = client.chat.completions.create(seed=1, **kw)
    streamed, finish = stream_message(client.chat.completions.create(seed=11, stream=True, **kw))
    texts = [c.message.content for c in full.choices] + [m.content for m in streamed]
    assert [c.finish_reason for c in full.choices] + finish == ["stop"] * 20
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) >= 3  # 20 seeds: sampled, not one fixed reply


def test_json_object_mode(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                       seed=3, temperature=1.0, max_tokens=200)
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    greedy = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                            temperature=0, max_tokens=200)
    assert greedy.choices[0].message.content.startswith("{")


def test_free_requests_sharing_steps_with_constrained_ones_are_unchanged(client):
    """Batch invariance: greedy free replies equal their lone runs while constrained ones share the steps."""
    prompts = ["To be", "the slings and arrows", "Paris is", "Tokyo"]
    free = dict(model="tiny", temperature=0, max_tokens=24)
    alone = [client.chat.completions.create(messages=[{"role": "user", "content": p}], **free)
             .choices[0].message.content for p in prompts]
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["nested"], "strict": True}}

    def one(i):
        if i % 2:
            return client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, seed=i, max_tokens=100,
                                                  temperature=1.0).choices[0].message.content
        return client.chat.completions.create(messages=[{"role": "user", "content": prompts[i // 2]}],
                                              **free).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, range(8)))
    assert out[0::2] == alone
    for text in out[1::2]:
        jsonschema.validate(json.loads(text), SCHEMAS["nested"])


# ---- tools --------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(client, choice, stream):
    tools = [WEATHER, TIME]
    kw = dict(model="tiny", messages=ASK, tools=tools, tool_choice=choice, temperature=1.0, seed=5, max_tokens=120)
    if stream:
        (msg,), (finish,) = stream_message(client.chat.completions.create(stream=True, **kw))
    else:
        r = client.chat.completions.create(**kw)
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
    assert finish == "tool_calls" and not msg.content and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), spec)
    assert call.id.startswith("call_") and call.type == "function"
    # The result goes back in the history; the model answers it in text.
    history = ASK + [{"role": "assistant", "tool_calls": [call.model_dump(exclude={"index"})]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=tools, tool_choice="none",
                                            temperature=0, max_tokens=16)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_parallel_tool_calls(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=True, temperature=1.0, seed=2, max_tokens=240, n=6)
    counts = []
    for c in r.choices:
        if c.finish_reason == "tool_calls":
            counts.append(len(c.message.tool_calls))
            for call in c.message.tool_calls:
                args = json.loads(call.function.arguments)
                jsonschema.validate(args, WEATHER["function"]["parameters"] if call.function.name == "get_weather"
                                    else TIME["function"]["parameters"])
    assert counts and max(counts) >= 1


def test_auto_choice_is_text_or_a_valid_call(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], temperature=1.0, seed=0,
                                       max_tokens=60, n=8)
    for c in r.choices:
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
            jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments),
                                WEATHER["function"]["parameters"])
        else:
            assert not c.message.content.startswith("<")


def test_generic_tool_prompt_and_history(tokenizer):
    plan = Plan.of([WEATHER], "auto", None, None)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5C"}]
    rendered, extra = plan.render(msgs, tokenizer.supports_tools)
    assert not tokenizer.supports_tools and extra == {}
    assert rendered[0]["content"].startswith("Be brief.\n\nYou can call functions.")
    assert '"name": "get_weather"' in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant",
                           "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'}
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n5C\n</tool_response>"}


def test_a_template_with_tools_gets_them(tokenizer):
    template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
                "{% for m in messages %}{{ m.role }}:{{ m.content }}{% if m.tool_calls %}"
                "{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
                "{% endif %}|{% endfor %}")
    tok = Tokenizer(build_tokenizer().tok, {"eos_token": "<|im_end|>", "chat_template": template})
    assert tok.supports_tools and not Tokenizer(tok.tok, {"chat_template": CHATML}).supports_tools
    call = {"id": "c9", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": 2}'}}
    msgs, extra = Plan.of([WEATHER, TIME], "auto", None, None).render(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
         {"role": "tool", "tool_call_id": "c9", "content": "noon"}], tok.supports_tools)
    text = tok.apply_chat_template(msgs, add_generation_prompt=False, **extra)
    assert text == 'TOOLS:get_weather;get_time;|user:hi|assistant:CALL get_time {"zone": 2}|tool:noon|'


def test_call_parser_streams_in_any_split():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    for step in (1, 3, 7, len(text)):
        p, calls, content = CallParser(), [], ""
        for i in range(0, len(text), step):
            c, new = p.push(text[i:i + step])
            content += c
            calls += new
        content += p.flush()
        assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    p = CallParser()
    assert p.push("<to") == ("", []) and p.push("day is fine") == ("<today is fine", [])


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                 "schema": {"type": "string", "format": "zip"}}}},
     "Unknown format: zip"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema needs"),
    ({"response_format": {"type": "yaml"}}, "response_format type 'yaml' is unknown"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "parameters must be a JSON schema of an object"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "must be 1-64 letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}], "tool_choice": "required"}, "Invalid type: strin"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "names function 'nope', which is not among the tools (get_weather)"),
    ({"tool_choice": "required"}, "tool_choice is set but no tools are given"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "drop one of them"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "tool result for call id 'call_9', but no earlier assistant message made that call"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "f", "arguments": "{oops"}}]}]},
     "arguments is not valid JSON"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_structured_requests(srv, extra, message):
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
