"""LoRA adapters in PEFT's format, served on a shared base model and chosen per request.

    adapter = lora.load("runs/x/best", ckpt, "mine")   # read it, check it against the base
    routing = lora.attach(model, [adapter, ...])        # wrap the targeted linears (TorchRunner does this)
    routing.select(token_adapters, head_adapters)       # before each forward: which adapter each row uses

An adapter directory is what `peft`'s `save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors` (or `adapter_model.bin`), with tensors

    base_model.model.<module>.lora_A.weight   (r, in)
    base_model.model.<module>.lora_B.weight   (out, r)

where <module> is the base's module name (`model.layers.0.self_attn.q_proj`, ..., `lm_head`:
qt's `Transformer` uses HF Llama's names). A wrapped linear computes, for the rows that use
adapter i, `base(x) + s_i · x A_iᵀ B_iᵀ` with s = lora_alpha / r (lora_alpha / √r with
use_rslora); rows of the base model, or of an adapter that leaves the layer alone, get base(x).
Dropout is a training-time thing and is ignored.

Which modules an adapter changes is read from its tensors (`layers_to_transform`,
`exclude_modules` are already reflected there); `target_modules` must target each of them.
An adapter whose tensors do not fit the base (a module it lacks, other shapes) is refused,
naming the module. `base_model_name_or_path` naming another model is only a warning: paths
differ between machines, and the shape checks catch a wrong base of another size (not a
fine-tune of the same shapes: that one is the user's to get right).

The model file knows nothing of this: the wrappers are put in from outside, after the fast
decode swaps (`fast.py`), and call whatever layer they wrap for the base product.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from qt_serve.checkpoint import Checkpoint
from qt_serve.errors import QtError, read_json

log = logging.getLogger("qt_serve.lora")

MERGE = ("merge it into the base instead (PeftModel.merge_and_unload().save_pretrained(DIR)) and serve "
         "that with --model")
# adapter_config.json options that change the forward pass in ways this module does not compute.
UNSUPPORTED = {
    "use_dora": "DoRA rescales each output by a learned magnitude",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA pools the inputs in groups",
    "modules_to_save": "whole modules trained and saved beside the adapter",
    "trainable_token_indices": "trained embedding rows",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "layers repeated to grow the model",
    "alora_invocation_tokens": "activated LoRA switches on after its invocation tokens",
    "use_bdlora": "a LoRA variant",
    "arrow_config": "a LoRA variant",
    "kasa_config": "a LoRA variant",
    "velora_config": "a LoRA variant",
    "monteclora_config": "a LoRA variant",
}
# init_lora_weights values whose adapter goes with a modified base weight (or is a variant).
MODIFIED_BASE = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")
KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


@dataclass
class Adapter:
    name: str
    source: str  # its directory
    # module name -> (Aᵀ (in, r), s·Bᵀ (r, out)), in the base's dtype and device
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def parse_spec(spec: str, models: list[str]) -> tuple[str, str, str]:
    """`NAME=DIR[@MODEL]` -> (name, dir, base): the base is MODEL, or the first served model."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise QtError(f"--lora {spec}: expected NAME=DIR (NAME is what requests send as `model`)")
    head, at, base = path.rpartition("@")
    if at and base in models:
        return name, head, base
    return name, path, models[0]


