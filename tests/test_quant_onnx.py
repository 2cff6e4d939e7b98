"""quant.onnx: the exported graph against the torch model, the onnxruntime runner under the engine, bad input."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import build_tokenizer, recompute_greedy, start_app, tiny_model

from qt_serve.checkpoint import load, save_checkpoint
from qt_serve.errors import QtError
from qt_serve.generate import LLM
from qt_serve.runner import Segment
from qt_serve.sampling import SamplingParams
from quant.convert import convert


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tok = build_tokenizer()
    return save_checkpoint(tmp_path_factory.mktemp("onnx") / "tiny", tiny_model(vocab_size=tok.vocab_size), tok)


@pytest.fixture(scope="module")
def exported(source):
    """The tiny checkpoint as onnx (fp32), onnx-fp16, onnx-int4 and onnx-int8 checkpoint directories."""
    return {to: convert(source, to) for to in ("onnx", "onnx-fp16", "onnx-int4", "onnx-int8")}


def fake_quant(w: torch.Tensor, bits: int, block: int = 32) -> torch.Tensor:
    """Block quantization along the input dimension, rounded back to float, written out independently:
    int4 as llama.cpp's Q4_1 (16 levels over each block's [min, max]); int8 as onnxruntime's quantizer
    (256 levels over [min(lo, 0), max(hi, 0)] with an integer zero point)."""
    n, k = w.shape
    g = w.reshape(n, k // block, block)
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    if bits == 4:
        step = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))
        return (torch.round((g - lo) / step) * step + lo).reshape(n, k)
    hi, lo = hi.clamp(min=0), lo.clamp(max=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    zero = torch.round(-lo / scale).clamp(0, 255)
    return ((torch.clamp(torch.round(g / scale) + zero, 0, 255) - zero) * scale).reshape(n, k)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_layout_and_config(source, exported):
    d = exported["onnx-int4"]
    assert {p.name for p in d.iterdir()} >= {"config.json", "model.onnx", "model.onnx.data", "tokenizer.json",
                                             "generation_config.json"}
    q = json.loads((d / "config.json").read_text())["qt"]["quantization"]
    assert q["scheme"] == "onnx" and q["weights"] == "int4" and q["block_size"] == 32
    nodes = onnx.load(str(d / "model.onnx"), load_external_data=False).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 2 + 1  # q|k|v, o, gate|up, down per layer; the LM head at 8 bits (Q8_0 form)
    assert [a.i for n in nbits for a in n.attribute if a.name == "bits"] == [4] * 8 + [8]
    small = {n.input[1].split(".")[-1].split("_")[0] for n in nodes if n.op_type == "MatMul"}
    assert small == {"offsets", "block"}  # only the int4 minimum's terms: x's block sums, then @ offsets
    # fp32 weights (two tables when tied: the embedding and the LM head MatMul's transposed copy);
    # int4 (half a byte per weight + scales) is far smaller.
    size = {k: sum(f.stat().st_size for f in v.iterdir()) for k, v in exported.items()}
    assert size["onnx-int4"] < size["onnx-int8"] < size["onnx-fp16"] < size["onnx"]


def test_fp32_logits_match_torch(source, exported):
    """Prefill chunks, batched decode on rows of different lengths and a mixed step, against the torch
    model run on each whole sequence without a cache."""
    model = load(source).model
    runner = load(exported["onnx"]).runner()
    runner.allocate(3, 64)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (20, 5, 9)]

    def ref(row, upto):  # logits of the last token of seqs[row][:upto]
        with torch.no_grad():
            return model(torch.tensor([seqs[row][:upto]]))[0, -1]

    out = runner.forward([Segment(0, 0, seqs[0][:12])], list(range(12)))
    with torch.no_grad():
        torch.testing.assert_close(out, model(torch.tensor([seqs[0][:12]]))[0], atol=1e-4, rtol=1e-4)
    out = runner.forward([Segment(0, 12, seqs[0][12:19])], [6])  # a prompt continuation: past context
    torch.testing.assert_close(out[0], ref(0, 19), atol=1e-4, rtol=1e-4)
    runner.forward([Segment(1, 0, seqs[1][:4])], [])  # no logits wanted: the cache is still written
    runner.forward([Segment(2, 0, seqs[2][:8])], [7])
    out = runner.forward([Segment(0, 19, [seqs[0][19]]), Segment(1, 4, [seqs[1][4]]), Segment(2, 8, [seqs[2][8]])],
                         [0, 1, 2])  # one decode batch over rows of lengths 20, 5, 9
    torch.testing.assert_close(out, torch.stack([ref(0, 20), ref(1, 5), ref(2, 9)]), atol=1e-4, rtol=1e-4)
    seqs[0].append(7)
    seqs[1] += [8, 9, 10]
    out = runner.forward([Segment(1, 5, [8, 9, 10]), Segment(0, 20, [7])], [3, 2])  # mixed, logits out of order
    torch.testing.assert_close(out, torch.stack([ref(0, 21), ref(1, 8)]), atol=1e-4, rtol=1e-4)
    runner.copy_prefix(1, 2, 8)  # row 2 := row 1's 8 positions, then decode on it
    out = runner.forward([Segment(2, 8, [11])], [0])
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(torch.tensor([seqs[1][:8] + [11]]))[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("to,bits,bound", [("onnx-int4", 4, 0.1), ("onnx-int8", 8, 0.1)])
def test_quantized_logits(source, exported, to, bits, bound):
    """Against the torch model with its weights block-quantized by `fake_quant`: the remaining difference is
    onnxruntime rounding activations to int8 (accuracy_level 4). The tiny model's N(0, 0.3) weights are far
    rougher than a trained model's, hence the loose bound; int4 is much closer to its own rounding than to fp32."""
    model = load(source).model
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = model(ids)[0]
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):  # a new tensor: the tied embedding table stays as it was
                mod.weight = torch.nn.Parameter(fake_quant(mod.weight, bits))
        rounded = model(ids)[0]
    runner = load(exported[to]).runner()
    runner.allocate(1, 64)
    out = runner.forward([Segment(0, 0, ids[0].tolist())], list(range(40)))
    assert rel(out, rounded) < bound
    if bits == 4:
        assert rel(out, rounded) < rel(out, fp32) / 5


