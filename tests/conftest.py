"""Tiny models and tokenizers the tests build themselves (no network, seconds on 2 cores)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import uvicorn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from qt_serve.config import ModelConfig
from qt_serve.model import Transformer
from qt_serve.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "Ünïcödé tëxt: café, naïve, 東京, 😀 and 12345 numbers.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
] * 20


def build_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return Tokenizer(tok, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML})


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return build_tokenizer()


def tiny_config(vocab_size: int = 400, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**kw)).eval()
    with torch.no_grad():  # larger-than-default weights so greedy decoding is not one repeated token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def recompute_greedy(ckpt_dir, prompt: list[int], n: int) -> list[int]:
    """The reference for every cached, batched or swapped decoding path: the checkpoint's plain model
    (no decode-time swaps), no KV cache, the whole sequence through it for every new token."""
    from qt_serve.checkpoint import load

    model, ids = load(ckpt_dir).model, list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture
def tiny_ckpt(tmp_path, tokenizer):
    """A saved checkpoint directory with a random tiny model and the test tokenizer."""
    from qt_serve.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "tiny", tiny_model(vocab_size=tokenizer.vocab_size), tokenizer)


class Server:
    """An ASGI app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny checkpoint shared by a module's server tests."""
    from qt_serve.checkpoint import save_checkpoint

    tok = build_tokenizer()
    return save_checkpoint(tmp_path_factory.mktemp("m") / "tiny", tiny_model(vocab_size=tok.vocab_size), tok)


def start_app(ckpt, names=("tiny",), ctx: int = 128, max_batch: int = 4, max_queue: int = 64,
              request_timeout: float | None = None, **app_kw):
    """The API over `ckpt` served under each of `names`, on a loopback port: (Server, generators)."""
    from qt_serve.api import create_app, load_generators

    gens = load_generators([f"{n}={ckpt}" for n in names], max_seq_len=ctx, max_batch=max_batch,
                           max_queue=max_queue, request_timeout=request_timeout)
    return Server(create_app(gens, **app_kw)), gens


@pytest.fixture(scope="module")
def server(ckpt):
    """A live server holding `ckpt` as models "tiny" and "tiny2" (context 128, 4 slots, 20 kB bodies)."""
    srv, gens = start_app(ckpt, ("tiny", "tiny2"), max_body_bytes=20_000)
    srv.served = gens
    yield srv
    srv.stop()
    for g in gens.values():
        g.engine.shutdown(True, 5)
