"""LoRA adapters served on a shared base (qt_serve/lora.py), against peft + transformers.

The references are independent of qt: a tiny random `transformers.LlamaForCausalLM` saved with
save_pretrained, two adapters made and saved by `peft` (init_lora_weights=False, so B is not
zero), and peft's own `PeftModel.from_pretrained` on those files for logits and for greedy
decoding (the whole sequence recomputed for every token, no cache).
"""

import json
import shutil

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from qt_serve import checkpoint, lora
from qt_serve.api import create_app, load_generators
from qt_serve.engine import Engine
from qt_serve.errors import QtError
from qt_serve.runner import Segment, TorchRunner
from qt_serve.sampling import SamplingParams

from conftest import Server, build_tokenizer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Two adapters unlike each other: every projection at r=4; and q, v and the (tied) LM head at r=2, rsLoRA.
ADAPTERS = {"mine": dict(r=4, lora_alpha=8, target_modules=ALL),
            "other": dict(r=2, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "lm_head"])}
N = 8  # new tokens per greedy check


def hf_tiny(seed: int, **kw) -> LlamaForCausalLM:
    cfg = dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
               eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # larger-than-default weights so greedy decoding is not one repeated token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def save_adapter(base: LlamaForCausalLM, out, seed: int, **config):
    torch.manual_seed(seed)
    peft = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
    peft.save_pretrained(out)
    peft.unload()  # the base as it was, for the next adapter
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"base": HF dir with the test tokenizer, "mine": adapter dir, "other": adapter dir}."""
    root = tmp_path_factory.mktemp("lora")
    tok = build_tokenizer()
    base = hf_tiny(0, vocab_size=tok.vocab_size)
    base.save_pretrained(root / "base")
    tok.save(root / "base")
    out = {"base": root / "base"}
    for seed, (name, config) in enumerate(ADAPTERS.items(), 1):
        out[name] = save_adapter(base, root / name, seed, **config)
    return out


@pytest.fixture(scope="module")
def reference(files):
    """name -> peft's model on the saved files ("base": transformers alone)."""
    def fresh():
        return LlamaForCausalLM.from_pretrained(files["base"], dtype=torch.float32).eval()

    return {"base": fresh(), **{n: PeftModel.from_pretrained(fresh(), files[n]).eval() for n in ADAPTERS}}


def ref_greedy(model, prompt: list[int], n: int = N) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def runner_with(files, optimize: bool) -> TorchRunner:
    ckpt = checkpoint.load(files["base"])
    runner = TorchRunner(ckpt.model, optimize, [lora.load(files[n], ckpt, n) for n in ADAPTERS])
    runner.allocate(4, 64)
    return runner


@pytest.mark.parametrize("optimize", [False, True])
def test_logits_equal_peft(files, reference, optimize):
    """Every position's logits, adapter by adapter, each prompt prefilled in one packed forward (the LM head on
    gathered rows) and then one decode step of all three rows together (a (B, 1) batch)."""
    runner = runner_with(files, optimize)
    prompts = {name: [5 + 7 * i + 3 * j for j in range(11)] for i, name in enumerate(["base", *ADAPTERS])}
    for row, (name, ids) in enumerate(prompts.items()):
        got = runner.forward([Segment(row, 0, ids[:-1], row)], list(range(len(ids) - 1)))
        with torch.no_grad():
            want = reference[name](torch.tensor([ids])).logits[0]
        assert (got - want[:-1]).abs().max() < 1e-4, name
    last = [Segment(row, len(ids) - 1, ids[-1:], row) for row, ids in enumerate(prompts.values())]
    got = runner.forward(last, [0, 1, 2])
    for row, name in enumerate(prompts):
        with torch.no_grad():
            want = reference[name](torch.tensor([prompts[name]])).logits[0, -1]
        assert (got[row] - want).abs().max() < 1e-4, name
    assert (got[1] - got[0]).abs().max() > 0.1 and (got[2] - got[0]).abs().max() > 0.1  # the adapters matter


