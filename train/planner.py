"""Memory and compute math for a training run, before it starts (no model is built).

Bytes per parameter P (AdamW keeps two fp32 moments):

    mode   weights                  grads        optimizer   activations
    fp32   4P                       4P           8P          fp32
    bf16   4P master + 2P cast copy 4P           8P          bf16 (autocast keeps fp32 master weights)
    lora   4P frozen base + 4 per LoRA  4 per LoRA  8 per LoRA  bf16 (rank-r adapters on every projection)
    qlora  0.5625 per block matmul weight (NF4 + an fp32 absmax per 64) + 4 per other weight + 4 per LoRA;
           grads and optimizer as lora                                 (`qt-train sft --qlora`, CUDA only)

(`qt-train sft --lora-rank R` keeps the frozen base in fp32 and trains under bf16 autocast with
`--precision bf16`, so LoRA saves the gradients and optimizer state of the base, not its weights.)

Activations per token and layer are what backward keeps (memory-efficient attention
assumed: no seq x seq score matrix): the block input and its two RMSNorm outputs,
query / key / value before and after RoPE, the attention output and o_proj input, and
the SwiGLU gate, up, silu(gate) and product. The head adds the final norm, the LM-head
input, and the logits twice (log-softmax output and its gradient, always fp32). We keep
10% of the device free for the allocator, CUDA context and temporaries.
"""

from __future__ import annotations

from qt_serve.config import ModelConfig
from qt_serve.errors import QtError

MODES = ("fp32", "bf16", "lora", "qlora")
NF4_BYTES = 0.5 + 4 / 64  # 4-bit codes plus one fp32 scale per block of 64 (bitsandbytes' default)
HEADROOM = 0.9  # fraction of device memory a plan may use


def _block_matmul(cfg: ModelConfig) -> int:
    """Weights of one block's projections (attention and MLP)."""
    d, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return 2 * d * q + 2 * d * kv + 3 * d * cfg.intermediate_size


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by kind; `total` equals the parameter count of `qt_serve.model.Transformer(cfg)`."""
    d, hd, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    biases = (q + 2 * kv + d) * cfg.attention_bias + (2 * cfg.intermediate_size + d) * cfg.mlp_bias
    layers = L * (_block_matmul(cfg) + biases + 2 * d)  # two RMSNorm weights per block
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
