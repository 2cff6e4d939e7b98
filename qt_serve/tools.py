"""Tools and response formats of the chat API: request -> prompt and grammar, output -> tool calls.

    plan = Plan.of(tools, tool_choice, parallel_tool_calls, response_format)   # 400 for bad values
    ids = chat_ids(gen, messages, plan)             # tools through the template, or the generic prompt
    params = gen.sampling(len(ids), grammar=plan.grammar)   # grammar None: free text
    reply = Reply(plan)                             # per choice: deltas -> content, tool calls, finish

Tool calls are written in the Hermes form that Qwen2.5, SmolLM3 and Hermes models are trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A model whose chat template takes `tools` (it names the variable) gets them through its template.
Any other template gets the generic tool prompt below as (part of) its system message, as
llama.cpp's server does for such templates; earlier calls are written back in the form above, and
tool results as a user turn of `<tool_response>` blocks, which every template can render.

`tool_choice`:
  - "none": no tools in the prompt and free text out (tools are then listed for nothing);
  - "auto" (the default with tools): text or calls; once a reply starts with `<` it must be a
    well-formed call whose arguments match that tool's schema (so a text reply cannot start with `<`);
  - "required": one call or more, arguments constrained by the tools' schemas;
  - {"type": "function", "function": {"name": N}}: a call of N.
`parallel_tool_calls: true` allows one call or more per reply; unset or false, exactly one. (OpenAI's
default is true; llama.cpp's server, like qt, defaults to one: small models given the choice repeat
the same call until max_tokens.)
`response_format` json_object / json_schema constrains the reply to JSON (with "auto" tools: a JSON
reply or calls); with a "required" or named choice the reply is calls, so it is refused there.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from qt_serve.sequence import Delta
from qt_serve.service import Generator, RequestError
from qt_serve.structured import closed, json_schema_grammar, lark_grammar, lark_json, lark_literal

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names

GENERIC_PROMPT = """You can call functions. Their signatures, as JSON schemas, are within <tools></tools>:
<tools>
{tools}
</tools>
To call a function, reply with a JSON object of its name and arguments within <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-object>}}
</tool_call>{rule}"""


def bad(message: str, param: str) -> RequestError:
    return RequestError(message, param=param)


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    strict: bool

    def spec(self) -> dict:
        """As OpenAI's request and Hugging Face chat templates write a tool."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def call_schema(self) -> dict:
        args = closed(self.parameters) if self.strict else self.parameters
        return {"type": "object", "properties": {"name": {"const": self.name}, "arguments": args},
                "required": ["name", "arguments"], "additionalProperties": False}


def parse_tools(tools: list) -> list[Tool]:
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise bad(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise bad(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}", where)
        if name in seen:
            raise bad(f"{where}: two tools are named {name!r}", where)
        seen.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise bad(f"{where}.function.parameters must be a JSON schema of an object "
                      f"(\"type\": \"object\"), got {json.dumps(params)[:200]}", where)
        out.append(Tool(name, str(f.get("description") or ""), params, bool(f.get("strict", False))))
    return out


def response_schema(fmt: dict | None) -> tuple[dict, bool] | None:
    """OpenAI's `response_format` -> (JSON schema, strict), or None for free text."""
    if not fmt:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}, False  # any object: not closed
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                      "response_format")
        return spec["schema"], bool(spec.get("strict", False))
    raise bad(f"response_format type {kind!r} is unknown; use 'text', 'json_object' or 'json_schema'",
              "response_format")


@dataclass
class Plan:
    """What one chat request asks of its output: free text, JSON, or tool calls."""

    tools: list[Tool] = field(default_factory=list)
    choice: str = "none"  # none | auto | required | the name of the one function to call
    parallel: bool = False
    schema: tuple[dict, bool] | None = None  # response_format's (schema, strict)

    @classmethod
    def of(cls, tools: list | None, tool_choice, parallel_tool_calls: bool | None, response_format) -> Plan:
        schema = response_schema(response_format)
        if tool_choice is not None and not tools:
            raise bad("tool_choice is set but no tools are given", "tool_choice")
        if not tools:
            return cls(schema=schema)
        parsed = parse_tools(tools)
        if tool_choice is None or tool_choice in ("auto", "none", "required"):
            choice = tool_choice or "auto"
        elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
            choice = tool_choice["function"].get("name")
            if choice not in {t.name for t in parsed}:
                raise bad(f"tool_choice names function {choice!r}, which is not among the tools "
                          f"({', '.join(t.name for t in parsed)})", "tool_choice")
        else:
            raise bad("tool_choice must be 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        if schema is not None and choice not in ("auto", "none"):
            raise bad(f"response_format asks for a JSON reply but tool_choice {tool_choice!r} makes the reply "
                      "tool calls; drop one of them", "response_format")
        return cls(parsed, choice, bool(parallel_tool_calls), schema)

    @property
    def calls(self) -> bool:
        """Whether the reply may hold tool calls."""
        return bool(self.tools) and self.choice != "none"

    @property
    def grammar(self) -> str | None:
        """The llguidance grammar of the reply, or None for free text."""
        if not self.calls:
            return None if self.schema is None else json_schema_grammar(*self.schema)
        tools = self.tools if self.choice in ("auto", "required") else [t for t in self.tools if t.name == self.choice]
        body = {"anyOf": [t.call_schema() for t in tools]} if len(tools) > 1 else tools[0].call_schema()
        lenient = not all(t.strict for t in tools)  # as OpenAI: only strict tools refuse what they cannot enforce
        rules = [f"call: {lark_literal(OPEN + chr(10))} body {lark_literal(chr(10) + CLOSE)}",
                 f"body: {lark_json(body, lenient)}",
                 "calls: call" + (' ("\\n" call)*' if self.parallel else "")]
        if self.choice != "auto":
            start = "start: calls"
        elif self.schema is not None:
            start = "start: reply | calls"
            schema, strict = self.schema
            rules.append(f"reply: {lark_json(closed(schema) if strict else schema, not strict)}")
        else:
            start = "start: TEXT | calls"
            rules.append(r"TEXT: /[^<](.|\n)*/")
        return lark_grammar("\n".join([start, *rules]))

    def render(self, messages: list[dict], supports_tools: bool) -> tuple[list[dict], dict]:
        """OpenAI messages -> (messages for the chat template, its extra variables)."""
        listed = self.tools if self.calls else []
        if supports_tools:
            return native(messages), ({"tools": [t.spec() for t in listed]} if listed else {})
        out = generic(messages)
        if listed:
            rule = {"auto": "", "required": "\nCall at least one function."}.get(
                self.choice, f"\nCall the function {self.choice}.")
            prompt = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in listed),
                                           rule=rule)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out, {}

    def parser(self) -> CallParser | None:
        return CallParser() if self.calls else None


