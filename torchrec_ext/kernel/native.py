"""The native CPU update (``torchrec_ext/csrc/group_tbe.cpp``, built at install as
``torchrec_ext._C``): loading, availability and its per-table hyperparameter matrix.

The extension is optional (see ``setup.py``). :func:`available` says whether it was built and
loads; when it was not, CPU kernels run the eager PyTorch update and :func:`warn_missing` says so
once. The hyperparameter matrix holds, per table, every scalar the row step needs, evaluated on
the host once per step in float64 with the math core's own formulas (``_moments.step_scalars``
and the rules' constant ``sigma``), so the native code evaluates no ``pow`` and reads per-table
overrides (a tuner's ``lambda21``) as data.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch

from lightning_sgl.optim.functional import get_rule, step_scalars

__all__ = ["available", "warn_missing", "RULE_IDS", "HP_COLUMNS", "HpMatrix", "hp_matrix",
           "backward", "table_buffer", "reprox", "reprox_between"]

#: moment rules the native update implements (ids of ``enum Rule`` in group_tbe.cpp)
RULE_IDS = {"sgd": 0, "momentum": 1, "adagrad": 2, "adam": 3, "amsgrad": 4}
#: columns of the per-table hyperparameter matrix (``enum Col`` in group_tbe.cpp)
HP_COLUMNS = ("lr", "lambda1", "lambda21", "lambda2_x2", "lambda2", "eps", "beta1",
              "one_minus_beta1", "beta2", "one_minus_beta2", "momentum", "bias_correction1",
              "bias_correction2_sqrt", "clr", "sigma_const", "threshold", "fixed_support")


@functools.cache
def _load() -> str | None:
    """``None`` if the extension loads, else why not."""
    try:
        importlib.import_module("torchrec_ext._C")
        torch.ops.lightning_sgl.group_tbe_backward  # noqa: B018  (registered by the library)
        return None
    except (ImportError, OSError, AttributeError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"


def available() -> bool:
    return _load() is None


@functools.cache
def warn_missing() -> None:
    warnings.warn(
        "torchrec_ext: the native CPU update is not available (" + str(_load())[:160] + "); "
        "fused tables on CPU run the eager PyTorch update, several times slower. Reinstall with "
        "a C++ compiler present (scripts/install.sh) to build it.", RuntimeWarning, stacklevel=3)


def table_buffer(numel: int, dtype: torch.dtype, device, fill: float = 0.0) -> torch.Tensor:
    """A 1-D buffer for table rows. On CPU with the native extension: 2 MiB-aligned memory
    advised for transparent huge pages (random rows of a large table then rarely miss the TLB;
    measured ~20% off a step at 8 x 100k x 16 rows); elsewhere ``torch.full``."""
    if (device is None or torch.device(device).type == "cpu") and available():
        buf = torch.ops.lightning_sgl.huge_zeros(numel, dtype)
        return buf.fill_(fill) if fill else buf
    return torch.full((numel,), fill, dtype=dtype, device=device)


class HpMatrix:
    """The per-table hyperparameter matrix of one kernel configuration (the hyperparameters and
    per-table overrides fixed): the step-independent columns are computed once, the step's
    scalars (bias corrections, Adagrad's decayed lr, SGD's sqrt(t)/lr) once per step and per
    distinct set of table hyperparameters (usually one)."""

    _STEP_COLS = ("bias_correction1", "bias_correction2_sqrt", "clr", "sigma_const")

    def __init__(self, optimizer: str, table_hp: list[dict], widths: list[int],
                 fixed: list[bool] | None = None):
        self.rule = get_rule(optimizer)
        self.tensor = torch.zeros(len(table_hp), len(HP_COLUMNS), dtype=torch.float64)
        self.array = self.tensor  # filled in place
        self.step = None
        groups: dict[tuple, list[int]] = {}
        self.hps = []
        fixed = fixed or [False] * len(table_hp)
        for t, (hp, width) in enumerate(zip(table_hp, widths)):
            betas = hp.get("betas", (0.0, 0.0))
            self.array[t] = torch.tensor((
                hp["lr"], hp["lambda1"], hp["lambda21"], 2.0 * hp["lambda2"], hp["lambda2"],
                hp.get("eps", 0.0), betas[0], 1.0 - betas[0], betas[1], 1.0 - betas[1],
                hp.get("momentum", 0.0), 1.0, 1.0, hp["lr"], 0.0, width ** 0.5 * hp["lambda21"],
                float(fixed[t])),
                dtype=torch.float64)
            key = tuple((k, v) for k, v in sorted(hp.items()) if k not in ("lambda21",))
            if key not in groups:
                groups[key] = []
                self.hps.append(hp)
            groups[key].append(t)
        self.groups = [torch.tensor(v) for v in groups.values()]
        self.cols = [HP_COLUMNS.index(c) for c in self._STEP_COLS]

    def at(self, step: float) -> torch.Tensor:
        if step != self.step:
            for hp, rows in zip(self.hps, self.groups):
                sc = step_scalars(step, hp)
                const = 0.0
                if not self.rule.uses_g2:  # SGD, Momentum: sigma does not depend on the state
                    const = float(self.rule.sigma((), sc, hp, torch.zeros(1, 1,
                                                                          dtype=torch.float64)))
                vals = (sc.get("bias_correction1", 1.0), sc.get("bias_correction2_sqrt", 1.0),
                        sc.get("clr", hp["lr"]), const)
                for c, v in zip(self.cols, vals):
                    self.array[rows, c] = v
            self.step = step
        return self.tensor


def hp_matrix(optimizer: str, table_hp: list[dict], widths: list[int], step: float,
              fixed: list[bool] | None = None) -> torch.Tensor:
    """``[T, len(HP_COLUMNS)]`` float64: every scalar of table ``t``'s row step at ``step``
    (``fixed``: per table, whether its support is fixed, see ``GroupTBE.set_fixed_support``)."""
    return HpMatrix(optimizer, table_hp, widths, fixed).at(step).clone()


def backward(grad_out, indices, offsets, per_sample_weights, feature_table, feature_col,
             tables, weights, dual, states, state_rowwise, seen, hp, counts, index, *, rule: str,
             rowwise: bool, exact: bool, mean: bool, skip: bool) -> torch.Tensor:
    """One native update; returns ``[status, refused rows, table, non-finite input rows]``
    (status 0: done; 1: a non-finite gradient was refused, nothing modified; 2: an id out of
    range, nothing modified). ``index``: the shrink-norm index's tensors (``ShrinkIndex.tensors``;
    empty: none) -- every written row's shrink norm is stored and relinked."""
    w_off, row_off, dims, rows = tables
    return torch.ops.lightning_sgl.group_tbe_backward(
        grad_out, indices, offsets, per_sample_weights, feature_table, feature_col, w_off,
        row_off, dims, rows, weights, dual, list(states), state_rowwise, seen, hp, counts,
        list(index), RULE_IDS[rule], rowwise, exact, mean, skip)


