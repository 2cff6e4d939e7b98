"""`qt-bench latency`: an OpenAI-compatible server under load, in the manner of vLLM's `benchmark_serving`.

    qt-bench latency --serve SmolLM2-135M-Instruct --sweep-concurrency 1,4,16 --out out/lat
    qt-bench latency --url http://127.0.0.1:8000 --model m --request-rate 2 --slo ttft=500ms,tpot=100ms
    qt-bench latency --url http://127.0.0.1:8000 --prompts alpaca-eval --concurrency 8
    qt-bench compare out/qt/latency.json out/vllm/latency.json --plot out/both.png

The server is any OpenAI-compatible one (qt-serve, vLLM, llama.cpp's server) at --url, or `qt-serve` started
here as a subprocess (--serve SPEC). Its /v1/models is checked first. Requests stream, with
`stream_options.include_usage` so every token count is the server's own, and ask `ignore_eos` (unless
--no-ignore-eos) so each request makes exactly its output length. Load: --concurrency N clients in a closed loop (each sends its next
request when its last one ends), or --request-rate R Poisson arrivals per second, an open loop (seeded);
--sweep-concurrency / --sweep-rate run several levels, each with prompts of its own (a repeated prompt
would find its prefix cached). Prompts: random token ids through /v1/completions (drawn from the server's
/tokenize of a word list; random words as text where the server has no /tokenize or refuses token ids), or
a prompt set (--prompts FILE, or `alpaca-eval`) sent as chat.

Per request: TTFT (send to the first chunk that carries output), TPOT (first output chunk to last, over the
tokens after the first), inter-token latencies (every gap between output chunks; a chunk holding several
tokens is one gap) and end-to-end latency (send to the end of the stream); each as mean, median, p90 and
p99 in ms. Per level: requests/s and output tokens/s over its duration (first send to last end), and with
--slo the goodput, the requests/s that met every bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qt_serve.errors import QtError

# Random prompts draw their ids from the server's tokenization of these (one token each in most
# vocabularies), or are these words as text; no special tokens either way.
WORDS = ("the of and to in is was that for on are with as his they be at one have this from by had not but "
         "what all were when we there can an your which their said if do will each about how up out them then "
         "she many some so these would other into has more her two like him see time could no make than first "
         "been its who now people my made over did down only way find use may water long little very after "
         "words called just where most know").split()
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class Server:
    url: str  # the base, without /v1
    model: str
    api_key: str = "unused"


@dataclass(frozen=True)
class Request:
    """What one request sends: token ids or text through /v1/completions, or chat messages through
    /v1/chat/completions; `logprobs` makes every token a chunk of its own, text or not."""

    prompt: list[int] | str | list[dict]
    output_len: int
    ignore_eos: bool = True
    logprobs: bool = False

    @property
    def chat(self) -> bool:
        return bool(self.prompt) and isinstance(self.prompt[0], dict)


@dataclass
class Timing:
    """One request as it went: `sent` in seconds after its level started, the rest in seconds after `sent`."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried output
    end: float = 0.0  # the stream's end (after the usage chunk)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunks[0]

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None for a one-token reply."""
        if self.output_tokens < 2:
            return None
        return (self.chunks[-1] - self.chunks[0]) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        return np.diff(self.chunks).tolist()

    @property
    def e2el(self) -> float:
        return self.end


def carries_output(chunk) -> bool:
    """A chunk with generated content: not a chat stream's opening role chunk, nor the closing usage chunk."""
    if not chunk.choices:
        return False
    # getattr throughout: the SDK builds chunks unvalidated, so a field a server leaves out is simply absent
    c = chunk.choices[0]
    delta = getattr(c, "delta", None)
    parts = [getattr(c, "text", None), getattr(c, "logprobs", None)]
    if delta is not None:
        parts += [getattr(delta, k, None) for k in ("content", "tool_calls", "reasoning_content")]
    return any(parts)


