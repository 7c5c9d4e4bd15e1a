"""The closed-form proximal step of Algorithm 1 (lines 7-10), as pure functions.

Everything here works on a *group matrix*: a 2-D tensor whose rows are the groups (for an
embedding table, one row = one feature). Hyperparameters may be Python numbers or 0-d tensors
(the compiled path passes tensors so that a changed ``lambda21`` does not recompile).

Objective (6) of the paper restricted to one group ``g`` of size ``d`` is, with
``sigma = sqrt(V_t)/alpha_t`` (the diagonal of ``sum_s Q_s/alpha_s``) and ``A = sigma/2 + lambda2``:

.. math::
    \\min_x\\; z^\\top x + x^\\top A x + \\lambda_1 \\|x\\|_1 + \\lambda_{21}\\sqrt{d}\\,\\|A^{1/2} x\\|_2 .

Substituting ``y = A^{1/2} x`` turns it into a weighted-l1 + Euclidean-group prox whose solution is
a soft threshold followed by a radial shrink:

.. math::
    s = -\\operatorname{sign}(z)\\max(|z|-\\lambda_1, 0),\\qquad
    x = \\frac{\\max\\big(1 - \\sqrt{d}\\,\\lambda_{21}/\\|A^{-1/2}s\\|_2,\\,0\\big)\\, s}{\\sigma + 2\\lambda_2}.

The paper's Theorem 1 / Eq. (10) prints the norm as ``||A^{-1} s||``; the derivation above (and a
numerical minimisation, see ``tests/optim/test_objective.py``) gives ``||A^{-1/2} s||``. That is
what ``exact=True`` uses. The practical Algorithm 1 (the default, ``exact=False``) uses ``||s||``,
so the l21 threshold does not depend on the second moment, ``alpha`` or ``lambda2``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["soft_threshold", "group_norm", "group_shrink", "prox"]


def soft_threshold(z: Tensor, lambda1) -> Tensor:
    """Line 8 of Algorithm 1: ``s = -sign(z) * max(|z| - lambda1, 0)`` (elementwise).

    With ``lambda1 == 0`` this is exactly ``-z``.
    """
    return -torch.sign(z) * torch.clamp(z.abs() - lambda1, min=0)


def group_norm(s: Tensor, sigma: Tensor, lambda2, exact: bool, reduce_sum=None) -> Tensor:
    """Per-row l2 norm used by the group shrink, shape ``[G, 1]``.

    ``exact=False``: ``||s||`` (Algorithm 1). ``exact=True``: ``||A^{-1/2} s||`` with
    ``A = sigma/2 + lambda2`` (the true minimiser of objective (6)); a coordinate with ``A = 0``
    (``eps = 0`` and no gradient yet: then ``s = 0`` there) contributes 0. ``reduce_sum``, if
    given, sums the per-row partial squared norms over the pieces of a row held elsewhere
    (column shards).

    Overflow: a group whose sum of squares exceeds the float range (``|s|`` beyond ~1.8e19 in
    float32, ~1.3e154 in float64) has norm ``inf``; :func:`group_shrink` gives it the factor 1,
    which is what ``1 - t/norm`` rounds to whenever ``t = sqrt(d) lambda21`` is below
    ``2^-24 * norm`` (float32): exact for every ``lambda21`` below ~1e12. The prox stays finite.
    """
    if exact:
        a = sigma * 0.5 + lambda2
        s = torch.where(a > 0, s / torch.sqrt(torch.where(a > 0, a, torch.ones_like(a))),
                        torch.zeros_like(s))
    sq = torch.sum(s * s, dim=1, keepdim=True)
    return torch.sqrt(sq if reduce_sum is None else reduce_sum(sq))


def group_shrink(norm: Tensor, lambda21, group_size) -> Tensor:
    """``max(1 - sqrt(d) * lambda21 / ||s||, 0)``; exactly 0 when ``||s|| <= sqrt(d) * lambda21``.

    ``group_size`` is ``d`` (a number, or a ``[G, 1]`` tensor when rows differ). Written with
    ``where`` so that ``lambda21 == 0`` gives exactly 1 (also for a group whose norm underflows to
    0), no NaN appears for an all-zero group, and an infinite norm (a float64 group beyond the
    float range) gives 1. Computed in ``norm``'s dtype; the factor is in ``[0, 1]``.
    """
    threshold = group_size**0.5 * lambda21
    # (norm - t) / norm, not 1 - t / norm: a Python-number t / tensor is computed as
    # t * reciprocal(norm), which is 0 * inf = NaN for a subnormal norm
    factor = torch.where(torch.isinf(norm), torch.ones_like(norm), (norm - threshold) / norm)
    return torch.where(norm > threshold, factor, torch.zeros_like(norm) + (threshold == 0))


def prox(z: Tensor, sigma: Tensor, lambda1, lambda21, lambda2, exact: bool = False,
         group_size=None, reduce_sum=None, x_prev: Tensor | None = None) -> Tensor:
    """Lines 7-10 of Algorithm 1: ``x_{t+1}`` from the dual ``z_t`` and ``sigma_t = sqrt(V_t)/alpha_t``.

    ``z`` is ``[G, d]`` (rows are groups); ``sigma`` broadcasts to it (``[G, d]`` element-wise or
    ``[G, 1]`` row-wise second moment). ``group_size`` defaults to ``d``; a column shard of a
    table passes the full row width and a ``reduce_sum`` that adds the other shards' partial
    squared norms, so the shrink equals the unsharded one. Returns the new weights ``[G, d]``.

    A coordinate with ``sigma + 2*lambda2 = 0`` (only with ``eps = 0``, before its first
    gradient: then ``z = 0``) takes the limit of the step as ``eps -> 0+``: ``x_prev`` (the
    current weight, ``x_t``) times its row's shrink factor if ``lambda1 == 0``, else 0 (without
    ``x_prev``: 0). With all lambdas 0 the coordinate keeps its value, as ``torch.optim`` does.
    For finite inputs the shrink factor is finite, in ``[0, 1]`` (see :func:`group_norm`).
    """
    s = soft_threshold(z, lambda1)
    norm = group_norm(s, sigma, lambda2, exact, reduce_sum)
    factor = group_shrink(norm, lambda21, z.shape[1] if group_size is None else group_size)
    denom = sigma + 2.0 * lambda2
    x = s * factor / torch.where(denom > 0, denom, torch.ones_like(denom))
    if x_prev is None:
        fallback = torch.zeros_like(x)
    else:
        no_l1 = lambda1 == 0
        fallback = factor * x_prev if no_l1 is True else (
            torch.zeros_like(x) if no_l1 is False else
            torch.where(no_l1, factor * x_prev, torch.zeros_like(x)))
    return torch.where(denom > 0, x, fallback)
