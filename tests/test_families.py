"""Llama-3.x, Mistral, Qwen2 and Qwen3 checkpoints as `transformers` writes them, against `transformers` itself:
logits, cached decode past a sliding window, greedy decode over HTTP (alone and in a batch of mixed
lengths), and a directory written back that `transformers` reloads as the same architecture."""

import concurrent.futures as cf

import openai
import pytest
import torch
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from qt_serve import checkpoint
from qt_serve.config import ModelConfig
from qt_serve.errors import QtError
from qt_serve.generate import LLM
from qt_serve.kv import KVCache
from qt_serve.sampling import SamplingParams
from quant.convert import convert

from conftest import build_tokenizer, start_app

TOL = 1e-4
WINDOW = 16  # shorter than the test sequences, so the window cuts in
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama3": (LlamaForCausalLM, LlamaConfig(
        num_hidden_layers=2, rope_theta=50000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, **SHAPE)),
    "mistral": (MistralForCausalLM, MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **SHAPE)),
    # Qwen2 with its window on layers ≥ 1 only: a mix of full and sliding layers.
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(num_hidden_layers=3, rope_theta=1e6, tie_word_embeddings=True,
                                            use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                            **SHAPE)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(num_hidden_layers=2, head_dim=32, rope_theta=1e6,
                                            tie_word_embeddings=True, **SHAPE)),
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tok):
    """(name, transformers model, its saved directory with our test tokenizer beside it)."""
    cls, cfg = FAMILIES[request.param]
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    with torch.no_grad():  # larger-than-default weights, and non-trivial norms and biases
        for name, p in hf.named_parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    d = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(d)
    tok.save(d)
    return request.param, hf, d


def test_logits_match_transformers(family):
    name, hf, d = family
    qt = checkpoint.load(d).model
    assert qt.config.model_type == hf.config.model_type
    if name in ("mistral", "qwen2"):
        assert WINDOW in qt.config.windows()
    idx = torch.randint(0, hf.config.vocab_size, (2, 48))  # past the window and llama3's original context
    with torch.no_grad():
        diff = (hf(idx).logits - qt(idx)).abs().max().item()
    assert diff < TOL


def test_cached_decode_past_the_window_matches_transformers(family):
    _, hf, d = family
    qt = checkpoint.load(d).model
    ids = torch.randint(0, hf.config.vocab_size, (1, 44))
    with torch.no_grad():
        ref = hf(ids).logits[0]
        cache = KVCache(qt.config, batch=1, max_len=64)
        got = [qt(ids[:, :20], torch.arange(20)[None], cache)[0]]  # a prompt longer than the window
        got += [qt(ids[:, p:p + 1], torch.tensor([[p]]), cache)[0] for p in range(20, 44)]
    assert (torch.cat(got) - ref).abs().max().item() < TOL


def test_written_back_reloads_as_the_same_architecture(family, tmp_path, tok):
    _, hf, d = family
    qt = checkpoint.load(d).model
    checkpoint.save_checkpoint(tmp_path / "back", qt, tok)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(again) is type(hf)
    idx = torch.randint(0, hf.config.vocab_size, (1, 40))
    with torch.no_grad():
        assert (again(idx).logits - hf(idx).logits).abs().max().item() < TOL


def test_greedy_decode_over_http_matches_generate(family, tok):
    """64 greedy tokens through qt-serve's engine (KV cache, continuous batching) for prompts of mixed
    lengths sent at once, each equal to `transformers` `generate` on that prompt alone."""
    _, hf, d = family
    torch.manual_seed(1)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,)).tolist() for n in (5, 23, 40)]
    want = [hf_greedy(hf, p, 64) for p in prompts]
    srv, gens = start_app(d, ("m",), ctx=128, max_batch=4)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")

        def complete(p):
            r = client.completions.create(model="m", prompt=p, max_tokens=64, temperature=0,
                                          extra_body={"ignore_eos": True, "skip_special_tokens": False})
            return r.choices[0].text, r.usage.completion_tokens

        alone = complete(prompts[1])
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(complete, prompts))
    finally:
        srv.stop()
        gens["m"].engine.shutdown(True, 5)
    assert alone == together[1]
    for (text, n), ids in zip(together, want):
        assert n == 64 and text == tok.decode(ids)


