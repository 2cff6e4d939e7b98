"""Verify that a GGUF model imported by qt is the model llama.cpp runs from the same file.

    python benchmarks/verify_llamacpp.py --llama-python /path/to/venv-with-llama-cpp/bin/python \
        [--gguf FILE.gguf] [--f32-gguf FILE-F32.gguf] [--out out/verify_llamacpp.json]

qt loads the GGUF with `qt_serve.checkpoint.load` and runs it in fp32, the weights
dequantized. llama.cpp runs in a helper process (this file under `--llama-python` with
`--helper`; it imports only the standard library, numpy and llama_cpp, and hands the
passage logits back as float32 .npy files), on two files:

* the F32 control: the same GGUF converted to all-F32 by llama.cpp itself
  (`llama_model_quantize`, ftype ALL_F32, into a temp dir; or `--f32-gguf`), run with an
  f32 KV cache. Same weights and fp32 arithmetic as qt, so "same model" is judged here.
* the file itself, default settings. llama.cpp's kernels for quantized weights round the
  activations to 8-bit blocks before every dot product (Q8_1 for Q4_1 weights, Q8_0 for a
  Q8_0 LM head) and keep an f16 KV cache, so its logits move away from the fp32 result by
  an amount that belongs to llama.cpp, not to qt. On SmolLM2-135M Q4_1: qt and
  llama.cpp(F32) agree to 2e-3 in every logit (100% top-1); llama.cpp(Q4_1) agrees on
  95.6% of top-1 tokens with llama.cpp(F32), and on exactly as many with qt.

Inputs: `benchmarks/data/passage.txt` (public domain: the Declaration of Independence and
two of Lincoln's addresses, ~2,900 tokens) in one context window, every model fed qt's
ids; four chat prompts through the chat template, decoded greedily (argmax of the raw
logits each step; llama.cpp's sampler chain is bypassed) for up to 32 tokens or EOS.

Targets (exit 1 if any is missed):
A. same model, vs llama.cpp(F32): tokenization identical (passage and chat prompts, with
   llama.cpp's tokenizer of both files), perplexity within 1%, top-1 agreement >= 98%,
   greedy replies identical for every prompt, the France reply names Paris.
B. vs llama.cpp on the file itself: perplexity within 1%; top-1 agreement of qt with it at
   least that of llama.cpp(F32) with it, minus 0.5 points. Greedy replies are reported
   (identical, or the first differing step with qt's top-2 log-prob margin there) but not
   required to match: near-ties flip under llama.cpp's activation rounding.
"""

from __future__ import annotations

import argparse
import itertools
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
PPL_RTOL = 0.01  # perplexities within 1% of each other (A and B)
TOP1_MIN = 0.98  # A: top-1 agreement with llama.cpp(F32) over the passage positions
TOP1_SLACK = 0.005  # B: qt may trail llama.cpp(F32) in agreement with llama.cpp(file) by 0.5 points
ROWS_PER_CHUNK = 128  # passage rows compared at a time: 3 models x 128 x vocab float64 (~150 MB)


# ---- llama.cpp side (runs under --llama-python; no torch, no qt) -------------------


