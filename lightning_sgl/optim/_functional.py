"""``group_step``: one step of Algorithm 1 = moment rule -> dual update -> prox.

This module is the single place where the three pure pieces are chained. Every front end calls it:

- the dense ``torch.optim`` classes, on the whole group matrix of a parameter
  (:func:`apply_dense_`);
- sparse gradients and skipped non-finite rows, on the gathered rows only (:func:`apply_rows_`,
  lazy row semantics);
- the fused TorchRec kernel (``torchrec_ext``), on the unique rows of a batch, summing the
  per-index gradients of duplicated ids first (:func:`accumulate_rows_`).

Two execution paths share the same Python code: the eager path (ground truth) and a
``torch.compile``'d path (``compiled=True``), which fuses the chain into one kernel per layout
(C++ on CPU, Triton on CUDA). The hyperparameters and the step's scalars (``step_scalars``: bias
corrections, decayed lr, sqrt(t), evaluated once on the host) are passed to the compiled path as
one tensor, so that changing them (schedulers, lambda21 tuning) does not recompile and the kernel
evaluates no per-element ``pow``.
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from unittest import mock

import torch
from torch import Tensor

from ._dual import dual_carry, dual_to_z, dual_update
from ._moments import MomentRule, get_rule, step_scalars
from ._prox import group_norm, prox, soft_threshold

__all__ = ["group_step", "reprox", "group_norms", "second_moment_input", "apply_dense_", "apply_rows_",
           "accumulate_rows_", "reprox_rows_", "rows_finite", "to_groups", "from_groups"]


def second_moment_input(g: Tensor, sq_of: Tensor | None, rowwise: bool, group_size=None,
                        reduce_sum=None, weight=None) -> Tensor:
    """What ``V`` adds this step: ``(w * h) * h`` with ``h = g`` (or AdaHessian's ``D``) and ``w``
    the rule's ``sq_weight`` (Adam's ``1 - beta2``; 1 if ``None``), or its row mean if row-wise.

    The order is ``torch.optim``'s (``addcmul_(h, h, value=w)``), so that a square which
    ``torch.optim`` can store is finite here too. For a column shard the row mean is
    ``reduce_sum(sum of the local part) / full width``.
    """
    h = g if sq_of is None else sq_of
    g2 = (h if weight is None else weight * h) * h
    if not rowwise:
        return g2
    if reduce_sum is None:
        return g2.mean(dim=1, keepdim=True)
    return reduce_sum(g2.sum(dim=1, keepdim=True)) / group_size


def group_step(
    x: Tensor,
    g: Tensor,
    dual: Tensor,
    states: tuple[Tensor, ...],
    *,
    rule: MomentRule,
    step,
    hp: dict,
    sq_of: Tensor | None = None,
    rowwise: bool = False,
    exact: bool = False,
    group_size=None,
    reduce_sum=None,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """One step of Algorithm 1 on a group matrix (pure: inputs are not modified).

    Args:
        x: weights ``x_t``, ``[G, d]`` (rows are groups).
        g: gradient ``g_t``, ``[G, d]``.
        dual: stored dual ``u_{t-1} = z_{t-1} + sigma_{t-1} x_t`` (see ``_dual``), ``[G, d]``.
        states: the rule's moment states (``[G, d]``, or ``[G, 1]`` when row-wise).
        rule: the base optimizer's moment rule.
        step: global step ``t >= 1`` (number or 0-d tensor).
        hp: hyperparameters: ``lr``, ``lambda1``, ``lambda21``, ``lambda2`` and the rule's own.
        sq_of: the quantity whose square the second moment accumulates; default ``g``
            (AdaHessian passes its Hessian diagonal estimate ``D_t``).
        rowwise: one second moment per row, accumulating the row mean of the squares.
        exact: use the exact group norm ``||A^{-1/2} s||`` instead of ``||s||``.
        group_size: the group width ``d_g`` if a row here is only part of its group (column
            shards); a number or a ``[G, 1]`` tensor. Default ``d``.
        reduce_sum: sums per-row partial sums ``[G, 1]`` over the other parts of each group
            (an all-reduce over column shards). Default: the row is the whole group.

    Returns:
        ``(x_{t+1}, u_t, new_states)``.
    """
    z, sigma, new_states = dual_and_moments(x, g, dual, states, rule=rule, step=step, hp=hp,
                                            sq_of=sq_of, rowwise=rowwise, group_size=group_size,
                                            reduce_sum=reduce_sum)
    x_new = prox(z, sigma, hp["lambda1"], hp["lambda21"], hp["lambda2"], exact, group_size,
                 reduce_sum, x_prev=x)
    return x_new, dual_carry(z, sigma, x_new), new_states


def dual_and_moments(x, g, dual, states, *, rule: MomentRule, step, hp: dict, sq_of=None,
                     rowwise: bool = False, group_size=None, reduce_sum=None):
    """Lines 3-6 of Algorithm 1 (pure): ``(z_t, sigma_t, new_states)``; arguments as
    :func:`group_step`."""
    g2 = None
    if rule.uses_g2:
        g2 = second_moment_input(g, sq_of, rowwise, group_size, reduce_sum,
                                 None if rule.sq_weight is None else rule.sq_weight(hp))
    m, new_states = rule.update(g, g2, states, step, hp)
    sigma = rule.sigma(new_states, step, hp, x)
    return dual_update(dual, m, sigma, x), sigma, new_states


def step_is_finite(x, g, dual, states, *, rule: MomentRule, step, hp: dict, sq_of=None,
                   rowwise: bool = False) -> Tensor:
    """0-d bool: a sufficient condition that :func:`group_step` writes only finite values.

    Checked before the prox: the new moments, ``4 z_t`` and ``s_t / (sigma_t + 2 lambda2)`` are
    finite. Then ``x_{t+1} = f s_t/(sigma_t + 2 lambda2)`` with ``f`` in ``[0, 1]`` is finite, and
    so is ``u_t = z_t + sigma_t x_{t+1}``, because ``|sigma_t x_{t+1}| <= |s_t| <= |z_t|``. One
    read of the inputs and no write: the compiled dense path runs it before its unguarded fused
    update, and takes the guarded per-group path when it fails.
    """
    z, sigma, new_states = dual_and_moments(x, g, dual, states, rule=rule, step=step, hp=hp,
                                            sq_of=sq_of, rowwise=rowwise)
    denom = sigma + 2.0 * hp["lambda2"]
    q = soft_threshold(z, hp["lambda1"]) / torch.where(denom > 0, denom, torch.ones_like(denom))
    ok = torch.isfinite(z * 4.0).all() & torch.isfinite(q).all()
    for t in new_states:
        ok = ok & torch.isfinite(t).all()
    return ok


def reprox(x: Tensor, dual: Tensor, states: tuple[Tensor, ...], *, rule: MomentRule, step, hp: dict,
           exact: bool = False, group_size=None, reduce_sum=None) -> tuple[Tensor, Tensor]:
    """Re-apply the prox with the current hyperparameters, without a gradient (pure).

    ``sigma`` is recomputed from the stored moments at ``step`` (for Adam-type rules its bias
    correction is the one of ``step``, the row's own last step is not stored). With
    ``z = u - sigma x`` and ``x' = prox(z, sigma)`` the row is moved to the minimiser of the
    current objective; ``u' = z + sigma x'`` keeps the dual consistent. With unchanged lambdas
    and no regularisation this is the identity. Returns ``(x', u')``.
    """
    sigma = rule.sigma(states, step, hp, x)
    z = dual_to_z(dual, sigma, x)
    x_new = prox(z, sigma, hp["lambda1"], hp["lambda21"], hp["lambda2"], exact, group_size,
                 reduce_sum, x_prev=x)
    return x_new, dual_carry(z, sigma, x_new)


def group_norms(x: Tensor, dual: Tensor, states: tuple[Tensor, ...], *, rule: MomentRule, step,
                hp: dict, exact: bool = False, reduce_sum=None) -> Tensor:
    """The norm each group is compared with in the shrink, ``[G, 1]``, from the stored state.

    A group is zero after :func:`reprox` iff this norm is ``<= sqrt(d_g) * lambda21``, which lets
    a controller choose ``lambda21`` for a target share of non-zero groups (it does not depend
    on ``lambda21``).
    """
    sigma = rule.sigma(states, step, hp, x)
    z = dual_to_z(dual, sigma, x)
    norm = group_norm(soft_threshold(z, hp["lambda1"]), sigma, hp["lambda2"], exact, reduce_sum)
    return norm.to(x.dtype)


# --------------------------------------------------------------------------- layouts
def to_groups(t: Tensor, group_by: str) -> Tensor:
    """The group matrix view of a parameter-shaped tensor: rows are the groups.

    ``row``: the 2-D tensor itself; ``column``: its transpose (an ``nn.Linear`` weight
    ``[out, in]`` has one group per input unit); ``tensor``: one row; ``none`` and ``plain``
    (no l21): rows of a 2-D tensor, one row otherwise (the rows only matter for skipping).
    """
    if group_by == "row" or (group_by in ("none", "plain") and t.dim() == 2):
        return t
    if group_by == "column":
        return t.t()
    return t.reshape(1, -1)


def from_groups(t2d: Tensor, group_by: str, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_groups`."""
    if group_by == "column":
        return t2d.t()
    return t2d.reshape(shape)


def rowwise_view(t: Tensor) -> Tensor:
    """Row-wise state is stored as ``[G]``; the math sees ``[G, 1]``."""
    return t.unsqueeze(1)


# --------------------------------------------------------------------------- in-place front ends
# Every write below goes through a per-row guard: a row (group) whose new weights, dual or
# moments would be non-finite -- possible from finite inputs only through overflow (a state near
# the float range, extreme hyperparameters) -- is left as it was, and the front end returns the
# mask of such rows so that the caller applies its ``nonfinite`` policy. NaN/Inf never enters a
# parameter or state silently.


def rows_finite(*tensors: Tensor) -> Tensor:
    """``[G]`` bool: row ``i`` of every ``[G, ...]`` tensor is finite."""
    ok = None
    for t in tensors:
        f = torch.isfinite(t.reshape(t.shape[0], math.prod(t.shape[1:]))).all(dim=1)
        ok = f if ok is None else ok & f
    return ok


def support_rows(x_rows: Tensor, seen: Tensor | None = None) -> Tensor:
    """The fixed-support rule of a refit (the *relaxed* group lasso): ``[G]`` bool, the rows of
    ``x_rows`` (``[G, d]``) that may still train once the support is fixed.

    A row is in the support iff it is non-zero and -- when ``seen`` (``[G]`` flags: the row was
    trained before) is given -- was seen. A zero row stays zero and keeps its state: training it
    with ``lambda21 = 0`` would revive it through its dual, which holds everything the penalty
    shrank away. A row seen for the first time while the support is fixed is outside it; the
    front ends set it to zero and mark it seen (it is served as zero, like every deleted row).
    Every front end (dense optimizers, the fused kernel's eager and native updates, the prox
    re-application) applies this one rule; O(G x d).

    Reference: Meinshausen, "Relaxed Lasso", Computational Statistics & Data Analysis 52 (2007);
    the support is the one the sparse group lasso of Yue et al. (Algorithm 1) selected.
    """
    keep = x_rows.ne(0).any(dim=1)
    return keep if seen is None else keep & seen.bool()


def _dense_(param, grad, dual, states, rowwise_flags, step, hp, sq_of, rule_name, group_by, rowwise,
            exact):
    """Algorithm 1 on a whole parameter, writing param, dual and states in place (rows whose
    result is not finite are kept). Returns the ``[G]`` mask of such refused rows."""
    shape = param.shape
    x2d, dual2d = to_groups(param, group_by), to_groups(dual, group_by)
    st = tuple(rowwise_view(s) if rw else to_groups(s, group_by)
               for s, rw in zip(states, rowwise_flags))
    x_new, dual_new, new_states = group_step(
        x2d, to_groups(grad, group_by), dual2d, st,
        rule=get_rule(rule_name), step=step, hp=hp,
        sq_of=None if sq_of is None else to_groups(sq_of, group_by), rowwise=rowwise,
        exact=exact)
    keep = rows_finite(x_new, dual_new, *new_states).unsqueeze(1)
    param.copy_(from_groups(torch.where(keep, x_new, x2d), group_by, shape))
    dual.copy_(from_groups(torch.where(keep, dual_new, dual2d), group_by, shape))
    for s, old, n, rw in zip(states, st, new_states, rowwise_flags):
        n = torch.where(keep, n, old)
        s.copy_(n.squeeze(1) if rw else from_groups(n, group_by, shape))
    return ~keep.squeeze(1)


def _dense_views(param, grad, dual, states, rowwise_flags, sq_of, group_by):
    st = tuple(rowwise_view(s) if rw else to_groups(s, group_by)
               for s, rw in zip(states, rowwise_flags))
    return (to_groups(param, group_by), to_groups(grad, group_by), to_groups(dual, group_by), st,
            None if sq_of is None else to_groups(sq_of, group_by))


def _dense_probe_(param, grad, dual, states, rowwise_flags, step, hp, sq_of, rule_name, group_by,
                  rowwise, exact):
    x, g, d, st, h = _dense_views(param, grad, dual, states, rowwise_flags, sq_of, group_by)
    return step_is_finite(x, g, d, st, rule=get_rule(rule_name), step=step, hp=hp, sq_of=h,
                          rowwise=rowwise)


def _dense_fast_(param, grad, dual, states, rowwise_flags, step, hp, sq_of, rule_name, group_by,
                 rowwise, exact):
    """:func:`_dense_` without the per-group guard (one fused loop nest when compiled): only
    after :func:`step_is_finite` said every value it writes is finite."""
    shape = param.shape
    x, g, d, st, h = _dense_views(param, grad, dual, states, rowwise_flags, sq_of, group_by)
    x_new, dual_new, new_states = group_step(x, g, d, st, rule=get_rule(rule_name), step=step,
                                             hp=hp, sq_of=h, rowwise=rowwise, exact=exact)
    param.copy_(from_groups(x_new, group_by, shape))
    dual.copy_(from_groups(dual_new, group_by, shape))
    for s, n, rw in zip(states, new_states, rowwise_flags):
        s.copy_(n.squeeze(1) if rw else from_groups(n, group_by, shape))


def _rows_(x2d, idx, g_rows, dual2d, states2d, step, hp, sq_rows, rule_name, rowwise, exact,
           group_size=None, reduce_sum=None, agree=None):
    """In place: gather rows ``idx``, Algorithm 1, scatter back the rows whose result is finite
    (one fused loop when compiled). ``agree`` (column shards) ORs the refusal of each row over
    the other pieces of its group. Returns the mask (over ``idx``) of the refused rows."""
    x_old, dual_old = x2d.index_select(0, idx), dual2d.index_select(0, idx)
    st_old = tuple(s.index_select(0, idx) for s in states2d)
    x_new, dual_new, new_states = group_step(
        x_old, g_rows, dual_old, st_old, rule=get_rule(rule_name), step=step,
        hp=hp, sq_of=sq_rows, rowwise=rowwise, exact=exact, group_size=group_size,
        reduce_sum=reduce_sum)
    refused = ~rows_finite(x_new, dual_new, *new_states)
    if agree is not None:
        refused = agree(refused)
    keep = ~refused.unsqueeze(1)
    x2d.index_copy_(0, idx, torch.where(keep, x_new, x_old))
    dual2d.index_copy_(0, idx, torch.where(keep, dual_new, dual_old))
    for s, old, n in zip(states2d, st_old, new_states):
        s.index_copy_(0, idx, torch.where(keep, n, old))
    return refused


def _accumulate_rows_(x2d, idx, inv, g_index, dual2d, states2d, flags, step, hp, rule_name, rowwise,
                      exact, group_size=None, reduce_sum=None, agree=None):
    """In place, for the unique rows ``idx`` of a batch: sum the per-index gradients ``g_index``
    into their rows (``inv``: position in ``idx`` of each index's row), Algorithm 1 on those rows,
    write back the rows whose result is finite, and set ``flags`` of those rows to 1. One fused
    loop nest when compiled. Returns the mask (over ``idx``) of the refused rows."""
    g_rows = torch.zeros((idx.shape[0], g_index.shape[1]), dtype=g_index.dtype,
                         device=g_index.device).index_add_(0, inv, g_index)
    refused = _rows_(x2d, idx, g_rows, dual2d, states2d, step, hp, None, rule_name, rowwise, exact,
                     group_size, reduce_sum, agree)
    if flags is not None:
        flags.index_copy_(0, idx, torch.where(refused, flags.index_select(0, idx),
                                              torch.ones_like(idx, dtype=flags.dtype)))
    return refused


def reprox_rows_(x2d: Tensor, dual2d: Tensor, states2d, rows: Tensor | None = None, *,
                 rule: MomentRule, step, hp: dict, exact: bool = False, group_size=None,
                 reduce_sum=None, compiled: bool = False) -> Tensor:
    """In place: :func:`reprox` on the rows ``rows`` of group matrices (all rows if ``None``);
    rows whose result would not be finite are kept. Returns the mask of those refused rows.
    ``hp`` values may be ``[len(rows), 1]`` tensors (per-row overrides). ``compiled=True`` (with
    ``rows`` given, no column shards): one ``torch.compile``'d gather -> prox -> scatter loop,
    the hyperparameters passed as tensors (a new ``lambda21`` does not recompile).

    Cost: O(len(rows) x d) reads and writes; no collective unless ``reduce_sum`` does one.
    """
    if compiled and rows is not None and group_size is None and reduce_sum is None:
        return _row_service_compiled("reprox", _reprox_rows_packed_, _reprox_rows_, x2d, dual2d,
                                     states2d, rows, rule, step, hp, exact)
    return _reprox_rows_(x2d, dual2d, tuple(states2d), rows, rule.name, step, hp, exact,
                         group_size, reduce_sum)


def _reprox_rows_(x2d, dual2d, states2d, rows, rule_name, step, hp, exact, group_size=None,
                  reduce_sum=None):
    if rows is None:
        x_old, dual_old, st = x2d, dual2d, tuple(states2d)
    else:
        x_old, dual_old = x2d.index_select(0, rows), dual2d.index_select(0, rows)
        st = tuple(t.index_select(0, rows) for t in states2d)
    x_new, dual_new = reprox(x_old, dual_old, st, rule=get_rule(rule_name), step=step, hp=hp,
                             exact=exact, group_size=group_size, reduce_sum=reduce_sum)
    keep = rows_finite(x_new, dual_new).unsqueeze(1)
    x_new, dual_new = torch.where(keep, x_new, x_old), torch.where(keep, dual_new, dual_old)
    if rows is None:
        x2d.copy_(x_new)
        dual2d.copy_(dual_new)
    else:
        x2d.index_copy_(0, rows, x_new)
        dual2d.index_copy_(0, rows, dual_new)
    return ~keep.squeeze(1)


def row_group_norms(x2d: Tensor, dual2d: Tensor, states2d, rows: Tensor, *, rule: MomentRule,
                    step, hp: dict, exact: bool = False, reduce_sum=None,
                    compiled: bool = False) -> Tensor:
    """:func:`group_norms` of the rows ``rows`` of group matrices, ``[len(rows), 1]``.
    ``compiled=True`` (no column shards): one ``torch.compile``'d gather + norm loop (see
    :func:`reprox_rows_`). Cost: O(len(rows) x d) reads."""
    if compiled and reduce_sum is None:
        return _row_service_compiled("norms", _row_norms_packed, _row_norms, x2d, dual2d,
                                     states2d, rows, rule, step, hp, exact)
    return _row_norms(x2d, dual2d, tuple(states2d), rows, rule.name, step, hp, exact, reduce_sum)


def _row_norms(x2d, dual2d, states2d, rows, rule_name, step, hp, exact, reduce_sum=None):
    return group_norms(x2d.index_select(0, rows), dual2d.index_select(0, rows),
                       tuple(t.index_select(0, rows) for t in states2d),
                       rule=get_rule(rule_name), step=step, hp=hp, exact=exact,
                       reduce_sum=reduce_sum)


def _row_service_compiled(kind, packed_fn, eager_fn, x2d, dual2d, states2d, rows, rule, step,
                          hp, exact):
    """Run a row service (``kind``: its compile-cache name) through ``torch.compile``: the
    scalar hyperparameters and the step's scalars packed into one tensor, per-row overrides as
    tensors (changed values do not recompile), the width static and the row count dynamic."""
    scalars, per_row = _split_row_hp(hp)
    layout, packed = _pack_hp(scalars, step, x2d)
    row_keys = tuple(sorted(per_row))
    key = (kind, rule.name, exact, x2d.shape[1], x2d.dtype, x2d.device, layout, row_keys)
    _static_width(x2d, dual2d, *states2d)
    eager = (x2d, dual2d, tuple(states2d), rows, rule.name, step, hp, exact)
    tensors = (x2d, dual2d, tuple(states2d), rows, packed, layout, row_keys,
               tuple(per_row[k] for k in row_keys), rule.name, exact)
    return _run_compiled(packed_fn, eager_fn, key, True, eager, tensors)


def _static_width(*tensors: Tensor) -> None:
    """Row counts vary between calls, widths do not: tell dynamo (no recompile per row count)."""
    for t in tensors:
        if t.dim() == 2 and 1 not in getattr(t, "_dynamo_static_indices", ()):
            torch._dynamo.mark_static(t, 1)


#: parameters smaller than this run eagerly even with ``compiled=True`` (a compile per shape
#: would cost more than it saves)
COMPILE_MIN_NUMEL = 1 << 16
_COMPILED: dict = {}
_BROKEN: set = set()
_WARNED: set = set()


def _compiled_for(fn, key, dynamic: bool):
    """A ``torch.compile``'d copy of ``fn`` for one static configuration ``key``.

    Each key gets its own code object, hence its own dynamo cache: many layouts/shapes in one
    process never hit dynamo's per-function recompile limit.
    """
    compiled = _COMPILED.get(key)
    if compiled is None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
        clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
        compiled = _COMPILED[key] = torch.compile(clone, dynamic=dynamic,
                                                  options={"size_asserts": False})
    return compiled


def _without_cpp_outer_loop_fusion():
    """Inductor 2.13's C++ outer-loop fusion fails on some row-norm graphs (KeyError 'bufN');
    compiling with it disabled is the fallback before eager."""
    try:
        from torch._inductor.codegen.cpp import CppScheduling
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return mock.patch.object(CppScheduling, "can_fuse_vertical_outer_loop",
                             lambda *args, **kwargs: False)


def _run_compiled(fn, eager_fn, key, dynamic, eager_args, tensor_args):
    """Run the compiled variant; on compiler failures retry without C++ outer-loop fusion, then
    warn once and use the eager path (compile errors surface before any write happens)."""
    last = None
    for variant, context in ((key, contextlib.nullcontext),
                             (key + ("no-outer-loop-fusion",), _without_cpp_outer_loop_fusion)):
        if variant in _BROKEN:
            continue
        try:
            with context():
                return _compiled_for(fn, variant, dynamic)(*tensor_args)
        except Exception as err:
            _BROKEN.add(variant)
            last = err
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"lightning_sgl: torch.compile failed for {key[:6]} ({last!r:.200}); "
                      "using the eager path for it", RuntimeWarning, stacklevel=3)
    return eager_fn(*eager_args)


