"""The training loop (`Trainer`, `train`) and its pretraining task: a `qt_serve.model.Transformer` from
scratch on token shards (`train.data`). SFT and DPO are other tasks of the same loop (`train.finetune`).

    run = Settings(data="data/shk", out="runs/tiny", max_steps=2000)
    report = pretrain(run, model={"hidden_size": 256, "num_hidden_layers": 4, ...})

The run directory:

    RUN/run.json                the settings and model config (a resume must agree with them)
    RUN/checkpoints/step-NNNNNN the last `keep` checkpoints, written every `save_every` steps
    RUN/best                    the checkpoint with the lowest validation loss so far
    RUN/metrics.jsonl, RUN/tb/  per-step loss, lr, grad norm, tokens/s, MFU; validation loss and a sample
    RUN/report.json, loss.png   train / val / test cross-entropy and perplexity of `best`, throughput, energy

Each checkpoint is a normal qt checkpoint directory (loads in qt-chat, qt-serve and
transformers) plus `train_state.pt`: optimizer, scheduler, RNG, step, best loss,
patience counter. The data position is the step itself: step s trains on rows
s·G .. (s+1)·G-1 of `data.Windows` (G = micro_batch x accum x world), so a resumed run,
and a run on W processes with accum A / W, read exactly the same rows.

Under `torchrun`, the same code runs DDP (gloo on CPU, NCCL on CUDA) or, with
`fsdp`, FSDP2 (`fully_shard` per block); rank 0 logs, samples and saves.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from qt_serve.checkpoint import Checkpoint, save_checkpoint
from qt_serve.config import ModelConfig
from qt_serve.errors import QtError, read_json
from qt_serve.model import Transformer
from train import planner, progress
from train.data import Shards, Windows

STATE = "train_state.pt"
# Settings a resumed run may change: they do not touch the numbers it computes.
OPERATIONAL = {"out", "resume", "log_every", "keep", "compile", "grad_checkpointing", "tdp_watts", "zeroshot"}


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Loop:
    """The knobs every run has (pretraining, SFT, DPO); each is a `qt-train ... --flag` and a recipe's [train] key."""

    out: str = opt("runs/pretrain", "run directory")
    resume: bool = opt(False, "continue the run in --out from its latest checkpoint")
    seq_len: int = opt(256, "tokens per training sequence")
    micro_batch: int = opt(16, "sequences per forward/backward")
    accum: int = opt(1, "micro-batches per optimizer step, per process")
    max_steps: int = opt(1000, "optimizer steps")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "the cosine decays to lr x this")
    warmup: int = opt(100, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW decay, on matrices only (not norms or biases)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "max global grad norm; 0: off")
    precision: str = opt("fp32", "fp32 or bf16 (autocast over fp32 master weights)")
    compile: bool = opt(False, "torch.compile the model (falls back to eager if compiling fails)")
    grad_checkpointing: bool = opt(False, "recompute each block's activations in backward: less memory, about a third slower")
    seed: int = opt(0, "seed of the init and the data order")
    eval_every: int = opt(100, "validate (and sample) every N steps")
    eval_tokens: int = opt(65536, "validation tokens per evaluation")
    patience: int = opt(0, "stop after N evaluations without a better val loss; 0: never")
    save_every: int = opt(200, "checkpoint every N steps")
    keep: int = opt(2, "step checkpoints kept (plus best/)")
    log_every: int = opt(10, "metrics.jsonl / TensorBoard every N steps")
    sample_tokens: int = opt(48, "tokens generated at each validation")
    fsdp: bool = opt(False, "under torchrun: shard with FSDP2 instead of DDP")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...")
    tdp_watts: float | None = opt(None, "power for the energy estimate (default: per device, see progress.py)")

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a recipe's TOML value can be of any type (flags are converted)
            v, kind = getattr(self, f.name), type(f.default)
            if f.default is not None and not (isinstance(v, kind) or kind is float and isinstance(v, int)):
                raise QtError(f"{f.name} must be {kind.__name__}, got {v!r}")
        for name in ("seq_len", "micro_batch", "accum", "max_steps", "eval_every", "eval_tokens", "save_every",
                     "keep", "log_every"):
            if getattr(self, name) < 1:
                raise QtError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16"):
            raise QtError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup >= 0 and self.patience >= 0):
            raise QtError("lr must be > 0, min_lr_ratio in [0, 1], warmup and patience ≥ 0")