def convert_to_f32(llama_cpp, src: str, dst: str, n_threads: int) -> None:
    """Write every tensor of the GGUF `src` dequantized to F32 into `dst`, with llama.cpp's own code."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True  # the source tensors are quantized; llama.cpp refuses otherwise
    params.nthread = n_threads
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> ALL_F32 failed")


def llama_run(llama_cpp, gguf: str, req: dict, f32_kv: bool, logits_path: str) -> dict:
    """One model: its tokenizations, its passage logits (saved to logits_path), its greedy replies."""
    import ctypes

    import numpy as np

    t0 = time.perf_counter()
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
    # logits_all: keep the logits of every evaluated position in `llm.scores` (n_ctx, n_vocab) float32.
    llm = llama_cpp.Llama(gguf, n_ctx=req["n_ctx"], logits_all=True, n_threads=req["n_threads"],
                          verbose=False, **kv)
    desc = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm.model, desc, len(desc))  # e.g. "llama 256M Q4_1"
    out = {"gguf": gguf, "desc": desc.value.decode(), "kv_cache": "f32" if f32_kv else "default",
           "n_vocab": llm.n_vocab(), "load_s": time.perf_counter() - t0}

    # llama.cpp's own tokenization: the passage as plain text (no BOS, special tokens not
    # parsed), the chat prompts as rendered by qt's template (special=True: <|im_start|> etc.).
    out["passage_tokens"] = llm.tokenize(req["passage_text"].encode("utf-8"), add_bos=False, special=False)
    out["chat_tokens"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in req["chat_texts"]]

    # Logits of every passage position, fed qt's ids in one window; scores[i] predicts token i+1.
    t0 = time.perf_counter()
    ids = req["passage_ids"]
    llm.reset()
    llm.eval(ids)
    np.save(logits_path, llm.scores[: len(ids)])  # (S, V) float32
    out["logits_path"] = logits_path
    out["passage_s"] = time.perf_counter() - t0

    # Greedy decoding from qt's chat prompt ids: our own argmax of the raw logits each step,
    # so no sampler setting (penalties, top-k ties, grammar) can differ from qt's.
    t0 = time.perf_counter()
    eos = set(req["eos_ids"])
    out["greedy"] = []
    for prompt in req["chat_prompt_ids"]:
        llm.reset()  # n_tokens = 0; the next eval overwrites the stale KV entries
        llm.eval(prompt)
        reply = []
        while len(reply) < req["max_new_tokens"]:
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            reply.append(tok)  # EOS included, as qt's Completion.tokens does
            if tok in eos:
                break
            llm.eval([tok])
        out["greedy"].append(reply)
    out["greedy_s"] = time.perf_counter() - t0
    llm.close()
    return out


def llama_helper(request_path: str, response_path: str) -> None:
    """Answer a request written by the qt side: the F32 control run, then the file's own run."""
    import llama_cpp

    req = json.loads(Path(request_path).read_text())
    workdir = Path(req["workdir"])
    resp = {"llama_cpp_version": llama_cpp.__version__}
    f32_gguf = req["f32_gguf"]
    if f32_gguf is None:
        f32_gguf = str(workdir / "f32.gguf")
        t0 = time.perf_counter()
        convert_to_f32(llama_cpp, req["gguf"], f32_gguf, req["n_threads"])
        resp["convert_f32_s"] = time.perf_counter() - t0
    resp["f32"] = llama_run(llama_cpp, f32_gguf, req, f32_kv=True, logits_path=str(workdir / "f32.npy"))
    if req["f32_gguf"] is None:
        os.remove(f32_gguf)  # ~4 bytes per parameter; not needed any more
    resp["file"] = llama_run(llama_cpp, req["gguf"], req, f32_kv=False, logits_path=str(workdir / "file.npy"))
    Path(response_path).write_text(json.dumps(resp))


# ---- qt side ------------------------------------------------------------------------


def run_llama(python: str, request: dict, workdir: Path) -> dict:
    """Run this file in helper mode under `python`; its response (logits left as .npy in workdir)."""
    req_path, resp_path = workdir / "request.json", workdir / "response.json"
    req_path.write_text(json.dumps({**request, "workdir": str(workdir)}))
    cmd = [python, str(Path(__file__).resolve()), "--helper", str(req_path), str(resp_path)]
    r = subprocess.run(cmd, text=True, capture_output=True)
    if r.returncode != 0 or not resp_path.exists():
        sys.exit(f"llama.cpp helper failed (exit {r.returncode}) under {python}:\n{r.stderr[-3000:]}")
    return json.loads(resp_path.read_text())


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


