"""`qt-eval report`: the HTML report built from two fixture runs, their data directory's statistics
checked against an independent count, and the page opened in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections import Counter

import numpy as np
import pytest

from evals import report
from qt_serve.errors import QtError
from train.data import prepare

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings arrows outrageous fortune "
         "take arms against sea troubles and by opposing end them die sleep no more").split()
SAMPLE = "First Citizen: <script>alert('x')</script> & \"quoted\" <b>bold</b>"
DIFFERENT = ["model.hidden_size", "settings.lr", "settings.seed"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small data directory made by train.data's own writer: 40 documents of seeded words (a few KB)."""
    tmp = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))).capitalize() + "." for _ in range(40)]
    (tmp / "text.txt").write_text("\n\n".join(docs))
    return prepare([str(tmp / "text.txt")], tmp / "data", vocab_size=300, doc_sep="\n\n")


def make_run(path, data, lr=1e-3, seed=0, hidden=64, sample=SAMPLE, finished=True, task="pretrain"):
    path.mkdir(parents=True)
    settings = {"out": str(path), "resume": False, "seq_len": 32, "max_steps": 40, "lr": lr, "warmup": 5,
                "seed": seed, "eval_every": 20, "data": str(data), "output_bias": False}
    model = {"hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 4}
    (path / "run.json").write_text(json.dumps({"task": task, "settings": settings, "model": model,
                                               "data_id": "abc"}))
    rows = []
    for step in range(1, 41):
        rows.append({"step": step, "loss": 6 - step / 10 + 0.1 * math.sin(step), "lr": lr * min(1, step / 5),
                     "grad_norm": 1 / step, "tok_s": 1000.0, "mfu": 0.1, "tokens": step * 512})
        if step % 20 == 0:
            rows.append({"step": step, "val_loss": 5.5 - step / 20 + seed, "val_ppl": math.exp(5.5 - step / 20),
                         "val_zs_x": 0.25 + step / 400, "sample": sample if step == 40 else "an older sample"})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "lo')
    if finished:
        (path / "report.json").write_text(json.dumps({"stopped": "max_steps", "step": 40, "tokens": 20480,
                                                      "tokens_per_s": 1234.5, "wall_s": 75.0, "sample": sample,
                                                      "params": {"total": 12345}}))
    return path


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    a = make_run(tmp / "run-a", data_dir)
    b = make_run(tmp / "run-b", data_dir, lr=3e-4, seed=1, hidden=96, finished=False)
    out = report.build([a, b], tmp / "out" / "report.html", title="two fixture runs")
    return out, [a, b]


def test_one_self_contained_file(built):
    out, _ = built
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]
    page = out.read_text()
    assert 'src="http' not in page and "<link" not in page and "url(" not in page and "@import" not in page
    assert "<script" not in page  # no JS at all (the sample's tag is escaped, below)
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == page.count("<img") >= 5  # loss, lr, grad norm, suite scores, document lengths
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("Summary", "Config diff", "Loss", "Learning rate", "Gradient norm", "Suite scores",
                    "Samples", "Training data"):
        assert f"<h2>{heading}</h2>" in page
    assert page.index("<h2>Summary</h2>") < page.index("<h2>Config diff</h2>") < page.index("<h2>Loss</h2>")


def test_summary_and_scores(built):
    page = built[0].read_text()
    summary = page[page.index('<table class="summary">'):]
    summary = summary[:summary.index("</table>")]
    assert "max_steps" in summary and "unfinished (no report.json)" in summary  # run-b has no report.json
    assert "1m 15s" in summary and "1,234" in summary and "4.5 (40)" in summary  # run-a: best val at step 40
    scores = page[page.index('<table class="scores">'):]
    assert "<code>zs_x</code>" in scores[:scores.index("</table>")] and "0.35" in scores


def test_config_diff_lists_exactly_the_differing_keys(built):
    out, dirs = built
    assert report.config_diff([report.load_run(d) for d in dirs]) == DIFFERENT
    page = out.read_text()
    diff = page[page.index('<table class="diff">'):]
    diff = diff[:diff.index("</table>")]
    assert re.findall(r"<td><code>([^<]*)</code></td>", diff) == DIFFERENT
    assert "<details><summary>Full config" in page
    assert report.config_diff([report.load_run(dirs[0])] * 2) == []


