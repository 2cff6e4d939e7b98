"""Zero-shot validation suite: multiple-choice tasks scored by log-likelihood, plus held-out perplexity.

    result = evaluate(model, tokenizer)             # {"tasks": {name: {...}}, "heldout": {...}, ...}
    qt-eval zeroshot runs/tiny/best --out out/zs-tiny
    qt-train pretrain --recipe tiny --zeroshot 200  # val_zs_<task> in metrics.jsonl and TensorBoard

No fine-tuning and no sampling: each item is a context and a few choices, and the model picks a choice by
its log-likelihood after the context. The tasks (`TASKS`) are two BIG-bench JSON tasks from the
`bigbench==1.0.0` sdist on PyPI, formatted as BIG-bench formats zero-shot items (`bigbench_items`), and a
next-line task on a play held out of the `tiny` recipe's data (`next_line_items`); their files come
through `qt_serve.hub` (fetched once). Each task scores a fixed seeded subset of its items, so a score
compares across runs, steps and models. Accuracy is BIG-bench's multiple_choice_grade: the target score
of the picked choice (1 or 0; an item may have several right answers), averaged; chance is the same for a
uniform random pick.

Three decision rules are computed (`grade`): acc, the summed log-probability of the choice's tokens
(BIG-bench's rule); acc_norm, the same per UTF-8 byte of the choice; acc_pmi, log p(choice | context) -
log p(choice | a neutral context). A task's `rule` says which one is its accuracy (evals/README.md says
why). The choices of an item share one copy of its context in a row (`qt_serve.kv.MaskedAttention`).

`heldout` is the perplexity and bits per byte of one fixed text that no qt corpus contains
(benchmarks/data/passage.txt, as `qt-eval ppl` uses), in `evals.ppl`'s strided windows of 255 tokens;
bits per byte compare models with different tokenizers.
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qt_serve.errors import QtError
from qt_serve.kv import MaskedAttention


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]  # each choice's target score (BIG-bench: 1 right, 0 wrong; several may be right)
    neutral: str = "\n"  # a context that says nothing about the item, for the choices' unconditional likelihood


# ---- items ------------------------------------------------------------------------------


def bigbench_items(task: dict, seed: int = 42) -> list[Item]:
    """The zero-shot items of a BIG-bench JSON task's multiple-choice examples, formatted as
    bigbench/api/json_task.py does: task_prefix + example_input_prefix ("\\nQ: ") + input, then (when
    append_choices_to_input, the default) choice_prefix ("\\n  choice: ") before each choice in a seeded
    order, then example_output_prefix ("\\nA: "); each choice is the continuation of that context.
    Duplicate examples are dropped as BIG-bench drops them."""
    prefix = str(task.get("task_prefix", ""))
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append = task.get("append_choices_to_input", True)
    if isinstance(append, str):  # some task files spell it "false"
        append = append.strip().lower() != "false"
    rng, seen, items = random.Random(seed), set(), []
    for ex in task.get("examples", []):
        key = json.dumps(ex, sort_keys=True)
        if "target_scores" not in ex or key in seen:
            continue
        seen.add(key)
        choices = list(ex["target_scores"])
        text = ex["input"]
        if append:
            shown = sorted(choices)
            rng.shuffle(shown)
            text += choice_prefix + choice_prefix.join(shown)
        scores = tuple(float(ex["target_scores"][c]) for c in choices)
        if len(choices) < 2 or max(scores) <= min(scores):
            continue  # no choice is better than another: nothing to score
        neutral = output_prefix if output_prefix.startswith("\n") else "\n" + output_prefix
        items.append(Item(prefix + input_prefix + text + output_prefix, tuple(choices), scores, neutral))
    return items


def chance(items: list[Item]) -> float:
    """The expected grade of a uniform random pick."""
    return sum(sum(it.scores) / len(it.scores) for it in items) / max(len(items), 1)


def subset(items: list[Item], n: int | None, name: str, seed: int = 0) -> list[Item]:
    """A fixed seeded sample of n items (all when n is None or ≥ their number); a smaller n takes a
    prefix of a larger one's sample, so --limit 100 scores the first 100 of --limit 200's items."""
    order = list(range(len(items)))
    random.Random(f"{seed}:{name}").shuffle(order)
    return [items[i] for i in order[:n]]


def is_heading(line: str) -> bool:
    """A speaker's name ("Romeo.", "Lady Capulet."), an act or scene title, or a stage direction."""
    s = line.strip()
    return (not s or s.startswith("[") or s.isupper() or re.fullmatch(r"[A-Z][A-Za-z' ]{0,30}\.", s) is not None)