def load(directory: str | Path, ckpt: Checkpoint, name: str) -> Adapter:
    """Read a PEFT LoRA adapter and check it against the base checkpoint `ckpt` it will run on."""
    directory = Path(directory)
    where = f"LoRA adapter {name!r} ({directory})"
    model = ckpt.model
    if model is None:
        raise QtError(f"{where}: its base {ckpt.source} runs on its own backend (ONNX Runtime), not a torch "
                      "model; attach adapters to an unquantized checkpoint, or merge the adapter and export that")
    if not directory.is_dir():
        raise QtError(f"{where}: no such directory")
    config = read_json(directory / "adapter_config.json")
    if config is None:
        raise QtError(f"{where}: no adapter_config.json; give the directory peft's save_pretrained wrote")
    check_config(config, where)
    pairs = lora_pairs(read_tensors(directory, where), model, where)
    targets = config.get("target_modules")
    modules = dict(model.named_modules())
    weights = {}
    for module, ab in sorted(pairs.items()):
        layer = modules.get(module)
        if layer is None:
            raise QtError(f"{where}: it changes module {module}, which the base model {ckpt.source} does not have: "
                          "the adapter was trained for another model")
        if type(layer) is not nn.Linear:
            raise QtError(f"{where}: module {module} of the base is a {type(layer).__name__}, not a plain Linear "
                          "(a quantized checkpoint, or --load-in?); attach adapters to an fp32/bf16/fp16 checkpoint "
                          "loaded without --load-in")
        if not targeted(module, targets):
            raise QtError(f"{where}: it has weights for {module}, which its target_modules {targets!r} does not "
                          "target: adapter_config.json and the weights do not belong together")
        weights[module] = fit(module, ab, layer, config, where)
    trained_on = config.get("base_model_name_or_path")
    if trained_on and Path(trained_on).name.lower() != Path(ckpt.source).name.lower():
        log.warning("%s was trained on %s and is served on %s (their shapes fit)", where, trained_on, ckpt.source)
    return Adapter(name, str(directory), weights)


