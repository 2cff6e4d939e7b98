"""GGUF import against the weights and tokenizer it was written from."""

import json

import gguf
import numpy as np
import pytest
import torch

from qt_serve import checkpoint
from qt_serve.errors import QtError
from qt_serve.gguf_import import TENSOR_NAMES

from conftest import tiny_model

QT = gguf.GGMLQuantizationType


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (the import must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tokenizer, qtype=QT.F32, arch="llama", tok_model="gpt2", f64_tensor=False):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    spec = json.loads(tokenizer.tok.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in tokenizer.special_ids else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)
    hf_to_gguf = {h.format(i): g.format(i) for g, h in TENSOR_NAMES.items() for i in range(cfg.num_hidden_layers)}
    sd = checkpoint.state_dict_for_saving(model)
    for name, t in sd.items():
        a = t.numpy()
        if name.endswith("q_proj.weight"):
            a = permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype != QT.F32:
            w.add_tensor(hf_to_gguf[name], gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(hf_to_gguf[name], a.astype(np.float64) if f64_tensor and a.ndim == 1 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def model(tokenizer):
    return tiny_model(vocab_size=tokenizer.vocab_size)


def test_f32_gguf_imports_exactly(tmp_path, model, tokenizer):
    ck = checkpoint.load(write_gguf(tmp_path / "m.gguf", model, tokenizer))
    idx = torch.randint(0, tokenizer.vocab_size, (1, 40))
    with torch.no_grad():
        assert (ck.model(idx) - model(idx)).abs().max() < 1e-5
    for text in ["To be, or not to be", "café 東京 😀 12345!!", "  spaces\n\nnewlines\tand tabs ", "<|im_start|>user"]:
        assert ck.tokenizer.encode(text) == tokenizer.encode(text), text
        assert ck.tokenizer.decode(ck.tokenizer.encode(text)) == text
    msgs = [{"role": "user", "content": "hi"}]
    assert ck.tokenizer.encode_chat(msgs) == tokenizer.encode_chat(msgs)
    assert ck.config.eos_token_id == tokenizer.eos_id and ck.config.tie_word_embeddings


@pytest.mark.parametrize("qtype", [QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_quantized_gguf_dequantizes_to_the_quantized_weights(tmp_path, model, tokenizer, qtype):
    ck = checkpoint.load(write_gguf(tmp_path / "m.gguf", model, tokenizer, qtype))
    got = ck.model.state_dict()
    for name, w in model.state_dict().items():
        a = w.numpy()
        want = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype) if a.ndim == 2 else a
        assert np.array_equal(got[name].numpy(), want), name


def test_import_then_save_is_a_checkpoint_dir(tmp_path, model, tokenizer):
    ck = checkpoint.load(write_gguf(tmp_path / "m.gguf", model, tokenizer, QT.Q8_0))
    checkpoint.save_checkpoint(tmp_path / "dir", ck.model, ck.tokenizer, ck.generation_config)
    again = checkpoint.load(tmp_path / "dir")
    assert again.tokenizer.chat_template == tokenizer.chat_template
    idx = torch.randint(0, tokenizer.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(again.model(idx), ck.model(idx))


@pytest.mark.parametrize("kw, message", [
    (dict(arch="gpt2"), "GGUF architecture 'gpt2' is not supported"),
    (dict(tok_model="llama"), "GGUF tokenizer model 'llama' is not supported"),
    (dict(f64_tensor=True), "quantization type F64, which qt cannot dequantize"),
])
def test_unsupported_gguf_gives_clear_error(tmp_path, model, tokenizer, kw, message):
    path = write_gguf(tmp_path / "m.gguf", model, tokenizer, **kw)
    with pytest.raises(QtError, match=message):
        checkpoint.load(path)


def test_truncated_gguf(tmp_path, model, tokenizer):
    path = write_gguf(tmp_path / "m.gguf", model, tokenizer)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(QtError, match="not a readable GGUF file"):
        checkpoint.load(path)
