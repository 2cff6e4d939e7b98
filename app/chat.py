"""The chat page (Gradio Blocks): streaming multi-turn chat with any served model.

The conversation lives in the Chatbot's value, which the browser sends with every event, and a
copy in the browser's localStorage, so neither a reload nor a server restart loses it. Each reply
ends with a one-line footer (tokens, time to first token, tokens/s) that is stripped again before
the history goes back to the model.
"""

from __future__ import annotations

import re
import time

import gradio as gr

from app.models import ChatError, Pacer, ReplyStats, Settings

FOOTER = re.compile(r"\n\n<sub>\d+ tokens · [^<\n]*</sub>$")  # the stats line under each reply


def text_of(message: dict) -> str:
    """A Chatbot message's text (Gradio 6 gives content as a list of parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def to_messages(history: list[dict], system: str) -> list[dict]:
    """Chatbot history -> chat messages for the model: footers stripped, system prompt first."""
    messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
    return messages + [{"role": m["role"], "content": FOOTER.sub("", text_of(m))} for m in history]


def settings_of(temperature, top_p, max_tokens, seed: str) -> Settings:
    seed = (seed or "").strip()
    if seed and not seed.lstrip("-").isdigit():
        raise ChatError(f"the seed must be a whole number or blank (random), not {seed!r}")
    return Settings(temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens),
                    seed=int(seed) if seed else None)


async def reply(model, history: list[dict], system: str, sampling: tuple):
    """Stream the assistant's reply to `history`: yields (history, status) as text arrives."""
    history = [{"role": m["role"], "content": text_of(m)} for m in history]
    if not history or history[-1]["role"] != "user":
        return  # nothing to answer (e.g. an empty message was ignored)
    messages = to_messages(history, system)
    history.append({"role": "assistant", "content": ""})
    stats, pacer = ReplyStats(time.perf_counter()), Pacer()
    yield history, "…"
    try:
        async for piece in model.stream(messages, settings_of(*sampling)):
            stats.seen(piece)
            history[-1]["content"] += piece.text
            if pacer.due():
                yield history, f"{piece.tokens} tokens"
    except ChatError as e:
        history.pop()  # the person's message stays, so they can shorten it or retry
        gr.Warning(str(e))
        yield history, f"**error:** {e}"
        return
    history[-1]["content"] += f"\n\n<sub>{stats.summary()}</sub>"
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

        def add_message(text: str, history: list[dict]):
            if not text.strip():
                return gr.update(), history, gr.update()  # an empty message is ignored: no request
            if history and history[-1]["role"] == "user":
                history = history[:-1]  # one that got no reply (an error): the new message replaces it
            history = history + [{"role": "user", "content": text}]
            return "", history, history

        async def respond(history, name, system_prompt, t, p, n, s):
            async for out in reply(models[name], history, system_prompt, (t, p, n, s)):
                yield out

        def drop_reply(history: list[dict]):
            history = history[:-1] if history and history[-1]["role"] == "assistant" else history
            return history, history

        gen_inputs = [chatbot, model, system, temperature, top_p, max_tokens, seed]
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
