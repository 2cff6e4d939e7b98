"""Sweeps and ablations over a pretraining recipe: one run directory per trial, one summary.

    qt-train sweep tiny --grid "lr=3e-4,1e-3;warmup=100,500" --seeds 2 --out runs/sweep
    qt-train ablate tiny --change output_bias=true --change tie_word_embeddings=false --seeds 2 --out runs/abl

A *trial* is the recipe with some keys changed (`[train]` settings or `[model]` fields, by name) and a
seed. A sweep is the grid's product; an ablation is the recipe itself plus each `--change` alone, every
one over the same seeds (so the data order and initialisation match across variants and the spread over
seeds shows what is noise). `--set key=value` changes every trial alike (e.g. a shorter `max_steps`).

    OUT/sweep.json          the recipe (name and digest), the trials; a rerun must name the same recipe
    OUT/<trial>/            the run directory (run.json, metrics.jsonl, report.json, ...), trial.json,
                            status.json (done | failed, with the error), log.txt (its output)
    OUT/summary.{md,json}   one row per trial sorted by best validation loss: final / best val loss,
                            zero-shot suite scores, tokens/s, wall time; an ablation adds per-variant
                            mean and seed spread, the change against the baseline and whether it exceeds
                            the noise, and the step where the curves meet
    OUT/loss.png            every trial's loss curves overlaid (an ablation: per-variant mean, seed band)

Every launcher runs the same entry point per trial, `python -m train.sweep trial OUT INDEX`:
`local` (default) runs them one after another here; `ray` as Ray tasks (`--ray-address`, else a local
Ray runtime); `slurm` writes `OUT/slurm.sbatch`, a job array of that command, and submits it with
`sbatch` when there is one (else prints the command). A rerun skips finished trials, resumes a killed
one from its last checkpoint and retries a failed one from scratch; a trial that fails is recorded with
its error and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qt_serve.config import ModelConfig
from qt_serve.errors import QtError, read_json
from train import progress, recipes

# Settings a trial may not change: where it runs and how it is resumed are the sweep's business.
FIXED = {"out", "resume", "data", "device", "log_every", "tdp_watts"}
LAUNCHERS = ("local", "ray", "slurm")


@dataclass
class Trial:
    name: str  # its directory under OUT, e.g. "lr=0.001,warmup=100,seed=0"
    variant: str  # what it tests, seeds aside ("lr=0.001,warmup=100"; "baseline" in an ablation)
    changes: dict  # {key: value} over the recipe, the sweep-wide --set included
    seed: int


def fields() -> dict[str, set[str]]:
    """The keys a trial may change, by recipe section."""
    from train.pretrain import Settings

    return {"train": {f.name for f in dataclasses.fields(Settings)} - FIXED - {"seed"},
            "model": {f.name for f in dataclasses.fields(ModelConfig)} - {"extra", "vocab_size", "model_type"}}


def section_of(key: str) -> str:
    known = fields()
    for section, names in known.items():
        if key in names:
            return section
    valid = sorted(known["train"] | known["model"])
    raise QtError(f"{key!r} is not a recipe field a trial can change; the fields are: {', '.join(valid)}")


def parse_value(text: str):
    """TOML-like scalars: true / false, integers, floats, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_pairs(text: str, sep: str = ",") -> dict:
    """"a=1,b=x" -> {"a": 1, "b": "x"}, every key checked against the recipe's fields."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(sep))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise QtError(f"{part!r} is not key=value")
        section_of(key.strip())
        out[key.strip()] = parse_value(value)
    return out


def parse_grid(text: str) -> dict[str, list]:
    """"lr=3e-4,1e-3;warmup=100,500" -> {"lr": [0.0003, 0.001], "warmup": [100, 500]}."""
    grid = {}
    for axis in filter(None, (a.strip() for a in text.split(";"))):
        key, eq, values = axis.partition("=")
        key = key.strip()
        if not eq or not key:
            raise QtError(f"grid axis {axis!r} is not key=v1,v2,...")
        section_of(key)
        if key in grid:
            raise QtError(f"grid key {key!r} appears twice")
        vals = [parse_value(v) for v in values.split(",") if v.strip()]
        if not vals:
            raise QtError(f"grid key {key!r} has no values")
        if len(set(map(str, vals))) < len(vals):
            raise QtError(f"grid key {key!r} repeats a value: {vals}")
        grid[key] = vals
    if not grid:
        raise QtError('an empty grid: give --grid "key=v1,v2;key2=..."')
    return grid


def name_of(changes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in changes.items()) or "baseline"


def grid_trials(grid: dict[str, list], seeds: list[int], fixed: dict) -> list[Trial]:
    out = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        for seed in seeds:
            out.append(Trial(f"{name_of(point)},seed={seed}", name_of(point), {**fixed, **point}, seed))
    return out


def ablation_trials(changes: list[dict], seeds: list[int], fixed: dict) -> list[Trial]:
    """The recipe itself, then each change alone, over the same seeds."""
    names = [name_of(c) for c in changes]
    if not all(changes) or len(set(names)) < len(names):
        raise QtError(f"each --change must be a different, non-empty KEY=VALUE[,KEY=VALUE]; got {names}")
    out = []
    for change in [{}, *changes]:
        for seed in seeds:
            out.append(Trial(f"{name_of(change)},seed={seed}", name_of(change), {**fixed, **change}, seed))
    return out


def digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


# ---- the sweep directory -------------------------------------------------------------------------


def prepare(out: Path, recipe_spec: str, kind: str, trials: list[Trial]) -> dict:
    """Write (or check and extend) OUT/sweep.json; refuse a directory made from another recipe."""
    recipe = recipes.load(recipe_spec)
    record = {"kind": kind, "recipe": recipe_spec, "recipe_digest": digest(recipe), "recipe_content": recipe,
              "trials": [dataclasses.asdict(t) for t in trials]}
    path = out / "sweep.json"
    if path.exists():
        old = read_json(path)
        if old.get("recipe_digest") != record["recipe_digest"] or old.get("kind") != kind:
            raise QtError(f"{out} holds a {old.get('kind', '?')} of recipe {old.get('recipe')!r} "
                          f"({old.get('recipe_digest')}), not this {kind} of {recipe_spec!r} ({record['recipe_digest']}); "
                          "choose another --out")
        known = {t["name"] for t in old["trials"]}
        record["trials"] = old["trials"] + [t for t in record["trials"] if t["name"] not in known]
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


def read_sweep(out: Path) -> dict:
    sweep = read_json(out / "sweep.json")
    if not isinstance(sweep, dict) or not isinstance(sweep.get("trials"), list):
        raise QtError(f"{out} is not a sweep directory (no valid sweep.json); start one with qt-train sweep / ablate")
    return sweep


def status(trial_dir: Path) -> str:
    """done | failed | partial (killed: resumable) | new."""
    s = read_json(trial_dir / "status.json", missing={}).get("state")
    if s == "done" and (trial_dir / "report.json").exists():
        return "done"
    if s == "failed":
        return "failed"
    return "partial" if (trial_dir / "checkpoints").is_dir() and any((trial_dir / "checkpoints").iterdir()) else "new"


def run_trial(out: Path, index: int) -> int:
    """`python -m train.sweep trial OUT INDEX`: train one trial into OUT/<name>, recording how it ended."""
    from train.cli import ensure_data
    from train.pretrain import Settings, pretrain

    sweep = read_sweep(out)
    if not 0 <= index < len(sweep["trials"]):
        raise QtError(f"{out} has trials 0..{len(sweep['trials']) - 1}, not {index}")
    t = Trial(**sweep["trials"][index])
    d = out / t.name
    state = status(d)
    if state == "done":
        return 0
    if state in ("failed", "new") and d.exists():
        shutil.rmtree(d)  # retried from scratch (a killed trial with checkpoints resumes instead)
    d.mkdir(parents=True, exist_ok=True)
    (d / "trial.json").write_text(json.dumps(dataclasses.asdict(t), indent=2) + "\n")
    recipe = json.loads(json.dumps(sweep["recipe_content"]))  # a copy
    for key, value in t.changes.items():
        recipe[section_of(key)][key] = value
    values = {**recipe["train"], "seed": t.seed, "out": str(d), "resume": state == "partial"}
    try:
        values["data"] = ensure_data(recipe["data"], 0)  # the same shards for every trial and seed
        pretrain(Settings(**values), recipe["model"], set(values))
    except KeyboardInterrupt:  # the run saved a checkpoint: a rerun resumes it
        raise
    except BaseException as e:  # recorded, so the sweep goes on and a rerun retries it
        (d / "status.json").write_text(json.dumps({"state": "failed", "error": f"{type(e).__name__}: {e}"}) + "\n")
        print(f"qt-train sweep: trial {t.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    (d / "status.json").write_text(json.dumps({"state": "done"}) + "\n")
    return 0


def trial_command(out: Path, index: int) -> list[str]:
    return [sys.executable, "-m", "train.sweep", "trial", str(out), str(index)]


def launch(out: Path, launcher: str, ray_address: str | None = None) -> None:
    """Run every unfinished trial with `launcher`; each trial's output goes to OUT/<name>/log.txt."""
    sweep = read_sweep(out)
    todo = [i for i, t in enumerate(sweep["trials"]) if status(out / t["name"]) != "done"]
    done = len(sweep["trials"]) - len(todo)
    print(f"qt-train sweep: {len(sweep['trials'])} trials, {done} done, {len(todo)} to run ({launcher})",
          file=sys.stderr)
    if launcher == "local":
        for n, i in enumerate(todo, 1):
            name = sweep["trials"][i]["name"]
            print(f"qt-train sweep: [{n}/{len(todo)}] {name}", file=sys.stderr, flush=True)
            run_logged(out, i)
            print(f"qt-train sweep: [{n}/{len(todo)}] {name}: {status(out / name)}", file=sys.stderr, flush=True)
    elif launcher == "ray":
        launch_ray(out, todo, ray_address)
    elif launcher == "slurm":
        launch_slurm(out, todo)
    else:
        raise QtError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")


