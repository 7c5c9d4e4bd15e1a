"""Moment rules ``phi_t`` / ``psi_t`` of Table 1, one pure function per base optimizer.

Each rule maps ``(g, g2, states, step, hp)`` to ``(m_t, new_states, sigma_t)`` where

- ``g`` is the gradient rows ``[G, d]`` and ``g2`` the quantity the second moment accumulates:
  ``g*g`` element-wise, its row mean ``[G, 1]`` for a row-wise second moment, or the squared
  Hutchinson Hessian diagonal ``D_t^2`` for AdaHessian;
- ``states`` is the tuple of the rule's state tensors, in the order of ``MomentRule.state_names``;
- ``step`` is the (global) step ``t >= 1``; ``hp`` the param group's hyperparameters. Both may be
  Python numbers or 0-d tensors;
- ``sigma_t = sqrt(V_t) / alpha_t`` is the diagonal of ``sum_s Q_s/alpha_s`` (line 5 of
  Algorithm 1), with the epsilon placed exactly where the corresponding ``torch.optim`` optimizer
  places it, so that Theorem 2 holds against ``torch.optim`` (see ``docs/optimizers.md``).

No rule mutates its inputs: the callers (dense optimizers, lazy rows, the fused TorchRec kernel)
decide where the results are written.

============  =========================  ==============================  =============================
rule          m_t                        state                           sigma_t
============  =========================  ==============================  =============================
sgd           g                          --                              sqrt(t) / lr
momentum      buf = gamma*buf + g        momentum_buffer                 1 / lr
adagrad       g                          sum += g^2                      (sqrt(sum) + eps) / clr
adam          exp_avg / (1-b1^t)         exp_avg, exp_avg_sq             (sqrt(v/(1-b2^t)) + eps) / lr
amsgrad       exp_avg / (1-b1^t)         + max_exp_avg_sq = max(.., v)   (sqrt(vmax/(1-b2^t))+eps)/lr
adahessian    exp_avg / (1-b1^t)         exp_avg, exp_avg_hessian_sq     ((v/(1-b2^t))^(k/2)+eps)/lr
============  =========================  ==============================  =============================

``clr = lr / (1 + (t-1) * lr_decay)`` as in ``torch.optim.Adagrad``; ``k`` is ``hessian_power``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MomentRule", "RULES", "get_rule"]


@dataclass(frozen=True)
class MomentRule:
    """A base optimizer's moment rule and the names/shapes of its state."""

    name: str
    #: state tensors, in the order ``update`` takes and returns them
    state_names: tuple[str, ...]
    #: the subset of ``state_names`` that is one float per row under ``rowwise=True``
    second_moment_names: tuple[str, ...]
    update: Callable
    #: whether the rule consumes ``g2`` (has a second moment at all)
    uses_g2: bool = True


def _sgd(g, g2, states, step, hp):
    return g, (), step**0.5 / hp["lr"] + torch.zeros_like(g[:, :1])


def _momentum(g, g2, states, step, hp):
    (buf,) = states
    buf = hp["momentum"] * buf + g
    return buf, (buf,), 1.0 / hp["lr"] + torch.zeros_like(g[:, :1])


def _adagrad(g, g2, states, step, hp):
    (acc,) = states
    acc = acc + g2
    clr = hp["lr"] / (1.0 + (step - 1.0) * hp["lr_decay"])
    return g, (acc,), (torch.sqrt(acc) + hp["eps"]) / clr


def _bias_corrections(step, hp):
    beta1, beta2 = hp["betas"]
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5


def _adam(g, g2, states, step, hp):
    beta1, beta2 = hp["betas"]
    exp_avg, exp_avg_sq = states
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * g2
    bc1, bc2_sqrt = _bias_corrections(step, hp)
    sigma = (torch.sqrt(exp_avg_sq) / bc2_sqrt + hp["eps"]) / hp["lr"]
    return exp_avg / bc1, (exp_avg, exp_avg_sq), sigma


def _amsgrad(g, g2, states, step, hp):
    beta1, beta2 = hp["betas"]
    exp_avg, exp_avg_sq, max_exp_avg_sq = states
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * g2
    max_exp_avg_sq = torch.maximum(max_exp_avg_sq, exp_avg_sq)
    bc1, bc2_sqrt = _bias_corrections(step, hp)
    sigma = (torch.sqrt(max_exp_avg_sq) / bc2_sqrt + hp["eps"]) / hp["lr"]
    return exp_avg / bc1, (exp_avg, exp_avg_sq, max_exp_avg_sq), sigma


def _adahessian(g, g2, states, step, hp):
    # g2 is D_t^2, the squared Hutchinson estimate of diag(H_t) (AdaHessian, Yao et al. 2021)
    beta1, beta2 = hp["betas"]
    exp_avg, exp_hessian_sq = states
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * g
    exp_hessian_sq = beta2 * exp_hessian_sq + (1.0 - beta2) * g2
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    k = hp["hessian_power"]
    sigma = ((exp_hessian_sq / bc2) ** (k / 2.0) + hp["eps"]) / hp["lr"]
    return exp_avg / bc1, (exp_avg, exp_hessian_sq), sigma


RULES: dict[str, MomentRule] = {
    r.name: r
    for r in (
        MomentRule("sgd", (), (), _sgd, uses_g2=False),
        MomentRule("momentum", ("momentum_buffer",), (), _momentum, uses_g2=False),
        MomentRule("adagrad", ("sum",), ("sum",), _adagrad),
        MomentRule("adam", ("exp_avg", "exp_avg_sq"), ("exp_avg_sq",), _adam),
        MomentRule(
            "amsgrad",
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
            ("exp_avg_sq", "max_exp_avg_sq"),
            _amsgrad,
        ),
        MomentRule(
            "adahessian", ("exp_avg", "exp_hessian_diag_sq"), ("exp_hessian_diag_sq",), _adahessian
        ),
    )
}


def get_rule(name: str) -> MomentRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"Unknown base optimizer {name!r}; valid: {sorted(RULES)}") from None


def zero_moment_like(rule: MomentRule, name: str, rows: Tensor, rowwise: bool, init: float = 0.0):
    """A fresh state tensor for ``name``: like ``rows`` (``[G, d]``), or ``[G, 1]`` if row-wise."""
    if rowwise and name in rule.second_moment_names:
        return torch.full_like(rows[:, :1], init, memory_format=torch.contiguous_format)
    return torch.full_like(rows, init, memory_format=torch.contiguous_format)
