"""Supervised fine-tuning data: conversations -> chat-template tokens, assistant-only targets, packed rows.

    examples, skipped = encode(tokenizer, chats, max_len=1025, truncate=False)
    rows = PackedRows(examples, seq_len=1024, seed=0, pack=True)
    batch = rows.rows(0, 8)          # ids, target, pos, doc: (8, 1025) each

`render` puts a conversation through the checkpoint's own chat template and marks the tokens
of each assistant turn (its content and end-of-turn token: the model learns to stop), the only
tokens the loss counts. It finds them by rendering the conversation up to each assistant turn
with the generation prompt and through it without: the characters in between are that turn,
mapped to tokens by the tokenizer's offsets. This works for any template that renders a prefix
of a conversation as a prefix of its text (all the common ones do); one that does not is refused.

Packing: examples are laid end to end into rows of seq_len + 1 tokens in a seeded order, an
example that does not fit in what is left of a row starting the next (the rest is padding).
Each token carries its example's number within the row (`doc`, -1 for padding) and its
position within its example (`pos`, from 0), so attention stays inside each example
(`DocumentMask`) and RoPE sees the positions an unpacked example would: a packed row gives
each example exactly the logits it would get alone. `pack=False` puts one example per row.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from qt_serve.errors import QtError
from qt_serve.kv import MaskedAttention
from qt_serve.tokenizer import Tokenizer
from train.chats import Skipped
from train.data import Epochs


def render(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """A conversation's token ids through the chat template, and per token whether it is assistant text."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []  # (start, end) characters of each assistant turn
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise QtError("this chat template does not render a conversation's beginning as the beginning of its "
                          "text, so assistant turns cannot be located for the loss mask; use a checkpoint whose "
                          "template does (ChatML, Llama, Qwen, SmolLM ... all do)")
        spans.append((len(before), len(through.rstrip())))  # trailing newlines are the template's, not the turn's
    enc = tokenizer.tok.encode(text, add_special_tokens=False)  # the template writes any BOS itself
    mask = [any(a <= s and e <= b for a, b in spans) and e > s for s, e in enc.offsets]
    return enc.ids, mask


def encode(tokenizer: Tokenizer, chats: list[list[dict]], max_len: int,
           truncate: bool = False) -> tuple[list[tuple[np.ndarray, np.ndarray]], Skipped]:
    """Conversations -> (ids, assistant mask) arrays of at most max_len tokens; what is left out is counted.

    A conversation longer than max_len is skipped, or with `truncate` cut from the left (the end, where
    the last reply is, is kept) if assistant tokens remain.
    """
    out, skipped = [], Skipped()
    for chat in chats:
        ids, mask = render(tokenizer, chat)
        if len(ids) > max_len:
            if not truncate:
                skipped[f"longer than {max_len} tokens"] += 1
                continue
            ids, mask = ids[-max_len:], mask[-max_len:]
        if not any(mask):
            skipped["no assistant tokens left after truncation"] += 1
            continue
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
    return out, skipped


class PackedRows:
    """Training rows of seq_len + 1 tokens, each holding one or more whole examples.

    rows(first, n) returns arrays of shape (n, seq_len + 1): `ids` (padding: pad_id), `target` (the
    token is an assistant token, so predicting it counts), `pos` (position within its example) and
    `doc` (example number within the row, -1 for padding). Rows are read in `train.data.Epochs` order.
    """

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, seed: int, pad_id: int,
                 pack: bool = True, name: str = "train"):
        if not examples:
            raise QtError(f"the {name} split has no examples; add data or lower --val-frac")
        width = seq_len + 1
        order = np.random.default_rng([seed, 1 << 20]).permutation(len(examples))  # which examples share a row
        rows, row, used = [], [], 0  # used: tokens in the row being filled
        for i in order:
            n = len(examples[i][0])
            if row and (not pack or used + n > width):
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += n
        rows.append(row)
        self.count = len(rows)
        self.ids = np.full((self.count, width), pad_id, dtype=np.int64)
        self.target = np.zeros((self.count, width), dtype=bool)
        self.pos = np.zeros((self.count, width), dtype=np.int64)
        self.doc = np.full((self.count, width), -1, dtype=np.int64)
        for r, members in enumerate(rows):
            at = 0
            for k, i in enumerate(members):
                ids, mask = examples[i]
                n = len(ids)
                self.ids[r, at:at + n], self.target[r, at:at + n] = ids, mask
                self.pos[r, at:at + n], self.doc[r, at:at + n] = np.arange(n), k
                at += n
        self.examples = len(examples)
        self.fill = float((self.doc >= 0).mean())  # share of row tokens that are real (not padding)
        self.order = Epochs(self.count, seed)

    def digest(self) -> str:
        """Identifies the rows (a resumed run must read the same)."""
        h = hashlib.sha256()
        for a in (self.ids, self.target, self.doc):
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    def rows(self, first: int, n: int, shuffle: bool = True) -> dict[str, np.ndarray]:
        idx = self.order.items(first, n, shuffle)
        return {"ids": self.ids[idx], "target": self.target[idx], "pos": self.pos[idx], "doc": self.doc[idx]}


class DocumentMask(MaskedAttention):
    """The model's attention hook for packed rows: each query attends causally within its own example only
    (and within a layer's sliding window, if it has one). doc, pos: (B, S) example numbers (-1 for
    padding) and positions within the example (which count up from 0, so the window compares them)."""

    def __init__(self, doc: torch.Tensor, pos: torch.Tensor, windows: list[int | None]):
        S = doc.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=doc.device).tril()
        super().__init__(((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1), pos, windows)


def sft_loss(forward, batch: dict[str, torch.Tensor], windows: list[int | None]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the assistant tokens of a batch of packed rows, and how many there were.

    Position t predicts token t + 1 when t + 1 is an assistant token of the same example.
    """
    ids, doc = batch["ids"], batch["doc"]
    pos = batch["pos"][:, :-1]
    logits = forward(ids[:, :-1], pos, DocumentMask(doc[:, :-1], pos, windows))
    keep = batch["target"][:, 1:] & (doc[:, 1:] == doc[:, :-1])
    n = int(keep.sum())
    targets = ids[:, 1:].masked_fill(~keep, -100)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss / max(n, 1), n
