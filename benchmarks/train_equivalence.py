"""Exactness checks on real text: SIGKILL + --resume vs an uninterrupted run, and torchrun DDP vs accumulation.

A small model on the `tiny` recipe's Shakespeare shards, fp32 on CPU:
1. run A trains 40 steps; run B is SIGKILLed after step 25 (checkpoints every 10) and resumed;
   the step-40 train loss and val loss must agree to 1e-5;
2. `torchrun --nproc-per-node 2` (gloo) with accum 1 vs one process with accum 2, 20 steps;
   losses must agree to 1e-4.

    python benchmarks/train_equivalence.py --runs /work/runs/equiv
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from train import recipes
from train.cli import ensure_data
from train.progress import read_metrics

MODEL = "[model]\nhidden_size = 128\nintermediate_size = 352\nnum_hidden_layers = 4\nnum_attention_heads = 4\n" \
        "num_key_value_heads = 2\ntie_word_embeddings = true\n"


def last(run: Path, key: str, step: int) -> float:
    return [m[key] for m in read_metrics(run / "metrics.jsonl") if m["step"] == step and key in m][-1]


def pretrain(*args: str, launcher=(sys.executable, "-m", "train.cli")) -> subprocess.Popen:
    return subprocess.Popen([*launcher, "pretrain", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/equiv")
    args = ap.parse_args()
    runs = Path(args.runs)
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    (runs / "model.toml").write_text(MODEL)
    data = ensure_data(recipes.load("tiny")["data"], 0)
    common = ["--recipe", str(runs / "model.toml"), "--data", data, "--seq-len", "128", "--micro-batch", "8",
              "--eval-tokens", "8192", "--log-every", "1", "--warmup", "5", "--lr", "2e-3"]
    result = {}

    # 1. SIGKILL + resume
    flags = common + ["--max-steps", "40", "--save-every", "10", "--eval-every", "20"]
    assert pretrain(*flags, "--out", str(runs / "whole")).wait() == 0
    proc = pretrain(*flags, "--out", str(runs / "cut"))
    metrics = runs / "cut" / "metrics.jsonl"
    while not metrics.exists() or max((m["step"] for m in read_metrics(metrics)), default=0) < 25:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(m["step"] for m in read_metrics(runs / "cut" / "metrics.jsonl"))
    resumed = pretrain("--out", str(runs / "cut"), "--resume")
    log = resumed.communicate()[1]
    assert resumed.returncode == 0, log[-2000:]
    result["resume"] = {"killed_after_step": killed_at,
                        "resumed": next(ln for ln in log.splitlines() if "resumed from" in ln),
                        "loss_40_whole": last(runs / "whole", "loss", 40),
                        "loss_40_resumed": last(runs / "cut", "loss", 40),
                        "val_40_whole": last(runs / "whole", "val_loss", 40),
                        "val_40_resumed": last(runs / "cut", "val_loss", 40)}
    result["resume"]["abs_delta_loss"] = abs(result["resume"]["loss_40_whole"] - result["resume"]["loss_40_resumed"])

    # 2. DDP (2 processes, accum 1) vs 1 process, accum 2
    flags = common + ["--max-steps", "20", "--save-every", "20", "--eval-every", "20"]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "train.cli")
    os.environ["OMP_NUM_THREADS"] = "1"
    ddp = pretrain(*flags, "--accum", "1", "--out", str(runs / "ddp"), launcher=torchrun)
    assert ddp.wait() == 0, ddp.stderr.read()[-2000:]
    assert pretrain(*flags, "--accum", "2", "--out", str(runs / "one")).wait() == 0
    result["ddp"] = {"loss_20_ddp2": last(runs / "ddp", "loss", 20),
                     "loss_20_accum2": last(runs / "one", "loss", 20),
                     "val_20_ddp2": last(runs / "ddp", "val_loss", 20),
                     "val_20_accum2": last(runs / "one", "val_loss", 20)}
    result["ddp"]["abs_delta_loss"] = abs(result["ddp"]["loss_20_ddp2"] - result["ddp"]["loss_20_accum2"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
