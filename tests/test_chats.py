"""train/chats.py: each chat format read from files the tests write (JSONL, JSON, Parquet) against conversations
written out by hand, OASST trees flattened to threads, every kind of bad row counted, the errors, the weighted
mix, and SQuAD / XSum less the items (and passages) qt-eval scores."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evals import cli as eval_cli
from evals import genqa
from qt_serve.errors import QtError
from train.chats import HOLDOUT, HOLDOUT_SEED, Source, builtin_chats, mix, parse_sources, read_chats


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def sys_(t):
    return {"role": "system", "content": t}


def user(t):
    return {"role": "user", "content": t}


def bot(t):
    return {"role": "assistant", "content": t}


# ---- the formats -------------------------------------------------------------------------------------

MESSAGES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Hello"},
                                                    {"type": "image_url", "image_url": {"url": "x"}},
                                                    {"type": "text", "text": " there."}]}]},
    {"messages": [{"role": "developer", "content": ""}, {"role": "user", "content": "  2+2?\n"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "6"}, {"role": "user", "content": "Thanks"}]},
]
MESSAGES_CHATS = [
    [sys_("Be brief."), user("Hi"), bot("Hello there.")],
    [user("2+2?"), bot("4"), user("And 3+3?"), bot("6")],  # empty system and trailing user turn dropped
]


def test_messages_jsonl(tmp_path):
    chats, skipped = read_chats(jsonl(tmp_path / "c.jsonl", MESSAGES))
    assert chats == MESSAGES_CHATS and not skipped and str(skipped) == "none"


def test_messages_parquet(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Name a colour"},
                          {"role": "assistant", "content": "Red"}]}]
    chats, _ = read_chats(parquet(tmp_path / "c.parquet", rows))
    assert chats == [[user("Hi"), bot("Hello.")], [sys_("Terse."), user("Name a colour"), bot("Red")]]


def test_alpaca_and_dolly(tmp_path):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
            {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "You translate French."},
            {"instruction": "Who wrote it?", "context": "Hamlet is a play.", "response": "Shakespeare.",
             "category": "closed_qa"}]
    chats, _ = read_chats(jsonl(tmp_path / "a.jsonl", rows))
    assert chats == [[user("Name a colour."), bot("Red.")],
                     [sys_("You translate French."), user("Translate.\n\nchat"), bot("cat")],
                     [user("Who wrote it?\n\nHamlet is a play."), bot("Shakespeare.")]]


def test_alpaca_parquet_with_missing_fields_as_nulls(tmp_path):
    rows = [{"instruction": "Add.", "input": "1 1", "output": "2"}, {"instruction": "Say hi.", "output": "Hi."}]
    chats, _ = read_chats(parquet(tmp_path / "a.parquet", rows))  # Parquet gives the second row input=None
    assert chats == [[user("Add.\n\n1 1"), bot("2")], [user("Say hi."), bot("Hi.")]]


def test_sharegpt(tmp_path):
    rows = [{"id": "x", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello"}, {"from": "user", "value": "Bye"},
                                          {"from": "chatgpt", "value": "Bye!"}]},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "bard", "value": "A"}]}]
    chats, _ = read_chats(jsonl(tmp_path / "s.jsonl", rows))
    assert chats == [[sys_("Be kind."), user("Hi"), bot("Hello"), user("Bye"), bot("Bye!")], [user("Q"), bot("A")]]


def test_completion_and_a_json_array(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"prompt": "Two plus two is", "completion": " four."},
                                {"prompt": "Sky?", "completion": "Blue"}], indent=1))
    chats, _ = read_chats(path)
    assert chats == [[user("Two plus two is"), bot("four.")], [user("Sky?"), bot("Blue")]]


# r1 (prompter)
# ├── a1 ── p2 ── a2          thread r1 a1 p2 a2
# │    └── p3                  unanswered: a1 is not a thread of its own (a2 lies below it)
# ├── a3                       thread r1 a3
# └── a4 (deleted) ── p5 ── a5 left out with its subtree
# r2 (prompter, no reply)
# o1 (parent not in the file)
OASST = [("r1", None, "prompter", "What is 2+2?", False), ("a1", "r1", "assistant", "4.", False),
         ("p2", "a1", "prompter", "And 3+3?", False), ("a2", "p2", "assistant", "6.", False),
         ("p3", "a1", "prompter", "Why?", False), ("a3", "r1", "assistant", "Four.", False),
         ("a4", "r1", "assistant", "5.", True), ("p5", "a4", "prompter", "Sure?", False),
         ("a5", "p5", "assistant", "No.", False), ("r2", None, "prompter", "Hello?", False),
         ("o1", "gone", "assistant", "Lost.", False)]
OASST_THREADS = [[user("What is 2+2?"), bot("4."), user("And 3+3?"), bot("6.")],
                 [user("What is 2+2?"), bot("Four.")]]
OASST_SKIPPED = {"with no assistant reply": 2, "deleted": 1, "below a message left out": 2,
                 "whose parent is not in the file": 1}


@pytest.mark.parametrize("write", [jsonl, parquet])
def test_oasst_messages_to_threads(tmp_path, write):
    rows = [{"message_id": m, "parent_id": p, "role": r, "text": t, "lang": "en", "deleted": d, "rank": 0}
            for m, p, r, t, d in OASST]
    chats, skipped = read_chats(write(tmp_path / f"o.{write.__name__}", rows))
    assert chats == OASST_THREADS and skipped == OASST_SKIPPED


def test_oasst_tree_export(tmp_path):
    def tree(m):
        _, _, role, text, deleted = next(x for x in OASST if x[0] == m)
        return {"message_id": m, "role": role, "text": text, "deleted": deleted,
                "replies": [tree(x[0]) for x in OASST if x[1] == m]}

    chats, skipped = read_chats(jsonl(tmp_path / "trees.jsonl", [{"message_tree_id": "r1", "prompt": tree("r1")},
                                                                  {"message_tree_id": "r2", "prompt": tree("r2")}]))
    assert chats == OASST_THREADS
    assert skipped == {"with no assistant reply": 2, "deleted": 1, "below a message left out": 2}


# ---- bad rows and errors -----------------------------------------------------------------------------


def test_bad_rows_counted_by_reason(tmp_path):
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}

    def msgs(*turns):
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    path = jsonl(tmp_path / "bad.jsonl", [
        ok,
        "{not json",                                                   # line 2
        "[1, 2]",                                                      # 3
        {"text": "no messages"},                                       # 4
        msgs(("user", "Hi"), ("bot", "Hello")),                        # 5
        msgs(("user", "Hi"), ("assistant", "  ")),                     # 6
        msgs(("user", "Hi")),                                          # 7
        msgs(("user", "Hi"), ("user", "Hey"), ("assistant", "Yo")),    # 8
        msgs(("assistant", "Hello"), ("user", "Hi")),                  # 9
        msgs(("user", "Hi"), ("system", "Late"), ("assistant", "Yo")),  # 10
        {"messages": "Hi"},                                            # 11
        {"messages": [{"role": "user"}]},                              # 12
        msgs(("user", "Hi"), ("assistant", 7)),                        # 13
        msgs(("user", "A"), ("assistant", "B"), ("tool", "C")),        # 14
        "",
        ok,
    ])
    chats, skipped = read_chats(path)
    assert chats == [[user("Hi"), bot("Hello")]] * 2
    assert skipped == {"not JSON": 1, "not an object": 1, "missing 'messages'": 1, "with unknown role 'bot'": 1,
                       "with empty content": 1, "with no assistant turn": 1, "with consecutive user turns": 1,
                       "starting with an assistant turn": 1, "with a system turn after the start": 1,
                       "with 'messages' not a list": 1, "with a turn missing 'content'": 1,
                       "with a content that is not a string": 1, "with unknown role 'tool'": 1}
    assert "1 with unknown role 'bot' (bad.jsonl:5)" in str(skipped) and "1 not JSON (bad.jsonl:2)" in str(skipped)


def test_places_shown_are_the_first_three(tmp_path):
    rows = [{"prompt": "Q", "completion": ""}] * 5 + [{"prompt": "Q", "completion": "A"}]
    _, skipped = read_chats(jsonl(tmp_path / "c.jsonl", rows))
    assert str(skipped) == "5 with empty content (c.jsonl:1, c.jsonl:2, c.jsonl:3, ...)"


def test_other_formats_bad_rows(tmp_path):
    _, a = read_chats(jsonl(tmp_path / "a.jsonl", [{"instruction": "I", "output": "O"}, {"instruction": "I"},
                                                    {"instruction": "", "output": "O"}, {"output": "O"}]))
    assert a == {"missing 'output' or 'response'": 1, "with empty content": 1, "missing 'instruction'": 1}
    _, s = read_chats(jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "bing", "value": "A"}, {"from": "gpt",
                                                                                           "value": "B"}]},
        {"conversations": ["Q", "A"]}]))
    assert s == {"with consecutive assistant turns": 1, "with a turn that is not an object": 1}
    chats, o = read_chats(jsonl(tmp_path / "o.jsonl", [
        {"message_id": "r", "parent_id": None, "role": "prompter", "text": "Q"},
        {"message_id": "a", "parent_id": "r", "role": "assistant", "text": "A"},
        {"message_id": "b", "parent_id": "r", "role": "robot", "text": "B"},
        {"message_id": "c", "parent_id": "b", "role": "prompter", "text": "C"},
        {"message_id": "a", "parent_id": "r", "role": "assistant", "text": "again"},
        {"message_id": "p", "parent_id": "a", "role": "prompter", "text": "P"},
        {"message_id": "q", "parent_id": "p", "role": "prompter", "text": "Q2"},
        {"message_id": "z", "parent_id": "q", "role": "assistant", "text": "Z"}]))
    _, t = read_chats(jsonl(tmp_path / "t.jsonl", [{"prompt": {"role": "prompter", "text": "Q", "replies": [
        "A", {"role": "assistant", "text": "A", "replies": {"role": "prompter"}}]}}]))
    assert t == {"with a reply that is not an object": 1, "with 'replies' not a list": 1}
    # q breaks the alternation: it goes with z below it, and r a p is cut after a (p has no reply now)
    assert chats == [[user("Q"), bot("A")]]
    assert o == {"with unknown role 'robot'": 1, "below a message left out": 2, "with a message_id seen before": 1,
                 "with consecutive user turns": 1, "with no assistant reply": 1}


def test_a_file_with_no_usable_row(tmp_path):
    path = jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]},
                                           {"messages": [{"role": "bot", "content": "Hi"}]}, "oops"])
    with pytest.raises(QtError) as e:
        read_chats(path)
    msg = str(e.value)
    assert str(path) in msg and "no usable conversation in its 3 rows" in msg and "format messages (detected)" in msg
    assert "1 with no assistant turn" in msg and "1 with unknown role 'bot'" in msg and "1 not JSON" in msg
    for fields in ('"messages"', '"instruction"', '"output"', '"response"', '"conversations"', '"from"',
                   '"message_id"', '"parent_id"', '"replies"', '"completion"'):
        assert fields in msg
    with pytest.raises(QtError, match="no row has the fields of any format; left out: 2 with the fields of no"):
        read_chats(jsonl(tmp_path / "odd.jsonl", [{"question": "Q", "answer": "A"}] * 2))
    with pytest.raises(QtError, match=r"format alpaca \(given\); left out: 2 missing 'instruction'"):
        read_chats(jsonl(tmp_path / "c.jsonl", MESSAGES), fmt="alpaca")
    with pytest.raises(QtError, match="no usable conversation in its 0 rows"):
        read_chats(jsonl(tmp_path / "empty.jsonl", []))


def test_missing_paths_and_directories(tmp_path):
    with pytest.raises(QtError, match="nowhere.jsonl: no such file or directory"):
        read_chats(tmp_path / "nowhere.jsonl")
    with pytest.raises(QtError, match="unknown chat format 'chatml'"):
        read_chats(tmp_path, fmt="chatml")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(QtError, match="holds no .jsonl, .json, .parquet files"):
        read_chats(tmp_path)
    with pytest.raises(QtError, match="JSON lines"):
        read_chats(tmp_path / "notes.txt")
    jsonl(tmp_path / "b.jsonl", [{"prompt": "B", "completion": "b"}, {"prompt": "B"}])
    parquet(tmp_path / "a.parquet", [{"instruction": "A", "output": "a"}, {"instruction": "A", "output": " "}])
    jsonl(tmp_path / ".hidden.jsonl", [{"prompt": "H", "completion": "h"}])
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub" / "c.jsonl", [{"prompt": "C", "completion": "c"}])
    chats, skipped = read_chats(tmp_path)  # sorted, each file its own format, no hidden files, no subdirectories
    assert chats == [[user("A"), bot("a")], [user("B"), bot("b")]]
    assert str(skipped) == "1 with empty content (a.parquet row 2), 1 missing 'completion' (b.jsonl:2)"


# ---- sources and the mix -----------------------------------------------------------------------------


def test_parse_sources(tmp_path):
    assert parse_sources("chats.jsonl=2, xsum=1,squad,squad:my.json=0.5,data/dir") == [
        Source("chats.jsonl", "chats.jsonl", 2.0), Source("xsum", "xsum", 1.0), Source("squad", "squad", 1.0),
        Source("squad", "squad:my.json", 0.5), Source("dir", "data/dir", 1.0)]
    odd = tmp_path / "split=train.jsonl"  # an existing path keeps its "="
    odd.touch()
    assert parse_sources(str(odd)) == [Source(odd.name, str(odd), 1.0)]


@pytest.mark.parametrize("text,match", [
    ("xsum=", "source 'xsum': weight '' is not allowed; a weight is a positive number"),
    ("chats.jsonl=0", "source 'chats.jsonl': weight '0' is not allowed"),
    ("xsum=1,squad=-2", "source 'squad': weight '-2' is not allowed"),
    ("squad=lots", "weight 'lots' is not allowed"),
    ("squad=nan", "weight 'nan'"),
    ("squad=inf", "weight 'inf'"),
    ("xsum,,squad", "an empty source"),
    ("", "an empty source"),
    ("=2", "an empty source"),
    ("xsum,xsum=2", "'xsum' is listed twice"),
])
def test_parse_sources_errors(text, match):
    with pytest.raises(QtError, match=match):
        parse_sources(text)


def pool(path, tag, n):
    return jsonl(path, [{"prompt": f"{tag}{i}", "completion": "ok"} for i in range(n)])


def tags(chats):
    return Counter(c[0]["content"][0] for c in chats)


def test_mix_no_repeats_by_default(tmp_path):
    a, b = pool(tmp_path / "a.jsonl", "a", 10), pool(tmp_path / "b.jsonl", "b", 4)
    chats, rec = mix([Source("a.jsonl", str(a), 1), Source("b.jsonl", str(b), 1)])
    # b runs out first: 4 of b once, 4 of a at the 1:1 ratio
    assert tags(chats) == {"a": 4, "b": 4} and rec["total"] == 8 and rec["seed"] == 0
    assert max(Counter(c[0]["content"] for c in chats).values()) == 1  # nothing repeated
    assert rec["sources"] == [
        {"name": "a.jsonl", "spec": str(a), "weight": 1, "rows": 10, "used": 4, "passes": 1, "skipped": {}},
        {"name": "b.jsonl", "spec": str(b), "weight": 1, "rows": 4, "used": 4, "passes": 1, "skipped": {}}]
    assert rec["dropped_heldout"] == {}
    one, rec = mix([Source("a.jsonl", str(a), 3)])  # one source: all of it once, in a seeded order
    assert sorted(c[0]["content"] for c in one) == sorted(f"a{i}" for i in range(10)) and rec["total"] == 10


def test_mix_proportions_cycling_and_seeds(tmp_path):
    a, b = pool(tmp_path / "a.jsonl", "a", 10), pool(tmp_path / "b.jsonl", "b", 4)
    src = parse_sources(f"{a}=3,{b}")
    chats, rec = mix(src, total=20, seed=1)
    assert tags(chats) == {"a": 15, "b": 5}
    assert [(s["used"], s["passes"]) for s in rec["sources"]] == [(15, 2), (5, 2)]
    per = Counter(c[0]["content"] for c in chats)
    assert {per[f"b{i}"] for i in range(4)} <= {1, 2} and sum(per[f"b{i}"] for i in range(4)) == 5  # cycled
    assert {per[f"a{i}"] for i in range(10)} <= {1, 2} and len([i for i in range(10) if per[f"a{i}"]]) == 10
    assert mix(src, total=20, seed=1)[0] == chats
    assert mix(src, total=20, seed=2)[0] != chats
    c = pool(tmp_path / "c.jsonl", "c", 9)
    chats, rec = mix(parse_sources(f"{a},{b},{c}"), total=10)  # 10/3 each: the spare one to the first
    assert tags(chats) == {"a": 4, "b": 3, "c": 3} and rec["total"] == 10


def test_mix_errors(tmp_path):
    a = pool(tmp_path / "a.jsonl", "a", 3)
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "completion": ""}])
    with pytest.raises(QtError, match="bad.jsonl: no usable conversation"):
        mix(parse_sources(f"{a},{bad}"))
    with pytest.raises(QtError, match="missing.jsonl: no such file"):
        mix(parse_sources(f"{a},{tmp_path / 'missing.jsonl'}"))
    with pytest.raises(QtError, match="total must be 0"):
        mix(parse_sources(str(a)), total=-1)


# ---- SQuAD and XSum ----------------------------------------------------------------------------------


def squad_file(path):
    """SQuAD v1.1's official format: 6 passages of 1-3 questions (12 items), one with a second reference."""
    paragraphs = []
    for p in range(6):
        qas = [{"id": f"p{p}q{q}", "question": f"Question {q} on passage {p}?",
                "answers": [{"text": f"answer {p}.{q}", "answer_start": 0}, {"text": "other", "answer_start": 0}]}
               for q in range(1 + p % 3)]
        paragraphs.append({"context": f" Passage number {p} says something. ", "qas": qas})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "First_doc", "paragraphs": paragraphs[:3]},
                                                           {"title": "Second", "paragraphs": paragraphs[3:]}]}))
    return path


