"""Sampling filters, penalties, seeds and stop strings, each against a hand-worked case."""

import math

import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from qt_serve.errors import QtError
from qt_serve.sampling import Sampler, SamplingParams, StopStrings, defaults_from_generation_config

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def kept(params, logits=LOGITS, prompt=()):
    x = Sampler(params, len(logits), eos_ids=[4], prompt=list(prompt)).process(logits)
    return [i for i in range(len(logits)) if x[i] > float("-inf")]


def test_filters():
    assert kept(SamplingParams(top_k=2)) == [0, 1]
    assert kept(SamplingParams(top_p=0.6)) == [0, 1]  # 0.5 < 0.6, 0.5 + 0.2 reaches it
    assert kept(SamplingParams(top_p=0.5)) == [0]
    assert kept(SamplingParams(min_p=0.3)) == [0, 1, 2]  # p ≥ 0.3 × 0.5
    assert kept(SamplingParams(min_tokens=1)) == [0, 1, 2, 3]  # EOS (4) masked
    assert kept(SamplingParams(min_tokens=1, ignore_eos=True)) == [0, 1, 2, 3, 4]


def test_penalties_and_bias():
    logits = torch.tensor([2.0, -2.0, 1.0])
    s = Sampler(SamplingParams(repetition_penalty=2.0), 3, [], prompt=[0, 1])
    assert s.process(logits).tolist() == [1.0, -4.0, 1.0]
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, temperature=0), 3, [], prompt=[0])
    s.counts[2] = 2
    assert s.process(logits).tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5]
    s = Sampler(SamplingParams(logit_bias={1: 10.0}, temperature=0), 3, [], prompt=[])
    assert s(logits).token == 1


def test_temperature_scales():
    x = Sampler(SamplingParams(temperature=0.5), 5, [], []).process(LOGITS)
    assert torch.allclose(x, LOGITS / 0.5)


def test_seed_repeats_and_differs():
    def draw(seed):
        s = Sampler(SamplingParams(seed=seed), 5, [], [])
        return [s(LOGITS).token for _ in range(50)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_draws_follow_the_distribution():
    s = Sampler(SamplingParams(seed=0), 5, [], [])
    counts = torch.bincount(torch.tensor([s(LOGITS).token for _ in range(4000)]), minlength=5) / 4000
    assert torch.allclose(counts, LOGITS.exp(), atol=0.03)


def test_logprobs_are_raw_model_logprobs():
    s = Sampler(SamplingParams(temperature=0, logprobs=2, repetition_penalty=3.0), 5, [], prompt=[0])
    c = s(LOGITS)
    assert c.logprob == pytest.approx(math.log(0.5 if c.token == 0 else 0.2), abs=1e-6)
    assert [t for t, _ in c.top] == [0, 1]


@pytest.mark.parametrize("kw", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(min_p=2), dict(top_k=-1), dict(presence_penalty=3), dict(logprobs=50)])
def test_bad_params(kw):
    with pytest.raises(QtError):
        SamplingParams(**kw)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=INF), "temperature must be a finite number"),
    (dict(temperature=NAN), "temperature must be a finite number"),
    (dict(repetition_penalty=INF), "repetition_penalty must be a finite number"),
    (dict(repetition_penalty=NAN), "repetition_penalty must be a finite number"),
    (dict(top_p=NAN), "top_p must be a finite number"),
    (dict(min_p=NAN), "min_p must be a finite number"),
    (dict(presence_penalty=-INF), "presence_penalty must be a finite number"),
    (dict(frequency_penalty=NAN), "frequency_penalty must be a finite number"),
    (dict(logit_bias={3: NAN}), r"logit_bias\[3\] must be a finite number"),
    (dict(logit_bias={3: -INF}), r"logit_bias\[3\] must be a finite number"),
    (dict(logit_bias={3: 1e39}), r"logit_bias\[3\] must be in \[-100, 100\], got 1e\+39"),
    (dict(logit_bias={0: 5.0, 3: -100.5}), r"logit_bias\[3\] must be in \[-100, 100\]"),
])
def test_non_finite_and_out_of_range_params_name_the_field(kw, message):
    with pytest.raises(QtError, match=message):
        SamplingParams(**kw)


def test_logit_bias_at_its_bounds_is_accepted():
    s = Sampler(SamplingParams(logit_bias={0: -100, 4: 100.0}, seed=0), 5, [], [])
    assert {s(LOGITS).token for _ in range(20)} == {4}


