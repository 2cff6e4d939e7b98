"""`qt-eval glue --data-dir DIR`: the GLUE benchmark (Wang et al. 2018) on a qt checkpoint.

    qt-eval glue --data-dir glue_data --model SmolLM2-135M-Instruct --out out/glue            # zero-shot
    qt-eval glue --data-dir glue_data --shots 5 --seed 1 --out out/glue-5shot                 # few-shot
    qt-eval glue --data-dir glue_data --model runs/tiny/best --finetune --max-train 2000 --out out/glue-ft

GLUE is on no package registry: get it from https://gluebenchmark.com/tasks, or with
`download_glue_data.py` (https://github.com/nyu-mll/GLUE-baselines), which writes the `glue_data/`
tree read here. Each task is scored on its dev split (the test labels are not public):

- zero- / few-shot: each label is a verbalized continuation of a prompt (lm-eval-harness's GLUE
  prompts, so the numbers compare with its tasks); the label whose continuation has the highest
  log-likelihood wins. STS-B: the expected value of " 0" .. " 5" under their renormalised
  probabilities. `--shots K` puts K solved training rows before each prompt (seeded).
- `--finetune`: a linear head on the last token's hidden state (a regression head for STS-B) and the
  whole model trained with AdamW on the task's train split, then applied to dev. The head sits
  outside the model: its LM head is swapped for an identity, `qt_serve.model` knows nothing of GLUE.

Scores go through the checkpoint's runner (`qt_serve.runner`, the engine's backend seam), not through
engine requests: one forward per distinct context scores every single-token label at once (the
engine's echo scoring would run the whole prompt once per label, 6 times for STS-B, and take
log-softmaxes over every prompt position), while quantized and ONNX checkpoints still run on their
own kernels, as in qt-serve.

Metrics as in BERT's table, ×100: CoLA Matthews corr., MRPC F1/acc, STS-B Pearson/Spearman, QQP acc/F1,
accuracy elsewhere; AX (the diagnostic) R3, the multiclass Matthews corr., when its labeled
`diagnostic-full.tsv` is present, else the distribution of its predictions. The GLUE score is the
leaderboard's: the mean over CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI (AX excluded) of each
task's score, a task with two metrics (MNLI: m and mm) averaged first. Rows longer than the context
are counted and left out, malformed rows likewise; a task whose files are missing is skipped and said.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from qt_serve import checkpoint
from qt_serve.errors import QtError
from qt_serve.runner import Segment, TorchRunner
from train.pretrain import lr_factor

WHERE = ("GLUE is on no package registry: download it from https://gluebenchmark.com/tasks or with "
         "download_glue_data.py (https://github.com/nyu-mll/GLUE-baselines: python download_glue_data.py "
         "--data_dir glue_data --tasks all) and pass --data-dir glue_data")
NLI = {"entailment": 0, "not_entailment": 1}
MNLI = {"entailment": 0, "neutral": 1, "contradiction": 2}
BINARY = {"0": 0, "1": 1}


@dataclass(frozen=True)
class Task:
    """One GLUE task: where its rows are, how a row reads, how it is asked and scored.

    `columns` names the (sentence, second sentence or None, label) columns by header, each with the
    names it goes by in the files that serve it, or by index in a headerless file (CoLA)."""

    name: str
    dev: tuple[str, ...]  # the evaluated file, relative to the data dir: the first of these present
    train: str  # demonstrations and fine-tuning rows
    columns: tuple
    labels: dict[str, int] | None  # label text -> class; None: a similarity score (STS-B)
    verbalizers: tuple[str, ...]  # class -> its continuation
    prompt: str  # with {a} and {b}
    metrics: tuple[str, ...]
    glue: str | None = None  # the GLUE-score task it counts for (MNLI-m and -mm count as one, MNLI)


# Column layouts of the GLUE release (download_glue_data.py's glue_data/):
#   CoLA/{train,dev}.tsv      no header: source, label (0/1), original judgement ("*" or ""), sentence
#   SST-2/{train,dev}.tsv     sentence, label
#   MRPC/{train,dev}.tsv      Quality, #1 ID, #2 ID, #1 String, #2 String (as msr_paraphrase_train.txt,
#                             of which dev.tsv is the pairs listed in dev_ids.tsv: see `msr_split`)
#   STS-B/{train,dev}.tsv     index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score
#   QQP/{train,dev}.tsv       id, qid1, qid2, question1, question2, is_duplicate
#   MNLI/train.tsv            index, promptID, pairID, genre, sentence{1,2}_binary_parse, sentence{1,2}_parse,
#                             sentence1, sentence2, label1, gold_label (dev_*: label1 .. label5, gold_label)
#   QNLI/{train,dev}.tsv      index, question, sentence, label (entailment / not_entailment)
#   RTE/{train,dev}.tsv       index, sentence1, sentence2, label (entailment / not_entailment)
#   WNLI/{train,dev}.tsv      index, sentence1, sentence2, label (1: entailment)
#   diagnostic/diagnostic.tsv index, sentence1, sentence2 (no labels); diagnostic-full.tsv (from the GLUE
#                             site): Lexical Semantics, Predicate-Argument Structure, Logic, Knowledge,
#                             Domain, Premise, Hypothesis, Label
NLI_COLUMNS = (("sentence1", "Premise"), ("sentence2", "Hypothesis"), ("gold_label", "Label"))
MNLI_M = Task("MNLI-m", ("MNLI/dev_matched.tsv",), "MNLI/train.tsv", NLI_COLUMNS, MNLI,
              (" True", " Neither", " False"), "{a}\nQuestion: {b} True, False or Neither?\nAnswer:", ("acc",), "MNLI")
PAIR = "Sentence 1: {a}\nSentence 2: {b}\nQuestion: "
TASKS = (
    Task("CoLA", ("CoLA/dev.tsv",), "CoLA/train.tsv", (3, None, 1), BINARY, (" no", " yes"),
         "{a}\nQuestion: Does this sentence make sense?\nAnswer:", ("mcc",), "CoLA"),
    Task("SST-2", ("SST-2/dev.tsv",), "SST-2/train.tsv", (("sentence",), None, ("label",)), BINARY,
         (" negative", " positive"), "{a}\nQuestion: Is this sentence positive or negative?\nAnswer:", ("acc",),
         "SST-2"),
    Task("MRPC", ("MRPC/dev.tsv",), "MRPC/train.tsv", (("#1 String",), ("#2 String",), ("Quality",)), BINARY,
         (" no", " yes"), PAIR + "Do both sentences mean the same thing?\nAnswer:", ("f1", "acc"), "MRPC"),
    Task("STS-B", ("STS-B/dev.tsv",), "STS-B/train.tsv", (("sentence1",), ("sentence2",), ("score",)), None,
         tuple(f" {k}" for k in range(6)),
         PAIR + "On a scale of 0 to 5, how similar are the two sentences?\nAnswer:", ("pearson", "spearman"), "STS-B"),
    Task("QQP", ("QQP/dev.tsv",), "QQP/train.tsv", (("question1",), ("question2",), ("is_duplicate",)), BINARY,
         (" no", " yes"), "Question 1: {a}\nQuestion 2: {b}\nQuestion: Do both questions ask the same thing?\nAnswer:",
         ("acc", "f1"), "QQP"),
    MNLI_M,
    replace(MNLI_M, name="MNLI-mm", dev=("MNLI/dev_mismatched.tsv",)),
    Task("QNLI", ("QNLI/dev.tsv",), "QNLI/train.tsv", (("question",), ("sentence",), ("label",)), NLI,
         (" yes", " no"), "{a}\n{b}\nQuestion: Does this response answer the question?\nAnswer:", ("acc",), "QNLI"),
    Task("RTE", ("RTE/dev.tsv",), "RTE/train.tsv", (("sentence1",), ("sentence2",), ("label",)), NLI,
         (" True", " False"), "{a}\nQuestion: {b} True or False?\nAnswer:", ("acc",), "RTE"),
    Task("WNLI", ("WNLI/dev.tsv",), "WNLI/train.tsv", (("sentence1",), ("sentence2",), ("label",)), BINARY,
         (" False", " True"), "{a}\nQuestion: {b} True or False?\nAnswer:", ("acc",), "WNLI"),
    # The diagnostic is scored with what MNLI trains (GLUE's rule): MNLI's prompt, demonstrations and head.
    replace(MNLI_M, name="AX", dev=("diagnostic/diagnostic-full.tsv", "diagnostic/diagnostic.tsv"),
            metrics=("mcc",), glue=None),
)
BY_NAME = {t.name.lower(): t for t in TASKS}


def select(names: list[str] | None) -> list[Task]:
    if not names:
        return list(TASKS)
    unknown = [n for n in names if n.lower() not in BY_NAME]
    if unknown:
        raise QtError(f"unknown GLUE task(s) {', '.join(unknown)}; choose from {', '.join(t.name for t in TASKS)}")
    return [BY_NAME[n.lower()] for n in names]


# ---- reading ---------------------------------------------------------------------


class Missing(QtError):
    """A task's files are not in the data dir: that task is skipped, the others run."""


