"""Text <-> token ids: a `tokenizers` tokenizer, the chat template, streaming decode.

The files are Hugging Face's (`tokenizer.json`, `tokenizer_config.json` holding
`chat_template`, `bos_token`, `eos_token`), so `AutoTokenizer` reads what qt writes.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from qt_serve.errors import QtError, read_json


def _raise(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens as a string or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


# The named special tokens transformers hands every template (`special_tokens_map`: only those that are set).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of assistant text (for its training masks):
    rendered as its body, as transformers renders it. Without it such templates (LFM2.5's) do not parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    """A Jinja environment set up as transformers sets up its own (`_cached_compile_jinja_template`)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers gives them to the template: keys whose value is None dropped (OpenAI clients send
    `content: null`, which templates would print as "None"), and an assistant's reasoning under every name
    templates read (`reasoning_content` for Qwen3, `thinking` for gpt-oss), whichever of them the message used."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None):
        self.tok = tok
        self.config = dict(config or {})
        self.chat_template = self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_id = self.token_id(self.bos_token)
        self.eos_id = self.token_id(self.eos_token)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special_tokens = {k: _token_text(self.config[k]) for k in SPECIAL_TOKENS if self.config.get(k) is not None}
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` applies the tokenizer's own post-processor (e.g. a BOS)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages to the prompt text the model was trained on (Jinja, as HF does)."""
        if not self.chat_template:
            raise QtError("this model's tokenizer has no chat_template; use a plain text prompt instead")
        if self._template is None:
            try:
                self._template = _environment().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise QtError(f"the chat_template does not parse: {e}") from None
        # As transformers' apply_chat_template: `tools` and `documents` are always passed (None when absent, so
        # `tools is defined` holds), then the set special tokens, then the caller's variables over them.
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=_template_messages(messages),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise QtError(f"chat template rejected the messages: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template writes any BOS itself, so the post-processor must not add another.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the chat template renders a `tools` list (it names the variable), as HF decides."""
        if not self.chat_template:
            return False
        try:
            return "tools" in jinja2.meta.find_undeclared_variables(_environment().parse(self.chat_template))
        except jinja2.TemplateError:
            return False

    # ---- files ---------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tok.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise QtError(f"{directory} has no tokenizer.json (qt reads Hugging Face fast-tokenizer files)")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise QtError(f"{path} is not a valid tokenizer file: {e}") from None
        config = read_json(directory / "tokenizer_config.json", missing={})
        if "chat_template" not in config and (directory / "chat_template.jinja").exists():
            config["chat_template"] = (directory / "chat_template.jinja").read_text()
        return cls(tok, config)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    A byte-level token can hold part of a multi-byte character; decoding it alone gives
    U+FFFD. We decode a short window of recent tokens and only emit once the new text no
    longer ends in an incomplete character (the approach of HF's TextStreamer and vLLM).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens already turned into emitted text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back (a truly invalid byte sequence decodes to U+FFFD here)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
