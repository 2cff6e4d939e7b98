"""quant/native.cpp, qt's native CPU decoder for int4 / int8 checkpoints, against independent references:

- one product, for every build this CPU runs (AVX-512 VNNI, AVX2, plain C++), against an fp64 product of
  the dequantized weights with the activations rounded per block of 32 as its definition says;
- the whole model, for each family's switches (Q/K/V biases, per-head norms, sliding windows, an LM-head
  bias), against the torch model on the same checkpoint whose linear layers see the same rounding;
- a cached decode against the full recompute, a ragged batch against each sequence alone;
- served over HTTP through the `openai` client;
- a GGUF's own Q4_1 / Q4_0 / Q8_0 blocks kept exactly by `qt-quant --to int4`;
- the errors: a build for instructions this CPU lacks, a model native.cpp cannot run.

The first test of a session compiles the extension (~40 s per build, once per machine: cached under
$QT_HOME/native); CI installs g++ for it. Without a compiler these tests skip, saying so, unless
QT_REQUIRE_NATIVE=1 (CI), where they must run.
"""

import concurrent.futures as cf
import json
import os

import openai
import pytest
import torch

from qt_serve import checkpoint, fast
from qt_serve.errors import QtError
from qt_serve.generate import LLM
from qt_serve.runner import Segment
from qt_serve.sampling import SamplingParams
from quant import kernels, native, weights
from quant.convert import convert

from conftest import build_tokenizer, start_app, tiny_model

BUILD_CACHE = os.environ.get("QT_HOME")  # the builds outlive each test's temporary $QT_HOME