def test_holdout_matches_qt_eval_defaults():
    ap = argparse.ArgumentParser()
    eval_cli.add_genqa(ap.add_subparsers(dest="command"))
    for task in ("squad", "xsum"):
        args = ap.parse_args([task])
        assert (args.limit, args.seed) == (HOLDOUT, HOLDOUT_SEED)


def test_squad_without_the_held_out_passages(tmp_path):
    path = squad_file(tmp_path / "squad.json")
    items = genqa.read_squad(path)
    held = genqa.select(items, 3, 0)  # what `qt-eval squad --data squad.json --limit 3` scores
    chats, skipped, dropped = builtin_chats("squad", holdout=3, seed=0, path=path)
    held_passages = {it.id.split("q")[0] for it in held}
    left = [it for it in items if it.id.split("q")[0] not in held_passages]
    assert chats == [[user(it.prompt), bot(it.refs[0])] for it in left] and not skipped
    assert dropped == {"data": str(path), "items": 12, "limit": 3, "seed": 0, "heldout": 3,
                       "same_passage": 12 - len(left) - 3}
    text = json.dumps(chats)
    for p in held_passages:
        assert f"Passage number {p[1:]} says" not in text
    assert chats[0][0]["content"].startswith("Answer the question with a short phrase copied from the passage.")
    with pytest.raises(QtError, match="nothing left to train on"):
        builtin_chats("squad", path=path)  # the default 200 items are all 12
    with pytest.raises(QtError, match="nothing left to train on"):
        builtin_chats("squad", holdout=0, path=path)  # --limit 0 scores every item


