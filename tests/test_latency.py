"""`qt-bench latency` and `compare`: the statistics on synthetic timestamps with known answers, and runs against
the tiny in-process server (nothing here asserts a speed)."""

from __future__ import annotations

import asyncio
import json
import math
import socket

import numpy as np
import pytest

from evals import bench, latency
from evals.cli import bench_main
from evals.latency import Request, Server, Timing


def test_one_requests_metrics():
    t = Timing(sent=2.0, chunks=[0.1, 0.15, 0.3, 0.32], end=0.35, prompt_tokens=7, output_tokens=5)
    assert t.ttft == 0.1
    assert t.tpot == pytest.approx((0.32 - 0.1) / 4)  # 4 tokens after the first; the last chunk held two
    assert t.itl == pytest.approx([0.05, 0.15, 0.02])
    assert t.e2el == 0.35
    assert Timing(0, [0.2], 0.25, 3, 1).tpot is None  # one token: no time per token after the first


def test_summary_statistics():
    a = Timing(0.0, [0.1, 0.2, 0.4], 0.5, prompt_tokens=10, output_tokens=3)
    b = Timing(0.5, [0.3, 0.6], 1.0, prompt_tokens=20, output_tokens=4)
    bad = Timing(0.6, error="BadRequestError: no")
    r = latency.summarize([a, b, bad, Timing(0.7, error="BadRequestError: no")], wall=2.0)
    assert (r["completed"], r["failed"], r["errors"]) == (2, 2, {"BadRequestError: no": 2})
    assert (r["input_tokens"], r["output_tokens"]) == (30, 7)
    assert r["request_throughput"] == 1.0 and r["output_throughput"] == 3.5 and r["total_token_throughput"] == 18.5
    # two values x < y: mean and median (x + y) / 2, pN = x + N% (y - x) (linear interpolation)
    assert r["ttft_ms"] == pytest.approx({"mean": 200, "median": 200, "p90": 280, "p99": 298})
    # TPOT: a (0.4 - 0.1) / 2 = 150 ms, b (0.6 - 0.3) / 3 = 100 ms
    assert r["tpot_ms"] == pytest.approx({"mean": 125, "median": 125, "p90": 145, "p99": 149.5})
    # ITL: every gap of every request, 100, 200 and 300 ms
    assert r["itl_ms"] == pytest.approx({"mean": 200, "median": 200, "p90": 280, "p99": 298})
    assert r["e2el_ms"] == pytest.approx({"mean": 750, "median": 750, "p90": 950, "p99": 995})
    assert "goodput" not in r
    none = latency.summarize([bad], wall=1.0)
    assert none["completed"] == 0 and none["ttft_ms"] == dict.fromkeys(("mean", "median", "p90", "p99"))


def test_goodput_counts_requests_meeting_every_bound():
    fast = Timing(0, [0.1, 0.2], 0.2, 1, 2)  # TTFT 100 ms, TPOT 100 ms
    slow_start = Timing(0, [0.6, 0.7], 0.7, 1, 2)  # TTFT 600 ms
    slow_tokens = Timing(0, [0.1, 0.4], 0.4, 1, 2)  # TPOT 300 ms
    single = Timing(0, [0.1], 0.1, 1, 1)  # no TPOT to miss
    failed = Timing(0, error="APIConnectionError: gone")
    timings = [fast, slow_start, slow_tokens, single, failed]
    slo = latency.parse_slo("ttft=500ms,tpot=0.1s")
    assert slo == {"ttft": 0.5, "tpot": 0.1}
    assert latency.summarize(timings, wall=4.0, slo=slo)["goodput"] == 2 / 4  # fast and single
    assert latency.summarize(timings, wall=4.0, slo={"ttft": 0.5})["goodput"] == 3 / 4
    assert latency.summarize(timings, wall=4.0, slo={"e2el": 0.15})["goodput"] == 1 / 4


@pytest.mark.parametrize("bad", ["ttft", "ttft=", "ttft=fast", "ttft=-5ms", "latency=5ms", "ttft=5ms,tpot"])
def test_bad_slo_names_the_bad_part(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["latency", "--url", "http://127.0.0.1:1", "--slo", bad])
    assert e.value.code == 2
    part = bad.split(",")[-1]
    assert f"argument --slo: '{part}'" in capsys.readouterr().err


def test_slo_units_and_argument_types():
    assert latency.parse_slo("e2el=2s, ttft=250") == {"e2el": 2.0, "ttft": 0.25}  # a bare number is ms
    assert latency.parse_span("4:20") == (4, 20)
    assert latency.parse_list(float)("1,2.5,inf") == [1.0, 2.5, math.inf]
    for parse, text in ((latency.parse_span, "20:4"), (latency.parse_span, "4"), (latency.parse_list(int), "1,0"),
                        (latency.parse_list(int), "1,x")):
        with pytest.raises(Exception, match=repr(text)):
            parse(text)


