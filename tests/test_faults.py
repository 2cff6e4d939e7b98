"""Faults found by using qt-serve as a new user would; each of these tests failed before its fix."""

import asyncio
import socket
import time

import httpx
import openai
import pytest
from conftest import recompute_greedy, start_app, tiny_model

from qt_serve import checkpoint
from qt_serve.engine import Engine
from qt_serve.sampling import SamplingParams

CTX = 128


def start(ckpt, **kw):
    srv, gens = start_app(ckpt, ("tiny",), CTX, **kw)
    return srv, gens["tiny"]


def post(url, body, **kw):
    return httpx.post(url + "/v1/completions", json=body, timeout=30, **kw)


def wait_free(engine, timeout=10.0) -> int:
    deadline = time.monotonic() + timeout
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats()["running"]


# ---- extreme sampling values ------------------------------------------------------------------


def test_extreme_but_valid_values_are_numerically_safe(server):
    greedy = post(server.url, {"prompt": "To be", "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()
    for extra in ({"temperature": 1e-40}, {"temperature": 1e-40, "repetition_penalty": 1e-30},
                  {"temperature": 1e6, "top_p": 1e-9}, {"presence_penalty": 2, "frequency_penalty": -2},
                  {"temperature": 1e-30, "logit_bias": {"5": 100, "6": -100}}):
        r = post(server.url, {"prompt": "To be", "max_tokens": 12, "ignore_eos": True, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert len(r.json()["choices"][0]["text"]) > 0
    tiny_t = post(server.url, {"prompt": "To be", "max_tokens": 12, "temperature": 1e-40, "ignore_eos": True}).json()
    assert tiny_t["choices"][0]["text"] == greedy["choices"][0]["text"]  # a vanishing temperature is greedy


@pytest.mark.parametrize("raw, name", [
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "x", "top_p": NaN}', "top_p"),
    (b'{"prompt": "x", "logit_bias": {"5": 1e39}}', "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"5": -Infinity}}', "logit_bias"),
    (b'{"prompt": "x", "repetition_penalty": Infinity}', "repetition_penalty"),
    (b'{"prompt": "x", "presence_penalty": 1e30}', "presence_penalty"),
])
def test_invalid_values_are_400_and_the_batch_goes_on(server, raw, name):
    body = {"prompt": "the slings and arrows", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as running:
            lines = running.iter_lines()
            next(lines)  # a request is decoding while the bad one arrives
            r = c.post(server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text
            assert name in r.json()["error"]["message"]
            rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"error"' not in "".join(rest)


def test_one_requests_failure_ends_that_request_only(ckpt, tokenizer, monkeypatch):
    from qt_serve import sequence

    step = sequence.Sequence.step

    def flaky(self, logits):  # sampling blows up for one request only
        if self.params.seed == 13:
            raise RuntimeError("boom")
        return step(self, logits)

    monkeypatch.setattr(sequence.Sequence, "step", flaky)
    eng = Engine.load(checkpoint.load(ckpt), max_batch=3, max_seq_len=CTX)
    good = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    bad = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, seed=13)
    prompts = [tokenizer.encode(t) for t in ("To be", "Paris is", "the slings")]

    async def run(prompt, params):
        return [d async for d in eng.stream(prompt, params)]

    async def all_three():
        return await asyncio.gather(run(prompts[0], good), run(prompts[1], bad), run(prompts[2], good))

    try:
        a, b, c = asyncio.run(all_three())
    finally:
        eng.shutdown(True, 5)
    assert b[-1].finish_reason == "error" and "boom" in b[-1].text
    for out, p in ((a, prompts[0]), (c, prompts[2])):
        assert out[-1].finish_reason == "length"
        assert [d.token.token for d in out if d.token] == recompute_greedy(ckpt, p, 20)


# ---- capacity, disconnects, a dead engine -----------------------------------------------------


def test_streaming_request_over_capacity_is_429_not_an_sse_error(ckpt):
    srv, gen = start(ckpt, max_queue=0)
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json={"prompt": "x", "stream": True}) as r:
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            r.read()
            assert r.json()["error"]["code"] == "queue_full"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
    finally:
        srv.stop()
        gen.engine.shutdown(True, 5)


def test_non_streaming_client_that_hangs_up_frees_its_slot(ckpt, monkeypatch):
    from qt_serve import runner

    forward = runner.TorchRunner.forward

    def slow(self, segments, logits_at):  # ~20 ms a step: 120 tokens take seconds
        time.sleep(0.02)
        return forward(self, segments, logits_at)

    monkeypatch.setattr(runner.TorchRunner, "forward", slow)
    srv, gen = start(ckpt)
    try:
        host, port = srv.url.removeprefix("http://").split(":")
        body = b'{"prompt": "To be", "max_tokens": 120, "ignore_eos": true}'
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 5
            while gen.engine.stats()["running"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gen.engine.stats()["running"] == 1
        left = time.monotonic()
        assert wait_free(gen.engine, 2.0) == 0  # freed well before its 120 tokens (~2.4 s) would end
        assert time.monotonic() - left < 1.5
    finally:
        srv.stop()
        gen.engine.shutdown(True, 5)


def test_a_dead_engine_says_503_and_ends_what_is_in_flight(ckpt, monkeypatch):
    srv, gen = start(ckpt)
    eng = gen.engine
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json={"prompt": "To be", "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)

            def broken():  # a scheduler bug outside any one forward: the worker thread dies
                raise RuntimeError("scheduler bug")

            monkeypatch.setattr(eng, "_drop_cancelled", broken)
            rest = [line for line in lines if line]
        assert '"server_error"' in rest[-2] and "scheduler bug" in rest[-2] and rest[-1] == "data: [DONE]"
        eng.thread.join(5)
        assert not eng.thread.is_alive()
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["failed"] == ["tiny"]
        started = time.monotonic()
        r = post(srv.url, {"prompt": "x"})
        assert r.status_code == 503 and "restart the server" in r.json()["error"]["message"]
        assert time.monotonic() - started < 2
        started = time.monotonic()
        eng.shutdown(timeout=1)  # returns, rather than waiting for a worker that is gone
        assert time.monotonic() - started < 2
    finally:
        srv.stop()


def test_shutdown_is_bounded_even_with_a_long_request(ckpt):
    eng = Engine.load(checkpoint.load(ckpt), max_batch=1, max_seq_len=CTX)
    eng.submit([5, 6, 7], SamplingParams(max_tokens=120, ignore_eos=True), lambda d: time.sleep(0.05))
    started = time.monotonic()
    eng.shutdown(timeout=0.3)  # 120 tokens at ≥ 50 ms each would take 6 s: cancelled at the deadline
    assert time.monotonic() - started < 2 and not eng.thread.is_alive()


# ---- security -----------------------------------------------------------------------------------


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than 20000 bytes" in r.json()["error"]["message"]
    small = httpx.post(server.url + "/v1/completions", headers={"content-type": "application/json"},
                       content=iter([b'{"prompt": "To be", ', b'"max_tokens": 3}']))
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("open_docs", [False, True])
def test_metrics_and_docs_are_behind_the_key(ckpt, open_docs):
    srv, gen = start(ckpt, api_key="k", open_docs=open_docs)
    try:
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert httpx.get(srv.url + path).status_code == (200 if open_docs else 401), path
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer k"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200  # load balancers need no key
        assert httpx.get(srv.url + "/v1/models").status_code == 401  # the API always does
    finally:
        srv.stop()
        gen.engine.shutdown(True, 5)


# ---- usage and defaults -------------------------------------------------------------------------


def test_usage_counts_the_prompt_once_for_n_choices(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "To be, or not to be"}]
    n_prompt = len(server.served["tiny"].encode_chat(msgs))
    r = client.chat.completions.create(model="tiny", messages=msgs, n=3, max_tokens=4, temperature=0.5)
    assert len(r.choices) == 3 and r.usage.prompt_tokens == n_prompt
    r = client.completions.create(model="tiny", prompt=["To be", "Paris is"], n=2, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == len(server.served["tiny"].encode_text("To be")) + len(server.served["tiny"].encode_text("Paris is"))


def test_unset_sampling_values_come_from_generation_config(tmp_path, tokenizer):
    greedy_ckpt = checkpoint.save_checkpoint(tmp_path / "g", tiny_model(vocab_size=tokenizer.vocab_size), tokenizer,
                                             generation_config={"do_sample": False})
    srv, gen = start(greedy_ckpt)
    try:
        body = {"prompt": "To be", "max_tokens": 16, "ignore_eos": True}
        texts = {post(srv.url, {**body, "seed": s}).json()["choices"][0]["text"] for s in range(4)}
        assert len(texts) == 1  # greedy whatever the seed: do_sample false
        assert texts == {post(srv.url, {**body, "temperature": 0}).json()["choices"][0]["text"]}
        sampled = {post(srv.url, {**body, "seed": s, "temperature": 1.5}).json()["choices"][0]["text"]
                   for s in range(4)}
        assert len(sampled) > 1  # a value the request sets wins
        from app.models import LocalModel

        assert LocalModel(gen).defaults().temperature == 0.0  # the chat page starts from the same values
    finally:
        srv.stop()
        gen.engine.shutdown(True, 5)
