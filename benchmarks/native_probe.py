"""Where a decode step's time goes, in-process (LOG.md 2026-12-02, issue 11). Not a test: timings.

    python benchmarks/native_probe.py overhead DIR   torch eager with every linear layer returning zeros:
                                                     the op overhead no kernel inside torch can remove
    python benchmarks/native_probe.py step DIR...    quant/native.cpp's step for int4 / int8 checkpoints, and
                                                     the same with attention over one key (window 1): what
                                                     attention costs at positions 128-256

Each: a 128-token prompt, then 128 cached decode steps of one token, best of rounds (interleaved where two
variants are compared), 2 threads, the CPU's flags printed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from qt_serve import fast
from qt_serve.checkpoint import load
from qt_serve.runner import Segment, TorchRunner


def ms_per_token(runner, rounds: int = 1) -> float:
    best = float("inf")
    for _ in range(rounds):
        runner.allocate(1, 512)
        runner.forward([Segment(0, 0, list(range(100, 228)))], [127])
        start = time.perf_counter()
        for i in range(128):
            runner.forward([Segment(0, 128 + i, [5])], [0])
        best = min(best, (time.perf_counter() - start) / 128 * 1e3)
    return best


class Zeros(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.n)


def overhead(directory: str) -> None:
    model = load(directory, max_seq_len=512).model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Zeros(child.out_features))
    ms = ms_per_token(TorchRunner(model, optimize=False), rounds=3)
    print(f"{directory}: torch eager, linear layers returning zeros: {ms:.2f} ms a token ({1e3 / ms:.1f} tok/s)")


def step(directory: str) -> None:
    from quant import native

    os.environ["QT_QUANT_KERNEL"] = "native"
    ck = load(directory, max_seq_len=512)
    full, one = ck.runner(), ck.runner()
    cfg = ck.model.config
    windows = cfg.windows
    cfg.windows = lambda: [1] * cfg.num_hidden_layers  # every query sees its own key only
    one.native = native.build(ck.model)
    cfg.windows = windows
    best = {"full": float("inf"), "attention over one key": float("inf")}
    for _ in range(5):
        for name, runner in (("full", full), ("attention over one key", one)):
            best[name] = min(best[name], ms_per_token(runner))
    print(f"{directory} ({native.extension().isa()}): " + ", ".join(f"{k} {v:.2f} ms" for k, v in best.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["overhead", "step"])
    ap.add_argument("checkpoints", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"cpu: {fast.cpu_name()} | flags: {' '.join(fast.cpu_flags())} | torch {torch.__version__}")
    for d in args.checkpoints:
        (overhead if args.mode == "overhead" else step)(d)


if __name__ == "__main__":
    main()
