"""quant.convert: fp16 / bf16 casts (half the size, loadable by transformers unchanged) and the CLI's bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tokenizer, tiny_model

from qt_serve.checkpoint import load, save_checkpoint
from qt_serve.errors import QtError
from quant.cli import main
from quant.convert import convert


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tok = build_tokenizer()
    return save_checkpoint(tmp_path_factory.mktemp("cast") / "tiny", tiny_model(vocab_size=tok.vocab_size), tok)


def size(d) -> int:
    return (d / "model.safetensors").stat().st_size


@pytest.mark.parametrize("to,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_is_half_size_and_loads_in_transformers(source, to, dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    before = {k: v.clone() for k, v in load(source).model.state_dict().items()}
    out = convert(source, to, tmp_path / to)
    assert abs(size(out) / size(source) - 0.5) < 0.01  # the header is the only part that does not halve
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == str(dtype)[6:] and cfg["qt"]["quantization"]["scheme"] == to
    hf = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert hf.dtype == dtype
    for name, tensor in hf.state_dict().items():  # the cast weights, read back by an independent loader
        assert torch.equal(tensor, before[name].to(dtype)), name
    ids = torch.tensor([[5, 17, 99, 3, 250, 8]])
    with torch.no_grad():
        ours = load(out).model(ids).float()
        theirs = hf(ids).logits.float()
        fp32 = load(source).model(ids)
    torch.testing.assert_close(ours, theirs, atol=0.15, rtol=0.02)  # two implementations rounding to 8-11 bits
    assert float((ours - fp32).norm() / fp32.norm()) < 0.02


def test_cli_and_bad_input(source, tmp_path, capsys):
    assert main([str(source), "--to", "bf16", "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "b")
    assert main([str(source), "--to", "bf16", "--group-size", "64"]) == 2  # group size is for int8 / int4 only
    assert "--group-size applies to int8, int4 and onnx-int4, not bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(source), "--to", "int3"])  # argparse lists the choices
    assert main([str(tmp_path / "nowhere"), "--to", "fp16"]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err
    bare = save_checkpoint(tmp_path / "bare", tiny_model(vocab_size=400))  # no tokenizer
    with pytest.raises(QtError, match="no tokenizer"):
        convert(bare, "fp16")
    again = convert(tmp_path / "b", "fp16", tmp_path / "c")  # a cast of a cast is allowed: no rounding compounds
    assert load(again).model.lm_head.weight.dtype == torch.float16
