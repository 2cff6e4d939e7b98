"""Conversations for supervised fine-tuning: chat files in five formats, SQuAD / XSum as instructions, a mix.

    chats, skipped = read_chats("chats.jsonl")             # [[{"role", "content"}, ...], ...], Skipped
    chats, skipped, dropped = builtin_chats("squad")       # SQuAD dev less the items qt-eval squad holds out
    chats, record = mix(parse_sources("chats.jsonl=2,squad"), total=0, seed=0)   # record: the run's mix.json

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}: an optional system
turn first, then user and assistant turns alternating, starting with the user and ending with the assistant.

Files: JSON lines (.jsonl, .json; a .json file that is one JSON array or object is read as its rows) or
Parquet (.parquet, a column per field). A directory is its files with those suffixes, sorted; not its
subdirectories (a dataset's train/ and validation/ stay apart). Each file's format is that of its first row
whose keys fit one, or `fmt`:

  messages    OpenAI's chat format; a content that is a list of parts is its text parts joined (as qt-serve does)
              {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]}
  alpaca      user = instruction + "\\n\\n" + input (just the instruction when input is empty or absent);
              Dolly's names (context, response) too; an optional system turn
              {"instruction": "Name a colour.", "input": "", "output": "Red.", "system": "Answer in one word."}
              {"instruction": "Who wrote it?", "context": "Hamlet is a play ...", "response": "Shakespeare."}
  sharegpt    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
  oasst       OpenAssistant's messages, one per row (parent_id null at a tree's root):
              {"message_id": "m2", "parent_id": "m1", "role": "assistant", "text": "Hello.", "lang": "en",
               "deleted": false, "rank": 0}
              or its tree export, one tree per row:
              {"prompt": {"role": "prompter", "text": "Hi", "replies": [{"role": "assistant", "text": "Hello.",
                                                                          "replies": []}]}}
  completion  {"prompt": "Two plus two is", "completion": "four."}

Roles: user / human / prompter -> user; assistant / gpt / chatgpt / bard / bing / model -> assistant;
system / developer -> system; any other (e.g. "tool") leaves the row out, naming the role.
Every content is stripped of surrounding whitespace. An empty system turn is dropped; a trailing user turn
is dropped (nothing answers it). A row that still breaks the shape above is left out, not repaired:
consecutive turns of one role are not merged (a join would put a separator in the text that the data never
had; FastChat skips such rows too). Rows left out are counted by reason in `Skipped`, with the first few
places ("chats.jsonl:7", "chats.parquet row 3").

OASST trees become one thread per deepest assistant reply (one with no assistant reply below it): the path
from the root to it, every reply kept whatever its rank or language (each thread trains the replies above
its end again, as one-thread-per-leaf flattening does). A deleted message, a reply of its parent's own role
and a message left out take their subtrees with them; a prompter message nobody answered is counted.

Built-in sources `squad` and `xsum`: the data of `qt-eval squad` / `qt-eval xsum` (`evals/genqa.py`, same
file, reader and prompts), user turn = the evaluation's prompt, assistant turn = the first reference answer
(SQuAD) or the reference summary (XSum). The items the evaluation scores by default (genqa.select(items,
200, 0)) are left out, and with them every item sharing a held-out item's passage (SQuAD's context, XSum's
article), so no evaluated passage is trained on. They are held-out splits (SQuAD dev, XSum test), so
training on the rest is training on the evaluation's own distribution: say so when reporting its scores.

Mix: sources "SPEC[=WEIGHT],..." with SPEC `squad`, `xsum`, `squad:FILE` / `xsum:FILE` (the task read from
a file in genqa's --data formats) or a chat file / directory; WEIGHT a positive number, default 1. Weights
are shares: source i gets total * w_i / sum(w) conversations (largest remainders, so they add up to total).
total 0 takes the largest mix that repeats nothing: the source with the fewest rows for its weight is used
once, the others are subsampled at the weight ratio (one source alone: all its rows once). A source asked
for more than it has is cycled: each pass is a fresh seeded permutation of its rows. Draws are seeded per
source (by seed and spec) and the result is shuffled with the seed; repeated conversations are the same
list objects.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from qt_serve.errors import QtError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Chat = list[Message]

ROLES = {"user": "user", "human": "user", "prompter": "user",
         "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "bing": "assistant", "model": "assistant",
         "system": "system", "developer": "system"}
SUFFIXES = (".jsonl", ".json", ".parquet")
FIELDS = {  # what the "no usable rows" error shows of each format
    "messages": '{"messages": [{"role", "content"}, ...]}',
    "alpaca": '{"instruction", "input" (optional), "output", "system" (optional)} or Dolly\'s '
              '{"instruction", "context", "response"}',
    "sharegpt": '{"conversations": [{"from", "value"}, ...]}',
    "oasst": '{"message_id", "parent_id", "role", "text", "deleted" (optional)} per message, or trees '
             '{"prompt": {"role", "text", "replies": [...]}}',
    "completion": '{"prompt", "completion"}',
}
BUILTIN = ("squad", "xsum")
# qt-eval squad / xsum's defaults for --limit and --seed (evals/cli.py): the items they score.
HOLDOUT, HOLDOUT_SEED = 200, 0
SHOWN = 3  # places kept per skip reason


class Skipped(Counter):
    """Reason -> rows left out, read as "3 with no assistant turn"; `where` keeps each reason's first places."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.where: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self[reason] += 1
        places = self.where.setdefault(reason, [])
        if len(places) < SHOWN:
            places.append(where)

    def merge(self, other: Skipped) -> None:
        for reason, n in other.items():
            self[reason] += n
            self.where[reason] = (self.where.get(reason, []) + other.where.get(reason, []))[:SHOWN]

    def __str__(self):
        def places(reason, n):
            shown = self.where.get(reason, [])
            more = ", ..." if n > len(shown) else ""
            return f" ({', '.join(shown)}{more})" if shown else ""

        return ", ".join(f"{n} {why}{places(why, n)}" for why, n in self.most_common()) or "none"