def run_logged(out: Path, index: int) -> int:
    name = read_sweep(out)["trials"][index]["name"]
    (out / name).mkdir(parents=True, exist_ok=True)
    with open(out / name / "log.txt", "a") as log:
        return subprocess.run(trial_command(out, index), stdout=log, stderr=subprocess.STDOUT).returncode


def launch_ray(out: Path, todo: list[int], address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise QtError("--launcher ray needs Ray: pip install -e '.[sweep]'") from None
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPU env rewriting for CPU tasks
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    try:
        task = ray.remote(num_cpus=1)(run_logged)  # each trial is its own process, as with `local`
        ray.get([task.remote(out.resolve(), i) for i in todo])
    finally:
        ray.shutdown()


def slurm_script(out: Path, todo: list[int]) -> str:
    """A job array whose task k runs trial todo[k] (resources from $QT_SLURM_OPTS, e.g. "--gres=gpu:1")."""
    cmd = " ".join(shlex.quote(c) for c in trial_command(out.resolve(), 0)[:-1])
    extra = os.environ.get("QT_SLURM_OPTS", "")
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=qt-sweep-{out.name}",
        f"#SBATCH --array={','.join(map(str, todo))}",
        f"#SBATCH --output={out.resolve()}/slurm-%A_%a.out",
        *([f"#SBATCH {extra}"] if extra else []),
        f"cd {shlex.quote(os.getcwd())}",
        f'{cmd} "$SLURM_ARRAY_TASK_ID"',
        "",
    ])


