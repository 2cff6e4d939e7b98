"""Inference-time module swaps that make CPU decode faster without touching model.py.

Decode is a chain of matrix products over few rows, so its speed is the bandwidth at which
each product streams its weight. Which torch kernel streams fastest depends on the CPU
(AVX2 vs AVX-512, Intel vs AMD, MKL's code paths), so the kernel is chosen per machine:
measured once (~2 s at 125M: whole-model one-token forwards with each candidate in place,
interleaved, best run) and cached in `$QT_HOME/fast_gemv.json` (default ~/.cache/qt) under a
key of CPU, AVX flags, torch, ISA env vars, threads, dtype and weight shapes; or forced.

One-row products (batch-1 decode), `QT_GEMV` or `optimize_for_decode(gemv=...)`:

- `linear`: `F.linear(x, W)`: torch's one-row product runs on ONE thread whatever
  `torch.set_num_threads` says (LOG.md, 2026-11-23);
- `transposed`: `x @ W_t` with W.T stored (in, out) contiguous (a copy of the weight);
- `split`: `bmm` over P = threads column slices of W.T stored (P, in, out/P) (a copy);
  fastest on the AVX2 machine of LOG.md 2026-11-23;
- `rows`: `bmm` over P row slices of W itself, viewed (P, out/P, in): no copy; fastest on
  the AVX-512 (AMD EPYC) machine of 2026-12-01 (~90 vs ~33 tok/s for `linear` at 125M);
- `mkldnn`: oneDNN's inner product on a prepacked weight (a copy);
- `auto` (default): the fastest of these, measured on this model's weights.

Products over several rows (prefill, batched decode), `QT_GEMM` or `gemm=...`: `linear`
(MKL's sgemm through F.linear), `mkldnn` (oneDNN on a prepacked weight; much faster than
MKL for 4-128 rows on AMD CPUs), `auto` (measured, as above).

All of these compute the same fp32 product (no reduced precision); only the summation
order differs (~1e-6 relative). The swaps keep each layer's `weight` Parameter (tied weights
stay tied; the state dict is unchanged) and hold any other layout as a plain attribute, so
apply them after loading the weights and do not train the swapped model.

`release_openmp_threads()` is the other half of fast decode in a server: see its docstring.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

GEMV_PATHS = ("linear", "transposed", "split", "rows", "mkldnn")  # one-row products
GEMM_PATHS = ("linear", "mkldnn")  # products over several rows
CACHE_FILE = "fast_gemv.json"


def mkldnn_ok(dtype: torch.dtype = torch.float32) -> bool:
    return (dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _packed(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The weight reordered into oneDNN's blocked layout for an inner product over `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


class DecodeLinear(nn.Module):
    """y = x @ W.T (+ b), one row by the `gemv` path, several rows by the `gemm` path."""

    def __init__(self, linear: nn.Linear, gemv: str, gemm: str, parts: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared with the model: state dict unchanged
        w = linear.weight.detach()
        if gemv in ("split", "rows") and (parts < 2 or self.out_features % parts):
            gemv = "transposed" if gemv == "split" else "linear"
        if not mkldnn_ok(w.dtype) or w.device.type != "cpu":
            gemv, gemm = ("linear" if gemv == "mkldnn" else gemv), "linear"
        self.gemv, self.gemm, self.parts = gemv, gemm, parts
        # Extra layouts are plain attributes, not buffers: the state dict stays the model's own.
        if gemv == "transposed":
            self.w_one = w.t().contiguous()  # (K, N)
        elif gemv == "split":
            self.w_one = w.t().reshape(self.in_features, parts, -1).transpose(0, 1).contiguous()  # (P, K, N/P)
        elif gemv == "rows":
            self.w_one = w.view(parts, self.out_features // parts, self.in_features)  # (P, N/P, K), a view
        elif gemv == "mkldnn":
            self.w_one = _packed(w, 1)
        self.w_many = _packed(w, 16) if gemm == "mkldnn" else None

    def __deepcopy__(self, memo):
        """A copy rebuilt from copied weights (a packed oneDNN weight cannot be copied as a tensor);
        `memo` keeps a tied weight tied to the copied embedding."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = copy.deepcopy(self.weight, memo)
        lin.bias = copy.deepcopy(self.bias, memo)
        return DecodeLinear(lin, self.gemv, self.gemm, self.parts)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, gemv={self.gemv}, gemm={self.gemm}, parts={self.parts}"

    def forward(self, x):
        lead, K = x.shape[:-1], self.in_features
        rows = x.reshape(-1, K)
        if rows.shape[0] != 1:
            if self.gemm == "mkldnn":
                # oneDNN builds and caches a kernel per row count: rounding the rows up to a multiple
                # of 16 bounds how many there are (RSS grew for as long as a server ran, LOG.md).
                m = rows.shape[0]
                rows = F.pad(rows, (0, 0, 0, -m % 16))
                y = torch.ops.mkldnn._linear_pointwise(rows, self.w_many, self.bias, "none", [], "")
                return y[:m].view(lead + (self.out_features,))
            return F.linear(x, self.weight, self.bias)
        g = self.gemv
        if g == "linear":
            return F.linear(x, self.weight, self.bias)
        if g == "mkldnn":
            return torch.ops.mkldnn._linear_pointwise(rows, self.w_one, self.bias, "none", [],
                                                      "").view(lead + (self.out_features,))
        if g == "transposed":
            y = rows @ self.w_one
        elif g == "rows":  # (P, N/P, K) @ (P, K, 1) -> (P, N/P, 1): slice p on thread p
            y = torch.bmm(self.w_one, rows.t().expand(self.parts, K, 1))
        else:  # split: (P, 1, K) @ (P, K, N/P) -> (P, 1, N/P)
            y = torch.bmm(rows.expand(self.parts, 1, K), self.w_one)
        y = y.reshape(lead + (self.out_features,))
        return y if self.bias is None else y + self.bias


