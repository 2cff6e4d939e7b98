"""The batched engine against full recompute without a cache: same tokens, rows freed, prefixes reused."""

import asyncio
import time

import pytest
import torch
from conftest import recompute_greedy

from qt_serve import checkpoint
from qt_serve.engine import Engine, QueueFull
from qt_serve.errors import QtError
from qt_serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture
def engine(tiny_ckpt):
    eng = Engine.load(checkpoint.load(tiny_ckpt), max_batch=3, max_queue=16, max_seq_len=200)
    yield eng
    eng.shutdown(cancel_running=True)


def wait_idle(engine, timeout=10.0):
    """The worker frees a row just after sending the last delta; give it a moment."""
    deadline = time.monotonic() + timeout
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats()


async def collect(engine, prompt, params=GREEDY):
    return [d.token.token async for d in engine.stream(prompt, params) if d.token is not None]


def test_more_requests_than_slots_match_generate(engine, tiny_ckpt, tokenizer):
    prompts = [tokenizer.encode(t) for t in ["To be", "the slings", "Paris is", "café", "12345", "or not", "Tokyo"]]
    alone = [recompute_greedy(tiny_ckpt, p, 24) for p in prompts]

    async def run():
        mixed = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (24, 5, 24, 1, 24, 9, 24)]
        return await asyncio.gather(*[collect(engine, p, m) for p, m in zip(prompts, mixed)])

    got = asyncio.run(run())  # different lengths: rows finish and are re-packed mid-batch
    assert [g for g in got] == [a[: len(g)] for a, g in zip(alone, got)]
    assert [len(g) for g in got] == [24, 5, 24, 1, 24, 9, 24]
    assert wait_idle(engine)["running"] == 0


def test_chat_history_prefix_is_reused(engine, tiny_ckpt, tokenizer):
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not to be"}]
    ids1 = tokenizer.encode_chat(turn1)
    out1 = asyncio.run(collect(engine, ids1))
    turn2 = turn1 + [{"role": "assistant", "content": tokenizer.decode(out1)},
                     {"role": "user", "content": "that is the question"}]
    ids2 = tokenizer.encode_chat(turn2)
    before = engine.stats()["prefix_reused_tokens"]
    out2 = asyncio.run(collect(engine, ids2))
    assert engine.stats()["prefix_reused_tokens"] - before >= len(ids1)
    assert out2 == recompute_greedy(tiny_ckpt, ids2, 24)


def test_lone_prompt_longer_than_a_prefill_chunk(tiny_ckpt, tokenizer):
    # A prompt prefilled over several steps with nobody else running: the first steps need no logits.
    eng = Engine.load(checkpoint.load(tiny_ckpt), max_batch=2, max_seq_len=200, prefill_chunk=16)
    try:
        prompt = tokenizer.encode("To be, or not to be, that is the question: " * 4)
        assert len(prompt) > 3 * 16
        assert asyncio.run(collect(eng, prompt)) == recompute_greedy(tiny_ckpt, prompt, 24)
    finally:
        eng.shutdown(cancel_running=True)


@pytest.mark.parametrize("kw, message", [(dict(max_batch=0), "max_batch must be at least 1"),
                                         (dict(request_timeout=0), "request_timeout must be > 0")])
def test_bad_engine_settings(tiny_ckpt, kw, message):
    with pytest.raises(QtError, match=message):  # max_batch=0 would otherwise queue requests forever
        Engine.load(checkpoint.load(tiny_ckpt), **kw)


def test_cancel_frees_row_and_queue_bound(tiny_ckpt, tokenizer):
    eng = Engine.load(checkpoint.load(tiny_ckpt), max_batch=1, max_queue=1, max_seq_len=200)
    long = SamplingParams(max_tokens=150, ignore_eos=True)

    async def run():
        stream = eng.stream(tokenizer.encode("To be"), long)
        await stream.__anext__()
        eng.submit(tokenizer.encode("x"), long, lambda d: None)  # fills the one queue place
        with pytest.raises(QueueFull):
            eng.submit(tokenizer.encode("y"), long, lambda d: None)
        await stream.aclose()  # the client leaves mid-stream

    asyncio.run(run())
    eng.shutdown(cancel_running=True, timeout=10)
    assert eng.stats() == {"running": 0, "waiting": 0, "slots": 1, "prefix_reused_tokens": 0}


def test_prompt_scores_over_several_chunks_match_transformers(tiny_ckpt, tokenizer):
    # Scoring is taken chunk by chunk during prefill (bounded memory), beside a request that decodes.
    from transformers import LlamaForCausalLM

    eng = Engine.load(checkpoint.load(tiny_ckpt), max_batch=2, max_seq_len=200, prefill_chunk=16)
    prompt = tokenizer.encode("To be, or not to be, that is the question: " * 3)
    assert len(prompt) > 2 * 16
    hf = LlamaForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)

    async def run():
        other = asyncio.ensure_future(collect(eng, tokenizer.encode("Paris is")))
        got = [d async for d in eng.stream(prompt, None, prompt_logprobs=3)]
        return got, await other

    try:
        got, other = asyncio.run(run())
    finally:
        eng.shutdown(cancel_running=True)
    assert len(got) == 1 and got[0].finish_reason == "length"  # scoring only: one delta, nothing generated
    scores = got[0].prompt_logprobs
    assert [c.token for c in scores] == prompt[1:]
    for j, c in enumerate(scores):
        assert c.logprob == pytest.approx(float(ref[j, prompt[j + 1]]), abs=1e-4)
        assert [t for t, _ in c.top] == torch.topk(ref[j], 3).indices.tolist()
    assert len(other) == 24


def test_one_worker_steps_two_engines_and_survives_one_failing(tiny_ckpt, tokenizer):
    # Several models in one server share one thread running torch (one OpenMP team: LOG.md).
    from qt_serve.engine import Worker

    worker = Worker()
    a, b = (Engine.load(checkpoint.load(tiny_ckpt), max_batch=2, max_seq_len=200, thread=worker) for _ in range(2))
    assert a.thread is b.thread
    prompts = [tokenizer.encode("To be"), tokenizer.encode("Paris is")]

    async def both():
        return await asyncio.gather(collect(a, prompts[0]), collect(b, prompts[1]))

    try:
        assert asyncio.run(both()) == [recompute_greedy(tiny_ckpt, p, 24) for p in prompts]

        def broken():
            raise RuntimeError("scheduler bug")

        a._drop_cancelled = broken
        failed = asyncio.run(collect_deltas(a, prompts[0]))
        assert failed[-1].finish_reason == "error" and not a.healthy
        assert asyncio.run(collect(b, prompts[1])) == recompute_greedy(tiny_ckpt, prompts[1], 24)
        assert b.healthy and worker.thread.is_alive()
        started = time.monotonic()
        b.shutdown(timeout=5)
        assert time.monotonic() - started < 2 and not worker.thread.is_alive()
    finally:
        a.shutdown(True, 1)
        b.shutdown(True, 1)


async def collect_deltas(engine, prompt):
    return [d async for d in engine.stream(prompt, GREEDY)]
