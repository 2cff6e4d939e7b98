"""Verify that a GGUF model imported by qt is the model llama.cpp runs from the same file.

    python benchmarks/verify_llamacpp.py --llama-python /path/to/venv-with-llama-cpp/bin/python \
        [--gguf FILE.gguf] [--out out/verify_llamacpp.json]

qt (torch) and llama-cpp-python usually live in different environments, so this
script runs in two modes:

* the qt side (default): loads the GGUF with `qt_serve.checkpoint.load` (fp32,
  weights dequantized), then starts *itself* under `--llama-python` in helper
  mode and compares the two;
* the llama.cpp side (`--helper REQUEST.json RESPONSE.json`): loads the same file
  with `llama_cpp.Llama` and answers the request. It imports only the standard
  library, numpy and llama_cpp. The full passage logits (positions x vocab, far
  too big for JSON) come back as a float32 .npy file next to the response.

Checks (SmolLM2-135M-Instruct by default; exit 1 if any target is missed):

1. tokenization: qt's tokenizer rebuilt from the GGUF vocabulary vs llama.cpp's, on
   the passage (no BOS on either side) and on the four rendered chat prompts (special
   tokens parsed). A tokenizer is deterministic, so the target is 100% identical ids.
2. passage (`benchmarks/data/passage.txt`, public domain: the Declaration of
   Independence and two of Lincoln's addresses, ~2,900 tokens) in one context
   window, both models fed qt's token ids: perplexity within 1%, top-1 next-token
   agreement >= 98%; max / mean |logit difference| and mean KL are reported.
   llama.cpp multiplies Q4_1 weights with activations rounded to 8 bits (Q8_1 blocks;
   Q8_0 for the Q8_0 LM head) and keeps an f16 KV cache, while qt runs the dequantized
   weights in fp32, so the logits are close, not equal. For scale: on SmolLM2 Q4_1,
   llama.cpp's run of the file differs from llama.cpp's own run of the same weights
   dequantized to F32 (`llama_model_quantize` to ALL_F32, f32 KV) by exactly as much as
   from qt (95.6% top-1, 0.57% perplexity), while qt and that F32 run agree to 2e-3 in
   every logit.
3. greedy chat: four prompts through the chat template; the same prompt ids go to
   both, and each side takes the argmax token by token (llama.cpp's logits are read
   directly, bypassing its sampler chain) for up to 32 tokens or EOS. Target: identical
   token ids, and the France reply names Paris.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PASSAGE = HERE / "data" / "passage.txt"
CHAT_PROMPTS = [
    "Which city is the capital of France?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me three tips for learning Python.",
]
MIN_PASSAGE_TOKENS = 2000
PPL_RTOL = 0.01  # perplexities within 1% of each other
TOP1_MIN = 0.98  # argmax agreement over the passage positions


# ---- llama.cpp side (runs under --llama-python; no torch, no qt) -------------------


def llama_helper(request_path: str, response_path: str) -> None:
    """Answer a request written by the qt side: tokenizations, passage logits, greedy replies."""
    import numpy as np
    import llama_cpp

    req = json.loads(Path(request_path).read_text())
    t0 = time.perf_counter()
    # logits_all: keep the logits of every evaluated position in `llm.scores` (n_ctx, n_vocab).
    llm = llama_cpp.Llama(req["gguf"], n_ctx=req["n_ctx"], logits_all=True, n_threads=req["n_threads"],
                          verbose=False)
    resp = {"llama_cpp_version": llama_cpp.__version__, "n_vocab": llm.n_vocab(),
            "llama_load_s": time.perf_counter() - t0}

    # 1. llama.cpp's own tokenization: the passage as plain text (no BOS, special tokens not
    # parsed), the chat prompts as rendered by qt's template (special=True: <|im_start|> etc.).
    resp["passage_tokens"] = llm.tokenize(req["passage_text"].encode("utf-8"), add_bos=False, special=False)
    resp["chat_tokens"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
                           for t in req["chat_texts"]]

    # 2. Logits of every position of the passage, fed qt's ids in one context window.
    t0 = time.perf_counter()
    ids = req["passage_ids"]
    llm.reset()
    llm.eval(ids)
    # scores[i] = logits predicting token i+1; copy out of llama's (n_ctx, n_vocab) buffer.
    np.save(req["logits_path"], np.ascontiguousarray(llm.scores[: len(ids)], dtype=np.float32))
    resp["llama_passage_s"] = time.perf_counter() - t0

    # 3. Greedy decoding from qt's chat prompt ids: our own argmax of the raw logits each
    # step, so no sampler setting (penalties, top-k ties, grammar) can differ from qt's.
    t0 = time.perf_counter()
    eos = set(req["eos_ids"])
    replies = []
    for prompt in req["chat_prompt_ids"]:
        llm.reset()  # n_tokens = 0; the next eval drops the stale KV entries
        llm.eval(prompt)
        out = []
        while len(out) < req["max_new_tokens"]:
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)  # EOS included, as qt's Completion.tokens does
            if tok in eos:
                break
            llm.eval([tok])
        replies.append(out)
    resp["greedy"] = replies
    resp["llama_greedy_s"] = time.perf_counter() - t0
    Path(response_path).write_text(json.dumps(resp))


# ---- qt side ------------------------------------------------------------------------


def run_llama(python: str, request: dict, workdir: Path):
    """Run this file in helper mode under `python`; (response dict, passage logits ndarray (S, V))."""
    import numpy as np

    req_path, resp_path = workdir / "request.json", workdir / "response.json"
    request = {**request, "logits_path": str(workdir / "llama_logits.npy")}
    req_path.write_text(json.dumps(request))
    cmd = [python, str(Path(__file__).resolve()), "--helper", str(req_path), str(resp_path)]
    r = subprocess.run(cmd, text=True, capture_output=True)
    if r.returncode != 0 or not resp_path.exists():
        sys.exit(f"llama.cpp helper failed (exit {r.returncode}) under {python}:\n{r.stderr[-3000:]}")
    return json.loads(resp_path.read_text()), np.load(request["logits_path"])


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_agreement(qt_ids: list[int], ll_ids: list[int], tokenizer) -> dict:
    """Position-wise agreement of two tokenizations; at the first mismatch, the pieces around it."""
    same = sum(x == y for x, y in zip(qt_ids, ll_ids))
    i = first_mismatch(qt_ids, ll_ids)
    d = {"qt_len": len(qt_ids), "llama_len": len(ll_ids), "identical_frac": same / max(len(qt_ids), len(ll_ids)),
         "first_mismatch": i}
    if i is not None:
        d["qt_around"] = [tokenizer.decode([t]) for t in qt_ids[max(0, i - 3): i + 4]]
        d["llama_around"] = [tokenizer.decode([t]) for t in ll_ids[max(0, i - 3): i + 4]]
    return d


def compare_logits(qt_logits, ll_logits, ids: list[int]) -> dict:
    """qt_logits, ll_logits: (S, V) fp32 tensors for the passage; ids: its S token ids."""
    import torch

    target = torch.tensor(ids[1:])
    out = {}
    # Perplexity of tokens 1..S-1 given their prefix (token 0 has no prediction), in fp64.
    lp_qt = torch.log_softmax(qt_logits[:-1].double(), -1)
    lp_ll = torch.log_softmax(ll_logits[:-1].double(), -1)
    for name, lp in (("qt", lp_qt), ("llama", lp_ll)):
        nll = -lp.gather(1, target[:, None]).mean()
        out[f"ppl_{name}"] = math.exp(float(nll))
    out["ppl_rel_diff"] = abs(out["ppl_qt"] - out["ppl_llama"]) / out["ppl_llama"]
    # KL(llama || qt) per position, averaged: how far apart the whole distributions are.
    out["kl_mean"] = float((lp_ll.exp() * (lp_ll - lp_qt)).sum(-1).mean())
    del lp_qt, lp_ll
    agree = qt_logits.argmax(-1) == ll_logits.argmax(-1)  # (S,) over every position
    out["top1_agreement"] = float(agree.float().mean())
    out["top1_disagree_positions"] = agree.logical_not().nonzero().flatten().tolist()[:20]
    diff = (qt_logits - ll_logits).abs()
    out["max_abs_logit_diff"] = float(diff.max())
    out["mean_abs_logit_diff"] = float(diff.mean())
    out["qt_logit_std"] = float(qt_logits.std())  # scale for the differences above
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from qt_serve.hub.fetch_file)")
    ap.add_argument("--llama-python", default=os.environ.get("QT_LLAMA_PYTHON", sys.executable),
                    help="python with llama-cpp-python installed (default: $QT_LLAMA_PYTHON or this python)")
    ap.add_argument("--passage", default=str(DEFAULT_PASSAGE), help="public-domain text, >= 2000 tokens")
    ap.add_argument("--n-ctx", type=int, default=4096, help="context window of both models")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for llama.cpp and torch")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="out/verify_llamacpp.json")
    ap.add_argument("--helper", nargs=2, metavar=("REQUEST", "RESPONSE"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.helper:
        llama_helper(*args.helper)
        return 0

    import torch

    from qt_serve.checkpoint import load
    from qt_serve.generate import LLM
    from qt_serve.hub import DEFAULT_MODEL, fetch_file
    from qt_serve.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf) if args.gguf else fetch_file(DEFAULT_MODEL)
    t0 = time.perf_counter()
    ckpt = load(gguf, dtype="float32", max_seq_len=args.n_ctx)
    tok = ckpt.tokenizer
    timings = {"qt_load_s": time.perf_counter() - t0}

    text = Path(args.passage).read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False)
    if not MIN_PASSAGE_TOKENS <= len(ids) <= args.n_ctx:
        sys.exit(f"the passage is {len(ids)} tokens; it must be {MIN_PASSAGE_TOKENS}..{args.n_ctx} (one window)")
    messages = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    chat_texts = [tok.apply_chat_template(m) for m in messages]
    chat_ids = [tok.encode_chat(m) for m in messages]
    llm = LLM(ckpt, max_seq_len=args.n_ctx)

    # llama.cpp first (it is a separate process), then qt, so the two never compete for the cores.
    with tempfile.TemporaryDirectory(prefix="verify_llamacpp-") as tmp:
        request = {"gguf": str(gguf), "n_ctx": args.n_ctx, "n_threads": args.threads, "passage_text": text,
                   "passage_ids": ids, "chat_texts": chat_texts, "chat_prompt_ids": chat_ids,
                   "max_new_tokens": args.max_new_tokens, "eos_ids": llm.eos_ids}
        t0 = time.perf_counter()
        ll, ll_logits = run_llama(args.llama_python, request, Path(tmp))
        timings["llama_helper_s"] = time.perf_counter() - t0
    timings.update({k: v for k, v in ll.items() if k.endswith("_s")})

    t0 = time.perf_counter()
    with torch.inference_mode():
        qt_logits = ckpt.model(torch.tensor([ids]))[0]  # (S, V): no cache, one causal pass
    timings["qt_passage_s"] = time.perf_counter() - t0
    logits = compare_logits(qt_logits.float(), torch.from_numpy(ll_logits), ids)
    del qt_logits, ll_logits

    t0 = time.perf_counter()
    params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens)
    qt_greedy = [llm.generate(p, params).tokens for p in chat_ids]
    timings["qt_greedy_s"] = time.perf_counter() - t0

    tokenization = {"passage": token_agreement(ids, ll["passage_tokens"], tok),
                    "chat": [token_agreement(q, l, tok) for q, l in zip(chat_ids, ll["chat_tokens"])]}
    chats = []
    for prompt, q, l in zip(CHAT_PROMPTS, qt_greedy, ll["greedy"]):
        chats.append({"prompt": prompt, "identical": q == l, "first_mismatch": first_mismatch(q, l),
                      "qt_tokens": q, "llama_tokens": l,
                      "qt_text": tok.decode(q, skip_special_tokens=True),
                      "llama_text": tok.decode(l, skip_special_tokens=True)})

    # (check, value shown, target shown, passed)
    p = tokenization["passage"]
    chat_tok_ok = all(c["first_mismatch"] is None for c in tokenization["chat"])
    rows = [
        ("passage tokens (qt / llama.cpp)", f"{p['qt_len']} / {p['llama_len']}", f">= {MIN_PASSAGE_TOKENS}",
         p["qt_len"] >= MIN_PASSAGE_TOKENS),
        ("passage tokenization identical", f"{p['identical_frac']:.2%}"
         + (f" (first mismatch @{p['first_mismatch']})" if p["first_mismatch"] is not None else ""),
         "100%", p["first_mismatch"] is None),
        ("chat prompt tokenization identical", f"{sum(c['first_mismatch'] is None for c in tokenization['chat'])}"
         f"/{len(CHAT_PROMPTS)}", "all", chat_tok_ok),
        ("perplexity qt / llama.cpp", f"{logits['ppl_qt']:.4f} / {logits['ppl_llama']:.4f} "
         f"({logits['ppl_rel_diff']:.3%})", f"within {PPL_RTOL:.0%}", logits["ppl_rel_diff"] <= PPL_RTOL),
        ("top-1 next-token agreement", f"{logits['top1_agreement']:.2%}", f">= {TOP1_MIN:.0%}",
         logits["top1_agreement"] >= TOP1_MIN),
        ("max / mean |logit diff|", f"{logits['max_abs_logit_diff']:.4f} / {logits['mean_abs_logit_diff']:.4f}",
         f"(logit std {logits['qt_logit_std']:.2f})", None),
        ("mean KL(llama.cpp || qt)", f"{logits['kl_mean']:.2e} nats", "", None),
    ]
    for c in chats:
        rows.append((f"greedy: {c['prompt'][:40]}", f"{len(c['qt_tokens'])} tokens, "
                     + ("identical" if c["identical"] else f"differ @{c['first_mismatch']}"),
                     "identical", c["identical"]))
    paris = "paris" in chats[0]["qt_text"].lower()
    rows.append(("France reply contains 'Paris'", str(paris), "True", paris))

    print(f"\n{gguf.name}: qt (fp32, dequantized) vs llama.cpp {ll['llama_cpp_version']}, "
          f"passage {len(ids)} tokens in one {args.n_ctx}-token window\n")
    w = max(len(r[0]) for r in rows)
    print(f"{'check':<{w}}  {'result':<40}  {'target':<22}  ok")
    for name, value, target, ok in rows:
        print(f"{name:<{w}}  {value:<40}  {target:<22}  {'-' if ok is None else 'PASS' if ok else 'FAIL'}")
    for c in chats:
        print(f"\n> {c['prompt']}\n  qt       : {c['qt_text']!r}\n  llama.cpp: {c['llama_text']!r}")
    for label, t in [("passage", p)] + [(f"chat {i}", c) for i, c in enumerate(tokenization["chat"])]:
        if t["first_mismatch"] is not None:
            print(f"\ntokenization mismatch ({label}) at {t['first_mismatch']}: "
                  f"qt {t['qt_around']} vs llama.cpp {t['llama_around']}")
    passed = all(ok for *_, ok in rows if ok is not None)
    print(f"\n{'all targets met' if passed else 'TARGETS NOT MET'}  "
          f"({', '.join(f'{k} {v:.1f}' for k, v in timings.items())})")

    result = {"gguf": str(gguf), "llama_cpp_version": ll["llama_cpp_version"], "n_ctx": args.n_ctx,
              "passage": str(args.passage), "passage_tokens": len(ids), "passed": passed,
              "targets": {"ppl_rtol": PPL_RTOL, "top1_min": TOP1_MIN, "min_passage_tokens": MIN_PASSAGE_TOKENS},
              "checks": [{"check": n, "result": v, "target": t, "passed": ok} for n, v, t, ok in rows],
              "tokenization": tokenization, "logits": logits, "chat": chats, "timings_s": timings}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