def engine_with(files, max_batch: int, prefill_chunk: int = 256) -> Engine:
    ckpt = checkpoint.load(files["base"])
    adapters = [lora.load(files[n], ckpt, n) for n in ADAPTERS]
    return Engine.load(ckpt, adapters=adapters, max_batch=max_batch, prefill_chunk=prefill_chunk, thread=False)


def run(engine: Engine, jobs: list[tuple[list[int], int]]) -> list[list[int]]:
    """Greedy tokens of (prompt, adapter) jobs submitted together, stepped to the end."""
    out = [[] for _ in jobs]
    params = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(jobs):
        engine.submit(prompt, params, lambda d, i=i: d.token and out[i].append(d.token.token), adapter=adapter)
    while engine.busy:
        engine.run_once()
    return out


def test_mixed_batch_equals_alone_and_peft(files, reference):
    """Base rows and two adapters in the same steps (prompts of several lengths, prefill chunks shared with
    decoding rows) give each row what it gets alone, and what peft's greedy decoding gives."""
    names = ["base", *ADAPTERS]
    jobs = [([3 + (5 * i + 11 * j) % 390 for j in range(4 + 5 * i)], i % 3) for i in range(6)]
    together = run(engine_with(files, max_batch=4, prefill_chunk=9), jobs)
    alone = [run(engine_with(files, max_batch=1), [job])[0] for job in jobs]
    assert together == alone
    for (prompt, adapter), got in zip(jobs, together):
        assert got == ref_greedy(reference[names[adapter]], prompt), names[adapter]
    plain = Engine.load(checkpoint.load(files["base"]), max_batch=1, thread=False)  # no adapters attached at all
    assert [run(plain, [job])[0] for job in jobs if job[1] == 0] == [t for t, j in zip(together, jobs) if j[1] == 0]
    assert len({tuple(together[i]) for i in range(3)}) == 3  # three models, three continuations


def test_cached_prefix_is_not_shared_across_adapters(files, reference):
    """A row's keys/values from the base are not reused for the same prompt through an adapter (nor back)."""
    engine = engine_with(files, max_batch=1)
    prompt = [7 + 3 * j for j in range(20)]
    for adapter, name in [(0, "base"), (1, "mine"), (0, "base"), (2, "other")]:
        assert run(engine, [(prompt, adapter)])[0] == ref_greedy(reference[name], prompt), name
    run(engine, [(prompt, 2)])
    assert engine.reused_tokens == len(prompt) - 1  # the same adapter again does reuse its own


@pytest.fixture(scope="module")
def server(files):
    gens = load_generators([f"base={files['base']}"], max_seq_len=128, max_batch=4,
                           loras=[f"mine={files['mine']}", f"other={files['other']}@base"])
    srv = Server(create_app(gens))
    srv.served = gens
    yield srv
    srv.stop()
    gens["base"].engine.shutdown(True, 5)


