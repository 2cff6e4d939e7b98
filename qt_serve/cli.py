"""Thin command-line entry points: parse flags, call the library, print errors without tracebacks."""

from __future__ import annotations

import argparse
import sys
import time

from qt_serve.errors import QtError
from qt_serve.hub import DEFAULT_MODEL

CHAT_HELP = """commands:
  /system TEXT   set the system prompt (and start over)
  /reset         forget the conversation
  /quit          leave (or Ctrl-D); Ctrl-C stops a reply"""


def positive(text: str) -> int:
    """argparse type: an integer ≥ 1, so a bad flag is a usage error rather than a traceback."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"checkpoint dir, HF Llama dir, .gguf file or known name (default {DEFAULT_MODEL})")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weight dtype (default: the checkpoint's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--max-seq-len", type=positive, default=4096, help="context length to allocate the KV cache for")


def add_load_in_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--load-in", default=None, choices=["int8", "int4"],
                    help="quantize while loading with bitsandbytes (CUDA only; on CPU use qt-quant --to int8|int4)")


def run(main):
    """Run a CLI body, turning QtError into `error: ...` (exit 2) and Ctrl-C into a quiet exit 130."""
    try:
        return main()
    except QtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def chat_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qt-chat", description="Chat with a model in the terminal.",
                                 epilog=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(ap)
    add_load_in_flag(ap)
    ap.add_argument("--system", default=None, help="system prompt")
    ap.add_argument("--temperature", type=float, default=None, help="default: the model's (generation_config.json)")
    ap.add_argument("--top-p", type=float, default=None, help="default: the model's")
    ap.add_argument("--max-tokens", type=positive, default=512, help="new tokens at most per reply")
    ap.add_argument("--seed", type=int, default=None)
    shape = ap.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="every reply a JSON object")
    shape.add_argument("--json-schema", metavar="FILE",
                       help="every reply JSON valid against the JSON schema in FILE, taken as OpenAI's strict mode "
                            "does: objects closed, a keyword that cannot be enforced an error")
    args = ap.parse_args(argv)
    return run(lambda: chat(args))


def reply_format(args) -> dict | None:
    """The chat API's `response_format` the flags ask for."""
    if args.json:
        return {"type": "json_object"}
    if args.json_schema is None:
        return None
    import json
    from pathlib import Path

    try:
        schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
    except OSError as e:
        raise QtError(f"--json-schema {args.json_schema}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QtError(f"--json-schema {args.json_schema}: not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise QtError(f"--json-schema {args.json_schema}: a JSON schema is an object ({{...}}), not this "
                      f"{type(schema).__name__}")
    return {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem, "schema": schema,
                                                   "strict": True}}


