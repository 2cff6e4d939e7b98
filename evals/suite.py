"""`qt-eval run SUITE.toml` and `qt-eval compare`: one evaluation over several models or precisions, one table.

    qt-eval compare SmolLM2-135M-Instruct out/smol-int8 out/smol-int4 --tasks ppl squad --limit 50 --out out/cmp
    qt-eval run suites/smol.toml

A suite names its models, its tasks with their flags, and where results go, so the same evaluation can be run
again later:

    out = "out/suite-smol"
    models = ["SmolLM2-135M-Instruct", "out/compare-smol/int8"]     # or {name = "x", url = "http://…"}
    [[tasks]]
    task = "ppl"
    [[tasks]]
    task = "squad"
    args = {limit = 50}

Each (model, task) runs through the task's own `qt-eval` command (so its flags, checks and files are the
same as when run by hand) into OUT/MODEL/TASK; then every run's headline numbers go into one table
(OUT/compare.md, .json) and a chart of each metric across models (OUT/compare.png). A run that fails is
reported in the table and the others go on; `--resume` skips runs whose results are already there.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from qt_serve.errors import QtError

# task -> (its result file, {column: keys into that JSON}, how its command takes the model)
TASKS = {
    "ppl": ("ppl.json", {"perplexity": ("perplexity",), "bits/byte": ("bits_per_byte",)}, "positional"),
    "squad": ("squad.json", {"SQuAD EM": ("scores", "exact_match"), "SQuAD F1": ("scores", "f1")}, "positional"),
    "xsum": ("xsum.json", {"ROUGE-L": ("scores", "rougeL"), "BLEU": ("scores", "bleu")}, "positional"),
    "ifeval": ("results.json", {"IFEval prompt strict": ("metrics", "prompt_level_strict_acc"),
                                "IFEval inst. loose": ("metrics", "inst_level_loose_acc")}, "positional"),
    "glue": ("glue.json", {"GLUE": ("glue_score",)}, "--model"),
    "alpaca": ("RESULTS.json", {"win rate": ("scores", "win_rate"), "LC win rate": ("scores", "lc_win_rate")},
               "--model"),
}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_") or "model"


def parse_models(models: list) -> list[dict]:
    out = []
    for m in models:
        if isinstance(m, str):
            out.append({"name": slug(Path(m).name) if "/" in m else m, "spec": m})
        elif isinstance(m, dict) and ("spec" in m or "url" in m):
            out.append({"name": m.get("name") or slug(m.get("spec") or m["url"]), **m})
        else:
            raise QtError(f"suite model {m!r}: give a checkpoint (a string) or {{name, spec}} / {{name, url, model}}")
    names = [m["name"] for m in out]
    if len(set(names)) != len(names):
        raise QtError(f"suite models need distinct names, got {names}; give each a 'name'")
    return out


def argv_of(task: str, model: dict, args: dict, out: Path) -> list[str]:
    """The `qt-eval TASK ...` command line of one run."""
    if task not in TASKS:
        raise QtError(f"unknown task {task!r}; a suite runs: {', '.join(TASKS)}")
    flags = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            flags.append(flag)
        elif v is not False and v is not None:
            flags += [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    if "url" in model:
        where = ["--url", model["url"]] + (["--model-name", model["model"]] if model.get("model") else [])
    else:
        where = [model["spec"]] if TASKS[task][2] == "positional" else ["--model", model["spec"]]
    return [task, *where, *flags, "--out", str(out)]


def headline(task: str, run_dir: Path) -> dict:
    file, columns, _ = TASKS[task]
    data = json.loads((run_dir / file).read_text())
    row = {}
    for column, keys in columns.items():
        v = data
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        row[column] = v
    return row


def run_suite(suite: dict, resume: bool = False) -> dict:
    from evals.cli import main as qt_eval

    if not isinstance(suite.get("models", []), list):
        raise QtError("the suite's 'models' must be a list of checkpoints or {name, spec} / {name, url} tables")
    models = parse_models(suite.get("models") or [])
    tasks = suite.get("tasks") or []
    if not models or not tasks:
        raise QtError("a suite needs 'models' and at least one [[tasks]] entry")
    out = Path(suite.get("out", "out/suite"))
    table: dict[str, dict] = {m["name"]: {} for m in models}
    failures = []
    for t in tasks:
        if not isinstance(t, dict) or "task" not in t or not isinstance(t.get("args", {}), dict):
            raise QtError(f"suite task {t!r}: give {{task = NAME, args = {{...}}}} ([[tasks]] tables in the TOML)")
        task, args = t["task"], dict(t.get("args") or {})
        for m in models:
            run_dir = out / m["name"] / task
            done = (run_dir / TASKS.get(task, ("?",))[0]).exists()
            if not (resume and done):
                argv = argv_of(task, m, args, run_dir)
                print(f"== qt-eval {' '.join(argv)}", file=sys.stderr, flush=True)
                try:
                    code = qt_eval(argv)
                except SystemExit as e:  # a usage error of that task's flags
                    code = e.code
                except QtError as e:
                    code = str(e)
                if code:
                    failures.append({"model": m["name"], "task": task, "error": str(code)})
                    continue
            table[m["name"]].update(headline(task, run_dir))
    result = {"suite": suite, "table": table, "failures": failures}
    write(result, out)
    return result


def markdown(result: dict) -> str:
    columns = list(dict.fromkeys(c for row in result["table"].values() for c in row))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in result["table"].items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "–")) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [f"\nfailed: {f['model']} / {f['task']}: {f['error']}" for f in result["failures"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(c for row in result["table"].values() for c in row))
    if not columns:
        return
    names = list(result["table"])
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.2), squeeze=False)
    for ax, c in zip(axes[0], columns):
        values = [result["table"][n].get(c) for n in names]
        ax.bar(range(len(names)), [v if isinstance(v, (int, float)) else 0 for v in values], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(c, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path, stem: str = "compare", as_markdown=markdown, as_plot=plot) -> None:
    """OUT/STEM.json, .md (also printed) and .png of a result."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(as_markdown(result))
    as_plot(result, out / f"{stem}.png")
    print(as_markdown(result))
    print(f"wrote {out / stem}.md, {stem}.json, {stem}.png")