def test_tiny_temperature_is_greedy():
    # 1e-40 is a float32 subnormal: log(0.5) / 1e-40 overflows to -inf for every token
    for t in (1e-40, 1e-6, 5e-324):
        s = Sampler(SamplingParams(temperature=t, logprobs=0), 5, [], [])
        c = s(LOGITS)
        assert c.token == 0 and c.logprob == pytest.approx(math.log(0.5))


def test_huge_temperature_is_uniform_over_what_is_allowed():
    # 1e300 is inf in float32: the EOS that min_tokens masks (-inf / inf) must stay excluded, not become NaN
    s = Sampler(SamplingParams(temperature=1e300, min_tokens=10**6, seed=0), 5, eos_ids=[4], prompt=[])
    counts = torch.bincount(torch.tensor([s(LOGITS).token for _ in range(2000)]), minlength=5) / 2000
    assert counts[4] == 0 and torch.allclose(counts[:4], torch.full((4,), 0.25), atol=0.04)


def test_tiny_repetition_penalty_never_makes_nan():
    inf = float("inf")
    logits = torch.tensor([-inf, 1.0, 0.5, 2.0, 0.0])
    for rp in (1e-30, 5e-324):  # 5e-324 is 0 in float32: -inf * 0 would be NaN
        s = Sampler(SamplingParams(repetition_penalty=rp, seed=0, logprobs=0), 5, [], prompt=[0, 3, 4])
        # token 3 (positive, seen) is divided by ~0: it alone has any probability
        assert [s(logits).token for _ in range(5)] == [3] * 5
        x = Sampler(SamplingParams(repetition_penalty=rp), 5, [], prompt=[0, 3, 4]).process(logits)
        assert not x.isnan().any() and x[0] == -inf and x[3] > 1e29
    s = Sampler(SamplingParams(repetition_penalty=1e-30, seed=0), 3, [], prompt=[0, 1])
    assert {s(torch.tensor([1e9, 5e8, 3.0])).token for _ in range(20)} <= {0, 1}  # 1e9 / 1e-30 = inf in float32
    s = Sampler(SamplingParams(repetition_penalty=1e300, temperature=0), 5, [], prompt=[4])
    assert s.process(logits)[4] == 0.0  # 0 * inf would be NaN


def test_nan_logits_are_excluded():
    nan = float("nan")
    logits = torch.tensor([nan, 1.0, 3.0, nan, 2.0])
    assert Sampler(SamplingParams(temperature=0), 5, [], [])(logits).token == 2  # argmax would pick the NaN
    s = Sampler(SamplingParams(seed=0, top_p=0.9, min_p=0.01, top_k=3), 5, [], [])
    assert {s(logits).token for _ in range(50)} <= {1, 2, 4}


def test_nothing_left_falls_back_to_the_raw_argmax():
    inf = float("-inf")
    # min_tokens masks EOS (2), the only token the model allows: deterministic, not a raise
    logits = torch.tensor([inf, inf, 5.0, inf])
    for params in (SamplingParams(min_tokens=3, seed=0), SamplingParams(min_tokens=3, temperature=0)):
        assert Sampler(params, 4, eos_ids=[2], prompt=[])(logits).token == 2
    assert Sampler(SamplingParams(), 4, [], [])(torch.full((4,), float("nan"))).token == 0


def greedy_reference(xs: list[float]) -> int:
    """The documented greedy rule in plain Python: NaN excluded, the first maximum (+inf counts); if nothing is
    left, the first maximum of the raw logits with NaN and -inf as -1e30."""
    inf = float("inf")
    kept = [(v, -i) for i, v in enumerate(xs) if not math.isnan(v)]
    if kept and max(kept)[0] > -inf:
        return -max(kept)[1]
    ys = [-1e30 if math.isnan(v) or v == -inf else v for v in xs]
    return ys.index(max(ys))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(-3, 3, width=32), st.sampled_from([float("nan"), float("inf"), float("-inf"), 1.0])),
                min_size=1, max_size=12))
def test_greedy_follows_the_rule_with_any_logits(logits):
    s = Sampler(SamplingParams(temperature=0), len(logits), [], [])
    assert s(torch.tensor(logits)).token == greedy_reference(logits)


