"""Weight-only int8 and int4 checkpoints in torch: write (a state-dict transform) and load (a module swap).

    write(ckpt, "int8" | "int4", out, group_size)  ->  out/ with config.json's qt.quantization:
        {"scheme", "group_size", "kept": [weights left in full precision], "embedding": how it is stored}
    load(out, cfg)  ->  (Transformer with QuantLinear / QuantEmbedding modules, None)   [qt_serve.formats]

Every nn.Linear weight `X.weight` (N, K) becomes `X.qweight`, `X.scales` (+ `X.mins` in groups) in the
formats of quant/kernels.py; norms and biases stay as they were. The LM head is quantized too: on
SmolLM2-135M it is 49152 × 576, a fifth of the weights, streamed for every generated token. A tied
embedding STAYS tied to it: its rows are looked up in the LM head's quantized matrix and dequantized
per token (the embedding is the same matrix, so storing it once is the smallest file; a lookup
dequantizes a few rows, nothing per step beyond them). An untied embedding is stored per row in the
same scheme. int4 keeps in full precision any layer narrower than its group (listed in "kept"); a
group size that does not divide a wider layer's input is an error.

At load, the model is built on the meta device, its nn.Linear modules are swapped for QuantLinear
(model.py knows nothing of this), the saved tensors are assigned after a name/shape/dtype check, and
each layer gets the kernel chosen for this CPU (quant/kernels.py): forced by $QT_QUANT_KERNEL, else
measured once (whole-model one-token forwards, candidates interleaved, best run) and cached in
$QT_HOME/fast_gemv.json with fast.py's choices. The choice is `model.quant_kernel` and
`config.quantization["kernel"]`.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from qt_serve import fast
from qt_serve.checkpoint import DTYPES, Checkpoint, read_tensors, write_checkpoint
from qt_serve.config import ModelConfig
from qt_serve.errors import QtError
from qt_serve.model import Transformer, rope_tables

from quant import kernels

log = logging.getLogger("quant.weights")
SCHEMES = ("int8", "int4")
DEFAULT_GROUP = 32
QK = 32  # llama.cpp's block: a GGUF's int4 blocks are kept as they are at this group size
KERNEL_ENV = "QT_QUANT_KERNEL"
# What the tensors of one layer look like in each scheme: name -> (shape from (N, K, G), dtype); int8 per
# row (G None) has no mins.
LAYOUT = {
    "int8": {"qweight": (lambda n, k, g: (n, k), torch.int8),
             "scales": (lambda n, k, g: (n,) if g is None else (n, k // g), torch.float32),  # grouped: fp16
             "mins": (lambda n, k, g: None if g is None else (n, k // g), torch.float16)},
    "int4": {"qweight": (lambda n, k, g: (n, k // 2), torch.uint8),
             "scales": (lambda n, k, g: (n, k // g), torch.float16),
             "mins": (lambda n, k, g: (n, k // g), torch.float16)},
}


def register(module: nn.Module, scheme: str, n: int, k: int, group: int | None) -> None:
    """Empty buffers for an (n, k) layer's tensors in `scheme` at `group` (None for one it has not)."""
    for name, (shape, dtype) in LAYOUT[scheme].items():
        size = shape(n, k, group)
        module.register_buffer(name, None if size is None else torch.empty(size, dtype=dtype))


class QuantLinear(nn.Module):
    """y = x @ Ŵ.T (+ b), Ŵ stored in `scheme`'s tensors (buffers: they are the state dict), run by `impl`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, group: int | None):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.group = in_features, out_features, scheme, group
        register(self, scheme, out_features, in_features, group)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.kernel, self.impl = None, None  # set by use_kernel after the tensors are loaded

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in LAYOUT[self.scheme] if getattr(self, name) is not None}

    def use_kernel(self, kernel: str, impl=None) -> None:
        self.kernel = kernel
        bias = None if self.bias is None else self.bias.detach().float()
        self.impl = impl or kernels.build(kernel, self.scheme, self.tensors(), bias, self.qweight.device)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group else ""
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}{group}, kernel={self.kernel}"

    def forward(self, x):
        if self.impl is None:  # served by quant.native, and now run by torch (e.g. under a LoRA adapter)
            self.use_kernel("bnb" if self.qweight.device.type == "cuda" else kernels.CPU_KERNELS[self.scheme][0])
        y = self.impl(x.reshape(-1, self.in_features).float().contiguous())  # kernels take fp32 (M, K)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class QuantEmbedding(nn.Module):
    """Rows of a quantized (V, H) table, dequantized as they are looked up."""

    def __init__(self, num: int, dim: int, scheme: str, group: int | None, dtype: torch.dtype):
        super().__init__()
        self.scheme, self.dtype = scheme, dtype
        register(self, scheme, num, dim, group)

    def tie(self, head: QuantLinear) -> None:
        """Look rows up in the LM head's matrix (a tied embedding: the same tensors, stored once)."""
        for name, t in head.tensors().items():
            setattr(self, name, t)

    def forward(self, idx):
        dequantize = kernels.dequantize_int8 if self.scheme == "int8" else kernels.dequantize_int4
        mins = None if self.mins is None else self.mins[idx]  # int8 per row: none
        return dequantize(F.embedding(idx, self.qweight), self.scales[idx], mins).to(self.dtype)


