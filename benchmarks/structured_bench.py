"""Structured output through `qt-serve`, as users run it: validity and per-token overhead.

    python benchmarks/structured_bench.py [--model SmolLM2-135M-Instruct] [--out docs/structured]

1. Validity: for each schema kind (object, array, enum, numbers, nested, maxLength), 20 seeded sampled
   chat replies (n=10 in one request, n=10 streamed; the model's sampling defaults: SmolLM2's
   temperature 0.2, top_p 0.9) with `response_format: json_schema`, each parsed
   and checked by `jsonschema`; and the `tools` round trip with a named and a `required` choice.
2. Overhead: time per output token (TPOT, streamed, from the first token's chunk to the last) of
   replies constrained to a long-string schema against free replies of the same length
   (`ignore_eos`), at concurrency 1 and 16, the model's own sampling defaults.

Writes OUT/RESULTS-<parts>.json and prints Markdown tables with the CPU line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import jsonschema
import openai

from evals.bench import cpu_line, serving

ASK = "Reply with a JSON object describing {what}."
# Free-text strings carry a maxLength: at its default temperature 0.2 SmolLM2-135M sometimes repeats a
# phrase inside an unbounded string until max_tokens, which no grammar can end for it (LOG.md 2026-12-01:
# unbounded, 15/20 and 19/20 replies of two schemas were cut off that way, every one by max_tokens).
TEXT = {"type": "string", "maxLength": 60}
SCHEMAS = {
    "object": ("a person", {"type": "object", "properties": {"name": TEXT, "age": {"type": "integer"},
                                                             "email": TEXT},
                            "required": ["name", "age", "email"]}),
    "array": ("three fruits", {"type": "array", "items": TEXT, "minItems": 3, "maxItems": 3}),
    "enum": ("the weather", {"type": "object", "properties": {"sky": {"enum": ["sunny", "cloudy", "rain"]},
                                                              "wind": {"enum": ["calm", "breeze", "storm"]}},
                             "required": ["sky", "wind"]}),
    "numbers": ("a product", {"type": "object", "properties": {"price": {"type": "number", "minimum": 0},
                                                               "stock": {"type": "integer", "minimum": 0,
                                                                         "maximum": 1000}},
                              "required": ["price", "stock"]}),
    "nested": ("a book and its author", {"type": "object", "properties": {
        "title": TEXT,
        "author": {"type": "object", "properties": {"name": TEXT, "born": {"type": "integer"}},
                   "required": ["name", "born"]},
        "tags": {"type": "array", "items": TEXT, "maxItems": 3}},
        "required": ["title", "author", "tags"]}),
    "maxLength": ("a city", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                              "country": {"type": "string", "maxLength": 12}},
                             "required": ["city", "country"]}),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
LONG = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400, "maxLength": 600}},
        "required": ["story"], "additionalProperties": False}


def fmt(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def validity(client: openai.AsyncOpenAI, model: str) -> dict:
    out = {}
    for name, (what, schema) in SCHEMAS.items():
        kw = dict(model=model, messages=[{"role": "user", "content": ASK.format(what=what)}],
                  response_format=fmt(name, schema), max_tokens=400, n=10)  # the model's sampling defaults
        texts, finish = [], []
        full = await client.chat.completions.create(seed=100, **kw)
        texts += [c.message.content for c in full.choices]
        finish += [c.finish_reason for c in full.choices]
        parts, ends = [""] * 10, [None] * 10
        async for chunk in await client.chat.completions.create(seed=200, stream=True, **kw):
            for c in chunk.choices:
                parts[c.index] += c.delta.content or ""
                ends[c.index] = c.finish_reason or ends[c.index]
        texts += parts
        finish += ends
        valid = 0
        for t in texts:
            try:
                jsonschema.validate(json.loads(t), schema)
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError):
                pass
        out[name] = {"replies": len(texts), "valid": valid, "stopped": finish.count("stop"),
                     "cut_by_max_tokens": finish.count("length"), "example": texts[0]}
        print(f"  {name}: {valid}/{len(texts)} valid; e.g. {texts[0]}", flush=True)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    for label, choice in (("named", {"type": "function", "function": {"name": "get_weather"}}),
                          ("required", "required")):
        kw = dict(model=model, messages=msgs, tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=100)
        call = (await client.chat.completions.create(**kw)).choices[0].message.tool_calls[0].function
        name, args = "", ""  # the streamed call, accumulated as the openai client's users do
        async for chunk in await client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                name += c.function.name or ""
                args += c.function.arguments or ""
        assert (name, args) == (call.name, call.arguments), (name, args, call)
        jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
        out[f"tool-{label}"] = {"name": name, "arguments": args}
    print(f"  tools: {out['tool-named']}", flush=True)
    return out


async def tpot(client: openai.AsyncOpenAI, model: str, constrained: bool, tokens: int) -> tuple[float, int]:
    """(seconds per output token after the first, tokens) of one streamed reply."""
    kw = dict(response_format=fmt("long", LONG)) if constrained else dict(extra_body={"ignore_eos": True})
    start, first, last, usage = time.perf_counter(), None, None, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story about a lighthouse keeper."}],
        max_tokens=tokens, stream=True, stream_options={"include_usage": True}, **kw)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter() - start
            first = first or last
        usage = chunk.usage or usage
    return (last - first) / max(usage.completion_tokens - 1, 1), usage.completion_tokens


async def overhead(client: openai.AsyncOpenAI, model: str, concurrency: int, rounds: int) -> dict:
    """Median TPOT of free and constrained replies, in alternating groups of `rounds` x `concurrency`
    requests (drift hits both alike); each group's median is kept to show the spread."""
    groups: dict[str, list[list[float]]] = {"free": [], "json": []}
    for constrained in (False, True) * 3:
        res = []
        for _ in range(rounds):
            res += await asyncio.gather(*(tpot(client, model, constrained, 140) for _ in range(concurrency)))
        groups["json" if constrained else "free"].append([t for t, _ in res])
    row = {k: {"tpot_ms": statistics.median(t for g in v for t in g) * 1e3,
               "group_medians_ms": [round(statistics.median(g) * 1e3, 1) for g in v]} for k, v in groups.items()}
    row["overhead"] = row["json"]["tpot_ms"] / row["free"]["tpot_ms"] - 1
    print(f"  concurrency {concurrency}: free {row['free']['tpot_ms']:.1f} ms/token {row['free']['group_medians_ms']}, "
          f"json {row['json']['tpot_ms']:.1f} ms/token {row['json']['group_medians_ms']} ({row['overhead']:+.1%})",
          flush=True)
    return row


