"""Serving-core measurements: batch-1 decode vs HF, batch-16 step vs batch-1, qt-serve vs in-process.

    python benchmarks/serving_core.py decode [--model 125M] [--rounds 5]
    python benchmarks/serving_core.py batch  [--model 125M] [--rounds 4]
    python benchmarks/serving_core.py serve  [--model 125M] [--rounds 3]
    python benchmarks/serving_core.py all

Every section prints the CPU's AVX flags and the ISA torch/MKL/oneDNN run at. To run the
AVX2-only code paths on an AVX-512 machine, prefix the command with
`ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2` (it applies to
HF as much as to qt; the memory system stays this machine's).

decode: random-weight Llama (evals/bench.py CONFIGS), 128-token prompt, --new-tokens greedy
  tokens, fp32. HF `generate` (dynamic and static cache) against qt's cached decode loop on
  each forced fast.py path and on the `auto` choice, the engines interleaved round by round
  (a noisy neighbour hits all alike); best and median decode tok/s per engine.
batch: one decode step at batch 16 vs batch 1, through `Transformer.forward` with
  `KVCache.rows(0, 16)` and through `RaggedBatch`, for each multi-row product (QT_GEMM path);
  median step times, and a profile of where the batch-16 step goes. Also the attention
  prototype: grouped-query attention as two batched matmuls instead of SDPA(enable_gqa, mask).
serve: batch-1 streaming through a real `qt-serve` subprocess (httpx, SSE) vs `LLM.stream`
  in-process on the same checkpoint, under several settings: environment variables (thread /
  OpenMP / kernel choices) and `models=N` (a server holding N models, requests to one).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evals.bench import CONFIGS, hf_twin, serving  # noqa: E402
from qt_serve import checkpoint, fast  # noqa: E402
from qt_serve.kv import KVCache, RaggedBatch  # noqa: E402
from qt_serve.model import Transformer  # noqa: E402

ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OMP_WAIT_POLICY",
           "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "QT_GEMV", "QT_GEMM")


def header(title: str) -> None:
    print(f"\n== {title} ==")
    print("cpu:", fast.cpu_name(), "| flags:", " ".join(fast.cpu_flags()))
    env = {k: os.environ[k] for k in ISA_ENV if k in os.environ}
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, env {env or '{}'}", flush=True)


def random_model(name: str, max_seq_len: int = 512) -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIGS[name], max_seq_len=max_seq_len).eval()


# ---- (1) batch-1 decode vs HF ------------------------------------------------------------


def qt_decode(model, prompt: list[int], new_tokens: int) -> float:
    """Seconds for new_tokens - 1 greedy cached decode steps after the prefill (as LLM does)."""
    cache = KVCache(model.config, 1, len(prompt) + new_tokens + 1)
    n = len(prompt)
    logits = model(torch.tensor([prompt]), torch.arange(n)[None], cache, logit_index=torch.tensor([[n - 1]]))
    tok = int(logits[0, -1].argmax())
    start = time.perf_counter()
    for i in range(new_tokens - 1):
        logits = model(torch.tensor([[tok]]), torch.tensor([[n + i]]), cache)
        tok = int(logits[0, -1].argmax())
    return time.perf_counter() - start


def hf_decode(hf, prompt: list[int], new_tokens: int, static: bool) -> float:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"
    start = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    first = time.perf_counter() - start
    start = time.perf_counter()
    hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    return time.perf_counter() - start - first


def decode(args) -> dict:
    header(f"(1) batch-1 decode, random {args.model}, prompt {args.prompt}, {args.new_tokens} new tokens")
    torch.set_grad_enabled(False)
    base = random_model(args.model)
    hf = hf_twin(checkpoint.Checkpoint(base, None, {}, args.model))
    engines = {"HF dynamic": lambda p, n: hf_decode(hf, p, n, False),
               "HF static": lambda p, n: hf_decode(hf, p, n, True)}
    t0 = time.perf_counter()
    auto = fast.optimize_for_decode(copy.deepcopy(base))
    print(f"auto: {auto.decode_paths} ({time.perf_counter() - t0:.1f} s incl. any measuring)", flush=True)
    engines[f"qt auto={auto.decode_paths['gemv']}"] = lambda p, n, m=auto: qt_decode(m, p, n)
    for path in args.paths:
        m = fast.optimize_for_decode(copy.deepcopy(base), gemv=path, gemm="linear")
        engines[f"qt {path}"] = lambda p, n, m=m: qt_decode(m, p, n)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base.config.vocab_size, (args.prompt,), generator=g).tolist()
    for fn in engines.values():
        fn(prompt[:16], 4)  # warm-up
    tps = {k: [] for k in engines}
    for r in range(args.rounds):
        for k, fn in engines.items():
            tps[k].append((args.new_tokens - 1) / fn(prompt, args.new_tokens))
    hf_best = max(max(tps["HF dynamic"]), max(tps["HF static"]))
    hf_med = max(statistics.median(tps["HF dynamic"]), statistics.median(tps["HF static"]))
    rows = {}
    for k, v in tps.items():
        best, med = max(v), statistics.median(v)
        rows[k] = {"best": best, "median": med, "runs": v}
        print(f"{k:>22}: best {best:6.1f} tok/s  median {med:6.1f}  | ×{best / hf_best:4.2f} best HF (best), "
              f"×{med / hf_med:4.2f} (medians)   runs {' '.join(f'{x:.1f}' for x in v)}", flush=True)
    return rows


# ---- (2) batch-16 step vs batch-1 ------------------------------------------------------------


def grouped_attention(q, k, v, mask):
    """SDPA for GQA as two batched matmuls over (B, Hkv, G·S, D): no K/V expansion; mask (B,1,S,L) bool or None."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * S, D)
    s = torch.matmul(qg, k.transpose(-1, -2)) * D ** -0.5  # (B, Hkv, G·S, L)
    if mask is not None:
        s = s.view(B, Hkv, G, S, -1).masked_fill(~mask[:, :, None], float("-inf")).view(B, Hkv, G * S, -1)
    return torch.matmul(torch.softmax(s, -1), v).view(B, H, S, D)