def _split_row_hp(hp: dict) -> tuple[dict, dict]:
    """``(scalar hyperparameters, per-row ones)``: a ``[G, 1]`` tensor value is per row (a
    per-table override, e.g. a tuned ``lambda21``); it reaches compiled code as a tensor input."""
    rows = {k: v for k, v in hp.items() if isinstance(v, Tensor) and v.dim() > 0}
    return {k: v for k, v in hp.items() if k not in rows}, rows


def _pack_hp(hp: dict, step, like: Tensor) -> tuple[tuple, Tensor]:
    """Hyperparameters and the step's scalars (``step_scalars``: bias corrections etc., evaluated
    here once instead of once per row inside the kernel) packed into one 1-D tensor: one
    host->device copy per step, one tensor for the compiled code to guard on, and a changed value
    does not recompile. Returns ``(layout, packed)``; ``layout`` is static. Per-row values are
    not packed (see :func:`_split_row_hp`)."""
    floats = {k: tuple(float(e) for e in v) if isinstance(v, tuple) else float(v)
              for k, v in hp.items()}
    layout, values = [], []
    for k in sorted(floats):
        v = floats[k]
        layout.append((k, len(v) if isinstance(v, tuple) else 0))
        values.extend(v if isinstance(v, tuple) else (v,))
    scalars = step_scalars(float(step), floats)
    values.extend(float(v) for v in scalars.values())
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return ((tuple(layout), tuple(scalars)),
            torch.tensor(values, dtype=dtype, device=like.device))