@dataclass
class Example:
    a: str
    b: str | None
    label: int | float | None  # None: the file has no labels (the public diagnostic)


@dataclass
class Split:
    path: str
    rows: list[Example]
    malformed: int = 0  # rows with too few or too many fields, or a label that is none of the task's


def column(header: list[str], names: tuple[str, ...] | None, path: Path, required: bool) -> int | None:
    found = [header.index(n) for n in names or () if n in header]
    if required and names and not found:
        raise QtError(f"{path} has no column {' or '.join(names)} (its header: {', '.join(header)}); "
                      "is it the GLUE release's file?")
    return found[0] if found else None


def read_table(path: Path, task: Task, keep=None) -> Split:
    """A GLUE file's rows; `keep(header, fields)` picks some (MRPC's dev pairs out of the MSR file).

    Fields are split on tabs with quotes taken literally (csv.QUOTE_NONE in GLUE's own readers): a
    sentence may hold a lone '"'. Streamed, keeping only the used columns: MNLI's train.tsv is 300 MB."""
    split = Split(str(path), [])
    with open(path, encoding="utf-8-sig", newline="") as f:  # the MSR files start with a byte-order mark
        lines = (line.rstrip("\r\n").split("\t") for line in f if line.strip())
        if isinstance(task.columns[0], int):  # CoLA's train and dev files have no header
            header, (a, b, y), width = [], task.columns, 4
        else:
            header = next(lines, [])
            a, b = column(header, task.columns[0], path, True), column(header, task.columns[1], path, True)
            y, width = column(header, task.columns[2], path, False), len(header)
        for fields in lines:
            if len(fields) != width:
                split.malformed += 1
                continue
            if keep is not None and not keep(header, fields):
                continue
            try:
                label = None if y is None else task.labels[fields[y]] if task.labels else float(fields[y])
            except (KeyError, ValueError):
                split.malformed += 1
                continue
            split.rows.append(Example(fields[a], None if b is None else fields[b], label))
    return split


