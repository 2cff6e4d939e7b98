"""train/sweep.py: the grid parser, trials, a real local sweep (skip finished, a failed trial recorded), the
ablation's noise and meeting step, the refusal of another recipe's directory, the Slurm and Ray launchers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CORPUS

from qt_serve.errors import QtError
from train import sweep
from train.cli import main

MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True)
TRAIN = dict(seq_len=32, micro_batch=8, warmup=2, lr=3e-3, max_steps=6, eval_every=3, eval_tokens=512,
             save_every=3, log_every=1, sample_tokens=4)


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """A recipe whose [data] is a folder of fixture text (shards made once under $QT_HOME, shared by trials)."""
    monkeypatch.setenv("QT_HOME", str(tmp_path / "home"))
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(12):
        (src / f"d{i}.txt").write_text("\n".join(CORPUS[(i + j) % 4] for j in range(10)))
    toml = (f"[data]\nsources = [{json.dumps(str(src))}]\nvocab_size = 400\nseed = 0\n[model]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in MODEL.items())
            + "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in TRAIN.items()))
    path = tmp_path / "r.toml"
    path.write_text(toml)
    return str(path)


def test_grid_parser():
    assert sweep.parse_grid("lr=3e-4,1e-3; warmup=100,500") == {"lr": [3e-4, 1e-3], "warmup": [100, 500]}
    assert sweep.parse_grid("output_bias=true,false;rope_theta=1e4") == {"output_bias": [True, False],
                                                                         "rope_theta": [10000.0]}
    assert sweep.parse_pairs("num_hidden_layers=4,hidden_size=48") == {"num_hidden_layers": 4, "hidden_size": 48}
    with pytest.raises(QtError, match=r"'lrr' is not a recipe field.*the fields are: .*\blr\b.*warmup"):
        sweep.parse_grid("lrr=1e-3")
    for bad, message in (("lr", "not key=v1"), ("lr=", "no values"), ("lr=1;lr=2", "appears twice"),
                         ("", "empty grid"), ("out=/x", "not a recipe field"), ("lr=1e-3,0.001", "repeats a value")):
        with pytest.raises(QtError, match=message):
            sweep.parse_grid(bad)


def test_trials_of_a_grid_and_of_an_ablation():
    grid = sweep.grid_trials({"lr": [1, 2], "warmup": [3, 4]}, [0, 1], {"max_steps": 9})
    assert len(grid) == 8 and len({t.name for t in grid}) == 8
    assert grid[0].name == "lr=1,warmup=3,seed=0" and grid[0].changes == {"max_steps": 9, "lr": 1, "warmup": 3}
    abl = sweep.ablation_trials([{"output_bias": True}, {"rope_theta": 5e5}], [0, 1], {})
    assert [(t.variant, t.seed) for t in abl] == [("baseline", 0), ("baseline", 1), ("output_bias=True", 0),
                                                  ("output_bias=True", 1), ("rope_theta=500000.0", 0),
                                                  ("rope_theta=500000.0", 1)]
    with pytest.raises(QtError, match="different, non-empty"):
        sweep.ablation_trials([{"lr": 1}, {"lr": 1}], [0], {})


def test_a_directory_that_is_no_sweep_says_so(tmp_path):
    with pytest.raises(QtError, match="not a sweep directory"):
        sweep.run_trial(tmp_path, 0)


def test_a_local_sweep_records_a_failure_goes_on_and_skips_what_is_done(tmp_path, recipe, capsys):
    out = tmp_path / "sw"
    # num_attention_heads=3 does not divide hidden_size 64: that trial fails inside its run
    code = main(["sweep", recipe, "--grid", "lr=3e-3,1e-2;num_attention_heads=4,3", "--out", str(out)])
    assert code == 1  # not every trial is done
    summary = json.loads((out / "summary.json").read_text())
    states = {r["trial"]: r["state"] for r in summary["trials"]}
    assert states == {"lr=0.003,num_attention_heads=4,seed=0": "done", "lr=0.01,num_attention_heads=4,seed=0": "done",
                      "lr=0.003,num_attention_heads=3,seed=0": "failed", "lr=0.01,num_attention_heads=3,seed=0": "failed"}
    failed = next(r for r in summary["trials"] if r["state"] == "failed")
    assert "num_attention_heads 3" in failed["error"]
    done = [r for r in summary["trials"] if r["state"] == "done"]
    assert [r["trial"] for r in summary["trials"]][:2] == [r["trial"] for r in sorted(done, key=lambda r: r["best_val_loss"])]
    for r in done:
        run = out / r["trial"]
        assert r["best_val_loss"] == min(json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text()
                                         .splitlines() if "val_loss" in x)
        assert json.loads((run / "run.json").read_text())["settings"]["lr"] == float(r["trial"][3:r["trial"].index(",")])
    assert (out / "loss.png").stat().st_size > 0 and "| failed: " in (out / "summary.md").read_text()

    stamps = {r["trial"]: (out / r["trial"] / "metrics.jsonl").stat().st_mtime_ns for r in done}
    capsys.readouterr()
    main(["sweep", recipe, "--grid", "lr=3e-3,1e-2;num_attention_heads=4,3", "--out", str(out)])
    assert "4 trials, 2 done, 2 to run" in capsys.readouterr().err  # the failed ones are retried
    assert stamps == {t: (out / t / "metrics.jsonl").stat().st_mtime_ns for t in stamps}  # the done ones untouched


def test_a_killed_trial_resumes_and_a_new_recipe_is_refused(tmp_path, recipe):
    out = tmp_path / "sw"
    trials = sweep.grid_trials({"lr": [3e-3]}, [0], {})
    sweep.sweep(recipe, out, "sweep", trials)
    run = out / trials[0].name
    (run / "status.json").unlink()  # as if killed after its last checkpoint
    assert sweep.status(run) == "partial"
    assert sweep.run_trial(out, 0) == 0 and sweep.status(run) == "done"
    other = Path(recipe).with_name("other.toml")
    other.write_text(Path(recipe).read_text().replace("lr = 0.003", "lr = 0.002"))
    with pytest.raises(QtError, match="holds a sweep of recipe .*r.toml.*choose another --out"):
        sweep.sweep(str(other), out, "sweep", trials)


def test_meeting_step_and_noise():
    def run(values):
        return dict(zip(range(0, 10 * len(values), 10), values))

    base = [run([9, 8, 7, 6, 5, 4]), run([9.2, 8.2, 7.2, 6.2, 5.1, 4.1])]
    ahead = [run([7, 6, 5.5, 5.9, 5.0, 4.0]), run([7.1, 6.1, 5.6, 6.0, 5.05, 4.05])]
    assert sweep.meeting_step(base, ahead) == 30  # within the seeds' spread from step 30 on
    assert sweep.meeting_step(base, [run([5, 4, 3, 2, 1, 0])] * 2) is None  # still ahead at the end
    assert sweep.meeting_step(base, base) is None  # never apart


def test_ablation_summary_shows_seed_noise(tmp_path, recipe):
    out = tmp_path / "abl"
    summary = sweep.sweep(recipe, out, "ablation",
                          sweep.ablation_trials([{"output_bias": True}], [0, 1], {"max_steps": 6}))
    rows = {v["variant"]: v for v in summary["variants"]}
    assert set(rows) == {"baseline", "output_bias=True"} and rows["baseline"]["seeds"] == 2
    best = {r["trial"]: r["best_val_loss"] for r in summary["trials"]}
    b = [best["baseline,seed=0"], best["baseline,seed=1"]]
    o = [best["output_bias=True,seed=0"], best["output_bias=True,seed=1"]]
    assert rows["output_bias=True"]["delta_vs_baseline"] == pytest.approx(sum(o) / 2 - sum(b) / 2)
    assert rows["baseline"]["seed_spread"] == pytest.approx(abs(b[0] - b[1]) / 2)
    assert rows["output_bias=True"]["beyond_noise"] == (abs(sum(o) / 2 - sum(b) / 2) >
                                                        abs(o[0] - o[1]) / 2 + abs(b[0] - b[1]) / 2)
    assert "beyond noise" in (out / "summary.md").read_text()


def test_slurm_writes_a_job_array_of_the_trial_command(tmp_path, recipe, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no sbatch on this machine
    monkeypatch.setenv("QT_SLURM_OPTS", "--gres=gpu:1")
    out = tmp_path / "sw"
    assert main(["sweep", recipe, "--grid", "lr=1e-3,2e-3", "--launcher", "slurm", "--out", str(out)]) == 0
    script = (out / "slurm.sbatch").read_text()
    assert "#SBATCH --array=0,1" in script and "#SBATCH --gres=gpu:1" in script
    assert f'-m train.sweep trial {out.resolve()} "$SLURM_ARRAY_TASK_ID"' in script
    assert not (out / "summary.json").exists()  # the jobs run later; a rerun summarises


def test_ray_launcher_on_a_local_runtime(tmp_path, recipe):
    pytest.importorskip("ray")
    out = tmp_path / "sw"
    summary = sweep.sweep(recipe, out, "sweep", sweep.grid_trials({"lr": [3e-3, 1e-2]}, [0], {}), launcher="ray")
    assert [r["state"] for r in summary["trials"]] == ["done", "done"]
