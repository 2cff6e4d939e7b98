"""The published chat templates of Llama 3.1/3.2, Mistral Nemo, Qwen2.5 and Qwen3, rendered by qt exactly as
transformers renders them (text and token ids), with tools and template switches; and generation stopping on
every id of a generation_config.json `eos_token_id` list.

The templates are the publishers' own, copied verbatim into tests/fixtures/templates (sources in its README.md).
Each family gets a small byte-level BPE tokenizer holding that family's special tokens, written as a Hugging Face
tokenizer directory that both `qt_serve.tokenizer.Tokenizer.load` and `transformers.AutoTokenizer` read.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from conftest import CORPUS, tiny_model
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from qt_serve.sampling import SamplingParams
from qt_serve.tokenizer import Tokenizer
from qt_serve.tools import Plan

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"]
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# family -> template file, special tokens, added non-special tokens (as the published tokenizer.json marks them),
# tokenizer_config.json's special-token entries, and whether the template renders `tools`.
FAMILIES = {
    "llama-3.1": dict(template="meta-llama-Llama-3.1-8B-Instruct.jinja", specials=LLAMA3, added=[],
                      config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama-3.2": dict(template="meta-llama-Llama-3.2-3B-Instruct.jinja", specials=LLAMA3, added=[],
                      config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral-nemo": dict(template="mistralai-Mistral-Nemo-Instruct-2407.jinja",
                         specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                                   "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "<pad>"],
                         added=[], config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "qwen-2.5": dict(template="Qwen-Qwen2.5-7B-Instruct.jinja", specials=QWEN, added=["<tool_call>", "</tool_call>"],
                     config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen-3": dict(template="Qwen-Qwen3-0.6B.jinja", specials=QWEN,
                   added=["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"],
                   config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
}
TOOL_FAMILIES = ["llama-3.1", "llama-3.2", "mistral-nemo", "qwen-2.5", "qwen-3"]
DATE = "02 Dec 2024"  # Llama 3.x write today's date (strftime_now) unless given date_string

CHAT = [{"role": "system", "content": "You are a terse assistant. Answer in one line."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? Ünïcödé: 東京 😀"}]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city, in \"quotes\" & <brackets>.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}]

# As an OpenAI client sends a tool round trip: arguments as a JSON string, the assistant's content null.
# Mistral's template insists on 9-character call ids, so the id is one such.
TOOL_CHAT = [{"role": "system", "content": "You can look up the weather."},
             {"role": "user", "content": "Weather in Paris, in celsius?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "a1B2c3D4e", "type": "function",
                  "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
             {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}]


def write_tokenizer_dir(directory: Path, family: str, template: str | None = None) -> Path:
    spec = FAMILIES[family]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + [m["content"] for m in CHAT], trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    config = {k: v for k, v in spec["config"].items() if v is not None}
    config["chat_template"] = template or (TEMPLATES / spec["template"]).read_text()
    directory.mkdir(parents=True, exist_ok=True)
    Tokenizer(tok, config).save(directory)
    return directory


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: write_tokenizer_dir(root / name, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def pair(family_dirs):
    """family -> (qt's Tokenizer, transformers' tokenizer), both loaded from the same directory."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = Tokenizer.load(family_dirs[family]), AutoTokenizer.from_pretrained(family_dirs[family])
        return cache[family]
    return get


def hf_ids(hf, messages, **kw) -> list[int]:
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