def msr_split(msr: Path, ids: Path, task: Task, split: str) -> Split:
    """MRPC from the MSR corpus's own training file, as download_glue_data.py splits it: dev is the
    pairs listed in dev_ids.tsv (#1 ID, #2 ID; no header), train the rest."""
    dev = {tuple(line.strip().split("\t")[:2]) for line in ids.read_text(encoding="utf-8-sig").splitlines()}

    def keep(header: list[str], fields: list[str]) -> bool:
        pair = (fields[header.index("#1 ID")], fields[header.index("#2 ID")])
        return (pair in dev) == (split == "dev")

    return read_table(msr, task, keep)


def read(data_dir: Path, task: Task, split: str) -> Split:
    """A task's dev or train rows from the GLUE layout; `Missing` when its files are not there."""
    names = task.dev if split == "dev" else (task.train,)
    for name in names:
        if (data_dir / name).is_file():
            return read_table(data_dir / name, task)
    msr = data_dir / "MRPC" / "msr_paraphrase_train.txt"
    # dev_ids.tsv as download_glue_data.py names it; mrpc_dev_ids.tsv as GLUE's own URL does
    ids = [p for p in (msr.with_name("dev_ids.tsv"), msr.with_name("mrpc_dev_ids.tsv")) if p.is_file()]
    if task.name == "MRPC" and msr.is_file() and ids:
        return msr_split(msr, ids[0], task, split)
    raise Missing(f"{' or '.join(names)} is not in {data_dir}")


# ---- prompts and log-likelihood scoring --------------------------------------------


def prompt(task: Task, ex: Example) -> str:
    return task.prompt.format(a=ex.a.strip(), b=(ex.b or "").strip())


def target(task: Task, ex: Example) -> int:
    """A labeled row's class; for STS-B, the verbalized score its similarity rounds to."""
    return int(ex.label) if task.labels else min(5, max(0, round(ex.label)))