@dataclass
class Settings(Loop):
    """Pretraining: the loop's knobs, the token shards and the fresh model's init."""

    task: ClassVar[str] = "pretrain"  # the `qt-train` command; run.json records it

    data: str | None = opt(None, "data directory made by `qt-train data` (default: the recipe's [data])")
    init_std: float = opt(0.02, "std of the normal init of matrices")
    output_bias: bool = opt(False, "LM-head bias initialised to smoothed unigram log-probs of the train split")
    zeroshot: int = opt(0, "items per task of the zero-shot suite (evals.zeroshot) at each validation, logged "
                           "as val_zs_*; 0: off")


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def init_weights(model: Transformer, std: float) -> None:
    """Normal(0, std) matrices; residual-branch outputs scaled by 1/sqrt(2·layers) (GPT-2); zero biases."""
    out_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, out_std)
            elif p.dim() == 2:
                p.normal_(0, std)
            elif name.endswith("bias"):
                p.zero_()


def unigram_log_probs(counts: np.ndarray, alpha: float = 1.0) -> torch.Tensor:
    """log p(token) with add-alpha smoothing, so unseen tokens get a finite prior: (vocab,)."""
    c = torch.as_tensor(counts, dtype=torch.float64) + alpha
    return (c / c.sum()).log().float()


def model_config(model: dict, shards: Shards, s: Settings) -> ModelConfig:
    tok = shards.tokenizer
    eos = sorted({i for i in (shards.meta["separator_id"], tok.token_id("<|im_end|>")) if i is not None})
    fields = {"vocab_size": shards.vocab_size, "eos_token_id": eos if len(eos) > 1 else eos[0],
              "pad_token_id": shards.meta["separator_id"], "output_bias": s.output_bias,
              "max_position_embeddings": max(s.seq_len, model.get("max_position_embeddings", 0))}
    return ModelConfig(**{**model, **fields})