def next_line_items(text: str, context_lines: int = 4, seed: int = 0) -> list[Item]:
    """Which line comes next in a play: the context is the `context_lines` lines of the text before a line
    of speech (headings and blank lines included) whose previous line is speech too; the choices are that
    line and 3 speech lines from elsewhere (≥ 30 lines away), the closest in length of 40 drawn, so length
    says nothing. Every such line of the text is an item, in order."""
    lines = text.replace("\r\n", "\n").split("\n")
    speech = [i for i, line in enumerate(lines) if not is_heading(line) and len(line.split()) >= 4]
    rng, items = random.Random(seed), []
    for i in speech:
        if i < context_lines or is_heading(lines[i - 1]):
            continue
        true = lines[i].strip()
        pool = [j for j in rng.sample(speech, min(40, len(speech))) if abs(j - i) >= 30 and lines[j].strip() != true]
        if len(pool) < 3:
            continue  # a text too short to draw distractors from
        pool.sort(key=lambda j: (abs(len(lines[j].strip()) - len(true)), j))
        choices = [true] + [lines[j].strip() for j in pool[:3]]
        order = list(range(len(choices)))
        rng.shuffle(order)
        items.append(Item("\n".join(lines[i - context_lines:i]) + "\n", tuple(choices[k] for k in order),
                          tuple(float(k == 0) for k in order)))
    return items


@dataclass(frozen=True)
class Task:
    data: str  # the `qt_serve.hub.DATA` file its items come from
    kind: str  # "bigbench" (a task.json) or "next_line" (a play's text)
    rule: str  # the headline decision rule: "acc" (summed log-prob, BIG-bench's) or "acc_pmi"
    about: str


# Chosen by scoring 43 BIG-bench multiple-choice tasks with a random-init and short-trained `tiny` model
# (evals/README.md has the numbers): these are above chance by more than the binomial noise of their items.
TASKS = {
    "reorder_words": Task("bigbench-reorder-words", "bigbench", "acc",
                          "BIG-bench undo_permutation/reorder_words: the unscrambled sentence of 8 (100 items)"),
    "common_morpheme": Task("bigbench-common-morpheme", "bigbench", "acc",
                            "BIG-bench common_morpheme: the meaning shared by 4 words, of 4 (50 items)"),
    # The choices are whole lines, whose own probability varies far more than what the context adds:
    # log p(line | context) - log p(line | "\n") compares only the context's part.
    "next_line": Task("romeo-and-juliet", "next_line", "acc_pmi",
                      "the next line of Romeo and Juliet (held out of the tiny recipe's data), of 4 (2,136 items)"),
}


@functools.lru_cache(maxsize=None)
def all_items(name: str) -> tuple[Item, ...]:
    """Every item of a task, in a fixed order (the data file is fetched once, then read from the cache)."""
    from qt_serve import hub

    task = TASKS[name]
    path = hub.fetch_file(task.data)
    if task.kind == "next_line":
        return tuple(next_line_items(path.read_text(encoding="utf-8")))
    return tuple(bigbench_items(json.loads(path.read_text(encoding="utf-8"))))


def check_names(names: list[str] | None) -> list[str]:
    names = list(TASKS) if names is None else list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise QtError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; known: {', '.join(TASKS)}")
    return names


def load_items(name: str, limit: int | None = None, seed: int = 0) -> list[Item]:
    """A task's fixed seeded subset of `limit` items (None: all)."""
    check_names([name])
    return subset(list(all_items(name)), limit, name, seed)


# ---- scoring ----------------------------------------------------------------------------


def split_choice(context: str, choice: str) -> tuple[str, str]:
    """Trailing spaces of the context move to the choice ("A: " + "yes" -> "A:" + " yes"): a BPE tokenizer
    writes a space with the word after it, so a context ending in one would be split unlike training text."""
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped):] + choice


