"""qt-serve over real HTTP on loopback, driven by the official `openai` client and raw httpx."""

import concurrent.futures
import re
import time

import httpx
import openai
import pytest
import torch
from conftest import start_app


CTX = 128


def start(ckpt, **kw):
    return start_app(ckpt, ("tiny", "tiny2"), CTX, **kw)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


GREEDY = dict(model="tiny", temperature=0, max_tokens=24)
CHAT = [{"role": "user", "content": "To be, or not to be"}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny2"]


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(messages=CHAT, **GREEDY)
    assert full.choices[0].finish_reason in ("stop", "length") and full.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(messages=CHAT, stream=True, stream_options={"include_usage": True},
                                                 **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_prompt_forms(client, server):
    tok = server.served["tiny"].engine.tokenizer
    ids = tok.encode("the slings and arrows")
    one = client.completions.create(prompt="the slings and arrows", **GREEDY)
    as_ids = client.completions.create(prompt=ids, **GREEDY)
    many = client.completions.create(prompt=[ids, tok.encode("Paris")], **GREEDY)
    strings = client.completions.create(prompt=["the slings and arrows", "Paris"], **GREEDY)
    assert one.choices[0].text == as_ids.choices[0].text == many.choices[0].text == strings.choices[0].text
    assert len(many.choices) == 2 and many.choices[1].text == strings.choices[1].text
    assert as_ids.usage.prompt_tokens == len(ids)  # no BOS added to token-id prompts


def hf_logprobs(ckpt, ids) -> torch.Tensor:
    """Reference scores: transformers' own Llama on the checkpoint directory, (len(ids), vocab)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)


def test_echo_logprobs_score_the_prompt(client, server, ckpt):
    tok = server.served["tiny"].engine.tokenizer
    ids = tok.encode("To be, or not to be, that is the question")
    ref = hf_logprobs(ckpt, ids)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2, n=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == len(ids)  # the prompt counts once for n = 2
    for choice in r.choices:
        lp = choice.logprobs
        assert choice.text == tok.decode(ids)
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        for j in range(1, len(ids)):
            assert lp.token_logprobs[j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
            best = torch.topk(ref[j - 1], 2)
            assert sorted(lp.top_logprobs[j].values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
    # echo with generation: the prompt's scores, then the new tokens', in one list; usage counts the prompt once
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True, logprobs=0, n=2, temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    for choice in r.choices:
        assert len(choice.logprobs.token_logprobs) == len(ids) + 3
        assert choice.logprobs.token_logprobs[1] == pytest.approx(float(ref[0, ids[1]]), abs=1e-4)
        assert choice.text.startswith(tok.decode(ids))


def test_sampling_controls(client):
    a = client.chat.completions.create(messages=CHAT, model="tiny", max_tokens=16, seed=7, n=2, temperature=1.0)
    b = client.chat.completions.create(messages=CHAT, model="tiny", max_tokens=16, seed=7, n=2, temperature=1.0)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    ref = client.completions.create(prompt="To be", **GREEDY).choices[0].text
    stop = ref[6:9]
    cut = client.completions.create(prompt="To be", stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.text == ref[: ref.index(stop)]
    lp = client.chat.completions.create(messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY).choices[0].logprobs
    assert len(lp.content[0].top_logprobs) == 3 and lp.content[0].logprob <= 0
    extra = client.chat.completions.create(messages=CHAT, extra_body={"top_k": 5, "min_p": 0.1, "ignore_eos": True,
                                                                     "min_tokens": 4, "some_unknown_field": 1},
                                           **GREEDY)
    assert extra.usage.completion_tokens == 24


def test_tokenize_detokenize(server):
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": "café 東京"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == CTX
    back = httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json()
    assert back["prompt"] == "café 東京"


def test_batch_invariance(client):
    prompts = ["To be", "the slings and arrows", "Paris is", "café", "12345 numbers", "or not", "Tokyo", "whether"]
    alone = [client.completions.create(prompt=p, **GREEDY).choices[0].text for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: client.completions.create(prompt=p, **GREEDY).choices[0].text, prompts))
    assert together == alone


def slots_in_use(url) -> float:
    m = re.search(r'qt_kv_slots_in_use\{model="tiny"\} (\S+)', httpx.get(url + "/metrics").text)
    return float(m.group(1))


def test_client_disconnect_frees_slot(server, caplog):
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 100, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        assert slots_in_use(server.url) == 1
    deadline = time.time() + 10
    while slots_in_use(server.url) != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert slots_in_use(server.url) == 0
    assert server.served["tiny"].engine.stats()["running"] == 0
    assert not [r for r in caplog.records if r.levelno >= 40], "the hang-up was logged as an error"


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err["message"]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "tiny", "messages": "hello"}, 400, "messages"),
    ({"model": "tiny"}, 400, "messages: Field required"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "gpt-9", "messages": CHAT}, 404, "model 'gpt-9' is not served here"),
    ({"model": "tiny", "messages": CHAT, "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"model": "tiny", "messages": CHAT, "max_tokens": 1000}, 400, "context is 128 tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 300}]}, 400,
     "tokens but this model's context is 128 tokens"),
    ({"model": "tiny", "messages": CHAT, "temperature": -1}, 400, "temperature must be"),
    ({"model": "tiny", "messages": CHAT, "top_p": "high"}, 400, "top_p"),
    ({"model": "tiny", "messages": CHAT, "logit_bias": {"99999": 1}}, 400, "outside the vocabulary"),
])
def test_bad_chat_requests(server, body, status, message):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", **kw)
    assert message in error_of(r, status)


@pytest.mark.parametrize("body, message", [
    ({"model": "tiny"}, "prompt: Field required"),
    ({"model": "tiny", "prompt": [5, 10_000]}, "token ids [10000] are outside the vocabulary"),
    ({"model": "tiny", "prompt": []}, "prompt is empty"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "0 is allowed only with echo"),
    ({"model": "tiny", "prompt": list(range(3, 200))}, "the prompt is 197 tokens but this model's context is 128"),
    ({"model": "tiny", "prompt": "x", "seed": 2**70}, "seed must fit in 64 bits"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": [10**6], "min_tokens": 2}, "stop_token_ids names token"),
])
def test_bad_completion_requests(server, body, message):
    assert message in error_of(httpx.post(server.url + "/v1/completions", json=body), 400)


def test_invalid_utf8_and_oversized_body(server):
    bad = b'{"model": "tiny", "prompt": "\xff\xfe"}'
    assert error_of(httpx.post(server.url + "/v1/completions", content=bad,
                               headers={"content-type": "application/json"}), 400)
    big = {"model": "tiny", "prompt": "x" * 30_000}
    assert "larger than 20000 bytes" in error_of(httpx.post(server.url + "/v1/completions", json=big), 413)


def test_api_key_and_full_queue(ckpt):
    srv, served = start(ckpt, api_key="s3cret", max_queue=0)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200  # stays open
        assert "API key" in error_of(httpx.get(srv.url + "/v1/models"), 401)
        assert error_of(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == "tiny"
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                       headers={"Authorization": "Bearer s3cret"})
        assert "queue is full" in error_of(r, 429) and r.headers["retry-after"] == "1"
    finally:
        srv.stop()
        for s in served.values():
            s.engine.shutdown()


def test_metrics_count_requests(server, client):
    client.completions.create(prompt="To be", **GREEDY)
    for path in ("/v1/no-such-route", "/v1/another-typo", "/favicon.ico"):
        httpx.get(server.url + path)
    text = httpx.get(server.url + "/metrics").text
    assert 'qt_requests_total{route="/v1/completions",status="200"}' in text
    # Unknown paths share one label: a scan of made-up URLs cannot grow the series without bound.
    assert 'qt_requests_total{route="other",status="404"} 3.0' in text and "typo" not in text
    assert "qt_time_to_first_token_seconds_bucket" in text and 'qt_generation_tokens_total{model="tiny"}' in text


def test_sigterm_finishes_streams_and_exits_0(ckpt):
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qt_serve.cli_serve", "--model", f"tiny={ckpt}", "--port",
                             str(port), "--max-model-len", str(CTX)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the in-flight stream was allowed to finish
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "model=tiny" in out and "completion_tokens=60" in out  # the per-request log line
    finally:
        proc.kill()


def test_request_timeout(ckpt):
    srv, served = start(ckpt, request_timeout=0.02)
    try:
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 100, "ignore_eos": True}
        assert "time limit" in error_of(httpx.post(srv.url + "/v1/completions", json=body), 504)
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        assert '"code": "request_timeout"' in events[-2] and events[-1] == "data: [DONE]"
        deadline = time.time() + 5
        while served["tiny"].engine.stats()["running"] and time.time() < deadline:
            time.sleep(0.02)
        assert served["tiny"].engine.stats()["running"] == 0
    finally:
        srv.stop()
        for s in served.values():
            s.engine.shutdown()
