"""`qt-eval` and `qt-bench`: measurements from the command line."""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    from evals import alpaca, arena, report, suite

    ap = argparse.ArgumentParser(prog="qt-eval", description="Evaluate models and read human-eval results.")
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("arena", help="the arena leaderboard (Bradley-Terry ratings, win rates) from its votes")
    a.add_argument("db", help="the arena's SQLite file (qt-serve --arena-db; default $QT_HOME/arena.sqlite)")
    a.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    a.add_argument("--json", default=None, help="also write the table as JSON here")
    a.add_argument("--plot", default=None, help="also plot the ratings with intervals to this PNG")
    a.set_defaults(run=arena.main)
    add_ppl(sub)
    add_genqa(sub)
    add_glue(sub)
    add_ifeval(sub)
    add_zeroshot(sub)
    alpaca.add_parser(sub)
    suite.add_parsers(sub)
    report.add_parser(sub)
    sub.add_parser("lm-eval", add_help=False, help="lm-eval's own command line with --model qt: any task on a qt "
                   "checkpoint, e.g. qt-eval lm-eval --model qt --model_args pretrained=DIR --tasks arc_easy")
    args, rest = ap.parse_known_args(argv)
    if args.command == "lm-eval":  # everything after it is lm-eval's
        from evals import lm_qt

        return lm_qt.cli(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.run(args)


def glue_main(args) -> int:
    from evals import glue  # torch and the model: loaded only when this subcommand runs

    return glue.main(args)


def add_glue(sub) -> None:
    from qt_serve.cli import add_model_flags, positive

    g = sub.add_parser("glue", help="GLUE dev scores: zero-/few-shot by log-likelihood, or fine-tuned",
                       description="CoLA, SST-2, MRPC, STS-B, QQP, MNLI-m/mm, QNLI, RTE, WNLI and AX from the "
                                   "glue_data/ tree; JSON, Markdown and a bar chart into --out.",
                       epilog="GLUE is on no package registry: get it from https://gluebenchmark.com/tasks or "
                              "with download_glue_data.py (github.com/nyu-mll/GLUE-baselines).")
    add_model_flags(g)
    g.add_argument("--data-dir", required=True, help="the glue_data/ directory download_glue_data.py writes")
    g.add_argument("--tasks", nargs="+", default=None, help="some of CoLA SST-2 MRPC STS-B QQP MNLI-m MNLI-mm "
                                                             "QNLI RTE WNLI AX (default: all)")
    g.add_argument("--shots", type=int, default=0, help="solved training rows before each prompt (K-shot)")
    g.add_argument("--seed", type=int, default=0, help="draws the shots; fine-tuning's rows, order and head")
    g.add_argument("--limit", type=positive, default=None, help="score only the first N dev rows of each task")
    g.add_argument("--batch", type=positive, default=8, help="sequences per forward when scoring")
    g.add_argument("--finetune", action="store_true",
                   help="train a classification head (regression for STS-B) and the model on each train split")
    g.add_argument("--epochs", type=positive, default=3)
    g.add_argument("--max-steps", type=positive, default=None, help="fine-tuning steps at most per task")
    g.add_argument("--max-train", type=int, default=1000,
                   help="training rows drawn (seeded) per task, to keep fine-tuning CPU-sized; 0: all")
    g.add_argument("--batch-size", type=positive, default=16, help="fine-tuning batch")
    g.add_argument("--lr", type=float, default=2e-5, help="fine-tuning peak learning rate (AdamW)")
    g.add_argument("--out", default="out/glue", help="directory for glue.json, glue.md and glue.png")
    g.set_defaults(run=glue_main)


def ifeval_main(args) -> int:
    from evals import ifeval  # lm-eval: loaded only when this subcommand runs

    return ifeval.main(args)


def add_ifeval(sub) -> None:
    from qt_serve.cli import positive

    i = sub.add_parser("ifeval", help="IFEval's 541 prompts through lm-eval's ifeval task, offline",
                       description="In-process on a checkpoint (--model qt) or over HTTP (--url), with the chat "
                                   "template; prompt- and instruction-level accuracy, strict and loose.")
    i.add_argument("checkpoint", nargs="?", help="run in-process: a checkpoint dir, .gguf file, quantized checkpoint "
                   "or known name")
    i.add_argument("--url", help="or ask an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    i.add_argument("--model-name", help="with --url: the model to ask (default: the first the server lists)")
    i.add_argument("--api-key", help="with --url: the server's key (default $QT_API_KEY, then $OPENAI_API_KEY)")
    i.add_argument("--tokenizer", help="with --url: a checkpoint whose tokenizer lm-eval may use (default none)")
    i.add_argument("--concurrency", type=positive, default=8, help="with --url: requests in flight")
    i.add_argument("--max-batch", type=positive, default=8, help="in-process: requests decoded together")
    i.add_argument("--max-length", type=positive, default=4096, help="in-process: the context to allocate")
    i.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="in-process: weight dtype")
    i.add_argument("--limit", type=positive, help="only the first N prompts (a quick run)")
    i.add_argument("--max-tokens", type=positive, help="new tokens per reply at most (default: the task's 1280)")
    i.add_argument("--out", help="write results.json, results.md, samples.jsonl and the reply cache here")
    i.add_argument("--resume", action="store_true", help="continue the run in --out from its cached replies")
    i.set_defaults(run=ifeval_main)


def add_target_flags(p) -> None:
    """What `evals.target` runs against: a checkpoint in-process, or a server's URL."""
    from qt_serve.cli import positive
    from qt_serve.hub import DEFAULT_MODEL

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"a checkpoint dir, .gguf file, quantized checkpoint or known name, run in-process; or a "
                        f"server's URL (default {DEFAULT_MODEL})")
    p.add_argument("--url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000 (instead of MODEL)")
    p.add_argument("--model-name", help="with a URL: the model to ask (default: the first the server lists)")
    p.add_argument("--api-key", help="with a URL: the server's key (default $QT_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=positive, default=8, help="with a URL: requests in flight")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="in-process: weight dtype")
    p.add_argument("--device", default="cpu", help="in-process: cpu, cuda, ...")
    p.add_argument("--out", help="output directory (default out/<command>-NAME)")


def lazy_main(module: str):
    """A subcommand's `main(args)` in evals.MODULE, imported (torch, the model) only when that subcommand runs."""
    def run(args) -> int:
        from importlib import import_module

        return import_module(f"evals.{module}").main(args)

    return run


def add_ppl(sub) -> None:
    from qt_serve.cli import positive

    p = sub.add_parser("ppl", help="cross-entropy, perplexity and bits per byte of a text, in strided windows",
                       description="Hugging Face's strided-window perplexity, in-process or over HTTP; bits per "
                                   "byte compare models with different tokenizers. JSON and Markdown into --out.")
    add_target_flags(p)
    p.add_argument("--data", default="passage", help="a .txt file (one document), a .jsonl file (a 'text' per "
                   "line) or 'passage' (benchmarks/data/passage.txt, the default)")
    p.add_argument("--window", type=positive, help="tokens per window (default: the model's context less one, "
                   "else 1024)")
    p.add_argument("--stride", type=positive, help="tokens between window starts (default: half the window)")
    p.set_defaults(run=lazy_main("ppl"))


def add_zeroshot(sub) -> None:
    z = sub.add_parser("zeroshot", help="the zero-shot validation suite: multiple-choice tasks by log-likelihood, "
                       "held-out perplexity", description="BIG-bench tasks and a next-line task on a held-out play, "
                       "scored by log-likelihood (no fine-tuning, no sampling), and the perplexity of a fixed "
                       "held-out text; the same numbers `qt-train pretrain --zeroshot N` logs at each validation. "
                       "JSON, Markdown and a bar chart with chance marked into --out.")
    z.add_argument("model", help="a checkpoint dir, HF Llama dir, .gguf file or known name (a torch model)")
    z.add_argument("--tasks", nargs="+", help="some of the suite's tasks (default: all; see evals/zeroshot.py)")
    z.add_argument("--limit", type=int, default=200, help="items per task, a fixed seeded subset (default 200; "
                   "0: all)")
    z.add_argument("--no-heldout", action="store_true", help="skip the held-out perplexity")
    z.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: the "
                   "checkpoint's)")
    z.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    z.add_argument("--out", help="output directory (default out/zeroshot-NAME)")
    z.set_defaults(run=lazy_main("zeroshot"))


