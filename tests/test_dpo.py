"""DPO's pure parts (loss and log-probs against hand-worked numbers and a loop), the pairs file reader on every
form and skip reason, and pairs from arena votes and from AlpacaEval (a tiny local model, no download)."""

import json
import math
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.votes import VoteStore
from evals.alpaca import load_baseline
from evals.target import Local, TooLong
from qt_serve.errors import QtError
from train import dpo
from train.cli import main as qt_train
from train.dpo import Encoded, Pair
from train.sft import render


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=True)


def test_dpo_loss_by_hand():
    # log π(chosen) -10 vs ref -12, log π(rejected) -15 vs ref -14, β 0.5:
    # rewards 0.5·2 = 1 and 0.5·(-1) = -0.5; z = 1.5; loss = log(1 + e^-1.5) = 0.2014132780 (math.log1p by hand)
    # second pair: policy = reference, loss log 2 = 0.6931471806, rewards 0.
    pc, pr, rc, rr = t(-10.0, -7.0), t(-15.0, -9.0), t(-12.0, -7.0), t(-14.0, -9.0)
    loss, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx((0.2014132780 + 0.6931471806) / 2, abs=1e-9)
    assert cr.tolist() == [1.0, 0.0] and rj.tolist() == [-0.5, 0.0] and not cr.requires_grad
    loss.backward()
    # d/dπ_c -log σ(βz) = -β σ(-βz) = -0.5 · 0.1824255238 (σ(-1.5)), and -0.5 · 0.5 at z = 0; over the mean of 2
    assert pc.grad.tolist() == pytest.approx([-0.0912127619 / 2, -0.125], abs=1e-9)
    assert pr.grad.tolist() == pytest.approx([0.0912127619 / 2, 0.125], abs=1e-9)
    assert rc.grad.tolist() == pytest.approx([0.0912127619 / 2, 0.125], abs=1e-9)


def test_label_smoothing_by_hand():
    # ε 0.1 at βz = 1.5: 0.9 · log(1 + e^-1.5) + 0.1 · log(1 + e^1.5) = 0.9 · 0.2014132780 + 0.1 · 1.7014132780
    loss, _, _ = dpo.dpo_loss(t(-10.0), t(-15.0), t(-12.0), t(-14.0), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.3514132780, abs=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_match_a_loop(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.6
    mask[2] = False  # a row with nothing masked sums to 0
    got = dpo.sequence_logps(logits, targets, mask)
    for b in range(3):
        ref = 0.0
        for s in range(7):
            if mask[b, s]:
                row = [float(x) for x in logits[b, s]]
                ref += row[targets[b, s]] - math.log(sum(math.exp(x) for x in row))
        assert got[b].item() == pytest.approx(ref, abs=1e-4)
    assert got.dtype == torch.float32 and got[2].item() == 0.0


def test_preference_metrics():
    m = dpo.preference_metrics(torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 2.0, -3.0]))
    # chosen above rejected in pairs 1 and 4 (pair 3 is a tie: not a win); margins 1, -1, 0, 2
    assert m == {"reward_accuracy": 0.5, "reward_margin": 0.5, "reward_chosen": 0.5, "reward_rejected": 0.0}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}


