"""Export a checkpoint as a llama.cpp GGUF file: llama architecture, F32 tensors, the BPE tokenizer.

    export(checkpoint, "model-f32.gguf") -> Path

What llama.cpp's own `convert_hf_to_gguf.py` writes for a Llama model, from qt's checkpoint
(weights in any float dtype are written as F32, the GGUF's file type ALL_F32): llama.cpp's
tensor names, its permutation of the Q and K rows (it rotates adjacent pairs for RoPE, HF the
two halves of each head), the byte-level BPE vocabulary, merges, token types, special ids and
chat template. llama.cpp quantizes such a file itself (`llama_model_quantize` to Q8_0, Q4_1, ...),
which is how `qt-quant compare --peers` gets llama.cpp rows for a model without a shipped file.
`qt_serve.gguf_import` reads the file back (undoing the permutation), an independent check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qt_serve import checkpoint
from qt_serve.checkpoint import state_dict_for_saving
from qt_serve.errors import QtError
from qt_serve.gguf_import import PRE_TOKENIZERS, TENSOR_NAMES, TOKEN_CONTROL, TOKEN_USER_DEFINED

TOKEN_NORMAL = 1
HF_NAMES = {hf: g for g, hf in TENSOR_NAMES.items()}  # "model.layers.{}.self_attn.q_proj.weight" -> "blk.{}.attn_q.weight"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute` of a (n_head*head_dim, in) Q/K weight: within each head, rows (j, j + d/2) become
    (2j, 2j + 1). `gguf_import.unpermute` is its inverse."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    if hf.startswith("model.layers."):  # model.layers.<i>.<rest>
        return HF_NAMES[".".join(parts[:2] + ["{}"] + parts[3:])].format(parts[2])
    if hf not in HF_NAMES:
        raise QtError(f"tensor {hf} has no llama.cpp name")
    return HF_NAMES[hf]


def pre_tokenizer_name(spec: dict) -> str:
    """The llama.cpp pre-tokenizer whose split regexes the tokenizer.json's pre-tokenizer applies ("default":
    GPT-2's, also for a plain ByteLevel pre-tokenizer with its own regex)."""
    steps = spec.get("pretokenizers", [spec]) if spec else []
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    for name, known in PRE_TOKENIZERS.items():
        if regexes == known:
            return name
    if regexes or not any(s.get("type") == "ByteLevel" for s in steps):
        raise QtError(f"the tokenizer's pre-tokenizer ({regexes or spec}) matches none llama.cpp knows "
                      f"({', '.join(PRE_TOKENIZERS)})")
    return "default"


def add_tokenizer(w, tokenizer) -> None:
    spec = json.loads(tokenizer.tok.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise QtError(f"qt exports byte-level BPE tokenizers to GGUF, not {model.get('type')}")
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)  # token -> id
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    if None in tokens:
        raise QtError("the tokenizer's ids are not contiguous; GGUF stores the vocabulary as a list")
    types = [TOKEN_NORMAL] * len(tokens)
    for i, added in tokenizer.tok.get_added_tokens_decoder().items():
        types[i] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer") or {}))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for add, tid in ((w.add_bos_token_id, tokenizer.bos_id), (w.add_eos_token_id, tokenizer.eos_id)):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(False)  # qt's chat template writes any BOS itself; prompts are sent as ids
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def export(source, path: str | Path, types: dict | None = None) -> Path:
    """Write checkpoint `source` (a loaded `Checkpoint`, or anything `checkpoint.load` takes) to GGUF `path`.

    `types` {HF weight name: gguf.GGMLQuantizationType} stores those weights quantized by the `gguf`
    package (Q8_0, Q4_0, Q4_1, ...) instead of F32, as a llama.cpp file with mixed types would."""
    import gguf

    ckpt = source if isinstance(source, checkpoint.Checkpoint) else checkpoint.load(source, dtype="float32")
    if ckpt.model is None or (ckpt.config.quantization or {}).get("scheme") not in (None, "fp16", "bf16"):
        raise QtError(f"{ckpt.source}: export a float checkpoint (its quantized copies are made by llama.cpp)")
    if ckpt.tokenizer is None:
        raise QtError(f"{ckpt.source} has no tokenizer.json; llama.cpp needs a vocabulary in the GGUF")
    cfg = ckpt.config
    unsupported = [k for k in ("attention_bias", "mlp_bias", "output_bias") if getattr(cfg, k)]
    if cfg.model_type != "llama":
        unsupported.append(f"the {cfg.model_type} architecture (qt writes llama GGUFs; the checkpoint directory is "
                           "HF-compatible, so llama.cpp's convert_hf_to_gguf.py converts it)")
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) != "linear":
        unsupported.append(f"rope_scaling {cfg.rope_scaling}")
    if unsupported:
        raise QtError(f"{ckpt.source}: {', '.join(unsupported)} has no place in a llama GGUF")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_tokenizer(w, ckpt.tokenizer)
    for name, t in state_dict_for_saving(ckpt.model).items():  # a tied LM head is left out: llama.cpp re-ties it
        a = t.detach().to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            a = permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = permute(a, cfg.num_key_value_heads)
        qtype = (types or {}).get(name)
        if qtype is None:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
