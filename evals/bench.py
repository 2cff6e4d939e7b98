"""`qt-bench`: qt against HF `transformers.generate`, same weights, same run.

`decode`: batch-1 decode speed. For each model: a 128-token prompt, 128 greedy new tokens,
fp32. Reported per engine: time to first token (prefill + first sample), decode tokens/s
after the first token, and the effective weight bandwidth (bytes of weights read per
decoded token × tokens/s), with qt / HF ratios. Best of --runs, since a shared machine
only ever adds noise.

`serve`: `qt-serve` under load, started as users run it (a subprocess, API only). --requests
seeded random token-id prompts go through streaming /v1/completions at each --concurrency
(a closed loop: that many clients, each sending its next request when the last one ends),
then --max-batch of them arrive at the same moment (a burst). HF `generate` runs the same
prompts one at a time and, its strongest fair setting for a fixed set, as one static batch.
Reported: aggregate output tokens/s (all tokens / wall time) and p50/p99 TTFT, with ratios to
HF; the CPU and its flags are printed beside them. Requests are timed by `evals.latency` (`qt-bench latency`
measures any OpenAI-compatible server the same way, in more detail).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from evals import latency
from evals.latency import cpu_line, serving
from qt_serve.config import ModelConfig
from qt_serve.errors import QtError

CONFIGS = {
    # random-weight Llama shapes around the sizes of LOG.md's reference tables (45M, 125M)
    "45M": ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True),
    "125M": ModelConfig(vocab_size=49152, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True),
}


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter but the embedding table (one row is read);
    with tied embeddings the LM head reads that table in full, so it counts once."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb if hasattr(model, "get_output_embeddings") else False
    return total if tied else total - emb.numel() * emb.element_size()


def time_qt(ckpt, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds for the remaining new_tokens - 1)."""
    from qt_serve.generate import LLM
    from qt_serve.sampling import SamplingParams

    llm = LLM(ckpt, max_seq_len=len(prompt) + new_tokens + 8)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    first, n = None, 0
    for d in llm.stream(prompt, params):
        n += d.token is not None
        if first is None:
            first = time.perf_counter() - start
    assert n == new_tokens, n
    return first, time.perf_counter() - start - first


def time_hf(hf, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    start = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    assert out.shape[1] == len(prompt) + new_tokens
    return first, time.perf_counter() - start - first


def bench_model(name: str, ckpt, hf, args) -> dict:
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ckpt.config.vocab_size, (args.prompt,), generator=g).tolist()
    best = {}
    for engine, fn, m in (("qt", time_qt, ckpt), ("hf", time_hf, hf))[: 1 if hf is None else 2]:
        fn(m, prompt[:16], 4)  # warm-up: allocator, thread pool, lazy init
        runs = [fn(m, prompt, args.new_tokens) for _ in range(args.runs)]
        ttft = min(r[0] for r in runs)
        tps = max((args.new_tokens - 1) / r[1] for r in runs)
        best[engine] = {"ttft_s": ttft, "decode_tok_s": tps}
    if hf is None:  # a quantized checkpoint: HF holds no twin of its weights (`qt-quant compare` has peers)
        return {"model": name, "scheme": ckpt.config.quantization["scheme"], **best}
    nbytes = weight_bytes_per_token(hf)
    for r in best.values():
        r["weight_GB_s"] = nbytes * r["decode_tok_s"] / 1e9
    params = sum(p.numel() for p in hf.parameters())
    return {"model": name, "params_M": params / 1e6, "weight_MB_per_token": nbytes / 1e6, **best,
            "decode_ratio": best["qt"]["decode_tok_s"] / best["hf"]["decode_tok_s"],
            "ttft_ratio": best["hf"]["ttft_s"] / best["qt"]["ttft_s"]}


