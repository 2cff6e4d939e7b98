"""quant/weights.py and quant/kernels.py: int8 / int4 weight-only checkpoints.

References are independent of the code under test: error bounds from the definitions (int8: half a
step of absmax/127 per row; int4: half a step of the group's (max - min)/15, with fp16's rounding),
products against fp32 F.linear on the dequantized weights, decoding against a full recompute without
a KV cache, and the caller's model against a copy taken before `write`.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qt_serve import checkpoint
from qt_serve.errors import QtError
from qt_serve.generate import LLM
from qt_serve.sampling import SamplingParams
from quant import kernels, weights
from quant.cli import main as quant_main

from conftest import tiny_model

CPU_PATHS = [(s, k) for s in ("int8", "int4") for k in kernels.CPU_KERNELS[s]]
# Checkpoints as written: int8 in groups of 32 (dequant; the per-row products cannot run it); "int8-row",
# the one-scale-per-row int8 qt wrote first, which every int8 kernel runs; "int8-sym", the symmetric
# groups (no mins) qt wrote next.
CKPT_PATHS = [("int8", "dequant"), ("int8-sym", "dequant"), *[("int8-row", k) for k in kernels.CPU_KERNELS["int8"]],
              *[("int4", k) for k in kernels.CPU_KERNELS["int4"]]]
# fbgemm also rounds each call's input to 8 bits (per tensor): about 1% of the output's scale here.
PRODUCT_TOL = {"fbgemm": 0.03, "int8pack": 1e-5, "int4pack": 1e-5, "dequant": 1e-5}


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Measured kernel choices go to a temporary $QT_HOME; no kernel forced from the environment."""
    monkeypatch.setenv("QT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(weights.KERNEL_ENV, raising=False)


def runnable(scheme, kernel):
    """Skip unless this CPU runs `kernel` on `scheme` as written here: int4 and int8 in groups of 32,
    "int8-row" one scale per row."""
    if kernel not in kernels.available(scheme[:4], None if scheme == "int8-row" else 32):
        pytest.skip(f"this CPU cannot run {kernel} (flags: {' '.join(kernels.fast.cpu_flags())})")


# ---- formats ---------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(96, 80) * torch.logspace(-3, 1, 96)[:, None]  # rows of very different scales
    w[5] = 0  # an all-zero row
    q, scale, mins = kernels.quantize_int8(w)
    assert mins is None and q.dtype == torch.int8 and scale.shape == (96,) and int(q.abs().max()) <= 127
    step = w.abs().amax(1) / 127  # the definition, not the code's scale
    err = (kernels.dequantize_int8(q, scale) - w).abs()
    assert (err <= step[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert err[5].max() == 0


@pytest.mark.parametrize("scheme,top", [("int4", 15), ("int8", 255)])
@pytest.mark.parametrize("group", [32, 16, 64])
def test_group_round_trip_is_within_half_a_step(scheme, top, group):
    torch.manual_seed(1)
    N, K = 48, 128
    w = torch.randn(N, K) * 0.05 + torch.linspace(-1, 1, N)[:, None]  # groups off-centre: the min matters
    w[3, :group] = 0.25  # a constant group
    if scheme == "int4":
        packed, scales, mins = kernels.quantize_int4(w, group)
        assert packed.shape == (N, K // 2) and packed.dtype == torch.uint8
        got = kernels.dequantize_int4(packed, scales, mins)
        codes = kernels.unpack_int4(packed)
        assert codes.max() <= 15 and torch.equal(kernels.pack_int4(codes), packed)
    else:
        q, scales, mins = kernels.quantize_int8(w, group)
        assert q.shape == (N, K) and q.dtype == torch.int8
        got = kernels.dequantize_int8(q, scales, mins)
    assert scales.shape == mins.shape == (N, K // group) and scales.dtype == mins.dtype == torch.float16
    g = w.view(N, K // group, group)
    rng = g.amax(-1) - g.amin(-1)
    # fp16 storage widens the step by at most a couple of fp16 ulps of (range/top) and of min
    step = rng / top * (1 + 2 ** -9) + g.abs().amax(-1) * 2 ** -10 / top
    err = (got - w).view(N, K // group, group).abs()
    assert (err <= step[..., None] / 2 + 1e-6).all()
    assert (err <= scales.float()[..., None] / 2 * (1 + 1e-5) + 1e-7).all()  # and against its own scale
    if scheme == "int8":  # asymmetric: on groups far off centre (rows 0-11, W ≈ -1 ± 0.15), well below a
        # symmetric grid's max|W|/254
        assert (err[:12].amax(-1) <= g[:12].abs().amax(-1) / 254 * 0.6).all()


def test_int4_nibble_order():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert kernels.pack_int4(codes).tolist() == [[0x21, 0x43]]


# ---- kernels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,kernel", CPU_PATHS)
@pytest.mark.parametrize("rows", [1, 13])
def test_every_cpu_kernel_matches_fp32_linear(scheme, kernel, rows):
    runnable("int8-row" if scheme == "int8" else scheme, kernel)
    torch.manual_seed(2)
    N, K = 80, 192
    w, b, x = torch.randn(N, K) * 0.1, torch.randn(N), torch.randn(rows, K)
    if scheme == "int8":
        q, scales, _ = kernels.quantize_int8(w)
        stored = {"qweight": q, "scales": scales}
    else:
        q, scales, mins = kernels.quantize_int4(w, 32)
        stored = {"qweight": q, "scales": scales, "mins": mins}
    # the reference: plain fp32 F.linear on the weights the file holds, dequantized by the definition
    deq = (q.float() * scales[:, None] if scheme == "int8" else
           torch.stack((q & 15, q >> 4), -1).view(N, K // 32, 32).float() * scales.float()[..., None]
           + mins.float()[..., None]).reshape(N, K)
    ref = F.linear(x, deq, b)
    y = kernels.build(kernel, scheme, stored, b, torch.device("cpu"))(x)
    assert y.shape == (rows, N)
    assert (y - ref).abs().max() <= PRODUCT_TOL[kernel] * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes paths need a CUDA device (none here)")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bitsandbytes_on_cuda(scheme, tmp_path, tokenizer):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the gpu extra")
    src = tiny_model(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256)
    out = weights.write(checkpoint.Checkpoint(src, tokenizer, {}, "mem"), scheme, tmp_path / scheme, None)
    model = checkpoint.load(out, device="cuda").model
    assert model.quant_kernel["kernel"] == "bnb"
    ids = torch.randint(0, tokenizer.vocab_size, (1, 9))
    with torch.no_grad():
        ref = src(ids)
        got = model(ids.cuda()).cpu()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.5


# ---- checkpoints -----------------------------------------------------------------------------


def source(tokenizer, **kw):
    model = tiny_model(seed=3, vocab_size=tokenizer.vocab_size, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(1 / 3)  # N(0, 0.1): saner activations than conftest's N(0, 0.3) for 4-bit weights
    return model


def dequantized_twin(model: torch.nn.Module, scheme: str, group: int | None) -> torch.nn.Module:
    """The fp32 model with every matrix that its group divides, the embedding included, replaced by its
    round trip; a tied matrix once, and the LM head (int4 checkpoints keep it int8) in int8."""
    twin, done = copy.deepcopy(model), set()
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and id(m.weight) not in done:
                w = m.weight
                done.add(id(w))
                if group is not None and w.shape[1] % group:
                    continue
                if scheme == "int8-sym":
                    w.copy_(kernels.dequantize_int8(*symmetric_groups(w, group)))
                elif scheme.startswith("int8") or w is twin.lm_head.weight:
                    w.copy_(kernels.dequantize_int8(*kernels.quantize_int8(w, group)))
                else:
                    w.copy_(kernels.dequantize_int4(*kernels.quantize_int4(w, group)))
    return twin


def symmetric_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 groups as qt first wrote them: q = round(W / s), s = fp16(max|W| / 127) per group (no mins)."""
    g = w.float().view(w.shape[0], -1, group)
    s = (g.abs().amax(-1) / 127).half()
    return torch.round(g / s.float()[..., None]).clamp(-128, 127).to(torch.int8).view(w.shape), s


def write(src, tokenizer, scheme: str, out, group=None, gen=None):
    """weights.write; "int8-row" and "int8-sym": int8 checkpoints as qt wrote them before groups (one scale
    per row) and next (symmetric groups of 32, no mins)."""
    ck = checkpoint.Checkpoint(src, tokenizer, gen or {}, "mem")
    if scheme not in ("int8-row", "int8-sym"):
        return weights.write(ck, scheme, out, group)
    out = weights.write(ck, "int8", out, group)
    tensors, sd = load_file(str(out / "model.safetensors")), src.state_dict()
    for name in [n for n in tensors if n.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        w = sd[f"{module}.weight"]
        q, s = symmetric_groups(w, 32) if scheme == "int8-sym" else kernels.quantize_int8(w)[:2]
        tensors[name], tensors[f"{module}.scales"] = q, s
        del tensors[f"{module}.mins"]
    save_file(tensors, str(out / "model.safetensors"))
    if scheme == "int8-row":
        cfg = json.loads((out / "config.json").read_text())
        cfg["qt"]["quantization"].update(group_size=None)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("scheme,kernel", CKPT_PATHS)
def test_quantized_checkpoint_round_trip(scheme, kernel, tmp_path, tokenizer, monkeypatch):
    runnable(scheme, kernel)
    src = source(tokenizer)
    before = copy.deepcopy(src.state_dict())
    out = write(src, tokenizer, scheme, tmp_path / scheme, gen={"temperature": 0.2})
    for k, v in src.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k
    assert src.lm_head.weight is src.model.embed_tokens.weight

    monkeypatch.setenv(weights.KERNEL_ENV, kernel)
    ck = checkpoint.load(out)
    q = ck.config.quantization
    assert q["scheme"] == scheme[:4] and q["kernel"] == kernel and q["embedding"] == "lm_head" and q["kept"] == []
    assert q["group_size"] == (None if scheme == "int8-row" else 32) and q["head"] == "int8"
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.2
    assert ck.tokenizer is not None
    names = set(load_file(str(out / "model.safetensors")))
    assert "lm_head.qweight" in names and not any(n.startswith("model.embed_tokens") for n in names)
    assert not any(n.endswith(".weight") and "norm" not in n for n in names)

    ids = torch.randint(0, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    twin = dequantized_twin(src, scheme, q["group_size"])
    with torch.no_grad():
        got, ref, full = ck.model(ids), twin(ids), src(ids)
    tol = PRODUCT_TOL[kernel] * 2 + (0.02 if kernel == "fbgemm" and scheme == "int4" else 0)
    assert (got - ref).abs().max() <= tol * ref.abs().max() + 1e-4  # the kernel runs the stored weights
    # and they are close to fp32's: random N(0, 0.1) weights lose ~8% per weight at 4 bits (~0.3 of the
    # logits' mean after two layers and the quantized embedding), ~0.5% at 8 bits (~0.025)
    rel = float((got - full).abs().mean() / full.abs().mean())
    assert rel <= {"int8": 0.06, "int4": 0.4}[scheme[:4]]


@pytest.mark.parametrize("scheme,kernel", CKPT_PATHS)
def test_cached_decode_equals_recompute(scheme, kernel, tmp_path, tokenizer, monkeypatch):
    runnable(scheme, kernel)
    out = write(source(tokenizer), tokenizer, scheme, tmp_path / "q")
    monkeypatch.setenv(weights.KERNEL_ENV, kernel)
    prompt = tokenizer.encode("To be, or not to be")
    model = checkpoint.load(out).model
    ids = list(prompt)
    # fbgemm rounds each call's input with one scale over the call's rows, so a one-row decode step and
    # the whole sequence's recompute round differently (~1% of the logits): near-ties part them after
    # a few tokens. The other kernels keep activations in fp32.
    n = 6 if kernel in kernels.ROUNDS_ACTIVATIONS else 12
    with torch.no_grad():  # the quantized model, no KV cache, the whole sequence each step
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    llm = LLM.load(str(out))
    got = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)).tokens
    assert got == ids[len(prompt):]


def test_untied_embedding_and_kept_layers(tmp_path, tokenizer):
    # hidden 64, intermediate 48: at group 64 the down projection (input 48) is too narrow and is kept
    src = source(tokenizer, tie_word_embeddings=False, intermediate_size=48)
    out = weights.write(checkpoint.Checkpoint(src, tokenizer, {}, "mem"), "int4", tmp_path / "q", 64)
    q = json.loads((out / "config.json").read_text())["qt"]["quantization"]
    assert q["kept"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    assert q["embedding"] == "int4"
    model = checkpoint.load(out).model
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.embed_tokens, weights.QuantEmbedding)
    ids = torch.randint(0, tokenizer.vocab_size, (1, 10))
    with torch.no_grad():
        got, ref = model(ids), dequantized_twin(src, "int4", 64)(ids)
    tol = 0.05 if model.quant_kernel["kernel"] == "fbgemm" else 1e-4
    assert (got - ref).abs().max() <= tol * ref.abs().max() + 1e-4


# ---- errors ------------------------------------------------------------------------------------


def test_group_size_must_divide_each_layer(tmp_path, tokenizer):
    ck = checkpoint.Checkpoint(source(tokenizer), tokenizer, {}, "mem")
    with pytest.raises(QtError, match=r"group size 24 does not divide the input width 64 of model\.layers\.0"):
        weights.write(ck, "int4", tmp_path / "q", 24)
    assert not (tmp_path / "q").exists()


def test_corrupt_scales_shape_is_named(tmp_path, tokenizer):
    out = weights.write(checkpoint.Checkpoint(source(tokenizer), tokenizer, {}, "mem"), "int4", tmp_path / "q", None)
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.scales"
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(QtError, match=rf"{name} has shape \(128, 1\), expected \(128, 2\)"):
        checkpoint.load(out)


def test_forcing_a_kernel_this_machine_lacks(tmp_path, tokenizer, monkeypatch):
    out = write(source(tokenizer), tokenizer, "int8-row", tmp_path / "q")
    monkeypatch.setenv(weights.KERNEL_ENV, "int4pack")
    with pytest.raises(QtError, match="does not run int8 checkpoints"):
        checkpoint.load(out)
    monkeypatch.setattr(kernels.fast, "cpu_flags", lambda: ["avx"])  # a CPU without AVX2
    monkeypatch.setenv(weights.KERNEL_ENV, "fbgemm")
    with pytest.raises(QtError, match="fbgemm needs AVX2"):
        checkpoint.load(out)


def test_per_row_kernels_refuse_grouped_int8(tmp_path, tokenizer, monkeypatch):
    out = write(source(tokenizer), tokenizer, "int8", tmp_path / "q")
    monkeypatch.setenv(weights.KERNEL_ENV, "int8pack")
    with pytest.raises(QtError, match="takes one int8 scale per row; this checkpoint has one per group"):
        checkpoint.load(out)


def test_measured_choice_is_cached(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv(weights.KERNEL_ENV, "auto")  # native aside: the choice among torch's kernels
    monkeypatch.setattr(weights, "native_runner", lambda model, device: None)
    out = write(source(tokenizer), tokenizer, "int8-row", tmp_path / "q")
    monkeypatch.setattr(kernels.fast, "noisy", lambda times: False)  # a busy test machine must not skip the cache
    first = checkpoint.load(out).model.quant_kernel
    assert first["source"] == ("measured" if len(kernels.available("int8", None)) > 1 else "only")
    second = checkpoint.load(out).model.quant_kernel
    assert second["kernel"] == first["kernel"]
    assert second["source"] == ("cached" if first["source"] == "measured" else "only")


def test_cli_int8(tmp_path, tokenizer):
    src = checkpoint.save_checkpoint(tmp_path / "tiny", source(tokenizer), tokenizer)
    assert quant_main([str(src), "--to", "int8"]) == 0
    ck = checkpoint.load(tmp_path / "tiny-int8")
    assert ck.config.quantization["scheme"] == "int8"
    assert isinstance(ck.model.lm_head, weights.QuantLinear)

