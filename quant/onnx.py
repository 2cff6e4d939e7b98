"""ONNX export of a checkpoint, and the onnxruntime runner that serves it.

The graph is written node by node with `onnx.helper` from the checkpoint's weights (no tracing),
with onnxruntime's fused decoder ops so a decode step is ~10 kernel launches per layer (int4: ~22):

    input_ids (B, S) ─ Gather(embed_tokens) ─> x
    N × [ RMSNorm ─ MatMul q|k|v ─ GroupQueryAttention (RoPE, KV cache) ─ MatMul o
          (residual +) RMSNorm ─ MatMul gate|up ─ SiLU(gate)·up ─ MatMul down ]
    (residual +) RMSNorm ─ Gather(logit_index) ─ MatMul lm_head ─> logits (K, vocab)

Inputs:
    input_ids              (B, S) int64
    seqlens_k              (B,) int32: each row's length after this step, minus 1
    total_sequence_length  () int32: the longest row's length after this step
    logit_index            (K,) int64: positions in the flattened B·S tokens whose logits are wanted
                           (the LM head, the largest product per token, runs on those rows only)
    past_key_i, past_value_i   (B, kv_heads, L, head_dim), for each layer i
Outputs:
    logits                 (K, vocab)
    present_key_i, present_value_i   (B, kv_heads, L, head_dim): the runner binds them to the past
                           inputs' memory, so GroupQueryAttention writes the new keys and values in
                           place at each row's own length (continuous batching: rows differ in length)

`onnx-int8` makes each MatMul (the LM head included) onnxruntime's 8-bit `MatMulNBits` (its own
MatMulNBitsQuantizer: blocks of 32 along the input dimension, integer zero points). `onnx-int4` writes
4-bit `MatMulNBits` in llama.cpp's Q4_1 form (`Blocks`, `_Graph.matmul_blocks`: a float minimum per
block, added as a block-sum term), the LM head 8-bit, the embedding an fp16 table; a GGUF's own Q4_0 /
Q4_1 / Q8_0 blocks are taken as stored (`gguf_blocks`). accuracy_level 4 = int8 activations in the dot
products, which is what makes MatMulNBits fast on CPUs with VNNI.
Floats are fp32, or fp16 in `onnx-fp16`: for the CUDA execution provider, whose GroupQueryAttention
takes fp16 only (the CPU one runs both).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qt_serve.checkpoint import DTYPES, Checkpoint, write_checkpoint
from qt_serve.config import ModelConfig
from qt_serve.errors import QtError
from qt_serve.model import rope_tables
from qt_serve.runner import Segment

OPSET = 21
MS = "com.microsoft"
FILE, DATA = "model.onnx", "model.onnx.data"
WEIGHTS = {"fp32": None, "fp16": None, "int4": 4, "int8": 8}  # ONNX weight format -> bits of MatMulNBits
NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
TORCH = {np.float32: torch.float32, np.float16: torch.float16}


# ---- export ------------------------------------------------------------------------------


class _Graph:
    """Nodes and initializers of the graph being written, with fresh names for intermediates."""

    def __init__(self, dtype=np.float32):
        self.nodes, self.inits, self.n, self.dtype = [], [], 0, dtype
        self.block_sums: dict[int, str] = {}

    def init(self, name: str, array) -> str:
        from onnx import numpy_helper

        if array.dtype.kind == "f":
            array = array.astype(self.dtype)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        self.n += 1
        names = [f"{op}_{self.n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=f"{op}_{self.n}", domain=domain, **attrs))
        return names

    def matmul(self, x: str, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None,
               blocks: Blocks | None = None) -> str:
        """x @ weight.T (+ bias): the (out, in) torch weight stored (in, out) as MatMul wants it, or as
        quantized blocks (see `Blocks`)."""
        if blocks is None:
            y = self.op("MatMul", [x, self.init(name, weight.detach().float().t().numpy())])[0]
        else:
            y = self.matmul_blocks(x, name, blocks)
        if bias is not None:
            y = self.op("Add", [y, self.init(name + ".bias", bias.detach().float().numpy())])[0]
        return y

    def matmul_blocks(self, x: str, name: str, w: Blocks) -> str:
        """MatMulNBits in its symmetric form, W = (q - z)·d with z = 2^(bits-1) (no zero points: the fast
        int8-activation kernels; float zero points, which would hold a Q4_1 minimum, run ~100x slower),
        plus, for blocks with a minimum m, the term Σ_b m'·Σ_{k∈b} x with m' = m + z·d: a (K/B)-long
        product over the block sums of x."""
        N, K = w.q.shape
        B = K // w.d.shape[1]
        codes = w.q.reshape(N, K // B, B)
        if w.bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # two codes a byte, even k in the low nibble
        y = self.op("MatMulNBits", [x, self.init(name + ".qweight", codes), self.init(name + ".scales", w.d.ravel())],
                    domain=MS, K=K, N=N, bits=w.bits, block_size=B, accuracy_level=4)[0]
        if w.m is None:
            return y
        if K not in self.block_sums:  # (K, K/B) ones on each block: x @ it gives the block sums of x
            self.block_sums[K] = self.init(f"block_sums_{K}", np.kron(np.eye(K // B), np.ones((B, 1))))
        sums = self.op("MatMul", [x, self.block_sums[K]])[0]  # (..., K/B)
        offsets = self.init(name + ".offsets", (w.m + 2 ** (w.bits - 1) * w.d).T)  # (K/B, N)
        return self.op("Add", [y, self.op("MatMul", [sums, offsets])[0]])[0]


@dataclass
class Blocks:
    """One weight (N, K) in blocks of B along K, as llama.cpp stores them: W[n, k] = q·d + m (Q4_1: q in
    0..15, (d, m) per (n, block)), or W = (q - 2^(bits-1))·d when m is None (Q4_0, Q8_0 with q + 128).
    """

    q: np.ndarray  # (N, K) uint8
    d: np.ndarray  # (N, K/B) fp32
    m: np.ndarray | None  # (N, K/B) fp32
    bits: int = 4

    @classmethod
    def quantize(cls, w: torch.Tensor, block: int) -> Blocks:
        """4-bit, each block's [min, max] in 16 levels (a float minimum: no level is spent on reaching zero)."""
        N, K = w.shape
        g = w.detach().float().reshape(N, K // block, block)
        lo, hi = g.amin(-1), g.amax(-1)
        d = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
        q = torch.round((g - lo[..., None]) / d[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
        return cls(q.numpy(), d.numpy(), lo.numpy())

    @classmethod
    def quantize8(cls, w: torch.Tensor, block: int = 32) -> Blocks:
        """8-bit, symmetric per block, as llama.cpp's Q8_0: q = round(w / d) + 128, d = absmax / 127."""
        N, K = w.shape
        g = w.detach().float().reshape(N, K // block, block)
        d = g.abs().amax(-1) / 127
        d = torch.where(d > 0, d, torch.ones_like(d))
        q = (torch.round(g / d[..., None]).clamp(-127, 127) + 128).to(torch.uint8).reshape(N, K)
        return cls(q.numpy(), d.numpy(), None, 8)

    def dequantize(self) -> torch.Tensor:
        N, K = self.q.shape
        g = self.q.reshape(N, self.d.shape[1], -1).astype(np.float32)
        m = self.m[..., None] if self.m is not None else -(2 ** (self.bits - 1)) * self.d[..., None]
        return torch.from_numpy((g * self.d[..., None] + m).reshape(N, K))

    @classmethod
    def concat(cls, parts: list[Blocks]) -> Blocks:
        """Stacked along N (a fused q|k|v or gate|up product); mixed formats are made one."""
        if len({(p.bits, p.d.shape[1]) for p in parts}) > 1:  # e.g. Q4_1 beside Q8_0: requantized, rare
            return cls.quantize(torch.cat([p.dequantize() for p in parts]), parts[0].q.shape[1] // parts[0].d.shape[1])
        if any(p.m is not None for p in parts):  # a symmetric part as Q4_1: m = -z·d exactly
            parts = [p if p.m is not None else replace(p, m=-(2 ** (p.bits - 1)) * p.d) for p in parts]
        m = None if parts[0].m is None else np.concatenate([p.m for p in parts])
        return cls(np.concatenate([p.q for p in parts]), np.concatenate([p.d for p in parts]), m, parts[0].bits)


def build_graph(model, dtype=np.float32, int4=None):
    """The ONNX graph (onnx.ModelProto) of a `qt_serve.model.Transformer`, floats in `dtype` (see the docstring).

    `int4(module name, weight) -> Blocks`, when given, makes every linear layer (the LM head included) a
    block-quantized product, and the embedding an fp16 table."""
    from onnx import TensorProto, helper, numpy_helper

    cfg: ModelConfig = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    g = _Graph(dtype)
    eps = float(cfg.rms_norm_eps)
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
    g.init("cos_cache", cos[:, : hd // 2].numpy())  # (max_pos, head_dim/2): GQA rotates pairs (i, i + hd/2)
    g.init("sin_cache", sin[:, : hd // 2].numpy())

    quant = int4 or (lambda name, w: None)
    if int4 is None:
        x = g.op("Gather", [g.init("embed_tokens", sd["model.embed_tokens.weight"].numpy()), "input_ids"])[0]
    else:  # int4 weights: the table in fp16 (a lookup reads one row; half of fp32's file size)
        table = numpy_helper.from_array(sd["model.embed_tokens.weight"].numpy().astype(np.float16), "embed_tokens")
        g.inits.append(table)
        x = g.op("Cast", [g.op("Gather", ["embed_tokens", "input_ids"])[0]], to=TensorProto.FLOAT)[0]
    residual, pending = x, None  # pending: the last block output not yet added to the residual
    presents = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."

        def norm(name):
            nonlocal residual, pending
            w = g.init(p + name, sd[p + name + ".weight"].numpy())
            if pending is None:
                return g.op("SimplifiedLayerNormalization", [residual, w], epsilon=eps, axis=-1)[0]
            out = g.op("SkipSimplifiedLayerNormalization", [pending, residual, w], outputs=4, domain=MS, epsilon=eps)
            residual, pending = out[3], None  # out[3] = pending + residual
            return out[0]

        h = norm("input_layernorm")
        att = p + "self_attn."
        names = ("q_proj", "k_proj", "v_proj")
        qkv_w = torch.cat([sd[att + n + ".weight"] for n in names])
        qkv_b = torch.cat([sd[att + n + ".bias"] for n in names]) if cfg.qkv_bias else None
        qkv4 = int4 and Blocks.concat([quant(att + n, sd[att + n + ".weight"]) for n in names])
        qkv = g.matmul(h, att + "qkv_proj", qkv_w, qkv_b, qkv4)  # (B, S, (H + 2·KV)·D): GQA's packed layout
        qkv = [qkv, "", ""]  # GQA's query, key, value inputs: packed in the first
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's D of the queries and keys, before GQA's RoPE
            sizes = g.init(att + "qkv_sizes", np.array([cfg.num_attention_heads * hd, kv * hd, kv * hd], np.int64))
            q, k, v = g.op("Split", [qkv[0], sizes], outputs=3, axis=-1)
            heads, rows = (g.init(att + n, np.array(shape, np.int64)) for n, shape in
                           (("heads", [0, 0, -1, hd]), ("rows", [0, 0, -1])))

            def head_norm(x, name):  # (B, S, n·D) -> (B, S, n, D), normalised over D -> (B, S, n·D)
                w = g.init(att + name, sd[att + name + ".weight"].numpy())
                x = g.op("SimplifiedLayerNormalization", [g.op("Reshape", [x, heads])[0], w], epsilon=eps, axis=-1)
                return g.op("Reshape", [x[0], rows])[0]
            qkv = [head_norm(q, "q_norm"), head_norm(k, "k_norm"), v]
        window = cfg.windows()[i]  # GQA: local_window_size = the window (checked against transformers)
        y, pk, pv = g.op("GroupQueryAttention",
                         [*qkv, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length",
                          "cos_cache", "sin_cache"], outputs=3, domain=MS,
                         num_heads=cfg.num_attention_heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0,
                         local_window_size=-1 if window is None else window)
        presents += [pk, pv]
        pending = g.matmul(y, att + "o_proj", sd[att + "o_proj.weight"], sd.get(att + "o_proj.bias"),
                           quant(att + "o_proj", sd[att + "o_proj.weight"]))

        h = norm("post_attention_layernorm")
        mlp = p + "mlp."
        gu_w = torch.cat([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]])
        gu_b = torch.cat([sd[mlp + "gate_proj.bias"], sd[mlp + "up_proj.bias"]]) if cfg.mlp_bias else None
        gu4 = int4 and Blocks.concat([quant(mlp + n, sd[mlp + n + ".weight"]) for n in ("gate_proj", "up_proj")])
        gate, up = g.op("Split", [g.matmul(h, mlp + "gate_up_proj", gu_w, gu_b, gu4)], outputs=2, axis=-1,
                        num_outputs=2)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0], up])[0]  # SiLU(gate) · up
        pending = g.matmul(act, mlp + "down_proj", sd[mlp + "down_proj.weight"], sd.get(mlp + "down_proj.bias"),
                           quant(mlp + "down_proj", sd[mlp + "down_proj.weight"]))

    w = g.init("model.norm", sd["model.norm.weight"].numpy())
    h = g.op("SkipSimplifiedLayerNormalization", [pending, residual, w], outputs=4, domain=MS, epsilon=eps)[0]
    rows = g.op("Reshape", [h, g.init("hidden_rows", np.array([-1, cfg.hidden_size], dtype=np.int64))])[0]
    picked = g.op("Gather", [rows, "logit_index"], axis=0)[0]  # (K, hidden)
    logits = g.matmul(picked, "lm_head", sd["lm_head.weight"], sd.get("lm_head.bias"),
                      quant("lm_head", sd["lm_head.weight"]))
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    for i, name in enumerate(presents):
        g.nodes.append(helper.make_node("Identity", [name], [f"present_{'key' if i % 2 == 0 else 'value'}_{i // 2}"]))

    f32, cache = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT, ["batch", kv, "cache_len", hd]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("logit_index", TensorProto.INT64, ["picked"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["picked", cfg.vocab_size])]
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f32, cache))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f32, cache))
    graph = helper.make_graph(g.nodes, "qt_decoder", inputs, outputs, initializer=g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                             producer_name="qt", ir_version=10)


def gguf_blocks(path: str | Path, cfg: ModelConfig) -> dict[str, Blocks]:
    """The Q4_0 / Q4_1 / Q8_0 weights of a llama.cpp GGUF file as they are stored, by HF module name (the
    LM head is the embedding when tied), so they are served without a second rounding."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    from qt_serve.gguf_import import PERMUTED, TENSOR_NAMES, unpermute

    names = {g.format(i): h.format(i).removesuffix(".weight") for g, h in TENSOR_NAMES.items()
             for i in (range(cfg.num_hidden_layers) if "{}" in g else [None])}
    out, reader = {}, GGUFReader(str(path))
    permuted = reader.fields["general.architecture"].contents() in PERMUTED
    for t in reader.tensors:
        if t.name not in names or t.tensor_type not in (T.Q4_0, T.Q4_1, T.Q8_0):
            continue
        N, K = int(t.shape[1]), int(t.shape[0])
        raw = np.asarray(t.data).reshape(N, K // 32, -1)  # one row of 32-weight blocks per output
        d = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        if t.tensor_type == T.Q8_0:  # d (fp16), 32 int8
            b = Blocks((raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(N, K), d, None, 8)
        else:  # Q4_0: d, 16 bytes; Q4_1: d, m (fp16), 16 bytes; byte j holds weight j (low) and j + 16 (high)
            m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if t.tensor_type == T.Q4_1 else None
            qs = raw[..., -16:]
            b = Blocks(np.concatenate([qs & 15, qs >> 4], -1).reshape(N, K), d, m, 4)
        name = names[t.name]
        if permuted and name.endswith(("q_proj", "k_proj")):  # llama.cpp's row order for RoPE: back to HF's
            heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            b = Blocks(unpermute(b.q, heads), unpermute(b.d, heads), None if b.m is None else unpermute(b.m, heads),
                       b.bits)
        out[name] = b
    if cfg.tie_word_embeddings and "model.embed_tokens" in out:
        out["lm_head"] = out["model.embed_tokens"]
    return out


def quantize_graph(proto, bits: int, block_size: int, accuracy_level: int = 4):
    """MatMul -> MatMulNBits by onnxruntime's quantizer (int8: integer zero points per block cost ~0.7%
    perplexity on SmolLM2-135M, within the 8-bit grid's own error)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # Importing the quantizer calls logging.basicConfig(level=INFO), which would turn on every library's
    # INFO logs in this process (each HTTP request of a server, ...): undone below; its own log is per node.
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
                                          bits=bits, op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),))
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level, algo_config=config)
    root.handlers[:], root.level = handlers, logging.WARNING
    try:
        quantizer.process()
    finally:
        root.level = level
    return quantizer.model.model


