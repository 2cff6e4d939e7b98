"""An independent check of `qt-bench latency`: the same load measured with nothing but the `openai` client.

    python benchmarks/latency_check.py URL MODEL [--n 16] [--input-len 128] [--output-len 128]

Sends N streaming /v1/completions requests one after another (random token-id prompts, greedy,
`ignore_eos`), timing the first chunk and the whole run with time.perf_counter, and prints the median TTFT
and the output-token throughput, to set beside `qt-bench latency --url URL --concurrency 1` on the same
server and lengths (LOG.md 2026-12-01).
"""

import argparse
import random
import statistics
import time

import openai


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    rng = random.Random(1)
    ttfts, tokens = [], 0
    start = time.perf_counter()
    for _ in range(args.n):
        prompt = [rng.randrange(1000, 30000) for _ in range(args.input_len)]
        sent, first = time.perf_counter(), None
        stream = client.completions.create(model=args.model, prompt=prompt, max_tokens=args.output_len, stream=True,
                                           temperature=0, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        for chunk in stream:
            if first is None and chunk.choices:
                first = time.perf_counter() - sent
            if chunk.usage:
                tokens += chunk.usage.completion_tokens
        ttfts.append(first)
    wall = time.perf_counter() - start
    print(f"openai client: {args.n} requests, median TTFT {statistics.median(ttfts) * 1e3:.1f} ms, "
          f"output {tokens / wall:.1f} tok/s ({tokens} tokens in {wall:.1f} s)")


if __name__ == "__main__":
    main()