def patch_attention():
    """Monkeypatch kv.BatchAttention / RaggedBatch for the decode steps of this benchmark (S = 1 per row):
    KV writes as one index_copy_ on a flat view, attention as grouped matmuls."""
    from qt_serve import kv

    orig_b, orig_r = kv.BatchAttention.__call__, kv.RaggedBatch.__call__

    def batch_call(self, layer, q, k, v):
        B, Hkv, S, D = k.shape
        if S != 1 or B == 1:
            return orig_b(self, layer, q, k, v)
        ck, cv = self.cache.k[layer, :B], self.cache.v[layer, :B]
        T = ck.shape[2]
        idx = ((torch.arange(B)[:, None] * Hkv + torch.arange(Hkv)) * T + self.pos).reshape(-1)  # (B·Hkv,)
        ck.view(-1, D).index_copy_(0, idx, k.reshape(-1, D))
        cv.view(-1, D).index_copy_(0, idx, v.reshape(-1, D))
        L = self.length
        return grouped_attention(q, ck[:, :, :L], cv[:, :, :L], self.masks[self.cache.windows[layer]])

    kv.BatchAttention.__call__ = batch_call
    return lambda: (setattr(kv.BatchAttention, "__call__", orig_b), setattr(kv.RaggedBatch, "__call__", orig_r))


