"""Argument checks shared by every front end (dense optimizers, fused TorchRec tables).

Each check raises ``ValueError`` naming the argument, the value and the valid range, before any
state is touched.
"""

from __future__ import annotations

import math
import numbers

import torch

GROUP_BY_OPTIONS = ("auto", "row", "column", "tensor", "none")
NONFINITE_OPTIONS = ("raise", "skip")


class NonFiniteGradientError(ValueError, FloatingPointError):
    """A gradient holds NaN or Inf; the step was refused and nothing was modified."""


def _num(v):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_positive(name: str, value) -> None:
    v = _num(value)
    if not _is_real(v) or not math.isfinite(v) or v <= 0:
        pretty = "learning rate" if name == "lr" else name
        raise ValueError(f"Invalid {pretty} ({name}): {value!r} (valid range: {name} > 0, finite)")


def check_nonnegative(name: str, value) -> None:
    v = _num(value)
    if not _is_real(v) or not math.isfinite(v) or v < 0:
        raise ValueError(f"Invalid {name}: {value!r} (valid range: {name} >= 0, finite)")


def check_unit_interval(name: str, value) -> None:
    v = _num(value)
    if not _is_real(v) or not (0.0 <= v < 1.0):
        raise ValueError(f"Invalid {name}: {value!r} (valid range: 0 <= {name} < 1)")


def check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (valid: a pair (beta1, beta2), each in [0, 1))")
    for i, b in enumerate(betas):
        v = _num(b)
        if not _is_real(v) or not (0.0 <= v < 1.0):
            raise ValueError(
                f"Invalid beta parameter at index {i}: {b!r} (valid range: 0 <= betas[{i}] < 1)")


def check_choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"Invalid {name}: {value!r} (valid options: {', '.join(map(repr, options))})")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (valid options: True, False)")


def check_lambdas(lambda1, lambda21, lambda2) -> None:
    check_nonnegative("lambda1", lambda1)
    check_nonnegative("lambda21", lambda21)
    check_nonnegative("lambda2", lambda2)
