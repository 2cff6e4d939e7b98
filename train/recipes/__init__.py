"""Named training recipes: TOML files beside this one, with [data], [model] and [train] sections.

[data] says how `qt-train pretrain` builds its shards when no --data is given (`train.data.prepare`
arguments), [model] holds `ModelConfig` fields (the vocabulary size comes from the data), and
[train] holds the settings of the command the recipe is for: `train.pretrain.Settings` (pretrain), or
`train.finetune.Finetune` / `Preference` (sft / dpo: a [train] section alone, e.g. `sft-mix`). Flags given
on the command line override [train].
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from qt_serve.errors import QtError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

HERE = Path(__file__).parent
SECTIONS = ("data", "model", "train")


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load(spec: str) -> dict[str, dict]:
    """A recipe by name (`tiny`) or TOML path: {"data": {...}, "model": {...}, "train": {...}}."""
    path = Path(spec) if spec.endswith(".toml") else HERE / f"{spec}.toml"
    if not path.is_file():
        raise QtError(f"no recipe {spec!r}: give a .toml file or one of {', '.join(names())}")
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise QtError(f"{path} is not valid TOML: {e}") from None
    unknown = set(recipe) - set(SECTIONS)
    if unknown:
        raise QtError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}; a recipe has {', '.join(SECTIONS)}")
    # A misspelt key would otherwise surface as a TypeError traceback deep in ModelConfig / prepare.
    from qt_serve.config import ModelConfig
    from train.data import prepare

    known = {"model": {f.name for f in dataclasses.fields(ModelConfig)},
             "data": set(inspect.signature(prepare).parameters) - {"out"}}
    for section, keys in known.items():
        bad = set(recipe.get(section, {})) - keys
        if bad:
            raise QtError(f"{path}: unknown [{section}] key(s) {', '.join(sorted(bad))}")
    return {k: dict(recipe.get(k, {})) for k in SECTIONS}