def encode(tokenizer, context: str, choices: tuple[str, ...], max_len: int
           ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], bool] | None:
    """(context ids, each choice's ids, whether the context was cut): a context that does not fit in
    `max_len` with the longest choice loses its start; None when a choice leaves no room for context."""
    pairs = [split_choice(context, c) for c in choices]
    conts = tuple(tuple(tokenizer.encode(cont, add_special_tokens=False)) for _, cont in pairs)
    ctx = tokenizer.encode(pairs[0][0])  # the same for every choice: only trailing spaces move
    keep = max_len - max(map(len, conts))
    if keep < 1 or not all(conts):
        return None
    return tuple(ctx[-keep:]), conts, len(ctx) > keep


def row_layout(ctx: tuple[int, ...], choices: tuple[tuple[int, ...], ...]):
    """One packed row, context then every choice: (ids, positions, branch of each token (-1: context),
    and for each choice the indices whose logits predict its tokens)."""
    ids, pos, branch, at = list(ctx), list(range(len(ctx))), [-1] * len(ctx), []
    for j, c in enumerate(choices):
        start = len(ids)
        at.append([len(ctx) - 1] + list(range(start, start + len(c) - 1)))
        ids += c
        pos += range(len(ctx), len(ctx) + len(c))
        branch += [j] * len(c)
    return ids, pos, branch, at


@torch.no_grad()
def logprobs(model, rows: list[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]], max_tokens: int = 8192
             ) -> list[list[float]]:
    """For each (context ids, choices' ids): each choice's summed log-probability given the context.

    A row holds the context once and all its choices after it (`MaskedAttention`); rows are sorted by
    length and right-padded into batches of at most `max_tokens` positions; the LM head runs only where a
    choice token is predicted (`logit_index`), so a large vocabulary costs little."""
    device = next(model.parameters()).device
    windows = model.config.windows()
    was_training = model.training
    model.eval()
    out: list[list[float]] = [[] for _ in rows]
    size = [len(c) + sum(map(len, ch)) for c, ch in rows]
    order = sorted(range(len(rows)), key=size.__getitem__)
    try:
        b = 0
        while b < len(order):
            e = b + 1  # the widest row is the batch's last (sorted)
            while e < len(order) and (e + 1 - b) * size[order[e]] <= max_tokens:
                e += 1
            batch, b = order[b:e], e
            width = size[batch[-1]]
            k = max(sum(map(len, rows[i][1])) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            pos = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)  # padding sees itself only
            at = torch.zeros(len(batch), k, dtype=torch.long)
            targets = torch.zeros(len(batch), k, dtype=torch.long)
            for r, i in enumerate(batch):
                ctx, choices = rows[i]
                row_ids, row_pos, branch, row_at = row_layout(ctx, choices)
                n = len(row_ids)
                ids[r, :n], pos[r, :n] = torch.tensor(row_ids), torch.tensor(row_pos)
                br, p = torch.tensor(branch), torch.tensor(row_pos)
                # key j is visible to query i iff j is context or on i's branch, and not after i
                mask[r, :n, :n] = ((br[None, :] == -1) | (br[None, :] == br[:, None])) & (p[None, :] <= p[:, None])
                flat = [a for c in row_at for a in c]
                at[r, :len(flat)] = torch.tensor(flat)
                targets[r, :len(flat)] = torch.tensor([t for c in choices for t in c])
            attend = MaskedAttention(mask[:, None].to(device), pos.to(device), windows)
            logits = model(ids.to(device), pos.to(device), cache=attend, logit_index=at.to(device)).float()
            lp = torch.log_softmax(logits, -1).gather(-1, targets.to(device)[..., None])[..., 0].cpu()
            for r, i in enumerate(batch):
                lens = [len(c) for c in rows[i][1]]
                out[i] = [float(x.sum()) for x in lp[r, :sum(lens)].split(lens)]
    finally:
        model.train(was_training)
    return out


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def grade(items: list[Item], cond: list[list[float]], uncond: list[list[float]] | None = None) -> dict:
    """BIG-bench's multiple_choice_grade (the target score of the pick, averaged) under three rules:
    acc, the largest summed log-probability of the choice (BIG-bench's rule); acc_norm, per UTF-8 byte of
    the choice (lm-eval's acc_norm, in bytes); acc_pmi (given `uncond`), log p(choice | context) -
    log p(choice | neutral context), the pointwise mutual information (lm-eval's acc_mutual_info)."""
    acc = norm = pmi = 0.0
    for k, (it, lp) in enumerate(zip(items, cond)):
        nbytes = [max(len(split_choice(it.context, c)[1].encode()), 1) for c in it.choices]
        acc += it.scores[argmax(lp)]
        norm += it.scores[argmax([v / n for v, n in zip(lp, nbytes)])]
        if uncond is not None:
            pmi += it.scores[argmax([a - b for a, b in zip(lp, uncond[k])])]
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": norm / n, **({"acc_pmi": pmi / n} if uncond is not None else {})}