def test_sample_is_escaped(built):
    page = built[0].read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<b>bold</b>" not in page and "an older sample" not in page  # the last sample of each run


def test_data_statistics_equal_an_independent_count(built, data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    ids = np.concatenate([np.fromfile(data_dir / f, dtype=meta["dtype"]) for f in meta["splits"]["train"]["files"]])
    sep = meta["separator_id"]
    for cap in (10**9, 500):
        got = report.data_stats(data_dir, max_tokens=cap)
        part = [int(i) for i in ids[:cap]]
        counts = Counter(part)
        n = len(part)
        entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
        assert got["tokens_read"] == n and got["tokens_total"] == len(ids)
        assert got["entropy_bits"] == pytest.approx(entropy, rel=1e-12)
        assert got["vocab_used"] == len(counts)
        assert [t["count"] for t in got["top"]] == sorted(counts.values(), reverse=True)[:20]
        assert {t["id"] for t in got["top"]} <= set(counts)
        assert all(t["share"] == pytest.approx(counts[t["id"]] / n) for t in got["top"])
        docs, cur = [], 0
        for t in part:  # complete documents: each ends at a separator
            if t == sep:
                docs.append(cur)
                cur = 0
            else:
                cur += 1
        assert got["doc_lengths"] == docs
    full = report.data_stats(data_dir)
    assert len(full["doc_lengths"]) == meta["splits"]["train"]["documents"]
    page = built[0].read_text()
    assert f"{full['entropy_bits']:.3f} bits/token" in page
    assert page.count(f"<code>{data_dir}</code>") == 1  # one section per distinct data directory


def test_not_a_run_dir_is_named(tmp_path, data_dir):
    with pytest.raises(QtError, match="nowhere"):
        report.build([tmp_path / "nowhere"], tmp_path / "r.html")
    half = tmp_path / "half"
    half.mkdir()
    (half / "run.json").write_text("{}")
    with pytest.raises(QtError, match=f"{half}.*metrics.jsonl"):
        report.build([make_run(tmp_path / "ok", data_dir), half], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_missing_and_non_shard_data_are_said(tmp_path):
    a = make_run(tmp_path / "a", tmp_path / "gone")
    b = make_run(tmp_path / "b", "xsum=1,squad=1", task="sft")
    page = report.build([a, b], tmp_path / "r.html").read_text()
    data = page[page.index("<h2>Training data</h2>"):]
    assert "is missing" in data and str(tmp_path / "gone") in data
    assert "is the sft task's data, not a token-shard directory" in data


def test_relative_data_dir_from_where_the_run_started(tmp_path, data_dir):
    run = make_run(tmp_path / "proj" / "runs" / "r", "data")
    (tmp_path / "proj" / "data").symlink_to(data_dir)
    meta = json.loads((run / "run.json").read_text())
    meta["settings"]["out"] = "runs/r"
    (run / "run.json").write_text(json.dumps(meta))
    assert report.load_run(run).data_dir() == tmp_path / "proj" / "data"


def test_cli(built, tmp_path, capsys):
    from evals import cli

    _, dirs = built
    out = tmp_path / "cli.html"
    assert cli.main(["report", *map(str, dirs), "--out", str(out), "--data-tokens", "100"]) == 0
    assert "first 100 of" in out.read_text() and str(out) in capsys.readouterr().out


def test_opens_in_chromium(built, tmp_path):
    """The page in a real headless Chromium: every heading, every image decoded. QT_REPORT_SCREENSHOT=PNG
    keeps the full-page screenshot."""
    if report.chromium() is None:
        if os.environ.get("QT_REQUIRE_BROWSER"):
            raise RuntimeError("no Chromium: apt-get install -y chromium (or set QT_CHROMIUM)")
        pytest.skip("no Chromium (apt-get install -y chromium, or set QT_CHROMIUM)")
    pytest.importorskip("playwright")
    shot = os.environ.get("QT_REPORT_SCREENSHOT") or tmp_path / "report.png"
    seen = report.browse(built[0], shot)
    assert seen["title"] == "two fixture runs"
    assert seen["headings"] == ["Summary", "Config diff", "Loss", "Learning rate", "Gradient norm", "Suite scores",
                                "Samples", "Training data"]
    assert len(seen["images"]) >= 5 and all(i["complete"] and i["width"] > 0 for i in seen["images"])
    assert seen["errors"] == []
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
