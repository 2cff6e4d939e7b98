"""`qt-eval compare` / `qt-eval run`: every (model, task) through its own command, one table of their numbers."""

import json

import pytest

from evals.cli import main as qt_eval
from evals.suite import argv_of, parse_models
from qt_serve.errors import QtError


def test_compare_two_checkpoints_on_ppl(tiny_ckpt, tmp_path):
    from qt_serve.checkpoint import load, save_checkpoint

    ck = load(tiny_ckpt)
    other = save_checkpoint(tmp_path / "half", ck.model.half(), ck.tokenizer)  # a second precision
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. The capital of France is Paris. " * 3)
    suite = tmp_path / "suite.toml"
    suite.write_text(f'out = "{tmp_path / "out"}"\nmodels = ["{tiny_ckpt}", {{name = "fp16", spec = "{other}"}}]\n'
                     f'[[tasks]]\ntask = "ppl"\nargs = {{data = "{text}", window = 32, stride = 16}}\n'
                     f'[[tasks]]\ntask = "squad"\nargs = {{data = "{tmp_path / "missing.json"}", limit = 2}}\n')
    assert qt_eval(["run", str(suite)]) == 1  # the squad runs fail (no such file); the ppl runs still count
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    for name in ("tiny", "fp16"):
        own = json.loads((tmp_path / "out" / name / "ppl" / "ppl.json").read_text())
        assert result["table"][name]["perplexity"] == own["perplexity"] > 1  # the task's own figure, carried over
    assert [(f["model"], f["task"]) for f in result["failures"]] == [("tiny", "squad"), ("fp16", "squad")]
    assert "| tiny |" in (tmp_path / "out" / "compare.md").read_text() and (tmp_path / "out" / "compare.png").exists()


def test_suite_models_and_command_lines(tmp_path):
    models = parse_models(["out/smol-int8", {"name": "remote", "url": "http://h:8000", "model": "m"}])
    assert [m["name"] for m in models] == ["smol-int8", "remote"]
    assert argv_of("ppl", models[0], {"window": 64, "data": "x.txt"}, tmp_path) == [
        "ppl", "out/smol-int8", "--window", "64", "--data", "x.txt", "--out", str(tmp_path)]
    assert argv_of("glue", models[0], {"shots": 2}, tmp_path)[:3] == ["glue", "--model", "out/smol-int8"]
    assert argv_of("ifeval", models[1], {"resume": True}, tmp_path)[:6] == [
        "ifeval", "--url", "http://h:8000", "--model-name", "m", "--resume"]
    with pytest.raises(QtError, match="distinct names"):
        parse_models(["a/x", "b/x"])
    with pytest.raises(QtError, match="unknown task 'mmlu'"):
        argv_of("mmlu", models[0], {}, tmp_path)
