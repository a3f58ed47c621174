"""The functional forms of reward-model over-optimisation (Gao, Schulman and Hilton 2023).

Gold reward gained over the initial policy, as a function of ``d = sqrt(KL(pi || pi_init))``
(nats per response), follows

- best-of-n:  ``R_bon(d) = d (alpha - beta d)``, where ``KL_bon = log n - (n - 1)/n``;
- RL (PPO):   ``R_rl(d)  = d (alpha - beta log d)``.

Both are linear in ``(alpha, beta)``, so ``fit`` is an ordinary least-squares solve (float64)
with no starting point and no iterations. ``alpha`` is the initial slope (how fast the proxy's
signal turns into gold), ``beta`` how fast over-optimisation eats it; ``peak`` is the ``d`` of
the most gold, where optimising the proxy further starts to lose gold.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

FORMS = ("bon", "rl")


def _basis(d: np.ndarray, form: str) -> np.ndarray:
    """Columns multiplying ``alpha`` and ``beta``: ``[d, -d^2]`` or ``[d, -d log d]``."""
    if form not in FORMS:
        raise ValueError(f"form={form!r}: expected one of {FORMS}")
    if np.any(d < 0):
        raise ValueError("d = sqrt(KL) must be >= 0")
    # d log d -> 0 as d -> 0: the curve starts at the initial policy's reward.
    second = d**2 if form == "bon" else d * np.log(np.where(d > 0, d, 1.0))
    return np.stack([d, -second], axis=1)


def curve(d, alpha: float, beta: float, form: str) -> np.ndarray:
    """``R(d)`` of ``form`` ("bon" or "rl") at the given ``d = sqrt(KL)`` values."""
    d = np.asarray(d, np.float64)
    return (_basis(d.reshape(-1), form) @ np.array([alpha, beta])).reshape(d.shape)


class Fit(NamedTuple):
    """The two coefficients of a fitted form: ``R(d) = d (alpha - beta f(d))``."""

    alpha: float
    beta: float


def fit(d, gain, form: str) -> Fit:
    """``(alpha, beta)`` of ``form`` by least squares on points ``(d_i, gain_i)``: ``d`` the
    square root of each policy's KL to the initial policy, ``gain`` its gold minus the initial
    policy's. Needs two points with distinct ``d > 0`` (the initial policy, d = 0, adds none)."""
    d = np.asarray(d, np.float64).reshape(-1)
    gain = np.asarray(gain, np.float64).reshape(-1)
    if d.shape != gain.shape:
        raise ValueError(f"fit: {d.size} values of d for {gain.size} gains")
    if len(np.unique(d[d > 0])) < 2:
        raise ValueError("fit: needs at least two distinct d > 0")
    (alpha, beta), *_ = np.linalg.lstsq(_basis(d, form), gain, rcond=None)
    return Fit(float(alpha), float(beta))


def peak(alpha: float, beta: float, form: str) -> float:
    """The ``d`` of the most gold: ``alpha / (2 beta)`` (bon) or ``exp(alpha / beta - 1)`` (rl),
    where ``dR/dd = 0``; ``inf`` when ``beta <= 0`` (gold never turns down)."""
    if form not in FORMS:
        raise ValueError(f"form={form!r}: expected one of {FORMS}")
    if beta <= 0:
        return math.inf
    return alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)


def best_of_n_curve(proxy, gold, ns) -> dict[int, tuple[float, float]]:
    """``{n: (gold, proxy)}``: the mean gold and proxy score of best-of-n for each ``n`` in
    ``ns``, from ``M`` candidates per prompt drawn once (``proxy``, ``gold``: [N, M]). Each
    prompt's M candidates are cut into ``M // n`` disjoint groups of n in their drawn order, the
    proxy's favourite of each group (the first of equal scores) is kept, and the picks are
    averaged: an unbiased estimate of best-of-n's expected gold from one draw of M, as Gao et al.
    do, instead of M more samples per n. Every ``n`` must divide ``M``."""
    proxy, gold = np.asarray(proxy, np.float64), np.asarray(gold, np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 2:
        raise ValueError(
            f"best_of_n_curve: proxy {proxy.shape} and gold {gold.shape} must be [N, M]"
        )
    N, M = proxy.shape
    out = {}
    for n in ns:
        if n < 1 or M % n:
            raise ValueError(f"best_of_n_curve: n={n} does not divide the {M} candidates")
        p, g = proxy.reshape(N, M // n, n), gold.reshape(N, M // n, n)
        pick = np.argmax(p, axis=2)[..., None]
        out[n] = (
            float(np.take_along_axis(g, pick, 2).mean()),
            float(np.take_along_axis(p, pick, 2).mean()),
        )
    return out