def launch_slurm(out: Path, todo: list[int]) -> None:
    script = out / "slurm.sbatch"
    script.write_text(slurm_script(out, todo))
    if shutil.which("sbatch") is None:
        print(f"qt-train sweep: wrote {script}; no sbatch here: submit it on the cluster with `sbatch {script}`, "
              "then rerun this command to summarise", file=sys.stderr)
        return
    r = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    if r.returncode:
        raise QtError(f"sbatch {script} failed: {r.stderr.strip()}")
    print(f"qt-train sweep: {r.stdout.strip()}; rerun this command when the jobs end to summarise", file=sys.stderr)


# ---- the summary ---------------------------------------------------------------------------------


def trial_row(out: Path, t: dict, rows: list[dict]) -> dict:
    """A trial's line of the summary, from its metrics rows (empty when it never started)."""
    d = out / t["name"]
    row = {"trial": t["name"], "variant": t["variant"], "seed": t["seed"], "state": status(d)}
    if row["state"] == "failed":
        row["error"] = read_json(d / "status.json").get("error")
    val = [r for r in rows if "val_loss" in r]
    if val:
        row["final_val_loss"] = val[-1]["val_loss"]
        row["best_val_loss"] = min(r["val_loss"] for r in val)
        row["suite"] = {k[len("val_zs_"):]: v for k, v in val[-1].items() if k.startswith("val_zs_")}
    report = read_json(d / "report.json", missing={})
    if report:
        row.update(tokens_per_s=report.get("tokens_per_s"), wall_s=report.get("wall_s"), steps=report.get("step"))
    return row


