"""GGUF import of the Qwen2, Qwen3, Llama 3.1 (rope_freqs) and Mistral files llama.cpp's convert_hf_to_gguf.py
writes, against the `transformers` models they are written from, and of SentencePiece tokenizers against
the `sentencepiece` library itself."""

import io
import json
import math
import random

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from sentencepiece import sentencepiece_model_pb2

from qt_serve import checkpoint, gguf_import
from qt_serve.config import ModelConfig
from qt_serve.errors import QtError
from qt_serve.model import rope_inv_freq

from test_gguf import add_shape, permute, write_gguf
from conftest import tiny_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", " one leading space", "   three leading",
         "double  space", "trailing space ", "new\nline", "\n\nstarts with newlines", "tabs\tand\r\nCRLF",
         "digits 1234567890 and 3.14159", "punctuation!?;:()[]{}<>--", "don't it's we'll", "café naïve résumé",
         "中文 東京", "emoji 😀🚀 and 🦙", "ǅ ß Ω ∑ unseen", "mixed é中😀x", "e\u0301 (decomposed é)", "", " ", "\n"]


# ---- a SentencePiece model trained here, and GGUF files as the converter writes them ------------------------

@pytest.fixture(scope="module")
def sp():
    """A BPE SentencePiece model trained like Llama 2's (identity normalization, spaces kept, digits split,
    byte fallback, <unk> <s> </s> = 0 1 2) on a few KB of text."""
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog and then some more words to learn from here café naïve "
             "résumé 中文 東京 hello world 12345 3.14 2024 don't it's (a) [b] {c} -- !? ; : , . the the of to in").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + rng.choice(["", ".", "!", "  x"])
             for _ in range(300)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=400, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.999, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def sentencepiece_vocab(sp, add_bos=True):
    """The tokenizer metadata convert_hf_to_gguf's `_set_vocab_sentencepiece` writes, as a writer step."""
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]  # UNKNOWN, CONTROL, UNUSED, BYTE, NORMAL

    def add(w):
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types(types)
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(add_bos)
    return add


def byte_level_vocab(tokenizer, pre="qwen2"):
    """A byte-level BPE ('gpt2') tokenizer's metadata with llama.cpp pre-tokenizer `pre`, as a writer step."""
    spec = json.loads(tokenizer.tok.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if i in tokenizer.special_ids else 1 for i in range(len(tokens))])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
        w.add_eos_token_id(tokenizer.eos_id)
    return add


def llama3_rope_factors(dim, rope) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs for rope_type llama3: per frequency the divisor f, used as inv_freq / f.
    (The converter takes original_max_position_embeddings from config.json's top level, 8192 when absent:
    the value used here.)"""
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_hf_gguf(path, hf, arch, vocab, sliding_window=None):
    """`hf` as convert_hf_to_gguf.py writes it in F32: its metadata keys, gguf's own tensor-name map, the Q/K rows
    (weights and biases) permuted for "llama" only, and rope_freqs for a llama3 rope scaling."""
    cfg = hf.config
    rope = cfg.rope_parameters
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    add_shape(w, cfg, rope["rope_theta"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "llama":  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    vocab(w)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     cfg.num_hidden_layers)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, rope))
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            a = permute(a, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_hf(cls, **kw):
    """A tiny fp32 `transformers` model with every parameter random (biases and norm weights too)."""
    config_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(config_cls(**{**base, **kw})).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return hf


def logits_diff(ck, hf) -> float:
    """Max abs difference of the two models' logits on a (2, 40) batch."""
    idx = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((ck.model(idx) - hf(idx).logits).abs().max())


# ---- the families ---------------------------------------------------------------------------------------------

