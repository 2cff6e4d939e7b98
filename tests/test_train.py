"""train/: token shards, the planner, pretraining (loss falls, exact resume, DDP = accumulation), bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, tiny_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from qt_serve.checkpoint import load
from qt_serve.config import ModelConfig
from qt_serve.errors import QtError
from qt_serve.model import Transformer
from qt_serve.tokenizer import Tokenizer
from train import planner, recipes
from train.cli import main
from train.data import Shards, Windows, prepare, read_documents, shard_dtype
from train.pretrain import Settings, latest_checkpoint, pretrain, step_dirs, unigram_log_probs
from train.progress import read_metrics

MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True)
FAST = dict(seq_len=32, micro_batch=8, warmup=5, lr=3e-3, eval_every=10, eval_tokens=512, save_every=10,
            log_every=1, sample_tokens=8)


def documents(n: int = 40) -> list[str]:
    """Learnable fixture text: each document is 12 corpus lines in a seeded order."""
    rng = np.random.default_rng(0)
    return ["\n".join(rng.choice(CORPUS[:4], size=12)) for _ in range(n)]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(documents()):
        (src / f"doc{i:02d}.txt").write_text(doc)
    return prepare([str(src)], tmp_path_factory.mktemp("data") / "shards", vocab_size=400, seed=0)


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


def write_recipe(path: Path) -> Path:
    path.write_text("[model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in MODEL.items()))
    return path


# ---- data ----------------------------------------------------------------------------


def test_shards_round_trip_and_split_by_document(tmp_path, shards):
    s = Shards(shards)
    meta, tok = s.meta, s.tokenizer
    assert meta["dtype"] == "uint16" and s.vocab_size == tok.vocab_size <= 400
    assert {k: v["documents"] for k, v in meta["splits"].items()} == {"train": 36, "val": 2, "test": 2}
    sep = meta["separator_id"]
    assert tok.decode([sep]) == "<|endoftext|>" and tok.chat_template
    # Every split decodes back to its documents, each followed by the separator, in index order.
    docs = documents()
    seen = []
    for name, split in s.splits.items():
        ids = split.read(0, split.n)
        assert ids.size == meta["splits"][name]["tokens"]
        pieces = [tok.decode(part.tolist()) for part in np.split(ids, np.flatnonzero(ids == sep) + 1)[:-1]]
        assert all(p.endswith("<|endoftext|>") for p in pieces)
        seen += [p[:-len("<|endoftext|>")] for p in pieces]
    assert sorted(seen) == sorted(docs)
    # Same seed, same bytes; another seed, another split.
    again = prepare(meta["sources"], tmp_path / "again", vocab_size=400, seed=0)
    assert (again / "val-000.bin").read_bytes() == (shards / "val-000.bin").read_bytes()
    other = prepare(meta["sources"], tmp_path / "other", vocab_size=400, seed=1)
    assert (other / "val-000.bin").read_bytes() != (shards / "val-000.bin").read_bytes()


def test_windows_cover_each_epoch_once(shards):
    split = Shards(shards).splits["train"]
    w = Windows(split, 32, seed=3)
    epoch = w.rows(0, w.count)
    assert {tuple(r) for r in epoch} == {tuple(split.read(i * 32, 33)) for i in range(w.count)}
    assert np.array_equal(w.rows(5, 3), epoch[5:8])  # any row follows from its index alone
    assert not np.array_equal(w.rows(w.count, 4), epoch[:4])  # the next epoch is reshuffled


def test_mixed_sources_skip_bad_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nsecond paragraph")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "b.jsonl").write_text('{"text": "json one"}\nnot json\n{"other": 1}\n"bare string"\n')
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["parquet row", None]}), tmp_path / "c.parquet")
    (tmp_path / "shards").mkdir()  # a data dir made inside the corpus is no document
    (tmp_path / "shards" / "meta.json").write_text('{"vocab_size": 400}')
    np.arange(64, dtype=np.uint16).tofile(tmp_path / "shards" / "train-000.bin")
    docs, skipped = read_documents([str(tmp_path)])
    assert sorted(docs) == sorted(["first document\n\nsecond paragraph", "json one", "bare string", "parquet row"])
    assert skipped == {"empty files": 1, "files not UTF-8": 1, "bad JSON lines": 1,
                       "records without a 'text' string": 1, "files of other types in directories": 2}
    docs, _ = read_documents([str(tmp_path / "a.txt")], doc_sep="\n\n")
    assert docs == ["first document", "second paragraph"]


def test_uint32_shards_for_a_large_vocabulary(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    Tokenizer(tok, {"eos_token": "<|endoftext|>"}).save(ckpt)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.txt").write_text(f"w{69_990 + i} w1 w65536")
    s = Shards(prepare([str(src)], tmp_path / "data", tokenizer=str(ckpt)))
    assert s.meta["dtype"] == "uint32" and shard_dtype(65_536) == np.uint16 and shard_dtype(65_537) == np.uint32
    ids = np.concatenate([sp.read(0, sp.n) for sp in s.splits.values()])
    assert sorted(ids[ids >= 69_990].tolist()) == [69_990, 69_991, 69_992, 69_993, 69_994] + [70_000] * 5
    assert (ids == 65_536).sum() == 5


@pytest.mark.parametrize("files, kw, message", [
    ({"e.txt": ""}, {}, "no usable text"),
    ({"a.txt": "just one document"}, {}, "--doc-sep"),
    ({f"{i}.txt": f"doc {i}" for i in range(5)}, {"vocab_size": 100}, "too small"),
    ({f"{i}.txt": f"doc {i}" for i in range(5)}, {"val_frac": 0.6, "test_frac": 0.5}, "sum below 1"),
    ({f"{i}.txt": f"doc {i}" for i in range(5)}, {"tokenizer": "/nonexistent"}, "not a checkpoint directory"),
])
def test_bad_data_input(tmp_path, files, kw, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(QtError, match=message):
        prepare([str(tmp_path)], tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_corpus_smaller_than_one_sequence(shards):
    with pytest.raises(QtError, match=r"val split holds \d+ tokens, fewer than one sequence"):
        Windows(Shards(shards).splits["val"], 100_000, seed=0, name="val")


# ---- planner -------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": False}, {"output_bias": True, "attention_bias": True,
                                                                    "mlp_bias": True}, {"num_key_value_heads": 1}])
def test_planner_counts_parameters(kw):
    cfg = tiny_config(**kw)
    model = Transformer(cfg)
    counted = sum(p.numel() for p in model.parameters())
    p = planner.count_params(cfg)
    assert p["total"] == counted
    assert p["embedding"] == cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    pl = planner.plan(cfg, 64, 4, 2**30)
    fp32 = pl["modes"]["fp32"]
    assert fp32["weights"] == 4 * counted and fp32["grads"] == 4 * counted and fp32["optimizer"] == 8 * counted


def test_plan_fit_and_largest_micro_batch():
    cfg = tiny_config()
    pl = planner.plan(cfg, 128, 1, 64 * 2**20)
    for r in pl["modes"].values():
        static = r["weights"] + r["grads"] + r["optimizer"]
        m = r["max_micro_batch"]
        assert static + m * r["activations_per_seq"] <= pl["usable"] < static + (m + 1) * r["activations_per_seq"]
    assert not planner.plan(cfg, 128, 10_000, 64 * 2**20)["modes"]["fp32"]["fits"]


def test_plan_activations_match_what_backward_keeps():
    """The activation estimate is within 30% of the bytes autograd actually saves (fp32, tiny model)."""
    cfg = ModelConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      vocab_size=1000, max_position_embeddings=64, tie_word_embeddings=True)
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, 1000, (2, 65))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    logits_grad = 2 * 64 * 1000 * 4  # not saved, but alive during backward
    measured = sum(saved.values()) + logits_grad
    assert 0.7 < 2 * planner.activation_bytes(cfg, 64, 4) / measured < 1.3


def test_recipes_plan_as_documented(capsys):
    assert main(["plan", "--recipe", "1b", "--memory-gb", "80", "--json"]) == 0
    pl = json.loads(capsys.readouterr().out)
    assert 0.9e9 < pl["params"]["total"] < 1.2e9 and pl["modes"]["fp32"]["fits"]
    small = ModelConfig(**{"vocab_size": 32768, **recipes.load("small-gpu")["model"]})
    assert 100e6 < planner.count_params(small)["total"] < 150e6
    assert planner.plan(small, 1024, 8, 16 * 2**30)["modes"]["bf16"]["fits"]
    assert main(["plan", "--recipe", "nope"]) == 2
    assert "no recipe 'nope'" in capsys.readouterr().err


# ---- pretraining ---------------------------------------------------------------------


def test_tiny_model_learns_and_checkpoints_load(tmp_path, shards):
    report = pretrain(Settings(data=str(shards), out=str(tmp_path / "run"), max_steps=50, **FAST), MODEL)
    curve = losses(tmp_path / "run")
    assert curve[1] > 5.0 and report["cross_entropy"]["val"] < 2.0  # from ln(400) ≈ 6.0
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000040", "step-000050"]
    for f in ("report.json", "loss.png", "run.json", "best/train_state.pt"):
        assert (run / f).exists(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert set(report["perplexity"]) == {"train", "val", "test"}
    assert report["perplexity"]["test"] == pytest.approx(math.exp(report["cross_entropy"]["test"]))
    ckpt = load(run / "best")  # a normal qt checkpoint
    assert ckpt.tokenizer.chat_template and ckpt.config.eos_token_ids
    assert ckpt.config.eos_token_ids == sorted({Shards(shards).meta["separator_id"],
                                                ckpt.tokenizer.token_id("<|im_end|>")})


def test_checkpoint_loads_in_transformers(tmp_path, shards):
    transformers = pytest.importorskip("transformers")
    pretrain(Settings(data=str(shards), out=str(tmp_path / "run"), max_steps=10, **FAST), MODEL)
    ckpt = load(tmp_path / "run" / "best")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "best").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "best")
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    assert ids[0].tolist() == ckpt.tokenizer.encode("To be, or not to be")
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ckpt.model(ids), atol=1e-4)


def test_output_bias_starts_at_the_unigram_entropy(tmp_path, shards):
    s = Shards(shards)
    counts = s.splits["train"].counts(s.vocab_size)
    logp = unigram_log_probs(counts)
    assert torch.exp(logp).sum() == pytest.approx(1.0) and torch.isfinite(logp).all()
    entropy = -(torch.as_tensor(counts) * logp.double()).sum().item() / counts.sum()
    pretrain(Settings(data=str(s.dir), out=str(tmp_path / "bias"), max_steps=1, output_bias=True,
                      **{**FAST, "lr": 1e-9}), MODEL)
    ckpt = load(tmp_path / "bias" / "best")
    assert ckpt.config.output_bias and torch.allclose(ckpt.model.lm_head.bias, logp, atol=1e-5)
    assert abs(losses(tmp_path / "bias")[1] - entropy) < 0.3 < math.log(s.vocab_size) - entropy


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train.cli", "pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() or max(losses(run), default=0) < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, shards):
    """Killed mid-run and resumed, the loss at step 30 equals an uninterrupted run's (|Δ| < 1e-5)."""
    flags = dict(FAST, max_steps=30, accum=2, save_every=5, eval_every=15)
    pretrain(Settings(data=str(shards), out=str(tmp_path / "whole"), **flags), MODEL)
    args = ["--recipe", str(write_recipe(tmp_path / "m.toml")), "--data", str(shards), "--out", str(tmp_path / "cut")]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    proc = cli(*args)
    wait_for_step(tmp_path / "cut", 17, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["pretrain", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(cut) == sorted(whole)  # the resumed run re-logged steps after its checkpoint, once
    assert abs(whole[30] - cut[30]) < 1e-5
    assert losses(tmp_path / "whole", "val_loss")[30] == pytest.approx(losses(tmp_path / "cut", "val_loss")[30],
                                                                        abs=1e-5)


def test_ctrl_c_saves_then_exits(tmp_path, shards):
    args = ["--recipe", str(write_recipe(tmp_path / "m.toml")), "--data", str(shards), "--out", str(tmp_path / "run"),
            "--max-steps", "100000", "--save-every", "100000", "--seq-len", "32", "--micro-batch", "4"]
    proc = cli(*args)
    wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "continue with --resume" in out
    [saved] = (tmp_path / "run" / "checkpoints").iterdir()
    assert load(saved).config.vocab_size == Shards(shards).vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("shard", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, shards, shard):
    """torchrun --nproc-per-node 2 (gloo; DDP or FSDP2) with accum 1 trains on the same rows as 1 process, accum 2."""
    flags = ["--recipe", str(write_recipe(tmp_path / "m.toml")), "--data", str(shards), "--max-steps", "8",
             "--seq-len", "32", "--micro-batch", "4", "--eval-every", "8", "--eval-tokens", "256",
             "--save-every", "8", "--log-every", "1", "--warmup", "2", "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "train.cli", "pretrain", *flags, *shard, "--accum", "1",
                          "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, timeout=240, check=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main(["pretrain", *flags, "--accum", "2", "--out", str(tmp_path / "one")]) == 0
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert a[1] == pytest.approx(b[1], abs=1e-6) and abs(a[8] - b[8]) < 1e-4
    assert abs(losses(tmp_path / "ddp", "val_loss")[8] - losses(tmp_path / "one", "val_loss")[8]) < 1e-4
    assert json.loads((tmp_path / "ddp" / "report.json").read_text())["world_size"] == 2


# ---- bad input to a run ----------------------------------------------------------------


def test_resume_refuses_a_different_setting(tmp_path, shards, capsys):
    recipe = str(write_recipe(tmp_path / "m.toml"))
    args = ["pretrain", "--recipe", recipe, "--data", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "2",
            "--seq-len", "32", "--micro-batch", "2", "--eval-tokens", "64"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume", "--lr", "0.5"]) == 2
    assert "trained with lr=0.001 but this run asks for 0.5" in capsys.readouterr().err
    (tmp_path / "m2.toml").write_text((tmp_path / "m.toml").read_text().replace("hidden_size = 64", "hidden_size = 32"))
    assert main(args[:2] + [str(tmp_path / "m2.toml")] + args[3:] + ["--resume"]) == 2
    assert "different model: hidden_size" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, shards, monkeypatch):
    from qt_serve import checkpoint

    run = tmp_path / "run"
    settings = Settings(data=str(shards), out=str(run), max_steps=4, **{**FAST, "save_every": 2, "eval_every": 100})
    real, calls = checkpoint.save_file, []

    def full_disk(*a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(QtError, match="No space left on device.*step-000002 is intact"):
        pretrain(settings, MODEL)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert not list(run.glob(".*tmp*"))  # the half-written directory is gone
    assert load(run / "checkpoints" / "step-000002").config.hidden_size == 64
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert pretrain(Settings(data=str(shards), out=str(run), resume=True, max_steps=4,
                             **{**FAST, "save_every": 2, "eval_every": 100}), MODEL, {"resume"})["step"] == 4


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "0"], "seq_len must be at least 1"),
    (["--precision", "fp8"], "precision must be fp32 or bf16"),
    (["--seq-len", "100000"], "fewer than one sequence"),
    (["--data", "/nonexistent"], "has no meta.json"),
])
def test_bad_run_flags(tmp_path, shards, capsys, flags, message):
    args = ["pretrain", "--recipe", str(write_recipe(tmp_path / "m.toml")), "--data", str(shards),
            "--out", str(tmp_path / "run"), *flags]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_compile_failure_falls_back_to_eager(tmp_path, shards, monkeypatch, capsys):
    def broken(module):
        def call(*a):
            raise RuntimeError("no C compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    report = pretrain(Settings(data=str(shards), out=str(tmp_path / "run"), max_steps=3, compile=True,
                               precision="bf16", **FAST), MODEL)
    assert "torch.compile failed (RuntimeError: no C compiler); running eagerly" in capsys.readouterr().err
    assert report["step"] == 3 and math.isfinite(report["cross_entropy"]["val"])