class Pretraining:
    """The task of a pretraining run: next-token prediction on token shards, from a fresh model.

    A task gives the trainer its data and loss (SFT and DPO are other tasks, `train.finetune`):
    `cfg`, `tokenizer`, `data_id`; `splits` (name -> rows, each with a `.count`); `rows(split, first, n,
    shuffle)` (a batch: name -> numpy array); `build()` (the model to train); `loss(forward, batch)` (mean
    loss over the batch's targets, their count, extra metrics to average); `prompt()` (ids to sample from).
    """

    name, loss_name = "pretrain", "cross_entropy"

    def __init__(self, s: Settings, model: dict):
        if s.data is None:
            raise QtError("no data: pass --data DIR (made by `qt-train data`) or a recipe with a [data] section")
        if s.zeroshot < 0:
            raise QtError(f"zeroshot must be ≥ 0 (items per task; 0: off), got {s.zeroshot}")
        self.s = s
        self.shards = Shards(s.data)
        self.tokenizer = self.shards.tokenizer
        self.cfg = model_config(model, self.shards, s)
        # The data position is a row number: a resume on remade data (same path) would silently read other rows.
        self.data_id = hashlib.sha256(json.dumps(self.shards.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.splits = {"train": Windows(self.shards.splits["train"], s.seq_len, s.seed, "train"),
                       "val": Windows(self.shards.splits["val"], s.seq_len, s.seed, "val")}
        # Built now so a too-small test split fails before training, not after; --test-frac 0 makes none.
        if self.shards.splits["test"].n:
            self.splits["test"] = Windows(self.shards.splits["test"], s.seq_len, s.seed, "test")
        self.summary = f"{self.shards.splits['train'].n:,} train tokens"
        if s.zeroshot:  # fetch the suite's data now rather than fail at the first validation
            from evals import zeroshot  # lazily, as train/cli.py and train/dpo.py use evals

            zeroshot.prepare()

    def build(self) -> Transformer:
        model = Transformer(self.cfg)
        init_weights(model, self.s.init_std)
        if self.s.output_bias:
            counts = self.shards.splits["train"].counts(self.cfg.vocab_size)
            with torch.no_grad():
                model.lm_head.bias.copy_(unigram_log_probs(counts))
        return model

    def rows(self, split: str, first: int, n: int, shuffle: bool = True) -> dict[str, np.ndarray]:
        return {"ids": self.splits[split].rows(first, n, shuffle)}

    def loss(self, forward, batch: dict) -> tuple[torch.Tensor, int, dict]:
        ids = batch["ids"]
        logits = forward(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()), ids[:, 1:].numel(), {}

    def prompt(self) -> list[int]:
        return self.splits["val"].rows(0, 1, shuffle=False)[0, :16].tolist()


# ---- processes ------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """`auto`: this process' GPU under torchrun (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Dist:
    """This process' place under torchrun (or a lone process): rank, world size, device."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag: bool) -> bool:
        return self.mean(float(flag)) > 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class Interrupt:
    """Ctrl-C / SIGTERM set a flag checked between optimizer steps (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.hit = False
        self.old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.old:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        print("\nqt-train: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)


def eager_fallback(module):
    """torch.compile(module), falling back to eager (with a note) if compiling fails on first use."""
    compiled = torch.compile(module)
    state = {"fn": compiled}

    def call(*args):
        if state["fn"] is compiled:
            try:
                return compiled(*args)
            except Exception as e:  # a missing compiler, an unsupported op, ...: train eagerly instead
                print(f"qt-train: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eagerly",
                      file=sys.stderr)
                state["fn"] = module
        return module(*args)

    return call


def checkpoint_blocks(model: Transformer) -> None:
    """Gradient checkpointing, from outside the model: each block keeps only its input for backward and
    recomputes the rest (activation memory ~1/layers of the plan's, for one more forward)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# ---- the run ----------------------------------------------------------------------------


class Trainer:
    def __init__(self, s: Loop, task, dist_: Dist):
        self.s, self.task, self.dist = s, task, dist_
        self.out = Path(s.out)
        self.cfg = task.cfg
        self.global_batch = s.micro_batch * s.accum * self.dist.world
        torch.manual_seed(s.seed)
        self.model = task.build()
        self.adapter = getattr(task, "adapter", None)  # LoRA: only the adapter is trained and saved
        self.model.to(self.dist.device).train()
        if s.grad_checkpointing:
            checkpoint_blocks(self.model)
        self.wrapped = self._parallel()  # before the optimizer: FSDP swaps the parameters for shards
        self.trained = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.trained if p.dim() >= 2]
        rest = [p for p in self.trained if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(s.beta1, s.beta2))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: lr_factor(step, s.warmup, s.max_steps, s.min_lr_ratio))
        self.step, self.best, self.bad_evals, self.tokens, self.elapsed = 0, float("inf"), 0, 0, 0.0
        self.forward = eager_fallback(self.wrapped) if s.compile else self.wrapped
        self.autocast = (torch.autocast(self.dist.device.type, dtype=torch.bfloat16) if s.precision == "bf16"
                         else nullcontext())

    def _parallel(self):
        if self.dist.world == 1:
            return self.model
        if self.s.fsdp:
            from torch.distributed.fsdp import fully_shard

            if self.adapter:
                raise QtError("--fsdp with LoRA is not supported (the adapter is small: use DDP, the default)")

            for block in self.model.model.layers:
                fully_shard(block)
            return fully_shard(self.model)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.model, device_ids=[self.dist.device] if self.dist.device.type == "cuda"
                                       else None)

    def _sync_grads(self, on: bool):
        """Gradient all-reduce only on a step's last micro-batch (the others accumulate locally)."""
        if self.dist.world == 1:
            return nullcontext()
        if self.s.fsdp:
            self.wrapped.set_requires_gradient_sync(on)
            return nullcontext()
        return nullcontext() if on else self.wrapped.no_sync()

    # ---- state ----

    def state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, opt_sd = get_state_dict(self.wrapped, self.opt, options=opts)
        return {"model": model_sd, "train": {
            "optimizer": opt_sd, "scheduler": self.sched.state_dict(), "step": self.step, "best": self.best,
            "bad_evals": self.bad_evals, "tokens": self.tokens, "elapsed": self.elapsed,
            "rows_seen": self.step * self.global_batch,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}}

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        st = torch.load(directory / STATE, weights_only=False)
        if self.adapter:  # the frozen base is the one built; the adapter's weights come from the directory
            self.adapter.load(directory)
            weights = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
        else:
            weights = load_file(str(directory / "model.safetensors"))
            if self.cfg.tie_word_embeddings:
                weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        set_state_dict(self.wrapped, self.opt, model_state_dict=weights, optim_state_dict=st["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
        self.sched.load_state_dict(st["scheduler"])
        self.step, self.best, self.bad_evals = st["step"], st["best"], st["bad_evals"]
        self.tokens, self.elapsed = st["tokens"], st["elapsed"]
        torch.set_rng_state(st["rng"]["torch"])
        np.random.set_state(st["rng"]["numpy"])
        if st["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])

    def save(self, directory: Path, state: dict) -> Path:
        """Checkpoint + train state into `directory`, atomically; rank 0 writes, every rank calls."""
        if self.dist.main:
            try:
                if self.adapter:
                    self.adapter.save(directory, extra=lambda d: torch.save(state["train"], d / STATE))
                else:
                    with torch.device("meta"):
                        model = Transformer(self.cfg)
                    model.load_state_dict(state["model"], assign=True)
                    if self.cfg.tie_word_embeddings:
                        model.lm_head.weight = model.model.embed_tokens.weight
                    save_checkpoint(directory, model, self.task.tokenizer,
                                    extra=lambda d: torch.save(state["train"], d / STATE))
            except OSError as e:  # e.g. a full disk: the temp dir is gone, older checkpoints untouched
                prev = latest_checkpoint(self.out)
                raise QtError(f"saving {directory} failed ({e}); "
                              f"{f'the previous checkpoint {prev} is intact' if prev else 'no checkpoint was saved'}"
                              f"; free space and rerun with --resume") from None
        self.dist.barrier()
        return directory

    def checkpoint(self) -> None:
        state = self.state()
        self.save(self.out / "checkpoints" / f"step-{self.step:06d}", state)
        if self.dist.main:
            for old in step_dirs(self.out)[:-self.s.keep]:
                shutil.rmtree(old, ignore_errors=True)

    # ---- evaluation ----

    def batch(self, split: str, first: int, n: int, shuffle: bool = True) -> dict[str, torch.Tensor]:
        rows = self.task.rows(split, first, n, shuffle)
        return {k: torch.from_numpy(v).to(self.dist.device, non_blocking=True) for k, v in rows.items()}

    @torch.no_grad()
    def evaluate(self, split: str, max_tokens: int) -> tuple[float, dict]:
        """The task's loss over the split's first rows in order, weighted by their targets, and its metrics
        (every rank computes the same)."""
        n = min(self.task.splits[split].count, max(1, max_tokens // self.s.seq_len))
        self.model.eval()
        total, count, metrics = 0.0, 0, {}
        for a in range(0, n, self.s.micro_batch):
            with self.autocast:
                loss, k, extra = self.task.loss(self.wrapped, self.batch(split, a, min(self.s.micro_batch, n - a),
                                                                          shuffle=False))
            total, count = total + loss.item() * k, count + k
            for name, v in extra.items():
                metrics[name] = metrics.get(name, 0.0) + v * k
        self.model.train()
        return total / max(count, 1), {name: v / max(count, 1) for name, v in metrics.items()}

    @torch.no_grad()
    def sample(self) -> str:
        """A continuation of the first tokens of the validation split (seeded, so comparable across evals)."""
        from qt_serve.generate import LLM
        from qt_serve.sampling import SamplingParams

        if self.s.fsdp and self.dist.world > 1:
            return ""  # the weights are sharded across ranks
        self.model.eval()
        prompt = self.task.prompt()
        # A KV cache for this sample only, not the model's whole context (32 GiB in fp32 for Llama-3.1-8B).
        llm = LLM(Checkpoint(self.model, self.task.tokenizer, {}, "training"),
                  max_seq_len=min(len(prompt) + self.s.sample_tokens, self.model.max_seq_len), optimize=False)
        params = SamplingParams(max_tokens=self.s.sample_tokens, temperature=0.8, top_p=0.95, seed=0)
        text = self.task.tokenizer.decode(prompt) + llm.generate(prompt, params).text
        self.model.train()
        return text

    # ---- training ----

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches of global batch `step`: (mean loss, grad norm)."""
        s, loss_sum = self.s, 0.0
        base = self.step * self.global_batch + self.dist.rank * s.accum * s.micro_batch
        for j in range(s.accum):
            batch = self.batch("train", base + j * s.micro_batch, s.micro_batch)
            with self._sync_grads(j == s.accum - 1):
                with self.autocast:
                    loss = self.task.loss(self.forward, batch)[0] / s.accum
                loss.backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(self.trained, s.grad_clip if s.grad_clip > 0 else math.inf)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.global_batch * s.seq_len
        return self.dist.mean(loss_sum), float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def run(self) -> dict:
        s, d = self.s, self.dist
        peak, watts, assumption = progress.device_peak(d.device, s.precision, d.world)
        watts = s.tdp_watts or watts
        fpt = planner.flops_per_token(self.cfg, s.seq_len)
        if d.main:
            n = planner.count_params(self.cfg)
            trained = sum(p.numel() for p in self.trained)
            print(f"qt-train: {n['total'] / 1e6:.2f}M parameters ({n['non_embedding'] / 1e6:.2f}M non-embedding"
                  f"{f', {trained:,} trained' if self.adapter else ''}), "
                  f"{self.task.summary}, {d.world} process(es) on {d.device}, "
                  f"global batch {self.global_batch} x {s.seq_len} tokens\nqt-train: peak {assumption}; energy "
                  f"{progress.energy(watts, 0)['assumption']}", file=sys.stderr)
        metrics = progress.Metrics(self.out, self.step) if d.main else None
        bar = tqdm(total=s.max_steps, initial=self.step, disable=not d.main or None, dynamic_ncols=True,
                   desc=self.task.name)
        stop, interrupt, sample, reason = False, Interrupt(), "", "max_steps"
        if s.patience and self.bad_evals >= s.patience:  # a resumed early-stopped run stays stopped
            stop, reason = True, self._early_stop()
        t0, tok0 = time.perf_counter(), self.tokens
        try:
            while self.step < s.max_steps and not stop:
                t, lr = time.perf_counter(), self.sched.get_last_lr()[0]  # this step's: train_step advances it
                loss, norm = self.train_step()
                dt = time.perf_counter() - t
                self.elapsed += dt
                tok_s = self.global_batch * s.seq_len / dt
                mfu = tok_s * fpt / peak if peak else None
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if d.main and (self.step % s.log_every == 0 or self.step == 1):
                    metrics.log(self.step, loss=loss, lr=lr, grad_norm=norm, tok_s=tok_s,
                                mfu=mfu, tokens=self.tokens)
                if self.step % s.eval_every == 0 or self.step == s.max_steps:
                    stop, reason, sample = self._validate(metrics, bar)
                if d.any(interrupt.hit):
                    stop, reason = True, "interrupted"
                if self.step % s.save_every == 0 or stop or self.step == s.max_steps:
                    self.checkpoint()
        finally:
            interrupt.restore()
            bar.close()
            if metrics:
                metrics.close()
        if reason == "interrupted":
            if d.main:
                print(f"qt-train: saved {latest_checkpoint(self.out)}; continue with --resume", file=sys.stderr)
            raise KeyboardInterrupt
        wall = time.perf_counter() - t0
        tok_s = (self.tokens - tok0) / wall if wall > 0 else 0.0
        return self._report(reason, sample, tok_s, wall, fpt, peak, watts, assumption)

    def _validate(self, metrics, bar):
        """Evaluate, keep the best checkpoint, count patience: (stop, reason, sample)."""
        val, extra = self.evaluate("val", self.s.eval_tokens)
        improved = val < self.best
        self.best, self.bad_evals = (val, 0) if improved else (self.best, self.bad_evals + 1)
        sample = self.sample() if self.dist.main else ""
        if self.dist.main:
            if self.task.loss_name == "cross_entropy":  # a perplexity only means something for these
                extra = {"ppl": math.exp(min(val, 50)), **extra}
            if getattr(self.s, "zeroshot", 0) and not (self.s.fsdp and self.dist.world > 1):  # FSDP: sharded
                from evals import zeroshot

                with self.autocast:
                    extra |= zeroshot.validation_scores(self.model, self.task.tokenizer, self.s.zeroshot)
            extra = {f"val_{k}": v for k, v in extra.items()}
            metrics.log(self.step, val_loss=val, sample=sample, **extra)
            shown = ", ".join(f"{k[4:]} {v:.3f}" for k, v in extra.items())
            bar.write(f"step {self.step}: val loss {val:.4f}{f' ({shown})' if shown else ''}"
                      f"{' best' if improved else ''}\n  sample: {sample[-300:]!r}")
        if improved:
            self.save(self.out / "best", self.state())
        if self.s.patience and self.bad_evals >= self.s.patience:
            return True, self._early_stop(), sample
        return False, "max_steps", sample

    def _early_stop(self) -> str:
        return f"early stop: no val improvement in {self.s.patience} evaluations"

    def _report(self, reason, sample, tok_s, wall, fpt, peak, watts, assumption) -> dict:
        """The task's loss (for cross-entropy tasks also perplexity) of the best checkpoint (else the last
        weights) on each split, and its other metrics."""
        best = self.out / "best"
        step, tokens, elapsed = self.step, self.tokens, self.elapsed  # load() rewinds these to best's
        if (best / STATE).exists():
            self.load(best)
        ce, extra = {}, {}
        for split in self.task.splits:
            ce[split], extra[split] = self.evaluate(split, self.s.eval_tokens * 4 if split == "train" else 1 << 20)
        report = {
            "checkpoint": str(best if best.exists() else latest_checkpoint(self.out)), "stopped": reason,
            "step": step, "best_step_val_loss": self.best, "tokens": tokens, self.task.loss_name: ce,
            **({"perplexity": {k: math.exp(v) for k, v in ce.items()}} if self.task.loss_name == "cross_entropy"
               else {}), **({"metrics": extra} if any(extra.values()) else {}),
            "params": planner.count_params(self.cfg), "trained_params": sum(p.numel() for p in self.trained),
            "wall_s": wall, "train_s_total": elapsed, "peak_memory": progress.peak_memory(self.dist.device),
            "tokens_per_s": tok_s, "mfu": tok_s * fpt / peak if peak else None, "peak_assumption": assumption,
            "flops_per_token": fpt, "energy": progress.energy(watts, wall), "sample": sample,
            "settings": dataclasses.asdict(self.s), "world_size": self.dist.world, "rank": self.dist.rank,
        }
        if self.dist.main:
            (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            title = f"{self.out.name}: {self.cfg.num_hidden_layers} layers, d {self.cfg.hidden_size}"
            progress.plot_losses({self.out.name: self.out / "metrics.jsonl"}, self.out / "loss.png", title=title)
        return report


# ---- entry point ------------------------------------------------------------------------


def step_dirs(run_dir: Path) -> list[Path]:
    """checkpoints/step-N oldest first, by number: past step 999999 the names outgrow the zero padding."""
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in step_dirs(run_dir) if (p / STATE).exists()]
    return done[-1] if done else None


def check_resume(run_dir: Path, s: Loop, model: dict, given: set[str]) -> tuple[Loop, dict]:
    """Settings and model of the run being resumed; a given setting that differs is refused by name."""
    saved = read_json(run_dir / "run.json")
    if saved.get("task", "pretrain") != s.task:
        raise QtError(f"{run_dir} holds a {saved.get('task', 'pretrain')} run, not {s.task}; resume it with "
                      f"`qt-train {saved.get('task', 'pretrain')} --out {run_dir} --resume`")
    old = type(s)(**{**saved["settings"], "out": s.out, "resume": True})
    for name in sorted(given - OPERATIONAL):
        if getattr(s, name) != getattr(old, name):
            raise QtError(f"{run_dir} was trained with {name}={getattr(old, name)!r} but this run asks for "
                          f"{getattr(s, name)!r}; resume with the same value (or leave the flag out), "
                          "or start a new run with another --out")
    if model and model != saved["model"]:
        diff = sorted(k for k in set(model) | set(saved["model"]) if model.get(k) != saved["model"].get(k))
        raise QtError(f"{run_dir} was trained with a different model: {', '.join(diff)} differ(s); "
                      "resume with the same recipe or start a new run with another --out")
    return dataclasses.replace(old, **{k: getattr(s, k) for k in given & OPERATIONAL}), saved["model"]


def train(s: Loop, make_task, model: dict, given: set[str] | None = None) -> dict:
    """Train (or resume) a run of the task `make_task(settings, model)` builds; returns the report.
    `given`: setting names the user set explicitly."""
    run_dir = Path(s.out)
    if (run_dir / "run.json").exists():
        if not s.resume:
            raise QtError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
        s, model = check_resume(run_dir, s, model, set(given or ()) | {"resume"})
    elif s.resume:
        raise QtError(f"nothing to resume in {run_dir} (no run.json); leave out --resume to start a new run")
    # Read before rank 0 rewrites run.json below (other ranks would race it).
    saved_id = read_json(run_dir / "run.json").get("data_id") if s.resume else None
    place = Dist(s.device)
    task = make_task(s, model)
    if saved_id not in (None, task.data_id):
        raise QtError(f"the data of {run_dir} was remade since it started (its data id differs); resume on the "
                      "data it was trained on, or start a new run with another --out")
    trainer = Trainer(s, task, place)
    if place.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({"task": s.task, "settings": dataclasses.asdict(s),
                                                      "model": model, "data_id": task.data_id}, indent=2))
        for name, record in getattr(task, "records", {}).items():  # e.g. the fine-tuning mix
            (run_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    ckpt = latest_checkpoint(run_dir) if s.resume else None
    if ckpt is not None:
        trainer.load(ckpt)
        if place.main:
            print(f"qt-train: resumed from {ckpt} (step {trainer.step})", file=sys.stderr)
    try:
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def pretrain(s: Settings, model: dict, given: set[str] | None = None) -> dict:
    """Pretrain (or resume) a run from scratch on token shards; returns the report."""
    return train(s, Pretraining, model, given)
