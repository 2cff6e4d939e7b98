"""train/planner.py: parameter counts of every family against qt's model and `transformers`, the published
presets, and the LoRA / QLoRA fine-tuning plan (`qt-train plan --task sft|dpo`)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qt_serve.config import ModelConfig
from qt_serve.errors import QtError
from qt_serve.model import Transformer
from train import lora, planner
from train.cli import main

GiB = 2**30
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = [  # (qt ModelConfig kwargs, transformers config class name)
    ({"model_type": "llama"}, "LlamaConfig"),
    ({"model_type": "llama", "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}, "LlamaConfig"),
    ({"model_type": "mistral"}, "MistralConfig"),
    ({"model_type": "qwen2"}, "Qwen2Config"),
    ({"model_type": "qwen2", "tie_word_embeddings": True, "num_key_value_heads": 1}, "Qwen2Config"),
    ({"model_type": "qwen3", "head_dim": 32}, "Qwen3Config"),
    ({"model_type": "qwen3", "attention_bias": True, "tie_word_embeddings": True}, "Qwen3Config"),
]


def counted(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter, counted once


@pytest.mark.parametrize("kw, _", FAMILIES)
def test_count_params_equals_the_model(kw, _):
    cfg = ModelConfig(**{**TINY, **kw})
    assert planner.count_params(cfg)["total"] == counted(Transformer(cfg))


def test_count_params_equals_the_model_with_an_output_bias():
    cfg = ModelConfig(**TINY, model_type="qwen2", output_bias=True)
    assert planner.count_params(cfg)["total"] == counted(Transformer(cfg))


@pytest.mark.parametrize("kw, hf_class", FAMILIES)
def test_count_params_equals_transformers(kw, hf_class):
    """The independent reference: transformers builds each family from its own config class."""
    import transformers

    kw = {**TINY, **kw}
    kw.pop("model_type")
    kw.setdefault("tie_word_embeddings", False)
    if hf_class != "LlamaConfig":
        kw.pop("mlp_bias", None)
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])  # Qwen3Config's default is 128
    hf_cfg = getattr(transformers, hf_class)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    family = {"LlamaConfig": "llama", "MistralConfig": "mistral", "Qwen2Config": "qwen2", "Qwen3Config": "qwen3"}
    ours = ModelConfig(**{**kw, "model_type": family[hf_class]})
    assert planner.count_params(ours)["total"] == counted(model)


# Parameter counts the Hugging Face Hub reports for these checkpoints (their safetensors' total).
PUBLISHED = {"Llama-3.1-8B": 8_030_261_248, "Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824,
             "Mistral-7B-v0.3": 7_248_023_552, "Qwen2.5-0.5B": 494_032_768, "Qwen2.5-1.5B": 1_543_714_304,
             "Qwen2.5-7B": 7_615_616_512, "Qwen3-0.6B": 596_049_920, "Qwen3-8B": 8_190_735_360}


def test_presets_have_the_published_parameter_counts():
    assert set(PUBLISHED) == set(planner.PRESETS)
    for name, n in PUBLISHED.items():
        assert planner.count_params(planner.preset(name))["total"] == n, name


def test_bad_preset_lists_the_valid_ones(capsys):
    with pytest.raises(QtError, match="no preset 'Llama-9B'.*Llama-3.1-8B.*Qwen3-8B"):
        planner.preset("Llama-9B")
    assert main(["plan", "--preset", "Llama-9B", "--task", "sft"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in planner.PRESETS)


def test_lora_targets_are_what_sft_adapts_and_peft_trains():
    assert planner.TARGETS == lora.ALL_LINEAR
    cfg = ModelConfig(**TINY, model_type="qwen3", head_dim=32)
    model = Transformer(cfg)
    lora.Lora(model, 4, 8.0, 0.0, list(lora.ALL_LINEAR), "x")
    assert planner.lora_params(cfg, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_nf4_is_bitsandbytes_double_quantized_4_127_bits():
    n = 4096 * 14336
    assert abs(8 * planner.nf4_bytes(n) / n - 4.127) < 0.001  # QLoRA paper: 4 + 8/64 + 32/(64*256) bits


# ---- the fine-tuning plan ----------------------------------------------------------------------------

PARTS = ("weights", "lora_weights", "grads", "optimizer", "activations", "logits", "overhead")


def llama8b(**kw):
    args = dict(task="sft", lora_rank=16, qlora=True, precision="bf16", grad_checkpointing=True, name="Llama-3.1-8B")
    return planner.finetune_plan(planner.preset("Llama-3.1-8B"), kw.pop("seq_len", 2048), kw.pop("micro_batch", 1),
                                 kw.pop("memory", 12 * GiB), **{**args, **kw})


def test_llama_8b_qlora_sft_at_2048_has_a_verdict_and_a_breakdown_that_adds_up():
    pl = llama8b()
    b = pl["breakdown"]
    assert b["total"] == sum(b[k] for k in PARTS)
    assert pl["fits"] is (max(ph["total"] for ph in pl["phases"].values()) <= 12 * GiB)
    assert pl["fits"] and 10 * GiB < b["total"] < 11 * GiB  # the step needs ~10.4 GiB at 2048 tokens
    assert 2048 < pl["step_max_seq_len"] < 4096 and pl["step_max_micro_batch"] == 1
    assert pl["trainable"] == 41_943_040  # rank 16 on all seven projections of 32 blocks
    # the NF4 projections, the bf16 embedding + LM head (2 x 128256 x 4096 x 2 B), the LoRA state
    assert 3.3 * GiB < pl["detail"]["base_blocks"] < 3.4 * GiB
    assert 2 * 128256 * 4096 * 2 < pl["detail"]["base_rest"] < 2 * 128256 * 4096 * 2 * 1.01
    assert pl["detail"]["head_copy"] == 0  # the head is bf16 already: autocast copies nothing
    assert b["lora_weights"] == b["grads"] == 4 * pl["trainable"] and b["optimizer"] == 8 * pl["trainable"]
    # Llama 3's vocabulary: the fp32 logits outweigh all the checkpointed block inputs
    assert pl["peak_phase"] == "lm_head" and b["logits"] > b["activations"]
    text = planner.format_finetune_plan(pl)
    assert "verdict: fits in 12 GiB" in text and "largest seq_len at micro-batch 1: 2," in text
    assert not llama8b(seq_len=4096)["fits"]


def test_each_validation_sample_holds_a_kv_cache_for_its_prompt_and_sample():
    """Trainer.sample builds an LLM over the training model with a KV cache for the prompt (at most seq_len)
    and the sample's tokens, in the weights' dtype, not for the model's whole context."""
    from qt_serve.checkpoint import Checkpoint
    from qt_serve.generate import LLM

    cfg = ModelConfig(**{**TINY, "max_position_embeddings": 512})
    cache = LLM(Checkpoint(Transformer(cfg), None, {}, "training"), max_seq_len=64 + 64,
                optimize=False).engine.runner.cache
    val = planner.finetune_plan(cfg, 64, 1, 12 * GiB, qlora=False)["phases"]["validation sample"]
    assert val["kv_cache"] == cache.k.nbytes + cache.v.nbytes
    pl = llama8b()  # Llama 3.1: (2048 + 64) positions x 32 layers x 8 KV heads x 128 x 2 x bf16 = 264 MiB
    assert pl["phases"]["validation sample"]["kv_cache"] == 2 * 32 * 8 * 128 * 2112 * 2
    assert pl["binding"] == "training step"