#: rules whose update with a zero gradient leaves every moment unchanged: for them that update is
#: exactly the prox re-applied (``group_tbe_reprox``)
REPROX_RULES = ("sgd", "adagrad")


def reprox(rows, tables, weights, dual, states, seen, hp, counts, index, *, rule: str,
           rowwise: bool, exact: bool) -> torch.Tensor:
    """The prox re-applied natively to the sorted, seen kernel rows ``rows`` (a zero-gradient
    update, exact for :data:`REPROX_RULES`); counts and index follow. Returns ``[0, refused
    rows, table, 0]``."""
    w_off, row_off, dims, n_rows = tables
    return torch.ops.lightning_sgl.group_tbe_reprox(
        rows, w_off, row_off, dims, n_rows, weights, dual, list(states), seen, hp, counts,
        list(index), RULE_IDS[rule], rowwise, exact)


def reprox_between(ranges, bounds, tables, weights, dual, states, seen, hp, counts, index, *,
                   rule: str, rowwise: bool, exact: bool) -> tuple[int, int]:
    """:func:`reprox` on the seen rows that the shrink-norm index holds in buckets ``[lo, hi]`` of
    local table ``t`` with a stored value in ``(a, b]``, for every ``(t, lo, hi)`` of ``ranges``
    ([K, 3] int64) and ``(a, b)`` of ``bounds`` ([K, 2] float64): one native pass, the rows
    updated as the walk finds them (no gather to Python, no sort). Returns ``(rows re-applied,
    rows refused)``. O(rows walked + rows re-applied x dim)."""
    w_off, row_off, dims, _ = tables
    out = torch.ops.lightning_sgl.group_tbe_reprox_between(
        ranges, bounds, w_off, row_off, dims, weights, dual, list(states), seen, hp, counts,
        list(index), RULE_IDS[rule], rowwise, exact)
    return int(out[0]), int(out[1])
