"""Fine-tuning: assistant-only targets, packing without cross-example attention, SFT and LoRA runs (loss
falls, exact resume), PEFT-format adapters against peft + transformers, merge parity, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tokenizer, tiny_model

from qt_serve.checkpoint import load, save_checkpoint
from qt_serve.errors import QtError
from train import sft
from train.cli import main
from train.finetune import Finetune, Finetuning, Preference, PreferenceTuning
from train.pretrain import latest_checkpoint, train

FAST = dict(seq_len=64, micro_batch=4, warmup=2, eval_every=10, eval_tokens=256, save_every=10, log_every=1,
            sample_tokens=4, val_frac=0.2)
WORDS = ["red", "green", "blue", "black", "white", "pink"]


def colour_chats(n: int = 60) -> list[list[dict]]:
    """A learnable task: the reply repeats the colour the user names, twice."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        w = str(rng.choice(WORDS))
        out.append([{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}])
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tok = build_tokenizer()
    return save_checkpoint(tmp_path_factory.mktemp("base") / "base", tiny_model(vocab_size=tok.vocab_size), tok)


@pytest.fixture(scope="module")
def chats_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chats") / "colours.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in colour_chats()))
    return path


def test_render_marks_assistant_turns_only():
    tok = build_tokenizer()
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"}]
    ids, mask = sft.render(tok, chat)
    # The reference is the ChatML text written out by hand, not the template.
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "Hello there<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nGoodbye<|im_end|>\n")
    assert tok.decode(ids) == text
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    assert runs == ["Hello there<|im_end|>", "Goodbye<|im_end|>"]


def test_packing_leaks_no_attention_across_examples():
    """Each example's logits in a packed row equal its logits run alone (positions from 0, no neighbours)."""
    tok = build_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size)
    examples, skipped = sft.encode(tok, colour_chats(5), max_len=200)
    assert not skipped
    rows = sft.PackedRows(examples, seq_len=255, seed=0, pad_id=0)
    assert rows.count == 1 and (rows.doc[0] >= 0).sum() == sum(len(e[0]) for e in examples)
    b = {k: torch.from_numpy(v) for k, v in rows.rows(0, 1, shuffle=False).items()}
    with torch.no_grad():
        packed = model(b["ids"], b["pos"], sft.DocumentMask(b["doc"], b["pos"], model.config.windows()))[0]
        for k in range(len(examples)):
            at = (b["doc"][0] == k).nonzero().flatten()
            alone = model(b["ids"][:, at])[0]
            torch.testing.assert_close(packed[at], alone, atol=1e-4, rtol=1e-4)
    # Without the document mask the later examples would see the earlier ones:
    with torch.no_grad():
        leaky = model(b["ids"], b["pos"])[0]
    last = (b["doc"][0] == len(examples) - 1).nonzero().flatten()
    assert (leaky[last] - packed[last]).abs().max() > 1e-3


def test_loss_counts_assistant_tokens_of_the_same_example():
    """sft_loss against a per-token loop over the targets written out independently."""
    tok = build_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size)
    examples, _ = sft.encode(tok, colour_chats(6), max_len=200)
    rows = sft.PackedRows(examples, seq_len=63, seed=0, pad_id=0)
    b = {k: torch.from_numpy(v) for k, v in rows.rows(0, 2, shuffle=False).items()}
    with torch.no_grad():
        loss, n = sft.sft_loss(model, b, model.config.windows())
        total, count = 0.0, 0
        for r in range(2):
            for k in range(int(b["doc"][r].max()) + 1):
                ids, mask = b["ids"][r][b["doc"][r] == k], b["target"][r][b["doc"][r] == k]
                logp = torch.log_softmax(model(ids[None])[0], -1)
                for t in range(len(ids) - 1):
                    if mask[t + 1]:
                        total -= logp[t, ids[t + 1]].item()
                        count += 1
    assert n == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_too_long_conversations_are_skipped_or_truncated_from_the_left():
    tok = build_tokenizer()
    long = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "short"}]
    kept, skipped = sft.encode(tok, [long, *colour_chats(2)], max_len=60)
    assert len(kept) == 2 and skipped == {"longer than 60 tokens": 1}
    kept, skipped = sft.encode(tok, [long], max_len=60, truncate=True)
    ids, mask = kept[0]
    assert len(ids) == 60 and tok.decode(ids[mask]) == "short<|im_end|>" and not skipped