# ---- writing -------------------------------------------------------------------------------------


def plan(model: Transformer, scheme: str, group: int | None) -> tuple[list[str], list[str]]:
    """(module names of the nn.Linear layers to quantize, weight names kept in full precision)."""
    quantized, kept = [], []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if m.in_features < group:
            kept.append(f"{name}.weight")
        elif m.in_features % group:
            raise QtError(f"{scheme} group size {group} does not divide the input width {m.in_features} of {name}; "
                          "choose a group size that divides every layer's input width (e.g. 32 or 64)")
        else:
            quantized.append(name)
    return quantized, kept


def quantize_tensors(w: torch.Tensor, scheme: str, group: int | None, name: str) -> dict[str, torch.Tensor]:
    try:
        q, scales, mins = (kernels.quantize_int8 if scheme == "int8" else kernels.quantize_int4)(w, group)
    except ValueError as e:
        raise QtError(f"{name}: {e}") from None
    return {f"{name}.qweight": q, f"{name}.scales": scales, **({f"{name}.mins": mins} if mins is not None else {})}


def write(ckpt: Checkpoint, scheme: str, out: Path, group_size: int | None = None, gguf: Path | None = None) -> Path:
    """Quantize `ckpt`'s model to `scheme` into checkpoint directory `out` (atomically); the model is only read.

    int4 keeps the LM head in int8 (config `head`): it is the one layer whose rounding shows in every
    logit (SmolLM2 at int4 with an int4 head: perplexity +6.2% over fp32, LOG.md 2026-12-01). With `gguf`,
    the llama.cpp file `ckpt` was read from, int4 layers stored there as Q4_0 / Q4_1 blocks of 32 keep
    those blocks exactly (a second rounding of 4-bit weights lands between their levels)."""
    if scheme not in SCHEMES:
        raise QtError(f"quant.weights writes {', '.join(SCHEMES)}, not {scheme!r}")
    group = group_size or DEFAULT_GROUP
    if group < 2 or group % 2:
        raise QtError(f"{scheme} group size must be an even number ≥ 2, got {group}")
    model, cfg = ckpt.model, copy.deepcopy(ckpt.config)
    quantized, kept = plan(model, scheme, group)
    head = "int8" if scheme == "int4" else scheme
    stored = stored_blocks(gguf, cfg) if group == QK and gguf is not None else {}
    tied, H = cfg.tie_word_embeddings, cfg.hidden_size
    if tied:  # the embedding is the LM head's matrix: quantized with it (rows looked up there) or kept with it
        embedding = "lm_head" if "lm_head" in quantized else "kept"
    else:
        embedding = scheme if H >= group and H % group == 0 else "kept"
    if embedding == "kept":
        kept.append("model.embed_tokens.weight")
    tensors = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            module, _, leaf = name.rpartition(".")
            if module in quantized and leaf == "weight" and stored.get(module, {}).get("scheme") == (
                    head if module == "lm_head" else scheme):
                tensors.update(stored[module]["tensors"])
            elif module in quantized and leaf == "weight":
                tensors.update(quantize_tensors(t, head if module == "lm_head" else scheme, group, module))
            elif name == "model.embed_tokens.weight" and embedding == scheme:
                tensors.update(quantize_tensors(t, scheme, group, "model.embed_tokens"))
            elif name == "model.embed_tokens.weight" and embedding == "lm_head" or name == "lm_head.weight" and tied:
                pass  # a tied matrix is stored once: as the LM head's quantized tensors, or as the embedding
            else:
                tensors[name] = t.float().contiguous() if t.is_floating_point() else t.contiguous()
    cfg.torch_dtype = "float32"
    cfg.quantization = {"scheme": scheme, "group_size": group, "kept": kept, "embedding": embedding, "head": head,
                        "gguf_blocks": sorted(m for m in stored if m in quantized and stored[m]["scheme"] == (
                            head if m == "lm_head" else scheme)),
                        "source_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}

    def weights(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return write_checkpoint(out, cfg, weights, ckpt.tokenizer, ckpt.generation_config)


def stored_blocks(gguf: Path, cfg: ModelConfig) -> dict[str, dict]:
    """{module name: {"scheme", "tensors"}} for every layer a llama.cpp file stores in blocks of 32, in this
    module's formats at group 32 and exactly: Q4_1 (W = q·d + m) and Q4_0 (W = (q - 8)·d, so m = -8·d) as
    int4, Q8_0 (W = q·d, so m = -128·d) as int8; d and m are fp16 in the file, so nothing is rounded."""
    from quant.onnx import gguf_blocks

    out = {}
    for name, b in gguf_blocks(gguf, cfg).items():
        d = torch.from_numpy(b.d)
        if b.bits == 8:  # Blocks keep Q8_0's codes as q + 128
            q = (torch.from_numpy(b.q).to(torch.int16) - 128).to(torch.int8)
            out[name] = {"scheme": "int8", "tensors": {f"{name}.qweight": q, f"{name}.scales": d.half(),
                                                       f"{name}.mins": -128 * d.half()}}
            continue
        m = torch.from_numpy(b.m).half() if b.m is not None else -8 * d.half()
        out[name] = {"scheme": "int4", "tensors": {f"{name}.qweight": kernels.pack_int4(torch.from_numpy(b.q)),
                                                   f"{name}.scales": d.half(), f"{name}.mins": m}}
    return out


# ---- loading -------------------------------------------------------------------------------------


def swap_modules(model: Transformer, scheme: str, group: int | None, kept: list[str], dtype: torch.dtype,
                 head: str | None = None, embedding: str | None = None) -> None:
    """Replace, in place, each nn.Linear not in `kept` by a QuantLinear (the LM head in `head`'s scheme,
    default `scheme`), and the embedding as config says (a tied one in the head's scheme)."""
    head = head or scheme
    for full, child in list(model.named_modules()):
        if isinstance(child, nn.Linear) and f"{full}.weight" not in kept:
            parent, _, leaf = full.rpartition(".")
            s = head if full == "lm_head" else scheme
            setattr(model.get_submodule(parent), leaf, QuantLinear(child.in_features, child.out_features,
                                                                   child.bias is not None, s, group))
    if "model.embed_tokens.weight" not in kept:
        emb = model.model.embed_tokens
        s = head if embedding == "lm_head" else scheme
        model.model.embed_tokens = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, s, group, dtype)


def check_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise QtError(f"{source}: weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, e in expected.items():
        t = tensors[k]
        if t.shape != e.shape:
            raise QtError(f"{source}: {k} has shape {tuple(t.shape)}, expected {tuple(e.shape)} "
                          "(from config.json's sizes and quantization); the checkpoint is corrupt")
        if not (t.is_floating_point() if e.is_floating_point() else t.dtype == e.dtype):
            raise QtError(f"{source}: {k} has dtype {t.dtype}, expected {e.dtype}; the checkpoint is corrupt")


def load(directory: Path, cfg: ModelConfig, dtype: torch.dtype | None = None, device="cpu",
         max_seq_len: int | None = None) -> tuple[Transformer, None]:
    """The qt_serve.formats loader of int8 / int4 checkpoints: (model, None); TorchRunner serves the model."""
    directory, device = Path(directory), torch.device(device)
    info = cfg.quantization or {}
    scheme, group, kept = info.get("scheme"), info.get("group_size"), list(info.get("kept") or [])
    if (scheme not in SCHEMES or not (isinstance(group, int) and group >= 2 or scheme == "int8" and group is None)
            or info.get("head", scheme) not in SCHEMES):
        raise QtError(f"{directory}/config.json: bad quantization record {info}")
    dtype = dtype or DTYPES.get(cfg.torch_dtype, torch.float32)
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len)
        swap_modules(model, scheme, group, kept, dtype, info.get("head"), info.get("embedding"))
    expected = model.state_dict()
    tied_quant = cfg.tie_word_embeddings and isinstance(model.model.embed_tokens, QuantEmbedding)
    tied_names = [k for k in expected if k.startswith("model.embed_tokens.")] if tied_quant else []
    for k in tied_names + (["lm_head.weight"] if cfg.tie_word_embeddings and not tied_quant else []):
        expected.pop(k, None)
    tensors = read_tensors(directory)
    for k in expected:  # int8 groups without mins (qt's first grouped int8) are symmetric: m = -128·d
        layer = k.removesuffix(".mins")
        if k != layer and k not in tensors and tensors.get(f"{layer}.qweight", torch.empty(0)).dtype == torch.int8:
            tensors[k] = -128 * tensors[f"{layer}.scales"].half()
    check_tensors(expected, tensors, str(directory))
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied_quant:
        model.model.embed_tokens.tie(model.lm_head)
    elif cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg, model.max_seq_len)
    model.to(device)
    with torch.no_grad():  # full-precision parameters (norms, biases, kept layers) in `dtype`; codes untouched
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.eval().requires_grad_(False)
    runner = native_runner(model, device)
    if runner is None:
        use_kernel(model, device)
    return model, runner


