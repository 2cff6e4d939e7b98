"""Import a llama.cpp GGUF file as a qt checkpoint (weights, tokenizer, chat template).

Architectures, as llama.cpp's convert_hf_to_gguf.py writes them (metadata keys are
prefixed with the architecture name, `qwen2.block_count`, ...):

    GGUF arch  qt model_type     written from                    Q/K rows   extra tensors
    llama      llama | mistral   Llama 1-3, Mistral (HF Llama)   permuted   rope_freqs (Llama 3.1+)
    qwen2      qwen2             Qwen2, Qwen2.5                  as in HF   attn_{q,k,v}.bias
    qwen3      qwen3             Qwen3                           as in HF   attn_{q,k}_norm.weight

The converter permutes the rows of Llama's Q and K projections (weights and biases) so
RoPE rotates adjacent pairs; HF's layout rotates the two halves of each head, so we undo
that permutation. Qwen files use NEOX-style RoPE, the HF layout, and are not permuted.
A Mistral model converts to arch "llama" and nothing in the file names it: the converter
writes no sliding window for it, so it imports as a Llama with full attention. Only a
"llama" file that carries `llama.attention.sliding_window` > 0 imports as model_type
"mistral" with that window, HF's Llama having none. The Qwen architectures' window key
is not read (the converter writes none, and HF's Qwen window is off unless
use_sliding_window, which GGUF has no key for).

RoPE scaling: `{arch}.rope.scaling.type` "none" or "linear". Llama 3.1's scaling is not
in the metadata but in `rope_freqs.weight`, per-frequency divisors f_i (llama.cpp
rotates pair i by inv_freq_i / f_i); we recover the HF `rope_scaling` {"rope_type":
"llama3", ...} that gives the same frequencies and refuse the file if none does.

Weights are dequantized to fp32 with the `gguf` package (F32/F16/BF16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0 and the K-quants). The tokenizer is rebuilt as a `tokenizers` BPE:
byte-level from the vocabulary, merges and pre-tokenizer name (`tokenizer.ggml.model`
"gpt2"), or SentencePiece-style with byte fallback from the vocabulary and piece scores
("llama": Llama 2, Mistral v0.1-v0.3).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from qt_serve.config import ModelConfig
from qt_serve.errors import QtError
from qt_serve.model import rope_inv_freq
from qt_serve.tokenizer import Tokenizer

# GGUF architecture -> qt model_type (a "llama" file with a sliding window becomes "mistral")
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED = {"llama"}  # architectures whose Q/K rows the converter permuted

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
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
ROPE_FREQS = "rope_freqs.weight"

# llama.cpp pre-tokenizer names -> the split regex (after which bytes map to GPT-2's alphabet)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Llama 3's, but every digit alone
PRE_TOKENIZERS = {
    "default": [GPT2_SPLIT],
    "gpt-2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # every digit alone, then GPT-2's split
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
}
NFC_PRE_TOKENIZERS = {"qwen2"}  # HF's Qwen2 tokenizer NFC-normalizes the text first

# tokenizer.ggml.token_type values (SentencePiece's piece types)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

# Llama 3.x rope_scaling, tried before fitting one: 3.1 (factor 8) and 3.2 (factor 32)
LLAMA3_STANDARD = [{"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192} for f in (8.0, 32.0)]


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of a (n_head*head_dim, ...) Q/K weight or bias."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t, path) -> np.ndarray:
    """A GGUF tensor as fp32 in PyTorch's shape order (GGUF lists dimensions innermost first)."""
    from gguf import quants

    try:
        w = quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, quants.QuantError, KeyError, ValueError) as e:
        raise QtError(f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which qt "
                      f"cannot dequantize ({e}); use an F16/Q8_0/Q4_0/Q4_1/K-quant file") from None
    return np.asarray(w, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))


