"""`qt-quant compare CHECKPOINT`: every precision of one model side by side, llama.cpp beside them.

    qt-quant compare SmolLM2-135M-Instruct [--schemes fp32,bf16,int8,int4,...] [--peers] [--out DIR]
    qt-quant compare 125M --peers              (a random 125M Llama, evals.bench CONFIGS, SmolLM2's tokenizer)

For each precision the checkpoint is converted (`quant.convert.convert`; a converter that fails
gives a failed row with its error) into DIR/<scheme>, then measured:
  * size on disk (the directory's files);
  * load time and peak RSS of `checkpoint.load` + `Engine.load`, in a fresh interpreter, so the RSS
    is that model's own; in the same process, through the engine (so every backend, ONNX included):
  * perplexity on held-out text (benchmarks/data/passage.txt, public domain, ~2,900 tokens, cut to
    the context), from the engine's prompt scoring (the server's echo + logprobs path), as `qt-eval ppl`
    computes it (`evals.ppl`);
  * greedy agreement with fp32: 10 chat prompts (benchmarks/data/chat_prompts.json), --agree-tokens
    greedy tokens; a prompt agrees when its reply equals fp32's; for the others, the first differing
    step and fp32's top-2 log-prob margin there (nats; small = a near-tie);
  * through `qt-serve` (a subprocess, `evals.bench.serving`, --threads OpenMP threads): batch-1
    streaming decode tok/s (after the first token) and TTFT for a --prompt-token prompt and
    --new-tokens greedy tokens (best and median of --runs), and the aggregate tok/s of --streams
    concurrent streaming clients over 2 x --streams requests (`--max-batch` = --streams).

--peers adds llama.cpp rows (llama-cpp-python, the `peers` extra, run in helper processes under
--llama-python): the checkpoint exported to an F32 GGUF (`quant.gguf_export`; its logits are checked
against qt's fp32 on the passage's first tokens), Q8_0 made from it by llama.cpp's own quantizer,
and the shipped Q4_1 file of a known model (else Q4_1 made the same way). Same prompt ids and
greedy tokens, n_threads = --threads; decode tok/s and TTFT of `Llama.eval` timed around the call
and by llama.cpp's own counters, with and without flash attention, the best of all counting (its
strongest setting). llama-cpp-python decodes one sequence, so llama.cpp has no 16-stream figure.

Writes DIR/compare.json, DIR/compare.md (the table) and DIR/compare.png (bars); DIR defaults to
out/compare-<name>.

This file also runs as a script under --llama-python (the llama.cpp helper): the top level imports
the standard library only, and the helper functions numpy and llama_cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
PASSAGE = DATA / "passage.txt"
PROMPTS = DATA / "chat_prompts.json"
PEER_QUANTS = {"q8_0": 7, "q4_1": 3}  # llama_ftype values (LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_1)


@dataclass
class Workload:
    threads: int = 2
    prompt: int = 128  # prompt tokens of the speed runs
    new_tokens: int = 128  # greedy tokens of the speed runs
    runs: int = 3  # batch-1 runs: best and median
    streams: int = 16  # concurrent streams of the aggregate run (2 x streams requests); 0: no aggregate run
    agree_tokens: int = 32  # greedy tokens compared with fp32
    passage: Path = PASSAGE
    prompts: Path = PROMPTS


# ---- qt: one precision ---------------------------------------------------------------------------

PROBE = """
import json, sys, time
req = json.load(open(sys.argv[1]))
import torch
torch.set_num_threads(req["threads"])
from quant.compare import peak_rss_mb, probe
t0 = time.perf_counter()
from qt_serve.checkpoint import load
from qt_serve.generate import LLM
llm = LLM(load(req["dir"], max_seq_len=req["ctx"]), max_seq_len=req["ctx"])
out = {"load_s": time.perf_counter() - t0, "rss_mb": peak_rss_mb()}
out.update(probe(llm, req))
json.dump(out, open(sys.argv[2], "w"))
"""


def peak_rss_mb() -> float:
    """This process's peak RSS since it started its program (VmHWM). Not ru_maxrss: Linux keeps that across exec,
    so a child would report at least its parent's RSS at the fork."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def probe(llm, req: dict) -> dict:
    """Quality through the engine (a loaded `LLM`): passage perplexity from prompt scoring, greedy replies
    with the top-2 margin at every step, and (asked for fp32) the raw logits of the passage's first tokens."""
    import numpy as np
    import torch

    from evals import ppl
    from evals.target import Local
    from qt_serve.sampling import SamplingParams

    ids = req["passage_ids"]
    # `qt-eval ppl`'s scoring through the engine; one window, as the passage was cut to the context
    s = ppl.summary(*ppl.score(Local(llm.gen), [ids], len(ids), len(ids) - 1))
    out = {"nll": s["cross_entropy"], "ppl": s["perplexity"], "passage_tokens": len(ids), "greedy": [], "margins": []}
    params = SamplingParams(temperature=0, max_tokens=req["agree_tokens"], logprobs=2)
    for prompt in req["chat_ids"]:
        c = llm.generate(prompt, params)
        out["greedy"].append(c.tokens)
        out["margins"].append([ch.top[0][1] - ch.top[1][1] for ch in c.choices])  # nats, per step
    if req.get("logits_path"):
        with torch.inference_mode():
            logits = llm.ckpt.model(torch.tensor([ids[:req["logits_tokens"]]]))[0].float()  # (n, V)
        np.save(req["logits_path"], logits.numpy())
    return out