def ext_or_skip(isa=None):
    try:
        return native.extension(isa)
    except QtError as e:
        if os.environ.get("QT_REQUIRE_NATIVE"):
            raise
        pytest.skip(f"native kernels do not build here: {e}")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "build_dir", lambda: native.Path(BUILD_CACHE or native.Path.home() / ".cache/qt") / "native")
    monkeypatch.setenv("QT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(weights.KERNEL_ENV, raising=False)
    monkeypatch.delenv(native.ISA_ENV, raising=False)


def builds():
    """The builds this CPU can run, one per distinct instruction set."""
    flags = fast.cpu_flags()
    named = [isa for isa in native.ISAS if all(f in flags for f in native.NEEDS[isa])]
    return ["native", *[i for i in named if i != "avx512_vnni" or "avx512_vnni" in flags]]


def _once(v):
    """Blocks v (..., 32) -> (codes, scale) in fp64, codes = round(v · 127/max|v|), scale = max|v|/127."""
    amax = v.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(v * inv).double(), (amax / 127).double()


def q8_1(x: torch.Tensor) -> torch.Tensor:
    """x (T, K) rounded once per block of 32, as llama.cpp's q8_1 (native.cpp's first rounding)."""
    q, dx = _once(x.float().reshape(*x.shape[:-1], -1, 32))
    return (q * dx).float().reshape(x.shape)


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x (T, K) as native.cpp rounds it: q8_1, plus what that leaves rounded the same way on its own scale."""
    g = x.float().reshape(*x.shape[:-1], -1, 32)
    q, dx = _once(g)
    r, dr = _once((g.double() - q * dx).float())  # one rounding, as native.cpp's fma
    return (q * dx + r * dr).float().reshape(x.shape)


def layer(scheme: str, N: int, K: int, group: int | None, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(N, K)
    m = weights.QuantLinear(K, N, True, scheme, group)
    if scheme == "int8":
        m.qweight, m.scales, m.mins = kernels.quantize_int8(w, group)
        W = kernels.dequantize_int8(m.qweight, m.scales.half().float(), m.mins)  # native.cpp reads fp16 scales
    else:
        m.qweight, m.scales, m.mins = kernels.quantize_int4(w, group)
        W = kernels.dequantize_int4(m.qweight, m.scales, m.mins)
    m.bias = torch.nn.Parameter(torch.randn(N))
    return m, W.double()


# (scheme, N, K, group): blocks in pairs and not (K = 96: 3 blocks), outputs in whole tiles and not, int4
# groups of 32 and 64, int8 per group and per row (checkpoints written before 2026-12-02)
PRODUCTS = [("int4", 200, 576, 32), ("int4", 20, 96, 32), ("int4", 64, 128, 64), ("int8", 150, 160, 32),
            ("int8", 64, 576, None)]


@pytest.mark.parametrize("isa", builds())
@pytest.mark.parametrize("scheme,N,K,group", PRODUCTS)
@pytest.mark.parametrize("twice", [True, False])
def test_product_matches_its_definition(isa, scheme, N, K, group, twice):
    ext = ext_or_skip(isa)
    m, W = layer(scheme, N, K, group)
    x = torch.randn(5, K)  # 4 tokens a call, then 1
    x[1] *= 300  # one row of outliers: each block is rounded on its own scale
    x[2, :40] = 0  # an all-zero block
    got = ext.matmul(native.linear(ext, [m], twice), x).double()
    ref, other = ((rounded, q8_1) if twice else (q8_1, rounded))
    ref, other = (f(x).double() @ W.T + m.bias.double() for f in (ref, other))
    M = ref.abs().max()
    assert (got - ref).abs().max() <= 2e-6 * M  # fp32 sums: ~2e-7 here
    # and the rounding is that one: the other rounding's product differs by far more (~5e-3)
    assert (other - ref).abs().max() > 1e-3 * M
    if twice:  # and so does the fp32 product (~2e-5)
        assert (x.double() @ W.T + m.bias.double() - ref).abs().max() > 5e-6 * M


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: nothing to run in parallel")
@pytest.mark.parametrize("isa", builds())
def test_parallel_loops_use_torchs_threads(isa):
    """at::parallel_for is a header template: built without OpenMP it ran every product on one thread."""
    ext = ext_or_skip(isa)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ext.threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- the whole model -------------------------------------------------------------------------

FAMILIES = {  # tiny configs with each switch native.cpp must follow
    "llama": dict(),
    "qwen2": dict(model_type="qwen2", num_hidden_layers=3, sliding_window=8, layer_types=[
        "full_attention", "sliding_attention", "sliding_attention"]),
    "qwen3": dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", sliding_window=8, output_bias=True),
    # 6 query heads on one KV head, 64 wide: attention's tasks take 4 + 2 heads over a chunk, 1 in decode
    "gqa": dict(num_attention_heads=6, num_key_value_heads=1, head_dim=64),
}


def quantized(tmp_path, tok, family: str, scheme: str, group: int = 32):
    model = tiny_model(seed=5, vocab_size=tok.vocab_size, **FAMILIES[family])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(1 / 3)
            elif "norm" not in name:  # biases: non-zero
                p.normal_(0, 0.1)
    return weights.write(checkpoint.Checkpoint(model, tok, {}, "mem"), scheme, tmp_path / f"{family}-{scheme}", group)


def torch_twin(directory, monkeypatch, rounding=rounded):
    """The checkpoint in torch (fp32 products of the stored weights), each quantized layer's input passed
    through `rounding` first (native.cpp's by default)."""
    monkeypatch.setenv(weights.KERNEL_ENV, "dequant")
    model = checkpoint.load(directory).model
    monkeypatch.delenv(weights.KERNEL_ENV)
    for m in model.modules():
        if isinstance(m, weights.QuantLinear):
            m.impl = (lambda impl: lambda x: impl(rounding(x)))(m.impl)
    return model


def native_runner(directory, monkeypatch, rows=2, length=64):
    monkeypatch.setenv(weights.KERNEL_ENV, "native")
    ck = checkpoint.load(directory)
    assert ck.config.quantization["kernel"] == "native"
    runner = ck.runner()
    assert isinstance(runner, native.NativeRunner)
    runner.allocate(rows, length)
    return runner


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# every family's switches with the default rounding (twice), and two with QT_NATIVE_ROUNDING=once
LOGIT_CASES = [(f, s, "twice") for f in FAMILIES for s in ("int4", "int8")] + [
    ("llama", "int4", "once"), ("qwen2", "int8", "once")]


@pytest.mark.parametrize("family,scheme,rounding", LOGIT_CASES)
def test_logits_match_torch_with_the_same_rounding(family, scheme, rounding, tmp_path, tok, monkeypatch):
    ext_or_skip()
    d = quantized(tmp_path, tok, family, scheme)
    ids = torch.randint(3, tok.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))  # past the window
    twice = rounding == "twice"
    with torch.no_grad():
        ref = torch_twin(d, monkeypatch, rounding=rounded if twice else q8_1)(ids)[0]
        other = torch_twin(d, monkeypatch, rounding=q8_1 if twice else rounded)(ids)[0]
    monkeypatch.setenv(native.ROUNDING_ENV, rounding)
    got = native_runner(d, monkeypatch).forward([Segment(0, 0, ids[0].tolist())], list(range(24)))
    err = (got - ref).abs().amax(-1) / ref.abs().max()  # per token
    # fp32's summation order differs (twice: ~4e-5 here, at most ~8e-5); where it tips an activation across
    # a rounding boundary, that value moves one step of its last rounding (twice: max|x|/32258; once:
    # max|x|/254, ~1% of a few tokens' logits, through attention)
    assert err.median() < (3e-4 if twice else 1e-3) and err.max() < (2e-3 if twice else 2e-2), err
    # the reference's rounding is the one native.cpp does: with the other, every token is further off (~1e-2)
    assert ((got - other).abs().amax(-1) / other.abs().max()).median() > 5 * err.median()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gqa"])
def test_cached_decode_and_ragged_batches_equal_one_pass(family, tmp_path, tok, monkeypatch):
    ext_or_skip()
    runner = native_runner(quantized(tmp_path, tok, family, "int4"), monkeypatch, rows=3)
    ids = torch.randint(3, tok.vocab_size, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = runner.forward([Segment(2, 0, ids)], list(range(20)))
    steps = [runner.forward([Segment(0, 0, ids[:12])], [11])]  # a prefill, then one token at a time
    steps += [runner.forward([Segment(0, p, [ids[p]])], [0]) for p in range(12, 20)]
    assert torch.equal(torch.cat(steps), whole[11:])
    # row 1's prefill chunk beside row 0's decode token (rows out of order), in one step
    other = ids[::-1]
    both = runner.forward([Segment(1, 0, other[:9]), Segment(0, 20, [7])], [8, 9])
    alone = runner.forward([Segment(2, 0, other[:9])], [8])
    runner.copy_prefix(0, 2, 20)
    assert torch.equal(both[0], alone[0])
    assert torch.equal(both[1], runner.forward([Segment(2, 20, [7])], [0])[0])


def test_served_over_http_as_generated_alone(tmp_path, tok, monkeypatch):
    """Three prompts sent at once through qt-serve (native int4, continuous batching) and the openai client:
    each reply equals the same checkpoint's greedy generation of that prompt alone."""
    ext_or_skip()
    d = quantized(tmp_path, tok, "llama", "int4")
    prompts = [torch.randint(3, tok.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (4, 17, 33)]
    llm = LLM.load(str(d), max_seq_len=128)
    assert llm.engine.runner.__class__ is native.NativeRunner
    want = [llm.generate(p, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)).tokens for p in prompts]
    srv, gens = start_app(d, ("q",), ctx=128, max_batch=4)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")

        def complete(p):
            r = client.completions.create(model="q", prompt=p, max_tokens=32, temperature=0,
                                          extra_body={"ignore_eos": True, "skip_special_tokens": False})
            return r.choices[0].text

        with cf.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(complete, prompts))
    finally:
        srv.stop()
        gens["q"].engine.shutdown(True, 5)
    assert got == [tok.decode(w) for w in want]


def test_int4_keeps_a_gguf_files_blocks_exactly(tmp_path, tok):
    """Q4_1 / Q4_0 linears and a Q8_0 embedding (the tied LM head): `--to int4` stores those blocks as they
    are, so the checkpoint's dequantized weights equal the file's, bit for bit."""
    from gguf import GGMLQuantizationType as T

    from quant.gguf_export import export as gguf_export

    model = tiny_model(vocab_size=tok.vocab_size)
    src = checkpoint.save_checkpoint(tmp_path / "src", model, tok)
    types = {n: T.Q4_0 if "down_proj" in n else T.Q4_1 for n in model.state_dict() if "proj" in n}
    types["model.embed_tokens.weight"] = T.Q8_0
    path = gguf_export(src, tmp_path / "m.gguf", types)
    out = convert(path, "int4", tmp_path / "int4")
    q = json.loads((out / "config.json").read_text())["qt"]["quantization"]
    assert q["head"] == "int8" and "lm_head" in q["gguf_blocks"] and len(q["gguf_blocks"]) == 2 * 7 + 1
    ref = checkpoint.load(path).model.state_dict()  # the file's weights, dequantized by the gguf package
    got = checkpoint.load(out).model
    for name, m in got.named_modules():
        if isinstance(m, weights.QuantLinear):
            w = (kernels.dequantize_int4(m.qweight, m.scales, m.mins) if m.scheme == "int4"
                 else kernels.dequantize_int8(m.qweight, m.scales, m.mins))
            assert torch.equal(w, ref[f"{name}.weight"]), name


# ---- errors ------------------------------------------------------------------------------------


def test_a_build_for_instructions_this_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(fast, "cpu_flags", lambda: ("avx", "avx2"))
    with pytest.raises(QtError, match=r"QT_NATIVE_ISA=avx512_vnni needs avx512f, avx512bw, avx512dq, avx512vl, "
                                      r"avx512_vnni, which this CPU .* lacks"):
        native.extension("avx512_vnni")
    with pytest.raises(QtError, match="choose one of native, avx512_vnni, avx2, scalar"):
        native.extension("sse9")


def test_a_model_native_cannot_run(tmp_path, tok, monkeypatch):
    ext_or_skip()
    d = quantized(tmp_path, tok, "llama", "int4", group=16)  # groups narrower than native.cpp's blocks
    monkeypatch.setenv(weights.KERNEL_ENV, "native")
    with pytest.raises(QtError, match=r"QT_QUANT_KERNEL=native: .*group 16 .*multiples of 32"):
        checkpoint.load(d)
    monkeypatch.delenv(weights.KERNEL_ENV)
    ck = checkpoint.load(d)  # auto: torch's kernels, no error
    assert ck.runner is None and ck.config.quantization["kernel"] != "native"


def test_a_rounding_that_does_not_exist_is_named(tmp_path, tok, monkeypatch):
    ext_or_skip()
    d = quantized(tmp_path, tok, "llama", "int8")
    monkeypatch.setenv(native.ROUNDING_ENV, "thrice")
    with pytest.raises(QtError, match=r"QT_NATIVE_ROUNDING='thrice': choose one of twice, once"):
        checkpoint.load(d)
    monkeypatch.setenv(native.ROUNDING_ENV, "once")
    assert "llama.cpp's q8_1" in checkpoint.load(d).config.quantization["runs_as"]


def test_a_named_build_is_not_silently_dropped(tmp_path, tok, monkeypatch):
    d = quantized(tmp_path, tok, "llama", "int4")
    monkeypatch.setenv(native.ISA_ENV, "sse9")  # auto, but a build named by the user: its error surfaces
    with pytest.raises(QtError, match="QT_NATIVE_ISA='sse9': choose one of native"):
        checkpoint.load(d)

