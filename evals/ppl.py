"""`qt-eval ppl MODEL --data FILE|passage`: cross-entropy, perplexity and bits per byte of a text.

    qt-eval ppl SmolLM2-135M-Instruct                               # the built-in passage, in-process
    qt-eval ppl ./SmolLM2-135M-Instruct-onnx-int4 --data book.txt --window 1024 --stride 512
    qt-eval ppl http://127.0.0.1:8000 --data notes.jsonl            # any OpenAI-compatible server with /tokenize

MODEL is anything `qt_serve.checkpoint.load` takes (int8 / int4 / ONNX checkpoints too), run through the
engine's prompt scoring, or the URL of a server (`evals.target` says how each is asked).

Each document is tokenized as the model's tokenizer does (with the special tokens it adds, e.g. a BOS),
then scored in strided windows, Hugging Face's method ("Perplexity of fixed-length models", the
transformers docs): windows of `window` tokens start every `stride` tokens, and each scores only the
tokens after the previous window's end, so every token but the document's first is scored exactly once,
with at least window - stride tokens before it (all of them in the first window). Without a BOS, a
document's first token is context only.

Reported: cross-entropy (nats per scored token), perplexity (its exp), and bits per byte, total nats /
ln 2 / the UTF-8 bytes of the text, which does not depend on the tokenizer, so models with different
vocabularies compare. `--window` defaults to the model's context less one (the engine, like the server,
keeps a position free after a prompt), or 1024 when a server does not say its context; `--stride` to half
the window.

--data: a text file (one document), a JSONL file (one document per line: a `text` field or a bare
string), or `passage`: benchmarks/data/passage.txt, the held-out text `qt-quant compare` uses (the
Declaration of Independence and two of Lincoln's addresses, public domain, 13.7 kB, ~2,900 SmolLM2
tokens). It is famous text that a web-trained model has likely seen, so it suits comparing precisions,
backends and checkpoints of one model rather than judging a model's held-out quality.

Writes DIR/ppl.json and DIR/ppl.md (--out, default out/ppl-NAME) and prints the Markdown.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from qt_serve.errors import QtError
from quant.compare import PASSAGE

CORPORA = {"passage": PASSAGE}


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over n tokens; positions first..end-1 are scored."""
    if not 1 <= stride < window:
        raise QtError(f"the stride must be at least 1 and less than the window ({window}), got {stride}: each "
                      "window's first token has no context in it, so windows must overlap")
    out, scored_to = [], 1  # position 0 has nothing before it
    for start in range(0, n - 1, stride):
        end = min(start + window, n)
        out.append((start, end, scored_to))
        scored_to = end
        if end == n:
            break
    return out


def summary(nats: float, tokens: int, nbytes: int | None = None) -> dict:
    """Cross-entropy (nats per token), perplexity, and bits per byte when the text's UTF-8 size is given."""
    ce = nats / tokens
    out = {"nats": nats, "scored_tokens": tokens, "cross_entropy": ce, "perplexity": math.exp(ce)}
    if nbytes is not None:
        out |= {"bytes": nbytes, "bits_per_byte": nats / math.log(2) / nbytes}
    return out


def score(target, docs: list[list[int]], window: int, stride: int, bar=None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and scored tokens of the token-id documents on `target`
    (`evals.target`), in strided windows; one request per window, all of them in flight together."""
    jobs = [(d, s, e, first) for d in docs for s, e, first in windows(len(d), window, stride)]
    nats, tokens = 0.0, 0
    for i, logprobs in target.score([d[s:e] for d, s, e, _ in jobs]):
        _, s, e, first = jobs[i]
        if len(logprobs) != e - s - 1:
            raise QtError(f"the model scored {len(logprobs)} tokens of a {e - s}-token window, not {e - s - 1}")
        kept = logprobs[first - s - 1:]  # logprobs[j] is position s + 1 + j's
        nats -= sum(kept)
        tokens += len(kept)
        if bar is not None:
            bar.update(len(kept))
    return nats, tokens


def read_texts(data: str) -> list[str]:
    path = CORPORA.get(data) or Path(data)
    if not path.is_file():
        raise QtError(f"--data {data}: neither a file nor a built-in corpus ({', '.join(CORPORA)})")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            rec = json.loads(line)
            text = rec.get("text") if isinstance(rec, dict) else rec
            if not isinstance(text, str):
                raise QtError(f"{path}:{n}: expected a JSON string or an object with a 'text' string")
            texts.append(text)
    return texts


def measure(target, texts: list[str], window: int | None = None, stride: int | None = None) -> dict:
    """Perplexity of `target` on the texts (documents scored separately, totals pooled), with a progress bar."""
    from evals.target import progress

    context = target.context
    window = window or (context - 1 if context else 1024)
    if context and window >= context:
        raise QtError(f"--window {window} does not fit the model's context of {context} tokens (at most {context - 1})")
    stride = stride or max(window // 2, 1)
    docs = [target.tokenize(t) for t in texts]
    start = time.perf_counter()
    with progress(sum(max(len(d) - 1, 0) for d in docs), "ppl", "tok") as bar:
        nats, tokens = score(target, docs, window, stride, bar)
    if not tokens:
        raise QtError("nothing to score: every document is a single token")
    return {"model": target.name, "documents": len(docs), "tokens": sum(map(len, docs)), "window": window,
            "stride": stride, "windows": sum(len(windows(len(d), window, stride)) for d in docs),
            **summary(nats, tokens, sum(len(t.encode("utf-8")) for t in texts)),
            "seconds": round(time.perf_counter() - start, 2)}


def markdown(r: dict) -> str:
    return "\n".join([
        f"# Perplexity: {r['model']} on {r['data']}", "",
        f"{r['documents']} document(s), {r['tokens']} tokens, {r['bytes']} bytes; windows of {r['window']} tokens "
        f"every {r['stride']} ({r['windows']} windows); {r['seconds']} s.", "",
        "| scored tokens | cross-entropy (nats/token) | perplexity | bits per byte |", "|---|---|---|---|",
        f"| {r['scored_tokens']} | {r['cross_entropy']:.4f} | {r['perplexity']:.4f} | {r['bits_per_byte']:.4f} |", ""])


def main(args) -> int:
    from evals.target import open_target

    target = open_target(args.url or args.model, args.model_name, args.api_key, args.concurrency, slots=1,
                         max_seq_len=args.window + 1 if args.window else None, dtype=args.dtype,
                         device=args.device)
    result = {**measure(target, read_texts(args.data), args.window, args.stride), "data": args.data}
    out = Path(args.out or f"out/ppl-{Path(target.name).name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ppl.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'ppl.json'}, {out / 'ppl.md'}")
    return 0
