"""`qt-eval glue` on a GLUE tree written here in the official layout (a few rows per task, WNLI left out),
scored with the tiny random checkpoint: the files read right, every label choice agrees with transformers'
Llama on the same directory, the metrics agree with scikit-learn / scipy, and fine-tuning learns."""

import json
import random

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from evals import cli, glue
from qt_serve import checkpoint

WORDS = "to be or not that is the question whether tis nobler in mind sea of troubles capital France Paris".split()
LONG = " ".join(["question"] * 300)  # past the tiny model's 256-token context


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 8))).capitalize() + "."


def tsv(path, header, rows, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def glue_tree(root, n=6, seed=0):
    """download_glue_data.py's glue_data/ with n dev and 2n train rows per task, but no WNLI; MRPC as the MSR
    corpus's files (with dev_ids.tsv), SST-2's dev with one malformed and one over-long row."""
    rng = random.Random(seed)
    s = lambda: sentence(rng)  # noqa: E731
    nli = ["entailment", "not_entailment"]
    mnli = ["entailment", "neutral", "contradiction"]
    for split, k in (("dev", n), ("train", 2 * n)):
        tsv(root / f"CoLA/{split}.tsv", None, [("gj04", i % 2, "" if i % 2 else "*", s()) for i in range(k)])
        tsv(root / f"SST-2/{split}.tsv", "sentence\tlabel", [(s(), i % 2) for i in range(k)])
        tsv(root / f"STS-B/{split}.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
            "sentence2\tscore", [(i, "main-news", "x", "2012", i, "none", "none", s(), s(), f"{i * 5 / (k - 1):.3f}")
                                 for i in range(k)])
        tsv(root / f"QQP/{split}.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            [(i, 2 * i, 2 * i + 1, s(), s(), i % 2) for i in range(k)])
        tsv(root / f"QNLI/{split}.tsv", "index\tquestion\tsentence\tlabel", [(i, s(), s(), nli[i % 2]) for i in range(k)])
        tsv(root / f"RTE/{split}.tsv", "index\tsentence1\tsentence2\tlabel", [(i, s(), s(), nli[i % 2]) for i in range(k)])
    with (root / "SST-2/dev.tsv").open("a") as f:
        f.write(f"{LONG}\t1\n" "a row\twith three\tfields\n")
    parses = "\t".join(["(parse)"] * 4)
    tsv(root / "MNLI/train.tsv", "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
        "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
        [(i, i, f"{i}e", "fiction", parses, s(), s(), mnli[i % 3], mnli[i % 3]) for i in range(2 * n)])
    for name in ("dev_matched", "dev_mismatched"):
        tsv(root / f"MNLI/{name}.tsv", "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\t"
            "sentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
            "label4\tlabel5\tgold_label", [(i, i, f"{i}n", "slate", parses, s(), s(), *[mnli[i % 3]] * 6)
                                          for i in range(n)])
    msr = [(i % 2, 100 + i, 200 + i, s(), s()) for i in range(3 * n)]
    tsv(root / "MRPC/msr_paraphrase_train.txt", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", msr, bom=True)
    tsv(root / "MRPC/dev_ids.tsv", None, [(a, b) for _, a, b, _, _ in msr[:n]])
    tsv(root / "diagnostic/diagnostic.tsv", "index\tsentence1\tsentence2", [(i, s(), s()) for i in range(n)])
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return glue_tree(tmp_path_factory.mktemp("glue") / "glue_data")


@pytest.fixture(scope="module")
def scorer(ckpt):
    return glue.Scorer(checkpoint.load(ckpt), rows=4)


@pytest.fixture(scope="module")
def tok(ckpt):
    return checkpoint.load(ckpt).tokenizer


@pytest.fixture(scope="module")
def hf(ckpt):
    """The reference: transformers' own Llama on the checkpoint directory."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def test_reads_the_official_layouts(tree, tmp_path):
    cola = glue.read(tree, glue.BY_NAME["cola"], "dev")
    assert len(cola.rows) == 6 and cola.rows[0].label == 0 and cola.rows[1].label == 1 and cola.rows[0].b is None
    sst = glue.read(tree, glue.BY_NAME["sst-2"], "dev")
    assert (len(sst.rows), sst.malformed, sst.rows[-1].a) == (7, 1, LONG)
    mrpc_dev, mrpc_train = (glue.read(tree, glue.BY_NAME["mrpc"], split) for split in ("dev", "train"))
    assert (len(mrpc_dev.rows), len(mrpc_train.rows)) == (6, 12)  # dev_ids.tsv's pairs, and the rest
    fields = (tree / "MNLI/dev_matched.tsv").read_text().splitlines()[2].split("\t")  # the header, rows 0, 1
    m = glue.read(tree, glue.BY_NAME["mnli-m"], "dev").rows[1]
    assert (m.a, m.b, m.label) == (fields[8], fields[9], 1)  # sentence1, sentence2, gold_label "neutral"
    sts = glue.read(tree, glue.BY_NAME["sts-b"], "dev").rows
    assert sts[-1].label == 5.0 and isinstance(sts[0].label, float)
    assert all(ex.label is None for ex in glue.read(tree, glue.BY_NAME["ax"], "dev").rows)
    full = tmp_path / "diagnostic/diagnostic-full.tsv"  # the labeled diagnostic from the GLUE site wins
    tsv(full, "Lexical Semantics\tPredicate-Argument Structure\tLogic\tKnowledge\tDomain\tPremise\tHypothesis\tLabel",
        [("", "", "Negation", "", "ACL", "The cat sat.", "The cat did not sit.", "contradiction")])
    ax = glue.read(tmp_path, glue.BY_NAME["ax"], "dev").rows
    assert (ax[0].a, ax[0].b, ax[0].label) == ("The cat sat.", "The cat did not sit.", 2)
    with pytest.raises(glue.Missing, match="WNLI/dev.tsv"):
        glue.read(tree, glue.BY_NAME["wnli"], "dev")
    example = glue.Example("It is good.", None, 1)
    assert glue.prompt(glue.BY_NAME["sst-2"], example) == \
        "It is good.\nQuestion: Is this sentence positive or negative?\nAnswer:"


def reference_choice(hf, tok, task, text) -> int | float:
    """The label whose verbalizer transformers' Llama finds likeliest after `text` (STS-B: the expected score)."""
    ctx = tok.encode(text)
    ll = []
    for verbalizer in task.verbalizers:
        cont = tok.encode(verbalizer, add_special_tokens=False)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0], -1)
        ll.append(sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
    if task.labels is None:
        p = np.exp(np.array(ll) - max(ll))
        return float(np.arange(6) @ (p / p.sum()))
    return int(np.argmax(ll))


@pytest.mark.parametrize("name,shots", [("sst-2", 0), ("mnli-m", 0), ("sts-b", 0), ("rte", 2)])
def test_label_choice_is_the_likeliest_continuation(hf, tok, tree, scorer, name, shots):
    task = glue.BY_NAME[name]
    rows = [ex for ex in glue.read(tree, task, "dev").rows if ex.a != LONG]
    demos = glue.read(tree, task, "train").rows
    preds = glue.loglik_predictions(scorer, tok, task, rows, demos, shots, seed=3, progress=False)
    rng = random.Random(f"3:{task.name}")  # the documented draw: one seeded generator per (seed, task)
    for ex, pred in zip(rows, preds):
        text = "\n\n".join([glue.prompt(task, d) + task.verbalizers[glue.target(task, d)]
                            for d in rng.sample(demos, shots)] + [glue.prompt(task, ex)])
        assert pred == pytest.approx(reference_choice(hf, tok, task, text), abs=1e-4)


def test_zero_shot_end_to_end(ckpt, hf, tok, tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["glue", "--model", str(ckpt), "--data-dir", str(tree), "--out", str(out), "--batch", "3"]) == 0
    report = json.loads((out / "glue.json").read_text())
    assert (out / "glue.md").read_text() in capsys.readouterr().out
    assert (out / "glue.png").stat().st_size > 0
    tasks = report["tasks"]
    assert list(tasks) == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "AX"]
    assert "WNLI/dev.tsv" in report["skipped"]["WNLI"]
    assert (tasks["SST-2"]["rows"], tasks["SST-2"]["too_long"], tasks["SST-2"]["malformed"]) == (6, 1, 1)
    assert sum(tasks["AX"]["predictions"].values()) == 6 and "metrics" not in tasks["AX"]
    assert set(tasks["MRPC"]["metrics"]) == {"f1", "acc"} and set(tasks["STS-B"]["metrics"]) == {"pearson", "spearman"}
    # The leaderboard's average: MNLI-m and -mm count as one task, AX not at all; WNLI is missing.
    scores = [tasks[t]["score"] for t in ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "QNLI", "RTE")]
    mnli = (tasks["MNLI-m"]["score"] + tasks["MNLI-mm"]["score"]) / 2
    assert report["glue_score"] == pytest.approx(np.mean(scores + [mnli]))
    assert len(report["glue_tasks"]) == 8
    # SST-2's accuracy from transformers' choices on the rows that fit
    task = glue.BY_NAME["sst-2"]
    rows = [ex for ex in glue.read(tree, task, "dev").rows if ex.a != LONG]
    acc = np.mean([reference_choice(hf, tok, task, glue.prompt(task, ex)) == ex.label for ex in rows])
    assert tasks["SST-2"]["metrics"]["acc"] == pytest.approx(100 * acc)