def test_onnx_export_decodes_as_transformers(family):
    """The onnxruntime graph (quant/onnx.py: biases, per-head norms, GQA's local window) under the engine."""
    _, hf, d = family
    llm = LLM.load(convert(d, "onnx"), max_seq_len=128)
    prompt = torch.randint(3, hf.config.vocab_size, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    got = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)).tokens
    assert got == hf_greedy(hf, prompt, 40)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """`transformers` `generate`, greedy, n new tokens whatever they are (as qt's ignore_eos)."""
    hf.generation_config.eos_token_id = None  # a None passed to generate would mean "the model's"
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=GenerationConfig(
            max_new_tokens=n, do_sample=False, pad_token_id=0))
    return out[0, len(prompt):].tolist()


def test_unsupported_architecture_names_it_and_the_supported_ones():
    with pytest.raises(QtError, match=r"GemmaForCausalLM.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        ModelConfig.from_dict({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"})


def test_sharded_bf16_checkpoint_loads_shard_by_shard(tmp_path, monkeypatch):
    """A bf16 checkpoint `transformers` writes in several shards with an index: loaded in bf16 as it is, cast
    to fp32 on request, and each bad input (a missing shard, a dtype the device cannot run) said plainly."""
    cls, cfg = FAMILIES["qwen2"]
    cfg.vocab_size = 400
    torch.manual_seed(0)
    hf = cls(cfg).to(torch.bfloat16).eval()
    hf.save_pretrained(tmp_path / "m", max_shard_size="60KB")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "m" / "model.safetensors.index.json").exists()
    want = hf.state_dict()

    model = checkpoint.load(tmp_path / "m").model
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    fp32 = checkpoint.load(tmp_path / "m", dtype="float32").model
    assert all(t.dtype == torch.float32 and torch.equal(t, want[k].float()) for k, t in fp32.state_dict().items())

    real_linear = torch.nn.functional.linear

    def no_half(x, w, b=None):  # a device without fp16 kernels
        if x.dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real_linear(x, w, b)
    monkeypatch.setattr(torch.nn.functional, "linear", no_half)
    with pytest.warns(UserWarning, match="float16 cannot run on cpu.*as float32"):
        assert next(checkpoint.load(tmp_path / "m", dtype="float16").model.parameters()).dtype == torch.float32
    monkeypatch.undo()

    shards[1].unlink()
    with pytest.raises(QtError, match=f"{shards[1].name} listed in model.safetensors.index.json are missing"):
        checkpoint.load(tmp_path / "m")


def test_load_in_4bit_without_cuda_says_what_to_do(tmp_path):
    with pytest.raises(QtError, match=r"needs a CUDA GPU \(device is cpu\).*qt-quant MODEL --to int4"):
        checkpoint.load(tmp_path / "not-even-read", load_in="int4")


def test_config_round_trips_keep_what_transformers_reads(tmp_path):
    """A Mistral without a window keeps `sliding_window: null` (transformers would default to 4096 without it);
    a Llama config carrying a `sliding_window` key runs without one, as transformers' Llama does, and keeps it."""
    from transformers import AutoConfig

    shape = dict(SHAPE, vocab_size=64, num_hidden_layers=2)
    for cfg, windows in ((MistralConfig(sliding_window=None, **shape), [None, None]),
                         (LlamaConfig(**shape), [None, None])):
        d = cfg.to_dict()
        if cfg.model_type == "llama":
            d["sliding_window"] = 4096  # e.g. a Mistral-derived checkpoint relabelled as Llama
        qt = ModelConfig.from_dict(d)
        assert qt.windows() == windows
        (tmp_path / cfg.model_type).mkdir()
        qt.save(tmp_path / cfg.model_type / "config.json")
        back = AutoConfig.from_pretrained(tmp_path / cfg.model_type)
        assert type(back) is type(cfg) and getattr(back, "sliding_window", None) == d.get("sliding_window")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_cuda_without_cuda_says_so(tiny_ckpt):
    with pytest.raises(QtError, match="sees no CUDA GPU.*--device cpu"):
        checkpoint.load(tiny_ckpt, device="cuda")
