"""`qt-train data | pretrain | sft | dpo | merge | pairs | plan`: parse flags, call the library (errors print as `error: ...`, exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

from qt_serve.cli import positive, run
from qt_serve.errors import QtError
from train import recipes

EXAMPLES = """examples:
  qt-train data shakespeare --out data/shk --vocab-size 4096
  qt-train pretrain --recipe tiny --out runs/tiny
  qt-train pretrain --out runs/tiny --resume
  qt-train plan --recipe 1b --memory-gb 80
  qt-train sft --init SmolLM2-135M-Instruct --data xsum,squad --out runs/mix
  qt-train sft --recipe sft-mix --lora-rank 16 --lr 5e-4 --out runs/mix-lora
  qt-train merge runs/mix-lora/best --out out/mix-merged
  qt-train pairs --votes ~/.cache/qt/arena.sqlite --out pairs/arena.jsonl
  qt-train pairs --alpaca SmolLM2-135M-Instruct --holdout 105 --out pairs/alpaca.jsonl
  qt-train dpo --init SmolLM2-135M-Instruct --data pairs/alpaca.jsonl --out runs/dpo
  torchrun --nproc-per-node 2 -m train.cli pretrain --recipe tiny --out runs/ddp
  qt-train sweep tiny --grid "lr=1e-3,2e-3;warmup=20,100" --set max_steps=300 --out runs/sweep
  qt-train ablate tiny --change output_bias=true --seeds 2 --out runs/output-bias"""


def fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {x}")
    return x


def data_main(args) -> int:
    from train.data import prepare

    start = time.perf_counter()
    out = prepare(args.sources, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer, seed=args.seed,
                  val_frac=args.val_frac, test_frac=args.test_frac, text_field=args.text_field,
                  doc_sep=args.doc_sep.encode().decode("unicode_escape") if args.doc_sep else None)
    meta = json.loads((out / "meta.json").read_text())
    splits = ", ".join(f"{k} {v['tokens']:,} tokens / {v['documents']} docs" for k, v in meta["splits"].items())
    print(f"{out}: vocab {meta['vocab_size']} ({meta['dtype']}); {splits} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by torchrun


def ensure_data(data: dict, seed: int) -> str:
    """The shards a recipe's [data] section describes, made once under $QT_HOME/data."""
    from qt_serve import hub
    from train.data import prepare

    if not data.get("sources"):
        raise QtError("no data: pass --data DIR (made by `qt-train data`) or a recipe with a [data] section")
    spec = {"seed": seed, **data}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]  # any setting, new shards
    path = hub.home() / "data" / ("-".join(Path(s).name for s in data["sources"]) + f"-{digest}")
    if not (path / "meta.json").exists():
        if rank() == 0:
            print(f"qt-train: making {path} from {', '.join(data['sources'])} ...", file=sys.stderr)
            prepare(out=path, **spec)
        while not (path / "meta.json").exists():  # other ranks wait for rank 0
            time.sleep(1)
    return str(path)


def settings_from(args, given: set[str], kind):
    """`kind` settings from a recipe's [train] overridden by the flags given, and the recipe."""
    recipe = recipes.load(args.recipe) if args.recipe else {"data": {}, "model": {}, "train": {}}
    names = {f.name for f in dataclasses.fields(kind)}
    bad = set(recipe["train"]) - names
    if bad:
        raise QtError(f"recipe {args.recipe}: unknown [train] key(s) {', '.join(sorted(bad))}")
    return {**recipe["train"], **{k: getattr(args, k) for k in given}}, recipe


def pretrain_main(args, given: set[str]) -> int:
    from train.pretrain import Settings, pretrain

    values, recipe = settings_from(args, given, Settings)
    if not args.resume and values.get("data") is None:
        values["data"] = ensure_data(recipe["data"], values.get("seed", 0))
    settings = Settings(**values)
    report = pretrain(settings, recipe["model"], given | set(recipe["train"]))
    if report["rank"]:
        return 0
    ppl = report["perplexity"]
    test = f", test {ppl['test']:.2f}" if "test" in ppl else ""  # data made with --test-frac 0 has none
    print(f"{report['checkpoint']}: perplexity train {ppl['train']:.2f}, val {ppl['val']:.2f}"
          f"{test}; {report['tokens_per_s']:,.0f} tokens/s, {report['wall_s']:.0f} s "
          f"({report['stopped']}); report: {Path(settings.out) / 'report.json'}")
    return 0


