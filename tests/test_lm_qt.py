"""lm-eval's `--model qt` (evals/lm_qt.py) and `qt-eval ifeval` (evals/ifeval.py) on the tests' tiny model, offline.

`--model qt` scores test_lmeval's multiple-choice task in-process; its per-choice log-likelihoods must
equal `local-completions` over HTTP (qt-serve's echo scoring, an independent path) and the plain
model's. Its generate_until must equal the engine's greedy output, with requests batched together."""

import json

import pytest
from conftest import CORPUS, build_tokenizer, start_app, tiny_model
from lm_eval.api.instance import Instance
from test_lmeval import CONTEXTS, TASK, mc_task, qt_ckpt, reference, refuse_network  # noqa: F401  (fixtures)
from test_server import CTX

from evals import ifeval
from evals.cli import eval_main
from evals.lm_qt import QtLM
from qt_serve import hub
from qt_serve.checkpoint import save_checkpoint
from qt_serve.errors import QtError
from qt_serve.generate import LLM
from qt_serve.sampling import SamplingParams


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    refuse_network(monkeypatch)


@pytest.fixture(scope="module")
def qt_lm(ckpt):
    return QtLM(str(ckpt), max_batch=4, max_length=CTX)


def per_choice(result) -> list[list[tuple[float, bool]]]:
    """Each doc's (loglikelihood, is_greedy) per choice, in doc order."""
    return [[tuple(r[0]) for r in s["resps"]] for s in sorted(result["samples"][TASK], key=lambda s: s["doc_id"])]


def test_model_qt_matches_local_completions(server, ckpt, mc_task, reference):  # noqa: F811
    import lm_eval
    from lm_eval.tasks import TaskManager

    def run(model, model_args):
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                                       task_manager=TaskManager(include_path=str(mc_task[0]), include_defaults=False),
                                       bootstrap_iters=0)

    qt = run("qt", {"pretrained": str(ckpt), "max_batch": 4, "max_length": CTX})  # by name: the registration
    http = run("local-completions", {"model": "tiny", "base_url": f"{server.url}/v1/completions",
                                     "tokenizer": str(ckpt), "num_concurrent": 1, "max_retries": 1,
                                     "max_length": CTX})
    got, want = per_choice(qt), per_choice(http)
    assert len(got) == len(mc_task[1])
    for doc, g, w, ref in zip(mc_task[1], got, want, reference):
        assert [ll for ll, _ in g] == pytest.approx([ll for ll, _ in w], abs=1e-4), doc
        assert [ll for ll, _ in g] == pytest.approx([ll for ll, _ in ref], abs=1e-4), doc
        assert [gr for _, gr in g] == [gr for _, gr in w] == [gr for _, gr in ref], doc
    assert qt["results"][TASK]["acc,none"] == http["results"][TASK]["acc,none"]


def test_generate_until_equals_engine_greedy(ckpt, qt_lm, monkeypatch):
    llm = LLM.load(ckpt, max_seq_len=CTX)  # the engine one request at a time
    want = [llm.generate(c, SamplingParams(temperature=0, max_tokens=12)).text for c in CONTEXTS]
    assert len(set(want)) > 1 and all(len(w) >= 4 for w in want)
    # a stop string from the middle of each reply: the text before its first occurrence
    stops = [w[len(w) // 2:len(w) // 2 + 2] for w in want]
    requests = [Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": 12, "do_sample": False}), i)
                for i, (c, until) in enumerate([(c, []) for c in CONTEXTS] + [(c, [s]) for c, s in zip(CONTEXTS, stops)])]
    running = []
    step = qt_lm.engine.run_once
    monkeypatch.setattr(qt_lm.engine, "run_once", lambda: (running.append(len(qt_lm.engine.running)), step()))
    got = qt_lm.generate_until(requests)
    assert got == want + [w[:w.index(s)] for w, s in zip(want, stops)]
    assert max(running) == 4  # batched: max_batch requests decoded together


def test_loglikelihood_rolling_sums_windows(ckpt, qt_ckpt):  # noqa: F811
    import torch
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = QtLM(str(ckpt), max_batch=2, max_length=16)  # windows of 15 tokens: a text needs several
    text = CORPUS[0] + " " + CORPUS[1]
    ids = qt_ckpt.tokenizer.encode(text)
    want = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, lm.prefix_token_id, 14, 1)):
        with torch.no_grad():
            logp = torch.log_softmax(qt_ckpt.model(torch.tensor([ctx + cont]))[0].float(), -1)
        want += sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert len(ids) > 3 * 15
    assert got[0] == pytest.approx(want, abs=1e-3)