def test_xsum_without_the_held_out_items(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": [{"input": f"Article {i}.", "target": f"Summary {i}.",
                                              "comment": f"xsum-test-{i}"} for i in range(10)]}))
    held = {it.id for it in genqa.select(genqa.read_xsum(path), 4, 0)}
    chats, _, dropped = builtin_chats("xsum", holdout=4, path=path)
    kept = [i for i in range(10) if f"xsum-test-{i}" not in held]
    assert chats == [[user(f"Summarize the following article in one sentence.\n\nArticle: Article {i}."),
                      bot(f"Summary {i}.")] for i in kept]
    assert (dropped["heldout"], dropped["same_passage"]) == (4, 0)
    # JSONL with one article twice: the copy of a held-out article goes too
    rows = [{"id": f"d{i}", "document": f"Doc {i % 5}", "summary": f"S {i}"} for i in range(10)]
    path = jsonl(tmp_path / "x.jsonl", rows)
    held = genqa.select(genqa.read_xsum(path), 2, 0)
    docs = {it.shown for it in held}
    chats, _, dropped = builtin_chats("xsum", holdout=2, path=path)
    assert all(c[0]["content"].split("Article: ")[1] not in docs for c in chats)
    assert len(chats) == 10 - 2 * len(docs) and dropped["same_passage"] == 2 * len(docs) - 2


def test_mix_with_builtin_sources(tmp_path):
    squad = squad_file(tmp_path / "squad.json")
    a = pool(tmp_path / "a.jsonl", "a", 2)
    chats, rec = mix(parse_sources(f"squad:{squad}=2,{a}"), holdout=3)
    want, _, dropped = builtin_chats("squad", holdout=3, path=squad)
    assert rec["dropped_heldout"] == {f"squad:{squad}": dropped} and json.loads(json.dumps(rec)) == rec
    assert rec["sources"][0]["name"] == "squad" and rec["sources"][0]["rows"] == len(want)
    assert tags(chats)["a"] == 2 and len(chats) == rec["total"] == 6  # a: 2 rows at weight 1 of 3
    assert all(c in want for c in chats if c[0]["content"][0] != "a")