def _unpack_hp(layout: tuple, packed: Tensor) -> tuple[dict, dict]:
    """Inverse of :func:`_pack_hp`: ``(hp, step scalars)``, 0-d tensors (traced when compiled)."""
    hp_layout, scalar_keys = layout
    hp, i = {}, 0
    for k, n in hp_layout:
        if n:
            hp[k] = tuple(packed[i + j] for j in range(n))
            i += n
        else:
            hp[k] = packed[i]
            i += 1
    return hp, {k: packed[i + j] for j, k in enumerate(scalar_keys)}


def _dense_probe_packed_(param, grad, dual, states, rowwise_flags, packed, layout, sq_of, rule_name,
                         group_by, rowwise, exact):
    hp, step = _unpack_hp(layout, packed)
    return _dense_probe_(param, grad, dual, states, rowwise_flags, step, hp, sq_of, rule_name,
                         group_by, rowwise, exact)


def _dense_fast_packed_(param, grad, dual, states, rowwise_flags, packed, layout, sq_of, rule_name,
                        group_by, rowwise, exact):
    hp, step = _unpack_hp(layout, packed)
    _dense_fast_(param, grad, dual, states, rowwise_flags, step, hp, sq_of, rule_name, group_by,
                 rowwise, exact)


def _rows_packed_(x2d, idx, g_rows, dual2d, states2d, packed, layout, sq_rows, rule_name, rowwise,
                  exact):
    hp, step = _unpack_hp(layout, packed)
    return _rows_(x2d, idx, g_rows, dual2d, states2d, step, hp, sq_rows, rule_name, rowwise, exact)


