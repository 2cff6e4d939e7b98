"""`ModelConfig`: the one set of hyper-parameters, stored as `config.json`.

Field names are Hugging Face `LlamaConfig`'s, so a qt checkpoint directory loads in
`transformers` (and vLLM, TGI, llama.cpp's converter) unchanged and an HF Llama
directory loads here. What Llama lacks lives under a `qt` key that HF ignores.
Train, quant, serve and export all rebuild the model from this object; there is
no second copy of the hyper-parameters anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qt_serve.errors import QtError

ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass
class ModelConfig:
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
    # qt's own section (`"qt": {...}` in config.json): things LlamaConfig has no name for.
    output_bias: bool = False  # a bias on the LM head (unigram log-prior init in train/)
    quantization: dict | None = None  # e.g. {"scheme": "int8", ...}, set by quant/
    # Any other keys of an imported config.json, written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
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

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    # ---- config.json -------------------------------------------------------

    def to_dict(self) -> dict:
        d = {"architectures": list(ARCHITECTURES), "model_type": "llama", "hidden_act": "silu"}
        d.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("output_bias", "quantization", "extra"):
                d[f.name] = getattr(self, f.name)
        d["qt"] = {"output_bias": self.output_bias, "quantization": self.quantization}
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        archs = d.get("architectures") or ([] if d.get("model_type") != "llama" else list(ARCHITECTURES))
        if not any(a in ARCHITECTURES for a in archs):
            raise QtError(
                f"{source}: architecture {archs or d.get('model_type')!r} is not supported; "
                f"qt loads {', '.join(ARCHITECTURES)} (model_type 'llama') checkpoints"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise QtError(f"{source}: hidden_act {act!r} is not supported (Llama uses 'silu')")
        names = {f.name for f in dataclasses.fields(cls)} - {"output_bias", "quantization", "extra"}
        known = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters")  # transformers ≥ 5 nests rope_theta and the scaling here
        if isinstance(rope, dict):
            rope = dict(rope)
            known.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                known.setdefault("rope_scaling", rope)
        skip = {"architectures", "model_type", "hidden_act", "qt", "rope_parameters"}
        extra = {k: v for k, v in d.items() if k not in names and k not in skip}
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