def curve(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r and isinstance(r[key], (int, float))}


def smoothed(points: dict[int, float], k: int = 5) -> dict[int, float]:
    return dict(zip(points, progress.smooth(list(points.values()), k)))


def meeting_step(base: list[dict[int, float]], other: list[dict[int, float]]) -> int | None:
    """Where one variant's lead over the other ends: the first step from which the gap between their seed
    means stays within the seeds' spread (half-range, summed over both) or reverses. None: they never
    separated beyond noise, or have not met by the last common step."""
    steps = sorted(set.intersection(*(set(c) for c in base + other)))

    def mean_spread(curves, s):
        ys = [c[s] for c in curves]
        return sum(ys) / len(ys), (max(ys) - min(ys)) / 2

    gaps = []  # (step, base mean - other mean, noise)
    for s in steps:
        (mb, nb), (mo, no) = mean_spread(base, s), mean_spread(other, s)
        gaps.append((s, mb - mo, nb + no))
    start = next((i for i, (_, g, n) in enumerate(gaps) if abs(g) > n), None)
    if start is None:
        return None
    sign = 1 if gaps[start][1] > 0 else -1
    for i in range(start + 1, len(gaps)):
        if all(g * sign <= n for _, g, n in gaps[i:]):
            return gaps[i][0]
    return None


def ablation_table(rows: list[dict], by: dict[str, list[list[dict]]]) -> list[dict]:
    """Per variant: mean and spread over seeds of the best val loss, the change against the baseline,
    whether it exceeds the seeds' noise, and where the train-loss curves meet the baseline's."""
    out = []
    best = {}
    for r in rows:
        if "best_val_loss" in r:
            best.setdefault(r["variant"], []).append(r["best_val_loss"])
    base = best.get("baseline")
    for variant, vals in best.items():
        mean = sum(vals) / len(vals)
        spread = (max(vals) - min(vals)) / 2
        row = {"variant": variant, "seeds": len(vals), "best_val_loss_mean": mean, "seed_spread": spread}
        if base and variant != "baseline":
            bmean, bspread = sum(base) / len(base), (max(base) - min(base)) / 2
            row["delta_vs_baseline"] = mean - bmean
            row["beyond_noise"] = abs(mean - bmean) > spread + bspread
            train = [smoothed(curve(m, "loss")) for m in by.get(variant, [])]
            btrain = [smoothed(curve(m, "loss")) for m in by.get("baseline", [])]
            val = [curve(m, "val_loss") for m in by.get(variant, [])]
            bval = [curve(m, "val_loss") for m in by.get("baseline", [])]
            row["train_curves_meet_at"] = meeting_step(btrain, train) if train and btrain else None
            row["val_curves_meet_at"] = meeting_step(bval, val) if val and bval else None
        out.append(row)
    return out