def context(task: Task, ex: Example, demos: list[Example]) -> str:
    """The text the labels continue: solved demonstrations (few-shot), then the row's own prompt."""
    return "\n\n".join([prompt(task, d) + task.verbalizers[target(task, d)] for d in demos] + [prompt(task, ex)])


class Scorer:
    """Log-likelihoods of continuations through a checkpoint's runner (the engine's backend seam).

    A continuation's tokens are scored by the logits at the positions before them, so a sequence
    is fed as its context plus all but its continuation's last token: every single-token label of a
    row shares one sequence, the context alone, and one forward scores them all."""

    def __init__(self, ckpt: checkpoint.Checkpoint, rows: int = 8):
        self.runner = ckpt.runner() if ckpt.runner is not None else TorchRunner(ckpt.model)
        self.rows, self.max_len = rows, self.runner.max_seq_len

    def score(self, items: list[tuple[list[int], list[list[int]]]], desc: str = "", progress: bool = True
              ) -> list[list[float] | None]:
        """For each (context ids, continuations' ids): each continuation's summed log-probability, or
        None when context + continuation exceed the context length."""
        out: list[list[float] | None] = [None] * len(items)
        uses: dict[tuple[tuple[int, ...], int], list[tuple[int, int, list[int]]]] = {}  # sequence -> its users
        for i, (ctx, conts) in enumerate(items):
            if len(ctx) + max(map(len, conts)) > self.max_len:
                continue
            out[i] = [0.0] * len(conts)
            for j, c in enumerate(conts):
                uses.setdefault((tuple(ctx + c[:-1]), len(ctx)), []).append((i, j, c))
        jobs = list(uses)
        if not jobs:
            return out
        # The cache (which the runner writes keys/values into) sized for this call's longest sequence.
        self.runner.allocate(self.rows, max(len(seq) for seq, _ in jobs))
        with tqdm(total=len(jobs), desc=desc, unit="seq", disable=not progress) as bar:
            for k in range(0, len(jobs), self.rows):
                group, segments, at, n = jobs[k:k + self.rows], [], [], 0
                for row, (seq, start) in enumerate(group):
                    segments.append(Segment(row, 0, list(seq)))
                    at.extend(range(n + start - 1, n + len(seq)))  # the last context token's onwards
                    n += len(seq)
                lp = torch.log_softmax(self.runner.forward(segments, at).float(), -1)
                first = 0
                for seq, start in group:
                    for i, j, c in uses[(seq, start)]:
                        out[i][j] = float(lp[first + torch.arange(len(c)), torch.tensor(c)].sum())
                    first += len(seq) - start + 1
                bar.update(len(group))
        return out


def decide(task: Task, ll: list[float]) -> int | float:
    """The label with the most likely continuation; STS-B: the expected score under the renormalised
    probabilities of " 0" .. " 5"."""
    if task.labels is None:
        p = torch.softmax(torch.tensor(ll, dtype=torch.float64), 0)
        return float((p * torch.arange(len(ll))).sum())
    return int(np.argmax(ll))


def loglik_predictions(scorer: Scorer, tok, task: Task, rows: list[Example], demos: list[Example] = (),
                       shots: int = 0, seed: int = 0, progress: bool = True) -> list[int | float | None]:
    """Each row's predicted label (None: too long for the context), `shots` demonstrations drawn for
    each row from `demos` by a generator seeded with (seed, task)."""
    if len(demos) < shots:
        raise QtError(f"{shots} shots need as many labeled training rows; {task.train} has {len(demos)}")
    rng = random.Random(f"{seed}:{task.name}")
    conts = [tok.encode(v, add_special_tokens=False) for v in task.verbalizers]
    items = [(tok.encode(context(task, ex, rng.sample(demos, shots))), conts) for ex in rows]
    return [None if ll is None else decide(task, ll) for ll in scorer.score(items, task.name, progress)]


# ---- fine-tuning ---------------------------------------------------------------------


@dataclass
class Tune:
    """--finetune settings: BERT's recipe on a budget (AdamW with weight decay 0.01, 10% linear warmup,
    then decay (cosine) to 0, gradients clipped at 1), on at most `max_train` training rows."""

    epochs: int = 3
    max_steps: int | None = None
    max_train: int | None = 1000
    batch_size: int = 16
    lr: float = 2e-5
    seed: int = 0


