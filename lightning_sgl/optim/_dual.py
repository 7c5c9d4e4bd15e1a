"""The dual update of Algorithm 1 (lines 5-6), as pure functions.

Algorithm 1 keeps ``z_t = z_{t-1} + m_t - (Q_t/alpha_t) x_t`` with
``Q_t/alpha_t = sigma_t - sigma_{t-1}`` and ``sigma_t = sqrt(V_t)/alpha_t``. We store the dual in the
*shifted* form

.. math::  u_t = z_t + \\sigma_t\\, x_{t+1}

(state key ``"dual"``). Then line 6 reads ``z_t = u_{t-1} + m_t - sigma_t x_t``: the update needs
only the current ``sigma_t``, never ``sigma_{t-1}``. The two forms are algebraically identical, but
the shifted one stays exact when

- a row is updated lazily (sparse gradients, fused tables): its previous ``sigma`` belongs to the
  step at which it was last touched, which no global quantity can reproduce;
- the learning rate changes between steps (schedulers): ``alpha_{t-1}`` need not be remembered.

With all lambdas zero, ``u_t`` is 0 up to rounding and ``x_{t+1} = x_t - m_t/sigma_t`` (Theorem 2).
``z_t`` itself is ``u_t - sigma_t x_{t+1}`` (see :func:`dual_to_z`).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["dual_update", "dual_carry", "dual_to_z"]


def dual_update(dual: Tensor, m: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
    """Line 6: ``z_t = u_{t-1} + m_t - sigma_t * x_t``."""
    return dual + m - sigma * x


def dual_carry(z: Tensor, sigma: Tensor, x_new: Tensor) -> Tensor:
    """The stored dual after the step: ``u_t = z_t + sigma_t * x_{t+1}``."""
    return z + sigma * x_new


def dual_to_z(dual: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
    """Recover the paper's ``z_t`` from the stored dual ``u_t`` and ``x_{t+1}``."""
    return dual - sigma * x
