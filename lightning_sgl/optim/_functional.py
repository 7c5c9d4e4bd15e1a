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
import types
import warnings
from unittest import mock

import torch
from torch import Tensor

from . import _aot
from ._dual import dual_carry, dual_to_z, dual_update
from ._moments import MomentRule, get_rule, step_scalars
from ._prox import group_norm, prox, soft_threshold

__all__ = ["group_step", "reprox", "group_norms", "second_moment_input", "apply_dense_", "apply_rows_",
           "accumulate_rows_", "to_groups", "from_groups"]


def second_moment_input(g: Tensor, g2: Tensor | None, rowwise: bool, group_size=None,
                        reduce_sum=None) -> Tensor:
    """What ``V`` accumulates: ``g*g`` (or AdaHessian's ``D^2``), or its row mean if row-wise.

    For a column shard the row mean is ``reduce_sum(sum of the local part) / full width``.
    """
    if g2 is None:
        g2 = g * g
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
    g2: Tensor | None = None,
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
        g2: what the second moment accumulates; default ``g*g`` (AdaHessian passes ``D_t^2``).
        rowwise: one second moment per row, accumulating the row mean of ``g2``.
        exact: use the exact group norm ``||A^{-1/2} s||`` instead of ``||s||``.
        group_size: the group width ``d_g`` if a row here is only part of its group (column
            shards); a number or a ``[G, 1]`` tensor. Default ``d``.
        reduce_sum: sums per-row partial sums ``[G, 1]`` over the other parts of each group
            (an all-reduce over column shards). Default: the row is the whole group.

    Returns:
        ``(x_{t+1}, u_t, new_states)``.
    """
    if rule.uses_g2:
        g2 = second_moment_input(g, g2, rowwise, group_size, reduce_sum)
    m, new_states = rule.update(g, g2, states, step, hp)
    sigma = rule.sigma(new_states, step, hp, x)
    z = dual_update(dual, m, sigma, x)
    x_new = prox(z, sigma, hp["lambda1"], hp["lambda21"], hp["lambda2"], exact, group_size,
                 reduce_sum)
    return x_new, dual_carry(z, sigma, x_new), new_states


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
                 reduce_sum)
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
    return group_norm(soft_threshold(z, hp["lambda1"]), sigma, hp["lambda2"], exact, reduce_sum)


# --------------------------------------------------------------------------- layouts
def to_groups(t: Tensor, group_by: str) -> Tensor:
    """The group matrix view of a parameter-shaped tensor: rows are the groups.

    ``row``: the 2-D tensor itself; ``column``: its transpose (an ``nn.Linear`` weight
    ``[out, in]`` has one group per input unit); ``tensor``: one row; ``none``: rows of a 2-D
    tensor, one row otherwise (no l21 is applied, the rows only matter for skipping).
    """
    if group_by == "row" or (group_by == "none" and t.dim() == 2):
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
def _dense_(param, grad, dual, states, rowwise_flags, step, hp, g2, rule_name, group_by, rowwise,
            exact):
    """Algorithm 1 on a whole parameter, writing param, dual and states in place."""
    shape = param.shape
    st = tuple(rowwise_view(s) if rw else to_groups(s, group_by)
               for s, rw in zip(states, rowwise_flags))
    x_new, dual_new, new_states = group_step(
        to_groups(param, group_by), to_groups(grad, group_by), to_groups(dual, group_by), st,
        rule=get_rule(rule_name), step=step, hp=hp,
        g2=None if g2 is None else to_groups(g2, group_by), rowwise=rowwise, exact=exact)
    param.copy_(from_groups(x_new, group_by, shape))
    dual.copy_(from_groups(dual_new, group_by, shape))
    for s, n, rw in zip(states, new_states, rowwise_flags):
        s.copy_(n.squeeze(1) if rw else from_groups(n, group_by, shape))


def _rows_(x2d, idx, g_rows, dual2d, states2d, step, hp, g2_rows, rule_name, rowwise, exact,
           group_size=None, reduce_sum=None):
    """In place: gather rows ``idx``, Algorithm 1, scatter back (one fused loop when compiled)."""
    x_new, dual_new, new_states = group_step(
        x2d.index_select(0, idx), g_rows, dual2d.index_select(0, idx),
        tuple(s.index_select(0, idx) for s in states2d), rule=get_rule(rule_name), step=step,
        hp=hp, g2=g2_rows, rowwise=rowwise, exact=exact, group_size=group_size,
        reduce_sum=reduce_sum)
    x2d.index_copy_(0, idx, x_new)
    dual2d.index_copy_(0, idx, dual_new)
    for s, n in zip(states2d, new_states):
        s.index_copy_(0, idx, n)


def _accumulate_rows_(x2d, idx, inv, g_index, dual2d, states2d, flags, step, hp, rule_name, rowwise,
                      exact, group_size=None, reduce_sum=None):
    """In place, for the unique rows ``idx`` of a batch: sum the per-index gradients ``g_index``
    into their rows (``inv``: position in ``idx`` of each index's row), Algorithm 1 on those rows,
    write back, and set ``flags[idx] = 1``. One fused loop nest when compiled."""
    g_rows = torch.zeros((idx.shape[0], g_index.shape[1]), dtype=g_index.dtype,
                         device=g_index.device).index_add_(0, inv, g_index)
    _rows_(x2d, idx, g_rows, dual2d, states2d, step, hp, None, rule_name, rowwise, exact,
           group_size, reduce_sum)
    if flags is not None:
        flags.index_fill_(0, idx, 1)


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


def _pack_hp(hp: dict, step, like: Tensor) -> tuple[tuple, Tensor]:
    """Hyperparameters and the step's scalars (``step_scalars``: bias corrections etc., evaluated
    here once instead of once per row inside the kernel) packed into one 1-D tensor: one
    host->device copy per step, one tensor for the compiled code to guard on, and a changed value
    does not recompile. Returns ``(layout, packed)``; ``layout`` is static."""
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


def _dense_packed_(param, grad, dual, states, rowwise_flags, packed, layout, g2, rule_name,
                   group_by, rowwise, exact):
    hp, step = _unpack_hp(layout, packed)
    _dense_(param, grad, dual, states, rowwise_flags, step, hp, g2, rule_name, group_by, rowwise,
            exact)


def _rows_packed_(x2d, idx, g_rows, dual2d, states2d, packed, layout, g2_rows, rule_name, rowwise,
                  exact):
    hp, step = _unpack_hp(layout, packed)
    _rows_(x2d, idx, g_rows, dual2d, states2d, step, hp, g2_rows, rule_name, rowwise, exact)


def _accumulate_rows_packed_(x2d, idx, inv, g_index, dual2d, states2d, flags, packed, layout,
                             rule_name, rowwise, exact):
    hp, step = _unpack_hp(layout, packed)
    _accumulate_rows_(x2d, idx, inv, g_index, dual2d, states2d, flags, step, hp, rule_name,
                      rowwise, exact)


def apply_dense_(param, grad, dual, states, rowwise_flags, *, step, hp, rule_name, group_by,
                 rowwise=False, exact=False, g2=None, compiled=False):
    """Algorithm 1 on a whole parameter, writing ``param``, ``dual`` and ``states`` in place.

    ``states`` are stored parameter-shaped, except row-wise second moments (``[G]``).
    """
    args = (param, grad, dual, tuple(states), tuple(rowwise_flags), step, hp, g2, rule_name,
            group_by, rowwise, exact)
    if not compiled or param.numel() < COMPILE_MIN_NUMEL:
        return _dense_(*args)
    layout, packed = _pack_hp(hp, step, param)
    key = ("dense", rule_name, group_by, rowwise, exact, g2 is not None, tuple(param.shape),
           param.dtype, param.device, layout)
    t_args = (param, grad, dual, tuple(states), tuple(rowwise_flags), packed, layout, g2,
              rule_name, group_by, rowwise, exact)
    return _run_compiled(_dense_packed_, _dense_, key, False, args, t_args)


def apply_rows_(x2d, idx, g_rows, dual2d, states2d, *, step, hp, rule_name, rowwise=False,
                exact=False, g2_rows=None, compiled=False, group_size=None, reduce_sum=None):
    """Algorithm 1 on the rows ``idx`` of group matrices only (lazy row semantics).

    Rows not in ``idx`` keep weights, dual and moments unchanged. ``idx`` must be unique and
    ``g_rows`` the summed gradient of each of those rows. Row-wise states are ``[G, 1]`` views.
    ``group_size``/``reduce_sum``: see :func:`group_step` (column shards; eager path only).
    """
    if group_size is not None or reduce_sum is not None:
        compiled = False
    if compiled:
        if g_rows._base is not None and g_rows._base.is_sparse:  # values() of a sparse grad
            g_rows = g_rows.clone()
        layout, packed = _pack_hp(hp, step, x2d)
        key = ("rows", rule_name, rowwise, exact, g2_rows is not None, x2d.shape[1], x2d.dtype,
               x2d.device, layout)
        eager = (x2d, idx, g_rows, dual2d, tuple(states2d), step, hp, g2_rows, rule_name, rowwise,
                 exact)
        tensors = (x2d, idx, g_rows, dual2d, tuple(states2d), packed, layout, g2_rows, rule_name,
                   rowwise, exact)
        return _run_compiled(_rows_packed_, _rows_, key, True, eager, tensors)
    _rows_(x2d, idx, g_rows, dual2d, tuple(states2d), step, hp, g2_rows, rule_name, rowwise, exact,
           group_size, reduce_sum)


def accumulate_rows_(x2d, idx, inv, g_index, dual2d, states2d, flags=None, *, step, hp, rule_name,
                     rowwise=False, exact=False, compiled=False, group_size=None,
                     reduce_sum=None):
    """The fused-table update: per-index gradients in, rows updated in place (lazy semantics).

    ``idx``: unique rows of the batch; ``inv``: for each of the ``n`` indices of the batch, the
    position of its row in ``idx``; ``g_index``: ``[n, d]`` gradient of each index (already
    scaled by per-sample weights / bag length). Rows not in ``idx`` are untouched. ``flags``
    (``uint8`` per row, optional) is set to 1 for every updated row. The caller checks that the
    gradients are finite (and their row sums cannot overflow) beforehand: nothing here does.
    ``group_size``/``reduce_sum``: see :func:`group_step` (column shards; eager path only).
    """
    if group_size is not None or reduce_sum is not None:
        compiled = False
    eager = (x2d, idx, inv, g_index, dual2d, tuple(states2d), flags, step, hp, rule_name, rowwise,
             exact, group_size, reduce_sum)
    if not compiled:
        return _accumulate_rows_(*eager)
    layout, packed = _pack_hp(hp, step, x2d)
    key = ("accumulate", rule_name, rowwise, exact, flags is not None, x2d.shape[1], x2d.dtype,
           x2d.device, layout)
    # CPU: the AOTInductor-compiled kernel (no per-call dynamo overhead); else torch.compile
    if _aot.run_accumulate(key, x2d, idx, inv, g_index, dual2d, states2d, flags, packed, layout,
                           rule_name, rowwise, exact):
        return None
    for t in (x2d, g_index, dual2d, *states2d):  # row counts vary, the width does not
        if 1 not in getattr(t, "_dynamo_static_indices", ()):
            torch._dynamo.mark_static(t, 1)
    tensors = (x2d, idx, inv, g_index, dual2d, tuple(states2d), flags, packed, layout, rule_name,
               rowwise, exact)
    return _run_compiled(_accumulate_rows_packed_, _accumulate_rows_, key, True, eager, tensors)