def chat(args) -> int:
    fmt = reply_format(args)  # first: a bad schema file fails before torch and the model load
    import torch

    from qt_serve.generate import LLM
    from qt_serve.tools import Plan, chat_ids

    torch.set_grad_enabled(False)
    plan = Plan.of(None, None, None, fmt)
    llm = LLM.load(args.model, dtype=args.dtype, device=args.device, max_seq_len=args.max_seq_len,
                   load_in=args.load_in)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise QtError(f"{args.model} has no tokenizer with a chat_template, so it cannot chat")
    try:  # once, not at the first message: a keyword llguidance lacks, a bad pattern
        grammar = plan.grammar
        if grammar is not None:
            llm.engine.grammars.check(grammar)
    except QtError as e:
        raise QtError(f"{f'--json-schema {args.json_schema}' if args.json_schema else '--json'}: {e}") from None
    system = args.system
    history: list[dict] = []
    print(f"qt-chat: {llm.ckpt.source} ({llm.n_params / 1e6:.0f}M parameters). "
          "Type /help for commands.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/help":
            print(CHAT_HELP)
            continue
        if text == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)")
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; /help lists them")
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply, n, start, first, finish = [], 0, time.perf_counter(), None, None
        print("bot> ", end="", flush=True)
        try:
            ids = chat_ids(llm.gen, messages, plan)
            params = llm.gen.sampling(len(ids), args.max_tokens, clamp=True, temperature=args.temperature,
                                      top_p=args.top_p, seed=args.seed, grammar=grammar)
            for delta in llm.gen.stream_sync(ids, params):
                if first is None:
                    first = time.perf_counter() - start
                n += delta.token is not None
                reply.append(delta.text)
                finish = delta.finish_reason
                print(delta.text, end="", flush=True)
            note = " [cut at --max-tokens: the JSON may be incomplete]" if grammar and finish == "length" else ""
        except KeyboardInterrupt:
            note = " [stopped]"
        except QtError as e:  # e.g. the conversation outgrew the context: keep the program alive
            history.pop()
            print(f"\nerror: {e}\n(try /reset)")
            continue
        elapsed = time.perf_counter() - start
        rate = (n - 1) / (elapsed - first) if first is not None and n > 1 and elapsed > first else 0.0
        print(f"\n  [{n} tokens, {rate:.1f} tok/s, first token {first or 0:.2f} s{note}]", file=sys.stderr)
        history.append({"role": "assistant", "content": "".join(reply)})


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc raises its mmap threshold whenever a large block is freed; from then on blocks of that size
    (a chunk's logits, prefill activations) come from the heap, which fragments: a server's RSS grew
    for as long as it ran (LOG.md 2026-12-01). A fixed threshold keeps blocks over `nbytes` in mmap,
    handed back to the system when freed. Not glibc: nothing to do."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def page_plugins() -> list:
    """Packages that put pages on the server (entry point group `qt_serve.pages`; qt's own is app/)."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in entry_points(group="qt_serve.pages")]


def serve_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qt-serve", description="OpenAI-compatible HTTP server for small models.")
    ap.add_argument("--model", action="append", default=None, metavar="[NAME=]SPEC",
                    help="checkpoint dir, HF Llama dir, .gguf file or known name; repeat as NAME=SPEC to serve "
                         f"several (default {DEFAULT_MODEL})")
    ap.add_argument("--lora", action="append", default=None, metavar="NAME=DIR[@MODEL]",
                    help="a LoRA adapter (a peft save_pretrained directory) served as model NAME on the first "
                         "--model, or on MODEL; repeat for several. Requests for adapters and their base are "
                         "batched together")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    add_load_in_flag(ap)
    ap.add_argument("--max-model-len", type=positive, default=4096, help="context length per request (KV cache rows)")
    ap.add_argument("--max-batch", type=positive, default=8, help="requests decoded together (KV cache slots)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get HTTP 429")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; 0.0.0.0 opens the server to the network (set --api-key then)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also $QT_API_KEY)")
    ap.add_argument("--open-docs", action="store_true",
                    help="with --api-key: leave /docs, /openapi.json and /metrics open (the model routes still "
                         "want the key)")
    ap.add_argument("--max-body-bytes", type=positive, default=1 << 20)
    ap.add_argument("--request-timeout", type=float, default=None,
                    help="seconds a request may take, queueing included; past it: HTTP 504 (default: no limit)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    plugins = page_plugins()
    for plugin in plugins:
        plugin.add_flags(ap)
    args = ap.parse_args(argv)
    return run(lambda: serve(args, plugins))


def serve(args, plugins: list) -> int:
    import logging
    import os
    import signal

    import uvicorn

    from qt_serve import fast
    from qt_serve.api import create_app, load_generators

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("qt_serve.cli")
    fixed_mmap_threshold()
    api_key = args.api_key or os.environ.get("QT_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s with no API key: anyone who can reach this port can use the models "
                    "(set --api-key or $QT_API_KEY)", args.host)
    pages = [(p, p.prepare(args)) for p in plugins]  # first: a mistyped page flag fails before model loading
    pages = [(p, options) for p, options in pages if options is not None]
    generators = load_generators(args.model or [DEFAULT_MODEL], dtype=args.dtype, device=args.device,
                                 load_in=args.load_in,
                                 max_seq_len=args.max_model_len, max_batch=args.max_batch, max_queue=args.max_queue,
                                 request_timeout=args.request_timeout, loras=args.lora or [])
    # Loading ran torch on this thread, which gave it an OpenMP team of its own; beside the engine
    # thread's team that is more OpenMP threads than cores, and libgomp then stops spin-waiting:
    # decode ran at 0.7x of in-process (LOG.md). This thread runs no more torch: let its team go.
    fast.release_openmp_threads()

    def mount(app):
        for plugin, options in pages:
            plugin.mount(app, generators, options, api_key)

    app = create_app(generators, api_key=api_key, max_body_bytes=args.max_body_bytes, open_docs=args.open_docs,
                     mount=mount if pages else None)
    # SIGTERM / Ctrl-C: uvicorn stops accepting, lets in-flight streams finish for up to 10 s, then
    # cancels them; the app's shutdown then stops the engines (bounded too). uvicorn re-raises the
    # signal to the handler that was there before it; a no-op one makes a SIGTERM shutdown exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(chat_main())