def _accumulate_rows_packed_(x2d, idx, inv, g_index, dual2d, states2d, flags, packed, layout,
                             row_keys, row_values, rule_name, rowwise, exact):
    hp, step = _unpack_hp(layout, packed)
    hp.update(zip(row_keys, row_values))
    return _accumulate_rows_(x2d, idx, inv, g_index, dual2d, states2d, flags, step, hp, rule_name,
                             rowwise, exact)


def _reprox_rows_packed_(x2d, dual2d, states2d, rows, packed, layout, row_keys, row_values,
                         rule_name, exact):
    hp, step = _unpack_hp(layout, packed)
    hp.update(zip(row_keys, row_values))
    return _reprox_rows_(x2d, dual2d, states2d, rows, rule_name, step, hp, exact)


def _row_norms_packed(x2d, dual2d, states2d, rows, packed, layout, row_keys, row_values,
                      rule_name, exact):
    hp, step = _unpack_hp(layout, packed)
    hp.update(zip(row_keys, row_values))
    return _row_norms(x2d, dual2d, states2d, rows, rule_name, step, hp, exact)


def apply_dense_(param, grad, dual, states, rowwise_flags, *, step, hp, rule_name, group_by,
                 rowwise=False, exact=False, sq_of=None, compiled=False):
    """Algorithm 1 on a whole parameter, writing ``param``, ``dual`` and ``states`` in place.

    ``states`` are stored parameter-shaped, except row-wise second moments (``[G]``). Returns
    the ``[G]`` bool mask of the groups left unchanged because their result would not be finite.

    ``compiled=True`` runs two compiled passes: :func:`step_is_finite` (a read of the inputs),
    then the unguarded fused update; if the check fails (overflow), the guarded eager update
    decides group by group.
    """
    args = (param, grad, dual, tuple(states), tuple(rowwise_flags), step, hp, sq_of, rule_name,
            group_by, rowwise, exact)
    if not compiled or param.numel() < COMPILE_MIN_NUMEL:
        return _dense_(*args)
    layout, packed = _pack_hp(hp, step, param)
    key = ("dense", rule_name, group_by, rowwise, exact, sq_of is not None, tuple(param.shape),
           param.dtype, param.device, layout)
    t_args = (param, grad, dual, tuple(states), tuple(rowwise_flags), packed, layout, sq_of,
              rule_name, group_by, rowwise, exact)
    ok = _run_compiled(_dense_probe_packed_, _dense_probe_, key + ("probe",), False, args, t_args)
    if not bool(ok):
        return _dense_(*args)
    _run_compiled(_dense_fast_packed_, _dense_fast_, key, False, args, t_args)
    return torch.zeros(to_groups(param, group_by).shape[0], dtype=torch.bool,
                       device=param.device)