def test_fp16_graph(source, exported):
    """The fp16 graph (for the CUDA execution provider) runs on CPU too: an fp16 cache, logits near fp32's."""
    runner = load(exported["onnx-fp16"]).runner()
    runner.allocate(2, 64)
    assert runner.k.dtype == torch.float16
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(3))
    out = runner.forward([Segment(1, 0, ids[0, :20].tolist())], [19])
    out = torch.cat([out, runner.forward([Segment(1, 20, ids[0, 20:].tolist())], list(range(10)))])
    with torch.no_grad():
        ref = load(source).model(ids)[0, 19:]
    assert out.dtype == torch.float32 and rel(out, ref) < 0.01


def test_int4_keeps_a_gguf_files_own_blocks(tmp_path):
    """A GGUF with Q4_1, Q4_0 and Q8_0 weights: onnx-int4 serves those blocks as stored (the only difference
    from the dequantized model is onnxruntime's int8 activations), where quantizing the dequantized weights
    again rounds them twice."""
    from gguf import GGMLQuantizationType as T

    from quant.gguf_export import export as gguf_export

    tok = build_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)  # trained-model-like logits, so the comparison is about the weights
    src = save_checkpoint(tmp_path / "src", model, tok)
    types = {n: T.Q4_0 if "down_proj" in n else T.Q4_1 for n in model.state_dict() if "proj" in n}
    types["model.embed_tokens.weight"] = T.Q8_0
    path = gguf_export(src, tmp_path / "m.gguf", types)
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load(path).model(ids)[0]  # the file's weights, dequantized by the gguf package
    kept = convert(path, "onnx-int4", tmp_path / "kept")
    assert load(kept).config.quantization["from_gguf"] == ["Q4_0", "Q4_1", "Q8_0"]
    again = convert(save_checkpoint(tmp_path / "deq", load(path).model, tok), "onnx-int4", tmp_path / "again")
    err = {}
    for name, d in (("kept", kept), ("again", again)):
        runner = load(d).runner()
        runner.allocate(1, 64)
        err[name] = rel(runner.forward([Segment(0, 0, ids[0].tolist())], list(range(40))), ref)
    # Re-quantizing reproduces a block only when it spans all 16 levels (Q4_1 blocks do, Q4_0's need not)
    assert err["kept"] < 0.02 and err["kept"] < err["again"] / 2, err


def test_greedy_through_engine_equals_recompute(source, exported):
    llm = LLM.load(exported["onnx"], max_seq_len=128)
    for prompt in ([5, 17, 99, 3], list(range(30, 90))):
        got = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)).tokens
        assert got == recompute_greedy(source, prompt, 24)


def test_served_over_http_with_continuous_batching(source, exported):
    """Four concurrent greedy streams through the OpenAI client on the int8 graph (4 cache rows): each reply
    is the one the same server gives the prompt alone."""
    import concurrent.futures

    import openai

    srv, gens = start_app(exported["onnx-int8"], ctx=128, max_batch=4)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")

        def ask(prompt):
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.choices[0].text

        prompts = ["the cat", "a dog ran far away", "hello", "one two three four five six"]
        alone = [ask(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, prompts))
        assert together == alone and all(alone)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=8, stream=True)
        assert sum(1 for _ in chat) > 1
    finally:
        srv.stop()
        for g in gens.values():
            g.engine.shutdown(True, 5)


def test_bad_input(source, exported, tmp_path):
    with pytest.raises(QtError, match="already quantized"):
        convert(exported["onnx"], "onnx-int4")
    with pytest.raises(QtError, match="power of two"):
        convert(source, "onnx-int4", tmp_path / "x", group_size=24)
    # a graph without the KV-cache inputs qt's runner drives
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bare / f).write_bytes((exported["onnx"] / f).read_bytes())
    x = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.INT64, ["b", "s"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(bare / "model.onnx"))
    with pytest.raises(QtError, match="lacks the inputs"):
        LLM.load(bare)
    (bare / "model.onnx").unlink()
    with pytest.raises(QtError, match="model.onnx is missing"):
        LLM.load(bare)
    with pytest.raises(QtError, match="leave out --dtype"):
        load(exported["onnx"], dtype="bfloat16")
