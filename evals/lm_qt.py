"""`--model qt` for lm-eval: any lm-eval task on a qt checkpoint, in-process, through the batched engine.

    qt-eval lm-eval --model qt --model_args pretrained=SmolLM2-135M-Instruct --tasks arc_easy
    qt-eval lm-eval --model qt --model_args pretrained=runs/tiny/best,max_batch=16 --tasks my_task \
        --include_path tasks/ --apply_chat_template

lm-eval's own tasks read their data from the Hugging Face hub; offline, a task YAML points at local
files (`dataset_path: json`, as evals/ifeval.py and tests/test_lmeval.py do).

lm-eval 0.4.13 finds models only in its own registry (it reads no entry-point group), so importing this
module registers "qt": `qt-eval lm-eval ARGS` is lm-eval's own CLI with it imported, and from Python
`import evals.lm_qt` then `lm_eval.simple_evaluate(model="qt", model_args={"pretrained": ...})`.

model_args: `pretrained` is anything `qt_serve.checkpoint.load` takes (a checkpoint or HF Llama dir, a
.gguf file, a known name, an int8 / int4 / ONNX checkpoint); `max_batch` requests run at once (KV slots,
default 8); `max_length` the context (default 4096, or the checkpoint's if smaller); `dtype`, `device`;
`max_gen_toks` (default 256, as lm-eval's HF model); `add_bos_token` and `prefix_token_id` as lm-eval's HF model.

Every call queues all its requests on one `Engine` with `max_batch` KV rows, stepped in this thread,
and `service.Generator` turns gen_kwargs into sampling parameters over the checkpoint's defaults,
the server's path:
- loglikelihood: each (context, continuation) is one scoring request (`prompt_logprobs`, as the
  /v1/completions echo does); its log-prob is the sum over the continuation's tokens, greedy if
  each one is the top-1.
- loglikelihood_rolling: lm-eval's rolling windows of the text, scored the same way.
- generate_until: stop strings end a sequence inside the engine, as for the API's `stop`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from qt_serve import checkpoint
from qt_serve.engine import Engine
from qt_serve.errors import QtError
from qt_serve.hub import DEFAULT_MODEL
from qt_serve.sampling import Choice, SamplingParams
from qt_serve.sequence import Delta
from qt_serve.service import Generator, failure

# gen_kwargs lm-eval tasks set -> SamplingParams fields (do_sample is folded into temperature by lm-eval).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


@register_model("qt")
class QtLM(TemplateLM):
    def __init__(self, pretrained: str = DEFAULT_MODEL, max_batch: int = 8, max_length: int = 4096,
                 dtype: str | None = None, device: str | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 batch_size=None, max_batch_size=None):
        # lm-eval hands every model its --batch_size (default 1) and --max_batch_size; here the engine's
        # KV slots (max_batch) say how many requests run together, so those two are not used.
        super().__init__()
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's command line asks for cuda:0 unless told; its HF model falls back the same way
        ckpt = checkpoint.load(pretrained, dtype=dtype, device=device, max_seq_len=int(max_length))
        if ckpt.tokenizer is None:
            raise QtError(f"{pretrained} has no tokenizer.json; lm-eval sends and reads text")
        self.engine = Engine.load(ckpt, max_batch=int(max_batch), max_queue=sys.maxsize, max_seq_len=int(max_length),
                                  thread=False)
        self.gen = Generator(str(ckpt.source), self.engine, ckpt.generation_config)
        self.tokenizer = ckpt.tokenizer
        # The engine keeps one position free after a prompt, so a scored sequence holds one token less.
        self.max_length = self.engine.max_seq_len - 1
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.engine.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        for t in (self.custom_prefix_token_id, self.tokenizer.bos_id):
            if t is not None:
                return t
        return self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.gen.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)
        if add_generation_prompt:
            return text
        # lm-eval wants the last message continued (transformers' continue_final_message): cut the
        # text right after that message, before the template closes its turn.
        last = chat_history[-1]["content"]
        at = text.rfind(last.strip())
        if at < 0:
            raise QtError("the chat template changes the last message's text, so it cannot be continued")
        keep = last.lstrip() if text.startswith(last.lstrip(), at) else last.strip()
        return text[:at + len(keep)]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # as lm-eval's HF model: add_bos_token, else the tokenizer's own
            bos = self.tokenizer.bos_token
            add_special_tokens = (self.add_bos_token is not False) and not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    # ---- requests ---------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per (cache key, context ids, continuation ids)."""
        seqs = [(ctx + cont)[-self.max_length:] for _, ctx, cont in requests]
        out: list[tuple[float, bool]] = [None] * len(requests)

        def scored(i: int, text: str, scores: list[Choice] | None) -> None:
            n = min(len(requests[i][2]), len(seqs[i]) - 1)  # the continuation's tokens that were kept
            cont = scores[len(scores) - n:]  # scores[j] is token j + 1's
            out[i] = (sum(c.logprob for c in cont), all(c.top[0][0] == c.token for c in cont))
            if requests[i][0] is not None:  # rolling windows have no key of their own
                self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])

        self._run([(s, None) for s in seqs], scored, "qt loglikelihood", disable_tqdm)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            # windows of max_length tokens: lm-eval's max_seq_len counts the context token apart
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length - 1, 1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for context, gen_kwargs in (r.args for r in requests):
            kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until, n = kw.pop("until"), kw.pop("max_gen_toks")
            kw.pop("do_sample", None)
            unknown = set(kw) - set(SAMPLING_KEYS)
            if unknown:
                raise QtError(f"gen_kwargs {sorted(unknown)} are not supported by --model qt "
                              f"(it takes until, max_gen_toks, do_sample, {', '.join(SAMPLING_KEYS)})")
            if n >= self.engine.max_seq_len:
                raise QtError(f"max_gen_toks {n} leaves no room for a prompt in the context of "
                              f"{self.engine.max_seq_len} tokens; raise max_length")
            ids = self.tok_encode(context)[-(self.engine.max_seq_len - n):]  # left-truncated, as lm-eval's HF model
            jobs.append((ids, self.gen.sampling(len(ids), max_tokens=n, stop=until, **kw)))
        out: list[str] = [None] * len(requests)

        def generated(i: int, text: str, scores) -> None:
            out[i] = text
            self.cache_hook.add_partial("generate_until", requests[i].args, text)

        self._run(jobs, generated, "qt generate_until", disable_tqdm)
        return out

    def _run(self, jobs: list[tuple[list[int], SamplingParams | None]],
             finished: Callable[[int, str, list[Choice] | None], None], desc: str, disable_tqdm: bool) -> None:
        """Queue every job, step the engine until all have ended; `finished(i, text, prompt scores)` as each
        ends. A job without sampling parameters scores its prompt only."""
        self.gen.check([ids for ids, _ in jobs], [params for _, params in jobs])  # all or none are queued
        deltas: list[tuple[int, Delta]] = []  # filled by the engine during run_once, in this thread
        reqs = [self.engine.submit(ids, params, lambda d, i=i: deltas.append((i, d)), f"lm-eval-{i}",
                                   1 if params is None else None) for i, (ids, params) in enumerate(jobs)]
        parts: list[list[str]] = [[] for _ in jobs]
        left = len(jobs)
        try:
            with tqdm(total=left, desc=desc, disable=disable_tqdm) as bar:
                while left:
                    self.engine.run_once()
                    for i, d in deltas:
                        parts[i].append(d.text)
                        if d.finish_reason is None:
                            continue
                        err = failure(d)
                        if err is not None:
                            raise err
                        finished(i, "".join(parts[i]), d.prompt_logprobs)
                        left -= 1
                        bar.update()
                    deltas.clear()
        finally:  # an error or Ctrl-C: what is still queued must not run in the next call
            for r in reqs:
                if not r.done:
                    self.engine.cancel(r)
            if self.engine.busy:
                self.engine.run_once()


def cli(argv: list[str]) -> int:
    """`qt-eval lm-eval ARGS`: lm-eval's own command line (`lm-eval ARGS`), with --model qt registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0
