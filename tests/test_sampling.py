"""Sampling filters, penalties, seeds and stop strings, each against a hand-worked case."""

import math

import pytest
import torch

from qt_serve.errors import QtError
from qt_serve.sampling import Sampler, SamplingParams, StopStrings

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
