"""A Llama-style decoder-only transformer, top to bottom.

    tokens ─> embed_tokens ─> N × [ x + Attn(RMSNorm(x)),  x + MLP(RMSNorm(x)) ] ─> norm ─> lm_head ─> logits

Attention is grouped-query (num_key_value_heads ≤ num_attention_heads) with rotary
position embeddings (RoPE, Su et al. 2021; Llama-3 frequency scaling); the MLP is
SwiGLU (Shazeer 2020). Parameter names are Hugging Face's
(`model.layers.0.self_attn.q_proj.weight`, ...), so a state dict moves between this
module and `transformers.LlamaForCausalLM` without renaming.

The model knows nothing of tokens, sampling or files. `forward` takes token ids,
their positions and, when decoding, a `KVCache` whose keys and values it extends in
place. Quantization, LoRA and compilation are applied from outside (module swaps).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from qt_serve.config import ModelConfig
from qt_serve.errors import QtError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (as HF does) so bf16/fp16 weights give the same result.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies (head_dim/2,), with the checkpoint's rope_scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, blended, scaled)
    raise QtError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def rope_tables(cfg: ModelConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for positions 0..n-1: (n, head_dim) each, computed in fp32."""
    freqs = torch.outer(torch.arange(n).float(), rope_inv_freq(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    # HF's layout: the first and second halves of head_dim form the rotated pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys and values of every layer: (layers, batch, kv_heads, max_len, head_dim).

    Static shapes: nothing is concatenated while decoding. Row b holds one sequence;
    position p of it lives at index p, so a row is reused by simply writing over it
    (stale entries past a row's current position are masked out).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def rows(self, start: int, n: int) -> KVCache:
        """A view of rows start..start+n-1 (same storage), for a forward over n sequences."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, start:start + n], self.v[:, start:start + n], self.max_len
        return view

    def bind(self, pos) -> BatchAttention:
        return BatchAttention(self, pos)


class BatchAttention:
    """Attention for one forward of a (B, S) batch whose row b is cache row b."""

    def __init__(self, cache: KVCache, pos):
        B, S = pos.shape
        self.cache, self.pos = cache, pos
        self.length = int(pos.max()) + 1  # attend over cache[:length]
        self.mask = None
        # One row whose keys are just these tokens from 0 (a fresh prefill) is plain causal,
        # and one row decoding one token sees all of cache[:length]: neither needs a mask.
        if B > 1 or (S > 1 and self.length != S):
            # Key j is visible to a query at position p iff j ≤ p: causal within the new
            # tokens, everything before them, nothing stale past a row's own length.
            self.mask = torch.arange(self.length, device=pos.device) <= pos[:, None, :, None]  # (B, 1, S, L)

    def __call__(self, layer: int, q, k, v):
        """Write k, v (B, Hkv, S, D) into the cache at pos; attend q (B, H, S, D) over it."""
        B, L = k.shape[0], self.length
        ck, cv = self.cache.k[layer, :B], self.cache.v[layer, :B]
        if B == 1:
            ck.index_copy_(2, self.pos[0], k)
            cv.index_copy_(2, self.pos[0], v)
        else:
            rows = torch.arange(B, device=k.device)[:, None]
            ck[rows, :, self.pos] = k.transpose(1, 2)  # indexed view is (B, S, Hkv, D)
            cv[rows, :, self.pos] = v.transpose(1, 2)
        return F.scaled_dot_product_attention(q, ck[:, :, :L], cv[:, :, :L], attn_mask=self.mask,
                                              is_causal=self.mask is None and q.shape[2] > 1,
                                              enable_gqa=q.shape[1] != k.shape[1])


class RaggedBatch:
    """Several sequences' new tokens in one row (1, N): segment i is cache row rows[i] at positions[i].

    One forward then carries, say, one request's prefill chunk and every other request's
    next decode token: the projections and MLP see N tokens, with no padding, and
    attention runs per segment against that segment's own cache row. A run of lone decode
    tokens on consecutive rows attends as one masked batch (one call instead of one per row).
    """

    def __init__(self, cache: KVCache, rows: list[int], positions: list[list[int]]):
        self.cache, self.groups = cache, []
        device, start, i = cache.k.device, 0, 0
        while i < len(rows):
            j = i + 1  # extend a run of single-token segments on rows r, r+1, ...
            while (len(positions[i]) == 1 and j < len(rows) and len(positions[j]) == 1
                   and rows[j] == rows[j - 1] + 1):
                j += 1
            pos = [ps[0] for ps in positions[i:j]] if j - i > 1 else positions[i]
            p = torch.tensor(pos, device=device)
            n = max(pos) + 1
            if j - i > 1:  # decode tokens of rows[i]..rows[j-1]: key k visible to row b iff k ≤ its position
                mask = (torch.arange(n, device=device) <= p[:, None])[:, None, None]  # (R, 1, 1, n)
            elif len(pos) == 1 or pos[0] == 0:  # a lone decode token sees all; a fresh prefill is plain causal
                mask = None
            else:  # a prefill chunk after a cached prefix
                mask = (torch.arange(n, device=device) <= p[:, None])[None, None]  # (1, 1, S, n)
            self.groups.append((rows[i], j - i, start, start + len(pos), p, n, mask))
            start += len(pos)
            i = j

    def bind(self, pos) -> RaggedBatch:
        return self  # positions were given per segment

    def __call__(self, layer: int, q, k, v):
        out, gqa = [], q.shape[1] != k.shape[1]
        for row, count, a, b, p, n, mask in self.groups:
            ck, cv = self.cache.k[layer, row:row + count], self.cache.v[layer, row:row + count]  # (R, Hkv, T, D)
            if count > 1:  # R rows, one token each: batch them, (1, H, R, D) <-> (R, H, 1, D)
                rows = torch.arange(count, device=p.device)
                ck[rows, :, p] = k[0, :, a:b].transpose(0, 1)
                cv[rows, :, p] = v[0, :, a:b].transpose(0, 1)
                y = F.scaled_dot_product_attention(q[0, :, a:b].transpose(0, 1)[:, :, None], ck[:, :, :n],
                                                   cv[:, :, :n], attn_mask=mask, enable_gqa=gqa)
                out.append(y[:, :, 0].transpose(0, 1)[None])
            else:
                ck[0].index_copy_(1, p, k[0, :, a:b])
                cv[0].index_copy_(1, p, v[0, :, a:b])
                out.append(F.scaled_dot_product_attention(q[:, :, a:b], ck[:, :, :n], cv[:, :, :n], attn_mask=mask,
                                                          is_causal=mask is None and b - a > 1, enable_gqa=gqa))
        return torch.cat(out, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, attend):
        B, S, _ = x.shape
        # (B, S, H*D) -> (B, H, S, D)
        q = self.q_proj(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if attend is None:  # no cache (training, full recompute): causal over these S tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=self.n_kv != self.n_head)
        else:  # the cache's attention: writes k, v, then attends over what the cache holds
            y = attend(self.layer, q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_seq_len: int | None = None):
        super().__init__()
        self.config = cfg
        # The context never exceeds what the model was trained for (rope tables are sized by it).
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.output_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # cos/sin tables (max_seq_len, head_dim); not in the state dict (derived from config).
        cos, sin = rope_tables(cfg, self.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, pos=None, cache: KVCache | RaggedBatch | None = None, logit_index=None):
        """idx, pos: (B, S) token ids and their positions -> logits (B, S, vocab).

        With a cache, the new keys/values are written at `pos` and each query attends
        to every cached position ≤ its own (a `RaggedBatch` packs several sequences into
        one row). `logit_index` (B, K) picks K positions per row (e.g. each prompt's last
        token), giving logits (B, K, vocab) and skipping the LM head elsewhere.
        """
        B, S = idx.shape
        if pos is None:
            pos = torch.arange(S, device=idx.device).expand(B, S)
        x = self.model.embed_tokens(idx)
        cos = self.rope_cos[pos].unsqueeze(1).to(x.dtype)  # (B, 1, S, D): broadcast over heads
        sin = self.rope_sin[pos].unsqueeze(1).to(x.dtype)
        attend = None if cache is None else cache.bind(pos)
        for block in self.model.layers:
            x = block(x, cos, sin, attend)
        x = self.model.norm(x)
        if logit_index is not None:
            x = x[torch.arange(B, device=x.device)[:, None], logit_index]
        return self.lm_head(x)