def test_http_models_and_requests(server, reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert list(cards) == ["base", "mine", "other"]
    assert cards["base"]["parent"] is None
    assert cards["mine"]["parent"] == cards["other"]["parent"] == "base" and cards["mine"]["root"].endswith("mine")
    tok = server.served["base"].engine.tokenizer
    greedy = dict(temperature=0, max_tokens=N, extra_body={"ignore_eos": True})
    prompt = tok.encode("To be, or not to be")
    for name in ["mine", "base"]:
        r = client.completions.create(model=name, prompt=prompt, **greedy)
        assert r.model == name
        assert r.choices[0].text == tok.decode(ref_greedy(reference[name], prompt), skip_special_tokens=True)
    chat = [{"role": "user", "content": "The capital of France"}]
    r = client.chat.completions.create(model="other", messages=chat, **greedy)
    want = ref_greedy(reference["other"], tok.encode_chat(chat))
    assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
    err = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert err.status_code == 404 and "available: base, mine, other" in err.json()["error"]["message"]
    metrics = httpx.get(server.url + "/metrics").text  # the shared engine's slots are counted once, as base's
    assert 'qt_kv_slots{model="base"}' in metrics and 'qt_kv_slots{model="mine"}' not in metrics


# ---- refusals ------------------------------------------------------------------------------


def refused(files, adapter_dir, base=None) -> str:
    with pytest.raises(QtError) as e:
        lora.load(adapter_dir, checkpoint.load(base or files["base"]), "x")
    return str(e.value)


def test_adapter_of_another_model_is_refused(files, tmp_path):
    wider = save_adapter(hf_tiny(0, hidden_size=32, intermediate_size=64), tmp_path / "wider", 1, r=4,
                         lora_alpha=8, target_modules=["k_proj"])
    msg = refused(files, wider)
    assert "module model.layers.0.self_attn.k_proj: lora_A is (4, 32), expected (4, 64)" in msg
    deeper = save_adapter(hf_tiny(0, num_hidden_layers=3), tmp_path / "deeper", 1, r=4, lora_alpha=8,
                          target_modules=["o_proj"], layers_to_transform=[2])
    assert "module model.layers.2.self_attn.o_proj, which the base model" in refused(files, deeper)
    embed = save_adapter(hf_tiny(0), tmp_path / "embed", 1, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    assert "lora_embedding_A" in refused(files, embed)


def edited(files, tmp_path, **changes):
    out = shutil.copytree(files["mine"], tmp_path / "edited")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return out


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "use_dora=True"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"target_modules": ["q_proj"]}, "model.layers.0.mlp.down_proj, which its target_modules ['q_proj']"),
    ({"r": 8}, "lora_A is (4, 128), expected (8, 128)"),
])
def test_unsupported_config_is_refused_by_name(files, tmp_path, changes, message):
    assert message in refused(files, edited(files, tmp_path, **changes))


def test_another_base_name_is_only_a_warning(files, tmp_path, caplog):
    moved = edited(files, tmp_path, base_model_name_or_path="/elsewhere/SmolLM2-135M-Instruct")
    adapter = lora.load(moved, checkpoint.load(files["base"]), "mine")
    assert len(adapter.weights) == 2 * len(ALL)
    assert "was trained on /elsewhere/SmolLM2-135M-Instruct and is served on" in caplog.text


def test_rank_and_alpha_patterns(files, tmp_path):
    """peft's per-module overrides (rank_pattern, alpha_pattern) are matched to modules as peft matches them."""
    patterned = edited(files, tmp_path, r=8, rank_pattern={t: 4 for t in ALL}, lora_alpha=1,
                       alpha_pattern={"q_proj": 8, "mlp.down_proj": 2, r"layers\.1\.self_attn\.v_proj": 32})
    ckpt = checkpoint.load(files["base"])
    runner = TorchRunner(ckpt.model, False, [lora.load(patterned, ckpt, "patterned")])
    runner.allocate(1, 16)
    ids = [5, 9, 200, 31]
    base = LlamaForCausalLM.from_pretrained(files["base"], dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, patterned).eval()(torch.tensor([ids])).logits[0]
    assert (runner.forward([Segment(0, 0, ids, 1)], [0, 1, 2, 3]) - want).abs().max() < 1e-4


def test_bad_specs_and_backends(files, tmp_path, monkeypatch):
    base = f"base={files['base']}"
    with pytest.raises(QtError, match="expected NAME=DIR"):
        load_generators([base], loras=[str(files["mine"])])
    with pytest.raises(QtError, match="two models are named 'base'"):
        load_generators([base], loras=[f"base={files['mine']}"])
    with pytest.raises(QtError, match="no such directory"):
        load_generators([base], loras=[f"mine={files['mine']}@typo"])
    ckpt = checkpoint.load(files["base"])
    onnx_like = checkpoint.Checkpoint(None, None, {}, "model.onnx", runner=lambda: None, cfg=ckpt.config)
    with pytest.raises(QtError, match="runs on its own backend"):
        lora.load(files["mine"], onnx_like, "mine")
    from quant import weights

    monkeypatch.setenv("QT_HOME", str(tmp_path / "home"))
    int8 = weights.write(ckpt, "int8", tmp_path / "int8")
    assert "is a QuantLinear, not a plain Linear" in refused(files, files["mine"], int8)