def export(ckpt: Checkpoint, out: str | Path, weights: str = "fp32", block_size: int | None = None,
           gguf: str | Path | None = None) -> Path:
    """Write checkpoint directory `out`: config.json (scheme "onnx"), model.onnx + model.onnx.data, tokenizer.

    int4 keeps the LM head at 8 bits (Q8_0's form), as llama.cpp's quantizer does: at 4 bits it alone costs
    SmolLM2-135M +6.4% perplexity (22.20 vs 20.87), for ~12% more decode speed. It takes the blocks of
    `gguf` (the llama.cpp file the checkpoint was imported from) as they are stored, where they are Q4_0 /
    Q4_1 / Q8_0: quantizing its dequantized weights again would round twice (SmolLM2-135M's Q4_1 file:
    perplexity +62% re-quantized by MatMulNBitsQuantizer's integer zero points, 0 from its own blocks)."""
    import onnx

    if weights not in WEIGHTS:
        raise QtError(f"ONNX weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    cfg = copy.deepcopy(ckpt.config)
    if cfg.head_dim % 16:
        raise QtError(f"head_dim {cfg.head_dim} is not a multiple of 16, which onnxruntime's GroupQueryAttention "
                      "needs for rotary embeddings; serve this model in torch (fp32/bf16/int8/int4)")
    bits, block = WEIGHTS[weights], block_size or 32
    if bits is not None and (block < 16 or block & (block - 1)):
        raise QtError(f"block size {block}: MatMulNBits takes a power of two ≥ 16")
    info = {}
    if bits == 4:
        stored = gguf_blocks(gguf, cfg) if gguf is not None and block == 32 else {}
        info = {"from_gguf": sorted({f"Q{b.bits}" + ("_1" if b.m is not None else "_0") for b in stored.values()})}
        proto = build_graph(ckpt.model, int4=lambda name, w: stored.get(name) or (
            Blocks.quantize8(w) if name == "lm_head" else Blocks.quantize(w, block)))
    else:
        proto = build_graph(ckpt.model, np.float16 if weights == "fp16" else np.float32)
        if bits is not None:
            proto = quantize_graph(proto, bits, block)
    cfg.torch_dtype = "float16" if weights == "fp16" else "float32"
    cfg.quantization = {"scheme": "onnx", "weights": weights, "file": FILE, "opset": OPSET,
                        **({"block_size": block, "accuracy_level": 4} if bits else {}), **info}

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp / FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA, size_threshold=1024)

    return write_checkpoint(out, cfg, write, ckpt.tokenizer, ckpt.generation_config)