def run_probe(directory: Path, req: dict, tmp: Path) -> dict:
    """`probe` in a fresh interpreter (so its peak RSS is this model's alone)."""
    req_path, resp_path = tmp / "probe-request.json", tmp / "probe-response.json"
    req_path.write_text(json.dumps({**req, "dir": str(directory)}))
    resp_path.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", PROBE, str(req_path), str(resp_path)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0 or not resp_path.exists():
        raise RuntimeError(f"probe of {directory} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(resp_path.read_text())


def stream_timed(url: str, prompt: list[int], n: int) -> tuple[float, float]:
    """One streaming request of n greedy tokens (`evals.bench.stream_one`): (TTFT s, decode tok/s after the
    first token)."""
    import asyncio

    import openai

    from evals.bench import stream_one

    async def one():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            return await stream_one(client, "m", prompt, n)

    ttft, span = asyncio.run(one())
    return ttft, (n - 1) / span


def serve_speed(directory: Path, prompts: list[list[int]], work: Workload, log) -> dict:
    """Batch-1 TTFT and decode tok/s, and the --streams aggregate, through a qt-serve subprocess."""
    import asyncio

    from evals.bench import load_level, serving

    flags = ("--no-page", "--max-batch", str(max(work.streams, 1)), "--max-queue", "1024", "--max-model-len",
             str(work.prompt + work.new_tokens), "--log-level", "warning")
    with serving({"m": str(directory)}, *flags, env={"OMP_NUM_THREADS": str(work.threads)}, log=log) as (url, _):
        # Every request has a prompt of its own: the engine reuses a cached prefix, so a repeated prompt
        # would skip its prefill.
        stream_timed(url, prompts[0][:16], 4)  # warm-up: allocator, thread pool, lazy init
        runs = [stream_timed(url, p, work.new_tokens) for p in prompts[1:1 + work.runs]]
        row = speed_row(runs)
        if work.streams:
            agg = asyncio.run(load_level(url, "m", prompts[1 + work.runs:], work.new_tokens, work.streams))
            row |= {"streams_tok_s": agg["tok_s"], "streams_ttft_p50_s": agg["ttft_p50_s"]}
    return row


def speed_row(runs: list[tuple[float, float]]) -> dict:
    ttft, tps = [r[0] for r in runs], [r[1] for r in runs]
    return {"ttft_s": min(ttft), "ttft_median_s": statistics.median(ttft), "decode_tok_s": max(tps),
            "decode_median_tok_s": statistics.median(tps)}


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


# ---- llama.cpp helper (runs under --llama-python: standard library, numpy, llama_cpp) ----------------


def llama_quantize(src: str, dst: str, ftype: int, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> ftype {ftype} failed")


def llama_speed(llama_cpp, llm, prompt: list[int], n: int) -> tuple[float, float, float | None]:
    """Greedy: (TTFT s, decode tok/s timed around eval, decode tok/s by llama.cpp's own counters)."""
    import numpy as np

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    start = time.perf_counter()
    llm.eval(prompt)
    tok = argmax()
    first = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([tok])
        tok = argmax()
    end = time.perf_counter()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    own = perf.n_eval / (perf.t_eval_ms / 1e3) if perf.n_eval and perf.t_eval_ms else None
    return first - start, (n - 1) / (end - first), own


def llama_measure(req: dict) -> dict:
    """One GGUF: load time and RSS, speed (best over flash attention off/on), passage perplexity, greedy."""
    import llama_cpp
    import numpy as np

    path, threads = req["gguf"], req["threads"]
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=req["prompt"] + req["new_tokens"] + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    out = {"load_s": time.perf_counter() - t0,
           "rss_mb": peak_rss_mb(),
           "llama_cpp_version": llama_cpp.__version__, "settings": {}}
    for fa in (False, True):
        if fa:
            llm.close()
            llm = llama_cpp.Llama(path, n_ctx=req["prompt"] + req["new_tokens"] + 8, n_threads=threads,
                                  n_threads_batch=threads, verbose=False, flash_attn=True)
        llama_speed(llama_cpp, llm, req["prompt_ids"][0][:16], 4)  # warm-up
        runs = [llama_speed(llama_cpp, llm, p, req["new_tokens"]) for p in req["prompt_ids"][1:]]  # qt's prompts
        row = speed_row([(t, max(wall, own or 0)) for t, wall, own in runs])
        row["decode_wall_tok_s"] = max(r[1] for r in runs)
        out["settings"][f"flash_attn={fa}"] = row
    llm.close()
    best = max(out["settings"].values(), key=lambda r: r["decode_tok_s"])
    out.update({k: min(r[k] for r in out["settings"].values()) for k in ("ttft_s", "ttft_median_s")})
    out.update({k: best[k] for k in ("decode_tok_s", "decode_median_tok_s")})

    # Quality: every position's logits of the passage (scores[i] predicts token i+1), then greedy replies
    # by our own argmax of the raw logits (no sampler setting can differ from qt's).
    # The export check (logits_path) compares with qt's fp32: an f32 KV cache there, llama.cpp's f16 otherwise.
    ids = req["passage_ids"]
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if req.get("logits_path") else {}
    llm = llama_cpp.Llama(path, n_ctx=len(ids) + 8, n_threads=threads, n_threads_batch=threads, logits_all=True,
                          verbose=False, **kv)
    llm.eval(ids)
    nll = 0.0
    for i in range(0, len(ids) - 1, 256):
        x = np.asarray(llm.scores[i:min(i + 256, len(ids) - 1)], dtype=np.float64)  # (r, V)
        m = x.max(1, keepdims=True)
        lse = (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]
        nll += float((lse - x[np.arange(len(x)), ids[i + 1:i + 1 + len(x)]]).sum())
    out["nll"] = nll / (len(ids) - 1)
    out["ppl"] = float(np.exp(out["nll"]))
    if req.get("logits_path"):
        np.save(req["logits_path"], np.array(llm.scores[:req["logits_tokens"]], dtype=np.float32))
    out["greedy"] = []
    for prompt in req["chat_ids"]:
        llm.reset()
        llm.eval(prompt)
        reply = []
        while len(reply) < req["agree_tokens"]:
            reply.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if reply[-1] in req["eos_ids"]:
                break
            llm.eval([reply[-1]])
        out["greedy"].append(reply)
    llm.close()
    return out


def helper_main(argv: list[str]) -> int:
    """`compare.py --llama-helper quantize SRC DST FTYPE THREADS` or `... measure REQUEST RESPONSE`."""
    if argv[0] == "quantize":
        llama_quantize(argv[1], argv[2], int(argv[3]), int(argv[4]))
    else:
        Path(argv[2]).write_text(json.dumps(llama_measure(json.loads(Path(argv[1]).read_text()))))
    return 0


def run_helper(python: str, *args: str) -> None:
    r = subprocess.run([python, str(Path(__file__).resolve()), "--llama-helper", *args], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp helper ({python}) failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")


def llama_python_default() -> str | None:
    """$QT_LLAMA_PYTHON, else this interpreter if llama_cpp imports in it."""
    import importlib.util

    return os.environ.get("QT_LLAMA_PYTHON") or (sys.executable if importlib.util.find_spec("llama_cpp") else None)


def peer_rows(source: str, fp32_dir: Path, req: dict, python: str, tmp: Path, out_dir: Path) -> list[dict]:
    """llama.cpp rows: F32 (qt's export), Q8_0 made by llama.cpp, Q4_1 shipped (known model) or made."""
    import numpy as np

    from qt_serve import hub
    from quant.gguf_export import export

    ggufs = out_dir / "gguf"
    f32 = export(fp32_dir, ggufs / "f32.gguf")
    files = {"llama.cpp f32": f32}
    for name, ftype in PEER_QUANTS.items():
        if name == "q4_1" and source in hub.KNOWN:
            files["llama.cpp Q4_1 (shipped)"] = hub.fetch_file(source)
            continue
        dst = ggufs / f"{name}.gguf"
        run_helper(python, "quantize", str(f32), str(dst), str(ftype), str(req["threads"]))
        files[f"llama.cpp {name}"] = dst
    rows = []
    for label, path in files.items():
        row = {"name": label, "kind": "llama.cpp", "path": str(path), "size_mb": Path(path).stat().st_size / 1e6}
        try:
            logits = tmp / "llama-f32-logits.npy" if label == "llama.cpp f32" else None
            r_req, r_resp = tmp / "llama-request.json", tmp / "llama-response.json"
            r_req.write_text(json.dumps({**req, "gguf": str(path), "logits_path": str(logits) if logits else None}))
            run_helper(python, "measure", str(r_req), str(r_resp))
            row |= json.loads(r_resp.read_text())
            if logits and req.get("logits_path"):  # the export check: llama.cpp's F32 logits against qt's fp32
                diff = np.abs(np.load(logits) - np.load(req["logits_path"]))
                row["export_check"] = {"tokens": req["logits_tokens"], "max_abs_logit_diff": float(diff.max()),
                                       "mean_abs_logit_diff": float(diff.mean())}
        except Exception as e:  # a failed peer is a row that says why
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


# ---- the comparison --------------------------------------------------------------------------------


def fp32_checkpoint(source: str, out: Path) -> Path:
    """The fp32 reference as a checkpoint directory, out/fp32: the source loaded in fp32 and saved, or, for a
    random config name of evals.bench (45M, 125M), that model seeded 0 with SmolLM2's tokenizer (and vocabulary)."""
    import torch

    from evals.bench import CONFIGS
    from qt_serve import checkpoint, hub
    from qt_serve.model import Transformer
    from qt_serve.tokenizer import Tokenizer
    from quant.convert import load_source

    if source in CONFIGS:
        tokenizer = Tokenizer.load(hub.pull(hub.DEFAULT_MODEL))
        cfg = replace(CONFIGS[source], vocab_size=tokenizer.vocab_size,  # 45M's 32000 -> SmolLM2's 49152
                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        torch.manual_seed(0)
        return checkpoint.save_checkpoint(out, Transformer(cfg).eval(), tokenizer)
    ckpt = load_source(source, dtype="float32")  # refuses a quantized source, which has no fp32 to compare with
    ckpt.model.config.quantization = None  # an fp16/bf16 source's record: this copy is fp32
    return checkpoint.save_checkpoint(out, ckpt.model, ckpt.tokenizer, ckpt.generation_config)


def agreement(row: dict, ref: dict, n_prompts: int) -> None:
    """Greedy agreement of `row` with fp32 `ref`: a reply agrees when it equals fp32's (EOS included); for the
    others the first differing step and fp32's top-2 margin there."""
    differ = []
    for i, (a, b) in enumerate(zip(row["greedy"], ref["greedy"])):
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            margin = ref["margins"][i][k] if k < len(ref["margins"][i]) else None
            differ.append({"prompt": i, "step": k, "fp32_margin": margin})
    row["agree"] = n_prompts - len(differ)
    row["differ"] = differ


def compare(source: str, schemes: list[str] | None = None, out: str | Path | None = None,
            work: Workload | None = None, peers: bool = False, llama_python: str | None = None,
            group_size: int | None = None) -> dict:
    """Convert `source` to each scheme and measure every row (module docstring); writes and returns the result."""
    import torch
    from tqdm import tqdm

    from evals.bench import cpu_line
    from qt_serve.tokenizer import Tokenizer
    from quant.convert import SCHEMES, convert

    work = work or Workload()
    schemes = list(schemes or ["fp32", *SCHEMES])
    name = Path(str(source).rstrip("/")).name.removesuffix(".gguf")
    out = Path(out or f"out/compare-{name}")
    out.mkdir(parents=True, exist_ok=True)
    print(cpu_line(), flush=True)
    print(f"{source}: threads {work.threads}, prompt {work.prompt}, {work.new_tokens} greedy tokens, "
          f"{work.streams} streams; schemes {', '.join(schemes)}{' + llama.cpp' if peers else ''}", flush=True)
    fp32_dir = fp32_checkpoint(str(source), out / "fp32")
    if {"int8", "int4"} & set(schemes):  # build the native kernels now, once: no row's load time holds the build
        from qt_serve.errors import QtError
        from quant import native

        try:
            native.extension()
        except QtError as e:  # those rows run on torch's kernels, and their serve.log says why
            print(f"native kernels: {e}", flush=True)
    tok = Tokenizer.load(fp32_dir)
    from qt_serve.config import ModelConfig

    ctx = ModelConfig.load(fp32_dir / "config.json").max_position_embeddings
    chat = [tok.encode_chat([{"role": "user", "content": p}]) for p in json.loads(Path(work.prompts).read_text())]
    passage = tok.encode(Path(work.passage).read_text(encoding="utf-8"), add_special_tokens=False)
    passage = passage[:ctx - 1]  # one window (the last position needs no room for a next token)
    g = torch.Generator().manual_seed(0)
    # (1 + runs + 2 x streams, prompt): a warm-up, the batch-1 runs, the streams' requests, each its own
    prompts = torch.randint(0, tok.vocab_size, (1 + work.runs + 2 * work.streams, work.prompt), generator=g).tolist()
    eos = sorted({i for i in (tok.eos_id, *ModelConfig.load(fp32_dir / "config.json").eos_token_ids) if i is not None})
    req = {"threads": work.threads, "ctx": min(ctx, max(len(passage), *map(len, chat)) + work.agree_tokens + 1),
           "passage_ids": passage, "chat_ids": chat, "agree_tokens": work.agree_tokens, "logits_tokens": 16,
           "prompt_ids": prompts[:1 + work.runs], "prompt": work.prompt, "new_tokens": work.new_tokens, "runs": work.runs,
           "eos_ids": eos}
    result = {"source": str(source), "cpu": cpu_line(), "workload": {**asdict(work), "passage_tokens": len(passage),
              "passage": str(work.passage), "prompts": str(work.prompts)}, "rows": []}
    rows = result["rows"]
    with tempfile.TemporaryDirectory(prefix="qt-compare-") as tmp, open(out / "serve.log", "w") as log:
        tmp = Path(tmp)
        for scheme in tqdm(schemes, desc="precisions", unit="row"):
            row = {"name": scheme, "kind": "qt"}
            rows.append(row)
            try:
                t0 = time.perf_counter()
                d = fp32_dir if scheme == "fp32" else convert(fp32_dir, scheme, out / scheme, group_size)
                row |= {"path": str(d), "convert_s": time.perf_counter() - t0, "size_mb": dir_mb(d)}
                logits = {"logits_path": str(tmp / "fp32-logits.npy")} if scheme == "fp32" else {}
                row |= run_probe(d, {**req, **logits}, tmp)
                row |= serve_speed(d, prompts, work, log)
            except Exception as e:  # e.g. a converter not written yet: a failed row, the others go on
                row["error"] = f"{type(e).__name__}: {e}".strip()
                tqdm.write(f"{scheme}: failed: {row['error'][:300]}")
            (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")  # so far: a stopped run keeps it
        if peers:
            python = llama_python or llama_python_default()
            if python is None:
                rows.append({"name": "llama.cpp", "kind": "llama.cpp", "error": "llama_cpp is not installed here; "
                             "pip install -e '.[peers]' (built from source) or pass --llama-python"})
            else:
                fp32 = {"logits_path": str(tmp / "fp32-logits.npy")} if (tmp / "fp32-logits.npy").exists() else {}
                rows += peer_rows(str(source), fp32_dir, {**req, **fp32}, python, tmp, out)
    ref = next((r for r in rows if r["name"] == "fp32" and "error" not in r), None)
    for r in rows:
        if ref is not None and "greedy" in r:
            agreement(r, ref, len(chat))
            r["ppl_vs_fp32"] = r["ppl"] / ref["ppl"] - 1
    result["checks"] = checks(rows)
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "compare.md").write_text(table)
    plot(result, out / "compare.png")
    print(table, flush=True)
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}", flush=True)
    return result


def fastest(rows: list[dict], names: tuple[str, ...]) -> dict | None:
    ok = [r for r in rows if r["name"] in names and "decode_tok_s" in r]
    return max(ok, key=lambda r: r["decode_tok_s"]) if ok else None


def checks(rows: list[dict]) -> list[dict]:
    """The issue's targets that this run's rows allow judging: (check, value, passed)."""
    out = []
    by = {r["name"]: r for r in rows}
    for mine, theirs in (((("int4", "onnx-int4"), ("llama.cpp Q4_1 (shipped)", "llama.cpp q4_1"))),
                         ((("int8", "onnx-int8"), ("llama.cpp q8_0",)))):
        a, b = fastest(rows, mine), fastest(rows, theirs)
        if a and b:
            out.append({"check": f"{a['name']} decode tok/s >= {b['name']}",
                        "value": f"{a['decode_tok_s']:.1f} vs {b['decode_tok_s']:.1f}",
                        "passed": a["decode_tok_s"] >= b["decode_tok_s"]})
            out.append({"check": f"{a['name']} TTFT <= {b['name']}",
                        "value": f"{a['ttft_s'] * 1e3:.0f} vs {b['ttft_s'] * 1e3:.0f} ms", "passed": a["ttft_s"] <= b["ttft_s"]})
    for scheme, tol in (("int8", 0.01), ("onnx-int8", 0.01), ("int4", 0.03), ("onnx-int4", 0.03)):
        if "ppl_vs_fp32" in by.get(scheme, {}):
            v = by[scheme]["ppl_vs_fp32"]
            out.append({"check": f"{scheme} perplexity within {tol:.0%} of fp32", "value": f"{v:+.2%}",
                        "passed": abs(v) <= tol})
    for r in rows:
        if r["kind"] == "qt" and r["name"] != "fp32" and "agree" in r:
            n = r["agree"] + len(r["differ"])
            out.append({"check": f"{r['name']} greedy agrees with fp32 on >= {n - 2}/{n}",
                        "value": f"{r['agree']}/{n}", "passed": r["agree"] >= n - 2})
    return out


def markdown(result: dict) -> str:
    def f(r, key, fmt, scale=1.0):
        return fmt.format(r[key] * scale) if r.get(key) is not None else "–"

    w = result["workload"]
    lines = [f"{result['cpu']}", "",
             f"`{result['source']}`, {w['threads']} threads; speed through qt-serve (llama.cpp: llama-cpp-python "
             f"in-process): prompt {w['prompt']}, {w['new_tokens']} greedy tokens, best (median) of {w['runs']}; "
             f"perplexity on {w['passage_tokens']} passage tokens; greedy agreement with fp32 over the first "
             f"{w['agree_tokens']} tokens of each chat prompt", "",
             "| precision | size MB | load s | peak RSS MB | perplexity | vs fp32 | agree | decode tok/s | TTFT ms "
             f"| {w['streams'] or 'no'}-stream tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r and "ppl" not in r:
            lines.append(f"| {r['name']} | {f(r, 'size_mb', '{:.1f}')} | failed: {r['error'][:160]} |||||||||")
            continue
        agree = f"{r['agree']}/{r['agree'] + len(r['differ'])}" if "agree" in r else "–"
        speed = (f"{f(r, 'decode_tok_s', '{:.1f}')} ({f(r, 'decode_median_tok_s', '{:.1f}')})",
                 f"{f(r, 'ttft_s', '{:.0f}', 1e3)} ({f(r, 'ttft_median_s', '{:.0f}', 1e3)})")
        lines.append(f"| {r['name']} | {f(r, 'size_mb', '{:.1f}')} | {f(r, 'load_s', '{:.2f}')} | "
                     f"{f(r, 'rss_mb', '{:.0f}')} | {f(r, 'ppl', '{:.4g}')} | {f(r, 'ppl_vs_fp32', '{:+.2%}')} | "
                     f"{agree} | {speed[0]} | {speed[1]} | {f(r, 'streams_tok_s', '{:.1f}')} |"
                     + (f" serve failed: {r['error'][:120]}" if "error" in r else ""))
    notes = [f"- {r['name']}: prompt {d['prompt']} differs at step {d['step']}, fp32 top-2 margin "
             + (f"{d['fp32_margin']:.3f} nats" if d["fp32_margin"] is not None else "n/a (fp32 reply ended)")
             for r in result["rows"] for d in r.get("differ", [])]
    notes += [f"- export check ({r['name']} vs qt fp32, first {c['tokens']} passage tokens): max |logit diff| "
              f"{c['max_abs_logit_diff']:.2e}, mean {c['mean_abs_logit_diff']:.2e}"
              for r in result["rows"] if (c := r.get("export_check"))]
    notes += [f"- {'PASS' if c['passed'] else 'FAIL'}: {c['check']}: {c['value']}" for c in result["checks"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bars per row: batch-1 decode tok/s, TTFT, the streams aggregate and size on disk."""
    from matplotlib.figure import Figure

    rows = [r for r in result["rows"] if "decode_tok_s" in r or "size_mb" in r]
    names = [r["name"] for r in rows]
    w = result["workload"]
    panels = (("decode_tok_s", 1, "batch-1 decode tok/s"), ("ttft_s", 1e3, f"TTFT ms (prompt {w['prompt']})"),
              ("streams_tok_s", 1, f"{w['streams']}-stream aggregate tok/s"), ("size_mb", 1, "size on disk MB"))
    fig = Figure(figsize=(4 * len(panels), 0.45 * len(rows) + 1.6), layout="constrained")
    fig.suptitle(f"qt-quant compare {result['source']}: {w['threads']} threads, {w['new_tokens']} greedy tokens")
    for ax, (key, scale, title) in zip(fig.subplots(1, len(panels), sharey=True), panels):
        vals = [(r.get(key) or 0) * scale for r in rows]
        ax.barh(names, vals, color=["C1" if r["kind"] == "llama.cpp" else "C0" for r in rows])
        for y, v in enumerate(vals):
            if v:
                ax.text(v, y, f" {v:.0f}" if v >= 10 else f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.2)
    fig.axes[0].invert_yaxis()  # shared: the first row on top in every panel
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--llama-helper"]:
        return helper_main(argv[1:])
    from qt_serve.cli import positive
    from quant.convert import SCHEMES

    ap = argparse.ArgumentParser(prog="qt-quant compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint dir, HF Llama dir, .gguf file, known model name, or a random "
                                       "config of evals.bench (45M, 125M)")
    ap.add_argument("--schemes", default=",".join(["fp32", *SCHEMES]),
                    help="comma-separated precisions (default: all): fp32," + ",".join(SCHEMES))
    ap.add_argument("--group-size", type=positive, default=None, help="int4 / onnx-int4: weights per scale")
    ap.add_argument("--peers", action="store_true", help="add llama.cpp rows (llama-cpp-python: the peers extra)")
    ap.add_argument("--llama-python", default=None,
                    help="python with llama_cpp (default: $QT_LLAMA_PYTHON, else this one if llama_cpp imports)")
    d = Workload()
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--prompt", type=int, default=d.prompt, help="prompt tokens of the speed runs")
    ap.add_argument("--new-tokens", type=int, default=d.new_tokens, help="greedy tokens of the speed runs")
    ap.add_argument("--runs", type=int, default=d.runs, help="batch-1 runs (best and median)")
    ap.add_argument("--streams", type=int, default=d.streams, help="concurrent streams of the aggregate run (0: none)")
    ap.add_argument("--agree-tokens", type=int, default=d.agree_tokens, help="greedy tokens compared with fp32")
    ap.add_argument("--passage", type=Path, default=d.passage, help="held-out text for perplexity")
    ap.add_argument("--prompts", type=Path, default=d.prompts, help="JSON list of chat prompts")
    ap.add_argument("--out", default=None, help="output directory (default: out/compare-NAME)")
    a = ap.parse_args(argv)
    schemes = [s.strip() for s in a.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in ("fp32", *SCHEMES)]
    if unknown:
        ap.error(f"unknown schemes {', '.join(unknown)}; choose from fp32, {', '.join(SCHEMES)}")
    work = Workload(a.threads, a.prompt, a.new_tokens, a.runs, a.streams, a.agree_tokens, a.passage, a.prompts)
    compare(a.checkpoint, schemes, a.out, work, a.peers, a.llama_python, a.group_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
