"""`convert`: a checkpoint directory in, a quantized checkpoint directory out.

    fp16, bf16      the weights cast (config.json's torch_dtype says so; transformers loads it unchanged)
    int8, int4      weight-only integer weights + scales, torch kernels chosen per CPU (quant.weights)
    onnx, onnx-fp16, onnx-int4, onnx-int8
                    an ONNX graph with KV-cache inputs/outputs for onnxruntime (quant.onnx); fp16 is for
                    the CUDA execution provider

Every output is a whole checkpoint directory (written to a temp name, then renamed) whose
config.json records the scheme under `qt.quantization`; qt-serve, qt-chat, qt-eval and
qt-bench load it like any other (`qt_serve.checkpoint.load`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from qt_serve import checkpoint
from qt_serve.checkpoint import CAST_SCHEMES, Checkpoint, save_checkpoint
from qt_serve.errors import QtError

CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
SCHEMES = (*CAST_SCHEMES, "int8", "int4", "onnx", "onnx-fp16", "onnx-int4", "onnx-int8")


def default_out(source: str | Path, to: str) -> Path:
    """SOURCE-TO beside a source directory or .gguf file; ./NAME-TO for a known model name."""
    path = Path(source)
    if not path.exists():  # a known model name: in the working directory, not inside the cache
        return Path.cwd() / f"{path.name}-{to}"
    return path.with_name(f"{path.stem if path.suffix == '.gguf' else path.name}-{to}")


def load_source(source: str | Path, dtype: str | None = None) -> Checkpoint:
    """The checkpoint to quantize: refused if already quantized (quantizing twice compounds the error)."""
    ckpt = checkpoint.load(source, dtype=dtype)
    scheme = (ckpt.config.quantization or {}).get("scheme")
    if scheme is not None and scheme not in CAST_SCHEMES:
        raise QtError(f"{source} is already quantized ({scheme}); quantize its fp32 or bf16 source instead, "
                      "since re-quantizing compounds the rounding error")
    if ckpt.tokenizer is None:
        raise QtError(f"{source} has no tokenizer.json; a quantized checkpoint is for serving, which needs one. "
                      "Copy the tokenizer files of the model it was trained with into the directory")
    return ckpt


def gguf_of(source: str | Path) -> Path | None:
    """The llama.cpp file a source checkpoint comes from: itself, or a known model's artifact."""
    from qt_serve import hub

    path = Path(source)
    if path.suffix == ".gguf":
        return path
    if not path.exists() and str(source) in hub.KNOWN and hub.KNOWN[str(source)].member.endswith(".gguf"):
        return hub.fetch_file(str(source))
    return None


def cast(ckpt: Checkpoint, to: str, out: Path) -> Path:
    model = copy.deepcopy(ckpt.model).to(CASTS[to])  # a copy: the caller's model stays as it was
    model.config = copy.deepcopy(ckpt.config)
    model.config.quantization = {"scheme": to, "source_dtype": str(next(ckpt.model.parameters()).dtype)[6:]}
    return save_checkpoint(out, model, ckpt.tokenizer, ckpt.generation_config)


def convert(source: str | Path, to: str, out: str | Path | None = None, group_size: int | None = None) -> Path:
    """Quantize checkpoint `source` (a directory, .gguf or known name) to scheme `to`; returns the output dir."""
    if to not in SCHEMES:
        raise QtError(f"unknown scheme {to!r}; choose one of {', '.join(SCHEMES)}")
    if group_size is not None and to not in ("int8", "int4", "onnx-int4"):
        raise QtError(f"--group-size applies to int8, int4 and onnx-int4, not {to}")
    ckpt = load_source(source)
    out = Path(out) if out is not None else default_out(source, to)
    if to in CASTS:
        return cast(ckpt, to, out)
    if to in ("int8", "int4"):
        from quant import weights

        return weights.write(ckpt, to, out, group_size, gguf=gguf_of(source))
    from quant import onnx

    return onnx.export(ckpt, out, weights="fp32" if to == "onnx" else to[5:], gguf=gguf_of(source),
                       block_size=group_size)