finite_logit = st.floats(-1e4, 1e4, width=32)
logits_st = st.lists(st.one_of(finite_logit, finite_logit, finite_logit, st.just(float("-inf"))),
                     min_size=1, max_size=40).filter(lambda xs: any(x > float("-inf") for x in xs))


@st.composite
def params_st(draw, vocab):
    token = st.integers(0, vocab - 1)
    return SamplingParams(
        temperature=draw(st.one_of(st.sampled_from([0.0, 1e-40, 1e-5, 1.0]), st.floats(0, 1e300))),
        top_k=draw(st.integers(0, vocab + 2)),
        top_p=draw(st.floats(0, 1, exclude_min=True)),
        min_p=draw(st.floats(0, 1)),
        repetition_penalty=draw(st.one_of(st.sampled_from([1.0, 5e-324, 1e-30]),
                                          st.floats(0, 1e300, exclude_min=True))),
        presence_penalty=draw(st.floats(-2, 2)),
        frequency_penalty=draw(st.floats(-2, 2)),
        min_tokens=draw(st.integers(0, 3)),
        ignore_eos=draw(st.booleans()),
        logit_bias=draw(st.dictionaries(token, st.floats(-100, 100), max_size=4)),
        seed=draw(st.integers(0, 2**32)),
        logprobs=draw(st.integers(0, 3)),
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data(), logits=logits_st)
def test_any_valid_request_samples_an_allowed_token(data, logits):
    """Random logits and random valid parameters: never a raise, always an in-vocab token with a finite logprob."""
    vocab = len(logits)
    params = data.draw(params_st(vocab))
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=5))
    raw = torch.tensor(logits)
    s = Sampler(params, vocab, eos_ids=[vocab - 1], prompt=prompt)
    for _ in range(4):
        c = s(raw)
        assert 0 <= c.token < vocab
        assert math.isfinite(c.logprob) and raw[c.token] > float("-inf")  # never a token the model ruled out
        assert len(c.top or []) == min(params.logprobs, vocab)


def test_generation_config_defaults():
    gen = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.2, "top_p": 0.9,
           "top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 64, "max_length": 2048,
           "transformers_version": "4.42.3", "num_beams": 1}
    want = dict(temperature=0.2, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1, max_tokens=64)
    assert defaults_from_generation_config(gen) == want
    assert SamplingParams(**want).top_p == 0.9
    assert defaults_from_generation_config({"do_sample": False, "temperature": 0.6, "top_p": 0.9}) == dict(
        temperature=0.0, top_p=0.9)
    assert defaults_from_generation_config({"temperature": 1, "top_k": -1, "top_p": None}) == dict(
        temperature=1.0, top_k=0)
    assert defaults_from_generation_config({}) == {}


@pytest.mark.parametrize("gen, message", [
    ({"temperature": -0.5}, r"generation_config.json: temperature = -0.5 is not usable: temperature must be ≥ 0"),
    ({"top_p": 1.5}, r"generation_config.json: top_p = 1.5 is not usable: top_p must be in \(0, 1\]"),
    ({"temperature": float("nan")}, "temperature = nan is not usable: temperature must be a finite number"),
    ({"max_new_tokens": 0}, "max_new_tokens = 0 is not usable: max_tokens must be at least 1"),
    ({"top_k": 2.5}, "generation_config.json: top_k must be an integer, got 2.5"),
    ({"temperature": "0.7"}, "generation_config.json: temperature must be a number, got '0.7'"),
    ({"do_sample": "yes"}, "generation_config.json: do_sample must be true or false, got 'yes'"),
    ({"repetition_penalty": 0}, "repetition_penalty = 0 is not usable: repetition_penalty must be > 0"),
])
def test_generation_config_invalid_value_names_the_key(gen, message):
    with pytest.raises(QtError, match=message):
        defaults_from_generation_config(gen)


def test_logit_bias_outside_vocab():
    with pytest.raises(QtError, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias={9: 1.0}), 5, [], [])


def test_stop_strings_never_leak():
    s = StopStrings(["</s>", "STOP"])
    out = []
    for piece in ["Hello <", "/", "x> wor", "ld S", "TO", "P and more"]:
        text, hit = s.push(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello </x> world " and hit
    s = StopStrings(["ab"])
    assert s.push("xa") == ("x", False)
    assert s.flush() == "a"
