"""`qt-eval alpaca`: head-to-head on AlpacaEval's 805 instructions, judged by any OpenAI-compatible model.

    qt-eval alpaca --model SmolLM2-135M-Instruct --judge-url http://host:8000/v1 --judge-model JUDGE --out out/alpaca
    qt-eval alpaca --url http://127.0.0.1:8000/v1 --model-name smol --against other.jsonl --out out/alpaca

1. Answers: the model's reply to each instruction, through `qt-serve` (started for `--model`) or any
   OpenAI-compatible `--url`, `--concurrency` requests at a time, the server's sampling defaults unless
   `--temperature` is given. The baseline is AlpacaEval's packaged GPT-4 answers
   (`alpaca_eval_gpt4_baseline.json`) or another model's answers file (`--against`, this tool's
   answers.jsonl or a JSON list with `instruction` / `output`).
2. Verdicts: the judge sees the instruction and the two answers in a seeded random order (so position bias
   falls on both alike) and names the better one. Its reply is constrained to `{"better": "a" | "b"}` with
   `response_format` (qt-serve, vLLM, llama.cpp and OpenAI honour it; `--judge-free-text` for a judge that
   does not) and read as that JSON or as a lone letter; anything else is counted as unparsable and shown,
   never guessed. The judge prompt is recorded in the results.
3. Scores: win rate (ties are not possible) with a 95% Wilson interval, and a length-controlled win rate
   after AlpacaEval 2 (Dubois et al., 2024): a logistic regression of the verdict on
   tanh(length difference / its standard deviation), read at a length difference of zero, with a 95%
   bootstrap interval. (AlpacaEval 2's model also has an instruction-difficulty term, fitted across many
   models; with one pair it cannot be estimated, so it is left out.)

Without a judge it writes the answers and `arena-prompts.json`, the same instructions for the human arena
(`qt-serve --arena-prompts FILE`). Answers and verdicts are appended to JSONL files as they come, so an
interrupted run continues where it stopped with `--resume`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qt_serve.errors import QtError

JUDGE_SYSTEM = "You are a careful, impartial judge of answers to instructions."
JUDGE_PROMPT = """Which answer follows the instruction better? Judge helpfulness, accuracy and completeness; \
do not prefer an answer for being longer.

## Instruction
{instruction}

## Answer a
{a}

## Answer b
{b}

Reply with the letter of the better answer, as JSON: {{"better": "a"}} or {{"better": "b"}}."""
VERDICT = {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
    "type": "object", "properties": {"better": {"enum": ["a", "b"]}}, "required": ["better"],
    "additionalProperties": False}}}


def load_baseline(path: str | None) -> list[dict]:
    """[{instruction, output}] from AlpacaEval's GPT-4 answers (default) or an answers file."""
    from qt_serve import hub

    p = Path(path) if path else hub.fetch_file("alpaca-eval")
    text = p.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    except json.JSONDecodeError as e:
        raise QtError(f"{p} is not JSON or JSON Lines: {e}") from None
    if not rows or not all(isinstance(r, dict) and "instruction" in r and "output" in r for r in rows):
        raise QtError(f"{p}: expected a list of objects with 'instruction' and 'output'")
    return [{"instruction": r["instruction"], "output": r["output"]} for r in rows]


def verdict_of(text: str | None) -> str | None:
    """'a', 'b', or None when the judge's reply says neither clearly."""
    text = (text or "").strip()
    try:
        v = json.loads(text)
        v = v.get("better") if isinstance(v, dict) else v
    except json.JSONDecodeError:
        v = text.strip(".*\"' ").lower()
    return v if v in ("a", "b") else None


def wilson(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 50) -> np.ndarray:
    """(intercept, slope) of P(y=1) = sigmoid(b0 + b1 x) by Newton's method, with a tiny ridge so perfectly
    separated data stays finite."""
    X = np.stack([np.ones_like(x), x], 1)
    w = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-X @ w))
        grad = X.T @ (y - p) - 1e-6 * w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return w


def length_controlled(wins: np.ndarray, len_diff: np.ndarray, rounds: int = 200, seed: int = 0) -> dict:
    """Win rate at zero length difference (AlpacaEval 2's length control, without its difficulty term)."""
    scale = len_diff.std() or 1.0

    def lc(idx):
        w = fit_logistic(np.tanh(len_diff[idx] / scale), wins[idx].astype(float))
        return float(1 / (1 + math.exp(-w[0])))

    rng = np.random.default_rng(seed)
    boots = sorted(lc(rng.integers(0, len(wins), len(wins))) for _ in range(rounds))
    return {"lc_win_rate": lc(np.arange(len(wins))),
            "lc_ci95": (boots[int(0.025 * rounds)], boots[int(0.975 * rounds) - 1])}