async def run(url: str, model: str, parts: list[str]) -> dict:
    out = {}
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900) as client:
        if "validity" in parts:
            print("validity", flush=True)
            out["validity"] = await validity(client, model)
        if "overhead" in parts:
            print("overhead", flush=True)
            out["overhead"] = {c: await overhead(client, model, c, r) for c, r in ((1, 6), (16, 1))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, default=Path("docs/structured"))
    ap.add_argument("--parts", nargs="+", choices=["validity", "overhead"], default=["validity", "overhead"])
    args = ap.parse_args(argv)
    print(cpu_line(), flush=True)
    with serving({"m": args.model}, "--max-batch", "16", "--no-page", "--log-level", "warning") as (url, _):
        result = {"cpu": cpu_line(), "model": args.model, **asyncio.run(run(url, "m", args.parts))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"RESULTS-{'-'.join(args.parts)}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if "validity" in result:
        print("\n| schema | valid / replies | ended by the grammar | cut by max_tokens |\n|---|---|---|---|")
        for name in SCHEMAS:
            v = result["validity"][name]
            print(f"| {name} | {v['valid']} / {v['replies']} | {v['stopped']} | {v['cut_by_max_tokens']} |")
    if "overhead" in result:
        print("\n| concurrency | free ms/token | JSON ms/token | overhead |\n|---|---|---|---|")
        for c, row in result["overhead"].items():
            print(f"| {c} | {row['free']['tpot_ms']:.1f} | {row['json']['tpot_ms']:.1f} | {row['overhead']:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