# ---- serving -----------------------------------------------------------------------------


def load(directory: Path, cfg: ModelConfig, dtype=None, device="cpu", max_seq_len=None):
    """The `qt_serve.formats` loader of scheme "onnx": no torch model, a runner factory."""
    path = Path(directory) / (cfg.quantization or {}).get("file", FILE)
    if not path.is_file():
        raise QtError(f"{path} is missing: the ONNX checkpoint is incomplete; export it again with "
                      f"qt-quant SOURCE --to onnx")
    if dtype is not None and dtype != DTYPES.get(cfg.torch_dtype):
        raise QtError(f"{directory} is an ONNX graph that runs in the precision it was exported with "
                      f"({cfg.torch_dtype}); leave out --dtype (or export again from the source checkpoint)")
    length = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return None, lambda: OnnxRunner(path, cfg, length, device)


class OnnxRunner:
    """A `qt_serve.runner.Runner` over an onnxruntime session of the graph above.

    The KV cache is one torch tensor per kind, (layers, rows, kv_heads, L, head_dim), whose row
    ranges are bound (by pointer) as both past and present of a run, so onnxruntime updates it in
    place. A step runs as few sessions as it can: single-token segments on consecutive rows
    together (one decode batch), each prefill chunk alone (GroupQueryAttention takes a prompt
    continuation only at batch 1)."""

    def __init__(self, path: str | Path, cfg: ModelConfig, max_seq_len: int, device="cpu"):
        import onnxruntime as ort

        self.config, self.max_seq_len, self.device = cfg, max_seq_len, torch.device(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its threads spin between the ops of a run (fast hand-offs) but not after it: the engine's torch
        # sampling and the next request's work would otherwise share 2 cores with a spinning thread
        # (SmolLM2 onnx-int4 decode, 2 threads: 95 tok/s spinning on, 150 with this).
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise QtError("device cuda asked for, but this onnxruntime has no CUDA execution provider; "
                              "pip uninstall -y onnxruntime && pip install onnxruntime-gpu==1.31.1, or serve on cpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise QtError(f"{path}: onnxruntime cannot load it ({e})") from None
        types = {i.name: i.type for i in self.session.get_inputs()}
        wanted = {"input_ids", "seqlens_k", "total_sequence_length", "logit_index"} | {
            f"past_{k}_{i}" for i in range(cfg.num_hidden_layers) for k in ("key", "value")}
        if wanted - set(types) or types["past_key_0"] not in NP:
            raise QtError(f"{path} lacks the inputs qt's runner drives ({', '.join(sorted(wanted - set(types))[:4])}, "
                          "...): it is not a graph exported by qt-quant --to onnx, with a KV cache per layer")
        self.np_dtype = NP[types["past_key_0"]]  # the cache's dtype: the graph's float type
        self.k = self.v = None
        self.bindings: dict[tuple[int, int], object] = {}
        self.where = ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)

    def allocate(self, rows: int, length: int) -> None:
        cfg = self.config
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, min(length, self.max_seq_len), cfg.head_dim)
        self.k = self.v = None  # free the old cache first
        self.bindings = {}  # they point into the old cache
        self.k = torch.zeros(shape, dtype=TORCH[self.np_dtype], device=self.device)
        self.v = torch.zeros(shape, dtype=TORCH[self.np_dtype], device=self.device)

    def forward(self, segments: list[Segment], logits_at: list[int]) -> torch.Tensor:
        runs, start = [], 0  # [segments, index of their first token among all the step's tokens, end]
        for s in segments:
            last = runs[-1][0][-1] if runs else None
            if len(s.tokens) == 1 and last and len(last.tokens) == 1 and s.row == last.row + 1:
                runs[-1][0].append(s)
                runs[-1][2] += 1
            else:
                runs.append([[s], start, start + len(s.tokens)])
            start += len(s.tokens)
        if len(runs) == 1:  # a decode batch or one prefill chunk: its logits as they come
            return self._run(runs[0][0], logits_at)
        out = torch.empty((len(logits_at), self.config.vocab_size), device=self.device)
        for segs, first, end in runs:
            picks = [j for j, i in enumerate(logits_at) if first <= i < end]  # a run with none still writes the cache
            out[picks] = self._run(segs, [logits_at[j] - first for j in picks])
        return out

    def _run(self, segs: list[Segment], picks: list[int]) -> torch.Tensor:
        """One session run of `segs` (one prefill chunk, or one token on each of consecutive rows)."""
        row, B, S = segs[0].row, len(segs), len(segs[0].tokens)
        ends = [s.start + len(s.tokens) for s in segs]  # each row's length after this step
        b = self._binding(row, B)
        b.bind_cpu_input("input_ids", np.array([s.tokens for s in segs], dtype=np.int64))
        b.bind_cpu_input("seqlens_k", np.array(ends, dtype=np.int32) - 1)
        b.bind_cpu_input("total_sequence_length", np.array(max(ends), dtype=np.int32))
        b.bind_cpu_input("logit_index", np.array(picks or [B * S - 1], dtype=np.int64))  # ≥ 1 row: dropped below
        logits = torch.empty((max(len(picks), 1), self.config.vocab_size), dtype=self.k.dtype, device=self.device)
        b.bind_output("logits", *self.where, self.np_dtype, tuple(logits.shape), logits.data_ptr())
        self.session.run_with_iobinding(b)
        return logits[: len(picks)].float()

    def _binding(self, row: int, B: int):
        """The io binding with rows row..row+B-1 of the cache as every layer's past and present
        (contiguous, bound by pointer); kept per (row, B) since binding 4·layers buffers costs ~1 ms."""
        key = (row, B)
        if key not in self.bindings:
            b = self.session.io_binding()
            shape = (B,) + tuple(self.k.shape[2:])
            for i in range(self.config.num_hidden_layers):
                for kind, cache in (("key", self.k), ("value", self.v)):
                    ptr = cache[i, row].data_ptr()
                    b.bind_input(f"past_{kind}_{i}", *self.where, self.np_dtype, shape, ptr)
                    b.bind_output(f"present_{kind}_{i}", *self.where, self.np_dtype, shape, ptr)
            self.bindings[key] = b
        return self.bindings[key]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
