"""qt's native CPU decoder for int4 / int8 checkpoints (quant/native.cpp) and the runner that serves it.

Why: a decode step of SmolLM2-135M is ~900 small torch ops; in eager mode they cost ~4.8 ms a token on
two cores before any weight is read (LOG.md 2026-12-02), two thirds of llama.cpp's whole step. native.cpp runs
the step as one call: weights in blocks of 32 as llama.cpp's (int4 as Q4_1, int8 as Q8_0 with a min),
activations rounded per block of 32 to int8 and what that leaves rounded again (~14 bits: llama.cpp's
q8_1 alone moved SmolLM2's greedy replies), and the products on VNNI's vpdpbusd (AVX-512) or AVX2's
vpmaddubsw, whichever this CPU has.

It is compiled at first use, on the machine that runs it, with `-O3 -march=native` (torch's C++
extension loader; a compiler and Python's headers are needed: `apt-get install g++ python3-dev`), and
cached in $QT_HOME/native/KEY, KEY naming the CPU, its flags, torch and the source. A checkpoint's
int4 / int8 tensors are repacked into the kernel's layout at load (`repack`); nothing on disk changes.

`quant.weights.load` serves int4 / int8 checkpoints with `NativeRunner` when the kernel is `native`
(QT_QUANT_KERNEL=native, or `auto` where it builds with AVX2 or AVX-512 VNNI and the model is one it
runs: see `unsupported`); the torch model stays beside it for what only torch does (LoRA adapters).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from qt_serve import fast, hub
from qt_serve.errors import QtError
from qt_serve.runner import Segment

from quant import kernels

SOURCE = Path(__file__).with_name("native.cpp")
F32, Q4, Q8 = 0, 1, 2  # native.cpp's Kind
QK = 32  # weights per block
KB = 16  # key positions per block of the key cache (native.cpp's KB)
SIMD = ("avx512_vnni", "avx2")  # builds `auto` uses; a plain C++ build (other CPUs) only when forced
ISA_ENV = "QT_NATIVE_ISA"
ROUNDING_ENV = "QT_NATIVE_ROUNDING"
# How activations are rounded per block of 32: int8 and an int8 residual (~14 bits), or int8 alone
# (llama.cpp's q8_1: SmolLM2's greedy replies moved on 4-7 of 10 prompts; a 128-token prefill 77 ms
# against 108-118 on one thread, LOG.md 2026-12-02 "two roundings").
ROUNDINGS = {"twice": "int8 and an int8 residual per block of 32 (~14 bits)",
             "once": "int8 per block of 32 (llama.cpp's q8_1)"}
# Compiler flags of each named build (native.cpp's #if branches follow them), and the CPU flags it needs.
ISAS = {"avx512_vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
                        "-mavx512vnni"],
        "avx2": ["-mavx2", "-mfma", "-mf16c"],
        "scalar": []}
NEEDS = {"avx512_vnni": ("avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"), "avx2": ("avx2",),
         "scalar": ()}


def rounding() -> str:
    """$QT_NATIVE_ROUNDING: twice (default) or once."""
    r = os.environ.get(ROUNDING_ENV) or "twice"
    if r not in ROUNDINGS:
        raise QtError(f"{ROUNDING_ENV}={r!r}: choose one of {', '.join(ROUNDINGS)}")
    return r


def runs_as(scheme: str) -> str:
    """What the products compute with, for config.quantization["runs_as"]."""
    return f"{scheme} weights in blocks of 32, activations {ROUNDINGS[rounding()]}, the whole step in quant/native.cpp"


def build_dir() -> Path:
    return hub.home() / "native"


def extension(isa: str | None = None):
    """The compiled module for `isa` (else $QT_NATIVE_ISA, else "native": -march=native, this CPU's best);
    built once per machine, ISA and source, later loads take ~0.1 s. A named ISA this CPU lacks is refused
    (running it would die on an illegal instruction)."""
    isa = isa or os.environ.get(ISA_ENV) or "native"
    if isa != "native" and isa not in ISAS:
        raise QtError(f"{ISA_ENV}={isa!r}: choose one of native, {', '.join(ISAS)}")
    missing = [f for f in NEEDS.get(isa, ()) if f not in fast.cpu_flags()]
    if missing:
        raise QtError(f"{ISA_ENV}={isa} needs {', '.join(missing)}, which this CPU ({fast.cpu_name()}) lacks; "
                      f"it has {' '.join(fast.cpu_flags()) or 'no AVX'}. Choose native or one it has")
    return _build(isa)


@functools.cache
def _build(isa: str):
    from torch.utils import cpp_extension

    key = fast.cache_key(["native", isa, hashlib.sha256(SOURCE.read_bytes()).hexdigest()])
    where = build_dir() / key
    where.mkdir(parents=True, exist_ok=True)
    # -fopenmp: at::parallel_for is a header template whose `omp parallel` compiles into this module; without
    # the flag it runs on one thread (as it did until 2026-12-02: LOG.md). The module then needs libgomp.so.1,
    # the soname of the copy torch loaded first, so both share one OpenMP runtime and its thread pool.
    flags = ["-O3", "-fopenmp", *(["-march=native"] if isa == "native" else ISAS[isa])]
    try:  # the ninja package's binary, for a venv used without activating it (its bin/ is not on PATH)
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass
    if not any(where.glob("*.so")):
        print(f"qt: building the native int4/int8 kernels for this CPU ({isa}), once: ~1 minute", file=sys.stderr)
    try:
        return cpp_extension.load(name=f"qt_native_{key}", sources=[str(SOURCE)], build_directory=str(where),
                                  extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, ImportError) as e:
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise QtError(f"qt's native kernels did not build ({last}); they need a C++ compiler and Python's "
                      "headers (Debian: apt-get install g++ python3-dev) and the ninja package. "
                      "QT_QUANT_KERNEL=dequant serves the checkpoint without them") from e


def unsupported(model) -> str | None:
    """Why native.cpp cannot run `model` (None if it can)."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return f"a model on {p.device} in {p.dtype} (native.cpp runs fp32 on the CPU)"
    from quant.weights import QuantLinear

    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and (m.in_features % QK or (m.group or QK) % QK):
            return (f"{name}: input width {m.in_features}, group {m.group} (native.cpp's blocks are "
                    f"{QK} wide: widths and int4 groups must be multiples of {QK})")
    return None


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def tiled(kind: int, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, R: int):
    """codes (N, K) uint8 (Q4: 0..15; Q8: w + 128), d and m (N, K/32) -> native.cpp's tiles of R rows:
    codes (N/R, K/32, steps, R, 4) with step j holding inputs 4j..4j+3 of each row (Q4: steps 2i and 2i+1
    in the low and high nibbles of one byte), d and m (N/R, K/32, R) fp16. Zero padding to N a multiple
    of 32 (native.cpp takes two tiles of 16 a call on AVX-512) and K a multiple of 64."""
    N, K = codes.shape
    Np, Kp = -(-N // 32) * 32, -(-K // 64) * 64
    nb = Kp // QK
    c = _pad(codes, Np, Kp).view(Np // R, R, nb, 8, 4).permute(0, 2, 3, 1, 4)
    if kind == Q4:
        c = c[:, :, 0::2] | (c[:, :, 1::2] << 4)
    d, m = (_pad(t.float(), Np, nb).view(Np // R, R, nb).transpose(1, 2).half().contiguous() for t in (d, m))
    return c.contiguous(), d, m


def repack(m: nn.Module, R: int):
    """(kind, codes, d, m) of one quantized layer in native.cpp's layout (see its header)."""
    N, K = m.out_features, m.in_features
    per = (m.group or K) // QK  # a group of G (per row: K) = per blocks of 32 sharing its scale (and min)
    d = m.scales.float().view(N, -1).repeat_interleave(per, 1)  # in fp16, as the kernel reads it
    if m.scheme == "int8":  # codes q + 128; per row (no mins, scales fp32) symmetric: m = -128·d
        mins = -128 * d if m.mins is None else m.mins.repeat_interleave(per, 1)
        return Q8, *tiled(Q8, (m.qweight.to(torch.int16) + 128).to(torch.uint8), d, mins, R)
    return Q4, *tiled(Q4, kernels.unpack_int4(m.qweight), d, m.mins.repeat_interleave(per, 1), R)


def linear(ext, modules: list[nn.Module], twice: bool = True):
    """One native Linear of `modules` stacked along their outputs (q|k|v, gate|up); its activations rounded
    `twice` or once (see ROUNDINGS)."""
    kinds = {m.scheme if hasattr(m, "scheme") else "fp32" for m in modules}
    if len(kinds) > 1:
        raise QtError(f"native.cpp fuses layers of one format; got {sorted(kinds)}")
    empty = torch.empty(0)
    if "fp32" in kinds:  # layers kept in full precision
        kind, codes, d, mins, w = F32, empty, empty, empty, torch.cat([m.weight.detach().float() for m in modules])
    else:  # stacked before tiling, so a tile may hold rows of two layers
        (kind, codes, d, mins), w = repack(_Stacked(modules), ext.tile()), empty
    biases = [m.bias for m in modules]
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach().float() if b is not None else torch.zeros(m.out_features)
                          for b, m in zip(biases, modules)])
    else:
        bias = empty
    return ext.Linear(kind, sum(m.out_features for m in modules), modules[0].in_features, codes, d, mins, w, bias,
                      twice)


class _Stacked:
    """QuantLinear layers of one input width seen as one (their rows stacked), for `repack`."""

    def __init__(self, modules):
        first = modules[0]
        self.scheme, self.group, self.in_features = first.scheme, first.group, first.in_features
        self.out_features, self.mins = sum(m.out_features for m in modules), None
        for name in first.tensors():
            setattr(self, name, torch.cat([getattr(m, name) for m in modules]))


def build(model):
    """native.cpp's Model over `model`'s tensors (repacked copies; `model` is only read)."""
    ext, cfg, twice = extension(), model.config, rounding() == "twice"
    layers, empty = [], torch.empty(0)
    for i, block in enumerate(model.model.layers):
        att, mlp = block.self_attn, block.mlp
        qn = att.q_norm.weight.detach().float() if cfg.qk_norm else empty
        kn = att.k_norm.weight.detach().float() if cfg.qk_norm else empty
        layers.append(ext.Layer(linear(ext, [att.q_proj, att.k_proj, att.v_proj], twice),
                                linear(ext, [att.o_proj], twice), linear(ext, [mlp.gate_proj, mlp.up_proj], twice),
                                linear(ext, [mlp.down_proj], twice),
                                block.input_layernorm.weight.detach().float(),
                                block.post_attention_layernorm.weight.detach().float(), qn, kn,
                                cfg.windows()[i] or 0))
    return ext.Model(layers, linear(ext, [model.lm_head], twice), model.model.norm.weight.detach().float(),
                     model.rope_cos.float(), model.rope_sin.float(), cfg.hidden_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, float(cfg.rms_norm_eps))


class NativeRunner:
    """A `qt_serve.runner.Runner` on native.cpp: every step (prefill chunks and decode tokens alike) one call."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.max_seq_len, self.device, self.dtype = model.max_seq_len, torch.device("cpu"), torch.float32
        self.ext, self.native = extension(), build(model)
        self.k = self.v = None

    def allocate(self, rows: int, length: int) -> None:
        cfg = self.config
        self.k = self.v = None  # free the old cache first
        L, KV, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        S = -(-min(length, self.max_seq_len) // KB) * KB
        # keys in blocks of KB positions, each transposed (native.cpp's attention); values as rows
        self.k, self.v = torch.zeros(L, rows, KV, S // KB, D, KB), torch.zeros(L, rows, KV, S, D)

    @torch.inference_mode()
    def forward(self, segments: list[Segment], logits_at: list[int]) -> torch.Tensor:
        tokens = torch.tensor([t for s in segments for t in s.tokens])
        rows = torch.tensor([s.row for s in segments for _ in s.tokens])
        pos = torch.tensor([s.start + i for s in segments for i in range(len(s.tokens))])
        x = self.model.model.embed_tokens(tokens).float()
        return self.ext.forward(self.native, x, rows, pos, torch.tensor(logits_at), self.k, self.v)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        whole, part = divmod(n, KB)
        self.k[:, dst, :, :whole] = self.k[:, src, :, :whole]
        if part:
            self.k[:, dst, :, whole, :, :part] = self.k[:, src, :, whole, :, :part]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