# ---- choosing the kernel -------------------------------------------------------------------------


def native_runner(model: Transformer, device: torch.device):
    """A factory of `quant.native.NativeRunner` over `model` when its kernel is native: forced
    ($QT_QUANT_KERNEL=native; an error says why it cannot be), or `auto` where native.cpp builds with SIMD
    products (AVX2 or AVX-512 VNNI) and runs this model. Else None: torch's kernels (`use_kernel`).

    `auto` takes native without timing it against torch's kernels: a decode step in torch eager costs
    ~4.8 ms of op overhead on SmolLM2 before any weight is read, native.cpp's whole int4 step ~2.7 ms
    (LOG.md 2026-12-02). Its activations are rounded per block of 32 to int8 and a residual (~14 bits;
    $QT_NATIVE_ROUNDING=once: int8 alone, faster): SmolLM2's greedy replies agree with fp32's on 9 of 10
    prompts at int4 and int8; QT_QUANT_KERNEL=dequant keeps them fp32."""
    from quant import native

    kernel = os.environ.get(KERNEL_ENV) or "auto"
    if device.type != "cpu" or kernel not in ("auto", "native"):
        return None
    why = native.unsupported(model)
    if why is None:
        named = os.environ.get(native.ISA_ENV)  # a build the user named: its errors are theirs to see
        try:
            isa = native.extension().isa()
            if kernel == "auto" and isa not in native.SIMD and not named:
                why = f"native.cpp built here without SIMD products ({isa}); auto leaves it to torch's kernels"
        except QtError as e:
            if named:
                raise
            why = str(e)
    if why is not None:
        if kernel == "native":
            raise QtError(f"{KERNEL_ENV}=native: {why}")
        log.info("int8/int4 on torch's kernels: %s", why)
        return None
    runs_as = native.runs_as(model.config.quantization["scheme"]) + f" ({isa})"
    model.quant_kernel = {"kernel": "native", "source": "forced" if kernel == "native" else "auto", "runs_as": runs_as}
    model.config.quantization = {**model.config.quantization, "kernel": "native", "runs_as": runs_as}
    return lambda: native.NativeRunner(model)