def finetune_main(args, given: set[str]) -> int:
    from train.finetune import Finetune, Finetuning, Preference, PreferenceTuning
    from train.pretrain import train

    kind, task = (Finetune, Finetuning) if args.command == "sft" else (Preference, PreferenceTuning)
    values, recipe = settings_from(args, given, kind)
    settings = kind(**values)
    report = train(settings, task, {}, given | set(recipe["train"]))
    if report["rank"]:
        return 0
    val = report[task.loss_name]["val"]
    extra = "".join(f", {k} {v:.3f}" for k, v in report.get("metrics", {}).get("val", {}).items())
    print(f"{report['checkpoint']}: val {task.loss_name} {val:.4f}{extra}; {report['trained_params']:,} weights "
          f"trained, {report['tokens_per_s']:,.0f} tokens/s, peak {report['peak_memory']['host_rss_gib']:.1f} GiB "
          f"resident, {report['wall_s']:.0f} s ({report['stopped']}); "
          f"report: {Path(settings.out) / 'report.json'}")
    return 0


def sweep_main(args) -> int:
    from train import sweep

    fixed = {}
    for text in args.set:
        fixed.update(sweep.parse_pairs(text))
    seeds = list(range(args.seeds))
    if args.command == "sweep":
        kind, trials = "sweep", sweep.grid_trials(sweep.parse_grid(args.grid), seeds, fixed)
    else:
        kind, trials = "ablation", sweep.ablation_trials([sweep.parse_pairs(c) for c in args.change], seeds, fixed)
    summary = sweep.sweep(args.recipe, args.out, kind, trials, args.launcher, args.ray_address)
    if summary:
        print((Path(args.out) / "summary.md").read_text())
        failed = [r["trial"] for r in summary["trials"] if r["state"] != "done"]
        if failed:
            print(f"qt-train {args.command}: {len(failed)} trial(s) not done: {', '.join(failed)}; rerun to retry",
                  file=sys.stderr)
            return 1
    return 0


def merge_main(args) -> int:
    from train.lora import merge

    out = merge(args.base, args.adapter, args.out, args.dtype)
    print(f"{out}: {args.adapter} merged into {args.base or 'its base'}; serve it with qt-serve --model {out}")
    return 0