def hf_twin(ckpt):
    """A transformers LlamaForCausalLM holding exactly the qt model's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qt_serve.checkpoint import state_dict_for_saving

    cfg = ckpt.model.config.to_dict()
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "qt"})).eval()
    missing, unexpected = hf.load_state_dict(state_dict_for_saving(ckpt.model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.float()


def load_model(name: str):
    from qt_serve import checkpoint
    from qt_serve.model import Transformer

    if name in CONFIGS:
        torch.manual_seed(0)
        model = Transformer(CONFIGS[name], max_seq_len=512).eval()
        return checkpoint.Checkpoint(model, None, {}, f"random {name}")
    return checkpoint.load(name, dtype="float32", max_seq_len=512)


def decode(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(cpu_line(), flush=True)
    rows = []
    for name in args.models:
        ckpt = load_model(name)
        plain = (ckpt.config.quantization or {}).get("scheme") in (None, "fp16", "bf16")
        rows.append(bench_model(name, ckpt, hf_twin(ckpt) if plain else None, args))
        r = rows[-1]
        if "hf" not in r:
            print(f"{name:>24} {r['scheme']:>7} | qt {r['qt']['decode_tok_s']:6.1f} tok/s TTFT "
                  f"{r['qt']['ttft_s'] * 1e3:6.0f} ms | no HF twin of quantized weights", flush=True)
            continue
        print(f"{name:>24} {r['params_M']:6.0f}M | qt {r['qt']['decode_tok_s']:6.1f} tok/s "
              f"({r['qt']['weight_GB_s']:5.1f} GB/s) TTFT {r['qt']['ttft_s'] * 1e3:6.0f} ms | "
              f"HF {r['hf']['decode_tok_s']:6.1f} tok/s ({r['hf']['weight_GB_s']:5.1f} GB/s) "
              f"TTFT {r['hf']['ttft_s'] * 1e3:6.0f} ms | decode ×{r['decode_ratio']:.2f}, TTFT ×{r['ttft_ratio']:.2f}",
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu": cpu_line(), "threads": args.threads, "prompt": args.prompt,
                                              "new_tokens": args.new_tokens, "rows": rows}, indent=2))
    return rows


def ttft_stats(ttfts: list[float]) -> dict:
    """p50/p99 of the TTFTs in seconds."""
    p50, p99 = np.percentile(ttfts, [50, 99])
    return {"ttft_p50_s": float(p50), "ttft_p99_s": float(p99)}


def exact(timings: list[latency.Timing], new_tokens: int) -> list[latency.Timing]:
    """The timings, once each is known to have made exactly `new_tokens` (a comparison of speeds needs it)."""
    for t in timings:
        if t.error or t.output_tokens != new_tokens:
            raise RuntimeError(f"a request failed or made {t.output_tokens} of {new_tokens} tokens: {t.error}")
    return timings


def requests(prompts: list[list[int]], new_tokens: int) -> list[latency.Request]:
    # logprobs make every token a chunk, text or not (a random model without a tokenizer has none)
    return [latency.Request(p, new_tokens, logprobs=True) for p in prompts]


async def stream_one(client, model: str, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """One streaming /v1/completions request: (TTFT, the seconds to the first token's chunk; seconds from
    the first token's chunk to the last's)."""
    t, = exact([await latency.stream_one(client, model, *requests([prompt], new_tokens))], new_tokens)
    return t.ttft, t.chunks[-1] - t.ttft


async def load_level(url: str, model: str, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    """All `prompts` through the server by `concurrency` clients in a closed loop."""
    timings, wall = await latency.run_level(latency.Server(url, model), requests(prompts, new_tokens), concurrency)
    return {"concurrency": concurrency, "wall_s": wall, "tok_s": len(prompts) * new_tokens / wall,
            **ttft_stats([t.ttft for t in exact(timings, new_tokens)])}


def hf_static_batch(hf, prompts: list[list[int]], new_tokens: int) -> dict:
    """HF generate on all prompts as ONE batch (same length, so no padding): its strongest fair setting
    for a fixed set of prompts. Both cache kinds are tried; the faster counts."""
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    best = None
    for cache in ("dynamic", "static"):
        try:
            hf.generate(ids, max_new_tokens=2, min_new_tokens=2, cache_implementation=cache, **kw)  # warm-up
            start = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, cache_implementation=cache,
                              **kw)
            wall = time.perf_counter() - start
        except Exception as e:  # a cache kind this transformers cannot run here: the other one counts
            print(f"HF static batch with a {cache} cache failed: {e}", flush=True)
            continue
        assert out.shape == (len(prompts), len(prompts[0]) + new_tokens)
        r = {"batch": len(prompts), "cache": cache, "wall_s": wall, "tok_s": len(prompts) * new_tokens / wall}
        best = r if best is None or r["tok_s"] > best["tok_s"] else best
    return best


async def burst(url: str, model: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """All prompts sent at the same moment (simultaneous arrivals): aggregate tok/s and the TTFT spread."""
    timings, wall = await latency.run_level(latency.Server(url, model), requests(prompts, new_tokens),
                                            request_rate=math.inf)
    r = {"arrivals": len(prompts), "wall_s": wall, "tok_s": len(prompts) * new_tokens / wall,
         **ttft_stats([t.ttft for t in exact(timings, new_tokens)])}
    r["ttft_p99_over_p50"] = r["ttft_p99_s"] / r["ttft_p50_s"]
    return r


def hf_sequential(hf, prompts: list[list[int]], new_tokens: int) -> dict:
    """The same requests one at a time through HF generate; TTFT is a separate max_new_tokens=1 generate."""
    time_hf(hf, prompts[0][:16], 4)  # warm-up: allocator, thread pool, lazy init
    runs = [time_hf(hf, p, new_tokens) for p in prompts]
    wall = sum(first + rest for first, rest in runs)  # time_hf's `rest` is the full generate minus `first`
    return {"concurrency": 1, "wall_s": wall, "tok_s": len(prompts) * new_tokens / wall,
            **ttft_stats([first for first, _ in runs])}


def print_level(engine: str, r: dict) -> None:
    line = (f"{engine:>12} c={r['concurrency']:<3} | {r['tok_s']:7.1f} tok/s | TTFT p50 {r['ttft_p50_s'] * 1e3:6.0f} ms "
            f"p99 {r['ttft_p99_s'] * 1e3:6.0f} ms")
    if "throughput_ratio" in r:
        line += f" | tok/s ×{r['throughput_ratio']:.2f} HF"
    if "ttft_ratio" in r:
        line += f", TTFT ×{r['ttft_ratio']:.2f} HF"
    print(line, flush=True)


def plot_serve(result: dict, path: Path) -> None:
    """Throughput and TTFT against concurrency, HF's sequential numbers as horizontal lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    levels, hf = result["levels"], result["hf"]
    conc = [r["concurrency"] for r in levels]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    fig.suptitle(f"qt-serve {result['model']}: prompt {result['prompt']}, {result['new_tokens']} new tokens, "
                 f"{result['requests']} requests per level, max batch {result['max_batch']}, "
                 f"{result['threads']} threads")
    tput, ttft = fig.subplots(1, 2)
    tput.plot(conc, [r["tok_s"] for r in levels], "o-", label="qt-serve")
    tput.axhline(hf["tok_s"], color="gray", ls="--", label="HF generate, one at a time")
    batch = result["hf_static_batch"]
    tput.axhline(batch["tok_s"], color="gray", ls=":", label=f"HF generate, one static batch of {batch['batch']}")
    tput.set(ylabel="aggregate output tokens/s", ylim=(0, None))
    tput.legend()
    for key, mark, ls in (("ttft_p50_s", "o", "-"), ("ttft_p99_s", "s", ":")):
        label = key.split("_")[1]
        ttft.plot(conc, [r[key] * 1e3 for r in levels], marker=mark, ls=ls, color="C0", label=f"qt-serve {label}")
        ttft.axhline(hf[key] * 1e3, color="gray", ls=ls, label=f"HF generate {label}")
    ttft.set(ylabel="TTFT (ms)", yscale="log")  # p99 under queueing is seconds, p50 alone tens of ms
    ttft.yaxis.set_major_formatter(ScalarFormatter())
    ttft.yaxis.set_minor_formatter(ScalarFormatter())
    ttft.legend()
    for ax in (tput, ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def serve(args) -> dict:
    import tempfile

    from qt_serve.checkpoint import save_checkpoint

    torch.set_grad_enabled(False)
    ckpt = load_model(args.model)
    if (ckpt.config.quantization or {}).get("scheme") not in (None, "fp16", "bf16"):
        raise QtError(f"{args.model} is quantized, and HF generate holds no twin of its weights to compare with; "
                      "`qt-quant compare SOURCE` serves each precision through qt-serve beside llama.cpp")
    hf = hf_twin(ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, ckpt.config.vocab_size, (args.requests, args.prompt), generator=g).tolist()
    print(cpu_line(), flush=True)
    print(f"{args.model}: {args.requests} requests per level, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"max batch {args.max_batch}, {torch.get_num_threads()} threads", flush=True)
    base = hf_sequential(hf, prompts, args.new_tokens)
    print_level("HF generate", base)
    batch = hf_static_batch(hf, prompts[:args.max_batch], args.new_tokens)
    print(f"HF generate, one static batch of {batch['batch']} ({batch['cache']} cache): {batch['tok_s']:.1f} tok/s",
          flush=True)
    del hf
    result = {"model": args.model, "cpu": cpu_line(), "threads": torch.get_num_threads(), "prompt": args.prompt,
              "new_tokens": args.new_tokens, "requests": args.requests, "max_batch": args.max_batch,
              "hf": base, "hf_static_batch": batch, "levels": []}
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.model
        if args.model in CONFIGS:  # the same random weights, as a checkpoint directory qt-serve loads
            spec = str(save_checkpoint(Path(tmp) / "model", ckpt.model))
        # The KV cache is max_batch rows of exactly one request's length: the model's own context would be wasted RAM.
        with serving({"m": spec}, "--no-page", "--max-batch", str(args.max_batch), "--max-queue", "1024",
                     "--max-model-len", str(args.prompt + args.new_tokens), "--log-level", "warning") as (url, _):
            asyncio.run(load_level(url, "m", [prompts[0][:16]], 4, 1))  # warm-up, as for HF
            for c in args.concurrency:
                r = asyncio.run(load_level(url, "m", prompts, args.new_tokens, c))
                r["throughput_ratio"] = r["tok_s"] / base["tok_s"]
                if c == 1:
                    r["ttft_ratio"] = base["ttft_p50_s"] / r["ttft_p50_s"]  # > 1: qt answers first
                result["levels"].append(r)
                print_level("qt-serve", r)
            b = asyncio.run(burst(url, "m", prompts[:args.max_batch], args.new_tokens))
    b["vs_hf_sequential"] = b["tok_s"] / base["tok_s"]
    b["vs_hf_static_batch"] = b["tok_s"] / batch["tok_s"]
    result["burst"] = b
    print(f"qt-serve, {b['arrivals']} simultaneous arrivals: {b['tok_s']:.1f} tok/s (×{b['vs_hf_sequential']:.2f} "
          f"HF one at a time, ×{b['vs_hf_static_batch']:.2f} HF static batch) | TTFT p50 {b['ttft_p50_s'] * 1e3:.0f} "
          f"ms, p99 {b['ttft_p99_s'] * 1e3:.0f} ms (p99/p50 {b['ttft_p99_over_p50']:.2f})", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        plot_serve(result, out.with_suffix(".png"))
    return result
