"""`qt-quant`: convert a checkpoint, or compare its precisions.

    qt-quant CHECKPOINT --to fp16|bf16|int8|int4|onnx|onnx-fp16|onnx-int4|onnx-int8 [--group-size G] [--out DIR]
    qt-quant compare CHECKPOINT [...]      (see `qt-quant compare --help`)
"""

from __future__ import annotations

import argparse
import sys

from quant.convert import SCHEMES


def convert_main(argv) -> int:
    from qt_serve.cli import positive
    from quant.convert import convert

    ap = argparse.ArgumentParser(prog="qt-quant", description="Quantize a checkpoint into a new checkpoint directory "
                                 "(`qt-quant compare --help`: compare precisions).")
    ap.add_argument("checkpoint", help="checkpoint dir, HF Llama dir, .gguf file or known model name")
    ap.add_argument("--to", required=True, choices=SCHEMES, help="target scheme")
    ap.add_argument("--group-size", type=positive, default=None,
                    help="int8 / int4: weights per scale (default 32, llama.cpp's blocks; must divide each "
                         "layer's input width)")
    ap.add_argument("--out", default=None, help="output directory (default: CHECKPOINT-SCHEME beside the source)")
    args = ap.parse_args(argv)
    out = convert(args.checkpoint, args.to, args.out, args.group_size)
    print(out)
    return 0


def main(argv=None) -> int:
    from qt_serve.cli import run

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        from quant import compare

        return run(lambda: compare.main(argv[1:]))
    return run(lambda: convert_main(argv))
