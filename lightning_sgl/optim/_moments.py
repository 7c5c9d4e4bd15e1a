"""Moment rules ``phi_t`` / ``psi_t`` of Table 1, one pure function per base optimizer.

Each rule has ``update(g, g2, states, step, hp) -> (m_t, new_states)`` and
``sigma(states, step, hp, like) -> sigma_t`` (evaluated on the updated states, so the prox can be
re-applied later without a gradient), where

- ``g`` is the gradient rows ``[G, d]`` and ``g2`` what the second moment adds this step,
  already multiplied by the rule's ``sq_weight`` (Adam's ``1 - beta2``) in ``torch.optim``'s
  order, ``(w * h) * h``: ``h = g`` element-wise, the row mean ``[G, 1]`` for a row-wise second
  moment, or the Hutchinson Hessian diagonal ``h = D_t`` for AdaHessian (see
  ``_functional.second_moment_input``). Weighting before squaring keeps every square that
  ``torch.optim`` can represent finite here too;
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

__all__ = ["MomentRule", "RULES", "get_rule", "step_scalars"]


@dataclass(frozen=True)
class MomentRule:
    """A base optimizer's moment rule and the names/shapes of its state."""

    name: str
    #: state tensors, in the order ``update`` takes and returns them
    state_names: tuple[str, ...]
    #: the subset of ``state_names`` that is one float per row under ``rowwise=True``
    second_moment_names: tuple[str, ...]
    #: ``(g, g2, states, step, hp) -> (m_t, new_states)``
    update: Callable
    #: ``(states, step, hp, like) -> sigma_t``, from the states after the update
    sigma: Callable
    #: whether the rule consumes ``g2`` (has a second moment at all)
    uses_g2: bool = True
    #: ``hp -> w``: the factor of the squares the second moment accumulates (``None``: 1)
    sq_weight: Callable | None = None


def _const_like(value, like):
    return value + torch.zeros_like(like[:, :1])


# --- step-dependent scalars. ``step`` is the step t (number or 0-d tensor) or the dict made by
# --- ``step_scalars`` (the compiled paths evaluate these once per step on the host instead of
# --- once per row inside the kernel); the formulas live only here.


def bias_correction(step, hp, i: int):
    """``1 - beta_i^t`` (``i`` = 1 or 2)."""
    if isinstance(step, dict):
        return step[f"bias_correction{i}"]
    return 1.0 - hp["betas"][i - 1] ** step


def bias_correction2_sqrt(step, hp):
    """``sqrt(1 - beta_2^t)``."""
    if isinstance(step, dict):
        return step["bias_correction2_sqrt"]
    return bias_correction(step, hp, 2) ** 0.5


def decayed_lr(step, hp):
    """Adagrad's ``lr / (1 + (t - 1) * lr_decay)`` (``step`` a dict without ``clr``: ``lr`` is
    per row, the formula is evaluated on the rows)."""
    if isinstance(step, dict):
        if "clr" in step:
            return step["clr"]
        step = step["t"]
    return hp["lr"] / (1.0 + (step - 1.0) * hp["lr_decay"])


def sqrt_step(step):
    """``sqrt(t)``."""
    if isinstance(step, dict):
        return step["sqrt_t"]
    return step**0.5


def step_scalars(step: float, hp: dict) -> dict:
    """Every step-dependent scalar a rule may need, from ``t`` and the hyperparameters; pass the
    result as ``step`` to ``update``/``sigma`` (same values as passing ``t`` itself)."""
    out = {"t": step, "sqrt_t": sqrt_step(step)}
    if "betas" in hp:
        out["bias_correction1"] = bias_correction(step, hp, 1)
        out["bias_correction2"] = bias_correction(step, hp, 2)
        out["bias_correction2_sqrt"] = bias_correction2_sqrt(step, hp)
    if "lr_decay" in hp and "lr" in hp:  # (a per-row lr: decayed_lr evaluates it per row)
        out["clr"] = decayed_lr(step, hp)
    return out


# --- each rule: update(g, g2, states, step, hp) -> (m_t, new_states);
# ---            sigma(states, step, hp, like) -> sqrt(V_t)/alpha_t from the (updated) states


def _sgd_update(g, g2, states, step, hp):
    return g, ()


def _sgd_sigma(states, step, hp, like):
    return _const_like(sqrt_step(step) / hp["lr"], like)


def _momentum_update(g, g2, states, step, hp):
    (buf,) = states
    buf = hp["momentum"] * buf + g
    return buf, (buf,)


def _momentum_sigma(states, step, hp, like):
    return _const_like(1.0 / hp["lr"], like)


def _adagrad_update(g, g2, states, step, hp):
    (acc,) = states
    return g, (acc + g2,)  # g2 = g * g


def _adagrad_sigma(states, step, hp, like):
    (acc,) = states
    return (torch.sqrt(acc) + hp["eps"]) / decayed_lr(step, hp)


def _adam_update(g, g2, states, step, hp):
    beta1, beta2 = hp["betas"]
    exp_avg, exp_avg_sq = states[:2]
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + g2  # g2 = ((1 - beta2) * g) * g
    return exp_avg / bias_correction(step, hp, 1), (exp_avg, exp_avg_sq)


def _adam_sigma(states, step, hp, like):
    return (torch.sqrt(states[1]) / bias_correction2_sqrt(step, hp) + hp["eps"]) / hp["lr"]


def _amsgrad_update(g, g2, states, step, hp):
    m, (exp_avg, exp_avg_sq) = _adam_update(g, g2, states, step, hp)
    return m, (exp_avg, exp_avg_sq, torch.maximum(states[2], exp_avg_sq))


def _amsgrad_sigma(states, step, hp, like):
    return (torch.sqrt(states[2]) / bias_correction2_sqrt(step, hp) + hp["eps"]) / hp["lr"]


def _adahessian_sigma(states, step, hp, like):
    # states[1] accumulates D_t^2, the squared Hutchinson estimate of diag(H_t)
    return ((states[1] / bias_correction(step, hp, 2)) ** (hp["hessian_power"] / 2.0) + hp["eps"]) / hp["lr"]


def _one_minus_beta2(hp):
    return 1.0 - hp["betas"][1]


RULES: dict[str, MomentRule] = {
    r.name: r
    for r in (
        MomentRule("sgd", (), (), _sgd_update, _sgd_sigma, uses_g2=False),
        MomentRule("momentum", ("momentum_buffer",), (), _momentum_update, _momentum_sigma,
                   uses_g2=False),
        MomentRule("adagrad", ("sum",), ("sum",), _adagrad_update, _adagrad_sigma),
        MomentRule("adam", ("exp_avg", "exp_avg_sq"), ("exp_avg_sq",), _adam_update, _adam_sigma,
                   sq_weight=_one_minus_beta2),
        MomentRule("amsgrad", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                   ("exp_avg_sq", "max_exp_avg_sq"), _amsgrad_update, _amsgrad_sigma,
                   sq_weight=_one_minus_beta2),
        MomentRule("adahessian", ("exp_avg", "exp_hessian_diag_sq"), ("exp_hessian_diag_sq",),
                   _adam_update, _adahessian_sigma, sq_weight=_one_minus_beta2),
    )
}


def get_rule(name: str) -> MomentRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"Unknown base optimizer {name!r}; valid: {sorted(RULES)}") from None