def test_early_stopping_on_val_loss(tmp_path, shards):
    """A learning rate far too high makes validation worse; patience 2 stops the run."""
    report = pretrain(Settings(data=str(shards), out=str(tmp_path / "run"), max_steps=200, patience=2,
                               **{**FAST, "lr": 3.0, "warmup": 0, "eval_every": 2, "grad_clip": 0.0}), MODEL)
    assert report["stopped"] == "early stop: no val improvement in 2 evaluations" and report["step"] < 200
    again = pretrain(Settings(data=str(shards), out=str(tmp_path / "run"), resume=True), {})  # stays stopped
    assert (again["stopped"], again["step"]) == (report["stopped"], report["step"])


def test_data_cli(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "book.txt").write_text("\n\n".join(documents(12)))
    (src / "empty.txt").write_text("")
    assert main(["data", str(src), "--out", str(tmp_path / "d"), "--vocab-size", "300", "--doc-sep", "\\n\\n"]) == 0
    captured = capsys.readouterr()
    assert "skipped: 1 empty files" in captured.err
    assert "vocab 300 (uint16); train" in captured.out and "val" in captured.out and "test" in captured.out
    assert main(["data", str(src / "empty.txt"), "--out", str(tmp_path / "e")]) == 2
    assert "no usable text" in capsys.readouterr().err


