"""qt-eval ppl: strided windows against transformers' own Llama, in-process against HTTP, an ONNX checkpoint
through the same engine path, and the bits-per-byte arithmetic."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CORPUS

from evals import ppl
from evals.cli import main as qt_eval
from evals.target import Local, Remote
from qt_serve.errors import QtError
from qt_serve.tokenizer import Tokenizer

TEXT = " ".join(CORPUS[:8])  # 172 tokens of the test tokenizer


def hf_strided_nll(ckpt_dir, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The reference: the strided loop of Hugging Face's perplexity guide on transformers' LlamaForCausalLM,
    with its -100 label masking and its mean loss turned back into a sum."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    nats, tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(x, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())  # the model shifts the labels left: the first predicts nothing
        nats, tokens, prev_end = nats + float(loss) * n, tokens + n, end
        if end == len(ids):
            break
    return nats, tokens


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (11, 4, 3), (172, 64, 24), (5, 8, 4), (300, 255, 1)])
def test_windows_score_every_token_once_with_context(n, window, stride):
    seen = []
    for i, (start, end, first) in enumerate(ppl.windows(n, window, stride)):
        assert end - start <= window and start < first < end
        if i:  # later windows: at least window - stride tokens before each scored one, inside the window
            assert first - start >= window - stride
        seen += range(first, end)
    assert seen == list(range(1, n))


def test_stride_must_overlap_windows():
    with pytest.raises(QtError, match="less than the window"):
        ppl.windows(100, 16, 16)


@pytest.mark.parametrize("window,stride", [(64, 24), (255, 100)])  # strided; one window over the whole text
def test_matches_transformers(ckpt, window, stride):
    ids = Tokenizer.load(ckpt).encode(TEXT)
    want, n = hf_strided_nll(ckpt, ids, window, stride)
    got = ppl.measure(Local.load(str(ckpt), slots=1), [TEXT], window, stride)
    assert got["scored_tokens"] == n == len(ids) - 1
    assert got["windows"] == len(ppl.windows(len(ids), window, stride)) == (6 if window == 64 else 1)
    assert got["nats"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want / n), rel=1e-5)


def test_http_agrees_with_in_process(server, ckpt):
    remote = Remote(server.url, "tiny", concurrency=3)
    assert remote.context == 128 and remote.tokenize(TEXT) == Local.load(str(ckpt)).tokenize(TEXT)
    over_http = ppl.measure(remote, [TEXT, CORPUS[2]], stride=50)  # window: the server's context less one
    local = ppl.measure(Local.load(str(ckpt), max_seq_len=128), [TEXT, CORPUS[2]], stride=50)
    assert over_http["window"] == local["window"] == 127 and over_http["windows"] == local["windows"] == 3
    for k in ("documents", "tokens", "scored_tokens", "bytes"):
        assert over_http[k] == local[k]
    assert over_http["nats"] == pytest.approx(local["nats"], rel=1e-5)
    with pytest.raises(QtError, match="does not fit the model's context of 128"):
        ppl.measure(remote, [TEXT], window=128)


def test_onnx_checkpoint_through_the_engine(ckpt, tmp_path):
    from quant.convert import convert

    onnx_dir = convert(ckpt, "onnx", tmp_path / "onnx")
    fp32 = ppl.measure(Local.load(str(ckpt)), [TEXT], 64, 24)
    onnx = ppl.measure(Local.load(str(onnx_dir)), [TEXT], 64, 24)
    assert onnx["nats"] == pytest.approx(fp32["nats"], rel=1e-4)  # same fp32 weights, another runtime


class Chars:
    """A stand-in model: a token per character, each given probability 1/4."""

    name, context = "chars", 5

    def tokenize(self, text):
        return [ord(c) for c in text]

    def score(self, windows):
        for i, w in enumerate(windows):
            yield i, [-math.log(4)] * (len(w) - 1)


def test_bits_per_byte_known_case():
    text = "héllo 東京"  # 8 characters, 13 UTF-8 bytes (é two, each kanji three)
    r = ppl.measure(Chars(), [text], stride=2)  # window 4 (context 5 less one): 3 windows
    assert (r["tokens"], r["scored_tokens"], r["bytes"], r["windows"]) == (8, 7, 13, 3)
    assert r["cross_entropy"] == pytest.approx(math.log(4)) and r["perplexity"] == pytest.approx(4)
    assert r["bits_per_byte"] == pytest.approx(7 * 2 / 13)  # 7 scored tokens of 2 bits over 13 bytes
    assert ppl.summary(13 * 2 * math.log(2), 9, 13)["bits_per_byte"] == pytest.approx(2.0)


def test_cli_writes_json_and_markdown(ckpt, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n\n" + json.dumps(CORPUS[3]) + "\n")
    assert qt_eval(["ppl", str(ckpt), "--data", str(data), "--window", "32", "--stride", "16",
                    "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "ppl.json").read_text())
    assert (r["documents"], r["window"], r["stride"], r["data"]) == (2, 32, 16, str(data))
    assert r["bytes"] == len(TEXT.encode()) + len(CORPUS[3].encode())
    md = (tmp_path / "out" / "ppl.md").read_text()
    assert f"| {r['perplexity']:.4f} |" in md and md in capsys.readouterr().out
    with pytest.raises(QtError, match="neither a file nor a built-in corpus"):
        ppl.read_texts(str(tmp_path / "missing.txt"))
