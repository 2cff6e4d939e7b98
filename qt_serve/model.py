"""A Llama-style decoder-only transformer, top to bottom.

    tokens ─> embed_tokens ─> N × [ x + Attn(RMSNorm(x)),  x + MLP(RMSNorm(x)) ] ─> norm ─> lm_head ─> logits

Attention is grouped-query (num_key_value_heads ≤ num_attention_heads) with rotary
position embeddings (RoPE, Su et al. 2021; Llama-3 frequency scaling); the MLP is
SwiGLU (Shazeer 2020). Parameter names are Hugging Face's
(`model.layers.0.self_attn.q_proj.weight`, ...), so a state dict moves between this
module and `transformers`' `LlamaForCausalLM` (or Mistral, Qwen2, Qwen3) without renaming.
The families' differences are config switches (`qt_serve.config`): biases on the Q/K/V
projections (Qwen2), an RMSNorm over each query and key head before RoPE (Qwen3), and a
sliding attention window (Mistral; Qwen when enabled): a query at position p sees only the
`window` keys p - window < j ≤ p.

The model knows nothing of tokens, sampling, files or cache layout. `forward` takes token
ids, their positions and, when decoding, a cache (`qt_serve.kv`) whose `bind(pos)` gives
the attention to run in each layer: it stores the new keys and values and attends over
what the cache holds. Quantization, LoRA and compilation are applied from outside
(module swaps).
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


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query may attend to: (..., S) query positions x (L,) key positions -> (..., S, L)."""
    seen = k_pos <= q_pos[..., None]
    return seen if window is None else seen & (k_pos > q_pos[..., None] - window)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.window = layer, cfg.windows()[layer]
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3 normalises every query and key head (over head_dim) before RoPE.
        norm = (lambda: RMSNorm(self.head_dim, cfg.rms_norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x, cos, sin, attend):
        B, S, _ = x.shape
        # (B, S, H*D) -> (B, H, S, D)
        q = self.q_norm(self.q_proj(x).view(B, S, self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, S, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if attend is None:  # no cache (training, full recompute): causal over these S tokens
            gqa = self.n_kv != self.n_head
            if self.window is None or S <= self.window:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, enable_gqa=gqa)
            else:
                p = torch.arange(S, device=x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible(p, p, self.window), enable_gqa=gqa)
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

    def forward(self, idx, pos=None, cache=None, logit_index=None):
        """idx, pos: (B, S) token ids and their positions -> logits (B, S, vocab).

        With a cache (`qt_serve.kv.KVCache` rows or a `RaggedBatch`), the new keys/values
        are written at `pos` and each query attends to every cached position ≤ its own. `logit_index` (B, K) picks K positions per row (e.g. each prompt's last
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