def add_genqa(sub) -> None:
    from qt_serve.cli import positive

    for name, what in (("squad", "SQuAD v1.1 dev: exact match and F1 (the official normalization)"),
                       ("xsum", "XSum test: ROUGE-1/2/L (stemmed) and BLEU")):
        g = sub.add_parser(name, help=f"{what}, greedy replies through the chat template",
                           description=f"{what}. Data from the bigbench==1.0.0 sdist on PyPI (fetched once, "
                                       "358 MB) or --data FILE; JSON and Markdown into --out.")
        add_target_flags(g)
        g.add_argument("--data", help="a file of your own instead (see evals/genqa.py for the formats)")
        g.add_argument("--limit", type=int, default=200, help="items drawn with --seed (default 200; 0: all)")
        g.add_argument("--seed", type=int, default=0, help="draws the items (default 0)")
        g.add_argument("--max-tokens", type=positive, help="new tokens per reply (default squad 32, xsum 64)")
        g.add_argument("--max-batch", type=positive, default=4, help="in-process: requests decoded together")
        g.add_argument("--max-seq-len", type=positive, help="in-process: the context to allocate (default the "
                       "model's)")
        g.set_defaults(run=lazy_main("genqa"))


def eval_main(argv=None) -> int:
    from qt_serve.cli import run

    return run(lambda: main(argv))