async def stream_one(client, model: str, req: Request, t0: float = 0.0) -> Timing:
    """Send `req` streaming and time it; `t0` is the perf_counter its level started at. A failure is
    the Timing's `error`, not an exception, so one refused request does not end a benchmark."""
    import httpx
    import openai

    start = time.perf_counter()
    t = Timing(start - t0)
    usage = None
    kw = dict(model=model, max_tokens=req.output_len, temperature=0, stream=True,
              stream_options={"include_usage": True}, extra_body={"ignore_eos": True} if req.ignore_eos else None)
    if req.logprobs:
        kw["logprobs"] = True if req.chat else 0
    try:
        if req.chat:
            stream = await client.chat.completions.create(messages=req.prompt, **kw)
        else:
            stream = await client.completions.create(prompt=req.prompt, **kw)
        async for chunk in stream:
            if carries_output(chunk):
                t.chunks.append(time.perf_counter() - start)
            usage = chunk.usage or usage
    except (openai.APIError, httpx.HTTPError) as e:
        t.error = f"{type(e).__name__}: {e}"
        return t
    t.end = time.perf_counter() - start
    if usage is None:
        t.error = "the stream ended without a usage chunk (the server ignores stream_options.include_usage)"
    else:
        t.prompt_tokens, t.output_tokens = usage.prompt_tokens, usage.completion_tokens
        if not t.chunks:
            t.error = f"{t.output_tokens} tokens and no chunk with text to time them by (a model without a tokenizer?)"
    return t


def arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times, in seconds from the start, of n requests arriving as a Poisson process of `rate` per
    second (exponential gaps; the first at 0); all at 0 when the rate is infinite."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1 / rate, n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)]).tolist()


def level_name(level: dict) -> str:
    return f"c={level['concurrency']}" if "concurrency" in level else f"r={level['request_rate']:g}/s"


async def run_level(server: Server, requests: list[Request], concurrency: int = 1, request_rate: float | None = None,
                    seed: int = 0, progress: bool = False) -> tuple[list[Timing], float]:
    """All `requests` through the server: arriving at `request_rate` per second when given (Poisson, seeded;
    math.inf: all at once), else by `concurrency` clients in a closed loop. Returns (Timings in request
    order, seconds from the first send to the last end)."""
    import openai
    from tqdm import tqdm

    timings: list[Timing] = [None] * len(requests)  # each filled in when its request ends
    name = level_name({"concurrency": concurrency} if request_rate is None else {"request_rate": request_rate})
    bar = tqdm(total=len(requests), desc=name, unit="req", leave=False, disable=not progress)
    # The SDK would retry a refused request, hiding the refusal and restarting its clock.
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            timings[i] = await stream_one(client, server.model, requests[i], start)
            bar.update()

        if request_rate is None:
            todo = iter(range(len(requests)))  # shared: each client takes the next as soon as its last one ends

            async def user():
                for i in todo:
                    await one(i)

            await asyncio.gather(*(user() for _ in range(concurrency)))
        else:
            async def arrive(i: int, at: float):
                await asyncio.sleep(start + at - time.perf_counter())
                await one(i)

            await asyncio.gather(*(arrive(i, at) for i, at in enumerate(arrivals(len(requests), request_rate, seed))))
        wall = time.perf_counter() - start
    bar.close()
    return timings, wall


def dist(values: list[float]) -> dict:
    """mean, median, p90 and p99 of seconds, in ms (None for no values)."""
    if not values:
        return dict.fromkeys(("mean", "median", "p90", "p99"))
    ms = np.asarray(values) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def meets(t: Timing, slo: dict[str, float]) -> bool:
    """Every bound of `slo` (seconds by key of SLO_KEYS) met; a one-token reply has no TPOT to miss."""
    return all(getattr(t, k) is None or getattr(t, k) <= v for k, v in slo.items())


def summarize(timings: list[Timing], wall: float, slo: dict[str, float] | None = None) -> dict:
    ok = [t for t in timings if t.error is None]
    errors: dict[str, int] = {}
    for t in timings:
        if t.error is not None:
            errors[t.error] = errors.get(t.error, 0) + 1
    inp, out = sum(t.prompt_tokens for t in ok), sum(t.output_tokens for t in ok)
    r = {"completed": len(ok), "failed": len(timings) - len(ok), "errors": errors, "duration_s": wall,
         "input_tokens": inp, "output_tokens": out, "request_throughput": len(ok) / wall,
         "output_throughput": out / wall, "total_token_throughput": (inp + out) / wall,
         "ttft_ms": dist([t.ttft for t in ok]), "tpot_ms": dist([t.tpot for t in ok if t.tpot is not None]),
         "itl_ms": dist([g for t in ok for g in t.itl]), "e2el_ms": dist([t.e2el for t in ok])}
    if slo:
        r["goodput"] = sum(meets(t, slo) for t in ok) / wall
    return r


# ---- the workload ------------------------------------------------------------------------------------


