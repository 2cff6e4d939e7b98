"""Ratings from pairwise votes: Bradley-Terry fit on the Elo scale, bootstrap intervals, win rates.

Bradley-Terry: P(i beats j) = σ(r_i − r_j). A tie (or "both bad") counts half a win to each side,
as Chatbot Arena does. The fit maximises the log-likelihood, plus an optional Gaussian prior
−prior/2·Σr² that keeps an undefeated model's rating finite; prior=0 is the plain MLE.
Ratings are shown as 1000 + 400·log10(e)·(r − mean r), so 400 points are 10:1 odds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCALE = 400 / math.log(10)
SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "bad": 0.5}  # model A's share of each vote


@dataclass
class Battle:
    a: str
    b: str
    score: float  # A's share: 1 won, 0 lost, 0.5 tie


def battles_of(votes: list[dict]) -> list[Battle]:
    return [Battle(v["model_a"], v["model_b"], SCORE[v["winner"]]) for v in votes]


def bradley_terry(battles: list[Battle], prior: float = 0.01, iters: int = 100) -> dict[str, float]:
    """Elo-scale ratings of every model in `battles` (Newton's method on the concave log-likelihood)."""
    models = sorted({m for x in battles for m in (x.a, x.b)})
    if not models:
        return {}
    idx = {m: i for i, m in enumerate(models)}
    a = np.array([idx[x.a] for x in battles])
    b = np.array([idx[x.b] for x in battles])
    s = np.array([x.score for x in battles], dtype=np.float64)
    n = len(models)
    r = np.zeros(n)
    for _ in range(iters):
        p = 1 / (1 + np.exp(r[b] - r[a]))  # P(a beats b) per battle
        grad = np.bincount(a, s - p, n) - np.bincount(b, s - p, n) - prior * r
        w = p * (1 - p)
        hess = -prior * np.eye(n)  # H = −Σ w (e_a − e_b)(e_a − e_b)ᵀ − prior·I
        np.add.at(hess, (a, a), -w)
        np.add.at(hess, (b, b), -w)
        np.add.at(hess, (a, b), w)
        np.add.at(hess, (b, a), w)
        # Ratings are defined up to a constant: pin their mean to 0 with one extra row (a bordered system).
        k = np.block([[hess, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
        step = np.linalg.lstsq(k, np.append(-grad, -r.sum()), rcond=None)[0][:n]
        step = np.clip(step, -2.0, 2.0)  # damped: a lopsided table cannot throw Newton far off
        r += step
        if np.abs(step).max() < 1e-10:
            break
    return {m: 1000 + SCALE * (r[i] - r.mean()) for m, i in idx.items()}


def bootstrap(battles: list[Battle], rounds: int = 200, seed: int = 0, prior: float = 0.01
              ) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each rating over `rounds` resamples of the votes."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        pick = rng.integers(0, len(battles), len(battles))
        for m, v in bradley_terry([battles[i] for i in pick], prior).items():
            samples.setdefault(m, []).append(v)
    return {m: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for m, v in samples.items()}


def win_matrix(battles: list[Battle]) -> tuple[list[str], list[list[float | None]]]:
    """models, M with M[i][j] = share of i's games against j that i won (ties half); None if never met."""
    models = sorted({m for x in battles for m in (x.a, x.b)})
    idx = {m: i for i, m in enumerate(models)}
    won = np.zeros((len(models),) * 2)
    games = np.zeros_like(won)
    for x in battles:
        i, j = idx[x.a], idx[x.b]
        won[i, j] += x.score
        won[j, i] += 1 - x.score
        games[i, j] += 1
        games[j, i] += 1
    return models, [[won[i, j] / games[i, j] if games[i, j] else None for j in range(len(models))]
                    for i in range(len(models))]


def leaderboard(votes: list[dict], rounds: int = 200) -> list[dict]:
    """One row per model, best first: rating, 95% interval, vote counts, win rate."""
    battles = battles_of(votes)
    ratings = bradley_terry(battles)
    ci = bootstrap(battles, rounds) if battles else {}
    rows = []
    for m, rating in sorted(ratings.items(), key=lambda kv: -kv[1]):
        mine = [x for x in battles if m in (x.a, x.b)]
        share = [x.score if x.a == m else 1 - x.score for x in mine]
        lo, hi = ci.get(m, (rating, rating))
        rows.append({"model": m, "rating": round(rating, 1), "ci_low": round(lo, 1), "ci_high": round(hi, 1),
                     "votes": len(mine), "wins": share.count(1.0), "ties": share.count(0.5),
                     "losses": share.count(0.0), "win_rate": round(sum(share) / len(mine), 3)})
    return rows
