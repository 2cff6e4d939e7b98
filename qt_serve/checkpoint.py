"""The checkpoint directory: the one artifact every qt package reads and writes.

    config.json              ModelConfig (LlamaConfig names + a `qt` section)
    model.safetensors        HF parameter names (or sharded: model-0000x-of-0000y + index)
    tokenizer.json, tokenizer_config.json (with chat_template), generation_config.json

A quantized checkpoint records its scheme in config.json (`qt.quantization.scheme`). fp16 and
bf16 are plain dtypes (`torch_dtype`) and load here; any other scheme is loaded by the package
that wrote it, found through the entry point group `qt_serve.formats` (name = scheme; qt's own
are in quant/), so this layer imports nothing from above it.

`save_checkpoint` writes into a temporary sibling directory and renames it into
place, so a crash mid-write never leaves a directory that loads as if whole.
`load` accepts such a directory (ours or one written by `transformers`), a `.gguf`
file, or a known model name (fetched by `qt_serve.hub`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qt_serve.config import ModelConfig
from qt_serve.errors import QtError, read_json
from qt_serve.model import Transformer, rope_tables
from qt_serve.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CAST_SCHEMES = ("fp16", "bf16")  # quantization schemes that are only a dtype: loaded here
FORMATS_GROUP = "qt_serve.formats"


@dataclass
class Checkpoint:
    """A loaded model with everything needed to run it.

    `model` is the torch module, or None for a backend that has none (an ONNX graph); then
    `runner` builds the engine's runner (`qt_serve.runner.Runner`) and `cfg` is its config."""

    model: Transformer | None
    tokenizer: Tokenizer | None
    generation_config: dict
    source: str
    runner: Callable[[], Any] | None = None
    cfg: ModelConfig | None = None

    @property
    def config(self) -> ModelConfig:
        return self.cfg if self.model is None else self.model.config


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise QtError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- writing -------------------------------------------------------------------


def state_dict_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    """HF-named tensors; a tied LM head is left out (HF re-ties it from the embedding)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None = None,
                    generation_config: dict | None = None, extra=None) -> Path:
    """Write a whole checkpoint directory atomically (temp dir, then rename).

    `extra(tmp_dir)`, when given, writes more files (e.g. train/'s train_state.pt) into the
    directory before the rename, so they appear together with the weights or not at all.
    """
    cfg = model.config
    dtype = next(model.parameters()).dtype
    cfg.torch_dtype = {v: k for k, v in DTYPES.items()}.get(dtype, cfg.torch_dtype)

    def weights(tmp: Path) -> None:
        save_file(state_dict_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)

    return write_checkpoint(directory, cfg, weights, tokenizer, generation_config)


def write_checkpoint(directory: str | Path, cfg: ModelConfig, weights: Callable[[Path], None],
                     tokenizer: Tokenizer | None = None, generation_config: dict | None = None) -> Path:
    """A checkpoint directory whose weights `weights(tmp_dir)` writes (safetensors, an ONNX graph, ...):
    config, tokenizer and generation config beside them, all in a temp dir renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        cfg.save(tmp / "config.json")
        weights(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **(generation_config or {})}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def replace_dir(src: Path, dst: Path) -> None:
    # os.replace cannot swap onto a non-empty directory: move the old one aside first. `dst` is
    # never a half-written checkpoint; between the two renames it is missing, and a crash in that
    # instant leaves the old one whole under `.NAME.old-PID`.
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- reading -------------------------------------------------------------------


def read_tensors(directory: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The directory's tensors, shard by shard (`model.safetensors` or the index's shards).

    Each shard is memory-mapped and its floating-point tensors are cast to `dtype` before the next is
    read, so a bf16 checkpoint loaded as fp32 never holds both whole copies (peak: the fp32 model plus
    one shard), and one loaded in its own dtype is never copied at all (LOG.md, 2026-12-02)."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QtError(f"{index} is corrupt ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise QtError(f"{directory}: shard(s) {', '.join(missing)} listed in {index.name} are missing; "
                          "download the whole checkpoint")
    elif (directory / "pytorch_model.bin").exists():
        raise QtError(f"{directory} holds pytorch_model.bin; qt reads safetensors only. Convert it with "
                      "transformers: AutoModelForCausalLM.from_pretrained(d).save_pretrained(d)")
    else:
        raise QtError(f"{directory} has no model.safetensors: not a complete checkpoint directory")
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as shard:
                for name in shard.keys():
                    t = shard.get_tensor(name)
                    tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError, ValueError) as e:
            raise QtError(f"{f} is truncated or corrupt ({e}); re-download or re-save the checkpoint") from None
    return tensors