class _Skip(Exception):
    """A row left out; the message is the reason as it reads after a count ("3 with empty content")."""


# ---- one conversation --------------------------------------------------------------------------------


def _text(content, empty_ok: bool = False) -> str:
    """A turn's content: a string, or OpenAI's list of parts (its text parts joined); stripped."""
    if isinstance(content, list):
        content = "".join(p["text"] for p in content
                          if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    if content is not None and not isinstance(content, str):
        raise _Skip("with a content that is not a string")
    content = (content or "").strip()
    if not content and not empty_ok:
        raise _Skip("with empty content")
    return content


def _role(name) -> str:
    if not (isinstance(name, str) and name in ROLES):
        raise _Skip(f"with unknown role {name!r}")
    return ROLES[name]


def _chat(turns: list[tuple]) -> Chat:
    """(role as written, content) pairs -> a conversation of the shape in the module docstring, or _Skip."""
    out = []
    for name, content in turns:
        role = _role(name)
        text = _text(content, empty_ok=role == "system")
        if role == "system":
            if out:
                raise _Skip("with a system turn after the start")
            if text:
                out.append({"role": role, "content": text})
            continue
        if out and out[-1]["role"] == role:
            raise _Skip(f"with consecutive {role} turns")
        if role == "assistant" and not (out and out[-1]["role"] == "user"):
            raise _Skip("starting with an assistant turn")
        out.append({"role": role, "content": text})
    if out and out[-1]["role"] == "user":
        out.pop()
    if not any(m["role"] == "assistant" for m in out):
        raise _Skip("with no assistant turn")
    return out


def _get(row: dict, *keys):
    """The value of the first of `keys` the row has (a null counts as absent: Parquet fills missing fields)."""
    for k in keys:
        if row.get(k) is not None:
            return row[k]
    raise _Skip("missing " + " or ".join(f"'{k}'" for k in keys))


def _list(row: dict, key: str) -> list:
    turns = _get(row, key)
    if not isinstance(turns, list):
        raise _Skip(f"with '{key}' not a list")
    return turns


def _turn(t, role: str, content: str) -> tuple:
    if not isinstance(t, dict):
        raise _Skip("with a turn that is not an object")
    for k in (role, content):
        if k not in t:
            raise _Skip(f"with a turn missing '{k}'")
    return t[role], t[content]


def _messages(row: dict) -> Chat:
    return _chat([_turn(t, "role", "content") for t in _list(row, "messages")])


def _sharegpt(row: dict) -> Chat:
    return _chat([_turn(t, "from", "value") for t in _list(row, "conversations")])


def _alpaca(row: dict) -> Chat:
    instruction = _text(_get(row, "instruction"))
    extra = row.get("input") if row.get("input") is not None else row.get("context")  # Dolly's name
    extra = _text(extra, empty_ok=True)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return _chat([("system", row.get("system")), ("user", user), ("assistant", _get(row, "output", "response"))])


def _completion(row: dict) -> Chat:
    return _chat([("user", _get(row, "prompt")), ("assistant", _get(row, "completion"))])


READERS = {"messages": _messages, "alpaca": _alpaca, "sharegpt": _sharegpt, "completion": _completion}


# ---- OpenAssistant trees -----------------------------------------------------------------------------


@dataclass
class _Node:
    parent: object  # its parent's key; None at a root
    role: str
    text: str
    where: str
    deleted: bool


def _unroll(rows: list[tuple[str, dict]], skipped: Skipped) -> list[tuple]:
    """Flat rows and exported trees alike -> (key, parent key, where, message) per message, in file order."""
    out = []
    for where, row in rows:
        if not isinstance(row.get("prompt"), dict):  # a flat message row
            out.append((row.get("message_id"), row.get("parent_id"), where, row))
            continue
        stack = [(row["prompt"], None)]  # a tree: its messages get keys "WHERE#N", unique within the file
        while stack:
            m, parent = stack.pop()
            key = f"{where}#{len(out)}"
            out.append((key, parent, where, m))
            replies = m.get("replies") or []
            if not isinstance(replies, list):
                skipped.add("with 'replies' not a list", where)
                replies = []
            for r in reversed(replies):
                if isinstance(r, dict):
                    stack.append((r, key))
                else:
                    skipped.add("with a reply that is not an object", where)
    return out


def _oasst(rows: list[tuple[str, dict]], skipped: Skipped) -> list[Chat]:
    nodes: dict[object, _Node] = {}
    bad, kids = set(), defaultdict(list)  # bad: keys of messages left out; kids: parent key -> child keys
    for key, parent, where, m in _unroll(rows, skipped):
        try:
            if key is None:
                raise _Skip("missing 'message_id'")
            if not isinstance(key, (str, int)) or not isinstance(parent, (str, int, type(None))):
                raise _Skip("with a message_id or parent_id that is not a string")
            if key in nodes or key in bad:
                raise _Skip("with a message_id seen before")
            nodes[key] = _Node(parent, _role(_get(m, "role")), _text(_get(m, "text")), where, bool(m.get("deleted")))
            kids[parent].append(key)
        except _Skip as e:
            skipped.add(str(e), where)
            if isinstance(key, (str, int)):
                bad.add(key)

    # Walk every root -> leaf path; each is cut after its last assistant reply ("ends": end key -> path).
    ends, inner, done = {}, set(), set()  # inner: assistant replies with another below them on some path;
    # done: messages walked or counted as left out
    stack = [(k, ()) for k in reversed(kids[None]) if not nodes[k].deleted]
    while stack:
        key, path = stack.pop()
        done.add(key)
        path += (key,)
        below = []
        for k in kids[key]:
            if nodes[k].deleted:
                continue
            if nodes[k].role == nodes[key].role:  # left out with its subtree; the path above it still counts
                skipped.add(f"with consecutive {nodes[k].role} turns", nodes[k].where)
                done.add(k)
            else:
                below.append(k)
        stack += [(k, path) for k in reversed(below)]
        if below:
            continue
        if nodes[key].role == "user":
            skipped.add("with no assistant reply", nodes[key].where)
        cut = [i for i, k in enumerate(path) if nodes[k].role == "assistant"]
        if cut:
            ends[path[cut[-1]]] = path[:cut[-1] + 1]
            inner.update(path[i] for i in cut[:-1])
    for key, n in nodes.items():
        if key not in done:
            skipped.add("deleted" if n.deleted else "below a message left out" if n.parent in nodes or n.parent in bad
                        else "whose parent is not in the file", n.where)

    chats = []
    for end, path in ends.items():
        if end not in inner:
            try:
                chats.append(_chat([(nodes[k].role, nodes[k].text) for k in path]))
            except _Skip as e:
                skipped.add(str(e), nodes[end].where)
    return chats


# ---- files -------------------------------------------------------------------------------------------


def read_parquet(path: Path) -> list[dict]:
    """A Parquet file's rows as dicts (pyarrow; a missing pyarrow or a corrupt file is a QtError)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QtError(f"reading {path} needs pyarrow: pip install pyarrow==26.0.1") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid etc. for a corrupt file
        raise QtError(f"{path} is not a readable Parquet file ({e})") from None


def _load(path: Path, skipped: Skipped) -> tuple[list[tuple[str, dict]], int]:
    """The file's rows that are JSON objects as (where, row), and how many rows it has in all."""
    if path.suffix == ".parquet":
        rows = [(f"{path.name} row {i}", r) for i, r in enumerate(read_parquet(path), 1)]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise QtError(f"{path} is not UTF-8 text ({e})") from None
        rows = _json(path, text)
    keep = []
    for where, r in rows:
        if isinstance(r, dict):
            keep.append((where, r))
        else:
            skipped.add("not JSON" if r is _BAD else "not an object", where)
    return keep, len(rows)


_BAD = object()  # a line that is not JSON


def _json(path: Path, text: str) -> list[tuple[str, object]]:
    """(where, value) per row: a .json file's array items (or its one object), else one per non-empty line."""
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines
        if whole is not None:
            return [(f"{path.name} item {i}", r) for i, r in enumerate(whole if isinstance(whole, list) else [whole], 1)]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path.name}:{i}", json.loads(line)))
            except json.JSONDecodeError:
                rows.append((f"{path.name}:{i}", _BAD))
    return rows


