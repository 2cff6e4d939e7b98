"""The KV cache and the attention that reads it, outside the model.

`Transformer.forward(idx, pos, cache)` calls `cache.bind(pos)` once and then, in each layer,
`attend(layer, q, k, v)`: store this step's keys and values in the cache, attend the queries
over everything the cache holds up to each query's position. Two layouts of a step:

- `KVCache` (or a view of some of its rows): a (B, S) batch whose row b is cache row b;
- `RaggedBatch`: several sequences' tokens packed into one (1, N) row with no padding, each
  segment its own cache row (continuous batching: one request's prefill chunk and the
  others' decode tokens in one forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qt_serve.config import ModelConfig
from qt_serve.model import visible


class KVCache:
    """Preallocated keys and values of every layer: (layers, batch, kv_heads, max_len, head_dim).

    Static shapes: nothing is concatenated while decoding. Row b holds one sequence;
    position p of it lives at index p, so a row is reused by simply writing over it
    (stale entries past a row's current position are masked out). A layer with a sliding
    window keeps every position too and masks out those older than its window.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.windows = cfg.windows()  # per layer: None or its sliding window

    def rows(self, start: int, n: int) -> KVCache:
        """A view of rows start..start+n-1 (same storage), for a forward over n sequences."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, start:start + n], self.v[:, start:start + n], self.max_len
        view.windows = self.windows
        return view

    def bind(self, pos) -> BatchAttention:
        return BatchAttention(self, pos)


class BatchAttention:
    """Attention for one forward of a (B, S) batch whose row b is cache row b."""

    def __init__(self, cache: KVCache, pos):
        B, S = pos.shape
        self.cache, self.pos = cache, pos
        self.length = int(pos.max()) + 1  # attend over cache[:length]
        keys = torch.arange(self.length, device=pos.device)
        # Key j is visible to a query at position p iff j ≤ p: causal within the new tokens,
        # everything before them, nothing stale past a row's own length. One row whose keys are
        # just these tokens from 0 (a fresh prefill) is plain causal, and one row decoding one
        # token sees all of cache[:length]: neither needs a mask (None). A window w matters only
        # once some query is at p ≥ w; (B, 1, S, L) masks by window:
        self.masks = {None: visible(pos, keys, None)[:, None] if B > 1 or (S > 1 and self.length != S) else None}
        for w in set(cache.windows) - {None}:
            self.masks[w] = visible(pos, keys, w)[:, None] if self.length > w else self.masks[None]

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
        mask = self.masks[self.cache.windows[layer]]
        return F.scaled_dot_product_attention(q, ck[:, :, :L], cv[:, :, :L], attn_mask=mask,
                                              is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=q.shape[1] != k.shape[1])


class MaskedAttention:
    """Attention under an explicit (B, 1, S, S) mask over this forward's own tokens, no cache: passed to
    `Transformer.forward` where a cache goes (`bind(pos)` -> `attend(layer, q, k, v)`), so masks such as
    packed documents (train/sft.py) or an item's choices sharing one context (evals/zeroshot.py) come
    from outside the model. pos (B, S): each token's position, by which a layer's sliding window cuts."""

    def __init__(self, mask: torch.Tensor, pos: torch.Tensor, windows: list[int | None]):
        self.windows = windows
        self.masks = {w: mask if w is None else mask & (pos[:, None, :] > pos[:, :, None] - w)[:, None]
                      for w in set(windows) | {None}}

    def bind(self, pos) -> MaskedAttention:
        return self

    def __call__(self, layer: int, q, k, v):  # q (B, H, S, D); k, v (B, H_kv, S, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[self.windows[layer]],
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
        windows = set(cache.windows) - {None}
        while i < len(rows):
            j = i + 1  # extend a run of single-token segments on rows r, r+1, ...
            while (len(positions[i]) == 1 and j < len(rows) and len(positions[j]) == 1
                   and rows[j] == rows[j - 1] + 1):
                j += 1
            pos = [ps[0] for ps in positions[i:j]] if j - i > 1 else positions[i]
            p = torch.tensor(pos, device=device)
            n = max(pos) + 1
            keys, rowwise = torch.arange(n, device=device), j - i > 1
            # Decode tokens of rows[i]..rows[j-1], one query each: (R, 1, 1, n); else one segment's
            # S queries: (1, 1, S, n). A lone decode token sees all and a fresh prefill is plain
            # causal (None), unless a window cuts in (some query at p ≥ w).
            q_pos = p[:, None, None] if rowwise else p[None, None]
            full = visible(q_pos, keys, None) if rowwise or (len(pos) > 1 and pos[0] > 0) else None
            masks = {None: full, **{w: visible(q_pos, keys, w) if n > w else full for w in windows}}
            self.groups.append((rows[i], j - i, start, start + len(pos), p, n, masks))
            start += len(pos)
            i = j

    def bind(self, pos) -> RaggedBatch:
        return self  # positions were given per segment

    def __call__(self, layer: int, q, k, v):
        out, gqa, window = [], q.shape[1] != k.shape[1], self.cache.windows[layer]
        for row, count, a, b, p, n, masks in self.groups:
            mask = masks[window]
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