def runnable_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """`dtype`, or float32 with a warning when this device cannot compute in it (a GPU without bf16,
    a torch build without half-precision CPU kernels): tried on a small matmul, as the model would."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise QtError(f"device {device}: this torch build sees no CUDA GPU (torch {torch.__version__}); "
                      "use --device cpu, or install a CUDA build of torch")
    if dtype == torch.float32:
        return dtype
    try:
        x = torch.ones(2, 8, dtype=dtype, device=device)
        torch.nn.functional.linear(x, x).sum().item()
        if (torch.device(device).type == "cuda" and dtype == torch.bfloat16
                and torch.cuda.get_device_capability(device)[0] < 8):  # torch would emulate it, slowly
            raise RuntimeError("this GPU has no bfloat16 arithmetic (compute capability < 8.0)")
    except RuntimeError as e:
        warnings.warn(f"{dtype} cannot run on {device} ({e}); loading the weights as float32 instead",
                      stacklevel=3)
        return torch.float32
    return dtype


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype | None = None, device="cpu", max_seq_len: int | None = None) -> Transformer:
    """A Transformer holding `tensors`, after checking every name and shape against `cfg`."""
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise QtError(f"{source}: weights do not match config.json: missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if tensors[k].shape != shape:
            raise QtError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, config.json implies {tuple(shape)}")
    dtype = dtype or DTYPES.get(cfg.torch_dtype, torch.float32)
    # Built on the meta device, the weights are assigned rather than copied over a random init.
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg, model.max_seq_len)
    return model.to(device=device, dtype=dtype).eval()


def load_dir(directory: str | Path, dtype: torch.dtype | None = None, device="cpu",
             max_seq_len: int | None = None) -> Checkpoint:
    directory = Path(directory)
    if not directory.is_dir():
        raise QtError(f"checkpoint directory {directory} does not exist")
    cfg = ModelConfig.load(directory / "config.json")
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").exists() else None
    gen = read_json(directory / "generation_config.json", missing={})
    scheme = (cfg.quantization or {}).get("scheme")
    if scheme is None or scheme in CAST_SCHEMES:
        dtype = runnable_dtype(dtype or DTYPES.get(cfg.torch_dtype, torch.float32), device)
        model = build_model(cfg, read_tensors(directory, dtype), str(directory), dtype, device, max_seq_len)
        return Checkpoint(model, tokenizer, gen, str(directory))
    model, runner = checkpoint_format(scheme, directory)(directory, cfg, dtype=dtype, device=device,
                                                         max_seq_len=max_seq_len)
    return Checkpoint(model, tokenizer, gen, str(directory), runner=runner, cfg=cfg)


def checkpoint_format(scheme: str, directory: Path | str = "the checkpoint") -> Callable:
    """The loader of a quantization scheme, from the package that registered it:

        load(directory, cfg, dtype=, device=, max_seq_len=) -> (model | None, runner factory | None)
    """
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=FORMATS_GROUP)}
    if scheme not in found:
        known = ", ".join(sorted(found) + list(CAST_SCHEMES))
        raise QtError(f"{directory} is quantized with scheme {scheme!r}, which no installed package loads "
                      f"(known: {known}); install qt with its quant/ package (pip install -e .)")
    return found[scheme].load()


def load(spec: str | Path, dtype: str | torch.dtype | None = None, device="cpu",
         max_seq_len: int | None = None, load_in: str | None = None) -> Checkpoint:
    """Load a checkpoint dir, an HF directory, a .gguf file, or a known model name.

    `load_in` "int8" | "int4" quantizes the block projections with bitsandbytes (LLM.int8 / NF4) as they
    move to a CUDA device, so an 8B model needs ~6 GB of GPU memory for its weights; done by quant/ (entry
    point group `qt_serve.load_in`). On CPU use `qt-quant MODEL --to int8|int4` instead."""
    from qt_serve import gguf_import, hub

    if max_seq_len is not None and max_seq_len < 2:
        raise QtError(f"max_seq_len must be at least 2 (a prompt token and a new one), got {max_seq_len}")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    quantize, target = None, device
    if load_in is not None:  # refused before the weights are read, which may take minutes
        quantize = load_in_quantizer(load_in, device)
        dtype, device = dtype or torch.float16, "cpu"  # built on the host, quantized on the way to the GPU
    path = Path(spec)
    if quantize is not None and path.is_dir():
        scheme = (ModelConfig.load(path / "config.json").quantization or {}).get("scheme")
        if scheme not in (None, *CAST_SCHEMES):
            raise QtError(f"{spec} is already quantized ({scheme}); --load-in quantizes a full-precision checkpoint")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise QtError(f"GGUF file {path} does not exist")
        ckpt = gguf_import.load_gguf(path, dtype, device, max_seq_len)
    else:
        if not path.exists() and str(spec) in hub.KNOWN:
            path = hub.pull(str(spec))
        if not path.exists():
            raise QtError(f"{spec} is neither a checkpoint directory, a .gguf file nor a known model "
                          f"({', '.join(hub.KNOWN)})")
        ckpt = load_dir(path, dtype, device, max_seq_len)
    if quantize is not None:
        ckpt.model = quantize(ckpt.model, load_in, target)
    return ckpt


LOAD_IN = ("int8", "int4")


def load_in_quantizer(scheme: str, device) -> Callable:
    """The load-time quantizer for `scheme` (see `load`), after checking it can run on `device`."""
    from importlib.metadata import entry_points

    if scheme not in LOAD_IN:
        raise QtError(f"--load-in {scheme!r}: choose one of {', '.join(LOAD_IN)}")
    if torch.device(device).type != "cuda":
        raise QtError(f"--load-in {scheme} quantizes with bitsandbytes, which needs a CUDA GPU (device is {device}); "
                      f"on CPU convert once with `qt-quant MODEL --to {scheme}` (qt's own CPU kernels) and serve "
                      "that directory")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QtError(f"--load-in {scheme} needs bitsandbytes: pip install -e '.[gpu]'") from None
    found = {ep.name: ep for ep in entry_points(group="qt_serve.load_in")}
    if scheme not in found:
        raise QtError(f"--load-in {scheme} needs qt's quant/ package: pip install -e '.[gpu]'")
    return found[scheme].load()
