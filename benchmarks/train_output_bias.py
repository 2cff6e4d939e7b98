"""Output-bias ablation: the same run with and without an LM-head bias initialised to unigram log-probs.

Two runs of a recipe (shortened with --max-steps), identical except `output_bias`; their loss curves
overlaid in one PNG, and the losses at the first step, a few early steps and the end.

    python benchmarks/train_output_bias.py --max-steps 150 --micro-batch 8 --runs /work/runs \
        --png docs/train/output-bias.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train import recipes
from train.cli import ensure_data
from train.pretrain import Settings, pretrain
from train.progress import plot_losses, read_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--png", default="docs/train/output-bias.png")
    args = ap.parse_args()

    r = recipes.load(args.recipe)
    data = ensure_data(r["data"], 0)
    curves, summary = {}, {}
    for bias in (False, True):
        name = f"output-bias-{'on' if bias else 'off'}"
        out = Path(args.runs) / name
        s = Settings(**{**r["train"], "data": data, "out": str(out), "max_steps": args.max_steps,
                        "eval_every": args.eval_every, "save_every": args.max_steps, "log_every": 1,
                        "patience": 0, "output_bias": bias,
                        "micro_batch": args.micro_batch or r["train"]["micro_batch"]})
        report = pretrain(s, r["model"])
        rows = read_metrics(out / "metrics.jsonl")
        train = {m["step"]: m["loss"] for m in rows if "loss" in m}
        val = {m["step"]: m["val_loss"] for m in rows if "val_loss" in m}
        summary[name] = {"loss_step": {k: train[k] for k in (1, 10, 25, 50, 100, args.max_steps) if k in train},
                         "val_loss": val, "final_ce": report["cross_entropy"], "wall_s": report["wall_s"]}
        curves[name] = out / "metrics.jsonl"
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    plot_losses(curves, args.png, title=f"{args.recipe}: LM-head bias at unigram log-probs (on) vs none (off)")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
