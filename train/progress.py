"""What a training run reports as it goes: metrics.jsonl, TensorBoard events, MFU, energy, loss plots.

MFU = achieved training FLOP/s (planner.flops_per_token x tokens/s) / the device's peak.
Peaks are dense datasheet numbers for GPUs; for a CPU we assume cores x clock x FLOPs
per cycle (32 fp32 FLOPs per cycle per core with AVX2 + FMA: two 8-wide FMA units;
64 with AVX-512), which the run prints. Energy is an upper-bound estimate, TDP x time,
with the carbon intensity of an average grid; both assumptions are printed and
can be overridden.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

GPU_PEAK = {  # dense TFLOP/s: (bf16 tensor cores, fp32 without TF32), and board power in W
    "H200": (989, 67, 700), "H100": (989, 67, 700), "A100": (312, 19.5, 400), "L40S": (362, 91.6, 350),
    "L4": (121, 30.3, 72), "A10": (125, 31.2, 150), "T4": (65, 8.1, 70), "4090": (165, 82.6, 450),
}
CPU_WATTS_PER_CORE = 10.0  # a server core at full load, including its share of uncore
GRID_KG_PER_KWH = 0.4  # roughly the world-average carbon intensity of electricity


def cpu_ghz() -> tuple[float, str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000, "cpu MHz in /proc/cpuinfo"
    except OSError:
        pass
    return 2.5, "assumed (clock not readable)"


def device_peak(device: torch.device, precision: str, world: int) -> tuple[float | None, float, str]:
    """(peak FLOP/s of all ranks or None when unknown, power in W of all ranks, the assumption in words)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32, watts) in GPU_PEAK.items():
            if key in name:
                peak = (bf16 if precision == "bf16" else fp32) * 1e12
                return (peak * world, watts * world,
                        f"{world} x {name}: {peak / 1e12:g} TFLOP/s {precision} dense peak, {watts} W board power")
        return None, 300.0 * world, f"{world} x {name}: peak unknown (MFU not reported), 300 W assumed"
    cores = torch.get_num_threads()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    per_cycle, isa = (64, "AVX-512") if "avx512f" in flags else (32, "AVX2+FMA") if "fma" in flags else (16, "SSE")
    ghz, source = cpu_ghz()
    peak = cores * ghz * 1e9 * per_cycle
    watts = CPU_WATTS_PER_CORE * cores
    return (peak * world, watts * world,
            (f"{world} x CPU: {cores} threads x {ghz:.2f} GHz ({source}) x {per_cycle} fp32 FLOP/cycle ({isa}) = "
             f"{peak / 1e9:.0f} GFLOP/s; {CPU_WATTS_PER_CORE:g} W per core"))


def peak_memory(device: torch.device) -> dict:
    """The most memory this process has held: the GPU's allocator peak on CUDA, else the resident set
    (ru_maxrss: weights, optimizer, activations, and the Python and library overhead)."""
    import resource

    out = {"host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["cuda_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def energy(watts: float, seconds: float) -> dict:
    kwh = watts * seconds / 3.6e6
    return {"watts_assumed": watts, "kwh": kwh, "kg_co2": kwh * GRID_KG_PER_KWH,
            "assumption": f"TDP x time at {watts:g} W, {GRID_KG_PER_KWH} kg CO2 per kWh (average grid)"}


class Metrics:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars under RUN/tb, written by rank 0."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # a resumed run: forget what was logged after the checkpoint
            keep = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, **values) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
            elif isinstance(v, str):
                self.tb.add_text(k, v, step)

    def close(self) -> None:
        self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a killed process is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def smooth(values: list[float], k: int | None = None) -> list[float]:
    """A trailing moving average over k points (default: about 2% of them)."""
    k = k or max(1, len(values) // 50)
    return [sum(values[max(0, j - k + 1):j + 1]) / len(values[max(0, j - k + 1):j + 1]) for j in range(len(values))]


def plot_losses(runs: dict[str, str | Path], png: str | Path, title: str = "loss") -> Path:
    """Train loss (smoothed) and validation loss against step, one colour per run, into one PNG."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, path) in enumerate(runs.items()):
        rows, colour = read_metrics(path), f"C{i}"
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            steps, loss = zip(*train)
            ax.plot(steps, smooth(list(loss)), color=colour, alpha=0.8, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o--", color=colour, label=f"{label} val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