def assert_same(qt: Tokenizer, hf, messages, add_generation_prompt: bool, tools=None, **kw) -> str:
    """qt's text and ids against transformers'; the extra variables go to both templates alike."""
    extra = dict(kw, tools=tools) if tools is not None else kw
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    got = qt.apply_chat_template(messages, add_generation_prompt, **extra)
    assert got == want
    assert qt.encode_chat(messages, add_generation_prompt, **extra) == hf_ids(
        hf, messages, add_generation_prompt=add_generation_prompt, **extra)
    return got


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gen", [True, False], ids=["gen-prompt", "no-gen-prompt"])
def test_multi_turn_with_system_prompt(pair, family, gen):
    qt, hf = pair(family)
    text = assert_same(qt, hf, CHAT, gen, date_string=DATE)
    # The pieces are where the family's format puts them (a check that the test renders something real).
    header = {"llama-3.1": "<|start_header_id|>assistant<|end_header_id|>\n\n", "llama-3.2":
              "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen-2.5": "<|im_start|>assistant\n",
              "qwen-3": "<|im_start|>assistant\n", "mistral-nemo": None}[family]
    if header is not None:
        assert text.endswith(header) == gen
    if family.startswith("llama"):
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                               f"Cutting Knowledge Date: December 2023\nToday Date: {DATE}\n\n"
                               "You are a terse assistant.")
    elif family == "mistral-nemo":  # the system prompt goes into the last user turn
        assert text == ("<s>[INST]What is the capital of France?[/INST]Paris.</s>[INST]You are a terse assistant. "
                        "Answer in one line.\n\nAnd of Japan? Ünïcödé: 東京 😀[/INST]")
    else:
        assert text.startswith("<|im_start|>system\nYou are a terse assistant. Answer in one line.<|im_end|>\n")


def test_special_tokens_encode_as_single_ids(pair):
    qt, hf = pair("llama-3.1")
    ids = qt.encode_chat(CHAT, date_string=DATE)
    assert ids[0] == qt.bos_id == hf.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids.count(qt.token_id("<|eot_id|>")) == 4 and ids.count(qt.token_id("<|start_header_id|>")) == 5
    assert qt.decode(ids) == qt.apply_chat_template(CHAT, date_string=DATE)