def test_chat_template_continues_the_last_message(qt_lm):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The capital is "}]
    assert qt_lm.apply_chat_template(chat[:1]).endswith("<|im_start|>assistant\n")
    # as transformers' continue_final_message: the turn is left open, the message's text kept as it is
    assert qt_lm.apply_chat_template(chat, add_generation_prompt=False).endswith("Hi<|im_end|>\n"
                                                                                 "<|im_start|>assistant\nThe capital is ")
    assert qt_lm.chat_template(True) == qt_lm.tokenizer.chat_template and qt_lm.chat_template(False) is None


def test_lm_eval_command_line(ckpt, mc_task, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr("sys.argv", ["qt-eval"])
    eval_main(["lm-eval", "--model", "qt", "--model_args", f"pretrained={ckpt},max_length={CTX}", "--tasks", TASK,
               "--include_path", str(mc_task[0])])
    out = capsys.readouterr().out
    assert TASK in out and "acc" in out


# ---- IFEval -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ifeval_files():
    try:
        hub.fetch_file("ifeval")
        ifeval.punkt_tab()
    except QtError as e:
        pytest.skip(f"IFEval data unavailable: {e}")


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """The tiny model with a 1024-token context: IFEval prompts are hundreds of the test tokenizer's tokens."""
    tok = build_tokenizer()
    return save_checkpoint(tmp_path_factory.mktemp("long") / "tiny",
                           tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=1024), tok)


def read_run(out) -> tuple[dict, list[dict]]:
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return json.loads((out / "results.json").read_text()), samples


QUICK = ["--limit", "3", "--max-tokens", "16"]


def test_ifeval_in_process_and_over_http(long_ckpt, ifeval_files, tmp_path, monkeypatch):
    assert eval_main(["ifeval", str(long_ckpt), "--max-length", "1024", "--out", str(tmp_path / "qt"), *QUICK]) == 0
    results, samples = read_run(tmp_path / "qt")
    assert results["prompts"] == 3 and results["max_tokens"] == 16
    assert set(results["metrics"]) == set(ifeval.METRICS) and all(0 <= v <= 1 for v in results["metrics"].values())
    assert [s["key"] for s in samples] == [1000, 1001, 1005] and all(s["response"] for s in samples)
    assert (tmp_path / "qt" / "results.md").read_text().count("| prompt-level") == 2

    srv, gens = start_app(long_ckpt, ("tiny",), ctx=1024)
    try:
        assert eval_main(["ifeval", "--url", srv.url, "--out", str(tmp_path / "http"), *QUICK]) == 0
    finally:
        srv.stop()
        gens["tiny"].engine.shutdown(True, 5)
    over_http, http_samples = read_run(tmp_path / "http")
    # the same chat template and greedy decoding on both sides: the same replies and scores
    assert [s["response"] for s in http_samples] == [s["response"] for s in samples]
    assert over_http["metrics"] == results["metrics"]
    assert (over_http["lm_eval_model"], over_http["model"]) == ("local-chat-completions", "tiny")

    # --resume: every reply is cached, so the model is not asked again
    monkeypatch.setattr(QtLM, "generate_until", lambda *a, **k: pytest.fail("a cached reply was asked again"))
    args = ["ifeval", str(long_ckpt), "--max-length", "1024", "--out", str(tmp_path / "qt"), *QUICK]
    assert eval_main([*args, "--resume"]) == 0
    assert read_run(tmp_path / "qt")[0]["metrics"] == results["metrics"]
    # a different model does not take over a run's replies
    assert eval_main(["ifeval", "SmolLM2-135M-Instruct", "--out", str(tmp_path / "qt"), "--resume", *QUICK]) == 2


def test_ifeval_unreachable_url_fails_first(capsys):
    assert eval_main(["ifeval", "--url", "http://127.0.0.1:9", "--limit", "1"]) == 2
    assert "cannot reach an OpenAI-compatible server at http://127.0.0.1:9" in capsys.readouterr().err