def test_read_pairs_every_form_and_skip_reason(tmp_path):
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},  # plain
        {"prompt": [{"role": "system", "content": "Be brief."}, U], "chosen": "Hey.", "rejected": "Go away.",
         "id": 42},  # prompt as messages, own id
        {"chosen": [U, A, {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Hello again!"}],
         "rejected": [U, A, {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "No."}]},  # HH
        {"prompt": "Hi", "chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "Bye."}]},  # UltraFeedback
        "",  # blank: neither a pair nor a skip
        "{not json",
        "[1, 2]",
        {"prompt": "x", "chosen": "a"},
        {"chosen": "a", "rejected": "b"},
        {"prompt": [U, A], "chosen": "a", "rejected": "b"},
        {"prompt": [U, {"role": "assistant"}], "chosen": "a", "rejected": "b"},
        {"prompt": "x", "chosen": [U], "rejected": "b"},
        {"chosen": [U, A], "rejected": [{"role": "user", "content": "Other"}, A]},
        {"prompt": "x", "chosen": " \n", "rejected": "b"},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
    ]
    pairs, skipped = dpo.read_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pairs == [
        Pair([{"role": "user", "content": "Name a colour."}], "Blue.", "Seven.", "p.jsonl:1"),
        Pair([{"role": "system", "content": "Be brief."}, U], "Hey.", "Go away.", "42"),
        Pair([U, A, {"role": "user", "content": "Again?"}], "Hello again!", "No.", "p.jsonl:3"),
        Pair([U], "Hello!", "Bye.", "p.jsonl:4")]
    assert skipped == Counter({dpo.BAD_JSON: 2, dpo.MISSING: 2, dpo.NOT_USER: 1, dpo.MALFORMED: 2,
                               dpo.DIFFERENT: 1, dpo.EMPTY: 1, dpo.SAME: 1})


def test_read_pairs_parquet(tmp_path):
    conv = [{"prompt": "Hi", "chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "Bye."}]},
            {"prompt": "Hi", "chosen": [U, A], "rejected": [U, A]}]
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "p.parquet")
    pairs, skipped = dpo.read_pairs(tmp_path / "p.parquet")
    assert pairs == [Pair([U], "Hello!", "Bye.", "p.parquet:1")] and skipped == Counter({dpo.SAME: 1})


def test_no_usable_pair_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "{oops", {"text": "hello"}])
    with pytest.raises(QtError, match=r"bad.jsonl holds no usable.*'prompt'.*'chosen'.*'rejected'.*"
                                      r"2 bad JSON, 1 missing prompt, chosen or rejected"):
        dpo.read_pairs(path)


def reply_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True).strip()


def test_encode_pair_masks_the_final_reply_only(tokenizer):
    pair = Pair([U, A, {"role": "user", "content": "Again?"}], "Hello again!", "No.", "x")
    e = dpo.encode_pair(tokenizer, pair, 256)
    full = render(tokenizer, pair.prompt + [{"role": "assistant", "content": "Hello again!"}])
    assert e.chosen_ids == full[0] and sum(full[1]) > sum(e.chosen_mask)  # the earlier "Hello!" is unmasked
    assert reply_text(tokenizer, e.chosen_ids, e.chosen_mask) == "Hello again!"
    assert reply_text(tokenizer, e.rejected_ids, e.rejected_mask) == "No."
    long = Pair([U], "Hello! " * 50, "No.", "y")
    kept, skipped = dpo.encode_pairs(tokenizer, [pair, long], len(e.chosen_ids))
    assert [k.id for k in kept] == ["x"] and skipped == Counter({f"longer than {len(e.chosen_ids)} tokens": 1})


def test_collate_shifts_and_pads():
    e = [Encoded([1, 2, 3], [False, True, True], [1, 4], [False, True], "a"),
         Encoded([5, 6], [False, True], [5, 7, 8, 9], [False, False, True, True], "b")]
    inputs, targets, mask = dpo.collate(e, pad_id=0)
    # rows: chosen a, chosen b, rejected a, rejected b; padded to 4 tokens, then shifted by one
    assert inputs.tolist() == [[1, 2, 3], [5, 6, 0], [1, 4, 0], [5, 7, 8]]
    assert targets.tolist() == [[2, 3, 0], [6, 0, 0], [4, 0, 0], [7, 8, 9]]
    assert mask.tolist() == [[True, True, False], [True, False, False], [True, False, False],
                             [False, True, True]]


def vote(i, winner, a="ra", b="rb"):
    return {"id": f"c{i}", "session": "s", "prompt": f"p{i}", "model_a": "x", "model_b": "y", "reply_a": a,
            "reply_b": b, "winner": winner, "settings": {"temperature": 0.7}}


@pytest.fixture
def votes_db(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    for v in [vote(1, "a"), vote(2, "b"), vote(3, "tie"), vote(4, "bad"), vote(5, "a", "same", "same"),
              vote(6, "b", "", "rb")]:
        store.add(v)
    return store.path


def test_export_pairs_from_arena_votes(votes_db, tmp_path):
    out = tmp_path / "pairs" / "arena.jsonl"
    counts = dpo.export_pairs(votes_db, out)
    assert counts == {"votes": 6, "pairs": 2,
                      "left_out": {"tie": 1, "both bad": 1, dpo.SAME: 1, dpo.EMPTY: 1}}
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        {"id": "c1", "prompt": "p1", "chosen": "ra", "rejected": "rb", "chosen_model": "x", "rejected_model": "y"},
        {"id": "c2", "prompt": "p2", "chosen": "rb", "rejected": "ra", "chosen_model": "y", "rejected_model": "x"}]
    pairs, skipped = dpo.read_pairs(out)  # what is written reads back whole
    assert [p.id for p in pairs] == ["c1", "c2"] and not skipped
    assert [p.name for p in out.parent.iterdir()] == ["arena.jsonl"]  # no temp file left