def plan_main(args) -> int:
    from qt_serve.config import ModelConfig
    from train.planner import TARGETS, finetune_plan, format_finetune_plan, format_plan, plan, preset

    if sum(bool(x) for x in (args.recipe, args.config, args.preset)) != 1:
        raise QtError("give a model: --recipe NAME, --config CHECKPOINT_DIR_OR_CONFIG_JSON or --preset NAME "
                      "(one of them)")
    tuning = [flag for flag, v in (("--qlora", args.qlora), ("--grad-checkpointing", args.grad_checkpointing),
                                   ("--precision", args.precision), ("--lora-targets", args.lora_targets)) if v]
    if tuning and not args.task:
        raise QtError(f"{', '.join(tuning)} {'go' if len(tuning) > 1 else 'goes'} with --task sft|dpo "
                      "(the plan of a LoRA / QLoRA fine-tuning run)")
    name = args.recipe or args.preset or args.config
    if args.recipe:
        from train.data import prepare
        from train.pretrain import Settings

        r = recipes.load(args.recipe)
        # The defaults and max_position_embeddings that `qt-train pretrain` would use for this recipe.
        vocab = r["data"].get("vocab_size", inspect.signature(prepare).parameters["vocab_size"].default)
        seq = args.seq_len or r["train"].get("seq_len", Settings.seq_len)
        mb = args.micro_batch or r["train"].get("micro_batch", Settings.micro_batch)
        cfg = ModelConfig(**{"vocab_size": vocab, **r["model"],
                             "max_position_embeddings": max(seq, r["model"].get("max_position_embeddings", 0))})
    else:
        if args.preset:
            cfg = preset(args.preset)
        else:
            path = Path(args.config)
            cfg = ModelConfig.load(path / "config.json" if path.is_dir() else path)
        seq, mb = args.seq_len or min(2048, cfg.max_position_embeddings), args.micro_batch or 1
    if args.task:
        targets = [t.strip() for t in (args.lora_targets or ",".join(TARGETS)).split(",") if t.strip()]
        result = finetune_plan(cfg, seq, mb, args.memory_gb * 2**30, args.task, args.lora_rank, targets,
                               args.qlora, args.precision or "bf16", args.grad_checkpointing, name=name)
        print(json.dumps(result, indent=2) if args.json else format_finetune_plan(result))
        return 0
    result = plan(cfg, seq, mb, args.memory_gb * 2**30, args.lora_rank)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def pairs_main(args) -> int:
    from train.dpo import alpaca_pairs, export_pairs

    if args.votes:
        alpaca_only = [f"--{k.replace('_', '-')}" for k in ("model_name", "against", "limit", "holdout")
                       if getattr(args, k) is not None]
        if alpaca_only:
            raise QtError(f"{', '.join(alpaca_only)} go with --alpaca, not --votes")
        counts = export_pairs(args.votes, args.out)
        source = f"{counts['votes']} votes"
    else:
        from evals.target import open_target

        counts = alpaca_pairs(open_target(args.alpaca, args.model_name), args.out, args.limit, args.seed,
                              args.max_tokens, args.holdout or 0, args.against)
        source = f"{counts['answered']} instructions"
    left = ", ".join(f"{n} {why}" for why, n in counts["left_out"].items()) or "nothing"
    held = f"; {counts['heldout']} held out in {counts['heldout_file']}" if counts.get("heldout") else ""
    print(f"{args.out}: {counts['pairs']} pairs from {source} (left out: {left}){held}")
    return 0


