"""Direct Preference Optimization (Rafailov et al., 2023): its pure parts, and two sources of preference pairs.

DPO trains a policy π on pairs (x, y_w, y_l) (a prompt, the preferred "chosen" reply, the other, "rejected")
against a frozen reference π_ref (the starting checkpoint), with no reward model and no sampling:

    z = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]
    L = -log σ(β z)                 cDPO, labels flipped with probability ε: -(1-ε) log σ(βz) - ε log σ(-βz)

log π(y|x) is the sum of the reply tokens' log-probabilities (`sequence_logps`); β·(log π - log π_ref) is a
reply's implicit reward, and β (typically 0.1) how far π may move from π_ref. At the start π = π_ref, so
L = log 2 and every reward is 0; the reward accuracy (chosen above rejected) and margin show it learning.

Pairs file (`read_pairs`): JSON Lines, or Parquet by the .parquet suffix, a row per pair:
    {"prompt": "...", "chosen": "...", "rejected": "..."}                        (what this module writes)
    {"prompt": [messages ending in a user turn], "chosen": "...", "rejected": "..."}
    {"chosen": [..., {"role": "assistant", ...}], "rejected": [..., {"role": "assistant", ...}]}
The last is HF's conversational form (Anthropic HH, UltraFeedback binarized): the conversation before the
final assistant message, the same in both, is the prompt (a `prompt` field is then not needed, and not used).
An optional `id` names the row; by default it is FILE:LINE (the 1-based line, or row of a Parquet file).

Written here, one JSON line per pair: {"id", "prompt", "chosen", "rejected", "chosen_model", "rejected_model"},
from the arena's votes (`export_pairs`) or from AlpacaEval (`alpaca_pairs`: GPT-4's answer chosen, the
model's own greedy reply rejected, so DPO pulls the model toward the reference answers).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qt_serve.errors import QtError
from train.chats import Skipped, read_parquet

# Why a row of a pairs file is skipped.
BAD_JSON = "bad JSON"
MISSING = "missing prompt, chosen or rejected"
MALFORMED = "malformed messages"
DIFFERENT = "chosen and rejected continue different conversations"
NOT_USER = "prompt not ending in a user turn"
EMPTY = "empty reply"
SAME = "chosen equals rejected"
EXPECTED = ("rows with 'prompt' (a string, or chat messages ending in a user turn), 'chosen' and 'rejected' "
            "(strings, or messages ending in the assistant's reply)")


@dataclass
class Pair:
    prompt: list[dict]  # chat messages, the last a user turn
    chosen: str
    rejected: str
    id: str


@dataclass
class Encoded:
    """A pair through the chat template: token ids, and per token whether it is the final reply's."""

    chosen_ids: list[int]
    chosen_mask: list[bool]
    rejected_ids: list[int]
    rejected_mask: list[bool]
    id: str


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(targets) summed over masked positions: logits (B, S, V), targets (B, S) int64, mask (B, S) bool
    -> (B,) float32. cross_entropy takes the log-softmax in fp32 without keeping a (B, S, V) log-prob copy."""
    lp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return torch.where(mask, lp.view(targets.shape), 0.0).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards (B,), rejected rewards (B,)) from (B,) sequence log-probs; the rewards are
    β·(log π - log π_ref), detached (for metrics only)."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    z = beta * (chosen - rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss.mean(), beta * chosen.detach(), beta * rejected.detach()


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Reward accuracy (share of pairs with chosen strictly above rejected), mean margin, mean rewards."""
    return {"reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
            "reward_chosen": chosen_rewards.mean().item(),
            "reward_rejected": rejected_rewards.mean().item()}


def _messages(x) -> list[dict] | None:
    """[{role, content}] with string values, or None when x is not such a list."""
    if not isinstance(x, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in x]


def _split(x) -> tuple[list[dict], str] | None:
    """(the conversation before the reply, the reply) of a chosen / rejected value; a string is a bare reply."""
    if isinstance(x, str):
        return [], x
    msgs = _messages(x)
    if not msgs or msgs[-1]["role"] != "assistant":
        return None
    return msgs[:-1], msgs[-1]["content"]