class Classifier(nn.Module):
    """A copy of the checkpoint's transformer whose LM head is an identity, so that it returns final
    hidden states, and a linear head on the last token's (one output: STS-B's regression)."""

    def __init__(self, model: nn.Module, outputs: int):
        super().__init__()
        self.body = copy.deepcopy(model).float()
        self.body.lm_head = nn.Identity()
        self.head = nn.Linear(model.config.hidden_size, outputs, device=next(model.parameters()).device)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Rows are right-padded: under causal attention a row's last real token never sees the pads.
        return self.head(self.body(ids, logit_index=(lengths - 1)[:, None])[:, 0])


def encode(tok, task: Task, rows: list[Example], max_len: int) -> list[list[int] | None]:
    """Each row's prompt ids; None for a row longer than the context."""
    ids = [tok.encode(prompt(task, ex)) for ex in rows]
    return [x if len(x) <= max_len else None for x in ids]


def pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids.to(device), torch.tensor([len(s) for s in seqs], device=device)


def finetune(model: nn.Module, tok, task: Task, rows: list[Example], tune: Tune, progress: bool = True
             ) -> tuple[Classifier, dict]:
    """`task`'s classifier trained on its labeled `rows`, and what the training did (rows, steps, losses)."""
    rng = random.Random(tune.seed)
    torch.manual_seed(tune.seed)
    labeled = [ex for ex in rows if ex.label is not None]
    ids = encode(tok, task, labeled, model.max_seq_len)
    data = [(x, ex.label) for x, ex in zip(ids, labeled) if x is not None]
    if tune.max_train and len(data) > tune.max_train:
        data = rng.sample(data, tune.max_train)
    if not data:
        raise QtError(f"{task.train} has no labeled row that fits the context ({model.max_seq_len} tokens)")
    total = math.ceil(len(data) / tune.batch_size) * tune.epochs
    total = min(total, tune.max_steps or total)
    clf = Classifier(model, 1 if task.labels is None else len(task.verbalizers)).train()
    device = clf.head.weight.device
    opt = torch.optim.AdamW(clf.parameters(), lr=tune.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, max(1, total // 10), total, 0.0))
    losses, order = [], []
    for _ in tqdm(range(total), desc=f"{task.name} fine-tune", unit="step", disable=not progress):
        if not order:  # a new epoch: a new shuffle
            order = rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:tune.batch_size]], order[tune.batch_size:]
        out = clf(*pad([x for x, _ in batch], device))
        y = torch.tensor([y for _, y in batch], device=device)
        loss = F.mse_loss(out[:, 0], y.float()) if task.labels is None else F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    info = {"rows": len(data), "too_long": ids.count(None), "steps": total, "first_loss": losses[0],
            "final_loss": float(np.mean(losses[-10:])), "losses": losses}
    return clf.eval(), info


@torch.no_grad()
def classifier_predictions(clf: Classifier, tok, task: Task, rows: list[Example], batch: int = 16,
                           progress: bool = True) -> list[int | float | None]:
    ids = encode(tok, task, rows, clf.body.max_seq_len)
    preds: list[int | float | None] = [None] * len(rows)
    order = sorted((i for i, x in enumerate(ids) if x is not None), key=lambda i: len(ids[i]))  # little padding
    for k in tqdm(range(0, len(order), batch), desc=task.name, disable=not progress):
        part = order[k:k + batch]
        out = clf(*pad([ids[i] for i in part], clf.head.weight.device))
        for i, o in zip(part, out):
            preds[i] = float(o[0]) if task.labels is None else int(o.argmax())
    return preds


# ---- metrics -------------------------------------------------------------------------


def accuracy(y, p) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(p)))


def f1(y, p) -> float:
    """F1 of the positive class (1: paraphrase, duplicate); 0 when nothing is predicted or true positive."""
    y, p = np.asarray(y) == 1, np.asarray(p) == 1
    tp = np.sum(y & p)
    return float(2 * tp / (2 * tp + np.sum(~y & p) + np.sum(y & ~p))) if tp else 0.0