def lengths(n: int, fixed: int, span: tuple[int, int] | None, rng: np.random.Generator) -> list[int]:
    """n lengths: `fixed`, or uniform over the inclusive `span`."""
    return [fixed] * n if span is None else rng.integers(span[0], span[1] + 1, n).tolist()


def random_requests(input_lens: list[int], output_lens: list[int], pool: list[int] | None,
                    rng: np.random.Generator, ignore_eos: bool = True) -> list[Request]:
    """Random prompts of `input_lens`: ids drawn from `pool`, or WORDS as text (a word per wanted token)
    without one."""
    prompts = [rng.choice(pool, k).tolist() if pool else " ".join(rng.choice(WORDS, k)) for k in input_lens]
    return [Request(p, o, ignore_eos) for p, o in zip(prompts, output_lens)]


def chat_requests(prompts: list[str], output_lens: list[int], rng: np.random.Generator,
                  ignore_eos: bool = True) -> list[Request]:
    """A chat request per output length over the prompt set in a random order (repeating a prompt only
    when there are more requests than prompts)."""
    order = rng.permutation(len(prompts))
    return [Request([{"role": "user", "content": prompts[order[i % len(prompts)]]}], o, ignore_eos)
            for i, o in enumerate(output_lens)]


async def token_pool(server: Server) -> list[int] | None:
    """The ids random prompts are drawn from: the server's tokens for WORDS, when it has /tokenize
    (qt-serve's and vLLM's form) and /v1/completions takes a token-id prompt; else None (text prompts)."""
    import httpx
    import openai

    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60) as http:
            r = await http.post(server.url + "/tokenize", json={"model": server.model, "prompt": " ".join(WORDS),
                                                                "add_special_tokens": False})
        pool = sorted(set(r.json()["tokens"])) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):  # no such route, or another shape of answer
        return None
    if not pool or not all(isinstance(t, int) for t in pool):
        return None
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0) as client:
        try:
            await client.completions.create(model=server.model, prompt=pool[:8], max_tokens=1)
        except (openai.BadRequestError, openai.UnprocessableEntityError):  # token ids refused
            return None
    return pool


