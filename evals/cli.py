"""`qt-eval` and `qt-bench`: measurements from the command line."""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    from evals import arena

    ap = argparse.ArgumentParser(prog="qt-eval", description="Evaluate models and read human-eval results.")
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("arena", help="the arena leaderboard (Bradley-Terry ratings, win rates) from its votes")
    a.add_argument("db", help="the arena's SQLite file (qt-serve --arena-db; default $QT_HOME/arena.sqlite)")
    a.add_argument("--rounds", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    a.add_argument("--json", default=None, help="also write the table as JSON here")
    a.add_argument("--plot", default=None, help="also plot the ratings with intervals to this PNG")
    a.set_defaults(run=arena.main)
    args = ap.parse_args(argv)
    return args.run(args)


def eval_main(argv=None) -> int:
    from qt_serve.cli import run

    return run(lambda: main(argv))


def bench_main(argv=None) -> int:
    from qt_serve.cli import run

    from evals import bench

    return run(lambda: bench.main(argv))
