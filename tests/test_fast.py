"""fast.py's decode-time swaps: every forced kernel path computes what the plain model computes.

The reference is always independent of the swap: a deep copy of the model before swapping
(nn.Linear, F.linear everywhere), or transformers' LlamaForCausalLM on the same weights.
"""

import copy
import json

import pytest
import torch

from qt_serve import fast
from qt_serve.kv import KVCache, RaggedBatch

from conftest import tiny_model

TOL = dict(atol=1e-4, rtol=1e-4)
PATHS = [(v, m) for v in fast.GEMV_PATHS for m in fast.GEMM_PATHS]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Measured choices go to a temporary $QT_HOME; no path forced from the environment."""
    monkeypatch.setenv("QT_HOME", str(tmp_path))
    monkeypatch.delenv("QT_GEMV", raising=False)
    monkeypatch.delenv("QT_GEMM", raising=False)


def swapped_pair(gemv, gemm, threads=2, **kw):
    ref = tiny_model(seed=1, **kw)
    fast_model = fast.optimize_for_decode(copy.deepcopy(ref), threads=threads, gemv=gemv, gemm=gemm)
    return ref, fast_model


@pytest.mark.parametrize("gemv,gemm", PATHS)
def test_every_path_matches_the_plain_model(gemv, gemm):
    ref, fm = swapped_pair(gemv, gemm)
    assert fm.decode_paths["gemv"] == gemv and fm.decode_paths["gemm"] == gemm
    n_swapped = sum(isinstance(m, fast.DecodeLinear) for m in fm.modules())
    assert n_swapped == 2 * 7 + 1  # 7 projections per layer and the LM head
    expected_gemv = gemv if fast.mkldnn_ok() or gemv != "mkldnn" else "linear"
    assert all(m.gemv == expected_gemv for m in fm.modules() if isinstance(m, fast.DecodeLinear))
    cfg = ref.config
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 11), generator=g)
    with torch.inference_mode():
        # no cache: full causal forward (M = 11 rows)
        torch.testing.assert_close(fm(prompt), ref(prompt), **TOL)
        # cached prefill, then batch-1 cached decode (M = 1: the gemv path), tokens from the reference
        caches = [KVCache(cfg, 1, 64) for _ in range(2)]
        pos = torch.arange(11)[None]
        a, b = (m(prompt, pos, c) for m, c in zip((ref, fm), caches))
        torch.testing.assert_close(b, a, **TOL)
        tok = a[:, -1:].argmax(-1)
        for step in range(6):
            p = torch.tensor([[11 + step]])
            a, b = (m(tok, p, c) for m, c in zip((ref, fm), caches))
            torch.testing.assert_close(b, a, **TOL)
            tok = a[:, -1:].argmax(-1)
        # batched decode: 3 rows at different lengths, one token each (M = 3: the gemm path)
        caches = [KVCache(cfg, 3, 64) for _ in range(2)]
        prompts = torch.randint(0, cfg.vocab_size, (3, 9), generator=g)
        for m, c in zip((ref, fm), caches):
            m(prompts, torch.arange(9).expand(3, 9), c.rows(0, 3))
        toks, pos = torch.tensor([[5], [7], [9]]), torch.tensor([[9], [7], [4]])  # rows rewind to ragged lengths
        a, b = (m(toks, pos, c.rows(0, 3)) for m, c in zip((ref, fm), caches))
        torch.testing.assert_close(b, a, **TOL)
        # a ragged step: row 0 decodes one token while row 1 prefills a chunk after its cached prefix
        a, b = (m(torch.tensor([[3, 4, 5, 6]]), torch.tensor([[10, 7, 8, 9]]), RaggedBatch(c, [0, 1], [[10], [7, 8, 9]]))
                for m, c in zip((ref, fm), caches))
        torch.testing.assert_close(b, a, **TOL)
        # no rows at all (a step whose logit_index is empty mid-prefill)
        empty = torch.zeros(1, 0, cfg.hidden_size)
        assert fm.lm_head(empty).shape == ref.lm_head(empty).shape == (1, 0, cfg.vocab_size)


@pytest.mark.parametrize("gemv", fast.GEMV_PATHS)
def test_paths_with_bias_and_odd_widths_match(gemv):
    # 3 slices do not divide the widths (64, 128, 400): split/rows fall back per layer; biases are added
    ref, fm = swapped_pair(gemv, "auto", threads=3, attention_bias=True, mlp_bias=True)
    prompt = torch.randint(0, ref.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        caches = [KVCache(ref.config, 1, 32) for _ in range(2)]
        for step in range(5):  # one token at a time: every product is one row
            a, b = (m(prompt[:, step:step + 1], torch.tensor([[step]]), c) for m, c in zip((ref, fm), caches))
            torch.testing.assert_close(b, a, **TOL)


@pytest.mark.skipif(not fast.mkldnn_ok(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("rows", [2, 15, 16, 17, 40])
def test_multi_row_product_pads_to_a_multiple_of_16_and_slices_back(rows):
    # Row counts are rounded up so oneDNN caches few kernels; the padding must never leak out.
    torch.manual_seed(rows)
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        got = fast.DecodeLinear(lin, "linear", "mkldnn", 2)(x)
        want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert got.shape == (rows, 96)
    torch.testing.assert_close(got, want, **TOL)


def test_matches_transformers_llama():
    """Independent of qt's own model code: HF LlamaForCausalLM on the same weights, prefill + cached decode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qt_serve.checkpoint import state_dict_for_saving

    model = tiny_model(seed=2)
    cfg = model.config.to_dict()
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "qt"})).eval()
    hf.load_state_dict(state_dict_for_saving(model), strict=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = hf(ids).logits  # full recompute, no cache
        for gemv in fast.GEMV_PATHS:
            fm = fast.optimize_for_decode(copy.deepcopy(model), threads=2, gemv=gemv, gemm="auto")
            cache = KVCache(fm.config, 1, 32)
            got = [fm(ids[:, :8], torch.arange(8)[None], cache)]
            for p in range(8, 12):
                got.append(fm(ids[:, p:p + 1], torch.tensor([[p]]), cache))
            torch.testing.assert_close(torch.cat(got, 1), want, **TOL)


def test_env_var_forces_a_path_and_bad_values_fail(monkeypatch):
    monkeypatch.setenv("QT_GEMV", "transposed")
    monkeypatch.setenv("QT_GEMM", "linear")
    m = fast.optimize_for_decode(tiny_model(), threads=2)
    assert m.decode_paths == {"gemv": "transposed", "gemm": "linear", "source": "forced"}
    assert {x.gemv for x in m.modules() if isinstance(x, fast.DecodeLinear)} == {"transposed"}
    monkeypatch.setenv("QT_GEMV", "fastest")
    with pytest.raises(ValueError, match="QT_GEMV"):
        fast.optimize_for_decode(tiny_model(), threads=2)


def test_auto_measures_once_and_caches_under_qt_home(tmp_path, monkeypatch):
    monkeypatch.setattr(fast, "noisy", lambda times: False)  # a busy test machine must not skip the cache
    first = fast.optimize_for_decode(tiny_model(), threads=2)
    assert first.decode_paths["source"] == "measured"
    assert first.decode_paths["gemv"] in fast.GEMV_PATHS and first.decode_paths["gemm"] in fast.GEMM_PATHS
    saved = json.loads((tmp_path / fast.CACHE_FILE).read_text())
    (entry,) = saved.values()
    assert entry["gemv"] == first.decode_paths["gemv"] and entry["flags"] == " ".join(fast.cpu_flags())
    assert set(entry["ratios"]) >= {"linear", "transposed", "split", "rows"}
    second = fast.optimize_for_decode(tiny_model(), threads=2)
    assert second.decode_paths == {**first.decode_paths, "source": "cached"}
    # another thread count (or CPU, ISA, torch, dtype, shapes) is another key: measured again
    assert fast.optimize_for_decode(tiny_model(), threads=3).decode_paths["source"] == "measured"


def test_a_disturbed_measurement_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(fast, "noisy", lambda times: True)
    assert fast.optimize_for_decode(tiny_model(), threads=2).decode_paths["source"] == "measured"
    assert not (tmp_path / fast.CACHE_FILE).exists()
    assert fast.optimize_for_decode(tiny_model(), threads=2).decode_paths["source"] == "measured"


def test_swap_keeps_tied_weights_and_the_state_dict():
    model = tiny_model()
    keys = set(model.state_dict())
    fast.optimize_for_decode(model, threads=2, gemv="rows", gemm="linear")
    assert set(model.state_dict()) == keys
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # the rows layout is a view of the weight itself: no second copy of the tied table
    assert model.lm_head.w_one.untyped_storage().data_ptr() == model.lm_head.weight.untyped_storage().data_ptr()


def test_a_swapped_model_deep_copies_with_its_ties():
    ref = tiny_model()
    model = fast.optimize_for_decode(copy.deepcopy(ref), threads=2, gemv="mkldnn", gemm="mkldnn")  # packed weights
    twin = copy.deepcopy(model)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    assert twin.lm_head.weight is not model.lm_head.weight
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(twin(ids), ref(ids), **TOL)
        torch.testing.assert_close(twin(ids[:, :1]), ref(ids[:, :1]), **TOL)


def test_release_openmp_threads_lets_this_threads_team_go():
    import os
    import threading
    import time

    if torch.get_num_threads() < 2 or not os.path.exists("/proc/self/task"):
        pytest.skip("needs Linux and 2+ torch threads")
    seen = {}

    def tasks() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    def worker():
        # The team is the threads this region starts, by id: other threads of the process (a server's, a
        # progress bar's monitor) may come and go meanwhile without changing the answer.
        before = tasks()
        x = torch.ones(1 << 22)
        (x * 2).sum()  # large enough to run as an OpenMP parallel region: this thread gets a team
        seen["team"] = team = tasks() - before
        seen["released"] = fast.release_openmp_threads()
        deadline = time.monotonic() + 10  # the released workers exit on their own, a moment later
        while team & tasks() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["left"] = team & tasks()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if not seen["released"]:
        pytest.skip("no libgomp/libomp with omp_pause_resource_all in this process")
    assert len(seen["team"]) >= torch.get_num_threads() - 1 and not seen["left"]
