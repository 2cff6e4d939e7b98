"""The model against `transformers.LlamaForCausalLM` on the same weights, and its KV cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from qt_serve import checkpoint
from qt_serve.config import ModelConfig
from qt_serve.kv import KVCache, RaggedBatch
from qt_serve.model import Transformer

from conftest import tiny_model

TOL = 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_qt_checkpoint_loads_in_transformers(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    checkpoint.save_checkpoint(tmp_path / "ckpt", model)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    idx = torch.randint(0, 400, (2, 33))
    with torch.no_grad():
        diff = (hf(idx).logits - model(idx)).abs().max().item()
    assert diff < TOL


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}])
def test_transformers_checkpoint_loads_in_qt(tmp_path, tied, rope_scaling):
    torch.manual_seed(1)
    hf_cfg = LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_scaling=rope_scaling)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    qt = checkpoint.load(tmp_path / "hf").model
    idx = torch.randint(0, 320, (2, 150))  # past original_max_position_embeddings, so scaling matters
    with torch.no_grad():
        diff = (hf(idx).logits - qt(idx)).abs().max().item()
    assert diff < TOL


def test_cached_forward_equals_full_forward_for_ragged_batch():
    model = tiny_model()
    torch.manual_seed(0)
    a, b = torch.randint(0, 400, (1, 20)), torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        cache = KVCache(model.config, batch=2, max_len=64)
        # Row 0 prefills 10 tokens of a, row 1 prefills all 12 of b padded to the same width
        # (padding sits at positions past b's end, where it is overwritten or masked).
        idx = torch.cat([a[:, :12], b])
        pos = torch.arange(12).expand(2, 12)
        out = model(idx, pos, cache)
        assert (out[1] - full_b[0]).abs().max() < TOL
        assert (out[0] - full_a[0, :12]).abs().max() < TOL
        # Then both decode together, each at its own position.
        for t in range(12, 20):
            step = model(torch.stack([a[0, t], a[0, t]])[:, None], torch.tensor([[t], [t]]), cache)
            assert (step[0, 0] - full_a[0, t]).abs().max() < TOL


def test_logit_index_selects_rows():
    model = tiny_model()
    idx = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, logit_index=torch.tensor([[8], [3]]))
    assert last.shape == (2, 1, 400)
    assert torch.allclose(last[0, 0], full[0, 8], atol=1e-5) and torch.allclose(last[1, 0], full[1, 3], atol=1e-5)


def test_config_roundtrip_keeps_unknown_fields(tmp_path):
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                                 "num_hidden_layers": 1, "pretraining_tp": 1, "qt": {"output_bias": True}})
    cfg.save(tmp_path / "config.json")
    again = ModelConfig.load(tmp_path / "config.json")
    assert again == cfg and again.extra == {"pretraining_tp": 1} and again.output_bias
    assert Transformer(again).lm_head.bias is not None


def test_ragged_batch_equals_separate_sequences():
    """One forward packing decode tokens of rows 3, 4 (a batched run) and 2, a fresh prefill, and a chunk
    after a cached prefix, against each sequence run alone."""
    model = tiny_model()
    torch.manual_seed(3)
    a, b, c, d, e = (torch.randint(0, 400, (1, n)) for n in (9, 14, 6, 11, 4))
    with torch.no_grad():
        full = [model(x)[0] for x in (a, b, c, d, e)]
        cache = KVCache(model.config, batch=5, max_len=32)
        for row, x, n in ((1, b, 10), (2, c, 5), (3, d, 10), (4, e, 3)):  # cached prefixes
            model(x[:, :n], torch.arange(n)[None], cache.rows(row, 1))
        rows, positions = [3, 4, 0, 1, 2], [[10], [3], list(range(9)), list(range(10, 14)), [5]]
        idx = torch.cat([d[0, 10:], e[0, 3:], a[0], b[0, 10:], c[0, 5:]])[None]
        pos = torch.tensor([[p for ps in positions for p in ps]])
        out = model(idx, pos, RaggedBatch(cache, rows, positions))[0]
    assert (out[0] - full[3][10]).abs().max() < TOL
    assert (out[1] - full[4][3]).abs().max() < TOL
    assert (out[2:11] - full[0]).abs().max() < TOL
    assert (out[11:15] - full[1][10:]).abs().max() < TOL
    assert (out[15] - full[2][5]).abs().max() < TOL
