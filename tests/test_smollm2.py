"""The default chat model, SmolLM2-135M-Instruct, imported from its GGUF (fetched from PyPI once)."""

import json

import pytest

from qt_serve import hub
from qt_serve.errors import QtError
from qt_serve.generate import LLM
from qt_serve.sampling import SamplingParams, defaults_from_generation_config

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smol():
    try:
        path = hub.pull(hub.DEFAULT_MODEL)
    except QtError as e:
        pytest.skip(f"SmolLM2 artifact unavailable: {e}")
    return LLM.load(path, max_seq_len=512)


def test_imported_shape(smol):
    cfg = smol.ckpt.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and "<|im_start|>" in smol.tokenizer.chat_template


def test_answers_paris(smol):
    out = smol.generate([{"role": "user", "content": "Which city is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ends on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text


def test_recommended_sampling_from_the_model_card(smol):
    # huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: temperature=0.2, top_p=0.9, do_sample=True
    gen = json.loads((hub.pull(hub.DEFAULT_MODEL) / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["eos_token_id"] == 2
    assert defaults_from_generation_config(gen) == {"temperature": 0.2, "top_p": 0.9}
