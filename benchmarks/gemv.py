"""Batch-1 matrix-vector kernels on this CPU: which weight layout streams fastest?

    python benchmarks/gemv.py [--threads 2]

For each (in, out) shape: `F.linear(x, W)` with W stored (out, in), as nn.Linear does;
`x @ W_t` with the weight stored (in, out); and `bmm` over P = threads column-slices of W_t,
stored (P, in, out/P), which is qt_serve/fast.py's DecodeLinear on its 'split' path. Each kernel cycles
through enough copies of the weight (≥ 64 MB) that every call streams it from DRAM, as real
decode does, instead of hitting L3. Prints µs per call and effective GB/s.
"""

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 1536), (1536, 576), (576, 49152), (768, 768), (768, 256), (768, 2048), (2048, 768), (768, 49152)]


def per_call_us(fn, x, weights, reps=5):
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, (time.perf_counter() - start) / len(weights))
    return best * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    threads = ap.parse_args().threads
    torch.set_num_threads(threads)
    print(f"{'in x out':>14} {'F.linear':>18} {'x @ W_t':>18} {f'bmm over {threads}':>18}")
    for k, n in SHAPES:
        copies = max(2, (64 << 20) // (k * n * 4))
        ws = [torch.randn(n, k) for _ in range(copies)]
        x = torch.randn(1, k)
        a = per_call_us(F.linear, x, ws)
        ws = [w.t().contiguous() for w in ws]
        b = per_call_us(torch.matmul, x, ws)
        ws = [w.view(k, threads, n // threads).transpose(0, 1).contiguous() for w in ws]
        c = per_call_us(torch.bmm, x.expand(threads, 1, k), ws)
        gb = k * n * 4 / 1e3
        print(f"{k:>5} x {n:<6} " + " ".join(f"{t:7.0f} µs {gb / t:5.1f} GB/s" for t in (a, b, c)))


if __name__ == "__main__":
    main()