def score_tasks(model, tokenizer, tasks: dict[str, list[Item]], pmi: set[str] | None = None,
                max_tokens: int = 8192) -> dict[str, dict]:
    """Each task's grades (acc_pmi only for the tasks in `pmi`, None: all; it costs a second row per item),
    items scored, chance, and the items whose context was cut or that did not fit. All tasks' rows go
    through one sorted, deduplicated pass (neutral rows repeat across items with the same choices)."""
    max_len = model.max_seq_len
    plan, unique = {}, {}
    for name, items in tasks.items():
        kept, refs, cut, skipped = [], [], 0, 0
        for it in items:
            encs = [encode(tokenizer, it.context, it.choices, max_len)]
            if pmi is None or name in pmi:
                encs.append(encode(tokenizer, it.neutral, it.choices, max_len))
            if None in encs:
                skipped += 1
                continue
            kept.append(it)
            cut += encs[0][2]
            refs.append([unique.setdefault(enc[:2], len(unique)) for enc in encs])
        plan[name] = (kept, refs, cut, skipped)
    lp = logprobs(model, list(unique), max_tokens)
    out = {}
    for name, (kept, refs, cut, skipped) in plan.items():
        uncond = [lp[r[1]] for r in refs] if pmi is None or name in pmi else None
        out[name] = {"items": len(kept), "chance": chance(kept), **grade(kept, [lp[r[0]] for r in refs], uncond),
                     "context_cut": cut, "skipped": skipped}
    return out


# ---- held-out perplexity ------------------------------------------------------------------


HELDOUT_WINDOW = 255  # tokens per window, as `qt-eval ppl` on a 256-token model (less for a shorter context)