def test_report_after_a_worse_last_eval_and_without_a_test_split(tmp_path, capsys):
    """report.json gives the steps trained (not best/'s step), and data made with --test-frac 0 still reports."""
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(documents()):
        (src / f"doc{i:02d}.txt").write_text(doc)
    data = prepare([str(src)], tmp_path / "d", vocab_size=400, test_frac=0.0)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**FAST, "lr": 3.0, "warmup": 0, "eval_every": 2,
                                                        "grad_clip": 0.0}.items()]
    assert main(["pretrain", "--recipe", str(recipe), "--data", str(data), "--out", str(out), "--max-steps", "40",
                 "--patience", "1", *flags]) == 0  # patience 1: lr 3.0 is bumpy on every CPU, not on each alike
    report = json.loads((out / "report.json").read_text())
    vals = losses(out, "val_loss")  # early stop: best/ is older than the last step
    assert report["stopped"].startswith("early stop") and report["step"] == max(vals) > min(vals, key=vals.get)
    assert set(report["perplexity"]) == {"train", "val"} and "perplexity train" in capsys.readouterr().out


def test_logged_lr_is_the_one_each_step_trained_with(tmp_path, shards):
    pretrain(Settings(data=str(shards), out=str(tmp_path / "run"), max_steps=3, **FAST), MODEL)
    lr = losses(tmp_path / "run", "lr")
    assert lr[1] == pytest.approx(FAST["lr"] / FAST["warmup"]) and lr[3] == pytest.approx(3 * FAST["lr"] / 5)


