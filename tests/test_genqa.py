"""qt-eval squad / xsum: the official SQuAD normalization and ROUGE / BLEU on hand-computed cases, the item
draw, tiny-model runs in-process and over HTTP with a too-long item reported, and the BIG-bench sdist
fetched once for both data files."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from evals import genqa
from evals.cli import main as qt_eval
from evals.target import Local, Remote
from qt_serve import hub


@pytest.mark.parametrize("raw,norm", [
    ("The Denver Broncos!", "denver broncos"),
    ("  an apple,  a day ", "apple day"),
    ("Theater of the absurd", "theater of absurd"),  # articles as whole words only
    ("U.S. $5.00 (approx.)", "us 500 approx"),
    ("A", ""),
])
def test_squad_normalization(raw, norm):
    assert genqa.normalize_answer(raw) == norm


def test_exact_match_and_f1_by_hand():
    assert genqa.exact_match("the Broncos.", "Broncos") == 1.0
    # "cat sat on mat" against "cat on mat": 3 shared tokens, precision 3/4, recall 1, F1 6/7
    assert genqa.f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert genqa.f1("dog", "cat") == 0.0 and genqa.f1("", "cat") == 0.0
    overall, each = genqa.squad_scores(["the cat sat on the mat", "Paris"],
                                       [["a cat on a mat", "cat sat on the mat"], ["Lyon", "paris"]])
    assert each == [{"exact_match": 100.0, "f1": 100.0}, {"exact_match": 100.0, "f1": 100.0}]
    overall, each = genqa.squad_scores(["cat sat on mat", "Rome"], [["cat on mat"], ["Paris"]])
    assert overall == pytest.approx({"exact_match": 0.0, "f1": 50 * 6 / 7})


def test_rouge_and_bleu_on_known_pairs():
    overall, each = genqa.xsum_scores(["the cat is on the mat", "running dogs"],
                                      [["the cat sat on the mat"], ["run dog"]])
    # unigrams 5 of 6 both ways; bigrams the-cat, on-the, the-mat: 3 of 5; LCS "the cat on the mat": 5 of 6
    assert each[0] == pytest.approx({"rouge1": 500 / 6, "rouge2": 60.0, "rougeL": 500 / 6})
    assert each[1] == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})  # Porter stemming is on
    assert overall["rouge1"] == pytest.approx((500 / 6 + 100) / 2)
    assert genqa.xsum_scores(["the cat sat on the mat"], [["the cat sat on the mat"]])[0]["bleu"] == pytest.approx(100)


def test_items_are_drawn_by_seed_in_file_order():
    items = [genqa.Item(str(i), "", [], "") for i in range(50)]
    a = genqa.select(items, 10, 0)
    assert a == genqa.select(items, 10, 0) != genqa.select(items, 10, 1)
    assert [int(x.id) for x in a] == sorted(int(x.id) for x in a)
    assert genqa.select(items, 0, 0) == items == genqa.select(items, 80, 0)


LONG = " ".join(["The capital of France is Paris."] * 60)  # far past the tiny model's context


def squad_file(path):
    qas = [{"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": 0}]}
           for i, (q, a) in enumerate([("What is the capital of France?", "Paris"),
                                       ("What is the capital of Japan?", "Tokyo"),
                                       ("Which question is it?", "the question")])]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "Capitals", "paragraphs": [
        {"context": "The capital of France is Paris. The capital of Japan is Tokyo.", "qas": qas[:2]},
        {"context": "To be, or not to be, that is the question.", "qas": qas[2:]},
        {"context": LONG, "qas": [{"id": "long", "question": "Capital?", "answers": [{"text": "Paris"}]}]}]}]}))
    return path


def test_squad_end_to_end_reports_a_too_long_item(ckpt, tmp_path, capsys):
    data = squad_file(tmp_path / "squad.json")
    assert qt_eval(["squad", str(ckpt), "--data", str(data), "--limit", "0", "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "squad.json").read_text())
    assert (r["items"], r["scored"], r["context"], r["max_tokens"]) == (4, 3, 256, 32)
    assert r["too_long"]["count"] == 1 and r["too_long"]["ids"] == ["long"]
    assert "context" in r["too_long"]["first_message"]
    assert [p["id"] for p in r["predictions"]] == ["q0", "q1", "q2"]
    for p in r["predictions"]:  # each score is the metric of the prediction that was kept
        assert p["prediction"] == genqa.first_line(p["reply"])
        assert p["scores"]["f1"] == pytest.approx(100 * max(genqa.f1(p["prediction"], a) for a in p["references"]))
    assert r["scores"]["f1"] == pytest.approx(sum(p["scores"]["f1"] for p in r["predictions"]) / 3)
    md = (tmp_path / "out" / "squad.md").read_text()
    assert "1 item(s) did not fit the context of 256 tokens and are not scored: long" in md
    assert "## q0" in md and "- references: Paris" in md and md in capsys.readouterr().out


def test_xsum_over_http_matches_in_process(server, ckpt, tmp_path):
    rows = [{"id": "a", "document": "The capital of France is Paris.", "summary": "Paris is the capital."},
            {"id": "b", "document": "To be, or not to be, that is the question.", "summary": "A question."},
            {"id": "c", "document": LONG, "summary": "Paris."},
            {"id": "d", "document": "The capital of Japan is Tokyo.", "summary": "Tokyo is the capital."}]
    data = tmp_path / "xsum.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = genqa.read_xsum(data)
    task = genqa.TASKS["xsum"]
    remote = genqa.evaluate(Remote(server.url, "tiny", concurrency=4), task, items, max_tokens=8)
    local = genqa.evaluate(Local.load(str(ckpt), slots=4, max_seq_len=128), task, items, max_tokens=8)
    assert remote["too_long"]["ids"] == local["too_long"]["ids"] == ["c"]
    assert [p["id"] for p in remote["predictions"]] == ["a", "b", "d"]
    assert [p["prediction"] for p in remote["predictions"]] == [p["prediction"] for p in local["predictions"]]
    assert remote["scores"] == pytest.approx(local["scores"])
    assert set(remote["scores"]) == {"rouge1", "rouge2", "rougeL", "bleu"}


def test_bigbench_sdist_fetched_once_for_both_files(tmp_path, monkeypatch):
    monkeypatch.setenv("QT_HOME", str(tmp_path / "home"))
    members = {hub.DATA["squad-dev"].member: b'{"data": []}', hub.DATA["xsum-test"].member: b'{"examples": []}'}
    calls = []

    def fake_download(requirement, dest, sdist=False, hint=""):  # the sdist as pip would leave it
        calls.append((requirement, sdist))
        archive = dest / "bigbench-1.0.0.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for name, data in {**members, "bigbench-1.0.0/setup.py": b""}.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return archive

    monkeypatch.setattr(hub, "pip_download", fake_download)
    squad = hub.fetch_file("squad-dev")
    assert calls == [("bigbench==1.0.0", True)]
    assert hub.fetch_file("xsum-test").read_bytes() == b'{"examples": []}' and squad.read_bytes() == b'{"data": []}'
    assert calls == [("bigbench==1.0.0", True)]  # the second file came with the first download
    assert squad == tmp_path / "home" / "files" / hub.DATA["squad-dev"].member
    assert [p.name for p in (tmp_path / "home" / "files").iterdir()] == ["bigbench-1.0.0"]  # no leftovers
