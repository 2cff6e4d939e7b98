"""Checkpoint directories: round trip, atomic writes, and clear errors for bad input."""

import json
import re
import subprocess
import sys

import pytest
import torch

from qt_serve import checkpoint
from qt_serve.errors import QtError

from conftest import tiny_model


def test_roundtrip_is_exact(tiny_ckpt, tokenizer):
    ck = checkpoint.load(tiny_ckpt)
    again = tiny_model(vocab_size=tokenizer.vocab_size)
    for k, v in again.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    assert ck.tokenizer.encode("to be or not") == tokenizer.encode("to be or not")
    assert ck.tokenizer.chat_template == tokenizer.chat_template
    assert json.loads((tiny_ckpt / "generation_config.json").read_text())["eos_token_id"] == 2
    assert sorted(p.name for p in tiny_ckpt.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_dtype_override(tiny_ckpt):
    ck = checkpoint.load(tiny_ckpt, dtype="bfloat16")
    assert next(ck.model.parameters()).dtype == torch.bfloat16
    assert ck.model.lm_head.weight is ck.model.model.embed_tokens.weight  # still tied


def test_crash_while_saving_leaves_previous_checkpoint(tiny_ckpt, monkeypatch):
    before = (tiny_ckpt / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tiny_ckpt, tiny_model(seed=5))
    assert (tiny_ckpt / "model.safetensors").read_bytes() == before
    assert [p.name for p in tiny_ckpt.parent.iterdir()] == ["tiny"]  # no temp dirs left behind
    checkpoint.load(tiny_ckpt)


def test_overwrite_replaces_whole_directory(tiny_ckpt):
    checkpoint.save_checkpoint(tiny_ckpt, tiny_model(seed=7))  # no tokenizer this time
    assert not (tiny_ckpt / "tokenizer.json").exists()
    assert [p.name for p in tiny_ckpt.parent.iterdir()] == ["tiny"]


def corrupt(ckpt, name, content):
    (ckpt / name).write_bytes(content) if isinstance(content, bytes) else (ckpt / name).write_text(content)


@pytest.mark.parametrize("damage, message", [
    (lambda d: None, "is neither a checkpoint directory, a .gguf file nor a known model"),
    (lambda d: (d / "config.json").unlink(), "needs a config.json"),
    (lambda d: corrupt(d, "config.json", "{not json"), "not valid JSON"),
    (lambda d: corrupt(d, "config.json", json.dumps({"architectures": ["GPT2LMHeadModel"]})),
     "architecture ['GPT2LMHeadModel'] is not supported"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda d: corrupt(d, "model.safetensors", (d / "model.safetensors").read_bytes()[:5000]), "truncated or corrupt"),
    (lambda d: corrupt(d, "model.safetensors", b"garbage"), "truncated or corrupt"),
    (lambda d: corrupt(d, "tokenizer.json", "{}"), "not a valid tokenizer"),
])
def test_bad_checkpoints_give_clear_errors(tiny_ckpt, damage, message):
    target = tiny_ckpt.parent / "missing" if message.startswith("is neither") else tiny_ckpt
    damage(tiny_ckpt)
    with pytest.raises(QtError, match=re.escape(message)):
        checkpoint.load(target)


def test_config_mismatch_names_the_tensor(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 99
    corrupt(tiny_ckpt, "config.json", json.dumps(cfg))
    with pytest.raises(QtError, match=r"layers.0.mlp.gate_proj.weight has shape \(128, 64\), config.json implies \(99, 64\)"):
        checkpoint.load(tiny_ckpt)


def test_cli_prints_error_without_traceback(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    r = subprocess.run([sys.executable, "-m", "qt_serve.cli", "--model", str(tmp_path)],
                       capture_output=True, text=True, input="", timeout=120)
    assert r.returncode == 2
    assert "error:" in r.stderr and "BertModel" in r.stderr and "Traceback" not in r.stderr
