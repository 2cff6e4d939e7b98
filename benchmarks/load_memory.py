"""Peak memory of loading a sharded bf16 checkpoint: qt against `transformers`, same files, same run.

    python benchmarks/load_memory.py [--dir /tmp/qt-1b] [--out docs/families/load_memory.json]

Writes (once) a random-weight Llama-3.2-1B-shaped model with `transformers` in bf16, in 300 MB
safetensors shards with `model.safetensors.index.json`, then loads it in fresh processes and reports
each one's peak resident memory (VmHWM, which includes the ~0.2 GB of torch itself) as a multiple
of the checkpoint's size on disk, after loading and after one 16-token forward (which touches every
weight: a memory-mapped load is cheap until then). The target (issue 15) is qt's bf16 load under 1.3×.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from qt_serve import fast

# Llama-3.2-1B's published config.json (meta-llama/Llama-3.2-1B): 1.24 B parameters, tied embeddings.
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
             rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})

CHILD = r"""
import json, sys, time
import torch

def hwm():  # peak resident KiB of this process image (VmHWM starts afresh at exec; ru_maxrss would not)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

base = hwm()
kind, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if kind.startswith("qt"):
    from qt_serve import checkpoint
    model = checkpoint.load(path, dtype=kind.split("-")[1]).model
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, kind.split("-")[1]))
seconds = time.perf_counter() - t
loaded = hwm()
with torch.no_grad():  # touches every weight: memory-mapped pages become resident
    model(torch.arange(16)[None])
dtype = str(next(model.parameters()).dtype)
print(json.dumps({"imports_kib": base, "loaded_kib": loaded, "peak_kib": hwm(),
                  "seconds": round(seconds, 2), "dtype": dtype}))
"""


def write(directory: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (directory / "model.safetensors.index.json").exists():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="300MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qt-load-1b"))
    ap.add_argument("--out", type=Path, default=Path("docs/families/load_memory.json"))
    args = ap.parse_args()
    write(args.dir)
    disk = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    shards = len(list(args.dir.glob("*.safetensors")))
    rows = []
    for kind in ("qt-bfloat16", "transformers-bfloat16", "qt-float32", "transformers-float32"):
        out = subprocess.run([sys.executable, "-c", CHILD, kind, str(args.dir)], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        r.update(loader=kind, peak_gib=round(r["peak_kib"] / 2**20, 3), peak_over_disk=round(r["peak_kib"] * 1024 / disk, 3))
        rows.append(r)
        print(f"{kind:24s} peak {r['peak_gib']:.2f} GiB = {r['peak_over_disk']:.2f}x disk after a forward "
              f"(after loading {r['loaded_kib'] / 2**20:.2f} GiB, imports {r['imports_kib'] / 2**20:.2f} GiB), "
              f"load {r['seconds']} s, {r['dtype']}", flush=True)
    result = {"disk_gib": round(disk / 2**30, 3), "shards": shards, "shape": SHAPE, "cpu": fast.cpu_name(),
              "python": sys.version.split()[0], "runs": rows, "target": "qt-bfloat16 peak_over_disk < 1.3"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint {result['disk_gib']} GiB in {shards} shards; wrote {args.out}")


if __name__ == "__main__":
    main()
