"""Memory and compute math for a training run, before it starts (no model is built).

Bytes per parameter P (AdamW keeps two fp32 moments):

    mode   weights                  grads        optimizer   activations
    fp32   4P                       4P           8P          fp32
    bf16   4P master + 2P cast copy 4P           8P          bf16 (autocast keeps fp32 master weights)
    lora   4P frozen base + 4 per LoRA  4 per LoRA  8 per LoRA  bf16 (rank-r adapters on every projection)
    qlora  0.516 per block matmul weight (NF4, double-quantized absmax) + 4 per other weight + 4 per LoRA;
           grads and optimizer as lora                                 (`qt-train sft --qlora`, CUDA only)

(`qt-train sft --lora-rank R` keeps the frozen base in fp32 and trains under bf16 autocast with
`--precision bf16`, so LoRA saves the gradients and optimizer state of the base, not its weights.)

Activations per token and layer are what backward keeps (memory-efficient attention
assumed: no seq x seq score matrix): the block input and its two RMSNorm outputs,
query / key / value before and after RoPE, the attention output and o_proj input, and
the SwiGLU gate, up, silu(gate) and product. The head adds the final norm, the LM-head
input, and the logits twice (log-softmax output and its gradient, always fp32). We keep
10% of the device free for the allocator, CUDA context and temporaries.

That table is an overview (activations as full training keeps them). `finetune_plan` answers the
question for one LoRA / QLoRA SFT or DPO run as `qt-train sft|dpo` executes it (what a frozen base
saves, gradient checkpointing, the LM head's fp32 logits, DPO's two sequences a pair and its
reference pass, the KV cache of the sample at each validation), with a breakdown and the largest
micro-batch and seq_len that fit; `PRESETS` holds the shapes of published models.
`qt-train plan --task sft|dpo` prints it.
"""

from __future__ import annotations

from qt_serve.config import ModelConfig
from qt_serve.errors import QtError

MODES = ("fp32", "bf16", "lora", "qlora")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64, an fp32 scale per 256 absmax
HEADROOM = 0.9  # fraction of device memory a plan may use


def _block_matmul(cfg: ModelConfig) -> int:
    """Weights of one block's projections (attention and MLP)."""
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return 2 * d * q + 2 * d * kv + 3 * d * cfg.intermediate_size


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by kind; `total` equals the parameter count of `qt_serve.model.Transformer(cfg)` (tied
    weights once), for every family: Qwen2 has q/k/v biases and no o_proj bias, Qwen3 a (head_dim,) RMSNorm
    weight on queries and one on keys in every block."""
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    biases = (q + 2 * kv) * cfg.qkv_bias + d * cfg.o_bias + (2 * cfg.intermediate_size + d) * cfg.mlp_bias
    norms = 2 * d + 2 * hd * cfg.qk_norm  # input / post-attention RMSNorm (+ Qwen3's q_norm, k_norm)
    layers = L * (_block_matmul(cfg) + biases + norms)
    embedding = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)  # input table (+ untied LM head)
    non_embedding = layers + d + cfg.vocab_size * cfg.output_bias  # + final norm, LM-head bias
    return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding,
            "lora_per_rank": L * ((d + q) * 2 + (d + kv) * 2 + (d + cfg.intermediate_size) * 3)}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x matmul weights + attention (PaLM, appendix B)."""
    matmul = cfg.num_hidden_layers * _block_matmul(cfg) + cfg.vocab_size * cfg.hidden_size  # + LM head
    return 6 * matmul + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def activation_bytes(cfg: ModelConfig, seq_len: int, act_bytes: int) -> int:
    """Bytes backward holds for one sequence of seq_len tokens."""
    d, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = 4 * d + 5 * q + 4 * kv + 4 * inter  # elements per token (see the module docstring)
    head = act_bytes * 3 * d + 4 * 2 * cfg.vocab_size
    return seq_len * (cfg.num_hidden_layers * per_layer * act_bytes + head)


