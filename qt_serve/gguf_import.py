"""Import a llama.cpp GGUF file as a qt checkpoint (weights, tokenizer, chat template).

Weights are dequantized to fp32 with the `gguf` package (F32/F16/BF16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0 and the K-quants). llama.cpp's converter permutes the rows of the
Q and K projections so RoPE rotates adjacent pairs; HF's layout rotates the two
halves of each head, so we undo that permutation. The tokenizer is rebuilt as a
`tokenizers` byte-level BPE from the GGUF vocabulary, merges and pre-tokenizer name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from qt_serve.config import ModelConfig
from qt_serve.errors import QtError
from qt_serve.tokenizer import Tokenizer

# GGUF tensor names -> HF names ("{}" is the layer index)
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

# llama.cpp pre-tokenizer names -> the split regex (after which bytes map to GPT-2's alphabet)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": [GPT2_SPLIT],
    "gpt-2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # every digit alone, then GPT-2's split
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
}

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of a (n_head*head_dim, in) Q/K weight."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader, path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise QtError(f"{path}: GGUF architecture {arch!r} is not supported; qt imports 'llama' GGUF files")
    a = arch
    required = [f"{a}.{k}" for k in ("attention.head_count", "embedding_length", "feed_forward_length",
                                     "block_count")] + ["tokenizer.ggml.tokens"]
    missing = [k for k in required if k not in reader.fields]
    if missing:
        raise QtError(f"{path}: GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
    n_head = _field(reader, f"{a}.attention.head_count")
    hidden = _field(reader, f"{a}.embedding_length")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        vocab_size=_field(reader, f"{a}.vocab_size", len(tokens)),
        hidden_size=hidden,
        intermediate_size=_field(reader, f"{a}.feed_forward_length"),
        num_hidden_layers=_field(reader, f"{a}.block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=_field(reader, f"{a}.attention.head_count_kv", n_head),
        head_dim=_field(reader, f"{a}.attention.key_length", hidden // n_head),
        max_position_embeddings=_field(reader, f"{a}.context_length", 2048),
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=not has_output,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    factor = _field(reader, f"{a}.rope.scaling.factor")
    kind = _field(reader, f"{a}.rope.scaling.type", "none")
    if kind == "linear" and factor:
        cfg.rope_scaling = {"rope_type": "linear", "factor": float(factor)}
    elif kind not in ("none", None):
        raise QtError(f"{path}: rope scaling {kind!r} in GGUF is not supported")
    return cfg


def read_tensors(reader, cfg: ModelConfig, path) -> dict[str, torch.Tensor]:
    from gguf import quants

    names = {}
    for g, h in TENSOR_NAMES.items():
        for i in range(cfg.num_hidden_layers) if "{}" in g else [None]:
            names[g.format(i)] = h.format(i)
    out = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise QtError(f"{path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not supported yet")
        if t.name not in names:
            raise QtError(f"{path}: unexpected tensor {t.name!r} for a llama model")
        try:
            w = quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, quants.QuantError, KeyError, ValueError) as e:
            raise QtError(f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which qt "
                          f"cannot dequantize ({e}); use an F16/Q8_0/Q4_0/Q4_1/K-quant file") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, cfg.num_key_value_heads)
        out[names[t.name]] = torch.from_numpy(np.array(w, order="C"))  # a writable copy
    return out


def read_tokenizer(reader, path) -> Tokenizer:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise QtError(f"{path}: GGUF tokenizer model {kind!r} is not supported; qt rebuilds byte-level "
                      "BPE ('gpt2') tokenizers")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise QtError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=ty == TOKEN_CONTROL, normalized=False)
             for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tok.add_tokens(added)  # ids already exist in the vocab, so they keep them
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None else None
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    config = {"bos_token": bos, "eos_token": tokens[eos_id] if eos_id is not None else None,
              "chat_template": _field(reader, "tokenizer.chat_template"),
              "model_max_length": _field(reader, "llama.context_length")}
    return Tokenizer(tok, {k: v for k, v in config.items() if v is not None})


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise QtError(f"{path} is not a readable GGUF file ({e})") from None
    cfg = read_config(reader, path)
    return cfg, read_tensors(reader, cfg, path), read_tokenizer(reader, path)


def load_gguf(path, dtype=None, device="cpu", max_seq_len=None):
    from qt_serve.checkpoint import Checkpoint, build_model

    cfg, tensors, tokenizer = read_gguf(path)
    model = build_model(cfg, tensors, str(path), dtype, device, max_seq_len)
    return Checkpoint(model, tokenizer, {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id},
                      str(path))