# ---- choosing the paths --------------------------------------------------------------------


@functools.cache  # asked per layer when quantized kernels are built: read /proc/cpuinfo once
def cpu_flags() -> tuple[str, ...]:
    """The CPU's AVX flags (what `grep -o 'avx[^ ]*' /proc/cpuinfo | sort -u` prints)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    return tuple(sorted({w for line in text.splitlines() if line.startswith("flags") for w in line.split() if
                         w.startswith("avx")}))


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(parts: list) -> str:
    """A key for a measured choice: CPU, AVX flags, torch, its CPU capability, the ISA env vars, and `parts`
    (JSON-able: threads, dtype, shapes, whatever else the choice depends on)."""
    isa = "|".join(os.environ.get(v, "") for v in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"))
    text = json.dumps([cpu_name(), cpu_flags(), torch.__version__, torch.backends.cpu.get_cpu_capability(), isa,
                       *parts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def machine_key(model: nn.Module, threads: int) -> str:
    """What the measured choice depends on: CPU, the kernels' ISA, torch, threads, dtype and weight shapes."""
    lin = [m for m in model.modules() if isinstance(m, (nn.Linear, DecodeLinear))]
    shapes = sorted({(m.in_features, m.out_features) for m in lin})
    dtype = lin[0].weight.dtype if lin else torch.float32
    return cache_key([threads, str(dtype), shapes])


