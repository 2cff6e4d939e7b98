"""int8 / int4 weight formats and the matrix products that run on them.

Formats (what a quantized checkpoint stores per linear layer, W of shape (N out, K in)):

    int8   q (N, K) int8 in [-127, 127], scales (N,) fp32:          W ≈ q · scale[n]          (symmetric, per row)
           or q in [-128, 127], scales and mins (N, K/G) fp16:       W ≈ (q + 128) · scale[n, g] + min[n, g]
                                                                  (asymmetric, per group of G along K: the
                                                                  default; llama.cpp's Q8_0 is min = -128·scale.
                                                                  Per row cost SmolLM2 +1.4-1.9% perplexity;
                                                                  files without mins, qt's first groups, are
                                                                  symmetric: min = -128·scale)
    int4   q (N, K/2) uint8, two 4-bit codes per byte (even k in the low nibble), scales and mins (N, K/G) fp16:
                                                                  W ≈ q · scale[n, g] + min[n, g]   (q in 0..15)
           asymmetric in groups of G along K, as llama.cpp's Q4_1 (5 bits per weight at G = 32).

Kernels: each is a callable `(x (M, K) fp32) -> (M, N) fp32` built once per layer at load time.

    int8 checkpoints
      fbgemm     torch.ops.quantized.linear_dynamic on a prepacked per-channel qint8 weight (FBGEMM; needs
                 AVX2). Dynamic quantization: each call also rounds its INPUT to uint8, one scale per call,
                 and accumulates in int32 (so it is W8A8, not weight-only). Full 8-bit inputs on AVX-512 VNNI,
                 7-bit elsewhere (reduce_range: AVX2's vpmaddubsw saturates int16 pair sums otherwise).
      int8pack   torch._weight_int8pack_mm: weight-only (fp32 activations), any CPU.
    int4 checkpoints
      int4pack   torch._weight_int4pack_mm_for_cpu: int4 in memory, weight-only, any CPU.
    both
      dequant    the weights dequantized to fp32 at load, fp32 products through qt_serve.fast's
                 DecodeLinear (rows / oneDNN): fp32 memory and speed, the quantized weights' numerics
                 exactly. The fallback where the packed kernels are slow.
      fbgemm     the int4 weights expanded at load to int8 per output channel and run as int8's fbgemm:
                 the FILE is int4, but memory and speed are int8's, and the weights are rounded once more
                 (to the int8 grid, ≤ scale8/2 per weight on top of int4's error).
    cuda
      bnb        bitsandbytes: LLM.int8 (Linear8bitLt) for int8; for int4 the dequantized weights are
                 re-quantized to NF4 (Linear4bit, blocks of 64), bitsandbytes' own 4-bit format.

torch's packed int8/int4 products are slow over several rows (76 and 90 ms for 128 rows × 576 × 1536
on two AMD EPYC cores, vs 1.7 ms to dequantize and F.linear), so int8pack and int4pack run
several rows as dequantize-then-F.linear.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from qt_serve import fast
from qt_serve.errors import QtError

CPU_KERNELS = {"int8": ("int8pack", "dequant", "fbgemm"), "int4": ("int4pack", "dequant", "fbgemm")}
INT4PACK_GROUPS = (32, 64, 128, 256)  # what torch's _weight_int4pack_mm_for_cpu takes
TWINS = {"int8pack": "int4pack", "int4pack": "int8pack"}  # the same kind of kernel for the other scheme
ROUNDS_ACTIVATIONS = ("fbgemm",)  # not chosen by `auto`: they change the arithmetic, not only the speed


# ---- formats ---------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor, group: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, K) float -> (q (N, K) int8, scales, mins): per row (group None) symmetric, scales (N,) fp32, no
    mins, |W - q·scale| ≤ scale/2; per group of G along K, 256 levels over each group's [min, max] (see
    `levels`), |W - Ŵ| ≤ scale/2 with scale = (max - min)/255, never more than a symmetric grid's."""
    if group is not None:
        codes, scales, mins = levels(w, group, 255)
        return (codes.to(torch.int16) - 128).to(torch.int8), scales, mins
    absmax = w.float().abs().amax(-1)
    scale = torch.where(absmax > 0, absmax / 127, 1.0)  # an all-zero row: any scale, q = 0
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale, None


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K) codes, scales (...) per row or (..., K/G) per group (+ mins) -> (..., K) fp32."""
    if scale.dim() < q.dim():
        return q.float() * scale[..., None]
    g = q.float().view(*scale.shape, -1)
    if mins is not None:
        return ((g + 128) * scale.float()[..., None] + mins.float()[..., None]).flatten(-2)
    return (g * scale.float()[..., None]).flatten(-2)


def levels(w: torch.Tensor, group: int, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> codes (N, K) uint8 in 0..top, scales and mins (N, K/G) fp16: W ≈ code·scale + min.

    The fp16 min is rounded down and the fp16 scale up, so each group's grid min + (0..top)·scale
    covers its [min, max]: |W - Ŵ| ≤ scale/2 per element (no clipping)."""
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    lo16 = lo.half()
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, torch.tensor(-torch.inf, dtype=torch.half)), lo16)
    s16 = ((hi - lo16.float()) / top).half()
    short = s16.float() * top + lo16.float() < hi
    s16 = torch.where(short, torch.nextafter(s16, torch.tensor(torch.inf, dtype=torch.half)), s16)
    s16 = torch.where(s16 > 0, s16, torch.ones_like(s16))  # a constant group: code 0 gives its value
    if not (torch.isfinite(s16).all() and torch.isfinite(lo16).all()):
        raise ValueError("weights beyond fp16's range (±65504) cannot be stored as group scales/mins")
    q = torch.round((g - lo16.float()[..., None]) / s16.float()[..., None]).clamp(0, top).to(torch.uint8)
    return q.view(N, K), s16, lo16


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed (N, K/2) uint8, scales (N, K/G) fp16, mins (N, K/G) fp16 (`levels` 0..15)."""
    codes, scales, mins = levels(w, group, 15)
    return pack_int4(codes), scales, mins


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8, code k even in the low nibble, k odd in the high one."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) uint8 codes."""
    return torch.stack((packed & 15, packed >> 4), -1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """(..., K/2), (..., K/G), (..., K/G) -> (..., K) fp32; works on whole matrices and looked-up rows."""
    q = unpack_int4(packed).float()
    g = q.view(*scales.shape, -1)  # (..., K/G, G)
    return (g * scales.float()[..., None] + mins.float()[..., None]).flatten(-2)


# ---- what the CPU can run ------------------------------------------------------------------


def require(kernel: str, scheme: str, device: torch.device, group: int | None = None) -> None:
    """QtError if `kernel` cannot run `scheme` at `group` (int8: None = a scale per row) on `device`, naming
    the missing instruction set or package."""
    if device.type == "cuda":
        if kernel != "bnb":
            raise QtError(f"quantized kernel {kernel!r} is a CPU kernel; on cuda the kernel is bnb (bitsandbytes)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise QtError("int8/int4 checkpoints on cuda need bitsandbytes: pip install -e '.[gpu]'") from None
        return
    if kernel not in CPU_KERNELS[scheme]:
        raise QtError(f"quantized kernel {kernel!r} does not run {scheme} checkpoints on CPU; "
                      f"choose one of {', '.join(CPU_KERNELS[scheme])}, native or auto")
    if group is not None and scheme == "int8" and kernel != "dequant":
        raise QtError(f"quantized kernel {kernel!r} takes one int8 scale per row; this checkpoint has one per "
                      "group: use dequant, native or auto")
    if kernel == "int4pack" and group not in INT4PACK_GROUPS:
        raise QtError(f"quantized kernel int4pack runs groups of {', '.join(map(str, INT4PACK_GROUPS))}, not "
                      f"{group}: use dequant or auto")
    if kernel == "fbgemm":
        if "avx2" not in fast.cpu_flags():
            raise QtError("quantized kernel fbgemm needs AVX2 (FBGEMM's int8 products); this CPU lacks it. "
                          f"Use {CPU_KERNELS[scheme][1]} instead")
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise QtError("quantized kernel fbgemm: this torch build has no FBGEMM engine")


def available(scheme: str, group: int | None = None) -> list[str]:
    """The CPU kernels this machine can run for `scheme` at `group`."""
    ok = []
    for k in CPU_KERNELS[scheme]:
        try:
            require(k, scheme, torch.device("cpu"), group)
            ok.append(k)
        except QtError:
            pass
    return ok


@contextlib.contextmanager
def _fbgemm_engine():
    """linear_prepack packs for the global engine: FBGEMM for this block only; torch.ao's deprecation
    warnings (torch is pinned) silenced here."""
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.quantized.engine = old


# ---- kernels -------------------------------------------------------------------------------


class Fbgemm:
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        with _fbgemm_engine():
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.bias = bias
        self.reduce_range = "avx512_vnni" not in fast.cpu_flags()

    def __call__(self, x):
        # linear_dynamic rounds its whole input with ONE scale; over several rows one token's outliers
        # (SmolLM2's first-token activations reach ~1000x the rest) would flatten every other row to a
        # few levels. Rows scaled to absmax 1 first, and the outputs back, make that scale per row.
        if x.shape[0] > 1:
            a = x.abs().amax(1, keepdim=True).clamp_min(1e-30)
            y = torch.ops.quantized.linear_dynamic(x / a, self.packed, self.reduce_range) * a
        else:
            y = torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)
        return y if self.bias is None else y + self.bias


class Int8Pack:
    def __init__(self, q, scale, bias):
        self.q, self.scale, self.bias = q, scale.float(), bias

    def __call__(self, x):
        if x.shape[0] == 1:
            y = torch._weight_int8pack_mm(x, self.q, self.scale)
        else:
            y = F.linear(x, dequantize_int8(self.q, self.scale))
        return y if self.bias is None else y + self.bias


class Int4Pack:
    def __init__(self, packed, scales, mins, bias):
        self.packed, self.scales, self.mins, self.bias = packed, scales, mins, bias
        self.group = packed.shape[1] * 2 // scales.shape[1]
        # torch's layout: codes (N, K) int32 repacked; per group (K/G, N, 2) [scale, zero] with
        # W = (q - 8)·scale + zero, so zero = min + 8·scale.
        self.tiled = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).int(), 2)
        s, m = scales.float(), mins.float()
        self.scale_zero = torch.stack((s.t(), (m + 8 * s).t()), -1).contiguous()

    def __call__(self, x):
        if x.shape[0] == 1:
            y = torch._weight_int4pack_mm_for_cpu(x, self.tiled, self.group, self.scale_zero)
        else:
            y = F.linear(x, dequantize_int4(self.packed, self.scales, self.mins))
        return y if self.bias is None else y + self.bias