def run_main(args) -> int:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        suite = tomllib.loads(Path(args.suite).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise QtError(f"cannot read the suite {args.suite}: {e}") from None
    if args.out:
        suite["out"] = args.out
    return 1 if run_suite(suite, args.resume)["failures"] else 0


def compare_main(args) -> int:
    task_args = {"limit": args.limit} if args.limit is not None else {}
    suite = {"out": args.out, "models": args.models,
             "tasks": [{"task": t, "args": task_args if t in ("squad", "xsum", "ifeval", "alpaca") else {}}
                       for t in args.tasks]}
    return 1 if run_suite(suite, args.resume)["failures"] else 0


def add_parsers(sub) -> None:
    r = sub.add_parser("run", help="run a named suite (SUITE.toml: models, tasks, out) into one table")
    r.add_argument("suite", help="the suite file (see evals/suite.py)")
    r.add_argument("--out", help="instead of the suite's 'out'")
    r.add_argument("--resume", action="store_true", help="skip runs whose results are already there")
    r.set_defaults(run=run_main)
    c = sub.add_parser("compare", help="tasks on several models or precisions into one table and chart")
    c.add_argument("models", nargs="+", help="checkpoints, quantized checkpoints or known names")
    c.add_argument("--tasks", nargs="+", default=["ppl"], choices=[t for t in TASKS if t not in ("glue", "alpaca")],
                   help="default ppl (GLUE and AlpacaEval need more flags: use a suite)")
    c.add_argument("--limit", type=int, help="items per task where a task takes a limit")
    c.add_argument("--out", default="out/compare")
    c.add_argument("--resume", action="store_true")
    c.set_defaults(run=compare_main)
