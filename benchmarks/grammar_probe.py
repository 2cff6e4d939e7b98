"""Grammar-constrained decoding probe: llguidance vs xgrammar vs outlines-core on JSON schemas.

    . .venv/bin/activate
    PYTHONPATH=/tmp/xg python benchmarks/grammar_probe.py [--tokenizer DIR] [--reps 3]

xgrammar and outlines-core are not project dependencies (xgrammar's metadata pulls triton); put them
aside with `pip install --target /tmp/xg --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
outlines-core==0.2.14`. A library that fails to import is skipped with the reason printed. For each library and each of 3 schemas (flat, nested, tool call) it times
the cold grammar compile and, walking a hand-written valid instance token by token (SmolLM2
tokenizer, no special tokens), the next-token bitmask (int32, (B, ceil(V/32))) + consume per step:
batch 1, and batch 16 (16 matchers on the same instance) sequentially and through the library's
parallel batch API where one exists. Every token is asserted allowed by its mask, and EOS at the end.
Then it times applying a mask to (B, V) fp32 logits with plain torch ops, and prints the CPU line.
"1st step" is the first mask + consume after compile: llguidance builds its lexer lazily, so much of
its compile cost lands there. Timings swing 2-3x with any other load on a small machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import tokenizers
import torch

V, EOS, B = 49152, 2, 16
W = (V + 31) // 32
THREADS = os.cpu_count() or 1
now = time.perf_counter


def timed(fn, *args):
    """(fn(*args), elapsed µs)."""
    t = now()
    out = fn(*args)
    return out, (now() - t) * 1e6

FLAT = {"type": "object", "additionalProperties": False,
        "required": ["name", "age", "role", "active"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "role": {"enum": ["admin", "editor", "viewer"]}, "active": {"type": "boolean"}}}
ITEM = {"type": "object", "additionalProperties": False, "required": ["sku", "qty", "price"],
        "properties": {"sku": {"type": "string", "maxLength": 12},
                       "qty": {"type": "integer", "minimum": 1, "maximum": 100},
                       "price": {"type": "number", "minimum": 0, "maximum": 10000}}}
NESTED = {"type": "object", "additionalProperties": False, "required": ["order_id", "customer", "items"],
          "properties": {
              "order_id": {"type": "string", "maxLength": 16},
              "customer": {"type": "object", "additionalProperties": False, "required": ["name", "email"],
                           "properties": {"name": {"type": "string", "maxLength": 40},
                                          "email": {"type": "string", "maxLength": 64}}},
              "items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 8}}}
TOOL = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
        "properties": {"name": {"const": "get_weather"},
                       "arguments": {"type": "object", "additionalProperties": False,
                                     "required": ["location", "unit", "days"],
                                     "properties": {"location": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 14}}}}}
CASES = {  # schema, valid instance (keys in schema order: outlines-core requires it)
    "flat": (FLAT, {"name": "Ada Lovelace", "age": 36, "role": "editor", "active": True}),
    "nested": (NESTED, {"order_id": "A-1042", "customer": {"name": "Grace Hopper", "email": "grace@navy.mil"},
                        "items": [{"sku": "KB-01", "qty": 2, "price": 49.5},
                                  {"sku": "MS-7", "qty": 1, "price": 19.99},
                                  {"sku": "USB-C-2M", "qty": 10, "price": 7}]}),
    "tool": (TOOL, {"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius", "days": 3}}),
}


class Llg:
    """llguidance: compile = JSON schema -> grammar + LLMatcher(); new matchers are deep_copy()s
    of the pristine compiled one (a fresh LLMatcher() would recompile)."""
    name, mods = "llguidance", ("llguidance", "llguidance.torch")

    def __init__(self, tk: tokenizers.Tokenizer):
        import llguidance
        import llguidance.torch as lt
        self.ll, self.lt = llguidance, lt
        self.tok = llguidance.LLTokenizer(tk.to_str(), n_vocab=V, eos_token=EOS)
        self.ex = llguidance.LLExecutor(num_threads=THREADS)

    def compile(self, schema):
        m = self.ll.LLMatcher(self.tok, self.ll.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, c): return c.deep_copy()
    def fill(self, m, mask, i): self.lt.fill_next_token_bitmask(m, mask, i)
    def consume(self, m, t): return m.consume_token(t) and not m.is_error()
    def finish(self, m): return m.is_accepting() and m.consume_token(EOS) and m.is_stopped()
    def fill_par(self, ms, mask): self.lt.fill_next_token_bitmask_par(self.ex, [(m, i) for i, m in enumerate(ms)], mask)
    def consume_par(self, ms, t): return all(self.lt.consume_token_par(self.ex, [(m, t) for m in ms]))


class Xgr:
    """xgrammar: TokenizerInfo (byte-level vocab, stop token given) + GrammarCompiler; matchers are cheap.
    Special tokens are blanked: given as text (as from_huggingface does), <|im_start|> etc. are allowed
    inside JSON strings; blank, they become special_token_ids and are never allowed."""
    name, mods = "xgrammar", ("xgrammar",)

    def __init__(self, tk: tokenizers.Tokenizer):
        import xgrammar
        self.x = xgrammar
        special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        vocab = [""] * V
        for s, i in tk.get_vocab().items():
            vocab[i] = "" if i in special else s
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[EOS])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=THREADS, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=THREADS)

    def compile(self, schema): return self.compiler.compile_json_schema(json.dumps(schema))
    def matcher(self, c): return self.x.GrammarMatcher(c)
    def fill(self, m, mask, i): m.fill_next_token_bitmask(mask, i)
    def consume(self, m, t): return m.accept_token(t)
    def finish(self, m): return m.is_completed() and m.accept_token(EOS) and m.is_terminated()
    def fill_par(self, ms, mask): self.batch.batch_fill_next_token_bitmask(ms, mask)
    def consume_par(self, ms, t): return all(self.batch.batch_accept_token(ms, [t] * len(ms)))


class Outlines:
    """outlines-core: schema -> regex -> token-level DFA Index over a Vocabulary of raw token bytes
    (special tokens left out; EOS must not be in the map). No batch API."""
    name, mods = "outlines-core", ("outlines_core",)

    def __init__(self, tk: tokenizers.Tokenizer):
        import outlines_core
        self.oc = outlines_core
        bs = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2 bytes_to_unicode, inverted
        rest = [b for b in range(256) if b not in bs]
        dec = {chr(b): b for b in bs} | {chr(256 + n): b for n, b in enumerate(rest)}
        special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        vmap: dict[bytes, list[int]] = {}
        for s, i in tk.get_vocab().items():
            if i not in special:
                vmap.setdefault(bytes(dec[ch] for ch in s), []).append(i)
        self.vocab = outlines_core.Vocabulary(EOS, vmap)

    def compile(self, schema):
        return self.oc.Index(self.oc.json_schema.build_regex_from_schema(json.dumps(schema)), self.vocab)

    def matcher(self, c): return self.oc.Guide(c)
    def fill(self, m, mask, i): m.write_mask_into(mask[i].data_ptr(), W, 4)
    def consume(self, m, t): return m.advance(t, return_tokens=False) is None  # raises on a bad token
    def finish(self, m): return m.is_finished()  # advance(EOS) raises: Index.next_state(_, eos) is None
    fill_par = consume_par = None


def walk(lib, ms, ids, fill, consume) -> list[float]:
    """Per-step µs of fill(all matchers) + consume(all matchers) along ids; asserts masks allow ids and EOS."""
    mask = torch.full((len(ms), W), -1, dtype=torch.int32)
    mv, steps = mask.numpy(), []
    for t in ids:
        _, fill_us = timed(fill, ms, mask)
        assert all((mv[r, t >> 5] >> (t & 31)) & 1 for r in range(len(ms))), f"{lib.name}: token {t} masked"
        assert steps or sum((int(w) & 0xFFFFFFFF).bit_count() for w in mv[0]) < 100, "first mask not selective"
        ok, consume_us = timed(consume, ms, t)
        assert ok, f"{lib.name}: token {t} rejected"
        steps.append(fill_us + consume_us)
    fill(ms, mask)
    assert all((mv[r, EOS >> 5] >> (EOS & 31)) & 1 for r in range(len(ms))), f"{lib.name}: EOS masked at end"
    assert all(lib.finish(m) for m in ms), f"{lib.name}: not complete/stopped after EOS"
    return steps


def stats(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=10)
    return f"{statistics.median(xs):.0f} / {q[-1]:.0f}"


def probe(lib, tk, reps: int) -> list[str]:
    rows = []
    for name, (schema, inst) in CASES.items():
        ids = tk.encode(json.dumps(inst), add_special_tokens=False).ids
        c, comp_us = timed(lib.compile, schema)
        ms, mk_us = timed(lambda: [lib.matcher(c) for _ in range(B)])
        seq_fill = lambda ms, mask: [lib.fill(m, mask, i) for i, m in enumerate(ms)]  # noqa: E731
        seq_cons = lambda ms, t: all([lib.consume(m, t) for m in ms])  # noqa: E731
        b1 = [s for _ in range(reps) for s in walk(lib, [lib.matcher(c)], ids, seq_fill, seq_cons)]
        first_us = b1[0]  # first mask + consume after compile: lazy work lands here
        seq = walk(lib, ms, ids, seq_fill, seq_cons)
        par = "—"
        if lib.fill_par:
            par = stats(walk(lib, [lib.matcher(c) for _ in range(B)], ids, lib.fill_par, lib.consume_par))
        rows.append(f"| {lib.name} | {name} | {len(ids)} | {comp_us / 1e3:.1f} | {first_us:.0f} | {mk_us / B:.0f} | {stats(b1)} | {stats(seq)} | {par} |")
    return rows


def apply_mask(logits: torch.Tensor, mask: torch.Tensor, shifts=torch.arange(32, dtype=torch.int32)) -> None:
    bits = (mask.unsqueeze(-1) >> shifts) & 1  # (B, W, 32), bit k of word w is token 32w+k
    logits.masked_fill_(bits.view(mask.shape[0], -1)[:, : logits.shape[1]] == 0, float("-inf"))


def time_apply(fn, b: int, iters: int = 200) -> float:
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(-2**31, 2**31 - 1, (b, W), dtype=torch.int32, generator=g)
    logits = torch.randn(b, V, generator=g)
    ref = logits.clone()
    fn(ref, mask)
    allowed = sum(bin(int(w) & 0xFFFFFFFF).count("1") for w in mask.flatten())
    assert int(torch.isfinite(ref).sum()) == allowed, "mask application disagrees with popcount"
    return statistics.median(timed(fn, logits.clone(), mask)[1] for _ in range(iters))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=Path.home() / ".cache/qt/models/SmolLM2-135M-Instruct")
    ap.add_argument("--reps", type=int, default=3, help="batch-1 walks per schema (fresh matcher each)")
    a = ap.parse_args()
    tk = tokenizers.Tokenizer.from_file(str(a.tokenizer / "tokenizer.json"))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}; {THREADS} logical CPUs; torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}")
    applied = ", ".join(f"B={b}: {time_apply(apply_mask, b):.0f}" for b in (1, B))  # before any library's threads
    rows, notes = [], []
    for cls in (Llg, Xgr, Outlines):
        try:
            _, imp_us = timed(lambda: [importlib.import_module(m) for m in cls.mods])
            lib, info_us = timed(cls, tk)
            notes.append(f"{cls.name}: import {imp_us / 1e3:.0f} ms, tokenizer info {info_us / 1e3:.0f} ms")
        except Exception as e:  # ImportError, or a missing native dependency
            print(f"skip {cls.name}: {type(e).__name__}: {e}")
            continue
        rows += probe(lib, tk, a.reps)
    print("\n".join(notes) + f"\nparallel APIs use {THREADS} threads; 2-value µs cells are median / p90 over steps\n")
    print("| library | schema | tokens | compile ms | 1st step µs | new matcher µs | per-token µs, B=1 "
          f"| per-step µs, B={B} sequential | per-step µs, B={B} parallel |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nmask apply to (B, {V}) fp32 logits, plain torch (shift, &1, masked_fill_), median µs: "
          + applied)
    if "xgrammar" in sys.modules:  # for comparison: xgrammar's native CPU kernel
        xa = lambda x, m: sys.modules["xgrammar"].apply_token_bitmask_inplace(x, m)  # noqa: E731
        print("  xgrammar.apply_token_bitmask_inplace (CPU kernel), median µs: "
              + ", ".join(f"B={b}: {time_apply(xa, b):.0f}" for b in (1, B)))


if __name__ == "__main__":
    main()