def use_kernel(model: Transformer, device: torch.device | str = "cpu", kernel: str | None = None) -> dict:
    """Give every QuantLinear the kernel `kernel` (else $QT_QUANT_KERNEL, else "auto": measured, cached).

    Returns and records `model.quant_kernel` = {"kernel", "source": forced|measured|cached|only, "runs_as"};
    kernel and runs_as (the weights and activations the products really use) also go into
    model.config.quantization. `auto` picks the fastest kernel that keeps the activations in fp32 (the
    packed kernel or dequant); fbgemm, which rounds them to int8, only runs when forced: it is ~3x faster
    than fp32 here but costs accuracy (SmolLM2-135M, 256 tokens of passage.txt: perplexity 7.11 fp32,
    7.31 int8 weight-only, 8.28 int8 fbgemm; 7.77 int4 weight-only, 8.71 int4 fbgemm)."""
    device = torch.device(device)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return {}
    scheme = layers[0].scheme
    kernel = kernel or os.environ.get(KERNEL_ENV) or "auto"
    if device.type == "cuda":
        kernel = "bnb" if kernel == "auto" else kernel
    if kernel != "auto":
        kernels.require(kernel, scheme, device, layers[0].group)
        chosen = {"kernel": kernel, "source": "forced"}
    else:
        cands = [k for k in kernels.available(scheme, layers[0].group) if k not in kernels.ROUNDS_ACTIVATIONS]
        if not cands:
            raise QtError(f"no CPU kernel for {scheme} runs here")
        chosen = {"kernel": cands[0], "source": "only"}
        if len(cands) > 1:
            shapes = sorted({(m.in_features, m.out_features) for m in layers})
            key = fast.cache_key(["quant", scheme, layers[0].group, torch.get_num_threads(), shapes, cands])
            entry, source = fast.cached_measurement(key, lambda: measure(model, layers, cands))
            chosen = {"kernel": entry["kernel"], "source": source, "ratios": entry["ratios"]}
    if any(m.kernel != chosen["kernel"] for m in layers):  # a measurement leaves the winner installed
        for m in layers:
            m.use_kernel(chosen["kernel"])
    chosen["runs_as"] = kernels.runs_as(chosen["kernel"], scheme)
    model.quant_kernel = chosen
    model.config.quantization = {**model.config.quantization, "kernel": chosen["kernel"],
                                 "runs_as": chosen["runs_as"]}
    return chosen