def test_llama_3_2_writes_today_by_default(pair):
    """Without date_string, Llama 3.2's template asks strftime_now for today's date, as transformers provides."""
    qt, hf = pair("llama-3.2")
    for _ in range(2):  # a rerun if the day changed between the two renders
        want = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        if qt.apply_chat_template(CHAT) == want:
            break
    assert qt.apply_chat_template(CHAT) == want
    assert "Today Date: 26 Jul 2024" not in want


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_tools_and_tool_round_trip_as_the_server_passes_them(pair, family):
    """The server's path: OpenAI messages and tools -> `tools.Plan.render` (arguments parsed to a dict, a null
    content passed as "", as vLLM does, the tool result named) -> the template, with `tools` as its variable."""
    qt, hf = pair(family)
    assert qt.supports_tools
    msgs, extra = Plan.of(TOOLS, None, None, None).render(TOOL_CHAT, qt.supports_tools)
    assert extra == {"tools": TOOLS} and msgs[2]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris", "unit": "celsius"} and msgs[2]["content"] == ""  # Qwen3's template needs a string
    text = assert_same(qt, hf, msgs, True, date_string=DATE, **extra)
    call = {"llama-3.1": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>',
            "llama-3.2": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>',
            "mistral-nemo": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, '
                            '"id": "a1B2c3D4e"}]</s>',
            "qwen-2.5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                        '</tool_call><|im_end|>',
            "qwen-3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                      '</tool_call><|im_end|>'}[family]
    assert call in text
    # The tool's description goes in without HTML escaping of quotes, & or <> (Jinja's own tojson would write
    # \u0026 etc.; Mistral's template writes the string itself, unescaped) ...
    assert ('"quotes" & <brackets>' if family == "mistral-nemo" else '\\"quotes\\" & <brackets>') in text
    # ... and the result comes back in the family's own form (Llama's as a JSON string: a str "is iterable").
    ipython = ('<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"temperature\\": 21, \\"sky\\": '
               '\\"clear\\"}"<|eot_id|>')
    result = {"llama-3.1": ipython, "llama-3.2": ipython,
              "mistral-nemo": '[TOOL_RESULTS]{"content": {"temperature": 21, "sky": "clear"}, '
                              '"call_id": "a1B2c3D4e"}[/TOOL_RESULTS]'}.get(
        family, '<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response>')
    assert result in text
    # Without tools, the same history still renders as transformers does (Mistral's template tests `tools is not
    # none`, which holds only if tools is passed as None when absent, as transformers does).
    plain = assert_same(qt, hf, msgs, True, date_string=DATE)
    assert "get_weather\", \"description" not in plain and "[AVAILABLE_TOOLS]" not in plain


def test_qwen3_tool_call_turn_without_content_fails_alike(pair):
    """Given a null content, transformers drops the key and Qwen3's template then cannot render the turn (which is
    why the server passes ""); qt's tokenizer drops it alike and must say so (a QtError: a 400), not crash."""
    from qt_serve.errors import QtError

    qt, hf = pair("qwen-3")
    msgs, extra = Plan.of(TOOLS, None, None, None).render(TOOL_CHAT, True)
    msgs[2] = {**msgs[2], "content": None}
    with pytest.raises(jinja2.UndefinedError):
        hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
    with pytest.raises(QtError, match="chat template rejected"):
        qt.apply_chat_template(msgs, True, **extra)


def test_mistral_tool_ids_must_have_nine_characters(pair):
    from qt_serve.errors import QtError

    qt, hf = pair("mistral-nemo")
    chat = json.loads(json.dumps(TOOL_CHAT).replace("a1B2c3D4e", "call_0_0"))
    msgs, extra = Plan.of(TOOLS, None, None, None).render(chat, True)
    with pytest.raises(jinja2.TemplateError, match="length 9"):
        hf.apply_chat_template(msgs, tokenize=False, **extra)
    with pytest.raises(QtError, match="length 9"):
        qt.apply_chat_template(msgs, True, **extra)


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_qwen3_enable_thinking(pair, enable_thinking):
    qt, hf = pair("qwen-3")
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = assert_same(qt, hf, CHAT, True, **kw)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") == (enable_thinking is False)
    assert_same(qt, hf, CHAT, False, **kw)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_qwen3_reasoning_of_the_current_turn(pair, field):
    """Qwen3 writes an assistant turn's reasoning back when it follows the last user query (a tool loop).
    transformers takes `reasoning` (vLLM's newer name) as `reasoning_content`; so must qt."""
    qt, hf = pair("qwen-3")
    msgs, extra = Plan.of(TOOLS, None, None, None).render(TOOL_CHAT, True)
    msgs[2] = {**msgs[2], "content": "", field: "The user wants Paris; call the tool."}
    text = assert_same(qt, hf, msgs, True, **extra)
    assert "<|im_start|>assistant\n<think>\nThe user wants Paris; call the tool.\n</think>\n\n<tool_call>" in text


def test_qwen_reasoning_inside_content_is_split(pair):
    qt, hf = pair("qwen-3")
    msgs = CHAT[:2] + [{"role": "assistant", "content": "<think>\nhmm\n</think>\n\nParis."}] + CHAT[3:]
    assert "hmm" not in assert_same(qt, hf, msgs, True)  # an earlier turn's reasoning is left out
    assert "<think>\nhmm\n</think>\n\nParis.<|im_end|>" in assert_same(qt, hf, msgs[:3], False)  # the last kept


@pytest.mark.parametrize("family", FAMILIES)
def test_none_values_are_dropped_as_transformers_does(pair, family):
    """`{"content": None}` from an OpenAI-style client: transformers drops None-valued keys before rendering
    (Llama's `content | trim` would print "None" otherwise)."""
    qt, hf = pair(family)
    msgs = [{"role": "user", "content": "Hi", "name": None}, {"role": "assistant", "content": None,
                                                              "tool_calls": None}, {"role": "user", "content": "Bye"}]
    if family.startswith("qwen") or family == "mistral-nemo":  # these templates add message.content to strings
        msgs[1]["content"] = "Hello"
    assert "None" not in assert_same(qt, hf, msgs, True, date_string=DATE)


def template_pair(tmp_path, template: str, family: str = "qwen-2.5"):
    d = write_tokenizer_dir(tmp_path / "t", family, template)
    return Tokenizer.load(d), AutoTokenizer.from_pretrained(d)


def test_variables_every_template_sees(tmp_path):
    """transformers always passes tools and documents (None when absent) and the special tokens that are set;
    an unset one (Qwen's bos_token) is undefined, not an empty string."""
    qt, hf = template_pair(tmp_path, "{{ tools is defined }} {{ tools is none }} {{ documents is none }} "
                                     "[{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ unk_token }}]")
    msgs = CHAT[1:2]
    text = assert_same(qt, hf, msgs, True)
    assert text == "True True True [<|im_end|>|<|endoftext|>|False|]"
    assert assert_same(qt, hf, msgs, True, tools=TOOLS, eos_token="E").startswith("True False True [E|")


def test_generation_blocks(tmp_path):
    """`{% generation %}` (transformers' assistant-mask tag, in e.g. LFM2.5's template) renders its body."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}\n"
                "{% endfor %}{% if tools %}T{% endif %}")
    qt, hf = template_pair(tmp_path, template)
    assert "Paris.<|im_end|>" in assert_same(qt, hf, CHAT, False)
    assert qt.supports_tools


def test_unsupported_roles_raise_like_transformers(pair):
    from qt_serve.errors import QtError

    qt, hf = pair("mistral-nemo")
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        hf.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(QtError, match="alternate"):
        qt.apply_chat_template(msgs)


# ---- stop tokens --------------------------------------------------------------------------------------------------

# Published ids: Llama-3.1-8B-Instruct's generation_config.json eos_token_id [128001, 128008, 128009] =
# <|end_of_text|>, <|eom_id|>, <|eot_id|>; Qwen2.5-7B-Instruct's [151645, 151643] = <|im_end|>, <|endoftext|>.
# config.json names only the first (Llama 3.0-style 128001 / Qwen's 151645), the tokenizer's eos is <|eot_id|> /
# <|im_end|>: the second id of each list is named by generation_config.json alone.
STOP_LISTS = {"llama-3.1": (["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "<|end_of_text|>", "<|eom_id|>"),
              "qwen-2.5": (["<|im_end|>", "<|endoftext|>"], "<|im_end|>", "<|endoftext|>")}


@pytest.mark.parametrize("family", STOP_LISTS)
@pytest.mark.parametrize("with_list", [True, False], ids=["generation_config-list", "control-without-list"])
def test_generation_stops_at_every_eos_id_of_generation_config(tmp_path, family_dirs, family, with_list):
    """A tiny model pushed (logit_bias) to emit the list's second id first: with the list in generation_config.json
    it stops there; the control, without the list, runs on to max_tokens, so the test can fail."""
    from qt_serve.checkpoint import save_checkpoint
    from qt_serve.generate import LLM

    tok = Tokenizer.load(family_dirs[family])
    names, config_eos, second = STOP_LISTS[family]
    ids = [tok.token_id(n) for n in names]
    target = tok.token_id(second)
    assert target != tok.eos_id and None not in ids
    model = tiny_model(vocab_size=tok.vocab_size, eos_token_id=tok.token_id(config_eos),
                       bos_token_id=tok.bos_id if tok.bos_id is not None else tok.token_id(config_eos))
    gen = {"eos_token_id": ids} if with_list else {}
    llm = LLM.load(save_checkpoint(tmp_path / family, model, tok, gen))
    stops = set(llm.engine.eos_ids)
    assert (target in stops) == with_list and tok.eos_id in stops
    params = SamplingParams(temperature=0, max_tokens=6, logit_bias={target: 100.0})
    out = llm.generate(CHAT, params)
    if with_list:
        assert (out.tokens, out.finish_reason) == ([target], "stop")
    else:
        assert (out.tokens, out.finish_reason) == ([target] * 6, "length")