def passage_stats(logits: dict, ids: list[int]) -> tuple[dict, dict]:
    """Perplexity per model and agreement per pair of models over the passage.

    logits: name -> (S, V) float32 array (in memory or an np.memmap), row i predicting ids[i+1].
    Rows are read ROWS_PER_CHUNK at a time, so only that many rows per model are ever
    materialized in float64. Returns ({name: {"ppl"}}, {(a, b): {"top1_agreement", "kl_mean"
    (KL(b || a), b the reference), "max_abs_logit_diff", "mean_abs_logit_diff", ...}}).
    """
    import numpy as np
    import torch

    names = list(logits)
    pairs = list(itertools.combinations(names, 2))
    S, V = len(ids), next(iter(logits.values())).shape[1]
    targets = torch.tensor(ids[1:])  # (S-1,): the last row has nothing to predict
    nll = dict.fromkeys(names, 0.0)
    argmax = {n: [] for n in names}
    kl, abs_max, abs_sum = (dict.fromkeys(pairs, 0.0) for _ in range(3))
    for i in range(0, S, ROWS_PER_CHUNK):
        j = min(i + ROWS_PER_CHUNK, S)
        rows = {n: torch.from_numpy(np.array(logits[n][i:j], dtype=np.float64)) for n in names}  # (r, V)
        lp = {n: torch.log_softmax(x, -1) for n, x in rows.items()}
        tgt = targets[i:j]  # (r,) or (r-1,) in the last chunk
        for n in names:
            nll[n] -= float(lp[n][: len(tgt)].gather(1, tgt[:, None]).sum())
            argmax[n].append(rows[n].argmax(-1))
        for a, b in pairs:
            kl[a, b] += float((lp[b].exp() * (lp[b] - lp[a])).sum())
            diff = (rows[a] - rows[b]).abs()
            abs_max[a, b] = max(abs_max[a, b], float(diff.max()))
            abs_sum[a, b] += float(diff.sum())
        del rows, lp, diff
    per_model = {n: {"ppl": math.exp(nll[n] / (S - 1))} for n in names}
    per_pair = {}
    for a, b in pairs:
        agree = torch.cat(argmax[a]) == torch.cat(argmax[b])  # (S,)
        per_pair[a, b] = {"top1_agreement": float(agree.double().mean()),
                          "top1_disagree_positions": agree.logical_not().nonzero().flatten().tolist()[:20],
                          "kl_mean": kl[a, b] / S, "max_abs_logit_diff": abs_max[a, b],
                          "mean_abs_logit_diff": abs_sum[a, b] / (S * V)}
    return per_model, per_pair


def greedy_diff(qt, other: list[int]) -> dict:
    """qt: a Completion generated with logprobs=2; other: another model's greedy token ids."""
    k = first_mismatch(qt.tokens, other)
    d = {"identical": k is None, "first_mismatch": k}
    if k is not None and k < min(len(qt.choices), len(other)):
        (_, lp1), (second, lp2) = qt.choices[k].top  # qt's two most likely tokens at step k
        d["qt_top2_margin"] = lp1 - lp2  # nats; small = near-tie
        d["other_is_qt_second"] = other[k] == second
    return d