def matthews(y, p) -> float:
    """Matthews correlation, multiclass (Gorodkin's R_K: GLUE's R3 for the diagnostic); 0 when undefined
    (one class predicted or true throughout), as scikit-learn has it."""
    classes = {c: i for i, c in enumerate(sorted(set(y) | set(p)))}
    cm = np.zeros((len(classes), len(classes)))
    np.add.at(cm, ([classes[c] for c in y], [classes[c] for c in p]), 1)
    t, q, s = cm.sum(1), cm.sum(0), cm.sum()
    den = math.sqrt((s * s - q @ q) * (s * s - t @ t))
    return float((np.trace(cm) * s - t @ q) / den) if den else 0.0


def pearson(x, y) -> float:
    """Pearson correlation; 0 when either side is constant (undefined), as for Matthews."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt((x @ x) * (y @ y))
    return float(x @ y / den) if den else 0.0


def ranks(x) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank."""
    x = np.asarray(x, dtype=np.float64)
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, tie, count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=r) / count)[tie]


def spearman(x, y) -> float:
    return pearson(ranks(x), ranks(y))


METRICS = {"mcc": ("MCC", matthews), "acc": ("acc", accuracy), "f1": ("F1", f1),
           "pearson": ("Pearson", pearson), "spearman": ("Spearman", spearman)}


def measure(task: Task, rows: list[Example], preds: list) -> dict:
    """A task's result: its metrics ×100 and their mean (its score), or, for rows without labels, the
    distribution of the predictions."""
    kept = [(ex.label, p) for ex, p in zip(rows, preds) if p is not None]
    result = {"rows": len(kept), "too_long": len(rows) - len(kept)}
    if not kept:
        return result
    y, p = zip(*kept)
    if any(v is None for v in y):
        names = sorted(task.labels, key=task.labels.get)
        return result | {"predictions": {n: p.count(i) for i, n in enumerate(names)}}
    metrics = {m: 100 * METRICS[m][1](y, p) for m in task.metrics}
    return result | {"metrics": metrics, "score": float(np.mean(list(metrics.values())))}


def glue_score(results: dict[str, dict]) -> tuple[float | None, list[str]]:
    """The leaderboard's GLUE score over the tasks present, and which they are: the mean of the tasks'
    scores, MNLI's being the mean of MNLI-m's and MNLI-mm's."""
    groups: dict[str, list[float]] = {}
    for t in TASKS:
        if t.glue and "score" in results.get(t.name, {}):
            groups.setdefault(t.glue, []).append(results[t.name]["score"])
    if not groups:
        return None, []
    return float(np.mean([np.mean(v) for v in groups.values()])), list(groups)


# ---- a run ---------------------------------------------------------------------------