def run_sft(tmp_path, base, data, name, **kw):
    s = Finetune(init=str(base), data=str(data), out=str(tmp_path / name), **{**FAST, **kw})
    return train(s, Finetuning, {})


def test_sft_loss_falls_and_records_the_mix(tmp_path, base, chats_file):
    report = run_sft(tmp_path, base, chats_file, "full", max_steps=60, lr=3e-3, eval_every=20, save_every=20)
    assert report["cross_entropy"]["val"] < 0.5  # random init: ~6 nats; the reply is two copies of a given word
    mix = json.loads((tmp_path / "full" / "mix.json").read_text())
    assert mix["splits"]["train"]["examples"] + mix["splits"]["val"]["examples"] == 60
    assert report["trained_params"] == report["params"]["total"]
    reloaded = load(tmp_path / "full" / "best")
    from qt_serve.generate import LLM
    from qt_serve.sampling import SamplingParams

    llm = LLM(reloaded)
    replies = [llm.generate(reloaded.tokenizer.encode_chat([{"role": "user", "content": f"say {w}"}]),
                            SamplingParams(max_tokens=16, temperature=0)).text for w in WORDS]
    assert sum(r == f"{w} {w}" for r, w in zip(replies, WORDS)) >= 5, replies


def test_lora_run_resumes_exactly_and_saves_a_peft_adapter(tmp_path, base, chats_file):
    from safetensors.torch import load_file

    kw = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lr=1e-2, lora_targets="q_proj,v_proj,down_proj")
    whole = run_sft(tmp_path, base, chats_file, "whole", max_steps=6, save_every=3, **kw)
    run_sft(tmp_path, base, chats_file, "part", max_steps=6, save_every=3, **kw)
    shutil.rmtree(latest_checkpoint(tmp_path / "part"))  # as if killed after step 3's checkpoint
    resumed = train(Finetune(out=str(tmp_path / "part"), resume=True), Finetuning, {}, {"resume"})
    assert resumed["step"] == whole["step"] == 6
    a = load_file(str(latest_checkpoint(tmp_path / "whole") / "adapter_model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "part") / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole["trained_params"] == sum(v.numel() for v in a.values())
    assert sorted({k.split(".")[-3] for k in a}) == ["down_proj", "q_proj", "v_proj"]
    config = json.loads((tmp_path / "whole" / "best" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)


def test_adapter_matches_peft_on_transformers_and_merge_matches_both(tmp_path, base, chats_file):
    """The saved adapter loaded by peft onto the transformers model gives qt's logits; the merged
    checkpoint gives the same logits as base + adapter (fp32, < 1e-4)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run_sft(tmp_path, base, chats_file, "lora", max_steps=10, lr=1e-2, lora_rank=4, lora_dropout=0.0)
    adapter = tmp_path / "lora" / "best"
    assert main(["merge", str(adapter), "--base", str(base), "--out", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([build_tokenizer().encode_chat([{"role": "user", "content": "say pink"}])])
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    hf_base = hf(ids).logits
    with_adapter = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        reference = with_adapter(ids).logits
        merged = load(tmp_path / "merged").model(ids)
    assert (reference - hf_base).abs().max() > 1e-2  # the adapter changes something
    assert (merged - reference).abs().max() < 1e-4

    from train.lora import Lora

    qt = load(base, dtype="float32").model
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = Lora(qt, cfg["r"], cfg["lora_alpha"], 0.0, cfg["target_modules"], str(base))
    lora.load(adapter)
    with torch.no_grad():
        assert (qt.eval()(ids) - reference).abs().max() < 1e-4


def test_bad_lora_target_lists_the_modules(tmp_path, base, chats_file):
    with pytest.raises(QtError, match=r"q_prj match no Linear module.*k_proj, lm_head, o_proj, q_proj"):
        run_sft(tmp_path, base, chats_file, "bad", max_steps=1, lora_rank=4, lora_targets="q_prj")


def test_cli_sft_and_bad_input(tmp_path, base, chats_file, capsys):
    flags = ["--seq-len", "64", "--micro-batch", "4", "--eval-every", "5", "--save-every", "5",
             "--eval-tokens", "256", "--sample-tokens", "4", "--val-frac", "0.2"]
    assert main(["sft", "--init", str(base), "--data", str(chats_file), "--out", str(tmp_path / "cli"),
                 "--max-steps", "5", *flags]) == 0
    assert "val cross_entropy" in capsys.readouterr().out
    # Resuming as the other task is refused by name.
    assert main(["dpo", "--out", str(tmp_path / "cli"), "--resume"]) == 2
    assert "holds a sft run" in capsys.readouterr().err
    assert main(["sft", "--init", str(base), "--out", str(tmp_path / "x"), "--seq-len", "64"]) == 2
    assert "no data" in capsys.readouterr().err
    assert main(["sft", "--data", str(chats_file), "--out", str(tmp_path / "y")]) == 2
    assert "no model to fine-tune" in capsys.readouterr().err
    assert main(["sft", "--init", str(base), "--data", str(chats_file), "--seq-len", "999",
                 "--out", str(tmp_path / "z")]) == 2
    assert "exceeds" in capsys.readouterr().err


def colour_pairs(path: Path) -> Path:
    """Chosen replies repeat the colour asked for, rejected ones name another; one row is a tie."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(60):
        w, other = rng.choice(WORDS, size=2, replace=False)
        rows.append({"prompt": f"say {w}", "chosen": f"{w} {w}", "rejected": f"{other} {other}", "id": str(i)})
    rows.append({"prompt": "say red", "chosen": "same", "rejected": "same"})  # skipped, counted
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_learns_held_out_preferences(tmp_path, base):
    """After DPO the policy prefers the chosen reply of held-out pairs (at the start every reward is 0:
    accuracy 0, margin 0)."""
    pairs = colour_pairs(tmp_path / "pairs.jsonl")
    s = Preference(init=str(base), data=str(pairs), out=str(tmp_path / "dpo"), max_steps=30, lr=3e-3, beta=0.5,
                   **{**FAST, "eval_every": 30})
    report = train(s, PreferenceTuning, {})
    val = report["metrics"]["val"]
    assert val["reward_accuracy"] >= 0.9 and val["reward_margin"] > 1.0
    assert report["dpo_loss"]["val"] < 0.3  # log 2 = 0.693 at the start
    record = json.loads((tmp_path / "dpo" / "pairs.json").read_text())
    assert sum(record["read_skipped"].values()) == 1
    assert record["splits"]["val"]["encoded"] == 12


def test_plan_counts_the_trainable_weights_lora_makes(base):
    """The planner's LoRA parameter count (arithmetic on the config) equals what peft puts on the model."""
    from train import lora, planner

    model = load(base, dtype="float32").model
    lora.Lora(model, 8, 16.0, 0.0, list(lora.ALL_LINEAR), str(base))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = planner.plan(model.config, 64, 1, 2**30, lora_rank=8)
    assert plan["modes"]["lora"]["trainable"] == plan["modes"]["qlora"]["trainable"] == trained
    assert plan["modes"]["qlora"]["weights"] < plan["modes"]["lora"]["weights"]


def test_dpo_with_lora_trains_only_the_adapter(tmp_path, base):
    from safetensors.torch import load_file

    pairs = colour_pairs(tmp_path / "pairs.jsonl")
    s = Preference(init=str(base), data=str(pairs), out=str(tmp_path / "dpo"), max_steps=4, lr=1e-2, lora_rank=4,
                   lora_dropout=0.0, **{**FAST, "eval_every": 4, "save_every": 4})
    report = train(s, PreferenceTuning, {})
    adapter = load_file(str(tmp_path / "dpo" / "best" / "adapter_model.safetensors"))
    assert report["trained_params"] == sum(v.numel() for v in adapter.values()) < report["params"]["total"] / 10
    assert report["metrics"]["val"]["reward_margin"] > 0  # the adapter moved the policy the right way


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, base, chats_file):
    """Recomputing each block in backward changes memory, not the numbers."""
    from safetensors.torch import load_file

    run_sft(tmp_path, base, chats_file, "plain", max_steps=2, lr=1e-3, save_every=2, eval_every=2)
    run_sft(tmp_path, base, chats_file, "ckpt", max_steps=2, lr=1e-3, save_every=2, eval_every=2,
            grad_checkpointing=True)
    a = load_file(str(latest_checkpoint(tmp_path / "plain") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "ckpt") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"],
                           load_file(str(base / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"])
