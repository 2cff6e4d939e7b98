"""`qt-train data | pretrain | plan`: parse flags, call the library (errors print as `error: ...`, exit 2)."""

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
  torchrun --nproc-per-node 2 -m train.cli pretrain --recipe tiny --out runs/ddp"""


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


def pretrain_main(args, given: set[str]) -> int:
    from train.pretrain import Settings, pretrain

    recipe = recipes.load(args.recipe) if args.recipe else {"data": {}, "model": {}, "train": {}}
    names = {f.name for f in dataclasses.fields(Settings)}
    bad = set(recipe["train"]) - names
    if bad:
        raise QtError(f"recipe {args.recipe}: unknown [train] key(s) {', '.join(sorted(bad))}")
    values = {**recipe["train"], **{k: getattr(args, k) for k in given}}
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


def plan_main(args) -> int:
    from qt_serve.config import ModelConfig
    from train.planner import format_plan, plan

    if bool(args.recipe) == bool(args.config):
        raise QtError("give a model: --recipe NAME or --config CHECKPOINT_DIR_OR_CONFIG_JSON (one of them)")
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
        path = Path(args.config)
        cfg = ModelConfig.load(path / "config.json" if path.is_dir() else path)
        seq, mb = args.seq_len or min(2048, cfg.max_position_embeddings), args.micro_batch or 1
    result = plan(cfg, seq, mb, args.memory_gb * 2**30, args.lora_rank)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def add_settings_flags(ap: argparse.ArgumentParser) -> None:
    """One --flag per `Settings` field, default None so we know which ones the user gave."""
    from train.pretrain import Settings

    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default) if f.default is not None else str
        if f.name == "tdp_watts":
            kind = float
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            ap.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default {f.default})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qt-train", description="Make token shards, plan memory, pretrain.",
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

    p = sub.add_parser("pretrain", help="train a model from scratch (a recipe, flags, or both)")
    p.add_argument("--recipe", default=None, help=f"name ({', '.join(recipes.names())}) or a .toml file")
    add_settings_flags(p)

    pl = sub.add_parser("plan", help="parameter count and memory per micro-batch; does it fit?")
    pl.add_argument("--recipe", default=None, help=f"name ({', '.join(recipes.names())}) or a .toml file")
    pl.add_argument("--config", default=None, help="a checkpoint directory or config.json instead of a recipe")
    pl.add_argument("--memory-gb", type=float, default=16.0, help="device memory in GiB (default 16)")
    pl.add_argument("--seq-len", type=positive, default=None)
    pl.add_argument("--micro-batch", type=positive, default=None)
    pl.add_argument("--lora-rank", type=positive, default=16)
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    args = ap.parse_args(argv)
    if args.command == "data":
        return run(lambda: data_main(args))
    if args.command == "plan":
        return run(lambda: plan_main(args))
    given = {k for k, v in vars(args).items() if v is not None and k not in ("command", "recipe")}
    return run(lambda: pretrain_main(args, given))


if __name__ == "__main__":
    sys.exit(main())