def test_poisson_arrivals_are_seeded():
    a = latency.arrivals(20_000, rate=4.0, seed=1)
    assert a == latency.arrivals(20_000, rate=4.0, seed=1)  # reproducible
    assert a != latency.arrivals(20_000, rate=4.0, seed=2)
    assert a[0] == 0 and all(np.diff(a) >= 0)
    gaps = np.diff(a)
    # exponential gaps of mean 1/rate: the mean and the standard deviation both 0.25 (seeded, so never flaky)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03) and gaps.std() == pytest.approx(0.25, rel=0.03)
    assert latency.arrivals(3, rate=math.inf) == [0.0, 0.0, 0.0]
    # a rate sweep with one seed scales one pattern
    assert np.allclose(np.array(latency.arrivals(50, 2.0, seed=3)) / 2, latency.arrivals(50, 4.0, seed=3))


def test_lengths_and_prompts_are_seeded():
    rng = np.random.default_rng(0)
    assert latency.lengths(3, 7, None, rng) == [7, 7, 7]
    spans = latency.lengths(500, 7, (4, 9), rng)
    assert min(spans) == 4 and max(spans) == 9
    reqs = latency.random_requests([5, 3], [2, 4], [10, 11, 12], np.random.default_rng(1))
    assert [len(r.prompt) for r in reqs] == [5, 3] and [r.output_len for r in reqs] == [2, 4]
    assert {t for r in reqs for t in r.prompt} <= {10, 11, 12}
    assert reqs == latency.random_requests([5, 3], [2, 4], [10, 11, 12], np.random.default_rng(1))
    words = latency.random_requests([6], [2], None, np.random.default_rng(1))[0].prompt
    assert len(words.split()) == 6 and set(words.split()) <= set(latency.WORDS)
    chats = latency.chat_requests(["a", "b", "c"], [1] * 5, np.random.default_rng(0))
    asked = [r.prompt[0]["content"] for r in chats]
    assert sorted(asked[:3]) == ["a", "b", "c"] and asked[3:] == asked[:2] and chats[0].chat


# ---- against a live server ---------------------------------------------------------------------------


def run(coro):
    return asyncio.run(coro)


def test_closed_loop_counts_tokens_by_usage(server):
    s = Server(server.url, "tiny")
    pool = run(latency.token_pool(s))
    assert pool and all(0 <= t < 400 for t in pool)
    rng = np.random.default_rng(0)
    ins, outs = latency.lengths(6, 0, (4, 24), rng), latency.lengths(6, 0, (2, 9), rng)
    timings, wall = run(latency.run_level(s, latency.random_requests(ins, outs, pool, rng), concurrency=3))
    assert all(t.error is None for t in timings), [t.error for t in timings]
    assert [t.prompt_tokens for t in timings] == ins  # token-id prompts: no BOS added
    assert [t.output_tokens for t in timings] == outs  # ignore_eos: every request its full length
    for t in timings:
        assert t.chunks == sorted(t.chunks) and 0 < t.chunks[0] and t.chunks[-1] <= t.end
        assert len(t.chunks) <= t.output_tokens  # a chunk holds one token or more
    assert max(t.sent + t.end for t in timings) <= wall


def test_open_loop_sends_on_schedule_and_text_without_a_pool(server):
    s = Server(server.url, "tiny")
    reqs = latency.random_requests([8] * 5, [3] * 5, None, np.random.default_rng(0))  # text prompts
    timings, _ = run(latency.run_level(s, reqs, request_rate=40.0, seed=5))
    assert all(t.error is None and t.output_tokens == 3 and t.prompt_tokens > 0 for t in timings)
    for t, at in zip(timings, latency.arrivals(5, 40.0, seed=5)):
        assert t.sent >= at - 1e-3  # never before its arrival time
    assert run(latency.token_pool(Server(server.url + "/none", "tiny"))) is None  # no /tokenize there: text


def test_a_failed_request_is_recorded_not_raised(server):
    timings, _ = run(latency.run_level(Server(server.url, "tiny"), [Request([1, 2, 3], 500)]))  # past the context
    assert timings[0].error.startswith("BadRequestError")
    assert latency.summarize(timings, 1.0)["failed"] == 1


