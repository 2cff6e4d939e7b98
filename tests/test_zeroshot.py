"""evals/zeroshot.py: BIG-bench item parsing, choice scoring against a plain recompute, the suite, the
pretraining hook (val_zs_* in metrics.jsonl), `qt-eval zeroshot`, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model

from evals import zeroshot as zs
from evals.cli import main as eval_main
from qt_serve import hub
from qt_serve.errors import QtError

TOY = {  # a BIG-bench JSON task: default prefixes, choices appended to the input, one item with two right answers
    "examples": [
        {"input": "The capital of France is", "target_scores": {"Paris": 1, "Tokyo": 0, "the question": 0}},
        {"input": "To be, or not to", "target_scores": {"be": 1, "sea": 0}},
        {"input": "Pick a city:", "target_scores": {"Paris": 1, "Tokyo": 1, "fortune": 0, "arrows": 0}},
        {"input": "To be, or not to", "target_scores": {"be": 1, "sea": 0}},  # a duplicate: dropped
        {"input": "no choice is better", "target_scores": {"a": 0, "b": 0}},  # nothing to grade: dropped
        {"input": "generative only", "target": "x"},  # not multiple choice: dropped
    ],
}


def toy_task(monkeypatch, tmp_path, task: dict = TOY, name: str = "toy") -> None:
    """The suite reduced to one task from a file in a temporary $QT_HOME, as if fetched (no network), and a
    short held-out text (the real passage is thousands of tokens for the tests' 400-token vocabulary)."""
    from evals import ppl

    (tmp_path / "heldout.txt").write_text("To be, or not to be, that is the question. " * 8)
    monkeypatch.setitem(ppl.CORPORA, "passage", tmp_path / "heldout.txt")
    monkeypatch.setenv("QT_HOME", str(tmp_path / "home"))
    art = hub.Artifact("toy==0", f"toy/{name}.json", "test", sdist=True)
    monkeypatch.setitem(hub.DATA, f"{name}-data", art)
    hub.cached_path(art).parent.mkdir(parents=True, exist_ok=True)
    hub.cached_path(art).write_text(json.dumps(task))
    monkeypatch.setattr(zs, "TASKS", {name: zs.Task(f"{name}-data", "bigbench", "acc", "a test task")})
    zs.all_items.cache_clear()


@pytest.fixture(autouse=True)
def fresh_item_cache():
    zs.all_items.cache_clear()
    yield
    zs.all_items.cache_clear()


# ---- items -------------------------------------------------------------------------------


def test_bigbench_fields_follow_json_task_conventions():
    items = zs.bigbench_items(TOY)
    assert len(items) == 3  # duplicate, ungradable and generative examples dropped
    first = items[0]
    # default prefixes: "\nQ: " before the input, "\n  choice: " before each listed choice, "\nA: " after
    assert first.context.startswith("\nQ: The capital of France is\n  choice: ")
    assert first.context.endswith("\nA: ")
    assert sorted(first.context.split("\n  choice: ")[1:-1] + [first.context.split("\n  choice: ")[-1][:-4]]) == \
        sorted(first.choices)
    assert first.choices == ("Paris", "Tokyo", "the question") and first.scores == (1.0, 0.0, 0.0)
    assert first.neutral == "\nA: "
    assert zs.chance(items) == pytest.approx((1 / 3 + 1 / 2 + 2 / 4) / 3)  # two right answers: 2 of 4

    custom = {"task_prefix": "Answer.\n", "example_input_prefix": "\nQuestion: ", "example_output_prefix": "\nAnswer: ",
              "choice_prefix": " option: ", "append_choices_to_input": "false", "examples": TOY["examples"][:1]}
    (it,) = zs.bigbench_items(custom)
    assert it.context == "Answer.\n\nQuestion: The capital of France is\nAnswer: "  # "false" as a string too
    no_prefix = {"example_output_prefix": " ", "append_choices_to_input": False, "examples": TOY["examples"][:1]}
    assert zs.bigbench_items(no_prefix)[0].neutral == "\n "


def test_multiple_right_answers_grade_like_bigbench():
    (item,) = [it for it in zs.bigbench_items(TOY) if it.context.startswith("\nQ: Pick")]
    at = {c: i for i, c in enumerate(item.choices)}

    def picks(best: str) -> float:
        lp = [-5.0] * 4
        lp[at[best]] = -1.0
        return zs.grade([item], [lp], [[0.0] * 4])["acc"]

    assert picks("Tokyo") == picks("Paris") == 1.0 and picks("fortune") == 0.0


def test_subset_is_fixed_and_nested():
    items = [zs.Item(f"c{i}", ("a", "b"), (1.0, 0.0)) for i in range(50)]
    assert zs.subset(items, 10, "t") == zs.subset(list(items), 10, "t")
    assert zs.subset(items, 20, "t")[:10] == zs.subset(items, 10, "t")
    assert zs.subset(items, 10, "t") != zs.subset(items, 10, "other")  # each task its own draw
    assert len(zs.subset(items, None, "t")) == 50


def test_next_line_items():
    play = "\n".join(["ACT I.", "", "Romeo."] + [f"This is line number {i} of the speech," for i in range(80)])
    items = zs.next_line_items(play)
    assert items and all(sum(it.scores) == 1 and len(it.choices) == 4 for it in items)
    for it in items:
        true = it.choices[it.scores.index(1.0)]
        n = int(true.split()[4])
        assert it.context.endswith(f"line number {n - 1} of the speech,\n")  # the 4 lines before it
        assert all(abs(int(c.split()[4]) - n) >= 30 for c in it.choices if c != true)
    assert zs.next_line_items("\n".join(play.split("\n")[:20])) == []  # too short to draw distractors from


# ---- scoring -----------------------------------------------------------------------------


def reference_logprob(model, ctx: list[int], choice: list[int]) -> float:
    """Independent of the packing: the full text once through the model, no mask, no cache, no logit_index."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx + choice]))[0]
    lp = torch.log_softmax(logits.double(), -1)
    return sum(float(lp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(choice))


def test_packed_scoring_matches_one_sequence_at_a_time(tokenizer):
    model = tiny_model()
    items = zs.bigbench_items(TOY) + [zs.Item("The slings and arrows of", (" outrageous fortune", " the sea", " a"),
                                              (1.0, 0.0, 0.0))]
    rows = [zs.encode(tokenizer, it.context, it.choices, model.max_seq_len)[:2] for it in items]
    got = zs.logprobs(model, rows, max_tokens=64)  # several batches, rows of different widths (padding)
    for (ctx, choices), lps in zip(rows, got):
        for c, lp in zip(choices, lps):
            assert lp == pytest.approx(reference_logprob(model, list(ctx), list(c)), abs=1e-4)
    assert model.training is False


def test_sliding_window_models_score_like_a_plain_recompute(tokenizer):
    model = tiny_model(sliding_window=4, model_type="mistral")
    assert model.config.windows()[0] == 4
    ctx, choices = zs.encode(tokenizer, "To be, or not to be, that is the question:", (" whether", " the sea"),
                             256)[:2]
    got = zs.logprobs(model, [(ctx, choices)])[0]
    assert got == pytest.approx([reference_logprob(model, list(ctx), list(c)) for c in choices], abs=1e-4)


def test_trailing_space_moves_to_the_choice_and_long_contexts_are_cut(tokenizer):
    assert zs.split_choice("\nA: ", "yes") == ("\nA:", " yes")
    ctx, choices, cut = zs.encode(tokenizer, "\nA: ", ("Paris",), 256)
    assert choices[0] == tuple(tokenizer.encode(" Paris", add_special_tokens=False)) and not cut
    long = "To be, or not to be, " * 40
    ctx, choices, cut = zs.encode(tokenizer, long, ("Paris", "Tokyo"), 32)
    assert cut and len(ctx) + max(map(len, choices)) == 32
    assert ctx == tuple(tokenizer.encode(long.rstrip())[-len(ctx):])  # the context's end is kept
    assert zs.encode(tokenizer, "x", ("Paris " * 40,), 16) is None  # no room left for context


def test_grading_rules():
    item = zs.Item("ctx", ("a", "bbbbbbbb"), (0.0, 1.0))
    # summed: a (-2 > -4); per byte: bbbbbbbb (-0.5 > -2); pmi: bbbbbbbb (-4 - -6 > -2 - -1)
    assert zs.grade([item], [[-2.0, -4.0]], [[-1.0, -6.0]]) == {"acc": 0.0, "acc_norm": 1.0, "acc_pmi": 1.0}


def test_heldout_perplexity_is_the_strided_window_recompute(tokenizer):
    from evals import ppl

    model = tiny_model()
    text = " ".join(["To be, or not to be, that is the question."] * 30)
    got = zs.heldout(model, tokenizer, text, window=48)
    ids = tokenizer.encode(text)
    nats, n = 0.0, 0
    for s, e, first in ppl.windows(len(ids), 48, 24):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids[s:e]]))[0].double(), -1)
        for p in range(first, e):
            nats -= float(lp[p - s - 1, ids[p]])
            n += 1
    assert got["scored_tokens"] == n == len(ids) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nats / n), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode()), rel=1e-4)


# ---- the suite ---------------------------------------------------------------------------


def test_evaluate_reports_each_task_with_chance(monkeypatch, tmp_path, tokenizer):
    toy_task(monkeypatch, tmp_path)
    result = zs.evaluate(tiny_model(), tokenizer, limit=2)
    r = result["tasks"]["toy"]
    assert r["items"] == 2 and r["skipped"] == 0 and 0 <= r["acc"] <= 1 and 0 < r["chance"] < 1
    assert set(r) >= {"acc", "acc_norm", "acc_pmi", "chance", "items"} and r["accuracy"] == r["acc"]  # its rule
    assert result["heldout"]["perplexity"] > 1
    flat = zs.scores(result)
    assert flat == {"zs_toy": r["acc"], "zs_heldout_ppl": result["heldout"]["perplexity"],
                    "zs_heldout_bpb": result["heldout"]["bits_per_byte"]}
    fast = zs.evaluate(tiny_model(), tokenizer, limit=2, all_rules=False)["tasks"]["toy"]
    assert "acc_pmi" not in fast and fast["accuracy"] == r["accuracy"]  # the neutral rows only when asked


def test_pmi_rule_tasks_score_the_neutral_context(monkeypatch, tmp_path, tokenizer):
    toy_task(monkeypatch, tmp_path)
    monkeypatch.setitem(zs.TASKS, "toy", zs.Task("toy-data", "bigbench", "acc_pmi", "a test task"))
    model = tiny_model()
    r = zs.evaluate(model, tokenizer, limit=None, with_heldout=False, all_rules=False)["tasks"]["toy"]
    items = zs.load_items("toy")

    def ref(context: str, choice: str) -> float:
        ctx, (c,), _ = zs.encode(tokenizer, context, (choice,), 256)
        return reference_logprob(model, list(ctx), list(c))

    cond = [[ref(it.context, c) for c in it.choices] for it in items]
    base = [[ref(it.neutral, c) for c in it.choices] for it in items]  # "\nA: " then the choice
    assert r["accuracy"] == r["acc_pmi"] == zs.grade(items, cond, base)["acc_pmi"]


def test_unknown_task_names_the_known_ones():
    with pytest.raises(QtError, match="unknown zero-shot task.*'nope'.*known: .*next_line"):
        zs.load_items("nope")
    with pytest.raises(QtError, match="known: "):
        zs.evaluate(tiny_model(), None, tasks=["next_line", "nope"])


def test_cli_unknown_task_is_a_usage_error(capsys):
    from qt_serve.cli import run

    assert run(lambda: eval_main(["zeroshot", "no/such/ckpt", "--tasks", "nope"])) == 2
    assert "unknown zero-shot task" in capsys.readouterr().err


def test_cli_writes_table_json_and_chart(monkeypatch, tmp_path, tiny_ckpt, capsys):
    toy_task(monkeypatch, tmp_path)
    out = tmp_path / "out"
    assert eval_main(["zeroshot", str(tiny_ckpt), "--limit", "0", "--out", str(out)]) == 0
    result = json.loads((out / "zeroshot.json").read_text())
    assert result["tasks"]["toy"]["items"] == 3 and result["model"] == str(tiny_ckpt)
    assert (out / "zeroshot.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "| task | items | chance | accuracy | rule |" in table and "| toy | 3 | 0.444 ± 0.287 |" in table


def test_real_tasks_parse_when_their_data_is_cached():
    """The shipped suite's files, if this machine has fetched them (358 MB; not downloaded by the tests)."""
    missing = [n for n, t in zs.TASKS.items() if not hub.cached_path(hub.DATA[t.data]).exists()]
    if missing:
        pytest.skip(f"data not in the cache for {', '.join(missing)}")
    for name in zs.TASKS:
        items = zs.load_items(name, 50)
        assert len(items) == 50 and all(max(it.scores) > min(it.scores) for it in items), name


# ---- the pretraining hook ------------------------------------------------------------------


def test_pretraining_logs_zero_shot_scores(monkeypatch, tmp_path):
    from test_train import FAST, MODEL, documents

    from train.data import prepare
    from train.pretrain import Settings, pretrain
    from train.progress import read_metrics

    src = tmp_path / "corpus"
    src.mkdir()
    for i, doc in enumerate(documents(12)):
        (src / f"doc{i:02d}.txt").write_text(doc)
    data = prepare([str(src)], tmp_path / "shards", vocab_size=400, seed=0)
    toy_task(monkeypatch, tmp_path)
    run = tmp_path / "run"
    pretrain(Settings(data=str(data), out=str(run), **{**FAST, "max_steps": 10, "zeroshot": 3}), MODEL)
    (val,) = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert 0 <= val["val_zs_toy"] <= 1 and val["val_zs_heldout_ppl"] > 1 and val["val_zs_heldout_bpb"] > 0
    # the same numbers as the library on the same weights (the final step is the best one here)
    from qt_serve.checkpoint import load

    ckpt = load(run / "best")
    again = zs.validation_scores(ckpt.model, ckpt.tokenizer, 3)
    assert again == pytest.approx({k[4:]: v for k, v in val.items() if k.startswith("val_zs_")}, rel=1e-4)
    assert Settings.zeroshot == 0  # off unless asked for


def test_negative_zeroshot_setting_is_refused(tmp_path):
    from test_train import FAST, MODEL

    from train.pretrain import Settings, pretrain

    with pytest.raises(QtError, match="zeroshot must be"):
        pretrain(Settings(data=str(tmp_path / "missing"), out=str(tmp_path / "run"), **FAST, zeroshot=-1), MODEL)