def measure(model: Transformer, layers: list[QuantLinear], cands: list[str], rounds: int = 5) -> dict:
    """Time whole-model one-token forwards (no cache: every weight streamed once, as in a decode step)
    with each candidate's kernels in place, interleaved round by round; the best run counts. Leaves the
    fastest installed. {"kernel", "ratios" (time / the first candidate's), "noisy"}."""
    built = {k: [kernels.build(k, m.scheme, m.tensors(), None if m.bias is None else m.bias.detach().float(),
                               m.qweight.device) for m in layers] for k in cands}
    idx = torch.zeros((1, 1), dtype=torch.long)
    times = {k: [] for k in cands}
    with torch.inference_mode():
        for r in range(rounds + 1):  # round 0 warms up
            for k, impls in built.items():
                for m, impl in zip(layers, impls):
                    m.use_kernel(k, impl)
                start = time.perf_counter()
                model(idx)
                if r:
                    times[k].append(time.perf_counter() - start)
    best = min(cands, key=lambda k: min(times[k]))
    for m, impl in zip(layers, built[best]):
        m.use_kernel(best, impl)
    base = min(times[cands[0]])
    return {"kernel": best, "ratios": {k: round(min(t) / base, 3) for k, t in times.items()},
            "noisy": fast.noisy(times)}


# ---- bitsandbytes at load time (qt-serve --load-in int8|int4, CUDA) -------------------------------


class LoadedIn(nn.Module):
    """A block projection quantized by bitsandbytes from its full-precision weight (no int8/int4 file in
    between, so no second rounding): LLM.int8 or NF4 on the GPU, fp16 products, out in the input's dtype."""

    def __init__(self, linear: nn.Linear, scheme: str, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach()
        self.kernel = kernels.Bnb(linear.weight.detach(), bias, scheme, device)
        self.lin = self.kernel.lin  # registered, so .to() and the state dict see bitsandbytes' module

    def forward(self, x):
        return self.kernel(x).to(x.dtype)


def load_in(model: Transformer, scheme: str, device) -> Transformer:
    """The `qt_serve.load_in` entry point: `model` (on the host) with every block projection swapped for a
    bitsandbytes layer on `device`, layer by layer so host memory falls as GPU memory fills; the embedding,
    norms and LM head move to `device` as they are (bitsandbytes quantizes neither tables nor the head)."""
    device = torch.device(device)
    kernels.require("bnb", scheme, device)
    layers = model.model.layers
    for name in [n for n, m in layers.named_modules() if isinstance(m, nn.Linear)]:  # names: no module kept alive
        parent, _, leaf = name.rpartition(".")
        setattr(layers.get_submodule(parent), leaf, LoadedIn(layers.get_submodule(name), scheme, device))
    model.config.quantization = {"scheme": f"bnb-{scheme}", "runs_as": "LLM.int8 (int8 weights and row-wise activations, "
                                 "fp16 outlier columns)" if scheme == "int8" else "NF4 weights, fp16 activations"}
    return model.to(device).eval().requires_grad_(False)