def evaluate(model: str, data_dir: str | Path, tasks: list[str] | None = None, shots: int = 0, seed: int = 0,
             limit: int | None = None, batch: int = 8, tune: Tune | None = None, dtype=None, device="cpu",
             max_seq_len: int | None = None, progress: bool = True) -> dict:
    """GLUE on `model`: zero- or `shots`-shot by log-likelihood, or fine-tuned with `tune`. The report:
    per task its metrics, score, rows scored, rows too long and malformed; skipped tasks and why; the
    GLUE score over the GLUE tasks present."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise QtError(f"{data_dir} is not a directory. {WHERE}")
    chosen = select(tasks)
    if shots < 0 or (tune and shots):
        raise QtError(f"shots must be ≥ 0 and go with log-likelihood scoring, not --finetune (got {shots})")
    ckpt = checkpoint.load(model, dtype=dtype, device=device, max_seq_len=max_seq_len)
    tok = ckpt.tokenizer
    if tok is None:
        raise QtError(f"{model} has no tokenizer.json: GLUE's rows are text")
    scheme = (ckpt.config.quantization or {}).get("scheme")
    if tune and (ckpt.model is None or scheme not in (None, *checkpoint.CAST_SCHEMES)):
        raise QtError(f"--finetune trains the torch weights; {model} is quantized ({scheme}): "
                      "give its full-precision checkpoint")
    scorer = None if tune else Scorer(ckpt, batch)
    ctx = scorer.max_len if scorer else ckpt.model.max_seq_len
    trains: dict[str, Split] = {}  # train file -> rows (MNLI-m, MNLI-mm and AX share MNLI's)
    heads: dict[str, tuple[Classifier, dict]] = {}  # train file -> its fine-tuned classifier
    results, skipped, missing = {}, {}, []
    for task in chosen:
        try:
            dev = read(data_dir, task, "dev")
            if (tune or shots) and task.train not in trains:
                trains[task.train] = read(data_dir, task, "train")
            rows = dev.rows[:limit]
            if tune:
                if task.train not in heads:
                    heads[task.train] = finetune(ckpt.model, tok, task, trains[task.train].rows, tune, progress)
                clf, info = heads[task.train]
                preds = classifier_predictions(clf, tok, task, rows, progress=progress)
            else:
                demos = [ex for ex in trains[task.train].rows if ex.label is not None] if shots else []
                preds = loglik_predictions(scorer, tok, task, rows, demos, shots, seed, progress)
        except QtError as e:  # its files missing or unreadable: the others still run
            skipped[task.name] = str(e)
            if isinstance(e, Missing):
                missing.append(task.name)
            continue
        result = measure(task, rows, preds) | {"file": dev.path, "malformed": dev.malformed}
        if tune:
            result["train"] = info
        if not result["rows"]:
            skipped[task.name] = f"all {len(rows)} rows of {dev.path} are longer than the context ({ctx} tokens)"
            continue
        results[task.name] = result
    if len(missing) == len(chosen):
        raise QtError(f"no task's files are in {data_dir} ({skipped[missing[0]]}, ...). {WHERE}")
    score, covered = glue_score(results)
    mode = "fine-tuned" if tune else f"{shots}-shot" if shots else "zero-shot"
    return {"model": str(model), "mode": mode, "seed": seed, "data_dir": str(data_dir), "limit": limit,
            "finetune": vars(tune) if tune else None, "tasks": results, "skipped": skipped,
            "glue_score": score, "glue_tasks": covered}


# ---- the report ----------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [f"# GLUE dev: {report['model']}, {report['mode']}", "",
             "| task | metrics | score | rows | too long | malformed |", "|---|---|---:|---:|---:|---:|"]
    for name, r in report["tasks"].items():
        if "metrics" in r:
            shown = " / ".join(f"{METRICS[m][0]} {v:.1f}" for m, v in r["metrics"].items())
            score = f"{r['score']:.1f}"
        else:
            shown, score = "predicted " + ", ".join(f"{k} {n}" for k, n in r["predictions"].items()), "—"
        lines.append(f"| {name} | {shown} | {score} | {r['rows']} | {r['too_long']} | {r['malformed']} |")
    if report["glue_score"] is not None:
        n = len(report["glue_tasks"])
        part = "" if n == 9 else f", {9 - n} of the 9 missing: not comparable with full GLUE scores"
        lines += ["", f"**GLUE score {report['glue_score']:.1f}** (mean over {', '.join(report['glue_tasks'])}{part})"]
    tuned = {name: r["train"] for name, r in report["tasks"].items() if "train" in r}
    if tuned:
        lines += ["", "Fine-tuning (MNLI's head serves MNLI-m, MNLI-mm and AX):", ""] + [
            f"- {name}: {t['rows']} rows ({t['too_long']} too long left out), {t['steps']} steps, "
            f"loss {t['first_loss']:.3f} → {t['final_loss']:.3f} (mean of the last 10)" for name, t in tuned.items()]
    if report["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {name}: {why}" for name, why in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = {name: r["score"] for name, r in report["tasks"].items() if "score" in r}
    if report["glue_score"] is not None:
        scored["GLUE"] = report["glue_score"]
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(scored), 4))
    bars = ax.bar(list(scored), list(scored.values()), color=["C1" if n == "GLUE" else "C0" for n in scored])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)  # Matthews and Pearson can go below 0
    ax.set_ylabel("dev score (×100)")
    ax.set_title(f"GLUE dev: {report['model']}, {report['mode']}", fontsize=10)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, out: str | Path) -> Path:
    """glue.json, glue.md and glue.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "glue.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "glue.md").write_text(markdown(report))
    plot(report, out / "glue.png")
    return out


def main(args) -> int:
    tune = Tune(args.epochs, args.max_steps, args.max_train or None, args.batch_size, args.lr, args.seed) \
        if args.finetune else None
    report = evaluate(args.model, args.data_dir, args.tasks, args.shots, args.seed, args.limit, args.batch, tune,
                      args.dtype, args.device, args.max_seq_len)
    out = write(report, args.out)
    print(markdown(report))
    print(f"wrote {out / 'glue.json'}, glue.md and glue.png")
    return 0