def test_qwen2_gguf(tmp_path, tokenizer):
    hf = random_hf("Qwen2ForCausalLM", vocab_size=tokenizer.vocab_size, rope_theta=1e6)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None and hf.model.layers[0].self_attn.o_proj.bias is None
    ck = checkpoint.load(write_hf_gguf(tmp_path / "m.gguf", hf, "qwen2", byte_level_vocab(tokenizer)))
    assert ck.config.model_type == "qwen2" and ck.config.qkv_bias and not ck.config.o_bias
    assert ck.config.rope_theta == 1e6 and not ck.config.tie_word_embeddings
    assert logits_diff(ck, hf) < 1e-4
    # the 'qwen2' pre-tokenizer (digits alone, NFC) as transformers' Qwen2 tokenizer over the same vocabulary
    spec = json.loads(tokenizer.tok.to_str())["model"]
    ref = transformers.Qwen2Tokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    for text in TEXTS:
        assert ck.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_end_of_turn_ids_stop_generation(tmp_path, tokenizer):
    """llama.cpp's eot / eom ids (Llama 3's <|eot_id|>, <|eom_id|>) join the eos id as stop tokens."""
    from qt_serve.generate import LLM
    from qt_serve.sampling import SamplingParams

    hf = random_hf("Qwen2ForCausalLM", vocab_size=tokenizer.vocab_size)
    eot = tokenizer.token_id("<|endoftext|>")

    def vocab(w):
        byte_level_vocab(tokenizer)(w)
        w.add_eot_token_id(eot)
    llm = LLM.load(write_hf_gguf(tmp_path / "m.gguf", hf, "qwen2", vocab))
    assert llm.ckpt.config.eos_token_ids == [tokenizer.eos_id, eot]
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, logit_bias={eot: 100}))
    assert out.tokens == [eot] and out.finish_reason == "stop"


def test_qwen3_gguf(tmp_path, tokenizer):
    # head_dim 32 ≠ hidden/heads = 16 (as in Qwen3), tied embeddings (as the small Qwen3s)
    hf = random_hf("Qwen3ForCausalLM", vocab_size=tokenizer.vocab_size, head_dim=32, tie_word_embeddings=True)
    ck = checkpoint.load(write_hf_gguf(tmp_path / "m.gguf", hf, "qwen3", byte_level_vocab(tokenizer)))
    assert ck.config.model_type == "qwen3" and ck.config.qk_norm and ck.config.head_dim == 32
    assert ck.config.tie_word_embeddings
    sd = ck.model.state_dict()
    assert torch.equal(sd["model.layers.1.self_attn.k_norm.weight"], hf.model.layers[1].self_attn.k_norm.weight)
    assert logits_diff(ck, hf) < 1e-4


def test_llama31_gguf_with_rope_freqs(tmp_path, sp):
    hf = random_hf("LlamaForCausalLM", vocab_size=sp.get_piece_size(), head_dim=32, max_position_embeddings=16384,
                   rope_parameters={"rope_theta": 500000.0, **LLAMA3}, attention_bias=True)
    assert not torch.equal(hf.model.rotary_emb.inv_freq, rope_inv_freq(ModelConfig(
        hidden_size=64, num_attention_heads=4, head_dim=32, rope_theta=500000.0)))  # the scaling changes some
    ck = checkpoint.load(write_hf_gguf(tmp_path / "m.gguf", hf, "llama", sentencepiece_vocab(sp)))
    assert ck.config.model_type == "llama" and ck.config.rope_scaling == LLAMA3 and ck.config.attention_bias
    assert logits_diff(ck, hf) < 1e-4
    assert ck.tokenizer.encode("Hello world") == [sp.bos_id(), *sp.encode("Hello world")]


def test_mistral_gguf_with_sliding_window(tmp_path, sp):
    hf = random_hf("MistralForCausalLM", vocab_size=sp.get_piece_size(), sliding_window=16)
    ck = checkpoint.load(write_hf_gguf(tmp_path / "m.gguf", hf, "llama", sentencepiece_vocab(sp), sliding_window=16))
    assert ck.config.model_type == "mistral" and ck.config.windows() == [16, 16]
    assert logits_diff(ck, hf) < 1e-4
    # without the key (what the converter writes for Mistral) the file is a Llama with full attention,
    # which on 40 tokens computes other logits
    ck = checkpoint.load(write_hf_gguf(tmp_path / "l.gguf", hf, "llama", sentencepiece_vocab(sp)))
    assert ck.config.model_type == "llama" and ck.config.sliding_window is None
    assert logits_diff(ck, hf) > 1e-2


