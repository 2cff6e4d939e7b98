"""Two probes behind quant/'s choices (LOG.md, 2026-12-01), on SmolLM2-135M-Instruct by default.

    python benchmarks/quant_probe.py roundings [--model M] [--tokens 2048]
        perplexity on benchmarks/data/passage.txt with every linear weight rounded in place (torch,
        fp32 arithmetic): how much each rounding alone costs, without any kernel in the way.
    python benchmarks/quant_probe.py speed DIR [DIR ...] [--runs 3]
        in-process batch-1 speed of checkpoint directories through their own runner (torch or
        onnxruntime), one fresh process per directory: TTFT of a fresh 128-token prompt and decode
        tok/s of 128 greedy steps (torch argmax between steps, as the engine samples), best of --runs.

Both print the CPU line; `qt-quant compare` is the end-to-end table (through qt-serve, with llama.cpp).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import torch

PASSAGE = Path(__file__).resolve().parent / "data" / "passage.txt"


def blocks(w: torch.Tensor, bits: int, zero_point: bool, block: int = 32) -> torch.Tensor:
    """Rounded to 2^bits levels per block of `block` along K: over [min, max] with a float minimum (Q4_1's
    form), or over [min(lo, 0), max(hi, 0)] with an integer zero point (onnxruntime's MatMulNBitsQuantizer)."""
    n, k = w.shape
    g, top = w.reshape(n, k // block, block), 2 ** bits - 1
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    if zero_point:
        hi, lo = hi.clamp(min=0), lo.clamp(max=0)
    step = torch.where(hi > lo, (hi - lo) / top, torch.ones_like(hi))
    if not zero_point:
        return (torch.round((g - lo) / step).clamp(0, top) * step + lo).reshape(n, k)
    zero = torch.round(-lo / step).clamp(0, top)
    return ((torch.clamp(torch.round(g / step) + zero, 0, top) - zero) * step).reshape(n, k)


ROUNDINGS = {
    "int4 blocks of 32, integer zero point": lambda w: blocks(w, 4, True),
    "int4 blocks of 32, float minimum (Q4_1)": lambda w: blocks(w, 4, False),
    "int8 per row, symmetric": lambda w: torch.round(w / (w.abs().amax(1, keepdim=True) / 127))
    * (w.abs().amax(1, keepdim=True) / 127),
    "int8 blocks of 32, integer zero point": lambda w: blocks(w, 8, True),
}


def roundings(args) -> None:
    from qt_serve.checkpoint import load

    ckpt = load(args.model)
    ids = torch.tensor([ckpt.tokenizer.encode(PASSAGE.read_text())[: args.tokens]])

    def ppl(model) -> float:
        with torch.no_grad():
            logits = model(ids)[0, :-1].float()
        return float(torch.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))

    base = ppl(ckpt.model)
    print(f"fp32: perplexity {base:.3f} on {ids.shape[1]} tokens")
    for name, rounding in ROUNDINGS.items():
        model = copy.deepcopy(ckpt.model)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear):  # the LM head too (tied: the embedding with it)
                    mod.weight.copy_(rounding(mod.weight))
        p = ppl(model)
        print(f"{name}: {p:.3f} ({(p / base - 1) * 100:+.1f}%)", flush=True)


def speed_one(directory: str, runs: int) -> None:
    from qt_serve.checkpoint import load
    from qt_serve.engine import Engine
    from qt_serve.runner import Segment

    runner = Engine.load(load(directory, max_seq_len=512), max_batch=1, thread=False).runner
    runner.allocate(1, 512)
    ttft, tok_s = float("inf"), 0.0
    for run in range(runs):
        prompt = torch.randint(100, 40000, (128,), generator=torch.Generator().manual_seed(run)).tolist()
        start = time.perf_counter()
        token = int(runner.forward([Segment(0, 0, prompt)], [127]).argmax())
        ttft = min(ttft, time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(128):
            token = int(runner.forward([Segment(0, 128 + i, [token])], [0]).argmax())
        tok_s = max(tok_s, 128 / (time.perf_counter() - start))
    print(f"{directory}: TTFT {ttft * 1e3:.0f} ms, decode {tok_s:.1f} tok/s", flush=True)


def main() -> None:
    from evals.bench import cpu_line

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("roundings")
    r.add_argument("--model", default="SmolLM2-135M-Instruct")
    r.add_argument("--tokens", type=int, default=2048)
    s = sub.add_parser("speed")
    s.add_argument("dirs", nargs="+")
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.command == "roundings":
        print(cpu_line())
        roundings(args)
    elif args.one:
        speed_one(args.dirs[0], args.runs)
    else:
        print(cpu_line())
        for d in args.dirs:  # a process each: one runtime's threads never wait on another's
            subprocess.run([sys.executable, __file__, "speed", "--one", "--runs", str(args.runs), d], check=True)


if __name__ == "__main__":
    main()
