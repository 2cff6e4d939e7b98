"""The arena's votes in SQLite (WAL mode: many readers and one writer at a time, from any thread).

One row per comparison: the prompt, both replies, which model was A and which B, the sampling
settings, the browser session and the time. The comparison id is the primary key, so a second
vote on the same comparison is refused by the database itself, whichever tab sends it.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

from qt_serve.errors import QtError

WINNERS = ("a", "b", "tie", "bad")
COLUMNS = ("id", "time", "session", "prompt", "model_a", "model_b", "reply_a", "reply_b", "winner", "reason",
           "settings")
SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id TEXT PRIMARY KEY,          -- the comparison (issued when the prompt was sent)
    time REAL NOT NULL,           -- unix seconds of the vote
    session TEXT NOT NULL,        -- the browser session that voted
    prompt TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    reply_a TEXT NOT NULL,
    reply_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'bad')),
    reason TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL        -- JSON: temperature, top_p, max_tokens, seed
)"""


class AlreadyVoted(QtError):
    pass


class VoteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise QtError(f"{self.path} is not a usable SQLite database ({e}); "
                          "point --arena-db at another file") from None

    def _connect(self) -> sqlite3.Connection:
        # A connection per call: sqlite3 connections must not cross threads, and Gradio runs
        # handlers on many. busy_timeout makes concurrent writers wait their turn, not fail.
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def add(self, vote: dict) -> None:
        if vote["winner"] not in WINNERS:
            raise QtError(f"winner must be one of {', '.join(WINNERS)}, got {vote['winner']!r}")
        row = {**vote, "time": vote.get("time") or time.time(), "reason": vote.get("reason") or "",
               "settings": json.dumps(vote.get("settings") or {}, sort_keys=True)}
        try:
            with self._connect() as db:
                db.execute(f"INSERT INTO votes ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                           [row[c] for c in COLUMNS])
        except sqlite3.IntegrityError:
            raise AlreadyVoted("this comparison already has a vote; send a new prompt to compare again") from None

    def all(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM votes ORDER BY time, id").fetchall()
        return [{**dict(r), "settings": json.loads(r["settings"])} for r in rows]

    def export(self, fmt: str, votes: list[dict] | None = None) -> str:
        """Every vote (or `votes`, already read) as CSV (settings as a JSON column) or JSON Lines."""
        votes = self.all() if votes is None else votes
        if fmt == "jsonl":
            return "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in votes)
        if fmt != "csv":
            raise QtError(f"export format must be csv or jsonl, got {fmt!r}")
        out = io.StringIO()
        w = csv.DictWriter(out, COLUMNS)
        w.writeheader()
        for v in votes:
            w.writerow({**v, "settings": json.dumps(v["settings"], sort_keys=True)})
        return out.getvalue()
