"""`qt-eval arena DB`: the arena's leaderboard from its SQLite votes, as on the page's Leaderboard tab.

    qt-eval arena ~/.cache/qt/arena.sqlite                 # table + win-rate matrix
    qt-eval arena votes.sqlite --json board.json --plot board.png
"""

from __future__ import annotations

import json
from pathlib import Path

from app import ratings
from app.votes import VoteStore
from qt_serve.errors import QtError


def table(rows: list[dict]) -> str:
    head = ["rank", "model", "rating", "95% CI", "votes", "W", "T", "L", "win rate"]
    body = [[str(i + 1), r["model"], f"{r['rating']:.1f}", f"{r['ci_low']:.1f} – {r['ci_high']:.1f}",
             str(r["votes"]), str(r["wins"]), str(r["ties"]), str(r["losses"]), f"{r['win_rate']:.3f}"]
            for i, r in enumerate(rows)]
    return grid(head, body)


def grid(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[::-1]  # best on top
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.2))
    y = range(len(rows))
    ax.errorbar([r["rating"] for r in rows], y, fmt="o",
                xerr=[[r["rating"] - r["ci_low"] for r in rows], [r["ci_high"] - r["rating"] for r in rows]])
    ax.set_yticks(list(y), [f"{r['model']} ({r['votes']})" for r in rows])
    ax.set_xlabel("Bradley-Terry rating (Elo scale), 95% bootstrap CI")
    ax.set_title("qt arena")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    db = Path(args.db)
    if not db.exists():
        raise QtError(f"{db} does not exist: give the SQLite file qt-serve wrote (--arena-db; "
                      "default $QT_HOME/arena.sqlite)")
    votes = VoteStore(db).all()
    if not votes:
        print(f"{db}: no votes yet")
        return 0
    rows = ratings.leaderboard(votes, rounds=args.rounds)
    print(f"{len(votes)} votes in {db}\n")
    print(table(rows))
    names, m = ratings.win_matrix(ratings.battles_of(votes))
    print("\nwin rate of row vs column (ties count half):\n")
    print(grid(["model"] + names, [[a] + ["—" if x is None else f"{x:.2f}" for x in row] for a, row in zip(names, m)]))
    if args.json:
        Path(args.json).write_text(json.dumps({"votes": len(votes), "leaderboard": rows,
                                               "win_matrix": {"models": names, "rates": m}}, indent=2) + "\n")
    if args.plot:
        plot(rows, Path(args.plot))
    return 0
