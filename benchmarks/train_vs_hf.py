"""Training throughput on CPU: qt's trainer step vs a plain PyTorch loop over transformers.LlamaForCausalLM.

Same config (the `tiny` recipe's model), same batches (rows of the same shards), same optimizer
(AdamW, grad clipping), fp32, in one process: blocks of steps alternate between the two so both see
the same machine load; the median step time of each gives tokens/s and the ratio.

    python benchmarks/train_vs_hf.py --rounds 6 --steps 5 --out out/train_vs_hf.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from train import recipes
from train.cli import ensure_data
from train.pretrain import Settings, Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="steps per block")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    r = recipes.load(args.recipe)
    data = ensure_data(r["data"], 0)
    tmp = tempfile.mkdtemp()
    s = Settings(**{**r["train"], "data": data, "out": tmp, "max_steps": 10**6})
    qt = Trainer(s, r["model"])
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in qt.cfg.to_dict().items() if k != "qt"})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).train()
    hf.load_state_dict(qt.model.state_dict(), strict=False)  # same starting weights (rope buffers aside)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=s.lr, betas=(s.beta1, s.beta2), weight_decay=s.weight_decay)
    rows = s.micro_batch * s.accum

    def hf_step(i: int) -> float:
        batch = torch.from_numpy(qt.train_rows.rows(i * rows, s.micro_batch))
        logits = hf(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), s.grad_clip)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.item()

    times = {"qt": [], "hf": []}
    qt.train_step(), hf_step(0)  # warm up both
    for _ in range(args.rounds):
        for name in ("qt", "hf"):
            for _ in range(args.steps):
                t = time.perf_counter()
                qt.train_step() if name == "qt" else hf_step(qt.step)
                times[name].append(time.perf_counter() - t)
    tokens = rows * s.seq_len
    result = {name: {"median_step_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v),
                     "steps": len(v)} for name, v in times.items()}
    result["ratio_qt_over_hf"] = result["qt"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    result["setup"] = {"recipe": args.recipe, "batch": rows, "seq_len": s.seq_len, "threads": torch.get_num_threads(),
                       "transformers": transformers.__version__, "torch": torch.__version__,
                       "hf_attn": hf.config._attn_implementation}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
