"""Gao et al.'s over-optimisation forms: hand values, recovery of known parameters from synthetic
curves, and the peak against a grid search."""

import math

import numpy as np
import pytest

from rlhf_jax import overoptimization as oo


def test_curves_hand_worked():
    # bon, alpha 1, beta 0.25: d (1 - d/4) at d = 0, 1, 2 -> 0, 0.75, 1.0.
    np.testing.assert_allclose(oo.curve([0.0, 1.0, 2.0], 1.0, 0.25, "bon"), [0.0, 0.75, 1.0])
    # rl, alpha 1, beta 0.5: d (1 - log(d)/2) at d = 0, 1, e -> 0, 1, e/2.
    np.testing.assert_allclose(
        oo.curve([0.0, 1.0, math.e], 1.0, 0.5, "rl"), [0.0, 1.0, math.e / 2], rtol=1e-15
    )
    assert oo.curve(np.ones((2, 3)), 1.0, 0.5, "rl").shape == (2, 3)


@pytest.mark.parametrize("form, alpha, beta", [("bon", 0.6, 0.12), ("rl", 0.5, 0.2)])
def test_fit_recovers_known_parameters(form, alpha, beta):
    d = np.linspace(0.0, 5.0, 41)  # from the initial policy to 25 nats, as in Gao's plots
    exact = oo.curve(d, alpha, beta, form)
    assert oo.fit(d, exact, form) == pytest.approx((alpha, beta), rel=1e-10)
    # With evaluation noise of sd 0.01 gold on every point, within a few percent.
    noisy = exact + np.random.default_rng(0).normal(0.0, 0.01, d.shape)
    a, b = oo.fit(d, noisy, form)
    assert a == pytest.approx(alpha, rel=0.05) and b == pytest.approx(beta, rel=0.05)
    # The other form fits worse: the two forms are told apart by the data.
    other = "rl" if form == "bon" else "bon"
    res = lambda f: np.sum((oo.curve(d, *oo.fit(d, noisy, f), f) - noisy) ** 2)  # noqa: E731
    assert res(form) < res(other)


@pytest.mark.parametrize("form, alpha, beta", [("bon", 0.6, 0.12), ("rl", 0.5, 0.2)])
def test_peak_is_the_argmax_of_the_curve(form, alpha, beta):
    grid = np.linspace(1e-6, 20.0, 2_000_001)
    best = grid[np.argmax(oo.curve(grid, alpha, beta, form))]
    assert oo.peak(alpha, beta, form) == pytest.approx(best, abs=1e-4)
    assert oo.peak(alpha, 0.0, form) == math.inf  # no over-optimisation: gold never turns down


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="form='gao'"):
        oo.fit([1.0, 2.0], [0.1, 0.2], "gao")
    with pytest.raises(ValueError, match="two distinct d > 0"):
        oo.fit([0.0, 1.0, 1.0], [0.0, 0.1, 0.1], "rl")
    with pytest.raises(ValueError, match=">= 0"):
        oo.fit([-1.0, 1.0, 2.0], [0.0, 0.1, 0.2], "bon")