def lora_pairs(tensors: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"A": lora_A, "B": lora_B}; any other tensor refused, unless it is an unchanged copy
    of a base weight (peft saves a tied or resized layer's weight beside the adapter: save_embedding_layers)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    base = model.state_dict()  # tied weights under both names
    for key, t in tensors.items():
        m = KEY.fullmatch(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
            continue
        param = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if param in base and t.shape == base[param].shape and torch.equal(t.to(base[param].dtype),
                                                                          base[param].detach().cpu()):
            continue
        raise QtError(f"{where}: tensor {key} is not a LoRA weight qt serves (lora_A / lora_B of a Linear)"
                      + (" and differs from the base's" if param in base else "") + f"; {MERGE}")
    if not pairs:
        raise QtError(f"{where}: adapter_model holds no lora_A / lora_B weights")
    for module, ab in pairs.items():
        missing = {"A", "B"} - set(ab)
        if missing:
            raise QtError(f"{where}: module {module} has no lora_{missing.pop()} weight: the file is incomplete")
    return pairs


def fit(module: str, ab: dict[str, torch.Tensor], layer: nn.Linear, config: dict, where: str
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's (Aᵀ (in, r), s·Bᵀ (r, out)) in the layer's dtype and device, after checking the shapes."""
    r, alpha = module_rank(module, config)
    want = {"A": (r, layer.in_features), "B": (layer.out_features, r)}
    for part in "AB":
        if tuple(ab[part].shape) != want[part]:
            raise QtError(f"{where}: module {module}: lora_{part} is {tuple(ab[part].shape)}, expected "
                          f"{want[part]} (r={r}, base Linear {layer.in_features} -> {layer.out_features}): "
                          "the adapter was trained for another model")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    w = layer.weight
    a = ab["A"].to(device=w.device, dtype=torch.float32).t()
    b = (ab["B"].to(device=w.device, dtype=torch.float32) * scale).t()  # the scale folded in, in fp32
    return a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous()


def check_config(config: dict, where: str) -> None:
    """Refuse, by name, every option of adapter_config.json that this module would serve wrongly."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise QtError(f"{where}: peft_type is {kind!r}; qt serves LoRA adapters (peft_type LORA) only")
    if config.get("bias", "none") != "none":
        raise QtError(f"{where}: bias={config['bias']!r} trains the base's biases too, which qt does not serve; "
                      f"train with bias='none', or {MERGE}")
    for key, why in UNSUPPORTED.items():
        if config.get(key):
            raise QtError(f"{where}: adapter_config.json sets {key}={config[key]!r} ({why}), which qt does not "
                          f"serve; {MERGE}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(MODIFIED_BASE):
        raise QtError(f"{where}: init_lora_weights={init!r} pairs the adapter with a modified base weight; save it "
                      "converted to plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...)), "
                      f"or {MERGE}")
    if config.get("fan_in_fan_out"):  # peft resets it for nn.Linear bases too: lora_B(lora_A(x)) either way
        log.warning("%s: fan_in_fan_out is set but the base's layers are nn.Linear; ignored, as peft does", where)
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise QtError(f"{where}: adapter_config.json {key} is {config.get(key)!r}; expected a positive number")


def targeted(module: str, targets) -> bool:
    """Does peft's `target_modules` (a list of name suffixes, a regex, or "all-linear") select `module`?"""
    if targets == "all-linear":
        return module != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or ())


def module_rank(module: str, config: dict) -> tuple[int, float]:
    """(r, lora_alpha) of one module: rank_pattern / alpha_pattern override them, matched as peft does."""
    def pattern(key: str) -> float:
        for p, value in (config.get(f"{'rank' if key == 'r' else 'alpha'}_pattern") or {}).items():
            if re.match(rf"(.*\.)?({p})$", module):
                return value
        return config[key]

    return int(pattern("r")), pattern("lora_alpha")


def read_tensors(directory: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, bin_ = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    try:
        if st.is_file():
            return load_file(str(st))
        if bin_.is_file():
            return torch.load(bin_, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QtError(f"{where}: its weights are truncated or corrupt ({e})") from None
    raise QtError(f"{where}: no adapter_model.safetensors (nor adapter_model.bin)")


class Routing:
    """Which adapter each row of the current forward uses, shared by every `LoraLinear` of a model.

    Groups are (adapter id, row indices into the flattened (B*S) rows, None when all of them),
    one per adapter present (id 0, the base alone, needs none): a layer's extra cost is
    proportional to the rows that use each adapter. `head` is the same for the LM head, which
    sees only the rows whose logits are asked for (`Transformer.forward`'s logit_index)."""

    def __init__(self):
        self.tokens: list[tuple[int, torch.Tensor | None]] = []
        self.head: list[tuple[int, torch.Tensor | None]] = []

    def select(self, tokens: list[int], head: list[int] | None = None, device=None) -> None:
        """tokens: each input row's adapter id, flattened (B*S); head: each LM-head row's (default: tokens)."""
        self.tokens = groups(tokens, device)
        self.head = self.tokens if head is None else groups(head, device)


def groups(ids: list[int], device) -> list[tuple[int, torch.Tensor | None]]:
    out = []
    for i in sorted(set(ids) - {0}):
        rows = [j for j, x in enumerate(ids) if x == i]
        out.append((i, None if len(rows) == len(ids) else torch.tensor(rows, device=device)))
    return out


class LoraLinear(nn.Module):
    """base(x) + x Aᵀ (s·Bᵀ) on the rows routed to each adapter; base(x) alone on the others."""

    def __init__(self, base: nn.Module, routing: Routing, head: bool):
        super().__init__()
        self.base, self.routing, self.head = base, routing, head
        self.in_features, self.out_features = base.in_features, base.out_features
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter id -> (Aᵀ (in, r), s·Bᵀ (r, out))

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.pairs)}"

    def forward(self, x):
        y = self.base(x)
        for i, rows in self.routing.head if self.head else self.routing.tokens:
            pair = self.pairs.get(i)
            if pair is None:  # adapter i leaves this layer alone
                continue
            a, b = pair
            if rows is None:
                y = y + (x @ a) @ b
            else:  # (n, in) @ (in, r) @ (r, out) on the n rows of adapter i, added into the (B*S, out) output
                flat = x.reshape(-1, self.in_features)[rows]
                y = y.reshape(-1, self.out_features).index_add(0, rows, (flat @ a) @ b).view(y.shape)
        return y


def attach(model: nn.Module, adapters: list[Adapter]) -> Routing:
    """Wrap each linear some adapter changes; adapters[i-1] is served to rows routed to id i."""
    routing = Routing()
    wrapped: dict[str, LoraLinear] = {}
    for i, adapter in enumerate(adapters, 1):
        for module, pair in adapter.weights.items():
            if module not in wrapped:
                parent, _, child = module.rpartition(".")
                owner = model.get_submodule(parent)
                wrapped[module] = LoraLinear(getattr(owner, child), routing, head=module == "lm_head")
                setattr(owner, child, wrapped[module])
            wrapped[module].pairs[i] = pair
    return routing