# ---- SentencePiece tokenizers ----------------------------------------------------------------------------------

def read_tokenizer(path, vocab):
    w = gguf.GGUFWriter(str(path), "llama")
    vocab(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_import.read_tokenizer(gguf.GGUFReader(str(path)), path)


@pytest.mark.parametrize("add_bos", [True, False])
def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path, sp, add_bos):
    tok = read_tokenizer(tmp_path / "t.gguf", sentencepiece_vocab(sp, add_bos))
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.special_ids == {0, 1, 2}
    bos = [sp.bos_id()] if add_bos else []
    fallback = 0
    for text in TEXTS:
        ids = sp.encode(text)
        fallback += any(sp.is_byte(i) for i in ids)
        assert tok.encode(text) == bos + ids, (text, tok.tok.encode(text).tokens, sp.encode(text, out_type=str))
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text == sp.decode(ids)
    assert fallback >= 3  # emoji and unseen characters came out as <0xXX> byte pieces


def test_sentencepiece_tokenizer_without_space_prefix(tmp_path, sp):
    def vocab(w):
        sentencepiece_vocab(sp, add_bos=False)(w)
        w.add_add_space_prefix(False)
    tok = read_tokenizer(tmp_path / "t.gguf", vocab)
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False  # the same model without the "▁" in front
    ref = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text


# ---- rope_freqs -> rope_scaling --------------------------------------------------------------------------------

@pytest.mark.parametrize("theta, head_dim", [(10000.0, 16), (10000.0, 64), (500000.0, 32), (500000.0, 128)])
@pytest.mark.parametrize("factor, lo, hi, old", [(8, 1, 4, 8192), (32, 1, 4, 8192), (4, 2, 8, 2048),
                                                  (16, 1, 2, 512), (2, 1, 1.5, 100), (3, 0.5, 3, 1000)])
def test_llama3_rope_scaling_reproduces_the_factors(theta, head_dim, factor, lo, hi, old):
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": float(factor), "low_freq_factor": float(lo),
            "high_freq_factor": float(hi), "original_max_position_embeddings": old}
    cfg = ModelConfig(hidden_size=2 * head_dim, num_attention_heads=2, rope_theta=theta)
    f = llama3_rope_factors(head_dim, rope)
    got = gguf_import.llama3_rope_scaling(f, cfg, "m.gguf")
    if (lo, hi, old) == (1, 4, 8192) and f.max() == factor:
        assert got == {k: v for k, v in rope.items() if k != "rope_theta"}  # the standard values, not a fit
    want = rope_inv_freq(cfg) / torch.from_numpy(f)
    cfg.rope_scaling = got
    torch.testing.assert_close(rope_inv_freq(cfg), want, rtol=1e-4, atol=0)


def test_llama3_rope_scaling_refuses_what_it_cannot_reproduce():
    cfg = ModelConfig(hidden_size=64, num_attention_heads=2)
    assert gguf_import.llama3_rope_scaling(np.ones(16), cfg, "m.gguf") is None
    with pytest.raises(QtError, match="match no Llama-3 rope scaling"):
        gguf_import.llama3_rope_scaling(np.array([1.0, 8.0] * 8), cfg, "m.gguf")  # not monotone
    with pytest.raises(QtError, match="holds 8 factors, expected 16"):
        gguf_import.llama3_rope_scaling(np.ones(8), cfg, "m.gguf")


# ---- what qt does not import -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(arch="phi3"), "GGUF architecture 'phi3' is not supported; qt imports 'llama', 'qwen2', 'qwen3'"),
    (dict(tok_model="bert"), "GGUF tokenizer model 'bert' is not supported; qt rebuilds 'gpt2' .* and 'llama'"),
    (dict(tok_model="t5"), "GGUF tokenizer model 't5' is not supported"),
    (dict(tok_model="llama"), "SentencePiece .* needs one tokenizer.ggml.scores entry per token"),
])
def test_unsupported_gguf(tmp_path, tokenizer, kw, message):
    path = write_gguf(tmp_path / "m.gguf", tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, **kw)
    with pytest.raises(QtError, match=message):
        checkpoint.load(path)