def read_config(reader, path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise QtError(f"{path}: GGUF architecture {arch!r} is not supported; qt imports "
                      f"{', '.join(repr(a) for a in ARCHITECTURES)} GGUF files")
    a = arch
    required = [f"{a}.{k}" for k in ("attention.head_count", "embedding_length", "feed_forward_length",
                                     "block_count")] + ["tokenizer.ggml.tokens"]
    missing = [k for k in required if k not in reader.fields]
    if missing:
        raise QtError(f"{path}: GGUF metadata lacks {', '.join(missing)}; the file is incomplete")
    n_head = _field(reader, f"{a}.attention.head_count")
    hidden = _field(reader, f"{a}.embedding_length")
    head_dim = _field(reader, f"{a}.attention.key_length", hidden // n_head)
    rope_dim = _field(reader, f"{a}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise QtError(f"{path}: RoPE over {rope_dim} of the {head_dim} head dimensions (partial rotary) "
                      "is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    window = _field(reader, f"{a}.attention.sliding_window", 0) if a == "llama" else 0
    family = "mistral" if window else ARCHITECTURES[a]
    cfg = ModelConfig(
        model_type=family,
        vocab_size=_field(reader, f"{a}.vocab_size", len(tokens)),
        hidden_size=hidden,
        intermediate_size=_field(reader, f"{a}.feed_forward_length"),
        num_hidden_layers=_field(reader, f"{a}.block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=_field(reader, f"{a}.attention.head_count_kv", n_head),
        head_dim=head_dim,
        max_position_embeddings=_field(reader, f"{a}.context_length", 2048),
        rope_theta=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        # Qwen2's q/k/v biases come with its family; elsewhere they are HF's attention_bias (o_proj too)
        attention_bias=family != "qwen2" and "blk.0.attn_q.bias" in names,
        sliding_window=window or None,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos_ids(reader),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    factor = _field(reader, f"{a}.rope.scaling.factor")
    kind = _field(reader, f"{a}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise QtError(f"{path}: rope scaling {kind!r} in GGUF is not supported (none, linear, rope_freqs)")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        if kind == "linear" and factor not in (None, 1.0):
            raise QtError(f"{path}: linear rope scaling on top of per-frequency factors is not supported")
        cfg.rope_scaling = llama3_rope_scaling(_dequantize(freqs, path), cfg, path)
    elif kind == "linear" and factor:
        cfg.rope_scaling = {"rope_type": "linear", "factor": float(factor)}
    return cfg


def _fit_llama3(factors: np.ndarray, inv_freq: np.ndarray) -> dict | None:
    """An HF llama3 rope_scaling with low_freq_factor 1 whose divisors are `factors`, or None.

    Per frequency, with u = 1/wavelength = inv_freq/2π, HF keeps inv_freq where
    s = (old_len·u − lo)/(hi − lo) ≥ 1, divides it by `factor` where s ≤ 0, and in between
    uses inv_freq·((1−s)/factor + s). Only old_len/lo and hi/lo are identified, so lo = 1:
    s = a·u + b with a = old_len/(hi−1), b = −1/(hi−1). Each divisor f gives s clipped to
    [0, 1]; we find a line through the clipped-inside points that clips the others right.
    """
    factor = float(factors.max())
    if factor <= 1:  # llama3 only ever divides frequencies
        return None
    u = inv_freq / (2 * math.pi)
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 0: divided by factor, 1: kept
    low, high = s <= 1e-6, s >= 1 - 1e-6
    ramp = ~low & ~high
    if ramp.sum() >= 2:
        a, b = np.polyfit(u[ramp], s[ramp], 1)
    else:
        u_low = u[low].max()  # the highest frequency still divided by `factor`
        u_high = u[high].min() if high.any() else 2 * u.max()  # the lowest one kept (or beyond them all)
        if ramp.any():  # one point on the ramp: a line through it, steep enough to reach 0 and 1 before its neighbours
            (um,), (sm,) = u[ramp], s[ramp]
            a = 2 * max(sm / (um - u_low), (1 - sm) / (u_high - um))
            b = sm - a * um
        else:  # the whole ramp fits between the neighbours: its middle third
            a = 3 / (u_high - u_low)
            b = -a * (u_low + (u_high - u_low) / 3)
    if not (a > 0 and b < 0):
        return None
    hi = 1 - 1 / b
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(hi),
            "original_max_position_embeddings": float(a * (hi - 1))}


def llama3_rope_scaling(factors: np.ndarray, cfg: ModelConfig, path) -> dict | None:
    """The HF rope_scaling that gives llama.cpp's rotation frequencies inv_freq / factors (head_dim/2,).

    The standard Llama 3.x values when they reproduce them, else a fit (see `_fit_llama3`),
    rounded when rounding keeps it exact; checked against `rope_inv_freq` either way.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (cfg.head_dim // 2,) or not np.all(factors > 0):
        raise QtError(f"{path}: {ROPE_FREQS} holds {factors.size} factors, expected {cfg.head_dim // 2} positive "
                      "ones (one per rotated pair of a head)")
    inv_freq = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)).double().numpy()
    if np.allclose(factors, 1.0, rtol=1e-6, atol=0):
        return None
    want = inv_freq / factors

    def reproduces(scaling):
        got = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=scaling)).double().numpy()
        return bool(np.all(np.abs(got - want) <= 1e-4 * want))

    candidates = list(LLAMA3_STANDARD)
    fit = _fit_llama3(factors, inv_freq)
    if fit is not None:
        rounded = {k: round(v, 4) for k, v in fit.items()}
        rounded["original_max_position_embeddings"] = round(fit["original_max_position_embeddings"])
        candidates += [rounded, fit]
    for c in candidates:
        scaling = {"rope_type": "llama3", **c}
        if reproduces(scaling):
            return scaling
    raise QtError(f"{path}: the per-frequency RoPE factors in {ROPE_FREQS} match no Llama-3 rope scaling "
                  "(factor, low/high_freq_factor, original_max_position_embeddings); qt cannot run this model")


def read_tensors(reader, cfg: ModelConfig, path) -> dict[str, torch.Tensor]:
    arch = _field(reader, "general.architecture")
    names = {}
    for g, h in TENSOR_NAMES.items():
        for i in range(cfg.num_hidden_layers) if "{}" in g else [None]:
            names[g.format(i)] = h.format(i)
    out = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # read into cfg.rope_scaling
        if t.name not in names:
            raise QtError(f"{path}: unexpected tensor {t.name!r} for a {arch} model")
        w = _dequantize(t, path)
        if arch in PERMUTED and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute(w, cfg.num_attention_heads)
        elif arch in PERMUTED and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute(w, cfg.num_key_value_heads)
        out[names[t.name]] = torch.from_numpy(np.array(w, order="C"))  # a writable copy
    return out


def _byte_level_bpe(reader, tokens, types, path) -> HFTokenizer:
    """GPT-2-style BPE over bytes mapped to printable characters, after a regex split."""
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise QtError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre in NFC_PRE_TOKENIZERS:
        tok.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(reader, tokens, types, path) -> HFTokenizer:
    """SentencePiece-style BPE over characters, spaces as "▁", unknown characters as <0xXX> byte pieces.

    SentencePiece (and llama.cpp) repeatedly joins the adjacent pair whose joined piece
    scores highest. As `tokenizers` merges that is every split of a normal piece into two
    normal pieces, ranked by the joined piece's score, as HF's LlamaConverter builds it.
    The text gets a "▁" in front (`add_space_prefix`, llama.cpp's default) even when it
    starts with a space, as SentencePiece and llama.cpp do: a Prepend normalizer (HF's
    legacy Llama tokenizer), not the Metaspace pre-tokenizer, which skips that "▁".
    """
    scores = _field(reader, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise QtError(f"{path}: a SentencePiece ('llama') GGUF tokenizer needs one tokenizer.ggml.scores "
                      "entry per token; the file is incomplete")
    normal = {t for t, ty in zip(tokens, types) if ty == TOKEN_NORMAL}
    ranked = sorted((-scores[i], i, t[:k], t[k:]) for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL
                    for k in range(1, len(t)) if t[:k] in normal and t[k:] in normal)
    unk = next((t for t, ty in zip(tokens, types) if ty == TOKEN_UNKNOWN), None)
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[m[2:] for m in ranked],
                                 unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)  # the prefix "▁" is not text
    return tok


# tokenizer.ggml.model -> (builder, whether llama.cpp adds a BOS when add_bos_token is absent)
TOKENIZER_MODELS = {"gpt2": (_byte_level_bpe, False), "llama": (_sentencepiece_bpe, True)}


def read_tokenizer(reader, path) -> Tokenizer:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise QtError(f"{path}: GGUF tokenizer model {kind!r} is not supported; qt rebuilds 'gpt2' (byte-level "
                      "BPE) and 'llama' (SentencePiece BPE) tokenizers")
    build, bos_default = TOKENIZER_MODELS[kind]
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    tok = build(reader, tokens, types, path)
    added = [AddedToken(t, special=ty in (TOKEN_CONTROL, TOKEN_UNKNOWN), normalized=False)
             for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)]
    tok.add_tokens(added)  # ids already exist in the vocab, so they keep them
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None else None
    if _field(reader, "tokenizer.ggml.add_bos_token", bos_default) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    arch = _field(reader, "general.architecture")
    config = {"bos_token": bos, "eos_token": tokens[eos_id] if eos_id is not None else None,
              "chat_template": _field(reader, "tokenizer.chat_template"),
              "model_max_length": _field(reader, f"{arch}.context_length")}
    return Tokenizer(tok, {k: v for k, v in config.items() if v is not None})


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise QtError(f"{path} is not a readable GGUF file ({e})") from None
    cfg = read_config(reader, path)
    return cfg, read_tensors(reader, cfg, path), read_tokenizer(reader, path)


def eos_ids(reader) -> int | list[int] | None:
    """The end-of-sequence id, with llama.cpp's end-of-turn / end-of-message ids (Llama 3's <|eot_id|>,
    <|eom_id|>) when the file has them: generation stops at any, as at generation_config.json's list."""
    ids = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    return ids[0] if len(ids) == 1 else ids or None


def load_gguf(path, dtype=None, device="cpu", max_seq_len=None):
    from qt_serve.checkpoint import Checkpoint, build_model

    cfg, tensors, tokenizer = read_gguf(path)
    model = build_model(cfg, tensors, str(path), dtype, device, max_seq_len)
    return Checkpoint(model, tokenizer, {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id},
                      str(path))
