"""Inference-time module swaps that make batch-1 decode faster without touching model.py.

Batch-1 decode is a chain of matrix-vector products, so its speed is the bandwidth at
which each product streams its weight. torch's one-row product (`F.linear` or `x @ W_t`
with M = 1) runs on ONE thread whatever `torch.set_num_threads` says, and streams
~9-13 GB/s here. A batched product over P slices of the weight is spread over the
threads, so the same GEMV as `bmm` over P = threads slices reaches ~17-27 GB/s on 2
cores (LOG.md, 2026-11-23, "batch-1 GEMV"):

- most projections: the (out, in) weight viewed as (P, out/P, in), no copy;
- the LM head and other wide outputs (out ≥ 4·in): W.T stored as (P, in, out/P), which
  streams fastest for such shapes (a second copy of the weight when it is tied).

Products over more than one row (prefill, batched decode) use the same layout as a `bmm`
of P GEMMs; at batch ≥ 8 that is on par with `F.linear` (140 vs 145 ms per SmolLM2 step at
batch 16), not a win. The swaps are applied from outside the model, after loading, so
model.py keeps plain nn.Linear and HF names for training and export.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SplitTransposedLinear(nn.Module):
    """y = x @ W.T (+ b) with W.T stored as P column-slices (P, in, out/P), one per thread."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        self.in_features, self.out_features, self.parts = linear.in_features, linear.out_features, parts
        w_t = linear.weight.detach().t()  # (K, N)
        self.weight_t = nn.Parameter(w_t.reshape(self.in_features, parts, -1).transpose(0, 1).contiguous(),
                                     requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        lead, K = x.shape[:-1], self.in_features
        rows = x.reshape(-1, K)  # (M, K)
        y = torch.bmm(rows.expand(self.parts, *rows.shape), self.weight_t)  # (P, M, N/P)
        y = y.transpose(0, 1).reshape(lead + (self.out_features,))
        return y if self.bias is None else y + self.bias


def optimize_for_decode(model: nn.Module, threads: int | None = None) -> nn.Module:
    """Swap, in place, each CPU nn.Linear for a SplitTransposedLinear over `threads` slices."""
    parts = threads or torch.get_num_threads()
    if parts < 2:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu" or child.out_features % parts:
                continue
            setattr(parent, name, SplitTransposedLinear(child, parts))
    return model
