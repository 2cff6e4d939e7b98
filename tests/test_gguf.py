"""GGUF import against the weights and tokenizer it was written from, and against quantized blocks
built byte by byte here (GGML's block layouts), so the reference is not the dequantizer the import calls."""

import json
import struct

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


def add_shape(w, cfg, rope_theta: float) -> None:
    """The model's sizes as GGUF metadata; `cfg` is a qt ModelConfig or a transformers config (same names)."""
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def write_gguf(path, model, tokenizer, qtype=QT.F32, arch="llama", tok_model="gpt2", f64_tensor=False, raw=None):
    """`raw` maps GGUF tensor names to (bytes as uint8 rows, quantization type), written as they are."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    add_shape(w, cfg, cfg.rope_theta)
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
        if raw and hf_to_gguf[name] in raw:
            data, rtype = raw[hf_to_gguf[name]]
            w.add_tensor(hf_to_gguf[name], data, raw_dtype=rtype)
        elif a.ndim == 2 and qtype != QT.F32:
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


# ---- quantized blocks by hand ---------------------------------------------------------------
# GGML blocks of 32 weights, little-endian, fp16 scales:
#   Q8_0: d, 32 × int8 q                 w = q · d
#   Q4_0: d, 16 bytes of nibbles         w = (q − 8) · d
#   Q4_1: d, m, 16 bytes of nibbles      w = q · d + m
# In the nibble bytes, byte j holds element j in its low nibble and element j + 16 in its high one.


def block_bytes(qtype, d: float, q: list[int], m: float = 0.0) -> bytes:
    assert len(q) == 32
    if qtype == QT.Q8_0:
        return struct.pack("<e32b", d, *q)
    nibbles = bytes(q[j] | q[j + 16] << 4 for j in range(16))
    return struct.pack("<e", d) + (struct.pack("<e", m) if qtype == QT.Q4_1 else b"") + nibbles


def block_values(qtype, d: float, q: list[int], m: float = 0.0) -> list[float]:
    d, m = np.float32(np.float16(d)), np.float32(np.float16(m))  # the stored fp16 values, widened
    if qtype == QT.Q8_0:
        return [np.float32(qi) * d for qi in q]
    if qtype == QT.Q4_0:
        return [np.float32(qi - 8) * d for qi in q]
    return [np.float32(qi) * d + m for qi in q]


@pytest.mark.parametrize("qtype, d, m, q, want", [
    # d = 0.5, nibbles 0..15 then 15..0
    (QT.Q4_0, 0.5, 0.0, list(range(16)) + list(range(15, -1, -1)),
     [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5,
      3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0]),
    # d = 0.25, m = -1: q · 0.25 − 1 for q = 0..15, then q = 15 sixteen times
    (QT.Q4_1, 0.25, -1.0, list(range(16)) + [15] * 16,
     [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75] + [2.75] * 16),
    # d = -0.125, q = −128, −127, 0, 1, 127 and zeros
    (QT.Q8_0, -0.125, 0.0, [-128, -127, 0, 1, 127] + [0] * 27, [16.0, 15.875, 0.0, -0.125, -15.875] + [0.0] * 27),
])
def test_hand_block_formulas(qtype, d, m, q, want):
    """The reference itself, on numbers worked out by hand (and the block sizes GGML uses)."""
    assert block_values(qtype, d, q, m) == want
    assert len(block_bytes(qtype, d, q, m)) == {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20}[qtype]
    assert block_bytes(QT.Q4_0, 0.5, list(range(16)) + list(range(15, -1, -1)))[:4] == bytes([0x00, 0x38, 0xF0, 0xE1])


def hand_quantize(a: np.ndarray, qtype, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks for a (rows, cols) GGUF-layout tensor -> (uint8 rows of block bytes, their fp32 values)."""
    rows, cols = a.shape
    data, values = [], []
    for _ in range(rows):
        row_bytes, row_values = b"", []
        for _ in range(cols // 32):
            d = float(np.float16(rng.uniform(0.01, 0.06) * rng.choice([-1, 1])))
            m = float(np.float16(rng.uniform(-0.4, 0.0)))
            q = rng.integers(-128, 128, 32) if qtype == QT.Q8_0 else rng.integers(0, 16, 32)
            row_bytes += block_bytes(qtype, d, q.tolist(), m)
            row_values += block_values(qtype, d, q.tolist(), m)
        data.append(np.frombuffer(row_bytes, dtype=np.uint8))
        values.append(row_values)
    return np.stack(data), np.array(values, dtype=np.float32)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF-layout rows of a GGUF Q/K weight, by inverting this file's `permute` (not the importer's)."""
    idx = permute(np.arange(w.shape[0]), n_head)
    out = np.empty_like(w)
    out[idx] = w
    return out


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
def test_quantized_gguf_imports_the_hand_computed_weights(tmp_path, model, tokenizer, qtype):
    cfg = model.config
    rng = np.random.default_rng(int(qtype))
    raw, want = {}, {}
    for g, h in TENSOR_NAMES.items():
        for i in range(cfg.num_hidden_layers) if "{}" in g else [None]:
            hf = h.format(i)
            if hf not in model.state_dict() or hf == "lm_head.weight" or model.state_dict()[hf].ndim != 2:
                continue
            a = model.state_dict()[hf].numpy()
            if hf.endswith(("q_proj.weight", "k_proj.weight")):  # GGUF layout: the rows permuted
                a = permute(a, cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads)
            data, values = hand_quantize(a, qtype, rng)
            raw[g.format(i)] = (data, qtype)
            if hf.endswith("q_proj.weight"):
                values = unpermute_rows(values, cfg.num_attention_heads)
            elif hf.endswith("k_proj.weight"):
                values = unpermute_rows(values, cfg.num_key_value_heads)
            want[hf] = values
    assert len(want) == 1 + 7 * cfg.num_hidden_layers  # embedding + 7 matrices per layer, all hand-made
    ck = checkpoint.load(write_gguf(tmp_path / "m.gguf", model, tokenizer, raw=raw))
    got = ck.model.state_dict()
    for name, w in model.state_dict().items():
        expected = want.get(name, want["model.embed_tokens.weight"] if name == "lm_head.weight" else w.numpy())
        np.testing.assert_allclose(got[name].numpy(), expected, rtol=0, atol=1e-6, err_msg=name)

    # transformers, given the hand-computed weights, computes the same logits as the imported model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    hf = LlamaForCausalLM(hf_cfg).eval()
    sd = {k: torch.from_numpy(want[k]) if k in want else v for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(idx).logits - ck.model(idx)).abs().max() < 1e-4


def test_f16_gguf_imports_the_fp16_rounded_weights(tmp_path, model, tokenizer):
    ck = checkpoint.load(write_gguf(tmp_path / "m.gguf", model, tokenizer, QT.F16))
    got = ck.model.state_dict()
    for name, w in model.state_dict().items():
        a = w.numpy()
        want = a.astype(np.float16).astype(np.float32) if a.ndim == 2 else a
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
    (dict(tok_model="bert"), "GGUF tokenizer model 'bert' is not supported"),
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