@torch.no_grad()
def heldout(model, tokenizer, text: str | None = None, window: int = HELDOUT_WINDOW) -> dict:
    """Cross-entropy, perplexity and bits per byte of the fixed held-out text (`evals.ppl`'s passage:
    no qt corpus holds it), in `evals.ppl`'s strided windows (half-window stride)."""
    from evals import ppl

    text = ppl.CORPORA["passage"].read_text(encoding="utf-8") if text is None else text
    ids = tokenizer.encode(text)
    window = min(window, model.max_seq_len - 1)
    # a window is a row whose "choice" is its scored tail: positions first..end-1 given those before
    rows = [(tuple(ids[s:first]), (tuple(ids[first:e]),)) for s, e, first in
            ppl.windows(len(ids), window, max(window // 2, 1))]
    nats = -sum(lp[0] for lp in logprobs(model, rows))
    return ppl.summary(nats, sum(len(r[1][0]) for r in rows), len(text.encode("utf-8")))


# ---- the suite ----------------------------------------------------------------------------


def evaluate(model, tokenizer, tasks: list[str] | None = None, limit: int | None = 200, seed: int = 0,
             with_heldout: bool = True, all_rules: bool = True, max_tokens: int = 8192) -> dict:
    """The suite on a `qt_serve.model.Transformer` and its tokenizer: {"tasks": {name: {"accuracy" (by the
    task's rule), "rule", "acc", "acc_norm", "acc_pmi", "chance", "items", ...}}, "heldout": perplexity
    and bits per byte, "seconds"}. `all_rules` False skips acc_pmi where it is not the task's rule."""
    names = check_names(tasks)
    start = time.perf_counter()
    items = {n: load_items(n, limit, seed) for n in names}
    pmi = None if all_rules else {n for n in names if TASKS[n].rule == "acc_pmi"}
    graded = score_tasks(model, tokenizer, items, pmi, max_tokens)
    result = {"limit": limit, "seed": seed, "tasks": {
        n: {"accuracy": r[TASKS[n].rule], "rule": TASKS[n].rule, **r} for n, r in graded.items()}}
    if with_heldout:
        result["heldout"] = heldout(model, tokenizer)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def scores(result: dict) -> dict[str, float]:
    """The flat numbers a training run logs: each task's accuracy, the held-out perplexity and bits per
    byte (`Trainer` adds the val_ prefix: val_zs_<task>, val_zs_heldout_ppl, val_zs_heldout_bpb)."""
    out = {f"zs_{n}": r["accuracy"] for n, r in result["tasks"].items()}
    if "heldout" in result:
        out |= {"zs_heldout_ppl": result["heldout"]["perplexity"], "zs_heldout_bpb": result["heldout"]["bits_per_byte"]}
    return out


def validation_scores(model, tokenizer, limit: int) -> dict[str, float]:
    """The pretraining hook's numbers (`qt-train pretrain --zeroshot N`): `limit` items per task (fewer
    where a task has fewer), each task's rule only."""
    return scores(evaluate(model, tokenizer, limit=limit, all_rules=False))


def prepare(limit: int | None = None) -> None:
    """Fetch and parse every task's data now (a training run calls this before its first step, so a
    missing file fails at once rather than at the first validation)."""
    for name in TASKS:
        load_items(name, limit)


# ---- qt-eval zeroshot ----------------------------------------------------------------------


def markdown(result: dict) -> str:
    lines = [f"# Zero-shot suite: {result['model']}", "",
             "Accuracy by each task's rule (acc: summed log-prob of the choice; acc_norm: per byte; acc_pmi: "
             "minus its log-prob after a neutral context); chance: a uniform random pick; ± one binomial "
             f"standard deviation at chance. {result['seconds']} s.", "",
             "| task | items | chance | accuracy | rule | acc | acc_norm | acc_pmi |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["tasks"].items():
        sd = (r["chance"] * (1 - r["chance"]) / max(r["items"], 1)) ** 0.5
        pmi = f"{r['acc_pmi']:.3f}" if "acc_pmi" in r else "-"
        lines.append(f"| {name} | {r['items']} | {r['chance']:.3f} ± {sd:.3f} | **{r['accuracy']:.3f}** | "
                     f"{r['rule']} | {r['acc']:.3f} | {r['acc_norm']:.3f} | {pmi} |")
    if "heldout" in result:
        r = result["heldout"]
        lines += ["", f"Held-out text (benchmarks/data/passage.txt, {r['scored_tokens']} tokens scored): perplexity "
                      f"{r['perplexity']:.2f}, {r['bits_per_byte']:.4f} bits per byte."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["tasks"])
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(names), 4))
    labels = [f"{n}\n({result['tasks'][n]['rule']})" for n in names]
    bars = ax.bar(labels, [result["tasks"][n]["accuracy"] for n in names], color="C0", label="accuracy")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    for i, n in enumerate(names):
        ax.hlines(result["tasks"][n]["chance"], i - 0.4, i + 0.4, colors="C3", linestyles="--",
                  label="chance" if i == 0 else None)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"zero-shot: {result['model']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    from qt_serve.checkpoint import load

    names = check_names(args.tasks)  # before loading the model
    if args.limit < 0:
        raise QtError(f"--limit must be ≥ 0 (0: every item), got {args.limit}")
    ckpt = load(args.model, dtype=args.dtype, device=args.device)
    if ckpt.model is None or ckpt.tokenizer is None:
        raise QtError(f"{args.model}: the zero-shot suite needs a torch model with its tokenizer "
                      "(not an ONNX graph, not a directory without tokenizer.json)")
    result = {"model": str(args.model), **evaluate(ckpt.model, ckpt.tokenizer, names, args.limit or None,
                                                   with_heldout=not args.no_heldout)}
    from evals import suite

    suite.write(result, Path(args.out or f"out/zeroshot-{Path(str(args.model)).name}"), "zeroshot", markdown, plot)
    return 0