def cached_measurement(key: str, measure) -> tuple[dict, str]:
    """The entry cached under `key` in $QT_HOME/fast_gemv.json, or `measure()`'s: (entry, "cached" | "measured").

    `measure()` returns a JSON-able dict with a bool "noisy" (see `noisy`); a noisy entry is used
    this once and not cached, so the next start measures again. Other packages' measured choices
    (quant/'s kernels) share this file and its key scheme (`cache_key`)."""
    entry = _read_cache().get(key)
    if entry is not None:
        return entry, "cached"
    entry = {"cpu": cpu_name(), "flags": " ".join(cpu_flags()), "torch": torch.__version__,
             "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **measure()}
    if not entry["noisy"]:
        _write_cache(key, entry)
    return entry, "measured"


def _cache_path() -> Path:
    base = os.environ.get("QT_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qt"
    return Path(base) / CACHE_FILE


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only home: measure again next time
        pass


def noisy(times: dict[str, list[float]]) -> bool:
    """Whether another process disturbed the timing: medians far above the best runs. A thread of an
    OpenMP team that loses its core stalls the whole product for a scheduler slice (ms), so on a busy
    2-core machine multi-threaded paths can look 10-100x slower than they are."""
    return any(statistics.median(t) > 1.5 * min(t) for t in times.values())


class _Sites:
    """Where the model's nn.Linear modules sit, to put one candidate's layers in place after another."""

    def __init__(self, model: nn.Module):
        self.sites = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                      if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"]

    def build(self, gemv: str, gemm: str, parts: int) -> list[nn.Module]:
        return [DecodeLinear(lin, gemv, gemm, parts) for _, _, lin in self.sites]

    def install(self, mods: list[nn.Module] | None) -> None:
        for (parent, name, lin), m in zip(self.sites, mods or [s[2] for s in self.sites]):
            setattr(parent, name, m)


def _time_candidates(model: nn.Module, sites: _Sites, cands: dict[str, list[nn.Module]], rows: int,
                     rounds: int) -> dict[str, list[float]]:
    """Seconds of a whole-model forward of `rows` one-token rows (no KV cache: every weight streamed once,
    the norms, rope and attention ops in between, as in a decode step) with each candidate's layers in
    place; the candidates interleaved round by round so a noisy neighbour hits all of them alike."""
    idx = torch.zeros((rows, 1), dtype=torch.long, device=next(model.parameters()).device)
    times = {name: [] for name in cands}
    try:
        with torch.inference_mode():
            for r in range(rounds + 1):  # round 0 warms up (first touch of copies, thread pool)
                for name, mods in cands.items():
                    sites.install(mods)
                    start = time.perf_counter()
                    model(idx)
                    if r:
                        times[name].append(time.perf_counter() - start)
    finally:
        sites.install(None)
    return times


def measure(model: nn.Module, threads: int, rounds: int = 5, batch_rows: int = 16) -> dict:
    """Time every path on this model's own weights: {"gemv": best, "gemm": best, "ratios": ..., "noisy": bool}.

    Whole-model forwards of one token (batch 1: the gemv paths) and of `batch_rows` one-token rows
    (the gemm paths), each candidate against `linear` in the same rounds; the best run counts (noise
    only ever adds). The model must take token ids (B, S), as model.Transformer does."""
    sites = _Sites(model)
    if not sites.sites:
        return {"gemv": "linear", "gemm": "linear", "ratios": {}, "noisy": False}
    dtype = sites.sites[0][2].weight.dtype
    gemv = [p for p in GEMV_PATHS if p != "linear" and (p != "mkldnn" or mkldnn_ok(dtype))]
    if threads < 2:
        gemv = [p for p in gemv if p not in ("split", "rows")]
    ratios, disturbed = {"linear": 1.0}, False
    plain = sites.build("linear", "linear", threads)  # views of the weights: no copy
    for p in gemv:  # one candidate's extra layouts alive at a time
        t = _time_candidates(model, sites, {"linear": plain, p: sites.build(p, "linear", threads)}, 1, rounds)
        ratios[p] = min(t[p]) / min(t["linear"])
        disturbed |= noisy(t)
    best_gemm = "linear"
    if mkldnn_ok(dtype):
        t = _time_candidates(model, sites, {"linear": plain, "mkldnn": sites.build("linear", "mkldnn", threads)},
                             batch_rows, rounds)
        ratios["gemm mkldnn"] = min(t["mkldnn"]) / min(t["linear"])
        disturbed |= noisy(t)
        best_gemm = "mkldnn" if ratios["gemm mkldnn"] < 1 else "linear"
    return {"gemv": min(["linear", *gemv], key=ratios.get), "gemm": best_gemm,
            "ratios": {k: round(v, 3) for k, v in ratios.items()}, "noisy": disturbed}


def choose_paths(model: nn.Module, threads: int, gemv: str | None = None, gemm: str | None = None) -> dict:
    """The (gemv, gemm) paths for this model: forced by argument or env (QT_GEMV, QT_GEMM), else measured
    once per machine/torch/threads/shapes and cached in $QT_HOME/fast_gemv.json."""
    gemv = gemv or os.environ.get("QT_GEMV") or "auto"
    gemm = gemm or os.environ.get("QT_GEMM") or "auto"
    for value, allowed, var in ((gemv, GEMV_PATHS, "QT_GEMV"), (gemm, GEMM_PATHS, "QT_GEMM")):
        if value != "auto" and value not in allowed:
            raise ValueError(f"{var}={value!r}: expected one of {', '.join(allowed + ('auto',))}")
    chosen = {"gemv": gemv, "gemm": gemm, "source": "forced"}
    if "auto" in (gemv, gemm):
        entry, chosen["source"] = cached_measurement(machine_key(model, threads),
                                                     lambda: {**measure(model, threads), "threads": threads})
        chosen["gemv"] = entry["gemv"] if gemv == "auto" else gemv
        chosen["gemm"] = entry["gemm"] if gemm == "auto" else gemm
    return chosen


def optimize_for_decode(model: nn.Module, threads: int | None = None, gemv: str | None = None,
                        gemm: str | None = None) -> nn.Module:
    """Swap, in place, each CPU nn.Linear for a DecodeLinear on the chosen paths; returns the model.

    `threads` (default torch.get_num_threads()) is the number of slices of the split/rows paths;
    `gemv` / `gemm` force a path (else $QT_GEMV / $QT_GEMM, else "auto": measured and cached).
    The choice is recorded as `model.decode_paths`."""
    parts = threads or torch.get_num_threads()
    if not any(isinstance(m, nn.Linear) and m.weight.device.type == "cpu" for m in model.modules()):
        return model
    chosen = choose_paths(model, parts, gemv, gemm)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(parent, name, DecodeLinear(child, chosen["gemv"], chosen["gemm"], parts))
    model.decode_paths = chosen
    return model


def release_openmp_threads() -> bool:
    """Let go of the OpenMP worker threads that torch ops of THIS thread started; True if released.

    libgomp (torch's OpenMP on Linux) gives every thread that runs a parallel region its own team
    of workers, alive as long as that thread. Once the process holds more OpenMP threads than CPUs
    (a server whose main thread loaded the model and whose engine thread decodes: 2 + 1 on 2 cores),
    libgomp stops spin-waiting between parallel regions and wakes sleeping workers for each of the
    ~100 products of a decode step: batch-1 decode runs at ~0.7x (LOG.md 2026-12-01). Call this from
    a thread that is done with torch (the server's main thread after loading) so the decoding
    thread's team is the only one. A later torch op on this thread builds a team again."""
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    names = sorted({line.split()[-1] for line in maps.splitlines()
                    if any(n in line.rsplit("/", 1)[-1] for n in ("libgomp", "libomp", "libiomp"))})
    released = False
    for name in names:  # every runtime loaded, not the first: scikit-learn brings its own libgomp beside torch's
        try:
            released |= ctypes.CDLL(name).omp_pause_resource_all(1) == 0  # omp_pause_soft
        except (OSError, AttributeError):
            continue
    return released
