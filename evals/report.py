"""`qt-eval report RUN_DIR...`: one self-contained HTML file (plots inlined as PNG data URIs, no external
CSS, JS or fonts) about training runs made by `qt-train`:

    qt-eval report runs/tiny-a runs/tiny-b --out out/report.html --screenshot docs/report.png

In order: a summary table per run (task, status, steps, tokens, final and best validation loss,
tokens/s, wall time, suite scores); the settings and model keys that differ between the runs (and the
full config, folded); overlaid loss curves (train smoothed, validation as points), learning rate,
gradient norm, and suite scores over steps (any numeric `val_*` key of metrics.jsonl other than val_loss
and val_ppl, e.g. `val_zs_<task>`); the last sample of each run; and statistics of each distinct
pretraining data directory (settings.data): document lengths in tokens, the 20 commonest tokens and the
unigram entropy in bits, over the first `--data-tokens` tokens of its train split (separators included).

A run directory needs run.json and metrics.jsonl; report.json is read when the run has finished.
`--screenshot PNG` opens the written file in headless Chromium (Playwright) and saves the full page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from qt_serve.errors import QtError, read_json

DATA_TOKENS = 2_000_000  # tokens of a train split read for its statistics
TOP_TOKENS = 20
SCORE_SKIP = {"val_loss", "val_ppl"}  # numeric val_* keys that are not suite scores


@dataclass
class Run:
    name: str
    dir: Path
    meta: dict  # run.json
    rows: list[dict]  # metrics.jsonl
    report: dict | None  # report.json, once finished

    @property
    def settings(self) -> dict:
        return self.meta.get("settings") or {}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the rows with a finite number under `key`."""
        pts = [(r["step"], r[key]) for r in self.rows
               if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

    def last(self, key: str):
        values = self.series(key)[1]
        return values[-1] if values else None

    @property
    def scores(self) -> list[str]:
        keys = {k for r in self.rows for k, v in r.items() if k.startswith("val_") and k not in SCORE_SKIP
                and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return sorted(keys)

    def data_dir(self) -> Path | None:
        """settings.data as a directory: as written, else relative to where the run was started (the run
        directory less its `out` setting, when `out` was relative)."""
        data = self.settings.get("data")
        if not isinstance(data, str) or not data:
            return None
        path = Path(data).expanduser()
        if path.is_absolute() or path.exists():
            return path
        out = Path(str(self.settings.get("out", "")))
        here = self.dir.resolve()
        if out.parts and not out.is_absolute() and here.parts[-len(out.parts):] == out.parts:
            return Path(*here.parts[:-len(out.parts)]) / path
        return path


def load_run(path: str | Path) -> Run:
    from train.progress import read_metrics

    d = Path(path)
    missing = [f for f in ("run.json", "metrics.jsonl") if not (d / f).is_file()]
    if not d.is_dir() or missing:
        raise QtError(f"{path} is not a training run directory (no {' or '.join(missing or ['directory'])}); "
                      "give directories made by `qt-train pretrain`, `sft` or `dpo` (--out)")
    return Run(d.name, d, read_json(d / "run.json"), read_metrics(d / "metrics.jsonl"), read_json(d / "report.json"))


# ---- numbers and HTML ---------------------------------------------------------------


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"
    if v == "":
        return '""'
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def duration(seconds) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def colour(i: int) -> str:
    from matplotlib.colors import to_hex

    return to_hex(f"C{i % 10}")


def figure(width: float = 9.0, height: float = 4.0, ncols: int = 1, nrows: int = 1):
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)


def png(fig) -> str:
    """The figure as an <img src="data:image/png;base64,..."> (closed after)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape before)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def swatch(i: int) -> str:
    return f'<span class="swatch" style="background:{colour(i)}"></span>'


# ---- sections -----------------------------------------------------------------------


def summary(runs: list[Run]) -> str:
    scores = sorted({k for r in runs for k in r.scores})
    header = ["run", "task", "status", "steps", "tokens", "params", "final val loss", "best val loss (step)",
              "tokens/s", "wall time"]
    rows = []
    for i, r in enumerate(runs):
        rep = r.report or {}
        steps, vals = r.series("val_loss")
        best = (f"{fmt(min(vals))} ({fmt(steps[vals.index(min(vals))])})" if vals else "—")
        status = rep.get("stopped", "unfinished (no report.json)")
        tok_s = rep.get("tokens_per_s", r.last("tok_s"))
        params = (rep.get("params") or {}).get("total")
        rows.append([f'{swatch(i)}<b>{esc(r.name)}</b><div class="path">{esc(r.dir)}</div>',
                     esc(r.meta.get("task", "pretrain")), esc(status), fmt(rep.get("step", r.last("step"))),
                     fmt(rep.get("tokens", r.last("tokens"))), fmt(params), fmt(r.last("val_loss")), best,
                     fmt(tok_s, 3) if tok_s is None or tok_s < 1000 else f"{tok_s:,.0f}", duration(rep.get("wall_s"))])
    out = table(header, rows, "summary")
    if scores:  # one row per score: there may be many (a zero-shot suite)
        out += "<h3>Suite scores <small>last logged value</small></h3>" + table(
            ["score"] + [f"{swatch(i)}{esc(r.name)}" for i, r in enumerate(runs)],
            [[f"<code>{esc(k[4:])}</code>"] + [fmt(r.last(k)) for r in runs] for k in scores], "scores")
    return out


def flat_config(run: Run) -> dict[str, object]:
    out = {"task": run.meta.get("task", "pretrain"), "data_id": run.meta.get("data_id")}
    out.update({f"settings.{k}": v for k, v in run.settings.items()})
    out.update({f"model.{k}": v for k, v in (run.meta.get("model") or {}).items()})
    return out


def config_diff(runs: list[Run]) -> list[str]:
    """The config keys (task, data_id, settings.*, model.*) whose values differ between the runs;
    settings.out (the run's own directory) is left out."""
    configs = [flat_config(r) for r in runs]
    keys = sorted({k for c in configs for k in c} - {"settings.out"})
    return [k for k in keys if len({json.dumps([k in c, c.get(k)], sort_keys=True, default=str)
                                    for c in configs}) > 1]


def config_section(runs: list[Run]) -> str:
    configs = [flat_config(r) for r in runs]
    names = [f"{swatch(i)}{esc(r.name)}" for i, r in enumerate(runs)]
    diff = config_diff(runs)
    if len(runs) < 2:
        head = "<p>One run: nothing to compare.</p>"
    elif not diff:
        head = "<p>The runs' settings and models are the same (apart from their directories).</p>"
    else:
        head = table(["key"] + names, [[f"<code>{esc(k)}</code>"] + [esc(fmt(c.get(k))) if k in c else
                                                                      '<i>absent</i>' for c in configs]
                                       for k in diff], "diff")
    keys = sorted({k for c in configs for k in c})
    full = table(["key"] + names, [[f"<code>{esc(k)}</code>"] + [esc(fmt(c.get(k))) if k in c else "<i>absent</i>"
                                                               for c in configs] for k in keys], "full")
    return f'{head}<details><summary>Full config ({len(keys)} keys)</summary>{full}</details>'


def curve(runs: list[Run], key: str, ylabel: str, log: bool | None = None) -> str | None:
    fig, axes = figure()
    ax, drawn, values = axes[0][0], False, []
    for i, r in enumerate(runs):
        steps, v = r.series(key)
        if steps:
            ax.plot(steps, v, color=colour(i), label=r.name, lw=1.4)
            drawn, values = True, values + [x for x in v if x > 0]
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    if log is None:  # spiky series (gradient norms) read better on a log axis
        log = bool(values) and max(values) / min(values) > 50
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def loss_plot(runs: list[Run]) -> str | None:
    from train.progress import smooth

    fig, axes = figure(height=4.6)
    ax, drawn = axes[0][0], False
    for i, r in enumerate(runs):
        steps, loss = r.series("loss")
        if steps:
            ax.plot(steps, loss, color=colour(i), alpha=0.18, lw=0.8)
            ax.plot(steps, smooth(loss), color=colour(i), lw=1.6, label=f"{r.name} train (smoothed)")
            drawn = True
        vsteps, val = r.series("val_loss")
        if vsteps:
            ax.plot(vsteps, val, "o--", color=colour(i), ms=5, label=f"{r.name} val")
            drawn = True
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def scores_plot(runs: list[Run]) -> str | None:
    keys = sorted({k for r in runs for k in r.scores})
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = figure(9.0, 2.8 * nrows + 0.4, cols, nrows)
    for j, key in enumerate(keys):
        ax = axes[j // cols][j % cols]
        for i, r in enumerate(runs):
            steps, v = r.series(key)
            if steps:
                ax.plot(steps, v, "o-", color=colour(i), ms=4, label=r.name)
        ax.set_title(key[4:], fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for j in range(len(keys), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    return png(fig)


def samples_section(runs: list[Run]) -> str:
    parts = []
    for i, r in enumerate(runs):
        rows = [row for row in r.rows if isinstance(row.get("sample"), str) and row["sample"]]
        text = rows[-1]["sample"] if rows else (r.report or {}).get("sample")
        where = f"step {rows[-1]['step']}" if rows else "report.json" if text else ""
        body = f'<pre class="sample">{esc(text)}</pre>' if text else "<p><i>no sample logged yet</i></p>"
        parts.append(f"<h3>{swatch(i)}{esc(r.name)} <small>{esc(where)}</small></h3>{body}")
    return "".join(parts)


# ---- training data statistics -------------------------------------------------------


def data_stats(directory: str | Path, max_tokens: int = DATA_TOKENS, split: str = "train") -> dict:
    """Statistics of the first `max_tokens` tokens of a data directory's split (separators included):
    token counts, unigram entropy in bits, the commonest tokens, and the lengths in tokens of the
    documents that end (at a separator) within them."""
    import numpy as np

    from train.data import Shards

    shards = Shards(directory)
    part = shards.splits[split]
    n = min(part.n, max_tokens)
    ids = part.read(0, n) if n else np.zeros(0, dtype=np.int64)
    counts = np.bincount(ids, minlength=shards.vocab_size)
    p = counts[counts > 0] / max(n, 1)
    sep = shards.meta["separator_id"]
    ends = np.flatnonzero(ids == sep)
    lengths = np.diff(np.concatenate([[-1], ends])) - 1  # tokens per document, its separator excluded
    top = [int(t) for t in np.argsort(-counts, kind="stable")[:TOP_TOKENS] if counts[t] > 0]
    return {"dir": str(directory), "split": split, "tokens_read": int(n), "tokens_total": part.n,
            "vocab_size": shards.vocab_size, "vocab_used": int((counts > 0).sum()),
            "entropy_bits": float(-(p * np.log2(p)).sum()), "separator_id": sep,
            "doc_lengths": [int(x) for x in lengths],
            "top": [{"id": t, "text": token_text(shards.tokenizer, t), "count": int(counts[t]),
                     "share": float(counts[t] / n)} for t in top],
            "meta": shards.meta}


def token_text(tok, i: int) -> str:
    """A token as readable text: decoded, with its whitespace made visible; the raw vocabulary entry
    when it is part of a multi-byte character."""
    text = tok.decode([i])
    if "\ufffd" in text or not text:
        text = tok.tok.id_to_token(i) or f"<{i}>"
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def lengths_plot(lengths: list[int]) -> str:
    import numpy as np

    x = np.asarray(lengths)
    from matplotlib.ticker import MaxNLocator

    fig, axes = figure(6.6, 3.6)
    ax = axes[0][0]
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    lo, hi = max(1, int(x.min())), max(1, int(x.max()))
    if hi / lo > 100:  # long-tailed: log-spaced bins on a log axis
        ax.hist(np.maximum(x, 1), bins=np.geomspace(lo, hi + 1, 40), color="C0", alpha=0.85)
        ax.set_xscale("log")
    else:
        ax.hist(x, bins=min(40, max(5, len(np.unique(x)))), color="C0", alpha=0.85)
    ax.axvline(float(np.median(x)), color="C3", ls="--", lw=1.2, label=f"median {np.median(x):,.0f}")
    ax.set_xlabel("document length (tokens, separator excluded)")
    ax.set_ylabel("documents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def data_section(runs: list[Run], max_tokens: int) -> str:
    parts, seen = [], {}
    for r in runs:
        raw, path = r.settings.get("data"), r.data_dir()
        if path is None:
            parts.append(f"<p class=\"note\"><b>{esc(r.name)}</b>: no data directory in its settings.</p>")
        elif not path.is_dir():
            task = r.meta.get("task", "pretrain")
            what = (f"is missing (no such directory: <code>{esc(path)}</code>)" if task == "pretrain" else
                    f"is the {esc(task)} task's data, not a token-shard directory")
            parts.append(f'<p class="note"><b>{esc(r.name)}</b>: data <code>{esc(raw)}</code> {what}; '
                         "no statistics.</p>")
        else:
            seen.setdefault(path.resolve(), []).append(r.name)
    for path, names in seen.items():
        head = f"<h3><code>{esc(path)}</code></h3><p>used by {esc(', '.join(names))}</p>"
        try:
            s = data_stats(path, max_tokens)
        except (QtError, OSError, KeyError, ValueError) as e:
            parts.append(f'{head}<p class="note">could not read it: {esc(e)}</p>')
            continue
        meta = s["meta"]
        splits = ", ".join(f"{k} {fmt(v.get('tokens'))} tokens / {fmt(v.get('documents'))} docs"
                           for k, v in meta.get("splits", {}).items())
        lengths = s["doc_lengths"]
        facts = [("sources", ", ".join(map(str, meta.get("sources", [])))), ("tokenizer", meta.get("tokenizer")),
                 ("splits", splits),
                 ("analysed", f"first {s['tokens_read']:,} of {s['tokens_total']:,} {s['split']} tokens"),
                 ("unigram entropy", f"{s['entropy_bits']:.3f} bits/token"),
                 ("vocabulary used", f"{s['vocab_used']:,} of {s['vocab_size']:,} ids"),
                 ("documents (complete)", f"{len(lengths):,}" + (
                     f"; length mean {sum(lengths) / len(lengths):,.0f}, min {min(lengths):,}, max {max(lengths):,}"
                     if lengths else ""))]
        facts_html = table(["", ""], [[esc(k), esc(v)] for k, v in facts], "facts")
        hist = (img(lengths_plot(lengths), f"document lengths of {path}") if lengths else
                '<p class="note">no document ends within the tokens read.</p>')
        top = table(["#", "id", "token", "count", "share"],
                    [[str(j + 1), str(t["id"]), f"<code>{esc(t['text'])}</code>", f"{t['count']:,}",
                      f"{100 * t['share']:.2f}%"] for j, t in enumerate(s["top"])], "top")
        parts.append(f'{head}{facts_html}<div class="pair"><div><h4>Document lengths</h4>{hist}</div>'
                     f'<div><h4>Top {len(s["top"])} tokens</h4>{top}</div></div>')
    return "".join(parts) or "<p>No data directories.</p>"


# ---- the page -----------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: #1d2330; background: #f4f5f8; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; min-height: 100vh;
       box-shadow: 0 0 12px rgba(0,0,0,.06); }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 2px solid #e3e6ee; }
h3 { font-size: 16px; margin: 22px 0 8px; }
h4 { font-size: 14px; margin: 18px 0 6px; color: #444b5a; }
small, .path, .meta { color: #6a7283; font-weight: normal; }
.path { font-size: 12px; }
.scroll { overflow-x: auto; max-width: 100%; }
td { overflow-wrap: anywhere; }
table.summary td, table.summary th { white-space: nowrap; }
table.summary th { white-space: normal; }
td:first-child code { white-space: nowrap; }
table.scores td:nth-child(n+2) { text-align: right; font-variant-numeric: tabular-nums; }
.pair { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
.pair > div:first-child { flex: 1 1 560px; min-width: 0; }
nav { font-size: 14px; margin: 10px 0 0; }
nav a { color: #2f5db5; text-decoration: none; margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13.5px; }
th, td { border: 1px solid #dfe3ea; padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: #f0f2f7; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfd; }
table.summary { width: 100%; }
table.summary td:nth-child(n+4) { text-align: right; font-variant-numeric: tabular-nums; }
table.top td:nth-child(n+4), table.top td:first-child { text-align: right; font-variant-numeric: tabular-nums; }
table.facts thead { display: none; }
table.facts td:first-child { color: #555d6e; white-space: nowrap; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
img { max-width: 100%; height: auto; display: block; margin: 6px 0; }
pre.sample { white-space: pre-wrap; word-break: break-word; background: #f7f8fa; border: 1px solid #e3e6ee;
             border-radius: 6px; padding: 10px 12px; font: 12.5px/1.45 ui-monospace, Menlo, Consolas, monospace;
             max-height: 360px; overflow: auto; }
details { margin: 12px 0; }
summary { cursor: pointer; color: #2f5db5; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px;
          vertical-align: baseline; }
.note { color: #6a4b00; background: #fff8e6; border-left: 3px solid #e0b341; padding: 6px 10px; }
"""

SECTIONS = [("summary", "Summary"), ("config", "Config diff"), ("loss", "Loss"), ("lr", "Learning rate"),
            ("grad-norm", "Gradient norm"), ("scores", "Suite scores"), ("samples", "Samples"),
            ("data", "Training data")]


def render(runs: list[Run], title: str | None = None, data_tokens: int = DATA_TOKENS) -> str:
    title = title or "Training runs: " + ", ".join(r.name for r in runs)
    loss, lr, grad, scores = (loss_plot(runs), curve(runs, "lr", "learning rate", log=False),
                              curve(runs, "grad_norm", "gradient norm (before clipping)"), scores_plot(runs))
    body = {
        "summary": summary(runs),
        "config": config_section(runs),
        "loss": img(loss, "loss curves") if loss else "<p>No loss logged.</p>",
        "lr": img(lr, "learning rate") if lr else "<p>No learning rate logged.</p>",
        "grad-norm": img(grad, "gradient norm") if grad else "<p>No gradient norm logged.</p>",
        "scores": (img(scores, "suite scores") if scores else None),
        "samples": samples_section(runs),
        "data": data_section(runs, data_tokens),
    }
    shown = [(k, h) for k, h in SECTIONS if body[k] is not None]
    nav = "".join(f'<a href="#{k}">{esc(h)}</a>' for k, h in shown)
    sections = "".join(f'<section id="{k}"><h2>{esc(h)}</h2>{body[k]}</section>' for k, h in shown)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f'<h1>{esc(title)}</h1><p class="meta">{len(runs)} run(s), written {stamp} by qt-eval report</p>'
            f"<nav>{nav}</nav>{sections}</main></body></html>\n")


def build(run_dirs, out_path, title: str | None = None, data_tokens: int = DATA_TOKENS) -> Path:
    """Write the report of the runs in `run_dirs` to `out_path` (one HTML file); returns its path."""
    if not run_dirs:
        raise QtError("no run directories given")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs of the same name (in different parents): tell them apart by their parent too
        if names.count(r.name) > 1:
            r.name = f"{r.dir.resolve().parent.name}/{r.name}"
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(runs, title, data_tokens), encoding="utf-8")
    tmp.replace(out)
    return out


# ---- a real browser -----------------------------------------------------------------


def chromium() -> str | None:
    path = os.environ.get("QT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if os.path.exists(path) else None


def browse(html_path, screenshot=None, width: int = 1280) -> dict:
    """Open the report in headless Chromium (Playwright): its h2 headings, each image's naturalWidth and
    the page's console errors; a full-page PNG to `screenshot` if given."""
    exe = chromium()
    if exe is None:
        raise QtError("no Chromium found: apt-get install -y chromium (or set QT_CHROMIUM to its path)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise QtError("a screenshot needs Playwright: pip install playwright==1.65.2 (the dev extra)") from None
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(Path(html_path).resolve().as_uri(), wait_until="load")
            found = page.evaluate("""() => ({
                title: document.title,
                headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
                images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, complete: i.complete}))})""")
            if screenshot:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {**found, "errors": errors}


# ---- command line -------------------------------------------------------------------


def main(args) -> int:
    out = build(args.runs, args.out, args.title, args.data_tokens)
    print(f"wrote {out} ({out.stat().st_size / 1024:,.0f} KiB)")
    if args.screenshot:
        seen = browse(out, args.screenshot)
        broken = [i["alt"] for i in seen["images"] if not i["width"]]
        if broken or seen["errors"]:
            raise QtError(f"the page did not render cleanly in Chromium: images {broken}, errors {seen['errors']}")
        print(f"screenshot {args.screenshot} ({len(seen['images'])} images, headings: {', '.join(seen['headings'])})")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="one self-contained HTML file comparing training runs (curves, config diff, "
                                      "samples, data statistics)", description=__doc__.split("\n\n")[0])
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories made by qt-train (run.json, "
                   "metrics.jsonl)")
    r.add_argument("--out", default="report.html", help="the HTML file to write (default report.html)")
    r.add_argument("--title", default=None, help="the page's title (default: the runs' names)")
    r.add_argument("--data-tokens", type=int, default=DATA_TOKENS,
                   help=f"train tokens read per data directory for its statistics (default {DATA_TOKENS:,})")
    r.add_argument("--screenshot", metavar="PNG", default=None,
                   help="also open the report in headless Chromium (Playwright) and save the full page here")
    r.set_defaults(run=main)
