"""The chat page (Gradio Blocks): streaming multi-turn chat with any served model.

The conversation lives in the Chatbot's value, which the browser sends with every event, and a
copy in the browser's localStorage, so neither a reload nor a server restart loses it. Each reply
ends with a one-line footer (tokens, time to first token, tokens/s) that is stripped again before
the history goes back to the model.

"Structured output" asks for a JSON reply (any object, or one valid against a schema) or offers
tools, as the chat API's `response_format`, `tools` and `tool_choice` do. A finished JSON reply is
shown pretty-printed and each tool call as a headed JSON block of its arguments; the model gets
back what it wrote: compact JSON, and calls in its `<tool_call>` form.
"""

from __future__ import annotations

import json
import re
import time

import gradio as gr

from app.models import ChatError, Pacer, ReplyStats, Settings
from qt_serve.tools import call_text

FOOTER = re.compile(r"\n\n<sub>\d+ tokens · [^<\n]*</sub>$")  # the stats line under each reply
JSON_REPLY = re.compile(r"```json\n(.*)\n```", re.S)  # a whole reply that is a pretty-printed JSON value
CALL = re.compile(r"\*\*Tool call: ([\w-]+)\*\*\n```json\n(.*?)\n```", re.S)  # one shown tool call
FORMATS = ["Text", "JSON object", "JSON schema"]
SCHEMA_HINT = '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}'
TOOLS_HINT = ('[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
              '"properties": {"city": {"type": "string"}}, "required": ["city"]}}}]')


def text_of(message: dict) -> str:
    """A Chatbot message's text (Gradio 6 gives content as a list of parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def pretty(text: str) -> str | None:
    """JSON text indented for reading; None if it is not JSON (e.g. a reply cut at max tokens)."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except json.JSONDecodeError:
        return None


def shown(text: str, calls: list[dict], finished_json: bool) -> str:
    """A reply as the page shows it: a finished JSON reply pretty-printed, each tool call headed by its
    name with its arguments pretty-printed. `raw` undoes this for the model."""
    if finished_json and (value := pretty(text)) is not None:
        text = f"```json\n{value}\n```"
    return "\n\n".join([text, *map(call_block, calls)] if text else map(call_block, calls))


def call_block(call: dict) -> str:
    f = call["function"]
    return f"**Tool call: {f['name']}**\n```json\n{pretty(f['arguments']) or f['arguments']}\n```"


def compact(text: str) -> str | None:
    """JSON text in the layout the model writes (qt's: `, ` and `: `, no newlines); None if not JSON."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return None


def hermes(m: re.Match) -> str:
    """A shown tool call (a `CALL` match) as the model wrote it; a look-alike holding no JSON stays."""
    return m[0] if compact(m[2]) is None else call_text(m[1], json.loads(m[2]))


def raw(reply: str) -> str:
    """A shown reply as the model wrote it: no footer, JSON compact again, tool calls in Hermes form."""
    reply = FOOTER.sub("", reply)
    whole = JSON_REPLY.fullmatch(reply)
    if whole and (value := compact(whole[1])) is not None:
        return value
    return CALL.sub(hermes, reply)


def to_messages(history: list[dict], system: str) -> list[dict]:
    """Chatbot history -> chat messages for the model: replies as written (`raw`), system prompt first."""
    messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
    return messages + [{"role": m["role"], "content": raw(text_of(m)) if m["role"] == "assistant" else text_of(m)}
                       for m in history]


def parsed(text: str, what: str, kind: type):
    """A JSON text box's value, or a ChatError naming the box and the problem."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, kind):
        raise ChatError(f"{what} must be a JSON {'object ({...})' if kind is dict else 'list ([...])'}")
    return value


def settings_of(temperature, top_p, max_tokens, seed: str, reply_format: str = "Text", schema: str = "",
                tools: str = "", tool_choice: str = "auto") -> Settings:
    seed, schema, tools = (seed or "").strip(), schema or "", tools or ""  # an untouched Textbox sends None
    if seed and not seed.lstrip("-").isdigit():
        raise ChatError(f"the seed must be a whole number or blank (random), not {seed!r}")
    if reply_format == "JSON schema":
        if not schema.strip():
            raise ChatError("the reply format is JSON schema but the schema is empty: write one, or pick another")
        # strict, as OpenAI's: objects closed, and a keyword that cannot be enforced is an error, not ignored
        fmt = {"type": "json_schema", "json_schema": {"name": "page", "strict": True,
                                                      "schema": parsed(schema, "the JSON schema", dict)}}
    else:
        fmt = {"type": "json_object"} if reply_format == "JSON object" else None
    offered = parsed(tools, "the tools", list) if tools.strip() else None
    return Settings(temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens),
                    seed=int(seed) if seed else None, response_format=fmt, tools=offered,
                    tool_choice=tool_choice if offered else None)