def test_the_largest_micro_batch_and_seq_len_are_the_edge_of_fitting():
    mem = 48 * GiB  # enough for Llama 3.1's validation sample
    pl = llama8b(memory=mem, seq_len=1024)
    L, B = pl["max_seq_len"], pl["max_micro_batch"]
    assert 1024 < L < 131072 and B >= 1
    assert llama8b(memory=mem, seq_len=L)["fits"] and not llama8b(memory=mem, seq_len=L + 1)["fits"]
    assert llama8b(memory=mem, seq_len=1024, micro_batch=B)["fits"]
    assert not llama8b(memory=mem, seq_len=1024, micro_batch=B + 1)["fits"]
    step = llama8b(memory=16 * GiB, seq_len=1024)
    L = step["step_max_seq_len"]
    assert llama8b(memory=16 * GiB, seq_len=L)["breakdown"]["total"] <= 16 * GiB
    assert llama8b(memory=16 * GiB, seq_len=L + 1)["breakdown"]["total"] > 16 * GiB
    assert llama8b(memory=6 * GiB)["step_max_seq_len"] == 0  # the weights alone do not fit


def test_what_the_knobs_change():
    base = llama8b(memory=80 * GiB)["breakdown"]
    assert llama8b(memory=80 * GiB, qlora=False)["breakdown"]["weights"] > 29 * GiB  # fp32 base
    no_gc = llama8b(memory=80 * GiB, grad_checkpointing=False)["breakdown"]
    assert no_gc["activations"] > 4 * base["activations"]
    assert llama8b(memory=80 * GiB, lora_rank=64)["breakdown"]["optimizer"] == 4 * base["optimizer"]
    two = llama8b(memory=80 * GiB, micro_batch=2)["breakdown"]
    assert 1.9 < (two["logits"] - llama8b(memory=80 * GiB)["detail"]["head_copy"]) / (
        base["logits"] - llama8b(memory=80 * GiB)["detail"]["head_copy"]) < 2.1