def _detect(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "message_id" in row or isinstance(row.get("prompt"), dict):
        return "oasst"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completion"
    return None


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in SUFFIXES and not f.name.startswith("."))
        if not files:
            raise QtError(f"{path} holds no {', '.join(SUFFIXES)} files (subdirectories are not read)")
        return files
    if not path.is_file():
        raise QtError(f"{path}: no such file or directory")
    if path.suffix not in SUFFIXES:
        raise QtError(f"{path}: a chat file is JSON lines (.jsonl, .json) or Parquet (.parquet)")
    return [path]


def _rows(rows: list[tuple[str, dict]], read, skipped: Skipped) -> list[Chat]:
    out = []
    for where, row in rows:
        try:
            out.append(read(row))
        except _Skip as e:
            skipped.add(str(e), where)
    return out


def read_chats(path, fmt: str = "auto") -> tuple[list[Chat], Skipped]:
    """The conversations in a file or directory, and what was left out; a file with none is a QtError."""
    if fmt != "auto" and fmt not in FIELDS:
        raise QtError(f"unknown chat format {fmt!r}; one of auto, {', '.join(FIELDS)}")
    chats, skipped = [], Skipped()
    for f in _files(Path(path)):
        here = Skipped()
        rows, total = _load(f, here)
        form = fmt if fmt != "auto" else next(filter(None, (_detect(r) for _, r in rows)), None)
        if form is None:
            for where, _ in rows:
                here.add("with the fields of no format", where)
        got = [] if form is None else _oasst(rows, here) if form == "oasst" else _rows(rows, READERS[form], here)
        if not got:
            how = f"format {form} ({'detected' if fmt == 'auto' else 'given'})" if form else \
                "no row has the fields of any format"
            raise QtError(f"{f}: no usable conversation in its {total} rows; {how}; left out: {here}.\n"
                          "The formats and their fields:\n" + "\n".join(f"  {k}: {v}" for k, v in FIELDS.items()))
        chats += got
        skipped.merge(here)
    return chats, skipped