def test_sweep_writes_json_md_png_and_compare_tabulates(server, tmp_path, capsys):
    common = ["latency", "--url", server.url + "/v1/", "--model", "tiny", "--num-prompts", "4", "--input-len",
              "12", "--output-len-range", "3:6", "--slo", "ttft=10s,tpot=10s"]
    assert bench_main([*common, "--sweep-concurrency", "1,2", "--out", str(tmp_path / "a")]) == 0
    assert bench_main([*common, "--sweep-rate", "50,inf", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "latency.json").read_text())
    assert a["url"] == server.url and a["prompts"] == "random token ids"
    assert [lv["concurrency"] for lv in a["levels"]] == [1, 2]
    for lv in a["levels"]:
        reqs = [Timing(**r) for r in lv["requests"]]
        assert lv["completed"] == 4 and lv["failed"] == 0 and all(r.prompt_tokens == 12 for r in reqs)
        assert lv["output_tokens"] == sum(r.output_tokens for r in reqs) and all(3 <= r.output_tokens <= 6 for r in reqs)
        assert lv["goodput"] == lv["request_throughput"]  # bounds of 10 s: every request meets them
        # the summary is the raw per-chunk timestamps' statistics, recomputed here independently
        ttfts = sorted(r["chunks"][0] * 1e3 for r in lv["requests"])
        assert lv["ttft_ms"]["mean"] == pytest.approx(sum(ttfts) / 4)
        assert lv["ttft_ms"]["median"] == pytest.approx((ttfts[1] + ttfts[2]) / 2)
        tpots = [(r["chunks"][-1] - r["chunks"][0]) / (r["output_tokens"] - 1) * 1e3 for r in lv["requests"]]
        assert lv["tpot_ms"]["mean"] == pytest.approx(sum(tpots) / 4)
        gaps = [y - x for r in lv["requests"] for x, y in zip(r["chunks"], r["chunks"][1:])]
        assert lv["itl_ms"]["mean"] == pytest.approx(sum(gaps) / len(gaps) * 1e3)
        assert lv["output_throughput"] == pytest.approx(lv["output_tokens"] / lv["duration_s"])
    b = json.loads((tmp_path / "b" / "latency.json").read_text())
    assert [lv["request_rate"] for lv in b["levels"]] == [50, math.inf]
    for d, level in (("a", "c=1"), ("b", "r=50/s")):
        assert (tmp_path / d / "latency.png").stat().st_size > 10_000
        assert f"| {level} |" in (tmp_path / d / "latency.md").read_text()
    capsys.readouterr()
    assert bench_main(["compare", str(tmp_path / "a" / "latency.json"), str(tmp_path / "b" / "latency.json"),
                       "--plot", str(tmp_path / "both.png")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | level | ok |") and len(rows) == 2 + 4
    assert [r.split(" | ")[1] for r in rows[2:]] == ["c=1", "c=2", "r=50/s", "r=inf/s"]
    assert rows[2].startswith(f"| {tmp_path / 'a' / 'latency'} |")
    assert (tmp_path / "both.png").stat().st_size > 10_000


def test_prompt_set_goes_as_chat(server, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"instruction": "Name a city."}\n{"instruction": "Say hi."}\n')
    assert bench_main(["latency", "--url", server.url, "--model", "tiny2", "--prompts", str(tmp_path / "p.jsonl"),
                       "--output-len", "5", "--num-prompts", "3", "--concurrency", "2", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "latency.json").read_text())
    assert r["prompts"] == f"{tmp_path / 'p.jsonl'} (chat)" and r["input_len"] is None
    level = r["levels"][0]
    assert level["completed"] == 3 and [q["output_tokens"] for q in level["requests"]] == [5, 5, 5]


def test_unreachable_url_is_a_clear_error_before_any_work(capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert bench_main(["latency", "--url", url]) == 2
    out, err = capsys.readouterr()
    assert f"error: cannot reach {url}" in err and "cpu:" not in out


def test_model_names_are_checked(server, capsys):
    assert bench_main(["latency", "--url", server.url, "--model", "nope"]) == 2
    assert f"{server.url} does not serve 'nope'; it serves: tiny, tiny2" in capsys.readouterr().err
    assert bench_main(["latency", "--url", server.url]) == 2
    assert "serves 2 models (tiny, tiny2); choose one with --model" in capsys.readouterr().err


def test_bench_serve_timing_goes_through_latency(server):
    """`qt-bench serve`'s and `qt-quant compare`'s helpers, now made of latency's."""
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    level = run(bench.load_level(server.url, "tiny", prompts, 4, 2))
    assert level["concurrency"] == 2 and level["tok_s"] > 0 and 0 < level["ttft_p50_s"] <= level["ttft_p99_s"]
    b = run(bench.burst(server.url, "tiny", prompts, 4))
    assert b["arrivals"] == 3 and b["ttft_p99_over_p50"] >= 1

    async def one():
        import openai

        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await bench.stream_one(client, "tiny", prompts[0], 4)

    ttft, span = run(one())
    assert ttft > 0 and span >= 0
    with pytest.raises(RuntimeError, match="BadRequestError"):
        run(bench.load_level(server.url, "tiny", [[1, 2]], 500, 1))


def test_compare_refuses_what_is_not_a_latency_result(tmp_path, capsys):
    (tmp_path / "serve.json").write_text(json.dumps({"levels": [{"concurrency": 1, "tok_s": 3.0}]}))  # qt-bench serve's
    assert bench_main(["compare", str(tmp_path / "serve.json")]) == 2
    assert f"{tmp_path / 'serve.json'}: not a qt-bench latency result" in capsys.readouterr().err
    assert bench_main(["compare", str(tmp_path / "none.json")]) == 2
    assert f"{tmp_path / 'none.json'}: cannot read" in capsys.readouterr().err
