"""Generation: cached decode equals full recompute, seeds repeat, stops and cancels behave."""

import threading

import pytest
from conftest import recompute_greedy

from qt_serve import checkpoint
from qt_serve.errors import QtError
from qt_serve.generate import LLM
from qt_serve.sampling import SamplingParams

GREEDY64 = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


@pytest.fixture
def llm(tiny_ckpt):
    return LLM.load(tiny_ckpt, max_seq_len=256)


def test_cached_greedy_equals_full_recompute(llm, tiny_ckpt):
    prompt = llm.tokenizer.encode("To be, or not to be, that is the question")
    out = llm.generate(prompt, GREEDY64)
    assert out.finish_reason == "length" and len(out.tokens) == 64
    assert len(set(out.tokens)) > 5  # a non-degenerate continuation, so the comparison means something
    assert out.tokens == recompute_greedy(tiny_ckpt, prompt, 64)


def test_prefix_reuse_gives_same_tokens(llm, tiny_ckpt):
    chat = [{"role": "user", "content": "Capital of France?"}]
    first = llm.generate(chat, GREEDY64)
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And Japan?"}]
    reused = llm.generate(chat, GREEDY64)  # most of the prompt is already in the cache
    fresh = LLM.load(tiny_ckpt).generate(chat, GREEDY64)
    assert reused.tokens == fresh.tokens


def test_seeded_sampling_repeats(llm):
    p = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    a, b = llm.generate("The capital", p), llm.generate("The capital", p)
    assert a.tokens == b.tokens
    p.seed = 99
    assert llm.generate("The capital", p).tokens != a.tokens


def test_stream_concatenates_to_full_text(llm):
    deltas = list(llm.stream("Ünïcödé 東京", SamplingParams(max_tokens=40, temperature=0.8, seed=3)))
    assert deltas[-1].finish_reason in ("stop", "length")
    text = "".join(d.text for d in deltas)
    ids = [d.token.token for d in deltas if d.token is not None]
    if deltas[-1].finish_reason == "stop":
        ids = ids[:-1]
    assert text == llm.tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_and_stop_token(llm):
    prompt = llm.tokenizer.encode("To be")
    ref = llm.generate(prompt, GREEDY64)
    stop = ref.text[10:13]
    out = llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop" and out.text == ref.text[: ref.text.index(stop)]
    tok = ref.tokens[5]
    out = llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, stop_token_ids=[tok]))
    assert out.finish_reason == "stop" and out.tokens == ref.tokens[: ref.tokens.index(tok) + 1]


def test_eos_stops_unless_ignored(llm):
    prompt = llm.tokenizer.encode("To be")
    ref = llm.generate(prompt, GREEDY64)
    eos = ref.tokens[3]  # pretend this token is the model's EOS
    llm.engine.eos_ids = [eos]
    out = llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0))
    assert out.finish_reason == "stop" and out.tokens[-1] == eos
    out = llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0, min_tokens=60))
    assert eos not in out.tokens[:59]


def test_cancel_stops_stream(llm):
    cancel = threading.Event()
    n = 0
    for d in llm.stream("To be", SamplingParams(max_tokens=200, ignore_eos=True), cancel=cancel):
        n += 1
        if n == 5:
            cancel.set()
    assert n == 6 and d.finish_reason == "cancelled"


def test_max_tokens_clipped_to_context(tiny_ckpt):
    llm = LLM.load(tiny_ckpt, max_seq_len=32)
    out = llm.generate(list(range(3, 23)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert len(out.tokens) == 12 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, message", [
    (list(range(40)), "the prompt is 40 tokens but this model's context is 32 tokens"),
    ([5, 10_000], r"token ids \[10000\] are outside the vocabulary"),
    ([], "the prompt is empty"),
])
def test_bad_prompts(tiny_ckpt, prompt, message):
    with pytest.raises(QtError, match=message):
        LLM.load(tiny_ckpt, max_seq_len=32).generate(prompt)


def test_bf16_runs(tiny_ckpt):
    llm = LLM(checkpoint.load(tiny_ckpt, dtype="bfloat16"))
    assert len(llm.generate("To be", SamplingParams(max_tokens=8, ignore_eos=True)).tokens) == 8
