"""Inference-time module swaps that make batch-1 decode faster without touching model.py.

Batch-1 decode is a chain of matrix-vector products, so its speed is the bandwidth
at which each kernel streams its weight. On the AVX2 CPUs qt is built on, torch's
`F.linear` (x @ W.T with W stored out×in) reads a weight at ~9 GB/s, while `x @ W_t`
with the same weight stored in×out reads it at ~13-18 GB/s whenever out > in (the
LM head, gate/up, and fused projections); for out < in `F.linear` is the faster one
(LOG.md, 2026-11-23, "batch-1 GEMV layouts"). So expanding projections are swapped for
`TransposedLinear`; the others stay as they are.

The swap is applied from outside the model, after loading: the model file keeps
HF parameter names and the plain nn.Linear that training and export expect.
"""

from __future__ import annotations

import torch.nn as nn


class TransposedLinear(nn.Module):
    """y = x @ W_t (+ b), with W_t = W.T stored contiguous as (in_features, out_features)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def optimize_for_decode(model: nn.Module) -> nn.Module:
    """Swap, in place, every expanding nn.Linear (out > in) on CPU for a TransposedLinear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Linear) and child.out_features > child.in_features
                    and child.weight.device.type == "cpu"):
                setattr(parent, name, TransposedLinear(child))
    return model

