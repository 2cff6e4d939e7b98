"""The chat page and the arena in a real headless Chromium (Debian's `chromium`, driven by Playwright),
against a real `qt-serve` process holding two tiny test models."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest
import torch

CHROMIUM = os.environ.get("QT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    if os.environ.get("QT_REQUIRE_BROWSER"):
        raise RuntimeError(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set QT_CHROMIUM)")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set QT_CHROMIUM)",
                allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402 (after the skip when it is missing)

CTX = 1024  # long enough that a greedy reply is still streaming when Stop is pressed
# Bounded, so that the random model's reply ends: it writes whatever the schema allows.
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "unit", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QtServe:
    """`qt-serve` as a user runs it: a subprocess on a real port."""

    def __init__(self, ckpt, home, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(home / f"serve-{self.port}.log", "w")
        self.args = [sys.executable, "-m", "qt_serve.cli_serve", "--model", f"a={ckpt}", "--model", f"b={ckpt}",
                     "--max-model-len", str(CTX), "--port", str(self.port), "--arena-db", str(home / "votes.sqlite"),
                     "--log-level", "warning", *extra]
        self.env = {**os.environ, "QT_HOME": str(home)}
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, open(self.log.name).read()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(open(self.log.name).read())

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()

    def in_flight(self, headers=None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers).text
        return sum(float(v) for v in re.findall(r'^qt_kv_slots_in_use\{model="\w+"\} (\S+)', text, re.MULTILINE))

    def prompt_tokens(self) -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(v) for v in re.findall(r'^qt_prompt_tokens_total\{model="\w+"\} (\S+)', text, re.MULTILINE))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import build_tokenizer, tiny_model

    from qt_serve.checkpoint import save_checkpoint

    tok = build_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=CTX, output_bias=True)
    with torch.no_grad():  # a model that never ends a reply by itself, so Stop always has something to stop
        model.lm_head.bias.zero_()
        model.lm_head.bias[[model.config.eos_token_id, tok.eos_id]] = -1e4
    return save_checkpoint(tmp_path_factory.mktemp("m") / "tiny", model, tok)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    srv = QtServe(ckpt, tmp_path_factory.mktemp("home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.set_default_timeout(30_000)
    yield pg
    pg.close()


def send(page, text: str):
    box = page.locator("#msg textarea")
    box.fill(text)
    box.press("Enter")


def set_number(page, elem_id: str, value):
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def bot(page):
    return page.locator('#chat [data-testid="bot"]')


def test_chat_streams_a_reply(server, page):
    page.goto(server.url + "/")
    page.locator("#chat").wait_for()
    # Record the reply's length at every change the browser renders.
    page.evaluate("""() => { window.qtLengths = [];
        new MutationObserver(() => { const m = document.querySelectorAll('#chat [data-testid="bot"]');
            if (m.length) window.qtLengths.push(m[m.length - 1].innerText.length); })
        .observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true}); }""")
    set_number(page, "temperature", 0)
    set_number(page, "max-tokens", 400)
    send(page, "To be, or not to be")
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(1)
    expect(bot(page).last).to_contain_text("TTFT", timeout=60_000)
    lengths = page.evaluate("window.qtLengths")
    assert len(set(lengths)) >= 5, f"the reply did not arrive piece by piece: {lengths}"
    assert len(bot(page).last.inner_text()) > 50
    assert page.locator("#msg textarea").input_value() == ""


def test_stop_cancels_on_the_server(server, page):
    page.goto(server.url + "/")
    set_number(page, "temperature", 0)
    set_number(page, "max-tokens", CTX - 100)
    send(page, "Stop me")
    deadline = time.time() + 30
    while server.in_flight() < 1 or not bot(page).count() or len(bot(page).last.inner_text()) < 20:
        assert time.time() < deadline, "the reply never started streaming"
        time.sleep(0.05)
    page.locator("#stop").click()
    deadline = time.time() + 10
    while server.in_flight() > 0:
        assert time.time() < deadline, "Stop did not free the server's slot"
        time.sleep(0.1)
    expect(page.locator("#status")).to_contain_text("stopped")
    stopped = bot(page).last.inner_text()
    assert "TTFT" not in stopped, stopped[-80:]  # cut short: no stats footer
    time.sleep(0.5)
    assert bot(page).last.inner_text() == stopped  # and nothing more arrives
    # The chat stays usable: the next message gets a whole reply.
    set_number(page, "max-tokens", 20)
    send(page, "Again")
    expect(bot(page)).to_have_count(2)
    expect(bot(page).last).to_contain_text("TTFT", timeout=30_000)


def test_empty_message_is_ignored(server, page):
    page.goto(server.url + "/")
    before = server.prompt_tokens()
    send(page, "   ")
    page.locator("#send").click()
    time.sleep(1.0)
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(0)
    assert server.prompt_tokens() == before  # no request reached the model


def test_message_past_the_context_shows_the_error(server, page):
    page.goto(server.url + "/")
    send(page, "the slings and arrows " * 400)
    expect(page.locator("#status")).to_contain_text(f"this model's context is {CTX} tokens", timeout=30_000)
    assert bot(page).count() == 0
    set_number(page, "max-tokens", 10)  # and the chat goes on: the new message replaces the unanswered one
    send(page, "Short one")
    expect(bot(page).last).to_contain_text("TTFT", timeout=30_000)
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(1)


def test_arena_vote_updates_and_persists_the_leaderboard(server, page):
    page.goto(server.url + "/arena/")
    page.locator("#arena-prompt textarea").fill("Which is better?")
    page.locator("#arena-send").click()
    expect(page.locator("#vote-a")).to_be_enabled(timeout=60_000)
    assert page.locator("#reply-a").inner_text().strip() and page.locator("#reply-b").inner_text().strip()
    page.locator("#vote-reason textarea").fill("clearer")
    page.locator("#vote-a").click()
    expect(page.locator("#arena-result")).to_contain_text("A was")
    expect(page.locator("#vote-a")).to_be_disabled()
    with sqlite3.connect(server.args[server.args.index("--arena-db") + 1]) as db:
        prompt, winner, reason, a, b = db.execute(
            "SELECT prompt, winner, reason, model_a, model_b FROM votes").fetchone()
    assert (prompt, winner, reason) == ("Which is better?", "a", "clearer") and {a, b} == {"a", "b"}
    for again in (False, True):  # the board after the vote, and after a reload (persisted)
        if again:
            page.reload()
        page.get_by_role("tab", name="Leaderboard").click()
        expect(page.locator("#board-summary")).to_contain_text("1 votes")
        # The model shown as A won: it ranks first with 1 win; the other is second with 1 loss.
        deadline = time.time() + 15
        while True:  # the table fills in a moment after the summary
            cells = [c.strip() for c in page.locator("#board").inner_text().split("\n") if c.strip()]
            header, rows = cells[:9], [cells[i:i + 9] for i in range(9, len(cells), 9)]
            if len(rows) == 2 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert header[:2] == ["rank", "model"] and header[5] == "wins" and header[7] == "losses"
        assert [r[:2] for r in rows] == [["1", a], ["2", b]]
        assert rows[0][5] == "1" and rows[1][7] == "1" and float(rows[0][2]) > float(rows[1][2])


def test_two_tabs_vote_at_once(server, browser):
    db = server.args[server.args.index("--arena-db") + 1]
    tabs = [browser.new_page() for _ in range(2)]
    try:
        for i, tab in enumerate(tabs):
            tab.goto(server.url + "/arena/")
            tab.locator("#arena-prompt textarea").fill(f"Tab {i} asks")
            tab.locator("#arena-send").click()
        for tab in tabs:
            expect(tab.locator("#vote-b")).to_be_enabled(timeout=60_000)
        for tab in tabs:  # both clicks go out before either vote is answered
            tab.locator("#vote-b").click(no_wait_after=True)
        for tab in tabs:
            expect(tab.locator("#arena-result")).to_contain_text("B was")
    finally:
        for tab in tabs:
            tab.close()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT prompt, winner FROM votes WHERE prompt LIKE 'Tab %' ORDER BY prompt").fetchall()
    assert rows == [("Tab 0 asks", "b"), ("Tab 1 asks", "b")]


def test_server_restart_mid_reply(ckpt, tmp_path, browser):
    srv = QtServe(ckpt, tmp_path)
    pg = browser.new_page()
    try:
        pg.goto(srv.url + "/")
        set_number(pg, "temperature", 0)
        set_number(pg, "max-tokens", CTX - 100)
        send(pg, "Keep talking")
        while not bot(pg).count() or len(bot(pg).last.inner_text()) < 20:
            time.sleep(0.05)
        srv.kill()
        expect(pg.get_by_text("Connection to the server was lost")).to_be_visible(timeout=30_000)
        srv.start()
        # Gradio reloads the page once the server is back; the conversation comes back from the browser.
        expect(pg.get_by_text("Connection to the server was lost")).to_have_count(0, timeout=60_000)
        expect(pg.locator('#chat [data-testid="user"]').first).to_contain_text("Keep talking", timeout=30_000)
        set_number(pg, "max-tokens", 10)
        send(pg, "Back again")
        expect(pg.locator('#chat [data-testid="user"]').last).to_contain_text("Back again", timeout=30_000)
        expect(bot(pg).last).to_contain_text("TTFT", timeout=60_000)
    finally:
        pg.close()
        srv.stop()


def test_page_asks_for_the_api_key(ckpt, tmp_path, browser):
    srv = QtServe(ckpt, tmp_path, "--api-key", "sekret")
    pg = browser.new_page()
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        pg.goto(srv.url + "/")
        pg.get_by_label("username").fill("me")
        pg.get_by_label("password").fill("sekret")
        pg.get_by_role("button", name="Login").click()
        send(pg, "Hello")
        expect(bot(pg).last).to_contain_text("TTFT", timeout=60_000)
    finally:
        pg.close()
        srv.stop()


def structured(page, reply_format: str | None = None, schema: str | None = None, tools: str | None = None,
               choice: str | None = None):
    """Set the "Structured output" fields given (the accordion opened first if it is closed)."""
    if not page.locator("#reply-format").is_visible():
        page.get_by_role("button", name="Structured output").click()
    if reply_format is not None:
        page.locator("#reply-format").get_by_label(reply_format, exact=True).check()
    if schema is not None:
        page.locator("#schema textarea").fill(schema)
    if tools is not None:
        page.locator("#tools textarea").fill(tools)
    if choice is not None:
        page.locator("#tool-choice").get_by_label(choice, exact=True).check()


def api_reply(server, messages, **fields) -> dict:
    """The same greedy request through the API: the reference for what the page shows."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "a", "messages": messages, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