def parse_pair(row, default_id: str) -> Pair | str:
    """A Pair from one row of a pairs file, or why it cannot be one (one of the reasons above)."""
    if not isinstance(row, dict):
        return BAD_JSON
    if "chosen" not in row or "rejected" not in row:
        return MISSING
    c, r = _split(row["chosen"]), _split(row["rejected"])
    if c is None or r is None:
        return MALFORMED
    if c[0] != r[0]:
        return DIFFERENT
    if c[0]:  # conversational form: the shared prefix is the prompt
        prompt = c[0]
    elif row.get("prompt") is None:
        return MISSING
    elif isinstance(row["prompt"], str):
        prompt = [{"role": "user", "content": row["prompt"]}]
    elif (prompt := _messages(row["prompt"])) is None:
        return MALFORMED
    if not prompt or prompt[-1]["role"] != "user":
        return NOT_USER
    if not c[1].strip() or not r[1].strip():
        return EMPTY
    if c[1] == r[1]:
        return SAME
    return Pair(prompt, c[1], r[1], default_id if row.get("id") is None else str(row["id"]))


def _rows(path: Path, skipped: Skipped):
    """(1-based line or row number, row) of a JSONL or Parquet file; bad JSON lines counted in `skipped`."""
    if path.suffix == ".parquet":
        yield from enumerate(read_parquet(path), 1)
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise QtError(f"cannot read the pairs file {path} ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            skipped[BAD_JSON] += 1


def read_pairs(path: str | Path) -> tuple[list[Pair], Skipped]:
    """The usable pairs of a JSONL / Parquet file, and how many rows were skipped for each reason."""
    path = Path(path)
    pairs, skipped = [], Skipped()
    for n, row in _rows(path, skipped):
        got = parse_pair(row, f"{path.name}:{n}")
        if isinstance(got, Pair):
            pairs.append(got)
        else:
            skipped[got] += 1
    if not pairs:
        raise QtError(f"{path} holds no usable preference pair: expected JSON Lines (or .parquet) {EXPECTED}; "
                      f"skipped: {skipped}")
    return pairs, skipped


def _last_run(mask: list[bool]) -> list[bool]:
    """Only the last contiguous run of True kept: the final assistant reply of a rendered conversation."""
    out, i = [False] * len(mask), len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = True
        i -= 1
    return out


def encode_pair(tokenizer, pair: Pair, max_len: int) -> Encoded | None:
    """Both conversations (prompt + reply) through `train.sft.render`, masks on the final reply only; None
    when either is longer than max_len tokens.

    render marks every assistant turn; of its mask only the last contiguous True run is kept, so earlier
    assistant turns of a multi-turn prompt are context, not trained on. (One render per side: no assumption
    that the prompt alone tokenizes to a prefix of the whole, which some templates break.)"""
    from train.sft import render

    sides = []
    for reply in (pair.chosen, pair.rejected):
        ids, mask = render(tokenizer, pair.prompt + [{"role": "assistant", "content": reply}])
        if len(ids) > max_len:
            return None
        if not any(mask):
            raise QtError("the chat template marks no assistant tokens: DPO needs to know which tokens are the reply")
        sides += [ids, _last_run(mask)]
    return Encoded(*sides, pair.id)


def encode_pairs(tokenizer, pairs: list[Pair], max_len: int) -> tuple[list[Encoded], Skipped]:
    """The pairs that fit in max_len tokens (both sides) encoded, and the count of those that do not."""
    out, skipped = [], Skipped()
    for p in pairs:
        e = encode_pair(tokenizer, p, max_len)
        if e is None:
            skipped[f"longer than {max_len} tokens"] += 1
        else:
            out.append(e)
    return out, skipped


def collate(batch: list[Encoded], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward's tensors for B pairs: inputs, targets, mask, each (2B, S-1), rows 0..B-1 the chosen and
    B..2B-1 the rejected sides, right-padded to the longest S. Position t predicts token t+1, so the mask
    is shifted with the targets; padding is masked out (and, on the right of a causal model, unseen)."""
    seqs = [e.chosen_ids for e in batch] + [e.rejected_ids for e in batch]
    masks = [e.chosen_mask for e in batch] + [e.rejected_mask for e in batch]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([m + [False] * (width - len(m)) for m in masks])
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def _write(path: Path, text: str) -> None:
    """Whole file to a temp name, then renamed: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _pair_row(rid: str, prompt: str, chosen: str, rejected: str, chosen_model: str, rejected_model: str,
              left: Skipped) -> dict | None:
    """A row to write, or None with the reason counted in `left`."""
    if not chosen.strip() or not rejected.strip():
        left[EMPTY] += 1
        return None
    if chosen == rejected:
        left[SAME] += 1
        return None
    return {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_model": chosen_model,
            "rejected_model": rejected_model}


def export_pairs(db_path: str | Path, out_path: str | Path) -> dict:
    """The arena's decided votes as pairs (winner a: reply_a chosen, reply_b rejected; b: the reverse); ties
    and both-bad votes, identical and empty replies left out and counted."""
    from app.votes import VoteStore

    if not Path(db_path).is_file():  # VoteStore would create an empty database there
        raise QtError(f"{db_path}: no such vote database (qt-serve writes one, see --arena-db)")
    votes = VoteStore(db_path).all()
    rows, left = [], Skipped()
    for v in votes:
        if v["winner"] in ("tie", "bad"):
            left["tie" if v["winner"] == "tie" else "both bad"] += 1
            continue
        w, lose = ("a", "b") if v["winner"] == "a" else ("b", "a")
        row = _pair_row(v["id"], v["prompt"], v[f"reply_{w}"], v[f"reply_{lose}"], v[f"model_{w}"],
                        v[f"model_{lose}"], left)
        if row:
            rows.append(row)
    if not rows:
        raise QtError(f"{db_path}: no preference pair in {len(votes)} vote(s) (left out: {left})")
    _write(Path(out_path), _jsonl(rows))
    return {"votes": len(votes), "pairs": len(rows), "left_out": dict(left)}


def alpaca_pairs(target, out_path: str | Path, limit: int | None = None, seed: int = 0, max_tokens: int = 512,
                 holdout: int = 0, against: str | None = None) -> dict:
    """Pairs on AlpacaEval's instructions: the baseline answer (GPT-4's, or `against`, a file
    `evals.alpaca.load_baseline` reads) chosen, `target`'s greedy reply (an `evals.target` Local / Remote)
    rejected.

    `holdout` instructions, drawn with `seed` from all of them (so the same whatever `limit`), are kept out
    and written to OUT_STEM.heldout.json as [{id, instruction, output}], which `qt-eval alpaca --against`
    takes: the trained model is then judged on instructions it never saw. Of the rest, the first `limit`
    in file order are answered. Ids are "alpaca-N", N the instruction's index in the baseline file."""
    from evals.alpaca import load_baseline
    from evals.target import TooLong, progress

    out = Path(out_path)
    base = load_baseline(against)
    if not 0 <= holdout < len(base):
        raise QtError(f"--holdout must be 0 or more and leave instructions to train on (there are {len(base)})")
    held = set(random.Random(seed).sample(range(len(base)), holdout))
    todo = [i for i in range(len(base)) if i not in held][:limit]
    replies = {}
    with progress(len(todo), "replies", "item") as bar:
        for j, reply in target.chat([[{"role": "user", "content": base[i]["instruction"]}] for i in todo],
                                    max_tokens):
            replies[todo[j]] = reply
            bar.update()
    rows, left = [], Skipped()
    for i in todo:
        if isinstance(replies[i], TooLong):
            left["prompt too long for the model"] += 1
            continue
        row = _pair_row(f"alpaca-{i}", base[i]["instruction"], base[i]["output"], replies[i],
                        against or "alpaca_eval_gpt4_baseline", target.name, left)
        if row:
            rows.append(row)
    if not rows:
        raise QtError(f"no preference pair from {len(todo)} instruction(s) (left out: {left})")
    _write(out, _jsonl(rows))
    result = {"instructions": len(base), "answered": len(todo), "pairs": len(rows), "left_out": dict(left)}
    if holdout:
        side = out.with_name(f"{out.stem}.heldout.json")
        _write(side, json.dumps([{"id": f"alpaca-{i}", **base[i]} for i in sorted(held)], ensure_ascii=False, indent=1) + "\n")
        result |= {"heldout": holdout, "heldout_file": str(side)}
    return result