def add_settings_flags(ap: argparse.ArgumentParser, kind) -> None:
    """One --flag per field of the settings dataclass `kind`, default None so we know which ones the user gave."""
    for f in dataclasses.fields(kind):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not None else str
        if f.name == "tdp_watts":
            kind = float
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            ap.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default {f.default})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qt-train", description="Make token shards, plan memory, pretrain, fine-tune (SFT, LoRA, DPO).",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="text / JSONL / Parquet / a built-in corpus -> tokenizer + token shards")
    d.add_argument("sources", nargs="+", help="files, directories, or a built-in corpus name (shakespeare)")
    d.add_argument("--out", required=True, help="data directory to write")
    d.add_argument("--vocab-size", type=positive, default=4096, help="BPE vocabulary to train (default 4096)")
    d.add_argument("--tokenizer", default=None, help="use this checkpoint's tokenizer instead of training one")
    d.add_argument("--seed", type=int, default=0, help="seed of the document split")
    d.add_argument("--val-frac", type=fraction, default=0.05, help="share of documents for validation")
    d.add_argument("--test-frac", type=fraction, default=0.05, help="share of documents for test")
    d.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    d.add_argument("--doc-sep", default=None, help="cut text files into documents at this string (e.g. '\\n\\n')")

    from train.finetune import Finetune, Preference
    from train.pretrain import Settings

    for name, kind, text in (("pretrain", Settings, "train a model from scratch (a recipe, flags, or both)"),
                             ("sft", Finetune, "supervised fine-tuning (full or LoRA) on chat data / a task mix"),
                             ("dpo", Preference, "preference tuning (DPO, full or LoRA) on prompt/chosen/rejected")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--recipe", default=None, help=f"name ({', '.join(recipes.names())}) or a .toml file")
        add_settings_flags(p, kind)

    m = sub.add_parser("merge", help="LoRA adapter + its base -> one plain checkpoint")
    m.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--base", default=None, help="base checkpoint (default: the adapter's base_model_name_or_path)")
    m.add_argument("--out", required=True, help="checkpoint directory to write")
    m.add_argument("--dtype", default=None, help="save as float32 (default), bfloat16 or float16")

    pl = sub.add_parser("plan", help="parameter count and memory per micro-batch; does it fit?")
    pl.add_argument("--recipe", default=None, help=f"name ({', '.join(recipes.names())}) or a .toml file")
    pl.add_argument("--config", default=None, help="a checkpoint directory or config.json instead of a recipe")
    pl.add_argument("--memory-gb", type=float, default=16.0, help="device memory in GiB (default 16)")
    pl.add_argument("--seq-len", type=positive, default=None)
    pl.add_argument("--micro-batch", type=positive, default=None)
    pl.add_argument("--lora-rank", type=positive, default=16)
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    from train.planner import PRESETS

    pl.add_argument("--preset", default=None, help=f"a published model's shape: {', '.join(PRESETS)}")
    pl.add_argument("--task", choices=("sft", "dpo"), default=None,
                    help="plan one LoRA / QLoRA fine-tuning step as qt-train sft|dpo runs it: the memory breakdown "
                         "at its peak, fits?, the largest micro-batch and seq_len")
    pl.add_argument("--qlora", action="store_true", help="with --task: 4-bit NF4 base (as qt-train --qlora)")
    pl.add_argument("--grad-checkpointing", action="store_true", help="with --task: as qt-train --grad-checkpointing")
    pl.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="with --task: autocast (default bf16)")
    pl.add_argument("--lora-targets", default=None, help="with --task: comma-separated projections (default all seven)")

    pr = sub.add_parser("pairs", help="preference pairs for DPO (JSONL) from arena votes or AlpacaEval")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--votes", metavar="SQLITE", help="the arena's vote database: winner chosen, loser rejected")
    src.add_argument("--alpaca", metavar="MODEL_OR_URL",
                     help="AlpacaEval: the baseline answer chosen, this model's greedy reply rejected")
    pr.add_argument("--out", required=True, help="pairs file to write (JSONL)")
    pr.add_argument("--model-name", default=None, help="which model of the server at --alpaca URL")
    pr.add_argument("--against", default=None, help="baseline answers file (default AlpacaEval's GPT-4 answers)")
    pr.add_argument("--limit", type=positive, default=None, help="answer the first N instructions only")
    pr.add_argument("--holdout", type=int, default=None,
                    help="keep N seeded-random instructions out, written to OUT_STEM.heldout.json for qt-eval alpaca")
    pr.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    pr.add_argument("--max-tokens", type=positive, default=512, help="new tokens at most per model reply")

    from train.sweep import LAUNCHERS

    for name, text in (("sweep", "a grid of recipe changes over seeds, one run each, and a summary"),
                       ("ablate", "the recipe and each change alone, over the same seeds, side by side")):
        sw = sub.add_parser(name, help=text)
        sw.add_argument("recipe", help=f"name ({', '.join(recipes.names())}) or a .toml file")
        if name == "sweep":
            sw.add_argument("--grid", required=True, help='"key=v1,v2;key2=v1,v2": [train] or [model] fields')
        else:
            sw.add_argument("--change", action="append", required=True, metavar="KEY=VALUE[,KEY=VALUE]",
                            help="one variant (repeat for more): output_bias=true, rope_theta=500000, "
                                 "num_hidden_layers=12,hidden_size=176 (depth for width) ...")
        sw.add_argument("--seeds", type=positive, default=1 if name == "sweep" else 2,
                        help=f"seeds per point, 0..N-1 (default {1 if name == 'sweep' else 2})")
        sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change every trial alike (e.g. max_steps=300)")
        sw.add_argument("--out", required=True, help="sweep directory (a rerun skips finished trials)")
        sw.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: one after another here; ray: Ray tasks; slurm: a job array (see train/sweep.py)")
        sw.add_argument("--ray-address", default=None, help="a Ray cluster to join (default: a local Ray runtime)")

    args = ap.parse_args(argv)
    if args.command in ("sweep", "ablate"):
        return run(lambda: sweep_main(args))
    if args.command == "data":
        return run(lambda: data_main(args))
    if args.command == "plan":
        return run(lambda: plan_main(args))
    if args.command == "pairs":
        return run(lambda: pairs_main(args))
    if args.command == "merge":
        return run(lambda: merge_main(args))
    given = {k for k, v in vars(args).items() if v is not None and k not in ("command", "recipe")}
    if args.command == "pretrain":
        return run(lambda: pretrain_main(args, given))
    return run(lambda: finetune_main(args, given))


if __name__ == "__main__":
    sys.exit(main())