def plot(out: Path, kind: str, by: dict[str, list[list[dict]]]) -> Path:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (variant, runs) in enumerate(sorted(by.items())):
        colour = f"C{i % 10}"
        for ax, key, smooth in ((ax_t, "loss", True), (ax_v, "val_loss", False)):
            curves = [smoothed(curve(m, key)) if smooth else curve(m, key) for m in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            ys = [[c[s] for c in curves] for s in steps]
            mean = [sum(y) / len(y) for y in ys]
            ax.plot(steps, mean, "-" if smooth else "o-", color=colour, label=f"{variant} ({len(runs)} seed(s))")
            if len(runs) > 1:  # the seeds' range: what is noise
                ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=colour, alpha=0.2)
    for ax, what in ((ax_t, "train loss (smoothed)"), (ax_v, "validation loss")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(f"{kind}: {what}, mean over seeds, band = seed range")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return out / "loss.png"


def fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def summarize(out: Path) -> dict:
    sweep = read_sweep(out)
    metrics, by = {}, {}  # trial -> its metrics rows; variant -> its started trials' rows
    for t in sweep["trials"]:
        path = out / t["name"] / "metrics.jsonl"
        metrics[t["name"]] = progress.read_metrics(path) if path.exists() else []
        if metrics[t["name"]]:
            by.setdefault(t["variant"], []).append(metrics[t["name"]])
    rows = [trial_row(out, t, metrics[t["name"]]) for t in sweep["trials"]]
    rows.sort(key=lambda r: (r.get("best_val_loss") is None, r.get("best_val_loss") or 0.0))
    summary = {"kind": sweep["kind"], "recipe": sweep["recipe"], "trials": rows}
    suite = sorted({k for r in rows for k in r.get("suite", {})})
    lines = [f"# {sweep['kind']} of recipe `{sweep['recipe']}` ({len(rows)} trials)", "",
             "| trial | state | best val loss | final val loss | " + " | ".join(suite) + (" | " if suite else "")
             + "tokens/s | wall s |",
             "|---|---|---|---|" + "---|" * len(suite) + "---|---|"]
    for r in rows:
        scores = [fmt(r.get("suite", {}).get(k), 3) for k in suite]
        state = r["state"] + (f": {r['error']}" if r.get("error") else "")
        lines.append(f"| {r['trial']} | {state} | {fmt(r.get('best_val_loss'))} | {fmt(r.get('final_val_loss'))} | "
                     + "".join(f"{s} | " for s in scores) + f"{fmt(r.get('tokens_per_s'), 0)} | {fmt(r.get('wall_s'), 0)} |")
    if sweep["kind"] == "ablation":
        table = ablation_table(rows, by)
        summary["variants"] = table
        lines += ["", "| variant | seeds | best val loss (mean ± seed spread) | vs baseline | beyond noise | "
                      "train curves meet at step | val curves meet at step |", "|---|---|---|---|---|---|---|"]
        for v in table:
            lines.append(f"| {v['variant']} | {v['seeds']} | {fmt(v['best_val_loss_mean'])} ± {fmt(v['seed_spread'])} "
                         f"| {fmt(v.get('delta_vs_baseline'))} | {fmt(v.get('beyond_noise'))} | "
                         f"{fmt(v.get('train_curves_meet_at', '–'))} | {fmt(v.get('val_curves_meet_at', '–'))} |")
        lines += ["", "Spread: half the range over seeds. Beyond noise: |mean − baseline mean| > the sum of both "
                      "spreads. Curves meet: the first step from which the seed means stay within the seed "
                      "spreads of each other (or cross); – : they have not met by the end."]
    if by:
        plot(out, sweep["kind"], by)
        lines += ["", "![loss curves](loss.png)"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def sweep(recipe: str, out: str | Path, kind: str, trials: list[Trial], launcher: str = "local",
          ray_address: str | None = None) -> dict:
    """Prepare OUT, run what is left with `launcher`, and summarise (not for slurm: its jobs run later)."""
    out = Path(out)
    if launcher not in LAUNCHERS:
        raise QtError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    prepare(out, recipe, kind, trials)
    launch(out, launcher, ray_address)
    return summarize(out) if launcher != "slurm" else {}


if __name__ == "__main__":  # the per-trial entry point every launcher runs
    if len(sys.argv) != 4 or sys.argv[1] != "trial":
        sys.exit("usage: python -m train.sweep trial OUT INDEX")
    try:
        sys.exit(run_trial(Path(sys.argv[2]), int(sys.argv[3])))
    except QtError as e:
        sys.exit(f"error: {e}")