def connect(url: str, model: str | None, api_key: str = "unused") -> Server:
    """The server at `url` (with or without /v1), checked through /v1/models before any work: reachable,
    and serving `model` (by default its only model)."""
    import httpx

    url = url.rstrip("/").removesuffix("/v1")
    try:
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    except httpx.HTTPError as e:
        raise QtError(f"cannot reach {url} ({type(e).__name__}: {e}); is the server running there?") from None
    if r.status_code != 200:
        raise QtError(f"{url}/v1/models answered HTTP {r.status_code}: {r.text[:300]}")
    try:
        names = [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise QtError(f"{url}/v1/models did not answer an OpenAI model list: {r.text[:300]}") from None
    if model is None:
        if len(names) != 1:
            raise QtError(f"{url} serves {len(names)} models ({', '.join(names)}); choose one with --model")
        model = names[0]
    if model not in names:
        raise QtError(f"{url} does not serve {model!r}; it serves: {', '.join(names)}")
    return Server(url, model, api_key)


# ---- the command -------------------------------------------------------------------------------------


def cpu_line() -> str:
    """The CPU and its vector flags, printed beside every benchmark (kernel rankings differ by CPU)."""
    import torch

    from qt_serve import fast

    return f"cpu: {fast.cpu_name()} | flags: {' '.join(fast.cpu_flags())} | torch {torch.__version__}"


@contextlib.contextmanager
def serving(models: dict[str, str], *flags: str, env: dict | None = None, log=None):
    """`qt-serve` as users run it: a subprocess on a free loopback port holding `models` (name -> spec),
    started with `flags` (and `env` on top of this process's environment, its output to `log`); yields
    (url, process). Stopped with SIGTERM on leaving, so `process.returncode` is its exit code."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "qt_serve.cli_serve", "--port", str(port), *flags]
    for name, spec in models.items():
        cmd += ["--model", f"{name}={spec}"]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qt-serve did not start (exit code {proc.poll()})")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)


def serve_flags(args) -> list[str]:
    """qt-serve's flags for --serve: the whole workload may queue (an open loop must not meet HTTP 429)."""
    flags = ["--no-page", "--max-batch", str(args.max_batch), "--max-queue", str(max(64, args.num_prompts)),
             "--log-level", "warning"]
    if args.prompts:
        return flags  # prompt set lengths are known only once templated: qt-serve's default context
    longest = (args.input_len_range or [args.input_len])[-1] + (args.output_len_range or [args.output_len])[-1]
    return flags + ["--max-model-len", str(longest)]  # KV rows of the longest request: more would be idle RAM


def levels_of(args) -> list[dict]:
    if args.sweep_concurrency:
        return [{"concurrency": c} for c in args.sweep_concurrency]
    if args.sweep_rate:
        return [{"request_rate": r} for r in args.sweep_rate]
    if args.request_rate is not None:
        return [{"request_rate": args.request_rate}]
    return [{"concurrency": args.concurrency}]


async def workload(server: Server, args, levels: int) -> tuple[str, list[list[Request]], Request]:
    """(what the prompts are, each level's requests, a warm-up request)."""
    rng = np.random.default_rng(args.seed)
    n = args.num_prompts * levels + 1
    outs = lengths(n, args.output_len, args.output_len_range, rng)
    if args.prompts:
        from app.arena import load_prompts

        reqs = chat_requests(load_prompts(args.prompts), outs, rng, args.ignore_eos)
        kind = f"{args.prompts} (chat)"
    else:
        pool = await token_pool(server)
        reqs = random_requests(lengths(n, args.input_len, args.input_len_range, rng), outs, pool, rng,
                               args.ignore_eos)
        kind = "random token ids" if pool else "random words as text (no /tokenize, or token ids refused)"
    per = args.num_prompts
    return kind, [reqs[1 + i * per:1 + (i + 1) * per] for i in range(levels)], reqs[0]


async def measure(server: Server, args, levels: list[dict]) -> dict:
    import openai

    kind, work, warm = await workload(server, args, len(levels))
    # Warm-up: allocator, thread pool, lazy init; and a request the server refuses fails here, before any work.
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0) as client:
        t = await stream_one(client, server.model, Request(warm.prompt, 2, warm.ignore_eos))
    if t.error:
        raise QtError(f"the warm-up request to {server.url} failed: {t.error}")
    print(f"{server.model} at {server.url}: {kind}, {args.num_prompts} requests per level", flush=True)
    out = []
    for level, reqs in zip(levels, work):
        timings, wall = await run_level(server, reqs, **level, seed=args.seed, progress=True)
        out.append({**level, **summarize(timings, wall, args.slo), "requests": [asdict(t) for t in timings]})
        print(line(out[-1]), flush=True)
    return {"prompts": kind, "levels": out}


def main(args) -> dict:
    """`qt-bench latency`: measure, print, and write JSON + Markdown + PNG under --out."""
    import os

    levels = levels_of(args)
    # as qt-eval's: and qt-serve started here reads $QT_API_KEY too
    key = args.api_key or os.environ.get("QT_API_KEY") or os.environ.get("OPENAI_API_KEY") or "unused"
    with contextlib.ExitStack() as stack:
        if args.serve:
            name = args.model or Path(args.serve).name
            url, _ = stack.enter_context(serving({name: args.serve}, *serve_flags(args)))
            server = connect(url, name, key)
        else:
            server = connect(args.url, args.model, key)
        cpu = cpu_line()
        print(cpu, flush=True)
        result = asyncio.run(measure(server, args, levels))
    result = {"cpu": cpu, "url": server.url, "model": server.model, "serve": args.serve,
              "max_batch": args.max_batch if args.serve else None, "num_prompts": args.num_prompts,
              "input_len": None if args.prompts else args.input_len_range or args.input_len,
              "output_len": args.output_len_range or args.output_len, "ignore_eos": args.ignore_eos,
              "seed": args.seed, "slo": args.slo, **result}
    if args.out:
        write(result, Path(args.out))
    print(table({"": result["levels"]}))
    return result


def line(r: dict) -> str:
    def ms(d: dict) -> str:
        return "n/a" if d["median"] is None else f"{d['median']:.0f} / {d['p99']:.0f} ms"

    s = (f"{level_name(r):>9} | {r['completed']} ok, {r['failed']} failed | {r['request_throughput']:.2f} req/s, "
         f"{r['output_throughput']:.1f} out tok/s | median / p99: TTFT {ms(r['ttft_ms'])}, TPOT {ms(r['tpot_ms'])}, "
         f"ITL {ms(r['itl_ms'])}, E2E {ms(r['e2el_ms'])}")
    if "goodput" in r:
        s += f" | goodput {r['goodput']:.2f} req/s"
    for error, count in r["errors"].items():
        s += f"\n{'':>9}   {count} x {error}"
    return s