def batch(args) -> dict:
    header(f"(2) decode step time, batch 16 vs batch 1, random {args.model}, context {args.context}")
    torch.set_grad_enabled(False)
    base = random_model(args.model, max_seq_len=args.context + 64)
    cfg = base.config
    B = 16
    models = {g: fast.optimize_for_decode(copy.deepcopy(base), gemv=args.gemv, gemm=g) for g in fast.GEMM_PATHS}
    models["legacy split bmm"] = legacy_split(copy.deepcopy(base))
    del base
    cache = KVCache(cfg, B, args.context + 64)
    pos16 = torch.full((B, 1), args.context) - torch.arange(B)[:, None] * 3  # ragged lengths
    tok16 = torch.ones(B, 1, dtype=torch.long)

    def plain(m, b):
        m(tok16[:b], pos16[:b], cache.rows(0, b))

    def ragged(m, b):
        m(tok16[:b].view(1, b), pos16[:b].view(1, b), RaggedBatch(cache, list(range(b)), pos16[:b].tolist()))

    cases = [(name, kind, fn, b) for name in models for kind, fn in (("plain", plain), ("ragged", ragged))
             for b in (1, B)]
    times = {c[:2] + (c[3],): [] for c in cases}
    for name, _, fn, b in cases:
        fn(models[name], b)
    for r in range(args.rounds):
        for name, kind, fn, b in cases:
            for _ in range(4):
                t = time.perf_counter()
                fn(models[name], b)
                times[(name, kind, b)].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name in models:
        for kind in ("plain", "ragged"):
            one, many = med[(name, kind, 1)], med[(name, kind, B)]
            print(f"gemm={name:>16} {kind:>6}: batch 1 {one:6.1f} ms, batch 16 {many:6.1f} ms, ratio ×{many / one:4.2f}",
                  flush=True)
    best = min(fast.GEMM_PATHS, key=lambda g: med[(g, "plain", B)])
    profile_step(models[best], lambda m: plain(m, B), f"plain batch-16 step, gemm={best}")
    profile_step(models[best], lambda m: ragged(m, B), f"ragged batch-16 step, gemm={best}")
    # attention prototype (monkeypatched kv.BatchAttention)
    t_orig, t_new = [], []
    undo = None
    for r in range(args.rounds * 4):
        for lst, patched in ((t_orig, False), (t_new, True)):
            if patched:
                undo = patch_attention()
            t = time.perf_counter()
            plain(models[best], B)
            lst.append(time.perf_counter() - t)
            if patched:
                undo()
    a, b = statistics.median(t_orig) * 1e3, statistics.median(t_new) * 1e3
    print(f"attention prototype (flat index_copy_ KV write + grouped matmul attention), plain batch 16: "
          f"{a:.1f} -> {b:.1f} ms ({(a - b) / a * 100:+.0f}% saved)", flush=True)
    return {f"{k[0]}/{k[1]}/{k[2]}": v for k, v in med.items()}