def bench_main(argv=None) -> int:
    import torch

    from evals import bench, latency
    from qt_serve.cli import positive, run
    from qt_serve.hub import DEFAULT_MODEL

    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="qt-bench", description="Measure qt's decoding and any OpenAI-compatible server.")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="batch-1 decode tokens/s and TTFT, qt vs HF generate", description=bench.__doc__,
                       formatter_class=raw)
    d.add_argument("--models", nargs="+", default=["45M", "125M", "SmolLM2-135M-Instruct"],
                   help=f"random configs ({', '.join(bench.CONFIGS)}), checkpoint dirs, .gguf files or known names")
    d.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--runs", type=int, default=3)
    d.add_argument("--threads", type=int, default=torch.get_num_threads())
    d.add_argument("--out", default=None, help="write the results as JSON here")
    d.set_defaults(run=bench.decode)
    s = sub.add_parser("serve", help="HTTP server tokens/s and TTFT under concurrent clients, vs HF generate",
                       description=bench.__doc__, formatter_class=raw)
    s.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"random config ({', '.join(bench.CONFIGS)}), checkpoint dir, .gguf file or known name")
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients, one level each")
    s.add_argument("--requests", type=int, default=32, help="requests per level, at least 2x each concurrency")
    s.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    s.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    s.add_argument("--max-batch", type=int, default=16, help="the engine's KV slots (requests decoded together)")
    s.add_argument("--out", default=None, help="write the results as JSON here, and a plot next to it (.png)")
    s.set_defaults(run=bench.serve)

    lat = sub.add_parser("latency", help="TTFT, TPOT, ITL, latency and goodput of any OpenAI-compatible server",
                         description=latency.__doc__, formatter_class=raw)
    where = lat.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server's base URL, e.g. http://127.0.0.1:8000")
    where.add_argument("--serve", metavar="SPEC", help="start qt-serve on this checkpoint dir, .gguf or known name")
    lat.add_argument("--model", default=None, help="the model name to request (default: the server's only model)")
    lat.add_argument("--api-key", default=None, help="the server's key (default $QT_API_KEY, then $OPENAI_API_KEY)")
    lat.add_argument("--max-batch", type=positive, default=16, help="with --serve: qt-serve's KV slots")
    load = lat.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=positive, default=1, help="clients in a closed loop (the default, 1)")
    load.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second (inf: all at once)")
    load.add_argument("--sweep-concurrency", type=latency.parse_list(int), metavar="N,N,...",
                      help="a level per concurrency")
    load.add_argument("--sweep-rate", type=latency.parse_list(float), metavar="R,R,...", help="a level per rate")
    inp = lat.add_mutually_exclusive_group()
    inp.add_argument("--input-len", type=positive, default=128, help="random prompt tokens")
    inp.add_argument("--input-len-range", type=latency.parse_span, metavar="LO:HI", help="uniform, inclusive")
    inp.add_argument("--prompts", metavar="FILE", help="a prompt set sent as chat: JSON / JSONL of instructions, "
                                                       "or alpaca-eval (AlpacaEval's 805, fetched once)")
    out = lat.add_mutually_exclusive_group()
    out.add_argument("--output-len", type=positive, default=128, help="tokens generated per request")
    out.add_argument("--output-len-range", type=latency.parse_span, metavar="LO:HI", help="uniform, inclusive")
    lat.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                     help="make every request generate its output length (vLLM's ignore_eos)")
    lat.add_argument("--num-prompts", type=positive, default=100, help="requests per level")
    lat.add_argument("--seed", type=int, default=0, help="draws prompts, lengths and arrivals")
    lat.add_argument("--slo", type=latency.parse_slo, default=None, metavar="ttft=500ms,tpot=100ms",
                     help="bounds for goodput, of ttft, tpot, e2el (ms, s; a bare number is ms)")
    lat.add_argument("--out", default=None, help="directory for latency.json, latency.md and latency.png")
    lat.set_defaults(run=latency.main)

    c = sub.add_parser("compare", help="qt-bench latency results side by side, as one Markdown table")
    c.add_argument("files", nargs="+", help="latency.json files")
    c.add_argument("--plot", default=None, help="also plot them together to this PNG")
    c.set_defaults(run=lambda args: print(latency.compare(args.files, args.plot)))
    args = ap.parse_args(argv)
    if args.command == "serve" and args.requests < 2 * max(args.concurrency):
        # fewer and the top level is one wave of simultaneous arrivals, not a steady load
        s.error(f"--requests must be at least 2 x the largest --concurrency ({2 * max(args.concurrency)})")
    if args.command == "latency" and args.request_rate is not None and not args.request_rate > 0:
        lat.error(f"--request-rate must be positive, got {args.request_rate}")

    def go() -> int:
        args.run(args)
        return 0

    return run(go)