def test_missing_data_says_where_to_get_glue(ckpt, tmp_path, capsys):
    assert cli.eval_main(["glue", "--model", str(ckpt), "--data-dir", str(tmp_path / "nope")]) == 2
    assert "gluebenchmark.com" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.eval_main(["glue", "--model", str(ckpt), "--data-dir", str(tmp_path / "empty")]) == 2
    assert "download_glue_data.py" in capsys.readouterr().err


def test_metrics_agree_with_references():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert glue.matthews(y, p) == pytest.approx(matthews_corrcoef(y, p))
    assert glue.f1(y, p) == pytest.approx(f1_score(y, p))
    assert glue.accuracy(y, p) == pytest.approx(np.mean(y == p))
    y3, p3 = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    assert glue.matthews(y3, p3) == pytest.approx(matthews_corrcoef(y3, p3))  # AX's R3
    assert glue.matthews([0, 1, 1], [1, 1, 1]) == 0.0 == matthews_corrcoef([0, 1, 1], [1, 1, 1])
    assert glue.f1([0, 1], [0, 0]) == 0.0
    x, z = rng.normal(size=40), rng.normal(size=40)
    assert glue.pearson(x, z) == pytest.approx(pearsonr(x, z)[0])
    tied_x, tied_z = np.round(x), np.round(z + x)  # ties: mean ranks
    assert glue.spearman(tied_x, tied_z) == pytest.approx(spearmanr(tied_x, tied_z)[0])
    # BERT-large on the GLUE leaderboard (its paper's Table 1): CoLA 60.5, SST-2 94.9, MRPC 89.3/85.4,
    # STS-B 87.6/86.5, QQP 72.1/89.3, MNLI 86.7/85.9, QNLI 92.7, RTE 70.1, WNLI 65.1 -> score 80.5
    board = {"CoLA": [60.5], "SST-2": [94.9], "MRPC": [89.3, 85.4], "STS-B": [87.6, 86.5], "QQP": [72.1, 89.3],
             "MNLI-m": [86.7], "MNLI-mm": [85.9], "QNLI": [92.7], "RTE": [70.1], "WNLI": [65.1], "AX": [39.6]}
    score, covered = glue.glue_score({k: {"score": np.mean(v)} for k, v in board.items()})
    assert round(score, 1) == 80.5 and len(covered) == 9


