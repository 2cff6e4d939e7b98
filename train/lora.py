"""LoRA (Hu et al. 2021) on a qt model, applied from outside it with `peft`, saved in PEFT's adapter format.

    lora = Lora(model, rank=16, alpha=32, dropout=0.05, targets=["q_proj", "v_proj"], base="SmolLM2-135M-Instruct")
    ...train: only the adapter's A (r x in) and B (out x r) matrices have requires_grad...
    lora.save("runs/x/best")          # adapter_config.json + adapter_model.safetensors
    merge("SmolLM2-135M-Instruct", "runs/x/best", "out/merged")   # W + (alpha / r) B A: a plain checkpoint

A targeted `nn.Linear` W becomes W x + (alpha / r) · B A dropout(x), with B = 0 at the start, so
training starts from the base model exactly. The adapter files are PEFT's, with the module names
qt shares with Hugging Face Llama (`model.layers.N.self_attn.q_proj`, ...): `peft` loads them onto
a `transformers` model, and `qt-serve --lora` serves them on a shared base (`qt_serve.lora`).

QLoRA (Dettmers et al. 2023), `qlora=True`: the frozen base's Linear weights are stored as 4-bit
NF4 (bitsandbytes, CUDA only) and dequantized to bf16 per matmul; the adapter stays fp32.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from qt_serve.checkpoint import replace_dir
from qt_serve.errors import QtError

# Every projection of a block: a common default (QLoRA's finding: adapting all of them matters most).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft():
    try:
        import peft as lib
    except ImportError:
        raise QtError("LoRA needs the peft package: pip install -e '.[train]'") from None
    return lib


def linear_names(model: nn.Module) -> list[str]:
    """The last name part of each Linear module (what `target_modules` matches), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def quantize_base(model: nn.Module, device: torch.device) -> None:
    """QLoRA's base: every block Linear as bitsandbytes 4-bit NF4 (quantized when moved to the GPU)."""
    if device.type != "cuda":
        raise QtError("--qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels); on CPU use plain LoRA")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QtError("--qlora needs bitsandbytes: pip install -e '.[gpu]'") from None
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):  # Qwen3's per-head norms (or their Identity stand-ins)
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
                if lin.bias is not None:
                    q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
                setattr(parent, name, q)
    model.to(device)  # Params4bit quantizes here


class Lora:
    """Adapters on `model`'s Linear layers named in `targets`; the rest of the model is frozen."""

    def __init__(self, model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], base: str,
                 qlora: bool = False, device: torch.device = torch.device("cpu")):
        known = linear_names(model)
        unknown = [t for t in targets if t not in known]
        if unknown or not targets:
            raise QtError(f"LoRA target(s) {', '.join(unknown) or '(none given)'} match no Linear module of the model; "
                          f"its Linear modules are: {', '.join(known)}")
        if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
            raise QtError(f"LoRA needs rank ≥ 1, alpha > 0 and dropout in [0, 1); got {rank}, {alpha}, {dropout}")
        if qlora:
            quantize_base(model, device)
        lib = peft()
        config = lib.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                                bias="none")
        self.wrapper = lib.get_peft_model(model, config)  # swaps the Linears for LoRA layers in place
        self.wrapper.peft_config["default"].base_model_name_or_path = base  # what `merge` and servers load
        self.model = model

    def save(self, directory: str | Path, extra=None) -> Path:
        """adapter_config.json + adapter_model.safetensors (+ what `extra(tmp)` writes), atomically."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            self.wrapper.save_pretrained(tmp, save_embedding_layers=False)  # only the adapter
            if extra is not None:
                extra(tmp)
            replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def load(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        weights = load_file(str(Path(directory) / "adapter_model.safetensors"))
        peft().set_peft_model_state_dict(self.wrapper, weights)


def merge(base: str | None, adapter: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Base + adapter -> a plain checkpoint (W + scale · B A in every targeted Linear) that serves unchanged.
    `base` defaults to the adapter's `base_model_name_or_path`."""
    from qt_serve import lora as served
    from qt_serve.checkpoint import load, parse_dtype, save_checkpoint
    from qt_serve.errors import read_json

    if base is None:
        base = (read_json(Path(adapter) / "adapter_config.json", missing={}) or {}).get("base_model_name_or_path")
        if not base:
            raise QtError(f"{adapter} does not name its base model; pass --base CHECKPOINT")
    ckpt = load(base, dtype="float32")
    found = served.load(adapter, ckpt, Path(adapter).name)  # refuses, saying why, an adapter for another base
    with torch.no_grad():
        for name, (a_t, b_t) in found.weights.items():  # Aᵀ (in, r), scale · Bᵀ (r, out)
            ckpt.model.get_submodule(name).weight += (a_t @ b_t).t()
    if dtype:
        ckpt.model.to(parse_dtype(dtype))
    return save_checkpoint(out, ckpt.model, ckpt.tokenizer, ckpt.generation_config)
