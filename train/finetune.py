"""Fine-tuning tasks for the training loop of `train.pretrain`: SFT on conversations, DPO on preference pairs.

    report = train(Finetune(init="SmolLM2-135M-Instruct", data="xsum,squad", out="runs/mix"), Finetuning, {})
    report = train(Preference(init="runs/mix/best", data="pairs.jsonl", out="runs/dpo"), PreferenceTuning, {})

Both start from any qt checkpoint (`--init`: a directory, a .gguf, or a known name) and train all its
weights, or with `--lora-rank R` only a LoRA adapter (`train.lora`). They share the run directory,
checkpoints, resume, validation, early stopping and reports of pretraining; a task only brings its
data (`splits`, `rows`) and its loss.

SFT (`Finetuning`): the sources of `--data` (chat files in any format `train.chats` reads, and the
built-in `xsum` / `squad` instruction sets) mixed by weight (`train.chats.mix`; the mix is recorded in
RUN/mix.json), a seeded `--val-frac` of the conversations held out, each rendered by the checkpoint's
chat template with the loss on assistant tokens only and packed into rows (`train.sft`).

DPO (`PreferenceTuning`, Rafailov et al. 2023): `prompt, chosen, rejected` rows (`train.dpo`). The
reference model's log-probabilities of every reply are computed once before training (the reference
is the starting checkpoint, or `--reference`), so no second model stays in memory. Validation logs the
DPO loss with reward accuracy and margin on held-out pairs.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from qt_serve.checkpoint import load
from qt_serve.errors import QtError
from train import chats, dpo, lora, sft
from train.data import Epochs
from train.pretrain import Loop, opt, pick_device


@dataclass
class Finetune(Loop):
    """SFT: the loop's knobs with fine-tuning defaults, the data mix, and LoRA."""

    task: ClassVar[str] = "sft"

    out: str = opt("runs/sft", "run directory")
    seq_len: int = opt(1024, "tokens per packed training row")
    micro_batch: int = opt(4, "rows per forward/backward")
    max_steps: int = opt(300, "optimizer steps")
    lr: float = opt(5e-5, "peak learning rate (LoRA wants ~10x more, e.g. 5e-4)")
    warmup: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW decay, on matrices only")
    eval_every: int = opt(50, "validate (and sample) every N steps")
    eval_tokens: int = opt(32768, "validation tokens per evaluation")
    save_every: int = opt(50, "checkpoint every N steps")
    sample_tokens: int = opt(64, "reply tokens generated at each validation")
    init: str = opt("", "checkpoint to fine-tune: a directory, a .gguf file or a known name (SmolLM2-135M-Instruct)")
    data: str = opt("", "comma-separated sources SPEC[=WEIGHT]: chat files or directories (JSONL / Parquet in "
                        "messages, alpaca, sharegpt, oasst or completion form) and the built-ins xsum, squad")
    examples: int = opt(0, "conversations in the mix, drawn by weight (0: as many as the sources hold)")
    val_frac: float = opt(0.05, "share of the conversations held out for validation")
    pack: bool = opt(True, "pack several conversations into each row (attention stays within each)")
    truncate: bool = opt(False, "cut a conversation longer than seq_len + 1 from the left instead of skipping it")
    lora_rank: int = opt(0, "LoRA rank; 0: fine-tune every weight")
    lora_alpha: float = opt(32.0, "LoRA scale numerator: the update is (alpha / rank) B A")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_targets: str = opt(",".join(lora.ALL_LINEAR), "comma-separated Linear module names to adapt")
    qlora: bool = opt(False, "LoRA over a 4-bit NF4 base (bitsandbytes, CUDA only)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.val_frac < 1:
            raise QtError(f"val_frac must be in (0, 1), got {self.val_frac}")
        if self.qlora and not self.lora_rank:
            raise QtError("--qlora trains a LoRA adapter: give --lora-rank too (e.g. 16)")
        if self.examples < 0 or self.lora_rank < 0:
            raise QtError("examples and lora_rank must be ≥ 0")


@dataclass
class Preference(Finetune):
    """DPO: SFT's knobs (LoRA included) plus the preference loss's."""

    task: ClassVar[str] = "dpo"

    out: str = opt("runs/dpo", "run directory")
    seq_len: int = opt(1024, "the longest prompt + reply, in tokens (longer pairs are skipped)")
    micro_batch: int = opt(4, "pairs per forward/backward (2x sequences)")
    max_steps: int = opt(200, "optimizer steps")
    lr: float = opt(5e-7, "peak learning rate (DPO's is small: 5e-7 to 5e-6 full, ~5e-5 LoRA)")
    eval_tokens: int = opt(16384, "validation: pairs = eval_tokens / seq_len")
    data: str = opt("", "JSONL / Parquet of prompt, chosen, rejected rows (`qt-train pairs` writes them)")
    beta: float = opt(0.1, "DPO's beta: the strength of the pull toward the reference")
    label_smoothing: float = opt(0.0, "conservative DPO: the share of pairs assumed mislabelled")
    reference: str = opt("", "reference checkpoint (default: --init, the model being tuned)")

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise QtError(f"beta must be > 0 and label_smoothing in [0, 0.5); got {self.beta}, {self.label_smoothing}")


def load_init(spec: str, seq_len: int, dtype: str = "float32"):
    """The checkpoint to tune: a torch model with a chat template that fits seq_len. In fp32, but for
    QLoRA in bf16 (its block projections become NF4; an 8B base never needs 32 GB of host memory)."""
    if not spec:
        raise QtError("no model to fine-tune: pass --init (a checkpoint directory, a .gguf or SmolLM2-135M-Instruct)")
    ckpt = load(spec, dtype=dtype)
    if ckpt.model is None or (ckpt.model.config.quantization or {}).get("scheme") not in (None, "fp32", "float32"):
        raise QtError(f"{spec} is a quantized or ONNX checkpoint; fine-tune its full-precision source "
                      "(--qlora quantizes the base itself)")
    if ckpt.tokenizer is None or not ckpt.tokenizer.chat_template:
        raise QtError(f"{spec} has no tokenizer with a chat template; fine-tuning renders conversations with it")
    if seq_len + 1 > ckpt.model.config.max_position_embeddings:
        raise QtError(f"seq_len {seq_len} + 1 exceeds {spec}'s context of {ckpt.model.config.max_position_embeddings}"
                      " tokens; lower --seq-len")
    return ckpt


def held_out(n: int, frac: float, seed: int) -> np.ndarray:
    """Which of n items are validation: a seeded round(n · frac) of them, at least 1 (bool mask)."""
    val = np.zeros(n, dtype=bool)
    val[np.random.default_rng([seed, 7]).permutation(n)[:max(1, round(n * frac))]] = True
    return val


class Tuning:
    """What SFT and DPO share: the starting checkpoint and, with --lora-rank, the adapter put on it."""

    def __init__(self, s: Finetune):
        self.s = s
        self.dtype = "bfloat16" if s.qlora else "float32"
        self.ckpt = load_init(s.init, s.seq_len, self.dtype)
        self.tokenizer, self.cfg = self.ckpt.tokenizer, self.ckpt.model.config
        self.pad_id = next(i for i in (self.cfg.pad_token_id, self.tokenizer.eos_id, 0) if i is not None)
        self.adapter = None

    def build(self):
        model = self.ckpt.model
        if self.s.lora_rank:
            targets = [t.strip() for t in self.s.lora_targets.split(",") if t.strip()]
            self.adapter = lora.Lora(model, self.s.lora_rank, self.s.lora_alpha, self.s.lora_dropout, targets,
                                     self.s.init, self.s.qlora, pick_device(self.s.device))
        return model


class Finetuning(Tuning):
    name, loss_name = "sft", "cross_entropy"

    def __init__(self, s: Finetune, model: dict):
        super().__init__(s)
        if not s.data:
            raise QtError("no data: pass --data SOURCES (chat files, xsum, squad; e.g. --data xsum=1,squad=1)")
        convs, record = chats.mix(chats.parse_sources(s.data), s.examples, s.seed)
        val = held_out(len(convs), s.val_frac, s.seed)
        self.val_chats = [c for c, v in zip(convs, val) if v]
        self.splits, record["splits"] = {}, {}
        for name, part in (("train", [c for c, v in zip(convs, val) if not v]), ("val", self.val_chats)):
            examples, skipped = sft.encode(self.tokenizer, part, s.seq_len + 1, s.truncate)
            rows = sft.PackedRows(examples, s.seq_len, s.seed, self.pad_id, s.pack, name)
            self.splits[name] = rows
            record["splits"][name] = {"conversations": len(part), "examples": len(examples),
                                      "skipped": dict(skipped), "rows": rows.count, "fill": round(rows.fill, 4),
                                      "assistant_tokens": int(rows.target.sum())}
            if skipped:
                print(f"qt-train: {name}: left out {skipped}", file=sys.stderr)
        self.records = {"mix.json": record}
        self.data_id = hashlib.sha256("".join(r.digest() for r in self.splits.values()).encode()).hexdigest()[:16]
        t = record["splits"]["train"]
        self.summary = (f"{t['examples']:,} train conversations in {t['rows']:,} rows of {s.seq_len + 1} tokens "
                        f"({t['fill']:.0%} filled, {t['assistant_tokens']:,} assistant tokens)")

    def rows(self, split: str, first: int, n: int, shuffle: bool = True) -> dict[str, np.ndarray]:
        return self.splits[split].rows(first, n, shuffle)

    def loss(self, forward, batch: dict) -> tuple[torch.Tensor, int, dict]:
        loss, n = sft.sft_loss(forward, batch, self.cfg.windows())
        return loss, n, {}

    def prompt(self) -> list[int]:
        """The first validation conversation up to its last reply, with the generation prompt."""
        convo = self.val_chats[0]
        last = max(i for i, m in enumerate(convo) if m["role"] == "assistant")
        return self.tokenizer.encode_chat(convo[:last], add_generation_prompt=True)


class PairRows:
    """Preference pairs with their reference log-probs, in `train.data.Epochs` order.

    rows(first, n) -> ids, mask: (2n, W) (chosen sides first, then rejected; right-padded to the batch's
    longest), ref: (2n,) the reference's summed reply log-probs of the same sequences."""

    def __init__(self, pairs: list[dpo.Encoded], seed: int, pad_id: int, name: str):
        if not pairs:
            raise QtError(f"the {name} split has no preference pairs; add data or lower --val-frac")
        self.pairs, self.pad_id, self.count = pairs, pad_id, len(pairs)
        self.order = Epochs(self.count, seed)
        self.ref = np.zeros((self.count, 2), dtype=np.float64)  # set by PreferenceTuning.reference_logps

    def batch(self, idx) -> dict[str, np.ndarray]:
        inputs, targets, mask = dpo.collate([self.pairs[i] for i in idx], self.pad_id)
        return {"inputs": inputs.numpy(), "targets": targets.numpy(), "mask": mask.numpy(),
                "ref": np.concatenate([self.ref[idx, 0], self.ref[idx, 1]])}

    def rows(self, first: int, n: int, shuffle: bool = True) -> dict[str, np.ndarray]:
        return self.batch(self.order.items(first, n, shuffle))


class PreferenceTuning(Tuning):
    name, loss_name = "dpo", "dpo_loss"

    def __init__(self, s: Preference, model: dict):
        super().__init__(s)
        if not s.data:
            raise QtError("no data: pass --data PAIRS.jsonl (prompt, chosen, rejected; `qt-train pairs` makes one)")
        pairs, skipped = dpo.read_pairs(s.data)
        val = held_out(len(pairs), s.val_frac, s.seed)
        self.splits, record = {}, {"source": s.data, "read_skipped": dict(skipped), "splits": {}}
        for name, part in (("train", [p for p, v in zip(pairs, val) if not v]),
                           ("val", [p for p, v in zip(pairs, val) if v])):
            encoded, left = dpo.encode_pairs(self.tokenizer, part, s.seq_len + 1)
            self.splits[name] = PairRows(encoded, s.seed, self.pad_id, name)
            record["splits"][name] = {"pairs": len(part), "encoded": len(encoded), "skipped": dict(left)}
        self.records = {"pairs.json": record}
        digest = hashlib.sha256()
        for rows in self.splits.values():
            for e in rows.pairs:
                digest.update(np.asarray(e.chosen_ids + [-1] + e.rejected_ids).tobytes())
        self.data_id = digest.hexdigest()[:16]
        self.summary = f"{self.splits['train'].count:,} train pairs, {self.splits['val'].count:,} validation pairs"
        if s.qlora and not s.reference:
            return  # the reference is the quantized base, scored in build() (a 16 GB bf16 8B never meets the GPU)
        reference = load_init(s.reference, s.seq_len, self.dtype).model if s.reference else self.ckpt.model
        if reference.config.vocab_size != self.cfg.vocab_size:
            raise QtError(f"--reference {s.reference} has a vocabulary of {reference.config.vocab_size} tokens, "
                          f"{s.init} one of {self.cfg.vocab_size}: the reference must share the tuned model's "
                          "tokenizer (usually its starting checkpoint)")
        self.reference_logps(reference)

    def build(self):
        model = super().build()
        if self.s.qlora and not self.s.reference:  # the adapter starts at zero: this is the quantized base
            self.reference_logps(model)  # before a resume loads the trained adapter
        return model

    @torch.no_grad()
    def reference_logps(self, model) -> None:
        """Each reply's summed log-prob under the reference, once, before any weight moves, at the precision
        the policy trains in (so the policy starts with rewards of exactly 0)."""
        device = pick_device(self.s.device)
        model.to(device).eval()
        bf16 = self.s.precision == "bf16"
        for rows in self.splits.values():
            for a in range(0, rows.count, self.s.micro_batch):
                idx = np.arange(a, min(a + self.s.micro_batch, rows.count))
                b = rows.batch(idx)
                b = {k: torch.from_numpy(v).to(device) for k, v in b.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(b["inputs"])
                logps = dpo.sequence_logps(logits, b["targets"], b["mask"])
                rows.ref[idx] = logps.view(2, -1).T.double().cpu().numpy()
        model.train()

    def rows(self, split: str, first: int, n: int, shuffle: bool = True) -> dict[str, np.ndarray]:
        return self.splits[split].rows(first, n, shuffle)

    def loss(self, forward, batch: dict) -> tuple[torch.Tensor, int, dict]:
        logps = dpo.sequence_logps(forward(batch["inputs"]), batch["targets"], batch["mask"])
        pi_c, pi_r = logps.chunk(2)
        ref_c, ref_r = batch["ref"].chunk(2)
        loss, chosen, rejected = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, self.s.beta, self.s.label_smoothing)
        return loss, len(pi_c), dpo.preference_metrics(chosen, rejected)

    def prompt(self) -> list[int]:
        first = self.splits["val"].pairs[0]
        return first.chosen_ids[:first.chosen_mask.index(True)]