def table(runs: dict[str, list[dict]]) -> str:
    """Markdown, one row per level of each run (a run column when there are several)."""
    named = len(runs) > 1
    head = ["run"] * named + ["level", "ok", "failed", "req/s", "out tok/s", "goodput req/s"]
    head += [f"{m} {s} (ms)" for m in ("TTFT", "TPOT", "ITL", "E2E") for s in ("mean", "median", "p90", "p99")]
    rows = []
    for run, levels in runs.items():
        for r in levels:
            cells = [run] * named + [level_name(r), str(r["completed"]), str(r["failed"]),
                                     f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}",
                                     f"{r['goodput']:.2f}" if "goodput" in r else "–"]
            for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
                cells += ["–" if v is None else f"{v:.1f}" for v in r[key].values()]
            rows.append(cells)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *rows])


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """TTFT and TPOT (median and p99) against output tokens/s, a point per level, a line per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle(title)
    for ax, key, title in zip(fig.subplots(1, 2), ("ttft_ms", "tpot_ms"), ("time to first token", "time per output token")):
        for i, (run, levels) in enumerate(runs.items()):
            x = [r["output_throughput"] for r in levels]
            for stat, style in (("median", "o-"), ("p99", "s:")):
                y = [np.nan if r[key][stat] is None else r[key][stat] for r in levels]
                ax.plot(x, y, style, color=f"C{i}", label=f"{run} {stat}".strip())
            for r, xi in zip(levels, x):
                ax.annotate(level_name(r), (xi, r[key]["median"] or 0), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set(title=title, xlabel="output tokens/s", ylabel="ms", ylim=(0, ax.get_ylim()[1] * 1.1))  # room for p99
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(result, indent=1))
    sizes = "" if result["input_len"] is None else f"input {result['input_len']}, "
    title = (f"{result['model']} at {result['url']}: {result['prompts']}, {result['num_prompts']} requests per level, "
             f"{sizes}output {result['output_len']} tokens")
    (out / "latency.md").write_text(f"{title}\n\n{result['cpu']}\n\n{table({'': result['levels']})}\n")
    plot({result["model"]: result["levels"]}, out / "latency.png", title)
    print(f"wrote {out}/latency.json, latency.md, latency.png", flush=True)


def compare(paths: list[str], plot_to: str | None = None) -> str:
    """`qt-bench compare`: the runs' levels as one Markdown table (and one plot), a run per file."""
    runs = {}
    for p in map(Path, paths):
        try:
            levels = json.loads(p.read_text())["levels"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QtError(f"{p}: cannot read a qt-bench latency result ({type(e).__name__}: {e})") from None
        if not all(isinstance(r, dict) and "ttft_ms" in r for r in levels):
            raise QtError(f"{p}: not a qt-bench latency result (its levels have no ttft_ms)")
        runs[str(p.with_suffix(""))] = levels
    if plot_to:
        plot(runs, Path(plot_to), "qt-bench compare")
    return table(runs)


# ---- argparse types ----------------------------------------------------------------------------------


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=500ms,tpot=100ms,e2el=2s` -> seconds by key; a bare number is ms, as in vLLM's --goodput."""
    slo = {}
    for part in text.split(","):
        key, _, value = (x.strip() for x in part.partition("="))
        number, scale = ((value[:-2], 1e-3) if value.endswith("ms") else (value[:-1], 1.0) if value.endswith("s")
                         else (value, 1e-3))
        try:
            seconds = float(number) * scale
        except ValueError:
            seconds = math.nan
        if key not in SLO_KEYS or not seconds > 0:
            raise argparse.ArgumentTypeError(f"{part!r}: give KEY=VALUE with KEY one of {', '.join(SLO_KEYS)} and "
                                             "VALUE a positive time (500ms, 0.5s; a bare number is ms)")
        slo[key] = seconds
    return slo


def parse_span(text: str) -> tuple[int, int]:
    """`LO:HI` -> (LO, HI), 1 <= LO <= HI."""
    try:
        lo, hi = map(int, text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LO:HI, two integers") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= LO <= HI")
    return lo, hi


def parse_list(kind):
    """`1,4,16` -> a list of positive `kind` (int or float; float takes `inf`)."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated {kind.__name__}s") from None
        if not all(v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be positive")
        return values

    return parse