# ---- SQuAD and XSum ----------------------------------------------------------------------------------


def builtin_chats(name: str, holdout: int = HOLDOUT, seed: int = HOLDOUT_SEED, path=None,
                  ) -> tuple[list[Chat], Skipped, dict]:
    """qt-eval's SQuAD / XSum items as conversations, less the `holdout` items it scores with `seed` (its
    --limit and --seed) and every item sharing a passage with them; `path`: genqa's --data instead of the
    built-in file. Returns the conversations, what was skipped, and what was held out (for mix.json)."""
    from evals import genqa
    from qt_serve import hub

    if name not in BUILTIN:
        raise QtError(f"no built-in source {name!r}; one of {', '.join(BUILTIN)}")
    task = genqa.TASKS[name]
    file = Path(path) if path else hub.fetch_file(task.data)  # what `qt-eval squad/xsum [--data]` reads
    if not file.is_file():
        raise QtError(f"{name}: {file}: no such file")
    items = task.read(file)
    held = {id(it) for it in genqa.select(items, holdout, seed)}  # select returns the items themselves
    passages = _passages(name, file, items)
    shut = {p for it, p in zip(items, passages) if id(it) in held}
    keep = [it for it, p in zip(items, passages) if p not in shut]
    if not keep:
        raise QtError(f"{name}: nothing left to train on: the {len(held)} of {len(items)} items qt-eval scores "
                      f"with --limit {holdout} --seed {seed} (0: all) and those sharing their passages are all")
    chats, skipped = [], Skipped()
    for it in keep:
        try:
            chats.append(_chat([("user", it.prompt), ("assistant", it.refs[0] if it.refs else "")]))
        except _Skip as e:
            skipped.add(str(e), f"item {it.id}")
    dropped = {"data": str(path or task.data), "items": len(items), "limit": holdout, "seed": seed,
               "heldout": len(held), "same_passage": len(items) - len(keep) - len(held)}
    return chats, skipped, dropped