def profile_step(model, fn, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn(model)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(5):
            fn(model)
    total = sum(e.self_cpu_time_total for e in p.key_averages())
    top = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    print(f"profile, {title}: " + ", ".join(f"{e.key} {e.self_cpu_time_total / total * 100:.0f}%" for e in top),
          flush=True)


def legacy_split(model):
    """The previous fast.py: bmm over P column slices of W.T for every product, one row or many."""
    parts = torch.get_num_threads()

    class Split(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.K, self.N = lin.in_features, lin.out_features
            self.w = lin.weight.detach().t().reshape(self.K, parts, -1).transpose(0, 1).contiguous()
            self.bias = lin.bias

        def forward(self, x):
            lead, rows = x.shape[:-1], x.reshape(-1, self.K)
            y = torch.bmm(rows.expand(parts, *rows.shape), self.w).transpose(0, 1).reshape(lead + (self.N,))
            return y if self.bias is None else y + self.bias

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child.out_features % parts == 0:
                setattr(parent, name, Split(child))
    return model


# ---- (3) qt-serve vs in-process ----------------------------------------------------------------


def stream_http(url: str, prompt: list[int], n: int) -> tuple[float, int]:
    """(seconds from the first to the last streamed token, tokens) for one streaming /v1/completions."""
    import httpx

    body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    stamps = []
    with httpx.Client(timeout=300) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    stamps.append(time.perf_counter())
    return stamps[-1] - stamps[0], len(stamps)


IN_PROCESS = """
import sys, time, torch
from qt_serve.generate import LLM
from qt_serve.sampling import SamplingParams
llm = LLM.load(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    prompt, n = eval(line)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    stamps = [time.perf_counter() for d in llm.stream(prompt, params) if d.token is not None]
    print((n - 1) / (stamps[-1] - stamps[0]), flush=True)
"""


class InProcess:
    """`LLM.stream` in its own fresh interpreter (the same fresh state a server has), driven over stdin,
    so that it and the server can be alive together and timed alternately."""

    def __init__(self, ckpt_dir: Path, env_extra: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", IN_PROCESS, str(ckpt_dir)], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **(env_extra or {})})
        assert self.proc.stdout.readline().strip() == "ready"

    def __call__(self, prompt: list[int], n: int) -> float:
        self.proc.stdin.write(repr((prompt, n)) + "\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def wordlevel_tokenizer(vocab_size: int):
    """A tokenizer whose every id decodes to text ("w123 "), so each streamed token is an SSE chunk."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from qt_serve.tokenizer import Tokenizer

    tok = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(tok, {"eos_token": "w1"})


def serve(args) -> dict:
    header(f"(3) batch-1 streaming: qt-serve subprocess vs in-process LLM.stream, random {args.model}")
    torch.set_grad_enabled(False)
    tmp = Path(tempfile.mkdtemp(prefix="qt-serving-core-"))
    ckpt_dir = tmp / args.model
    checkpoint.save_checkpoint(ckpt_dir, random_model(args.model, max_seq_len=1024),
                               wordlevel_tokenizer(CONFIGS[args.model].vocab_size))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, CONFIGS[args.model].vocab_size, (args.prompt,), generator=g).tolist()
    engines = {"in-process LLM.stream": InProcess(ckpt_dir)}
    servers = contextlib.ExitStack()
    for label, extra in args.settings.items():
        # models=N: the same checkpoint served under N names (requests go to the first)
        names = [f"m{i}" if i else "m" for i in range(int(extra.pop("models", 1)))]
        url, _ = servers.enter_context(serving({n: str(ckpt_dir) for n in names}, "--no-page", env=extra,
                                               log=subprocess.DEVNULL))

        def via_http(p, n, url=url):
            secs, got = stream_http(url, p, n)
            return (got - 1) / secs

        engines[f"qt-serve {label}"] = via_http
    try:
        for fn in engines.values():
            fn(prompt[:16], 4)  # warm-up
        results = {k: [] for k in engines}
        for _ in range(args.rounds):  # alternate: every engine alive, one busy at a time
            for k, fn in engines.items():
                results[k].append(fn(prompt, args.new_tokens))
    finally:
        engines["in-process LLM.stream"].close()
        servers.close()
    ref = statistics.median(results["in-process LLM.stream"])
    for k, v in results.items():
        print(f"{k:>40}: median {statistics.median(v):5.1f} tok/s (×{statistics.median(v) / ref:4.2f} in-process), "
              f"best {max(v):5.1f}   runs {' '.join(f'{x:.1f}' for x in v)}", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["decode", "batch", "serve", "all"])
    ap.add_argument("--model", default="125M", choices=list(CONFIGS))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--context", type=int, default=256, help="batch: cached positions per row")
    ap.add_argument("--gemv", default="auto", help="batch: the one-row path of the batch-1 step")
    ap.add_argument("--paths", nargs="*", default=list(fast.GEMV_PATHS), help="decode: forced gemv paths to time")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--serve-env", nargs="*", default=["default", "models=2"],
                    help="serve: one qt-serve per setting, 'default' or VAR=VALUE[,VAR=VALUE] (environment "
                         "variables); models=N serves the checkpoint under N names, requests going to the first")
    args = ap.parse_args(argv)
    args.settings = {s: dict(kv.split("=", 1) for kv in s.split(",")) if s != "default" else {}
                     for s in args.serve_env}
    torch.set_num_threads(args.threads)
    for what in (["decode", "batch", "serve"] if args.what == "all" else [args.what]):
        globals()[what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
