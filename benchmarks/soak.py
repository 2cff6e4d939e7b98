"""Soak test: qt-serve under sustained concurrent streaming load with random client cancellations.

    python benchmarks/soak.py [--model SmolLM2-135M-Instruct] [--seconds 300] [--concurrency 16]

Starts `qt-serve` as a subprocess on loopback, then `--concurrency` clients stream
/v1/completions back to back until the time is up; about a quarter of them hang up after
a random number of chunks, and about one request in ten is a bad or awkward one (NaN or
huge sampling values that must be a 400, extreme but valid ones that must be a 200, an echo
+ logprobs scoring request, a non-streaming request whose client hangs up). Passes (exit 0)
when every response had its expected status (no unexpected errors, no 5xx), no KV slot is
held and nothing is queued at the end (read from /metrics), the server's RSS grew by less
than 5% from the end of the warm-up and by less than 2% over the second half of the run (it is
sampled ten times: caches fill at first and then level off, a leak does not), and its log holds
no traceback. Traffic stays on
127.0.0.1, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evals.bench import serving  # noqa: E402

PROMPTS = ["Tell me about the sea.", "Which city is the capital of France?", "Write a short poem about autumn.",
           "Explain what a transformer model is.", "Give me three tips for learning Python.", "What is 12 times 7?"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def gauge(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


# (raw JSON body extras, expected status): bad values must be 400s, extreme valid ones 200s.
ODD = [('"temperature": NaN', 400), ('"temperature": Infinity', 400), ('"logit_bias": {"5": 1e39}', 400),
       ('"presence_penalty": 1e30', 400), ('"temperature": 1e-40', 200), ('"repetition_penalty": 1e-30', 200),
       ('"temperature": 1e-40, "logit_bias": {"5": 100}', 200)]


async def odd_request(http: httpx.AsyncClient, url: str, model: str, rng: random.Random,
                      stats: collections.Counter) -> None:
    kind = rng.randrange(len(ODD) + 2)
    if kind < len(ODD):
        extra, want = ODD[kind]
        body = f'{{"model": "{model}", "prompt": "{rng.choice(PROMPTS)}", "max_tokens": 8, {extra}}}'
        r = await http.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        stats["odd requests"] += 1
        stats["unexpected"] += r.status_code != want
    elif kind == len(ODD):  # scoring: echo + logprobs, no generation
        r = await http.post(url + "/v1/completions", json={"model": model, "prompt": " ".join(PROMPTS),
                                                           "max_tokens": 0, "echo": True, "logprobs": 2})
        stats["scoring requests"] += 1
        stats["unexpected"] += r.status_code != 200
    else:  # a non-streaming client that gives up after a moment
        try:
            await http.post(url + "/v1/completions", json={"model": model, "prompt": rng.choice(PROMPTS),
                                                           "max_tokens": 64}, timeout=0.3)
        except httpx.TimeoutException:
            stats["non-streaming hang-ups"] += 1


async def client(url: str, model: str, deadline: float, rng: random.Random, stats: collections.Counter):
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < deadline:
            if rng.random() < 0.1:
                await odd_request(http, url, model, rng, stats)
                continue
            body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 64),
                    "temperature": 0.8, "stream": True}
            hang_up_after = rng.randint(1, 10) if rng.random() < 0.25 else None
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                stats[f"status {r.status_code}"] += 1
                chunks = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks += 1
                        stats["chunks"] += 1
                        if '"error"' in line:
                            stats["stream errors"] += 1
                    if hang_up_after is not None and chunks >= hang_up_after:
                        stats["cancelled"] += 1
                        break
                    if line == "data: [DONE]":
                        stats["completed"] += 1


async def run(url: str, model: str, seconds: float, concurrency: int, seed: int,
              pid: int | None = None) -> tuple[collections.Counter, list[float]]:
    """The clients until the time is up; also the server's RSS (MB) every tenth of the run."""
    stats: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds
    rss: list[float] = []

    async def sample():
        while time.monotonic() < deadline and pid is not None:
            rss.append(round(rss_mb(pid), 1))
            await asyncio.sleep(seconds / 10)

    await asyncio.gather(sample(), *[client(url, model, deadline, random.Random(seed + i), stats)
                                     for i in range(concurrency)])
    return stats, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--warmup", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/soak.json")
    args = ap.parse_args()
    log_path = Path(args.out).with_suffix(".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log, serving({"m": args.model}, "--max-batch", str(args.max_batch), "--max-queue", "256",
                                            "--max-model-len", "1024", "--log-level", "warning",
                                            log=log) as (url, server):
        asyncio.run(run(url, "m", args.warmup, args.concurrency, args.seed + 1000))
        rss_start = rss_mb(server.pid)
        start = time.monotonic()
        stats, rss = asyncio.run(run(url, "m", args.seconds, args.concurrency, args.seed, server.pid))
        elapsed = time.monotonic() - start
        time.sleep(1.0)  # let the engine free the last rows
        metrics = httpx.get(url + "/metrics").text
        rss_end = rss_mb(server.pid)
    code = server.returncode
    result = {
        "model": args.model, "seconds": round(elapsed, 1), "concurrency": args.concurrency, **stats,
        "non_200": sum(v for k, v in stats.items() if k.startswith("status ") and k != "status 200"),
        "slots_in_use_at_end": gauge(metrics, "qt_kv_slots_in_use"), "queued_at_end": gauge(metrics, "qt_queue_depth"),
        "rss_mb_after_warmup": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2), "rss_mb_series": rss + [round(rss_end, 1)],
        # a leak keeps growing; caches and allocator arenas level off: compare the run's two halves
        "rss_growth_second_half_pct": round(100 * (rss_end - rss[len(rss) // 2]) / rss_start, 2),
        "server_exit_code": code,
        "server_tracebacks": log_path.read_text().count("Traceback"), "server_log": str(log_path),
    }
    ok = (result["non_200"] == 0 and not stats["stream errors"] and not stats["unexpected"] and result["slots_in_use_at_end"] == 0
          and result["queued_at_end"] == 0 and result["rss_growth_pct"] < 5 and result["rss_growth_second_half_pct"] < 2
          and code == 0
          and result["server_tracebacks"] == 0)
    result["passed"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