@pytest.fixture
def one_thread():
    """Training a 64-wide model gains nothing from a second thread, and on a shared 2-core machine OpenMP's
    barriers stalled its backward passes: 25 s instead of 3 under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_finetune_learns_a_trivial_task(ckpt, tmp_path, one_thread):
    """SST-2 rows whose label is whether they end in "Tokyo" (or "fortune"): the loss falls below 0.1."""
    root = tmp_path / "glue_data"
    rng = random.Random(1)
    rows = [(sentence(rng)[:-1] + (" Tokyo." if i % 2 else " fortune."), i % 2) for i in range(64)]
    tsv(root / "SST-2/train.tsv", "sentence\tlabel", rows[:48])
    tsv(root / "SST-2/dev.tsv", "sentence\tlabel", rows[48:])
    tsv(root / "STS-B/train.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\t"
        "score", [(i, "g", "f", "y", i, "s", "s", a, a, 5.0 * y) for i, (a, y) in enumerate(rows)])
    (root / "STS-B/dev.tsv").write_text((root / "STS-B/train.tsv").read_text())
    tune = glue.Tune(epochs=100, max_steps=60, batch_size=8, lr=1e-3, seed=0)
    report = glue.evaluate(str(ckpt), root, ["SST-2", "STS-B"], tune=tune, progress=False)
    sst = report["tasks"]["SST-2"]
    assert sst["train"]["steps"] == 60 and sst["train"]["final_loss"] < 0.1 < sst["train"]["first_loss"]
    assert sst["metrics"]["acc"] == 100.0
    assert report["tasks"]["STS-B"]["train"]["final_loss"] < report["tasks"]["STS-B"]["train"]["first_loss"]
    assert report["mode"] == "fine-tuned" and not report["skipped"]
