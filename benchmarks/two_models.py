"""Batch-1 streamed decode through qt-serve holding two models vs one, vs in-process (random 125M).

    python benchmarks/two_models.py

Three rounds, interleaved: `LLM.stream` in a subprocess, qt-serve holding model "a", qt-serve holding
"a" and "b" (the same random 125M twice; requests go to "a"). 128-token prompt, 96 greedy tokens.
"""

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evals.bench import load_model
from qt_serve.checkpoint import save_checkpoint

tmp = tempfile.mkdtemp()
ckpt = load_model("125M")
path = save_checkpoint(Path(tmp) / "m", ckpt.model)
prompt = torch.randint(0, 49152, (128,), generator=torch.Generator().manual_seed(0)).tolist()
N = 96


def in_process():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import time, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from qt_serve.generate import LLM
from qt_serve.sampling import SamplingParams
llm = LLM.load('{path}', max_seq_len=512)
p = {prompt}
for rep in range(2):
    t, n = None, 0
    for d in llm.stream(p, SamplingParams(max_tokens={N}, temperature=0, ignore_eos=True)):
        n += 1
        if n == 1: t = time.perf_counter()
    rate = (n - 1) / (time.perf_counter() - t)
print(rate)
""",
        ],
        capture_output=True,
        text=True,
    )
    return float(r.stdout.strip().splitlines()[-1])


def server(models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable,
        "-m",
        "qt_serve.cli_serve",
        "--no-page",
        "--port",
        str(port),
        "--max-model-len",
        "512",
        "--log-level",
        "warning",
    ]
    for m in models:
        args += ["--model", f"{m}={path}"]
    proc = subprocess.Popen(args)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        rates = []
        for rep in range(2):
            body = {
                "model": models[0],
                "prompt": prompt,
                "max_tokens": N,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "logprobs": 0,
            }
            t, n = None, 0
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"logprobs": {' in line:
                        n += 1
                        if n == 1:
                            t = time.perf_counter()
            rates.append((n - 1) / (time.perf_counter() - t))
        return rates[-1]
    finally:
        proc.terminate()
        proc.wait(30)


res = {"in-process": [], "one model": [], "two models": []}
for rnd in range(3):
    res["in-process"].append(in_process())
    res["one model"].append(server(["a"]))
    res["two models"].append(server(["a", "b"]))
for k, v in res.items():
    print(f"{k:>12}: median {statistics.median(v):6.1f} tok/s  runs {' '.join(f'{x:.1f}' for x in v)}")