def plan(cfg: ModelConfig, seq_len: int, micro_batch: int, memory_bytes: float, lora_rank: int = 16) -> dict:
    """Per mode: bytes of weights, grads, optimizer, activations (per sequence and per micro-batch), and fit."""
    if seq_len > cfg.max_position_embeddings:
        raise QtError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                      f"{cfg.max_position_embeddings}")
    p = count_params(cfg)
    P, lora = p["total"], p["lora_per_rank"] * lora_rank
    matmul = cfg.num_hidden_layers * _block_matmul(cfg)  # what QLoRA quantizes
    static = {"fp32": (4 * P, 4 * P, 8 * P), "bf16": (6 * P, 4 * P, 8 * P),
              "lora": (4 * P + 4 * lora, 4 * lora, 8 * lora),
              "qlora": (NF4_BYTES * matmul + 4 * (P - matmul) + 4 * lora, 4 * lora, 8 * lora)}
    usable = memory_bytes * HEADROOM
    out = {"params": p, "seq_len": seq_len, "micro_batch": micro_batch, "memory": memory_bytes,
           "usable": usable, "lora_rank": lora_rank, "modes": {}}
    for mode, (w, g, o) in static.items():
        act = activation_bytes(cfg, seq_len, 4 if mode == "fp32" else 2)
        total = w + g + o + micro_batch * act
        out["modes"][mode] = {"trainable": lora if "lora" in mode else P, "weights": w, "grads": g, "optimizer": o, "activations_per_seq": act,
                              "activations": micro_batch * act, "total": total, "fits": total <= usable,
                              "max_micro_batch": max(0, int((usable - w - g - o) // act))}
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(pl: dict) -> str:
    p = pl["params"]
    lines = [(f"parameters: {p['total'] / 1e6:.2f}M total = {p['embedding'] / 1e6:.2f}M embedding + "
              f"{p['non_embedding'] / 1e6:.2f}M non-embedding"),
             (f"device memory {gib(pl['memory'])}, usable {gib(pl['usable'])} ({HEADROOM:.0%}); "
              f"micro-batch {pl['micro_batch']} x seq_len {pl['seq_len']}; LoRA rank {pl['lora_rank']}"),
             (f"{'mode':<6}{'trainable':>12}{'weights':>12}{'grads':>12}{'optimizer':>12}{'act/seq':>12}{'act/batch':>12}"
              f"{'total':>12}  fits  max micro-batch")]
    for mode, r in pl["modes"].items():
        lines.append(f"{mode:<6}{r['trainable'] / 1e6:>11.2f}M" + "".join(f"{gib(r[k]):>12}" for k in
                                            ("weights", "grads", "optimizer", "activations_per_seq",
                                             "activations", "total"))
                     + f"  {'yes' if r['fits'] else 'NO ':<4}  {r['max_micro_batch']}")
    return "\n".join(lines)


# ---- published shapes ----------------------------------------------------------------------------
# config.json fields copied from each model's published config.json on the Hugging Face Hub,
# https://huggingface.co/<id>/blob/main/config.json for the ids below (base models; the Instruct
# variants share the shape). count_params reproduces their published parameter counts (tests/test_planner.py).
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
          "use_sliding_window": False}
_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "head_dim": 128,
          "max_position_embeddings": 40960, "vocab_size": 151936, "attention_bias": False}


def _shape(d, inter, layers, heads, kv, vocab, tied, **rest) -> dict:
    return {"hidden_size": d, "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied, **rest}


PRESETS: dict[str, tuple[str, dict]] = {  # name -> (Hub id, config.json fields)
    "Llama-3.1-8B": ("meta-llama/Llama-3.1-8B", _shape(
        4096, 14336, 32, 32, 8, 128256, False, architectures=["LlamaForCausalLM"], max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, rms_norm_eps=1e-5)),
    "Llama-3.2-1B": ("meta-llama/Llama-3.2-1B", _shape(
        2048, 8192, 16, 32, 8, 128256, True, architectures=["LlamaForCausalLM"], head_dim=64,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        rms_norm_eps=1e-5)),
    "Llama-3.2-3B": ("meta-llama/Llama-3.2-3B", _shape(
        3072, 8192, 28, 24, 8, 128256, True, architectures=["LlamaForCausalLM"], head_dim=128,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
        rms_norm_eps=1e-5)),
    "Mistral-7B-v0.3": ("mistralai/Mistral-7B-v0.3", _shape(
        4096, 14336, 32, 32, 8, 32768, False, architectures=["MistralForCausalLM"], max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=None, rms_norm_eps=1e-5)),
    "Qwen2.5-0.5B": ("Qwen/Qwen2.5-0.5B", _shape(
        896, 4864, 24, 14, 2, 151936, True, **_QWEN2, max_position_embeddings=32768, sliding_window=32768,
        max_window_layers=24)),
    "Qwen2.5-1.5B": ("Qwen/Qwen2.5-1.5B", _shape(
        1536, 8960, 28, 12, 2, 151936, True, **_QWEN2, max_position_embeddings=131072, sliding_window=131072,
        max_window_layers=28)),
    "Qwen2.5-7B": ("Qwen/Qwen2.5-7B", _shape(
        3584, 18944, 28, 28, 4, 152064, False, **_QWEN2, max_position_embeddings=131072, sliding_window=131072,
        max_window_layers=28)),
    "Qwen3-0.6B": ("Qwen/Qwen3-0.6B", _shape(1024, 3072, 28, 16, 8, 151936, True, **_QWEN3)),
    "Qwen3-8B": ("Qwen/Qwen3-8B", _shape(4096, 12288, 36, 32, 8, 151936, False, **_QWEN3)),
}


def preset(name: str) -> ModelConfig:
    """The ModelConfig of a published model by its short name (a key of PRESETS)."""
    if name not in PRESETS:
        raise QtError(f"no preset {name!r}; the presets are: {', '.join(PRESETS)}")
    hub_id, fields = PRESETS[name]
    return ModelConfig.from_dict(fields, source=f"preset {name} ({hub_id})")


# ---- fine-tuning plan: LoRA / QLoRA SFT and DPO as qt-train runs them ----------------------------
#
# What `qt-train sft|dpo --lora-rank R [--qlora] [--precision bf16] [--grad-checkpointing]` holds on the
# GPU at its peak, from reading the code that runs (train/finetune.py, train/lora.py, train/sft.py,
# train/dpo.py, train/pretrain.py; peft's LoRA layers; bitsandbytes 0.50's Linear4bit and MatMul4Bit):
#
# weights     the checkpoint loads in fp32, or in bf16 with --qlora (finetune.load_init), which turns every
#             block projection into bitsandbytes NF4 (quantize_base: Params4bit defaults, blocks of 64,
#             absmax double-quantized to 8 bits in blocks of 256: 4.127 bits a weight); embeddings, the LM
#             head, norms and biases stay in the loaded dtype (w bytes: 4, or 2 with --qlora). Plus the RoPE
#             cos/sin tables (max_position_embeddings x head_dim, w bytes, twice).
# LoRA        A (r x in) and B (out x r) on every target, fp32; their grads fp32; AdamW's two moments fp32.
# activations with grad checkpointing each block keeps only its input (w bytes: the residual stream has
#             the weights' dtype) plus the final norm's input, and RoPE cos/sin; in backward one block
#             is recomputed: its saved tensors (below) plus the gradients of the MLP (3 x intermediate, w
#             bytes) plus, for QLoRA, one weight dequantized to bf16. Saved per token in a block
#             (frozen base: autograd keeps no input of a frozen matmul): the post-attention residual (w);
#             per LoRA target its dropout mask (1 byte) and the bf16 input of A (a bytes), and A's output;
#             SDPA's q, k, v, output (a bytes) and log-sum-exp; the MLP's gate, silu(gate) and up (o bytes:
#             bf16 under QLoRA, whose Linear4bit returns its input's dtype; a under plain LoRA);
#             Qwen3 also q_norm/k_norm inputs (w); with bf16 weights each RMSNorm also keeps the fp32 copy
#             of its input it normalises. Without checkpointing every block keeps all of that.
#             SFT attends through a document mask (B x S x S bool, per distinct window) that SDPA turns into
#             an additive bf16 mask and keeps for backward (memory-efficient kernel); DPO has no mask
#             (flash, is_causal). a = 2 bytes with --precision bf16, 4 with fp32.
# logits      the LM head under autocast saves a bf16 copy of an fp32 weight for backward (none under
#             --qlora: the head is bf16 already); the loss
#             takes logits.float(): log-softmax output kept for backward, then in backward the NLL gradient
#             and the log-softmax gradient, all fp32 (B x S x V), 12 bytes a token x vocab at the peak.
#             (With Llama 3's 128,256 tokens that is 1.5 MiB a token, more than everything else per token.)
# DPO         each of the B pairs is two sequences (chosen, rejected) in one forward: 2B x S tokens.
#             The reference log-probs are computed once before training (PreferenceTuning.reference_logps):
#             with plain LoRA by the fp32 model as loaded, moved whole to the GPU (4 bytes per parameter
#             plus its logits, checked as a phase of its own); with --qlora by the quantized model itself
#             in build(), its adapter still zero, so no memory beyond the training step's weights.
# validation  each validation samples (Trainer.sample) through qt_serve.generate.LLM with a KV cache of
#             the prompt (≤ seq_len) plus sample_tokens positions, in the weights' dtype, beside the
#             weights and AdamW state.
# overhead    the CUDA context (driver, kernels, cuBLAS) outside PyTorch's allocator, and the caching
#             allocator's fragmentation: torch.cuda.max_memory_allocated() sees neither.
#
# The peak is at the LM head's backward (logits) or at one block's recomputed backward, whichever is larger;
# the breakdown lists what is alive at that moment. Not modelled: the optimizer step's temporaries and
# validation / sampling passes (both smaller), attention on GPUs without bf16 fused kernels (pre-Ampere:
# the math backend keeps B x heads x S x S scores), and other processes on the GPU (a desktop).

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # = train.lora.ALL_LINEAR
TASKS = ("sft", "dpo")
CUDA_CONTEXT = 512 * 2**20  # bytes outside the caching allocator (driver, kernels, cuBLAS handles)
FRAGMENTATION = 0.05  # share of allocated bytes the caching allocator reserves beyond them


def projections(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each block projection."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def nf4_bytes(n: int) -> int:
    """Device bytes of one n-element weight as bitsandbytes Params4bit (quant_type nf4, blocksize 64,
    compress_statistics=True: what train.lora.quantize_base makes): two 4-bit codes a byte, an 8-bit absmax
    per block of 64, an fp32 scale per 256 of those, the fp32 offset and the 16-entry NF4 table."""
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 + 16 * 4


def lora_params(cfg: ModelConfig, rank: int, targets=TARGETS) -> int:
    shapes = projections(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown or not targets:
        raise QtError(f"LoRA target(s) {', '.join(unknown) or '(none given)'} are not block projections; "
                      f"choose from {', '.join(shapes)}")
    return cfg.num_hidden_layers * rank * sum(sum(shapes[t]) for t in targets)


def _step(cfg: ModelConfig, task: str, seq_len: int, micro_batch: int, rank: int, targets, qlora: bool,
          precision: str, grad_checkpointing: bool, dropout: float, sample_tokens: int = 64) -> dict:
    """Bytes (allocated, before overhead) of a training step's peak, of each validation's sample and of
    DPO's reference pass."""
    d, hd, inter, V, N = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size,
                          cfg.num_hidden_layers)
    H, q, kv = cfg.num_attention_heads, cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = projections(cfg)
    a = 2 if precision == "bf16" else 4  # autocast dtype
    w = 2 if qlora else 4  # the loaded weights' dtype, and so the residual stream's (load_init)
    o = 2 if qlora else a  # dtype of a projection's output (Linear4bit returns its bf16 input's dtype)
    seqs = micro_batch * (2 if task == "dpo" else 1)
    T = seqs * seq_len  # tokens in one forward
    p = count_params(cfg)
    matmul_layer = sum(i * o_ for i, o_ in shapes.values())
    rope = 2 * cfg.max_position_embeddings * hd * w
    rest = w * (p["total"] - N * matmul_layer)  # embeddings, LM head, norms, biases
    block = N * (sum(nf4_bytes(i * o_) for i, o_ in shapes.values()) if qlora else 4 * matmul_layer)
    lora = lora_params(cfg, rank, targets)

    # per token, one block (see the comment above)
    drop = 1 if dropout > 0 else 0
    if a == 4 and not drop:  # A keeps its input itself: one tensor for q/k/v, one for gate/up
        inputs = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        lora_in = 4 * sum(dict((inputs.get(t, t), shapes[t][0]) for t in targets).values())
    else:  # per target: the dropout mask (bool) and A's own (cast) input
        lora_in = sum((drop + a) * shapes[t][0] for t in targets)
    saved = (w * d + 2 * 4  # post-attention residual, both norms' rsqrt
             + lora_in + a * rank * len(targets)  # LoRA: A's input (and dropout mask), B's input
             + a * (2 * q + 2 * kv) + 4 * H  # SDPA: q, k, v, output, log-sum-exp
             + w * (q + kv) * cfg.qk_norm  # Qwen3 q_norm / k_norm inputs
             + (4 * (2 * d + (q + kv) * cfg.qk_norm) if w == 2 else 0)  # RMSNorm's fp32 copy of a bf16 input
             + 3 * o * inter)  # MLP: gate, silu(gate), up
    grads = 3 * w * inter + 2 * w * d  # a block's backward: MLP gradients, residual gradient
    dequant = 2 * max(i * o_ for i, o_ in shapes.values()) if qlora else 0  # one weight, as bf16
    copies = a == 2 and not qlora  # autocast saves a bf16 copy of each frozen fp32 weight it multiplies
    windows = cfg.windows()
    mask_bool = len(set(windows)) * micro_batch * seq_len ** 2 if task == "sft" else 0
    mask_add = a * micro_batch * seq_len ** 2 if task == "sft" else 0  # SDPA's additive copy, per layer call

    ropes = 2 * T * hd * 4  # cos, sin (fp32, shared by all blocks)
    if grad_checkpointing:
        stream = (N + 1) * w * d * T + ropes + mask_bool  # block inputs + final norm input
        block_phase = (saved + grads) * T + dequant + mask_add + (2 * matmul_layer if copies else 0)
    else:
        stream = (N * (saved + w * d) + w * d) * T + ropes + mask_bool + N * mask_add + (
            N * 2 * matmul_layer if copies else 0)
        block_phase = grads * T + dequant
    head_copy = 2 * V * d if a == 2 and not qlora else 0
    head_phase = head_copy + 12 * V * T
    out = {"tokens": T, "sequences": seqs, "base_blocks": block, "base_rest": rest, "rope_tables": rope,
           "weights": block + rest + rope, "lora_params": lora, "lora_weights": 4 * lora, "grads": 4 * lora,
           "optimizer": 8 * lora, "stream": stream, "checkpoints": (N + 1) * w * d * T if grad_checkpointing else 0,
           "block_phase": block_phase, "head_phase": head_phase, "head_copy": head_copy, "masks": mask_bool,
           "saved_per_token_block": saved}
    peak_head = head_phase >= block_phase
    out["phase"] = "lm_head" if peak_head else "block"
    out["activations"] = stream + (0 if peak_head else block_phase)
    out["logits"] = head_phase if peak_head else 0
    out["allocated"] = sum(out[k] for k in ("weights", "lora_weights", "grads", "optimizer", "activations", "logits"))
    if task == "dpo" and not qlora:  # reference log-probs: the fp32 model, whole, before training; no grad
        ref_logits = head_copy + (10 if a == 2 else 8) * V * T  # bf16 logits + fp32 copy + log-softmax
        ref_layer = 4 * a * inter * T + 2 * max(i * o_ for i, o_ in shapes.values())  # one MLP's transients
        out["reference"] = {"weights": 4 * p["total"] + rope, "activations": 4 * d * T + max(ref_logits, ref_layer)}
    # Each validation samples (Trainer.sample): an LLM over the model as it is, its KV cache sized for the
    # prompt (at most seq_len) and the sample, in the weights' dtype.
    out["validation"] = {"weights": out["weights"] + out["lora_weights"] + out["optimizer"],
                         "kv_cache": 2 * N * kv * min(seq_len + sample_tokens, cfg.max_position_embeddings) * w,
                         "activations": 4 * (2 * d + 2 * inter) * seq_len}  # a prefill of up to seq_len tokens
    return out


def _overhead(allocated: int) -> int:
    return CUDA_CONTEXT + round(FRAGMENTATION * allocated)


def _with_overhead(parts: dict) -> dict:
    allocated = sum(parts.values())
    return {**parts, "overhead": _overhead(allocated), "total": allocated + _overhead(allocated)}


def finetune_plan(cfg: ModelConfig, seq_len: int, micro_batch: int, memory_bytes: float, task: str = "sft",
                  lora_rank: int = 16, targets=TARGETS, qlora: bool = True, precision: str = "bf16",
                  grad_checkpointing: bool = True, lora_dropout: float = 0.05, name: str = "") -> dict:
    """Does `qt-train TASK --lora-rank R [--qlora] --precision P [--grad-checkpointing]` fit in memory_bytes?

    breakdown: bytes alive at a training step's peak (weights, lora_weights, grads, optimizer, activations,
    logits, overhead) and their sum `total`. phases: the totals of every phase of the run that holds memory
    of its own: the training step, the sample at each validation and, for DPO, the reference pass before
    training. fits: all of them fit; max_micro_batch / max_seq_len: the largest that fit at this seq_len /
    micro-batch (0: none), for the whole run and for the training step alone (`step_max_...`)."""
    if task not in TASKS:
        raise QtError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if precision not in ("bf16", "fp32"):
        raise QtError(f"precision must be bf16 or fp32, got {precision!r}")
    if lora_rank < 1 or seq_len < 1 or micro_batch < 1:
        raise QtError("lora_rank, seq_len and micro_batch must be ≥ 1")
    if seq_len > cfg.max_position_embeddings:
        raise QtError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    targets = tuple(targets)
    knobs = dict(task=task, rank=lora_rank, targets=targets, qlora=qlora, precision=precision,
                 grad_checkpointing=grad_checkpointing, dropout=lora_dropout)

    def phases(L: int, B: int) -> dict[str, dict]:
        s = _step(cfg, seq_len=L, micro_batch=B, **knobs)
        out = {"training step": _with_overhead({k: s[k] for k in ("weights", "lora_weights", "grads", "optimizer",
                                                                  "activations", "logits")}),
               "validation sample": _with_overhead(s["validation"])}
        if "reference" in s:
            out["reference pass"] = _with_overhead(s["reference"])
        return out

    def largest(f, hi_cap: int) -> int:
        """The largest n in [0, hi_cap] with f(n) <= memory (f grows with n); 0 if f(1) does not fit."""
        if f(1) > memory_bytes:
            return 0
        lo, hi = 1, 2
        while hi <= hi_cap and f(hi) <= memory_bytes:
            lo, hi = hi, hi * 2
        hi = min(hi, hi_cap + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if f(mid) <= memory_bytes else (lo, mid)
        return lo

    def run_total(L, B):
        return max(ph["total"] for ph in phases(L, B).values())

    def step_total(L, B):
        return phases(L, B)["training step"]["total"]

    s = _step(cfg, seq_len=seq_len, micro_batch=micro_batch, **knobs)
    ph = phases(seq_len, micro_batch)
    binding = max(ph, key=lambda k: ph[k]["total"])
    need = ph[binding]["total"]
    flags = (f"--lora-rank {lora_rank}" + (" --qlora" if qlora else "") + f" --precision {precision}"
             + (" --grad-checkpointing" if grad_checkpointing else "") + f" --seq-len {seq_len} --micro-batch {micro_batch}"
             + ("" if targets == TARGETS else f" --lora-targets {','.join(targets)}"))
    return {"model": name, "task": task, "method": "qlora" if qlora else "lora", "precision": precision,
            "grad_checkpointing": grad_checkpointing, "lora_rank": lora_rank, "lora_targets": list(targets),
            "lora_dropout": lora_dropout, "seq_len": seq_len, "micro_batch": micro_batch,
            "sequences": s["sequences"], "tokens": s["tokens"], "memory": memory_bytes,
            "max_position_embeddings": cfg.max_position_embeddings, "params": count_params(cfg), "trainable": s["lora_params"], "breakdown": ph["training step"],
            "detail": {k: s[k] for k in ("base_blocks", "base_rest", "rope_tables", "checkpoints", "masks",
                                         "head_copy", "head_phase", "block_phase", "saved_per_token_block")},
            "peak_phase": s["phase"], "phases": ph, "binding": binding, "needed": need,
            "fits": need <= memory_bytes,
            "max_micro_batch": largest(lambda B: run_total(seq_len, B), 1 << 16),
            "max_seq_len": largest(lambda L: run_total(L, micro_batch), cfg.max_position_embeddings),
            "step_max_micro_batch": largest(lambda B: step_total(seq_len, B), 1 << 16),
            "step_max_seq_len": largest(lambda L: step_total(L, micro_batch), cfg.max_position_embeddings),
            "command": f"qt-train {task} --init CHECKPOINT --data DATA {flags}"}


def format_finetune_plan(pl: dict) -> str:
    b, d, p = pl["breakdown"], pl["detail"], pl["params"]
    mem = pl["memory"]
    gc = "gradient checkpointing" if pl["grad_checkpointing"] else "no gradient checkpointing"
    seqs = (f"{pl['micro_batch']} (pairs: {pl['sequences']} sequences)" if pl["task"] == "dpo"
            else f"{pl['micro_batch']}")
    base = (f"NF4 projections {gib(d['base_blocks'])} + bf16 embeddings/head/norms {gib(d['base_rest'])}"
            if pl["method"] == "qlora" else f"fp32 {gib(d['base_blocks'] + d['base_rest'])}")
    notes = {
        "weights": f"{base} + RoPE tables {gib(d['rope_tables'])}",
        "lora_weights": f"rank {pl['lora_rank']} on {','.join(pl['lora_targets'])}: {pl['trainable'] / 1e6:.2f}M",
        "grads": "fp32, LoRA only", "optimizer": "AdamW exp_avg + exp_avg_sq, fp32",
        "activations": ((f"block inputs kept by checkpointing {gib(d['checkpoints'])}" if pl["grad_checkpointing"]
                         else "every block's saved tensors")
                        + (f", document masks {gib(d['masks'])}" if d["masks"] else "")
                        + ("" if pl["peak_phase"] == "lm_head" else
                           f" + one block's backward {gib(d['block_phase'])}")),
        "logits": ((f"LM-head backward: bf16 copy of its weight {gib(d['head_copy'])} + " if d["head_copy"] else
                    "LM-head backward: ") + f"fp32 log-softmax, its gradient, the loss gradient "
                   f"{gib(d['head_phase'] - d['head_copy'])}"
                   if pl["peak_phase"] == "lm_head" else
                   f"(the LM-head backward, {gib(d['head_phase'])}, peaks below a block's backward)"),
        "overhead": f"CUDA context {gib(CUDA_CONTEXT)} + {FRAGMENTATION:.0%} allocator fragmentation",
    }
    lines = [f"{pl['model'] or 'model'}: {p['total'] / 1e9:.2f}B parameters; {'QLoRA' if pl['method'] == 'qlora' else 'LoRA'} {pl['task'].upper()}, "
             f"{pl['precision']} autocast, {gc}",
             f"micro-batch {seqs} x seq_len {pl['seq_len']} = {pl['tokens']:,} tokens a forward; "
             f"device {mem / 2**30:.2f} GiB",
             "",
             f"{'part':<14}{'memory':>11}  what"]
    for k in ("weights", "lora_weights", "grads", "optimizer", "activations", "logits", "overhead"):
        lines.append(f"{k.replace('_', ' '):<14}{gib(b[k]):>11}  {notes[k]}")
    lines.append(f"{'total':<14}{gib(b['total']):>11}  peak of a training step")
    val = pl["phases"]["validation sample"]
    lines.append(f"{'validation':<14}{gib(val['total']):>11}  the sample at each validation: weights, LoRA, AdamW + "
                 f"the sample's KV cache {gib(val['kv_cache'])}")
    ref = pl["phases"].get("reference pass")
    if ref:
        lines.append(f"{'reference':<14}{gib(ref['total']):>11}  DPO's reference log-probs before training: the fp32 "
                     f"model whole on the GPU {gib(ref['weights'])} + its logits")
    lines.append("")
    where = f"{mem / 2**30:g} GiB"

    def edges(mb, sl):
        return ((f"largest micro-batch at seq_len {pl['seq_len']}: {mb}" if mb else
                 f"no micro-batch fits at seq_len {pl['seq_len']}") + "; " +
                (f"largest seq_len at micro-batch {pl['micro_batch']}: {sl:,}" if sl else
                 f"no seq_len fits at micro-batch {pl['micro_batch']}"))

    if pl["fits"]:
        lines.append(f"verdict: fits in {where} (its largest phase, the {pl['binding']}, needs {gib(pl['needed'])}). "
                     f"{edges(pl['max_micro_batch'], pl['max_seq_len']).capitalize()}.")
    else:
        lines.append(f"verdict: does not fit in {where}: the {pl['binding']} needs {gib(pl['needed'])}; "
                     f"{edges(pl['max_micro_batch'], pl['max_seq_len'])}.")
        if pl["binding"] != "training step":
            step = "fits" if b["total"] <= mem else "does not fit"
            lines.append(f"the training step alone {step}: "
                         f"{edges(pl['step_max_micro_batch'], pl['step_max_seq_len'])}.")
    lines.append(f"the run this plans: {pl['command']}")
    return "\n".join(lines)