def score(rows: list[dict]) -> dict:
    """Win rates of the model over the baseline from the judged rows."""
    decided = [r for r in rows if r["winner"] is not None]
    wins = np.array([r["winner"] == "model" for r in decided])
    out = {"judged": len(rows), "unparsable": len(rows) - len(decided), "decided": len(decided),
           "wins": int(wins.sum())}
    if decided:
        out["win_rate"] = float(wins.mean())
        out["ci95"] = wilson(int(wins.sum()), len(decided))
        diff = np.array([len(r["output"]) - len(r["baseline"]) for r in decided], dtype=float)
        out |= length_controlled(wins, diff)
        out["mean_length"] = {"model": float(np.mean([len(r["output"]) for r in decided])),
                              "baseline": float(np.mean([len(r["baseline"]) for r in decided]))}
    return out


class Journal:
    """Results appended one JSON line each as they arrive, keyed by instruction, read back by --resume."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.done: dict[str, dict] = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.done[row["instruction"]] = row
        elif path.exists():
            path.unlink()

    @staticmethod
    def complete(path: Path, items: list[dict], resume: bool) -> bool:
        """Whether a resumed run already has a row for every item (then no server need start)."""
        return resume and path.exists() and not {i["instruction"] for i in items} - set(Journal(path, True).done)

    def add(self, row: dict) -> None:
        self.done[row["instruction"]] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


async def gather(items: list, work, concurrency: int, desc: str) -> None:
    """Run `work(item)` on every item, `concurrency` at a time, with a progress bar."""
    todo = iter(items)
    bar = tqdm(total=len(items), desc=desc, unit="item")

    async def worker():
        for item in todo:
            await work(item)
            bar.update()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.close()


async def check_server(client, model: str, what: str) -> None:
    import openai

    try:
        names = [m.id for m in (await client.models.list()).data]
    except openai.APIConnectionError:
        raise QtError(f"cannot reach the {what} at {client.base_url}; is that server running?") from None
    if model not in names:
        raise QtError(f"the {what} at {client.base_url} does not serve {model!r}; it has: {', '.join(names)}")


async def answer(args, url: str, model: str, baseline: list[dict], out: Path) -> list[dict]:
    import openai

    journal = Journal(out / "answers.jsonl", args.resume)
    todo = [b for b in baseline if b["instruction"] not in journal.done]
    if not todo:  # all answered before (--resume): the server is not needed
        return [journal.done[b["instruction"]] for b in baseline]
    async with openai.AsyncOpenAI(base_url=url, api_key=args.api_key or "none", max_retries=2,
                                  timeout=3600) as client:
        await check_server(client, model, "model's server")
        extra = {} if args.temperature is None else {"temperature": args.temperature}

        async def one(item):
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": item["instruction"]}],
                max_tokens=args.max_tokens, seed=args.seed, **extra)
            journal.add({"instruction": item["instruction"], "output": r.choices[0].message.content or "",
                         "finish_reason": r.choices[0].finish_reason, "generator": model})

        await gather(todo, one, args.concurrency, "answers")
    return [journal.done[b["instruction"]] for b in baseline]


async def judge(args, answers: list[dict], baseline: list[dict], out: Path) -> list[dict]:
    import openai

    journal = Journal(out / "verdicts.jsonl", args.resume)
    key = os.environ.get(args.judge_key_env) or "none"
    rng = random.Random(args.seed)
    flips = [rng.random() < 0.5 for _ in baseline]  # drawn for all first: the same order on a resumed run
    todo = [i for i, b in enumerate(baseline) if b["instruction"] not in journal.done]
    if not todo:
        return [journal.done[b["instruction"]] for b in baseline]
    async with openai.AsyncOpenAI(base_url=args.judge_url, api_key=key, max_retries=2, timeout=600) as client:
        await check_server(client, args.judge_model, "judge")
        fmt = {} if args.judge_free_text else {"response_format": VERDICT}

        async def one(i):
            mine, theirs = answers[i]["output"], baseline[i]["output"]
            a, b = (theirs, mine) if flips[i] else (mine, theirs)
            prompt = JUDGE_PROMPT.format(instruction=baseline[i]["instruction"], a=a, b=b)
            r = await client.chat.completions.create(
                model=args.judge_model, temperature=0, max_tokens=16, **fmt,
                messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}])
            said = r.choices[0].message.content
            v = verdict_of(said)
            winner = None if v is None else ("model" if (v == "a") != flips[i] else "baseline")
            journal.add({"instruction": baseline[i]["instruction"], "output": mine, "baseline": theirs,
                         "model_was": "b" if flips[i] else "a", "judge_said": said, "winner": winner})

        await gather(todo, one, args.judge_concurrency, "verdicts")
    return [journal.done[b["instruction"]] for b in baseline]


def report(result: dict, rows: list[dict], out: Path) -> None:
    s = result["scores"]
    lines = [f"# AlpacaEval head-to-head: {result['model']} vs {result['baseline']}", "",
             f"judge: {result['judge_model']} at {result['judge_url']}", "",
             "| win rate | 95% CI | length-controlled | 95% CI | decided | unparsable |", "|---|---|---|---|---|---|"]
    if s.get("decided"):
        lines.append(f"| {s['win_rate']:.1%} | {s['ci95'][0]:.1%}–{s['ci95'][1]:.1%} | {s['lc_win_rate']:.1%} "
                     f"| {s['lc_ci95'][0]:.1%}–{s['lc_ci95'][1]:.1%} | {s['decided']} | {s['unparsable']} |")
    else:
        lines.append(f"| – | – | – | – | 0 | {s['unparsable']} |")
    bad = [r for r in rows if r["winner"] is None][:5]
    if bad:
        lines += ["", "Unparsable verdicts (first 5):", ""] + [f"- {json.dumps(r['judge_said'])}" for r in bad]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(args) -> int:
    import openai

    try:
        return run(args)
    except openai.APIStatusError as e:  # a request the model's server or the judge refused: say which, keep the rest
        raise QtError(f"{e.request.url} refused a request ({e.status_code}): {e.message}; the answers and verdicts "
                      "so far are kept: fix it and rerun with --resume") from None


def run(args) -> int:
    from evals.bench import serving

    if args.judge_url and not args.judge_model:
        raise QtError("--judge-url needs --judge-model: the judge server's model name")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    baseline = load_baseline(args.against)[: args.limit]
    (out / "arena-prompts.json").write_text(json.dumps([b["instruction"] for b in baseline], ensure_ascii=False,
                                                       indent=1) + "\n")
    if args.url or Journal.complete(out / "answers.jsonl", baseline, args.resume):
        answers = asyncio.run(answer(args, args.url, args.model_name or args.model, baseline, out))
    else:
        with serving({"m": args.model}, "--max-batch", str(args.concurrency), "--no-page") as (url, _):
            answers = asyncio.run(answer(args, url + "/v1", "m", baseline, out))
    if not args.judge_url:
        print(f"answers: {out / 'answers.jsonl'}; no --judge-url, so no verdicts. For human votes on the same "
              f"instructions: qt-serve --arena-prompts {out / 'arena-prompts.json'}")
        return 0
    rows = asyncio.run(judge(args, answers, baseline, out))
    result = {"model": args.model_name or args.model, "baseline": args.against or "AlpacaEval's GPT-4 baseline answers",
              "judge_url": args.judge_url, "judge_model": args.judge_model, "seed": args.seed,
              "judge_prompt": {"system": JUDGE_SYSTEM, "user": JUDGE_PROMPT,
                               "response_format": None if args.judge_free_text else VERDICT},
              "scores": score(rows)}
    (out / "RESULTS.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    report(result, rows, out)
    return 0


def add_parser(sub) -> None:
    a = sub.add_parser("alpaca", help="head-to-head on AlpacaEval's 805 instructions, judged by any OpenAI-compatible "
                                      "model (win rate, length-controlled win rate)")
    a.add_argument("--model", default="SmolLM2-135M-Instruct",
                   help="checkpoint to answer with, served by a qt-serve started for the run")
    a.add_argument("--url", default=None, help="answer with this OpenAI-compatible server (…/v1) instead")
    a.add_argument("--model-name", default=None, help="the model's name on --url (default: --model)")
    a.add_argument("--api-key", default=None, help="key for --url")
    a.add_argument("--against", default=None,
                   help="the other side's answers (JSON / JSONL with instruction, output); default AlpacaEval's "
                        "GPT-4 baseline answers")
    a.add_argument("--judge-url", default=None, help="the judge's OpenAI-compatible server (…/v1)")
    a.add_argument("--judge-model", default=None, help="the judge's model name")
    a.add_argument("--judge-key-env", default="JUDGE_API_KEY", help="environment variable holding the judge's key")
    a.add_argument("--judge-free-text", action="store_true",
                   help="do not send response_format to the judge (for servers without structured output)")
    a.add_argument("--judge-concurrency", type=int, default=8)
    a.add_argument("--concurrency", type=int, default=16, help="answer requests at a time")
    a.add_argument("--limit", type=int, default=None, help="the first N instructions only")
    a.add_argument("--max-tokens", type=int, default=512)
    a.add_argument("--temperature", type=float, default=None, help="default: the model's own")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--resume", action="store_true", help="keep the answers and verdicts already in --out")
    a.add_argument("--out", default="out/alpaca")
    a.set_defaults(run=main)
