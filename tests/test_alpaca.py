"""`qt-eval alpaca`: answers and verdicts through real OpenAI-compatible servers (a tiny qt-serve as the model
and as the judge), win rates checked against independent computations."""

import json
import math

import numpy as np
import pytest
from conftest import start_app, tiny_model

from evals import alpaca
from evals.cli import main as qt_eval
from qt_serve.checkpoint import save_checkpoint

ITEMS = [{"instruction": "Name a capital city.", "output": "Paris is the capital of France."},
         {"instruction": "To be, or not to be?", "output": "That is the question."},
         {"instruction": "Count to three.", "output": "1, 2, 3"},
         {"instruction": "Say hello.", "output": "Hello!"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=2048)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("a") / "tiny", model, tokenizer)
    server, gens = start_app(ckpt, ("tiny",), ctx=2048, max_batch=4)
    yield server
    server.stop()
    for g in gens.values():
        g.engine.shutdown(True, 5)


def run(srv, tmp_path, *extra):
    against = tmp_path / "against.json"
    against.write_text(json.dumps(ITEMS))
    out = tmp_path / "out"
    code = qt_eval(["alpaca", "--url", srv.url + "/v1", "--model-name", "tiny", "--against", str(against),
                    "--judge-url", srv.url + "/v1", "--judge-model", "tiny", "--max-tokens", "12",
                    "--temperature", "0", "--out", str(out), *extra])
    assert code == 0
    rows = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    return json.loads((out / "RESULTS.json").read_text()), rows, out


def test_head_to_head_with_a_constrained_judge(srv, tmp_path):
    result, rows, out = run(srv, tmp_path)
    s = result["scores"]
    assert s["judged"] == 4 and s["unparsable"] == 0  # response_format makes every verdict readable
    for r in rows:  # the winner follows from what the judge said and where the model's answer stood
        said = json.loads(r["judge_said"])["better"]
        assert r["winner"] == ("model" if said == r["model_was"] else "baseline")
    wins = sum(r["winner"] == "model" for r in rows)
    assert s["wins"] == wins and s["win_rate"] == wins / 4
    assert {r["model_was"] for r in rows} <= {"a", "b"} and result["judge_prompt"]["response_format"]
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["instruction"] for a in answers) == sorted(i["instruction"] for i in ITEMS)
    assert json.loads((out / "arena-prompts.json").read_text()) == [i["instruction"] for i in ITEMS]
    assert "win rate" in (out / "RESULTS.md").read_text()


def test_unparsable_verdicts_are_counted_not_guessed(srv, tmp_path):
    result, rows, _ = run(srv, tmp_path, "--judge-free-text")
    s = result["scores"]
    bad = [r for r in rows if alpaca.verdict_of(r["judge_said"]) is None]
    assert s["unparsable"] == len(bad) and all(r["winner"] is None for r in bad)
    assert s["decided"] + s["unparsable"] == 4


def test_resume_needs_no_server(srv, tmp_path):
    run(srv, tmp_path)
    against = tmp_path / "against.json"
    code = qt_eval(["alpaca", "--url", "http://127.0.0.1:9/v1", "--model-name", "tiny", "--against", str(against),
                    "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "tiny", "--resume",
                    "--out", str(tmp_path / "out")])
    assert code == 0  # everything was answered and judged: nothing to ask anybody


def test_unreachable_server_is_a_clear_error(tmp_path):
    against = tmp_path / "against.json"
    against.write_text(json.dumps(ITEMS))
    with pytest.raises(Exception, match="cannot reach the model's server at http://127.0.0.1:9"):
        alpaca.main(alpaca_args(["--url", "http://127.0.0.1:9/v1", "--against", str(against),
                                 "--out", str(tmp_path / "o")]))


def alpaca_args(argv):
    import argparse

    ap = argparse.ArgumentParser()
    alpaca.add_parser(ap.add_subparsers())
    return ap.parse_args(["alpaca", *argv])


def test_verdict_parsing():
    assert [alpaca.verdict_of(t) for t in ['{"better": "a"}', " b ", "B.", '"a"', "both", "", None, '{"x": 1}']] == [
        "a", "b", "b", "a", None, None, None, None]


def test_wilson_interval_matches_the_textbook_case():
    lo, hi = alpaca.wilson(8, 10)  # 8 of 10 at 95%: (0.4902, 0.9433) in Wilson's tables
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)


def test_logistic_fit_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = (rng.random(300) < 1 / (1 + np.exp(-(0.4 + 1.5 * x)))).astype(float)
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x[:, None], y)
    w = alpaca.fit_logistic(x, y)
    assert w[0] == pytest.approx(ref.intercept_[0], abs=1e-4) and w[1] == pytest.approx(ref.coef_[0, 0], abs=1e-4)


def test_length_control_removes_a_length_effect():
    # The judge prefers whatever is longer; at equal length the two sides are even.
    rng = np.random.default_rng(1)
    diff = rng.normal(0, 100, 400)
    wins = rng.random(400) < 1 / (1 + np.exp(-diff / 30))
    lc = alpaca.length_controlled(wins, diff, rounds=50)
    assert abs(lc["lc_win_rate"] - 0.5) < 0.1 and lc["lc_ci95"][0] < 0.5 < lc["lc_ci95"][1]
    skewed = np.concatenate([wins, np.ones(100, bool)])  # 100 more wins, all at large positive differences
    assert alpaca.length_controlled(skewed, np.concatenate([diff, np.full(100, 400.0)]), rounds=20)[
        "lc_win_rate"] < skewed.mean()
    assert not math.isnan(lc["lc_win_rate"])