def _passages(name: str, path: Path, items: list) -> list[str]:
    """Each item's passage: XSum's article; SQuAD's context, in read_squad's order (data / paragraphs / qas)."""
    if name == "xsum":
        return [it.shown for it in items]
    data = json.loads(path.read_text(encoding="utf-8"))
    return [p["context"].strip() for a in data["data"] for p in a["paragraphs"] for _ in p["qas"]]


# ---- the mix -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str  # squad, xsum, or the file's / directory's name
    spec: str  # as written: squad, xsum, squad:FILE, xsum:FILE, or a path
    weight: float = 1.0


def _builtin(spec: str) -> tuple[str, str | None] | None:
    """(task, file or None) for squad, xsum, squad:FILE, xsum:FILE; None for a chat file."""
    name, _, file = spec.partition(":")
    return (name, file or None) if name in BUILTIN and not Path(spec).exists() else None


def parse_sources(text: str) -> list[Source]:
    """"chats.jsonl=2,xsum=1,squad" -> Sources (weight 1 when not given); a bad or repeated source is a QtError."""
    out = []
    for part in text.split(","):
        spec, weight = part.strip(), "1"
        if "=" in spec and not Path(spec).exists():  # a path may hold "=" itself
            spec, weight = (s.strip() for s in spec.rsplit("=", 1))
        if not spec:
            raise QtError(f"sources {text!r}: an empty source; write SPEC[=WEIGHT],... with SPEC squad, xsum, "
                          "squad:FILE, xsum:FILE or a .jsonl / .json / .parquet file or directory")
        try:
            w = float(weight)
        except ValueError:
            w = math.nan
        if not 0 < w < math.inf:
            raise QtError(f"source {spec!r}: weight {weight!r} is not allowed; a weight is a positive number "
                          f"(e.g. {spec}=0.5), 1 when left out")
        if spec in (s.spec for s in out):
            raise QtError(f"source {spec!r} is listed twice; give it once, with a weight")
        b = _builtin(spec)
        out.append(Source(b[0] if b else Path(spec).name or spec, spec, w))
    return out


def mix(sources: list[Source], total: int = 0, seed: int = 0, holdout: int = HOLDOUT,
        holdout_seed: int = HOLDOUT_SEED) -> tuple[list[Chat], dict]:
    """`total` conversations (0: the largest mix with no repeats) from the sources at their weights, shuffled;
    and the record of it for the run directory. holdout / holdout_seed: see builtin_chats."""
    if not sources:
        raise QtError("no sources to mix")
    if total < 0:
        raise QtError(f"the mix's total must be 0 (no repeats) or more, got {total}")
    pools, skips, dropped = [], [], {}
    for s in sources:
        b = _builtin(s.spec)
        if b:
            chats, skipped, dropped[s.spec] = builtin_chats(b[0], holdout, holdout_seed, b[1])
        else:
            chats, skipped = read_chats(s.spec)
        pools.append(chats)
        skips.append(skipped)

    # Shares in exact fractions: total * w_i / sum(w), floored, the remainder to the largest fractional parts.
    ws = [Fraction(s.weight) for s in sources]
    wsum = sum(ws)
    total = total or min(len(p) * wsum // w for p, w in zip(pools, ws))
    share = [total * w / wsum for w in ws]
    used = [math.floor(x) for x in share]
    for i in sorted(range(len(ws)), key=lambda i: used[i] - share[i])[:total - sum(used)]:
        used[i] += 1

    out, rec = [], []
    for s, pool, n, skipped in zip(sources, pools, used, skips):
        rng = random.Random(f"{seed}:{s.spec}")
        order = []
        while len(order) < n:  # one seeded permutation per pass
            order += rng.sample(range(len(pool)), len(pool))
        out += [pool[i] for i in order[:n]]
        rec.append({"name": s.name, "spec": s.spec, "weight": s.weight, "rows": len(pool), "used": n,
                    "passes": -(-n // len(pool)), "skipped": dict(skipped)})
    random.Random(seed).shuffle(out)
    return out, {"sources": rec, "total": total, "seed": seed, "dropped_heldout": dropped}