def test_dpo_runs_two_sequences_a_pair_and_its_reference_pass_holds_the_fp32_model():
    sft, dpo = llama8b(memory=80 * GiB), llama8b(memory=80 * GiB, task="dpo")
    assert (dpo["sequences"], dpo["tokens"]) == (2, 2 * sft["tokens"])
    assert dpo["breakdown"]["logits"] > 1.9 * sft["breakdown"]["logits"] - dpo["detail"]["head_copy"]
    # QLoRA scores the reference with the quantized model itself (its adapter still zero): no phase of its own
    assert "reference pass" not in dpo["phases"] and "reference pass" not in sft["phases"]
    plain = llama8b(memory=80 * GiB, task="dpo", qlora=False)  # plain LoRA: the fp32 model, whole
    assert plain["phases"]["reference pass"]["weights"] >= 4 * 8_030_261_248
    mistral = planner.finetune_plan(planner.preset("Mistral-7B-v0.3"), 1024, 1, 12 * GiB, "dpo", qlora=True)
    assert mistral["fits"] and mistral["binding"] == "training step"


def test_small_models_fit_in_12_gib():
    for name in ("Llama-3.2-1B", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen3-0.6B"):
        pl = planner.finetune_plan(planner.preset(name), 2048, 1, 12 * GiB, "sft", 16, qlora=True)
        assert pl["fits"] and pl["max_seq_len"] > 2048, name
        assert "verdict: fits in 12 GiB" in planner.format_finetune_plan(pl)


def test_bad_plans_are_refused():
    cfg = planner.preset("Qwen3-0.6B")
    with pytest.raises(QtError, match="seq_len 50000 exceeds"):
        planner.finetune_plan(cfg, 50000, 1, 12 * GiB)
    with pytest.raises(QtError, match="task must be"):
        planner.finetune_plan(cfg, 128, 1, 12 * GiB, task="ppo")
    with pytest.raises(QtError, match="lm_head are not block projections"):
        planner.finetune_plan(cfg, 128, 1, 12 * GiB, targets=["q_proj", "lm_head"])


# ---- the command ---------------------------------------------------------------------------------------

FLAGS = ["--task", "sft", "--qlora", "--grad-checkpointing", "--seq-len", "2048", "--micro-batch", "1",
         "--memory-gb", "12"]


def test_cli_plans_a_preset(capsys):
    assert main(["plan", "--preset", "Llama-3.1-8B", *FLAGS]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "lora weights", "grads", "optimizer", "activations", "logits", "overhead", "total",
                "verdict:"):
        assert row in out
    assert "qt-train sft --init CHECKPOINT --data DATA --lora-rank 16 --qlora" in out


def test_cli_plans_a_config_json(tmp_path, capsys):
    """A published model directory's config.json (Qwen2.5-7B's fields), as a file or its directory."""
    cfg_json = {**planner.PRESETS["Qwen2.5-7B"][1], "model_type": "qwen2", "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    for spec in (tmp_path / "config.json", tmp_path):
        assert main(["plan", "--config", str(spec), *FLAGS, "--json"]) == 0
        pl = json.loads(capsys.readouterr().out)
        assert pl["params"]["total"] == PUBLISHED["Qwen2.5-7B"]
        assert pl["breakdown"] == qwen_plan("Qwen2.5-7B")["breakdown"]


def qwen_plan(name):
    return planner.finetune_plan(planner.preset(name), 2048, 1, 12 * GiB, "sft", 16, qlora=True,
                                 grad_checkpointing=True)


def test_cli_fine_tuning_flags_need_a_task(capsys):
    assert main(["plan", "--preset", "Qwen3-8B", "--qlora"]) == 2
    assert "--qlora goes with --task" in capsys.readouterr().err
    assert main(["plan", "--preset", "Qwen3-8B", "--config", "x"]) == 2
    assert main(["plan", "--preset", "Qwen3-0.6B", "--json"]) == 0  # the pretraining overview still works
    assert json.loads(capsys.readouterr().out)["params"]["total"] == PUBLISHED["Qwen3-0.6B"]


# ---- the activation model against what autograd keeps -------------------------------------------------


class _MatMul4bit(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit as it behaves for autograd: the frozen weight is held, the input is not."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.w = w
        return F.linear(x, w.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.w.to(g.dtype), None


class Linear4bitStandIn(nn.Linear):
    """Linear4bit's forward (compute in bf16, return the input's dtype) without CUDA."""

    def forward(self, x):
        return _MatMul4bit.apply(x.to(torch.bfloat16), self.weight).to(x.dtype)


@pytest.mark.parametrize("family, qlora, precision", [("llama", True, "bf16"), ("qwen3", True, "bf16"),
                                                       ("qwen2", False, "bf16"), ("llama", True, "fp32")])
def test_saved_activations_of_a_block_match_the_plan(family, qlora, precision):
    """One block's forward under autocast keeps (for backward) within 10% of the bytes the plan counts.
    (dropout 0: on CPU dropout keeps a float mask where CUDA keeps a bool one.)"""
    cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, model_type=family)
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16 if qlora else torch.float32)  # QLoRA loads its base in bf16
    if qlora:
        for parent in (model.model.layers[0].self_attn, model.model.layers[0].mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    stand_in = Linear4bitStandIn(lin.in_features, lin.out_features, bias=lin.bias is not None)
                    stand_in.load_state_dict(lin.state_dict())
                    setattr(parent, name, stand_in)
    lora.Lora(model, 8, 16.0, 0.0, list(lora.ALL_LINEAR), "x")
    B, S = 2, 64
    x = torch.randn(B, S, cfg.hidden_size, dtype=model.model.norm.weight.dtype, requires_grad=True)
    pos = torch.arange(S).expand(B, S)
    cos, sin = model.rope_cos[pos].unsqueeze(1), model.rope_sin[pos].unsqueeze(1)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), x, cos, sin)}  # counted elsewhere
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model.layers[0](x, cos, sin, None)
    step = planner._step(cfg, "sft", S, B, 8, planner.TARGETS, qlora, precision, True, 0.0)
    copies = 0 if qlora or precision == "fp32" else 2 * sum(i * o for i, o in planner.projections(cfg).values())
    predicted = step["saved_per_token_block"] * B * S + copies
    assert 0.9 < predicted / sum(saved.values()) < 1.1


def test_the_worked_example_in_the_readmes_is_what_the_command_prints(capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = ("qt-train plan --preset Llama-3.1-8B --task sft --qlora --grad-checkpointing --seq-len 2048 "
           "--micro-batch 1 --memory-gb 12")
    assert main(cmd.split()[1:]) == 0
    printed = capsys.readouterr().out
    for readme in (root / "train" / "README.md", root / "README.md"):
        text = readme.read_text()
        shown = text[text.index(cmd):].split("```text\n", 1)[1].split("```", 1)[0]
        assert shown.strip() in printed, readme
