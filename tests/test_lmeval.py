"""lm-eval's `local-completions` model scores a multiple-choice task through qt-serve over HTTP
(echo + logprobs log-likelihoods), with token-id and text prompts, and must agree with scoring the
same choices in-process: the same accuracy, the same per-choice log-likelihoods. Offline: the task
is a local JSONL behind a YAML, the tokenizer is the checkpoint's own files."""

import json
import random
import socket

import pytest
import torch

from qt_serve import checkpoint
from test_server import CTX

TASK = "qt_tiny_mc"
CONTEXTS = ["The capital of France is", "The capital of Japan is", "To be, or not to be, that is the",
            "the slings and arrows of outrageous", "to take arms against a sea of", "whether 'tis nobler in the"]
WORDS = [" Paris", " Tokyo", " France", " Japan", " fortune", " arrows", " troubles", " question", " mind", " sea",
         " café", " 12345 numbers"]


@pytest.fixture(scope="module")
def qt_ckpt(ckpt):  # noqa: F811
    return checkpoint.load(ckpt, max_seq_len=CTX)


def greedy_choice(ck, question: str) -> str | None:
    """The model's own next token after `question`, as a choice text, if it round-trips through the tokenizer:
    a choice lm-eval must report as greedy (its is_greedy reads the server's top_logprobs)."""
    ids = ck.tokenizer.encode(question)
    with torch.no_grad():
        t = int(ck.model(torch.tensor([ids]))[0, -1].argmax())
    text = ck.tokenizer.decode([t])
    ok = t not in ck.tokenizer.special_ids and ck.tokenizer.encode(question + text) == ids + [t]
    return text if ok else None


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory, qt_ckpt):
    """20 items with 2-4 choices as JSONL, and a task YAML reading it with the `json` builder. Choices carry
    their own leading space (target_delimiter is empty) so that some can be the model's greedy token."""
    rng = random.Random(0)
    docs = []
    for i in range(20):
        question, choices = rng.choice(CONTEXTS), rng.sample(WORDS, 2 + i % 3)
        greedy = greedy_choice(qt_ckpt, question) if i % 3 == 0 else None
        if greedy is not None and greedy not in choices:
            choices[rng.randrange(len(choices))] = greedy
        docs.append({"question": question, "choices": choices, "label": rng.randrange(len(choices))})
    d = tmp_path_factory.mktemp("lmeval")
    (d / "data.jsonl").write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
    (d / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'data.jsonl'}
  cache_dir: {d / 'hf_datasets'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return d, docs


@pytest.fixture(scope="module")
def reference(qt_ckpt, mc_task):
    """Per doc, per choice: (sum of the continuation's log-probs, is it the greedy continuation), computed
    with the qt model in-process. The context/continuation split is lm-eval's: tokenize the whole text,
    the continuation is what follows the context's own tokens (no BOS)."""
    tok, model = qt_ckpt.tokenizer, qt_ckpt.model
    out = []
    for doc in mc_task[1]:
        scores = []
        for choice in doc["choices"]:
            ctx = tok.encode(doc["question"])
            whole = tok.encode(doc["question"] + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole]))[0].float(), -1)
            rows = range(len(ctx), len(whole))
            scores.append((sum(float(logp[j - 1, whole[j]]) for j in rows),
                           all(int(logp[j - 1].argmax()) == whole[j] for j in rows)))
        out.append(scores)
    assert any(g for s in out for _, g in s), "no greedy choice in the fixture: is_greedy would go unchecked"
    return out


def refuse_network(monkeypatch):
    """Only loopback connections (the test server); anything else fails loudly."""
    connect = socket.socket.connect

    def loopback_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise OSError(f"test_lmeval is offline; refused a connection to {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_local_completions_matches_in_process(server, ckpt, mc_task, reference, tokenized, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    refuse_network(monkeypatch)
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_dir, docs = mc_task
    result = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "tiny", "base_url": f"{server.url}/v1/completions", "tokenizer": str(ckpt),
                    "tokenizer_backend": "huggingface", "tokenized_requests": tokenized, "num_concurrent": 1,
                    "max_retries": 1, "max_length": CTX},
        tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True, bootstrap_iters=0)

    expected = [float(max(range(len(s)), key=lambda c: s[c][0]) == doc["label"]) for s, doc in zip(reference, docs)]
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for s, ref, hit in zip(samples, reference, expected):
        got = [r[0] for r in s["resps"]]  # one (loglikelihood, is_greedy) per choice
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in ref], abs=1e-4), s["doc"]
        assert [g for _, g in got] == [g for _, g in ref], s["doc"]
        assert s["acc"] == hit, s["doc"]
    acc = result["results"][TASK]["acc,none"]
    assert acc == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    print(f"tokenized_requests={tokenized}: lm-eval acc {acc:.4f}, in-process acc {sum(expected) / len(expected):.4f}")