def describe_greedy(d: dict, n_tokens: int) -> str:
    if d["identical"]:
        return f"identical ({n_tokens} tok)"
    s = f"differ @{d['first_mismatch']}"
    if "qt_top2_margin" in d:
        s += f", qt margin {d['qt_top2_margin']:.3f}" + (" (= qt's #2)" if d["other_is_qt_second"] else "")
    return s


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from qt_serve.hub.fetch_file)")
    ap.add_argument("--f32-gguf", help="an all-F32 GGUF of the same weights (default: converted by the helper "
                                       "into a temp dir with llama_model_quantize, ftype ALL_F32)")
    ap.add_argument("--llama-python", default=os.environ.get("QT_LLAMA_PYTHON", sys.executable),
                    help="python with llama-cpp-python installed (default: $QT_LLAMA_PYTHON or this python)")
    ap.add_argument("--passage", default=str(DEFAULT_PASSAGE), help="public-domain text, >= 2000 tokens")
    ap.add_argument("--n-ctx", type=int, default=4096, help="context window of all models")
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

    import numpy as np
    import torch

    from qt_serve.checkpoint import load
    from qt_serve.generate import LLM
    from qt_serve.hub import DEFAULT_MODEL, fetch_file
    from qt_serve.sampling import SamplingParams

    t_start = time.perf_counter()
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

    with tempfile.TemporaryDirectory(prefix="verify_llamacpp-") as tmp:
        # llama.cpp first (a separate process), then qt, so the two never compete for the cores.
        request = {"gguf": str(gguf), "f32_gguf": args.f32_gguf, "n_ctx": args.n_ctx, "n_threads": args.threads,
                   "passage_text": text, "passage_ids": ids, "chat_texts": chat_texts, "chat_prompt_ids": chat_ids,
                   "max_new_tokens": args.max_new_tokens, "eos_ids": llm.eos_ids}
        t0 = time.perf_counter()
        ll = run_llama(args.llama_python, request, Path(tmp))
        timings["llama_helper_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.inference_mode():
            qt_logits = ckpt.model(torch.tensor([ids]))[0].float()  # (S, V): no cache, one causal pass
        timings["qt_passage_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # llama.cpp's logits stay on disk (memory-mapped) and are read a chunk of rows at a time.
        model_stats, pair_stats = passage_stats(
            {"qt": qt_logits.numpy(), "f32": np.load(ll["f32"]["logits_path"], mmap_mode="r"),
             "file": np.load(ll["file"]["logits_path"], mmap_mode="r")}, ids)
        timings["compare_s"] = time.perf_counter() - t0
        del qt_logits
    timings.update({f"llama_{k}": v for k, v in ll.items() if k.endswith("_s")})
    for side in ("f32", "file"):
        timings.update({f"llama_{side}_{k}": v for k, v in ll[side].items() if k.endswith("_s")})

    t0 = time.perf_counter()
    params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, logprobs=2)
    qt_greedy = [llm.generate(p, params) for p in chat_ids]
    timings["qt_greedy_s"] = time.perf_counter() - t0

    tokenization = {side: {"passage": token_agreement(ids, ll[side]["passage_tokens"], tok),
                           "chat": [token_agreement(q, t, tok) for q, t in zip(chat_ids, ll[side]["chat_tokens"])]}
                    for side in ("f32", "file")}
    chats = []
    for i, (prompt, q) in enumerate(zip(CHAT_PROMPTS, qt_greedy)):
        f32, file = ll["f32"]["greedy"][i], ll["file"]["greedy"][i]
        chats.append({"prompt": prompt, "qt_tokens": q.tokens, "f32_tokens": f32, "file_tokens": file,
                      "qt_vs_f32": greedy_diff(q, f32), "qt_vs_file": greedy_diff(q, file),
                      "f32_vs_file_first_mismatch": first_mismatch(f32, file),
                      "qt_text": tok.decode(q.tokens, skip_special_tokens=True),
                      "f32_text": tok.decode(f32, skip_special_tokens=True),
                      "file_text": tok.decode(file, skip_special_tokens=True)})

    qtype = ll["file"]["desc"].split(" ", 2)[-1]  # "llama 256M Q4_1" -> "Q4_1"
    F, Q = "llama.cpp(F32)", f"llama.cpp({qtype})"
    ppl = {n: s["ppl"] for n, s in model_stats.items()}
    qf, qq, fq = pair_stats["qt", "f32"], pair_stats["qt", "file"], pair_stats["f32", "file"]
    ppl_rel = {n: abs(ppl["qt"] - ppl[n]) / ppl[n] for n in ("f32", "file")}
    tok_ok = [t["first_mismatch"] is None for side in tokenization.values()
              for t in [side["passage"], *side["chat"]]]
    paris = "paris" in chats[0]["qt_text"].lower()
    top1_b_min = fq["top1_agreement"] - TOP1_SLACK

    # Sections of (check, value shown, target shown, passed: True/False, or None for information).
    section_a = [
        ("tokenization identical (passage, 4 prompts; both files)", f"{sum(tok_ok)}/{len(tok_ok)}",
         "all", all(tok_ok)),
        (f"perplexity qt / {F}", f"{ppl['qt']:.4f} / {ppl['f32']:.4f} ({ppl_rel['f32']:.3%})",
         f"within {PPL_RTOL:.0%}", ppl_rel["f32"] <= PPL_RTOL),
        ("top-1 agreement", f"{qf['top1_agreement']:.2%}", f">= {TOP1_MIN:.0%}", qf["top1_agreement"] >= TOP1_MIN),
        ("max / mean |logit diff|", f"{qf['max_abs_logit_diff']:.4f} / {qf['mean_abs_logit_diff']:.5f}", "", None),
        (f"mean KL({F} || qt)", f"{qf['kl_mean']:.2e} nats", "", None),
        *((f"greedy: {c['prompt']}", describe_greedy(c["qt_vs_f32"], len(c["qt_tokens"])), "identical",
           c["qt_vs_f32"]["identical"]) for c in chats),
        ("France reply contains 'Paris'", str(paris), "True", paris),
    ]
    section_b = [
        (f"perplexity qt / {Q}", f"{ppl['qt']:.4f} / {ppl['file']:.4f} ({ppl_rel['file']:.3%})",
         f"within {PPL_RTOL:.0%}", ppl_rel["file"] <= PPL_RTOL),
        (f"  reference: perplexity {F} / {Q}",
         f"{ppl['f32']:.4f} / {ppl['file']:.4f} ({abs(ppl['f32'] - ppl['file']) / ppl['file']:.3%})", "", None),
        (f"top-1 agreement qt vs {Q}", f"{qq['top1_agreement']:.2%}", f">= {top1_b_min:.2%} (ref - 0.5)",
         qq["top1_agreement"] >= top1_b_min),
        (f"  reference: top-1 agreement {F} vs {Q}", f"{fq['top1_agreement']:.2%}", "", None),
        ("max / mean |logit diff|: qt | reference", f"{qq['max_abs_logit_diff']:.3f} / {qq['mean_abs_logit_diff']:.4f}"
         f" | {fq['max_abs_logit_diff']:.3f} / {fq['mean_abs_logit_diff']:.4f}", "", None),
        (f"mean KL({Q} || .): qt | reference", f"{qq['kl_mean']:.2e} | {fq['kl_mean']:.2e} nats", "", None),
        *((f"greedy: {c['prompt']}", f"qt: {describe_greedy(c['qt_vs_file'], len(c['qt_tokens']))}; F32: "
           + ("identical" if c["f32_vs_file_first_mismatch"] is None else f"differ @{c['f32_vs_file_first_mismatch']}"),
           "reported", None) for c in chats),
    ]
    rows = section_a + section_b
    passed = all(ok for *_, ok in rows if ok is not None)

    print(f"\n{gguf.name}: qt (fp32, weights dequantized) vs llama.cpp {ll['llama_cpp_version']}; "
          f"passage {len(ids)} tokens in one {args.n_ctx}-token window\n")
    w = [max(len(r[k]) for r in rows) for k in range(3)]
    for title, section in ((f"A. same model: qt vs {F} (the file converted to F32, f32 KV cache)", section_a),
                           (f"B. qt vs {Q} (the file itself, default settings: f16 KV cache, "
                            "activations rounded to 8 bits)", section_b)):
        print(title)
        print(f"  {'check':<{w[0]}}  {'result':<{w[1]}}  {'target':<{w[2]}}  ok")
        for name, value, target, ok in section:
            mark = "-" if ok is None else "PASS" if ok else "FAIL"
            print(f"  {name:<{w[0]}}  {value:<{w[1]}}  {target:<{w[2]}}  {mark}")
        print()
    print(f"Why B is judged against a reference: llama.cpp's {qtype} kernels round the activations to 8-bit blocks\n"
          f"(Q8_1 for Q4_1 weights) before each dot product and cache K/V in f16, while qt and {F} compute in fp32.\n"
          f"{Q} agrees with {F} on {fq['top1_agreement']:.2%} of top-1 tokens and with qt on "
          f"{qq['top1_agreement']:.2%}; a greedy reply that\ndiffers is shown with qt's top-2 log-prob margin "
          "(nats) at the first differing step, and whether llama.cpp took qt's #2.")
    lw = max(len(F), len(Q))
    for c in chats:
        print(f"\n> {c['prompt']}")
        for label, key in (("qt", "qt_text"), (F, "f32_text"), (Q, "file_text")):
            print(f"  {label:<{lw}}: {c[key]!r}")
    for side, t in tokenization.items():
        for label, d in [("passage", t["passage"])] + [(f"chat {i}", c) for i, c in enumerate(t["chat"])]:
            if d["first_mismatch"] is not None:
                print(f"\ntokenization mismatch ({side} file, {label}) at {d['first_mismatch']}: "
                      f"qt {d['qt_around']} vs llama.cpp {d['llama_around']}")
    timings["total_s"] = time.perf_counter() - t_start
    print(f"\n{'all targets met' if passed else 'TARGETS NOT MET'}  "
          f"({', '.join(f'{k} {v:.1f}' for k, v in timings.items())})")

    result = {"gguf": str(gguf), "f32_gguf": args.f32_gguf, "llama_cpp_version": ll["llama_cpp_version"],
              "llama_desc": {side: ll[side]["desc"] for side in ("f32", "file")}, "n_ctx": args.n_ctx,
              "passage": str(args.passage), "passage_tokens": len(ids), "passed": passed,
              "targets": {"ppl_rtol": PPL_RTOL, "top1_min_vs_f32": TOP1_MIN, "top1_slack_vs_file": TOP1_SLACK,
                          "min_passage_tokens": MIN_PASSAGE_TOKENS},
              "checks": {sec: [{"check": n, "result": v, "target": t, "passed": ok} for n, v, t, ok in rows_]
                         for sec, rows_ in (("same_model_vs_f32", section_a), ("vs_file", section_b))},
              "perplexity": ppl, "pairs": {f"{a}_vs_{b}": s for (a, b), s in pair_stats.items()},
              "tokenization": tokenization, "chat": chats, "timings_s": timings}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