def test_checkpoints_order_by_step_past_six_digits(tmp_path):
    for step in (999_999, 1_000_000):
        (tmp_path / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step:06d}" / "train_state.pt").touch()
    assert [p.name for p in step_dirs(tmp_path)] == ["step-999999", "step-1000000"]
    assert latest_checkpoint(tmp_path).name == "step-1000000"


@pytest.mark.parametrize("toml, message", [("[model]\nhidden_sise = 64\n", "unknown [model] key(s) hidden_sise"),
                                           ("[data]\nvocab = 300\n", "unknown [data] key(s) vocab")])
def test_recipe_with_a_misspelt_key(tmp_path, capsys, toml, message):
    (tmp_path / "r.toml").write_text(toml)
    assert main(["plan", "--recipe", str(tmp_path / "r.toml")]) == 2
    assert message in capsys.readouterr().err


def test_plan_uses_what_pretrain_would_for_a_recipe(tmp_path, capsys):
    """Defaults of `qt-train pretrain` (vocab 4096, micro-batch 16); a long --seq-len raises the positions."""
    recipe = write_recipe(tmp_path / "r.toml")
    assert main(["plan", "--recipe", str(recipe), "--seq-len", "4096", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = ModelConfig(**{**MODEL, "vocab_size": 4096})
    assert result["params"] == planner.count_params(cfg)
    assert (result["micro_batch"], result["seq_len"]) == (Settings().micro_batch, 4096)


def test_resume_refuses_remade_data(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(documents()):
        (src / f"doc{i:02d}.txt").write_text(doc)
    data = prepare([str(src)], tmp_path / "d", vocab_size=400, seed=0)
    run = dict(data=str(data), out=str(tmp_path / "run"), max_steps=2, **FAST)
    pretrain(Settings(**run), MODEL)
    prepare([str(src)], data, vocab_size=400, seed=1)  # other documents in each split, same path
    with pytest.raises(QtError, match="was remade since"):
        pretrain(Settings(**{**run, "resume": True}), MODEL)


@pytest.mark.parametrize("line, message", [("seq_len = 32.0", "seq_len must be int, got 32.0"),
                                           ('lr = "3e-4"', "lr must be float, got '3e-4'")])
def test_recipe_train_value_of_the_wrong_type(tmp_path, shards, capsys, line, message):
    recipe = write_recipe(tmp_path / "r.toml")
    recipe.write_text(recipe.read_text() + f"[train]\n{line}\n")
    assert main(["pretrain", "--recipe", str(recipe), "--data", str(shards), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