async def reply(model, history: list[dict], system: str, options: tuple):
    """Stream the assistant's reply to `history` (`options`: `settings_of`'s arguments): yields
    (history, status) as text arrives."""
    history = [{"role": m["role"], "content": text_of(m)} for m in history]
    if not history or history[-1]["role"] != "user":
        return  # nothing to answer (e.g. an empty message was ignored)
    messages = to_messages(history, system)
    history.append({"role": "assistant", "content": ""})
    stats, pacer = ReplyStats(time.perf_counter()), Pacer()
    text, calls = "", []
    yield history, "…"
    try:
        settings = settings_of(*options)
        async for piece in model.stream(messages, settings):
            stats.seen(piece)
            text, calls = text + piece.text, calls + piece.calls
            history[-1]["content"] = shown(text, calls, False)  # JSON as it streams, raw
            if pacer.due():
                yield history, f"{piece.tokens} tokens"
    except ChatError as e:
        history.pop()  # the person's message stays, so they can shorten it, fix the settings or retry
        gr.Warning(str(e))
        yield history, f"**error:** {e}"
        return
    history[-1]["content"] = (shown(text, calls, settings.response_format is not None)
                              + f"\n\n<sub>{stats.summary()}</sub>")
    yield history, ""


def build(models: dict, secret: str, title: str = "qt chat") -> gr.Blocks:
    """`secret` encrypts the copy of the chat kept in the browser; it must outlive a server restart."""
    first = next(iter(models.values()))
    ctx = first.context or 4096
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"## {title}\nStreaming chat with the models this server holds. "
                    "[Arena](/arena) · [API docs](/docs)")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy", "copy_all"], elem_id="chat")
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    msg = gr.Textbox(show_label=False, placeholder="Message (Enter to send)", scale=6,
                                     elem_id="msg", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                with gr.Row():
                    regen = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                    clear = gr.Button("Clear", size="sm", elem_id="clear")
            with gr.Column(scale=1, min_width=240):
                model = gr.Dropdown(list(models), value=first.name, label="Model", interactive=len(models) > 1,
                                    elem_id="model")
                system = gr.Textbox(label="System prompt", lines=3, placeholder="(none)", elem_id="system")
                start = first.defaults()  # the model's own sampling defaults, as the API applies them
                temperature = gr.Slider(0, 2, value=start.temperature, step=0.05, label="Temperature (0: greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=start.top_p, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, ctx, value=min(512, ctx), step=1, label="Max new tokens",
                                       elem_id="max-tokens")
                seed = gr.Textbox(label="Seed", placeholder="random", elem_id="seed")
                with gr.Accordion("Structured output", open=False, elem_id="structured"):
                    reply_format = gr.Radio(FORMATS, value="Text", label="Reply format", elem_id="reply-format")
                    schema = gr.Textbox(label="JSON schema of the reply", lines=4, max_lines=16,
                                        placeholder=SCHEMA_HINT, visible=False, elem_id="schema")
                    tools = gr.Textbox(label="Tools (OpenAI's JSON list; blank: none)", lines=4, max_lines=16,
                                       placeholder=TOOLS_HINT, elem_id="tools")
                    tool_choice = gr.Radio(["auto", "required", "none"], value="auto", label="Tool choice",
                                           elem_id="tool-choice")
                reply_format.change(lambda f: gr.update(visible=f == "JSON schema"), reply_format, schema,
                                    queue=False)

        def add_message(text: str, history: list[dict]):
            if not text.strip():
                return gr.update(), history, gr.update()  # an empty message is ignored: no request
            if history and history[-1]["role"] == "user":
                history = history[:-1]  # one that got no reply (an error): the new message replaces it
            history = history + [{"role": "user", "content": text}]
            return "", history, history

        async def respond(history, name, system_prompt, *options):
            async for out in reply(models[name], history, system_prompt, options):
                yield out

        def drop_reply(history: list[dict]):
            history = history[:-1] if history and history[-1]["role"] == "assistant" else history
            return history, history

        gen_inputs = [chatbot, model, system, temperature, top_p, max_tokens, seed, reply_format, schema, tools,
                      tool_choice]  # after system: settings_of's arguments, in its order
        # The conversation is also kept in the browser (localStorage), saved with the person's message
        # and again with the reply: a reload, or the reload Gradio does after a server restart, brings it back.
        saved = gr.BrowserState([], storage_key="qt-chat-history", secret=secret)

        def save(history):
            return history

        runs = []
        for trigger in (msg.submit(add_message, [msg, chatbot], [msg, chatbot, saved], queue=False),
                        send.click(add_message, [msg, chatbot], [msg, chatbot, saved], queue=False),
                        regen.click(drop_reply, chatbot, [chatbot, saved], queue=False)):
            # concurrency_limit=None: the engine batches and queues; Gradio's default of one would
            # serialize every user of the page.
            runs.append(trigger.then(respond, gen_inputs, [chatbot, status], concurrency_limit=None))
            runs[-1].then(save, chatbot, saved, queue=False)
        page.load(save, saved, chatbot, queue=False)
        # Stop cancels the streaming event; the cancellation reaches the engine, which frees the slot.
        (stop.click(None, None, None, cancels=runs, queue=False)
         .then(lambda: "stopped", None, status, queue=False).then(save, chatbot, saved, queue=False))
        clear.click(lambda: ([], "", []), None, [chatbot, status, saved], cancels=runs, queue=False)
    return page