def apply_rows_(x2d, idx, g_rows, dual2d, states2d, *, step, hp, rule_name, rowwise=False,
                exact=False, sq_rows=None, compiled=False, group_size=None, reduce_sum=None):
    """Algorithm 1 on the rows ``idx`` of group matrices only (lazy row semantics).

    Rows not in ``idx`` keep weights, dual and moments unchanged. ``idx`` must be unique and
    ``g_rows`` the summed gradient of each of those rows. Row-wise states are ``[G, 1]`` views.
    ``group_size``/``reduce_sum``: see :func:`group_step` (column shards; eager path only).
    Returns the mask (over ``idx``) of the rows left unchanged because their result would not
    be finite.
    """
    if group_size is not None or reduce_sum is not None:
        compiled = False
    if compiled:
        if g_rows._base is not None and g_rows._base.is_sparse:  # values() of a sparse grad
            g_rows = g_rows.clone()
        layout, packed = _pack_hp(hp, step, x2d)
        key = ("rows", rule_name, rowwise, exact, sq_rows is not None, x2d.shape[1], x2d.dtype,
               x2d.device, layout)
        eager = (x2d, idx, g_rows, dual2d, tuple(states2d), step, hp, sq_rows, rule_name, rowwise,
                 exact)
        tensors = (x2d, idx, g_rows, dual2d, tuple(states2d), packed, layout, sq_rows, rule_name,
                   rowwise, exact)
        return _run_compiled(_rows_packed_, _rows_, key, True, eager, tensors)
    return _rows_(x2d, idx, g_rows, dual2d, tuple(states2d), step, hp, sq_rows, rule_name, rowwise,
                  exact, group_size, reduce_sum)