def test_export_refuses_a_missing_db_or_no_pairs(tmp_path):
    with pytest.raises(QtError, match="no such vote database"):
        dpo.export_pairs(tmp_path / "nope.sqlite", tmp_path / "o.jsonl")
    assert not (tmp_path / "nope.sqlite").exists()
    store = VoteStore(tmp_path / "ties.sqlite")
    store.add(vote(1, "tie"))
    with pytest.raises(QtError, match=r"no preference pair in 1 vote.*1 tie"):
        dpo.export_pairs(store.path, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


ITEMS = [{"instruction": "Name a capital city.", "output": "Paris is the capital of France."},
         {"instruction": "To be, or not to be?", "output": "That is the question."},
         {"instruction": "Count to three.", "output": "1, 2, 3"},
         {"instruction": "Say hello.", "output": "Hello!"},
         {"instruction": "The slings and arrows. " * 40, "output": "Of outrageous fortune."},  # > 128 tokens
         {"instruction": "Name a city in Japan.", "output": "Tokyo."},
         {"instruction": "Spell café.", "output": "c-a-f-é"}]


@pytest.fixture(scope="module")
def local(ckpt):
    return Local.load(str(ckpt), slots=4, max_seq_len=128)


def test_alpaca_pairs_with_a_holdout(local, tmp_path):
    against = tmp_path / "against.json"
    against.write_text(json.dumps(ITEMS))
    out = tmp_path / "alpaca.jsonl"
    counts = dpo.alpaca_pairs(local, out, seed=0, max_tokens=6, holdout=2, against=str(against))
    held = load_baseline(counts["heldout_file"])  # what `qt-eval alpaca --against` reads
    held_ids = [h["id"] for h in json.loads((tmp_path / "alpaca.heldout.json").read_text())]
    assert len(held) == 2 and counts["heldout"] == 2 and counts["answered"] == 5

    train = [i for i in range(7) if f"alpaca-{i}" not in held_ids]
    replies = dict(local.chat([[{"role": "user", "content": ITEMS[i]["instruction"]}] for i in train], 6))
    expect = [{"id": f"alpaca-{i}", "prompt": ITEMS[i]["instruction"], "chosen": ITEMS[i]["output"],
               "rejected": replies[j], "chosen_model": str(against), "rejected_model": local.name}
              for j, i in enumerate(train)
              if not isinstance(replies[j], TooLong) and replies[j].strip() and replies[j] != ITEMS[i]["output"]]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == expect and counts["pairs"] == len(rows) >= 3
    assert 4 in train and counts["left_out"]["prompt too long for the model"] == 1  # seed 0 keeps it in
    assert counts["pairs"] + sum(counts["left_out"].values()) == 5
    assert not {r["prompt"] for r in rows} & {h["instruction"] for h in held}

    # the held-out draw depends on the seed only, not on --limit
    again = dpo.alpaca_pairs(local, tmp_path / "b.jsonl", limit=2, seed=0, max_tokens=6, holdout=2,
                             against=str(against))
    assert again["answered"] == 2 and load_baseline(again["heldout_file"]) == held
    with pytest.raises(QtError, match="--holdout"):
        dpo.alpaca_pairs(local, tmp_path / "c.jsonl", holdout=7, against=str(against))


def test_cli_pairs(votes_db, ckpt, tmp_path, capsys):
    out = tmp_path / "v.jsonl"
    assert qt_train(["pairs", "--votes", str(votes_db), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "2 pairs from 6 votes" in said and "1 tie" in said and out.exists()

    against = tmp_path / "against.json"
    against.write_text(json.dumps(ITEMS[:4]))
    out = tmp_path / "a.jsonl"
    assert qt_train(["pairs", "--alpaca", str(ckpt), "--against", str(against), "--limit", "2", "--holdout", "1",
                     "--max-tokens", "4", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "from 2 instructions" in said and "1 held out in" in said and (tmp_path / "a.heldout.json").exists()

    assert qt_train(["pairs", "--votes", str(votes_db), "--holdout", "3", "--out", str(out)]) == 2
    assert "--holdout go with --alpaca" in capsys.readouterr().err
    assert qt_train(["pairs", "--votes", str(tmp_path / "none.sqlite"), "--out", str(out)]) == 2
    assert "no such vote database" in capsys.readouterr().err