def follow_up_prompt(server, page, history: list[dict], text: str) -> None:
    """Send `text` and check the prompt the model got, token for token, is `history` as the model wrote
    it (not as shown) and the new message: what /tokenize counts for those messages."""
    before = server.prompt_tokens()
    set_number(page, "max-tokens", 4)
    send(page, text)
    expect(bot(page)).to_have_count(2)
    expect(bot(page).last).to_contain_text("TTFT", timeout=30_000)
    want = httpx.post(server.url + "/tokenize", json={"model": "a", "messages": history + [
        {"role": "user", "content": text}]}).json()["count"]
    assert server.prompt_tokens() - before == want


def test_json_schema_reply_is_shown_as_valid_json(server, page):
    page.goto(server.url + "/")
    set_number(page, "temperature", 0)
    structured(page, "JSON schema", schema='{"type": "object",')
    send(page, "Weather in Paris?")
    expect(page.locator("#status")).to_contain_text("the JSON schema is not valid JSON")
    expect(page.get_by_text("the JSON schema is not valid JSON").first).to_be_visible()  # the warning
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(1)  # the message is kept
    assert bot(page).count() == 0
    structured(page, schema=json.dumps(SCHEMA))
    page.locator("#regenerate").click()  # answers the kept message
    expect(bot(page).last).to_contain_text("TTFT", timeout=60_000)
    shown = bot(page).last.locator("code").inner_text()
    value = json.loads(shown)
    jsonschema.validate(value, SCHEMA)
    assert "\n  " in shown  # pretty-printed
    fmt = {"type": "json_schema", "json_schema": {"name": "page", "schema": SCHEMA, "strict": True}}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    written = api_reply(server, ask, response_format=fmt)["content"]
    assert json.loads(written) == value
    structured(page, "Text")
    follow_up_prompt(server, page, ask + [{"role": "assistant", "content": written}], "And in Oslo?")


def test_tool_call_is_shown_with_its_name(server, page):
    page.goto(server.url + "/")
    set_number(page, "temperature", 0)
    structured(page, tools=json.dumps([{"type": "function", "function": {"name": "bad name"}}]), choice="required")
    send(page, "Weather in Paris?")
    expect(page.locator("#status")).to_contain_text("must be 1-64 letters")  # the server's own check
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(1)
    structured(page, tools=json.dumps([WEATHER]))
    page.locator("#regenerate").click()
    expect(bot(page).last).to_contain_text("TTFT", timeout=60_000)
    expect(bot(page).last).to_contain_text("Tool call: get_weather")
    args = json.loads(bot(page).last.locator("code").inner_text())
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    (call,) = api_reply(server, ask, tools=[WEATHER], tool_choice="required")["tool_calls"]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("get_weather", args)
    # The call goes back to the model in the form it wrote it (tools.py's Hermes form), not as shown.
    written = "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": args}, ensure_ascii=False) + "\n</tool_call>"
    structured(page, choice="none")  # no tool prompt: the prompt is the history alone, as /tokenize sees it
    follow_up_prompt(server, page, ask + [{"role": "assistant", "content": written}], "Thanks")
