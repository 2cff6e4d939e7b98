"""What the chat page costs over the raw API: time to first token and to the whole reply, seen by a
person in a browser (headless Debian Chromium) vs by the `openai` client, same server, same prompt.

    qt-serve --port 8300 &
    python benchmarks/page_latency.py --url http://127.0.0.1:8300 --runs 5

Greedy decoding with a fixed token budget, so both paths produce the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import openai
from playwright.sync_api import sync_playwright

PROMPT = "Write a short paragraph about the history of Paris."

WATCH = """() => { window.qtT = {start: performance.now(), first: null, done: null};
  new MutationObserver(() => {
    const m = document.querySelectorAll('#chat [data-testid="bot"]');
    const text = m.length ? m[m.length - 1].innerText : "";
    if (text.trim() && text.trim() !== "…" && window.qtT.first === null) window.qtT.first = performance.now();
    if (/tokens · TTFT/.test(text) && window.qtT.done === null) window.qtT.done = performance.now();
  }).observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true}); }"""


def via_api(url: str, model: str, tokens: int) -> tuple[float, float]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    t0 = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(model=model, stream=True, temperature=0, max_tokens=tokens,
                                                messages=[{"role": "user", "content": PROMPT}]):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    return first - t0, time.perf_counter() - t0


def via_page(page, url: str, tokens: int) -> tuple[float, float]:
    page.goto(url + "/")
    page.locator("#chat").wait_for()
    page.locator("#clear").click()  # the page restores the last conversation from the browser
    page.wait_for_function("""() => !document.querySelector('#chat [data-testid="bot"]')""")
    for elem, value in (("temperature", 0), ("max-tokens", tokens)):
        field = page.locator(f"#{elem} input[type=number]")
        field.fill(str(value))
        field.press("Enter")
    page.locator("#msg textarea").fill(PROMPT)
    page.evaluate(WATCH)
    page.locator("#msg textarea").press("Enter")
    page.wait_for_function("window.qtT.done !== null", timeout=300_000)
    t = page.evaluate("window.qtT")
    return (t["first"] - t["start"]) / 1000, (t["done"] - t["start"]) / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8300")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    via_api(args.url, args.model, 4)  # warm-up
    results = {"api": [], "page": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page()
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            results["api"].append(via_api(args.url, args.model, args.tokens))
            results["page"].append(via_page(page, args.url, args.tokens))
        browser.close()
    summary = {k: {"ttft_s": statistics.median(x[0] for x in v), "total_s": statistics.median(x[1] for x in v)}
               for k, v in results.items()}
    summary["page_minus_api_ms"] = {k: 1000 * (summary["page"][k] - summary["api"][k]) for k in ("ttft_s", "total_s")}
    print(json.dumps({"runs": args.runs, "tokens": args.tokens, "median": summary, "raw": results}, indent=2))


if __name__ == "__main__":
    main()