class Dequant:
    """fp32 weights in qt_serve.fast's decode layer: one row by row slices, several rows by oneDNN (when
    there), the paths fp32 itself measures fastest on the CPUs of LOG.md."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        lin.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.lin = fast.DecodeLinear(lin, "rows", "mkldnn", torch.get_num_threads())  # falls back where it can't

    def __call__(self, x):
        return self.lin(x)


class Bnb:
    """bitsandbytes on cuda: LLM.int8 (row-wise absmax int8 with fp16 outlier columns) or NF4."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, scheme: str, device: torch.device):
        import bitsandbytes as bnb

        N, K = w.shape
        if scheme == "int8":
            lin = bnb.nn.Linear8bitLt(K, N, bias=bias is not None, has_fp16_weights=False, threshold=6.0)
            lin.weight = bnb.nn.Int8Params(w.half().cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            lin = bnb.nn.Linear4bit(K, N, bias=bias is not None, compute_dtype=torch.float16, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(w.half().cpu(), requires_grad=False, quant_type="nf4")
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias.half().cpu(), requires_grad=False)
        self.lin = lin.to(device)  # bitsandbytes quantizes when the weight moves to the GPU

    def __call__(self, x):
        return self.lin(x.half()).float()


def runs_as(kernel: str, scheme: str) -> str:
    """What the products of `kernel` really compute with, for config.quantization["runs_as"]."""
    if kernel == "bnb":
        return ("LLM.int8: int8 weights, int8 row-wise activations with fp16 outlier columns" if scheme == "int8"
                else "NF4 weights (re-quantized from int4, blocks of 64), fp16 activations")
    if kernel == "dequant":
        return f"{scheme} weights dequantized to fp32 at load (fp32 memory and speed), fp32 activations"
    weights = "int4" if scheme == "int4" and kernel == "int4pack" else "int8 per output channel"
    if scheme == "int4" and kernel == "fbgemm":
        weights += " (int4 expanded at load: int8 memory and speed)"
    acts = "int8 per row (dynamic)" if kernel == "fbgemm" else "fp32"
    return f"{weights} weights, {acts} activations"


def build(kernel: str, scheme: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
          device: torch.device):
    """The kernel `kernel` for one layer's stored tensors {"qweight", "scales"[, "mins"]}."""
    q, scales = tensors["qweight"], tensors["scales"]
    if kernel in TWINS and kernel not in CPU_KERNELS[scheme]:  # an int4 model's int8 LM head: the int8 twin
        kernel = TWINS[kernel]
    if scheme == "int8" and scales.dim() == 2 and kernel in ("int8pack", "fbgemm"):  # per-row products only
        kernel = "dequant"
    if kernel in ("bnb", "dequant"):
        w = (dequantize_int8(q, scales, tensors.get("mins")) if scheme == "int8"
             else dequantize_int4(q, scales, tensors["mins"]))
        return Bnb(w, bias, scheme, device) if kernel == "bnb" else Dequant(w, bias)
    if scheme == "int8":
        return Fbgemm(q, scales, bias) if kernel == "fbgemm" else Int8Pack(q, scales, bias)
    if kernel == "fbgemm":  # int4 expanded to int8 per output channel (see the module docstring)
        return Fbgemm(*quantize_int8(dequantize_int4(q, scales, tensors["mins"]))[:2], bias)
    return Int4Pack(q, scales, tensors["mins"], bias)
