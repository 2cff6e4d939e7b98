"""`qt-bench decode`: batch-1 decode speed of qt against HF `transformers.generate`, same weights, same run.

For each model: a 128-token prompt, 128 greedy new tokens, fp32. Reported per engine:
time to first token (prefill + first sample), decode tokens/s after the first token,
and the effective weight bandwidth (bytes of weights read per decoded token × tokens/s),
with qt / HF ratios. Best of --runs, since a shared machine only ever adds noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qt_serve.config import ModelConfig

CONFIGS = {
    # random-weight Llama shapes around the sizes in DESIGN.md's reference table
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
    prompt = torch.randint(0, ckpt.model.config.vocab_size, (args.prompt,), generator=g).tolist()
    best = {}
    for engine, fn, m in (("qt", time_qt, ckpt), ("hf", time_hf, hf)):
        fn(m, prompt[:16], 4)  # warm-up: allocator, thread pool, lazy init
        runs = [fn(m, prompt, args.new_tokens) for _ in range(args.runs)]
        ttft = min(r[0] for r in runs)
        tps = max((args.new_tokens - 1) / r[1] for r in runs)
        best[engine] = {"ttft_s": ttft, "decode_tok_s": tps}
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
    rows = []
    for name in args.models:
        ckpt = load_model(name)
        rows.append(bench_model(name, ckpt, hf_twin(ckpt), args))
        r = rows[-1]
        print(f"{name:>24} {r['params_M']:6.0f}M | qt {r['qt']['decode_tok_s']:6.1f} tok/s "
              f"({r['qt']['weight_GB_s']:5.1f} GB/s) TTFT {r['qt']['ttft_s'] * 1e3:6.0f} ms | "
              f"HF {r['hf']['decode_tok_s']:6.1f} tok/s ({r['hf']['weight_GB_s']:5.1f} GB/s) "
              f"TTFT {r['hf']['ttft_s'] * 1e3:6.0f} ms | decode ×{r['decode_ratio']:.2f}, TTFT ×{r['ttft_ratio']:.2f}",
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"threads": args.threads, "prompt": args.prompt,
                                              "new_tokens": args.new_tokens, "rows": rows}, indent=2))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qt-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="batch-1 decode tokens/s and TTFT, qt vs HF generate")
    d.add_argument("--models", nargs="+", default=["45M", "125M", "SmolLM2-135M-Instruct"],
                   help=f"random configs ({', '.join(CONFIGS)}), checkpoint dirs, .gguf files or known names")
    d.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--runs", type=int, default=3)
    d.add_argument("--threads", type=int, default=torch.get_num_threads())
    d.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    decode(args)
    return 0