def accumulate_rows_(x2d, idx, inv, g_index, dual2d, states2d, flags=None, *, step, hp, rule_name,
                     rowwise=False, exact=False, compiled=False, group_size=None,
                     reduce_sum=None, agree=None):
    """The fused-table update: per-index gradients in, rows updated in place (lazy semantics).

    ``idx``: unique rows of the batch; ``inv``: for each of the ``n`` indices of the batch, the
    position of its row in ``idx``; ``g_index``: ``[n, d]`` gradient of each index (already
    scaled by per-sample weights / bag length). Rows not in ``idx`` are untouched. ``flags``
    (``uint8`` per row, optional) is set to 1 for every updated row. The caller checks that the
    gradients are finite (and their row sums cannot overflow) beforehand. Rows whose result
    would not be finite are left unchanged (flags included); their mask over ``idx`` is returned.
    ``hp`` values may be ``[len(idx), 1]`` tensors (per-row overrides). ``group_size``,
    ``reduce_sum`` and ``agree``: see :func:`group_step` and :func:`_rows_` (column shards;
    eager path only). ``compiled=True``: one ``torch.compile``'d loop nest (C++ on CPU, Triton
    on CUDA), the per-row values passed as tensors (no recompile when they change).
    """
    if group_size is not None or reduce_sum is not None or agree is not None:
        compiled = False
    eager = (x2d, idx, inv, g_index, dual2d, tuple(states2d), flags, step, hp, rule_name, rowwise,
             exact, group_size, reduce_sum, agree)
    if not compiled:
        return _accumulate_rows_(*eager)
    scalars, per_row = _split_row_hp(hp)
    layout, packed = _pack_hp(scalars, step, x2d)
    row_keys = tuple(sorted(per_row))
    key = ("accumulate", rule_name, rowwise, exact, flags is not None, x2d.shape[1], x2d.dtype,
           x2d.device, layout, row_keys)
    for t in (x2d, g_index, dual2d, *states2d):  # row counts vary, the width does not
        if 1 not in getattr(t, "_dynamo_static_indices", ()):
            torch._dynamo.mark_static(t, 1)
    tensors = (x2d, idx, inv, g_index, dual2d, tuple(states2d), flags, packed, layout, row_keys,
               tuple(per_row[k] for k in row_keys), rule_name, rowwise, exact)
    return _run_compiled(_accumulate_rows_packed_, _accumulate_rows_, key, True, eager, tensors)
