"""Before / after table and plots of fine-tuning runs, from their run directories and `qt-eval` outputs.

    python benchmarks/finetune_report.py --out docs/finetune \\
        --model base=docs/evals/squad-smollm2,docs/evals/xsum-smollm2,docs/evals/ifeval-smollm2-inprocess \\
        --model full=runs/mix-full:docs/finetune/squad-mix-full,docs/finetune/xsum-mix-full,docs/finetune/ifeval-mix-full \\
        --model lora=runs/mix-lora:docs/finetune/squad-mix-lora-merged,...

Each --model is NAME=[RUN_DIR:]EVAL_DIR,... (an evaluation directory holds squad.json, xsum.json or IFEval's
samples.jsonl). IFEval is scored on the prompts every model answered (a run with --limit scores fewer), from
the per-prompt results lm-eval wrote. Writes OUT/summary.md, summary.json, scores.png and, for models with a
run directory, loss.png (training and validation loss) and a copy of each run's report.json and mix.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from train import progress


def ifeval_scores(samples: Path, keys: set | None) -> dict:
    rows = [json.loads(line) for line in samples.open()]
    rows = [r for r in rows if keys is None or r["key"] in keys]
    inst = [x for r in rows for x in r["inst_level_strict_acc"]]
    return {"prompts": len(rows),
            "prompt_strict": 100 * sum(r["prompt_level_strict_acc"] for r in rows) / len(rows),
            "inst_strict": 100 * sum(inst) / len(inst),
            "prompt_loose": 100 * sum(r["prompt_level_loose_acc"] for r in rows) / len(rows),
            "reply_words": sum(len(r["response"].split()) for r in rows) / len(rows)}


def parse(spec: str) -> tuple[str, Path | None, list[Path]]:
    name, _, rest = spec.partition("=")
    run, _, evals = rest.rpartition(":")
    return name, Path(run) if run else None, [Path(e) for e in evals.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=[RUN:]EVAL,...")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [parse(m) for m in args.model]
    ifevals = {name: d / "samples.jsonl" for name, _, dirs in models for d in dirs if (d / "samples.jsonl").exists()}
    common = set.intersection(*({json.loads(line)["key"] for line in p.open()} for p in ifevals.values()))
    table = {}
    for name, run, dirs in models:
        row = {}
        for d in dirs:
            for task in ("squad", "xsum"):
                if (d / f"{task}.json").exists():
                    row[task] = json.loads((d / f"{task}.json").read_text())["scores"]
            if name in ifevals and d / "samples.jsonl" == ifevals[name]:
                row["ifeval"] = ifeval_scores(ifevals[name], common)
        if run is not None:
            report = json.loads((run / "report.json").read_text())
            row["run"] = {"trained_params": report["trained_params"], "tokens_per_s": report["tokens_per_s"],
                          "wall_s": report["wall_s"], "val_cross_entropy": report["cross_entropy"]["val"],
                          "peak_rss_gib": report.get("peak_memory", {}).get("host_rss_gib")}
            (out / "runs" / name).mkdir(parents=True, exist_ok=True)
            for f in ("report.json", "mix.json", "run.json"):
                shutil.copy(run / f, out / "runs" / name / f)
        table[name] = row
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")

    def cell(row, *path, fmt="{:.2f}"):
        for p in path:
            row = row.get(p) if isinstance(row, dict) else None
        return "" if row is None else fmt.format(row)

    lines = ["| model | SQuAD EM | SQuAD F1 | XSum R-1 | XSum R-2 | XSum R-L | XSum BLEU | IFEval prompt strict | "
             "IFEval inst strict | IFEval reply words | trained weights | tokens/s | train s | peak RSS GiB |",
             "|---" * 14 + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | {cell(row, 'squad', 'exact_match')} | {cell(row, 'squad', 'f1')} | "
                     f"{cell(row, 'xsum', 'rouge1')} | {cell(row, 'xsum', 'rouge2')} | {cell(row, 'xsum', 'rougeL')} | "
                     f"{cell(row, 'xsum', 'bleu')} | {cell(row, 'ifeval', 'prompt_strict')} | "
                     f"{cell(row, 'ifeval', 'inst_strict')} | {cell(row, 'ifeval', 'reply_words', fmt='{:.0f}')} | "
                     f"{cell(row, 'run', 'trained_params', fmt='{:,}')} | {cell(row, 'run', 'tokens_per_s', fmt='{:.0f}')} | "
                     f"{cell(row, 'run', 'wall_s', fmt='{:.0f}')} | {cell(row, 'run', 'peak_rss_gib', fmt='{:.1f}')} |")
    n = len(common) if common else 0
    text = "\n".join(lines) + f"\n\nIFEval on the {n} prompts every model answered (greedy, 512 new tokens at most).\n"
    (out / "summary.md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("SQuAD EM", ("squad", "exact_match")), ("SQuAD F1", ("squad", "f1")),
               ("XSum ROUGE-L", ("xsum", "rougeL")), ("IFEval prompt strict", ("ifeval", "prompt_strict"))]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(table)
    for k, (name, row) in enumerate(table.items()):
        values = [row.get(a, {}).get(b, 0) for _, (a, b) in metrics]
        ax.bar([i + k * width for i in range(len(metrics))], values, width, label=name)
    ax.set_xticks([i + width * (len(table) - 1) / 2 for i in range(len(metrics))], [m for m, _ in metrics])
    ax.set_ylabel("score (0-100)")
    ax.legend()
    ax.set_title("before / after fine-tuning")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    runs = {name: run / "metrics.jsonl" for name, run, _ in models if run is not None}
    if runs:
        progress.plot_losses(runs, out / "loss.png", title="fine-tuning loss (assistant tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