# ---- the history --------------------------------------------------------------------------


def history(messages: list[dict]) -> list[dict]:
    """Check the tool parts of OpenAI messages: each assistant call has a name and JSON arguments,
    each tool message answers an earlier call. Returns them with arguments parsed."""
    out, open_ids = [], {}
    for i, m in enumerate(messages):
        m = dict(m)
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                f = c.get("function") if isinstance(c, dict) else None
                where = f"messages[{i}].tool_calls[{j}]"
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise bad(f"{where} must have a function with a name", "messages")
                try:
                    args = json.loads(f.get("arguments") or "{}") if isinstance(f.get("arguments", ""), str) \
                        else f["arguments"]
                except json.JSONDecodeError as e:
                    raise bad(f"{where}.function.arguments is not valid JSON: {e}", "messages") from None
                cid = c.get("id") or f"call_{i}_{j}"
                open_ids[cid] = f["name"]
                calls.append({"id": cid, "type": "function", "function": {"name": f["name"], "arguments": args}})
            m["tool_calls"] = calls
        elif m["role"] == "tool":
            cid = m.get("tool_call_id")
            if cid not in open_ids:
                raise bad(f"messages[{i}] is a tool result for call id {cid!r}, but no earlier assistant message "
                          f"made that call (ids: {', '.join(map(repr, open_ids)) or 'none'})", "messages")
            m["name"] = open_ids[cid]
        out.append(m)
    return out


def native(messages: list[dict]) -> list[dict]:
    """Messages as Hugging Face chat templates with tool support take them. A tool-calling turn's null
    content becomes "" (as vLLM passes it): Qwen3's template reads `message.content` of every turn."""
    return [{k: v for k, v in m.items() if v is not None} | ({"content": ""} if m.get("content") is None else {})
            for m in history(messages)]


def call_text(name: str, arguments) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def generic(messages: list[dict]) -> list[dict]:
    """Messages any template renders: calls written into the assistant's text, results as a user turn."""
    out: list[dict] = []
    results = False  # whether out[-1] is a user turn of tool results
    for m in history(messages):
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if results:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            results = True
            continue
        results = False
        parts = [m["content"]] if m.get("content") else []
        parts += [call_text(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]
        out.append({"role": m["role"], "content": "\n".join(parts)})
    return out


# ---- the reply ----------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


class CallParser:
    """One choice's streamed text -> content and tool calls. A reply that starts with `<tool_call>`
    is calls; text is held back only while it could still be that start."""

    def __init__(self):
        self.buf, self.mode, self.calls = "", None, []  # mode: None (undecided) | "text" | "calls"

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """New text -> (content to send, calls completed by it)."""
        self.buf += text
        if self.mode is None:
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.mode = "calls"
            elif head and not OPEN.startswith(head):
                self.mode = "text"
            else:
                return "", []
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return out, []
        text, done, end = "", [], 0
        for m in CALL.finditer(self.buf):
            end = m.end()
            try:
                call = json.loads(m.group(1))
                done.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", str(call["name"]),
                                     json.dumps(call["arguments"], ensure_ascii=False)))
            except (json.JSONDecodeError, KeyError, TypeError):  # not a call after all (unconstrained output)
                text += m.group(0)
        self.buf = self.buf[end:]
        self.calls += done
        return text, done

    def flush(self) -> str:
        """What is left when the reply ends (an unfinished call is returned as text, not lost)."""
        out, self.buf = self.buf.strip() if self.mode == "calls" else self.buf, ""
        return out


def chat_ids(g: Generator, messages: list[dict], plan: Plan, add_generation_prompt: bool = True) -> list[int]:
    """A chat's prompt (OpenAI messages as dicts) through the model's template, with the tools and
    tool history `plan` renders."""
    msgs, extra = plan.render(messages, g.tokenizer.supports_tools)
    return g.encode_chat(msgs, add_generation_prompt, **extra)


class Reply:
    """One chat choice's text deltas -> OpenAI message fields: content, and tool calls when the request
    has tools (`tools.CallParser`); the finish reason becomes "tool_calls" when calls end the reply."""

    def __init__(self, plan: Plan):
        self.parser = plan.parser()
        self.calls = 0

    def push(self, d: Delta) -> tuple[str, list[dict], str | None]:
        """(content, tool-call entries with their stream index, finish reason) this delta adds."""
        if self.parser is None:
            return d.text, [], d.finish_reason
        text, calls = self.parser.push(d.text)
        if d.finish_reason is not None:
            text += self.parser.flush()
        entries = [c.openai(self.calls + k) for k, c in enumerate(calls)]
        self.calls += len(calls)
        finish = "tool_calls" if d.finish_reason == "stop" and self.calls else d.finish_reason
        return text, entries, finish
