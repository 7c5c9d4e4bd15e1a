"""Theorem 1 / objective (6): the exact step is the true minimiser, found independently by scipy.

Objective (6) is built from the raw history (m_s, Q_s/alpha_s, x_s) of a Group Adagrad run,
computed in this test without the library's math:

    F(x) = m_{1:t}.x + sum_s 1/(2 alpha_s) ||Q_s^{1/2}(x - x_s)||^2 + Psi_t(x),
    Psi_t(x) = lambda1 ||x||_1 + lambda21 sqrt(d) ||A_t^{1/2} x|| + lambda2 ||x||^2,
    A_t = sum_s Q_s/(2 alpha_s) + lambda2 I.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lightning_sgl.optim import GroupAdagrad

D = 4
LR, EPS = 0.3, 1e-3


def _history_run(exact, lambdas, grads):
    p = torch.nn.Parameter(torch.tensor(np.random.default_rng(7).normal(size=(1, D)) * 0.5))
    opt = GroupAdagrad([p], lr=LR, eps=EPS, group_by="row", exact_group_norm=exact, **lambdas)
    xs, ms, sigmas = [], [], []
    acc = np.zeros(D)
    for g in grads:
        xs.append(p.detach().numpy()[0].copy())
        acc = acc + g**2
        ms.append(g.copy())
        sigmas.append((np.sqrt(acc) + EPS) / LR)  # sqrt(V_t)/alpha_t of Adagrad
        p.grad = torch.tensor(g[None, :])
        opt.step()
    return p.detach().numpy()[0], xs, ms, sigmas


def _objective(xs, ms, sigmas, lambda1, lambda21, lambda2):
    q = np.diff(np.vstack([np.zeros(D), np.array(sigmas)]), axis=0)  # Q_s / alpha_s
    m_sum = np.sum(ms, axis=0)
    a = q.sum(0) / 2 + lambda2

    def f(x):
        quad = sum(0.5 * np.sum(qs * (x - x_s) ** 2) for qs, x_s in zip(q, xs))
        psi = (lambda1 * np.abs(x).sum() + lambda21 * np.sqrt(D) * np.linalg.norm(np.sqrt(a) * x)
               + lambda2 * np.sum(x * x))
        return m_sum @ x + quad + psi

    return f, q, a


def _solve(f, starts):
    """Minimise the nonsmooth objective from several starts (Powell and Nelder-Mead), then polish."""
    best = None
    for x0 in starts:
        for method in ("Powell", "Nelder-Mead"):
            r = minimize(f, x0, method=method,
                         options=dict(xtol=1e-12, ftol=1e-14, maxiter=200000, maxfev=200000)
                         if method == "Powell" else
                         dict(xatol=1e-12, fatol=1e-14, maxiter=200000, maxfev=200000))
            if best is None or r.fun < best.fun:
                best = r
    # polish from the best point a few more times (nonsmooth objective)
    for _ in range(3):
        r = minimize(f, best.x, method="Powell", options=dict(xtol=1e-13, ftol=1e-15))
        if r.fun <= best.fun:
            best = r
    return best.x, best.fun


CASES = [
    dict(lambda1=0.0, lambda21=0.5, lambda2=0.0),
    dict(lambda1=0.05, lambda21=0.3, lambda2=0.1),
    dict(lambda1=0.2, lambda21=0.05, lambda2=0.5),
    dict(lambda1=0.0, lambda21=2.0, lambda2=0.2),  # strong enough to zero the group
    dict(lambda1=0.01, lambda21=0.8, lambda2=1.0),
]


@pytest.mark.parametrize("seed", range(len(CASES)))
def test_exact_step_is_the_minimiser_of_objective_6(seed):
    lambdas = CASES[seed]
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=D) * rng.uniform(0.2, 2.0, size=D) for _ in range(5)]
    x_ours, xs, ms, sigmas = _history_run(True, lambdas, grads)
    f, _, _ = _objective(xs, ms, sigmas, **lambdas)
    starts = [x_ours, np.zeros(D), xs[-1]] + [rng.normal(size=D) for _ in range(3)]
    x_star, f_star = _solve(f, starts)
    print(f"case {seed}: ours {x_ours}, scipy {x_star}, F ours-scipy {f(x_ours) - f_star:.2e}")
    assert np.max(np.abs(x_ours - x_star)) <= 1e-6
    assert f(x_ours) <= f_star + 1e-12


@pytest.mark.parametrize("seed", range(len(CASES)))
def test_default_step_differs_only_in_the_group_norm(seed):
    """Both variants are the closed form (8) with the same z_t; only the norm in the shrink
    differs: ||s_t|| (default, Algorithm 1) vs ||A^{-1/2} s_t|| (exact)."""
    lambdas = CASES[seed]
    rng = np.random.default_rng(100 + seed)
    grads = [rng.normal(size=D) for _ in range(4)]
    for exact in (False, True):
        x_ours, xs, ms, sigmas = _history_run(exact, lambdas, grads)
        _, q, a = _objective(xs, ms, sigmas, **lambdas)
        z = np.sum(ms, 0) - sum(qs * x_s for qs, x_s in zip(q, xs))  # z_t of Theorem 1
        s = -np.sign(z) * np.maximum(np.abs(z) - lambdas["lambda1"], 0)
        norm = np.linalg.norm(s / np.sqrt(a)) if exact else np.linalg.norm(s)
        shrink = max(1 - np.sqrt(D) * lambdas["lambda21"] / norm, 0) if norm > 0 else 0.0
        x_closed = shrink * s / (sigmas[-1] + 2 * lambdas["lambda2"])
        assert np.max(np.abs(x_ours - x_closed)) <= 1e-12


def test_printed_eq10_norm_is_not_the_minimiser():
    """The printed Eq. (10) uses ||A^{-1} s||: its step has a higher objective (6) than ours."""
    lambdas = CASES[1]
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=D) * rng.uniform(0.2, 2.0, size=D) for _ in range(5)]
    x_exact, xs, ms, sigmas = _history_run(True, lambdas, grads)
    f, q, a = _objective(xs, ms, sigmas, **lambdas)
    z = np.sum(ms, 0) - sum(qs * x_s for qs, x_s in zip(q, xs))
    s = -np.sign(z) * np.maximum(np.abs(z) - lambdas["lambda1"], 0)
    norm10 = np.linalg.norm(s / a)
    x_eq10 = max(1 - np.sqrt(D) * lambdas["lambda21"] / norm10, 0) * s / (2 * a)
    assert f(x_exact) < f(x_eq10) - 1e-9
