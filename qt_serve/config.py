"""`ModelConfig`: the one set of hyper-parameters, stored as `config.json`.

Field names are Hugging Face's (`LlamaConfig`, `MistralConfig`, `Qwen2Config`, `Qwen3Config`),
so a qt checkpoint directory loads in `transformers` (and vLLM, TGI, llama.cpp's converter)
unchanged and a published directory of those families loads here. `model_type` names the
family and is written back with its architecture, so a Qwen2 directory stays a Qwen2 one.
The families differ only in a few switches the model reads from this object:

    family   attention biases          Q/K RMSNorm   sliding window
    llama    attention_bias (q,k,v,o)  -             -
    mistral  -                         -             sliding_window (every layer)
    qwen2    q, k, v always            -             layers >= max_window_layers when use_sliding_window
    qwen3    attention_bias (q,k,v,o)  per head      as qwen2

What none of them has lives under a `qt` key that HF ignores. Train, quant, serve and
export all rebuild the model from this object; there is no second copy of the
hyper-parameters anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qt_serve.errors import QtError

# model_type -> the architecture `transformers` builds for it
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ARCHITECTURES = {arch: family for family, arch in FAMILIES.items()}


@dataclass
class ModelConfig:
    model_type: str = "llama"  # a key of FAMILIES
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None  # None: as many as query heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # Sliding-window attention: a query at position p sees keys p - sliding_window < j <= p.
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention" (HF ≥ 4.54)
    # qt's own section (`"qt": {...}` in config.json): things LlamaConfig has no name for.
    output_bias: bool = False  # a bias on the LM head (unigram log-prior init in train/)
    quantization: dict | None = None  # e.g. {"scheme": "int8", ...}, set by quant/
    # Any other keys of an imported config.json, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise QtError(f"model_type {self.model_type!r} is not supported; qt loads {', '.join(FAMILIES)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise QtError(f"sliding_window must be a positive number of positions, got {self.sliding_window}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise QtError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise QtError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise QtError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
            )

    # ---- what the families differ in (see the module docstring) ----------------

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def windows(self) -> list[int | None]:
        """Each layer's attention window (None: full causal attention)."""
        n, w = self.num_hidden_layers, self.sliding_window
        if w is None:
            return [None] * n
        if self.layer_types is not None:
            return [w if t == "sliding_attention" else None for t in self.layer_types]
        if self.model_type in ("qwen2", "qwen3"):  # configs written before layer_types existed
            if not self.extra.get("use_sliding_window", False):
                return [None] * n
            first = self.extra.get("max_window_layers", 28)
            return [w if i >= first else None for i in range(n)]
        return [w] * n

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    # ---- config.json -------------------------------------------------------

    def to_dict(self) -> dict:
        d = {"architectures": [FAMILIES[self.model_type]], "hidden_act": "silu"}
        d.update(self.extra)
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and (f.name == "layer_types" or f.name in self.extra
                                                  or f.name == "sliding_window" and self.model_type == "llama"):
                continue  # Llama has no window; old Qwen keeps sliding_window in extra. Mistral's null stays:
                # without it transformers' MistralConfig would default to a 4096 window.
            if f.name not in ("output_bias", "quantization", "extra"):
                d[f.name] = getattr(self, f.name)
        d["dtype"] = self.torch_dtype  # the name transformers ≥ 4.56 reads (it still accepts torch_dtype)
        d["qt"] = {"output_bias": self.output_bias, "quantization": self.quantization}
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        archs = d.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None and not archs and d.get("model_type") in FAMILIES:
            family = d["model_type"]
        if family is None:
            raise QtError(
                f"{source}: architecture {archs or d.get('model_type')!r} is not supported; qt loads "
                + ", ".join(f"{a} (model_type '{f}')" for f, a in FAMILIES.items())
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise QtError(f"{source}: hidden_act {act!r} is not supported (these families use 'silu')")
        names = {f.name for f in dataclasses.fields(cls)} - {"output_bias", "quantization", "extra"}
        known = {k: v for k, v in d.items() if k in names}
        if isinstance(d.get("dtype"), str):  # transformers ≥ 4.56 writes `dtype` where it wrote `torch_dtype`
            known["torch_dtype"] = d["dtype"]
        skip = {"architectures", "model_type", "hidden_act", "qt", "rope_parameters", "dtype"}
        extra = {k: v for k, v in d.items() if k not in names and k not in skip}
        rope = d.get("rope_parameters")  # transformers ≥ 5 nests rope_theta and the scaling here
        if isinstance(rope, dict):
            rope = dict(rope)
            known.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                known.setdefault("rope_scaling", rope)
        known["model_type"] = family
        if family == "llama" and "sliding_window" in known:  # transformers' Llama has no window: kept, not used
            extra["sliding_window"] = known.pop("sliding_window")
        if family in ("qwen2", "qwen3") and "layer_types" not in d:
            # Older Qwen configs keep a sliding_window that is off unless use_sliding_window: leave
            # it (and its switch) in `extra`, written back unchanged, and let windows() read them.
            if not d.get("use_sliding_window") and "sliding_window" in known:
                extra["sliding_window"] = known.pop("sliding_window")
        qt = d.get("qt") or {}
        try:
            return cls(**known, output_bias=bool(qt.get("output_bias", False)),
                       quantization=qt.get("quantization"), extra=extra)
        except (TypeError, ValueError, ZeroDivisionError) as e:  # wrong types, zero heads, ...
            raise QtError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise QtError(f"{path} not found: a checkpoint directory needs a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QtError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None
        if not isinstance(d, dict):
            raise QtError(f"{path} must hold a JSON object")
        return cls.from_dict(d, source=str(path))
