"""The backward of :class:`~torchrec_ext.kernel.GroupTBE` is the optimizer step: the rows present
in the batch take one step of Algorithm 1, in place; no weight gradient is materialised.

Two engines run the same math:

- **native** (CPU, float32/float64, no column-sharded table, per-sample weights not learned):
  one call of ``torchrec_ext._C`` per step -- (row, index) pairs radix-sorted, gradients summed
  per unique row, NaN/Inf checked, each row stepped in registers with its arrays prefetched, and
  the incremental feature counts updated; per-table hyperparameters arrive as a matrix;
- **eager** (the ground truth; every device): per-index gradients -> unique rows ->
  :func:`lightning_sgl.optim.functional.accumulate_rows_` (``group_step`` on those rows), one call
  per segment, ``torch.compile``d on CUDA when asked. Column-sharded tables take this path (their
  group norms are all-reduced in the middle of the row step), and so do learned per-sample
  weights (their gradient needs the rows before the update); a warning says so, once.

Non-finite policy. A NaN/Inf per-row gradient sum is refused before anything is written
(``nonfinite="raise"``: the step raises, nothing -- not even the step count -- changes; ``"skip"``:
those rows keep everything). A row whose *result* would not be finite (overflow from finite
inputs) is never written either; under ``"raise"`` the step raises after the other rows were
updated. For column-sharded tables both decisions are agreed over the shards of each row.

Cost: O(ids x width) per step, O(unique rows) table rows touched; one all-reduce per
column-sharded table for the agreements (the group norm needs its own anyway).
"""

from __future__ import annotations

import math
import warnings

try:  # optional: NumPy's sort-based unique is faster on CPU; torch alone works too
    import numpy as np
except ImportError:  # pragma: no cover - exercised by the torch-only import test
    np = None
import torch
from torch import Tensor

from lightning_sgl.optim.functional import (
    NonFiniteGradientError,
    accumulate_rows_,
    row_group_norms,
    support_rows,
)

from . import native
from .plan import LookupPlan, bag_scale
from .rows import ColumnReducer, consistent_values, row_tables, shrink_values, table_deltas

__all__ = ["unique_rows", "native_update", "eager_update", "warn_once"]

_WARNED: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def unique_rows(rows: Tensor, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """``(unique rows, inverse)`` of a batch's row ids. On CPU through NumPy's sort-based
    ``unique`` (2-3x faster than ``torch.unique`` for a few thousand ids; the result is sorted
    either way), elsewhere (or without NumPy) ``torch.unique``."""
    if rows.device.type == "cpu" and np is not None:
        u, inv = np.unique(rows.numpy(), return_inverse=True)
        return torch.from_numpy(u), torch.from_numpy(inv.reshape(-1))
    return torch.unique(rows, sorted=sorted, return_inverse=True)


def _raise_nonfinite(tables: list[str]) -> None:
    raise NonFiniteGradientError(
        f"non-finite (NaN/Inf) gradient for rows of table(s) {sorted(tables)}; no weight or "
        "optimizer state was modified. Use nonfinite='skip' to skip such rows.")


def _raise_overflow(n: int, tables: list[str]) -> None:
    raise NonFiniteGradientError(
        f"{n} row(s) of table(s) {sorted(tables)} would have become non-finite (overflow from "
        "finite gradients: a state near the float range or extreme hyperparameters); those rows "
        "were left unchanged, every other row was updated. Use nonfinite='skip' to skip them "
        "silently.")


# --------------------------------------------------------------------------- native engine
@torch.no_grad()
def native_update(kernel, indices: Tensor, offsets: Tensor, grad_out: Tensor,
                  per_sample_weights: Tensor | None) -> None:
    hp = kernel.current_hyperparameters()
    step = float(kernel.step.item()) + 1.0
    matrix = kernel.native_hp(hp).at(step)
    st = kernel.native_static()
    psw = None if per_sample_weights is None else per_sample_weights.detach().to(
        kernel.weights.dtype).contiguous()
    status = native.backward(
        grad_out.to(kernel.weights.dtype).contiguous(), indices, offsets, psw, st["ftm"],
        st["fcol"], kernel.layout.native_tables, kernel.weights, kernel.dual,
        [getattr(kernel, n) for n in kernel.state_names], st["rowwise"], kernel.seen, matrix,
        kernel.feature_counts_state.counts, kernel.shrink_index.tensors(), rule=kernel.optimizer,
        rowwise=kernel.rowwise, exact=kernel.exact, mean=kernel.pooling == "mean", skip=kernel.nonfinite == "skip")
    code, refused, table, _ = status.tolist()
    name = kernel.layout.tables[table].name if table >= 0 else "?"
    if code == 1:
        _raise_nonfinite([name])
    if code == 2:
        raise ValueError(f"ids out of range for table {name!r} (valid [0, "
                         f"{kernel.layout.tables[table].local_rows}) on this shard)")
    kernel.step.fill_(step)
    if refused and kernel.nonfinite == "raise":
        _raise_overflow(refused, [name])


# --------------------------------------------------------------------------- eager engine
def _bag_grads(kernel, plan: LookupPlan, grad_out: Tensor) -> list[Tensor]:
    """Per segment: gradient of each bag, ``[F_seg * B, width]``."""
    layout, batch = kernel.layout, plan.batch
    if len(layout.segments) == 1:
        seg = layout.segments[0]
        if plan.segments[0].batch_major:
            return [grad_out.reshape(-1, seg.width)]
        n = len(kernel.feature_table_map)
        return [grad_out.reshape(batch, n, seg.width).transpose(0, 1).reshape(-1, seg.width)]
    starts = [0]
    for t in kernel.feature_table_map:
        starts.append(starts[-1] + layout.tables[t].local_cols)
    out = []
    for seg, sp in zip(layout.segments, plan.segments):
        parts = [grad_out[:, starts[f]: starts[f + 1]] for f in sp.features]
        out.append(torch.stack(parts, 0).reshape(-1, seg.width))
    return out


def _per_index(kernel, plan: LookupPlan, grad_out: Tensor, per_sample_weights: Tensor | None):
    """Per segment: ``(unique rows, inverse, per-index gradient, table of each index)``, and
    the per-sample-weight gradient if the weights require it."""
    layout = kernel.layout
    grad_w = None
    if per_sample_weights is not None and per_sample_weights.requires_grad:
        grad_w = torch.zeros_like(per_sample_weights)
    mean = kernel.pooling == "mean"
    work = []
    for seg, sp, gb in zip(layout.segments, plan.segments, _bag_grads(kernel, plan, grad_out)):
        w = None
        if per_sample_weights is not None:
            w = per_sample_weights if sp.sel is None else per_sample_weights[sp.sel]
            w = w.detach().to(kernel.weights.dtype)
        g_index = gb if sp.identity_bag else gb.index_select(0, sp.bag)
        if grad_w is not None:  # d out / d weight_i = <grad_bag, row> (/ len for MEAN)
            mean_scale = bag_scale(plan, sp, None, mean, kernel.weights.dtype)
            rows_val = layout.segment_view(kernel.weights, seg).index_select(0, sp.rows)
            gw = (g_index * rows_val).sum(1)
            if mean_scale is not None:
                gw = gw * mean_scale
            if sp.sel is None:
                grad_w += gw.to(grad_w.dtype)
            else:
                grad_w[sp.sel] += gw.to(grad_w.dtype)
        scale = bag_scale(plan, sp, w, mean, kernel.weights.dtype)
        if scale is not None:
            g_index = g_index * scale.unsqueeze(1)
        # sorted unique rows line column shards up across ranks; otherwise order is free
        uniq, inv = unique_rows(sp.rows, sorted=bool(seg.column_tables))
        work.append([seg, uniq, inv, g_index, row_tables(len(uniq), inv, sp.table)])
    return work, grad_w


def _check_inputs(kernel, work: list) -> list:
    """Refuse (``raise``) or drop (``skip``) rows whose summed gradient is not finite, before
    anything is written. Column-sharded segments always check per row and agree over shards
    (with the decision to raise, so that no shard waits for a peer that raised)."""
    layout = kernel.layout
    cw = layout.has_column_shards
    # a finite sum of squares of all per-index gradients bounds every entry and every row sum
    if not cw and (not work or math.isfinite(sum(float(torch.dot(g.reshape(-1), g.reshape(-1)))
                                                 for _, _, _, g, _ in work))):
        return work
    bad_tables: set[str] = set()
    out, local_bad = [], []
    for seg, uniq, inv, g_index, tables in work:
        g_rows = torch.zeros(len(uniq), seg.width, dtype=g_index.dtype,
                             device=g_index.device).index_add_(0, inv, g_index)
        bad = ~torch.isfinite(g_rows).all(1)
        local_bad.append(bool(bad.any()))
        out.append([seg, uniq, g_rows, tables, bad])
    will_raise = kernel.nonfinite == "raise" and any(local_bad)
    for item in out:
        seg, uniq, g_rows, tables, bad = item
        if seg.column_tables:
            red = ColumnReducer(layout, seg, tables, kernel.column_groups, kernel.weights.dtype)
            flags = red.any(torch.cat([bad.unsqueeze(1), torch.full_like(bad, will_raise)
                                       .unsqueeze(1)], dim=1))
            bad = flags[:, 0]
            will_raise = will_raise or bool(flags[:, 1].any())
        bad_tables |= {layout.tables[int(t)].name for t in tables[bad]}
        item[4] = bad
    if will_raise or (bad_tables and kernel.nonfinite == "raise"):
        _raise_nonfinite(list(bad_tables) or ["on another column shard"])
    result = []
    for seg, uniq, g_rows, tables, bad in out:
        ok = ~bad
        n = int(ok.sum())
        result.append([seg, uniq[ok], torch.arange(n, device=uniq.device), g_rows[ok],
                       tables[ok]])
    return result


def _fix_support(kernel, seg, red, item: list, fixed_tables: Tensor, was_seen: Tensor,
                 nz_before: Tensor) -> tuple:
    """Rows of fixed-support tables outside the support leave the update (``support_rows``);
    those seen for the first time are set to zero and marked seen (counts updated). Returns the
    restricted ``(item, was_seen, nz_before, reducer)``. O(U x d)."""
    seg_, uniq, inv, g_index, tables = item
    fixed = fixed_tables[tables]
    if not bool(fixed.any()):
        return item, was_seen, nz_before, red
    nz = nz_before if red is None else red.any(nz_before)  # a row is zero on every shard
    keep = ~fixed | support_rows(nz.unsqueeze(1), was_seen)
    new = fixed & ~was_seen
    if bool(new.any()):
        x, _, seen, *_ = kernel.update_views(seg)
        x.index_fill_(0, uniq[new], 0.0)
        seen.index_fill_(0, uniq[new], 1)
        kernel.shrink_index.relink(uniq[new] + seg.row_start, tables[new],
                                   torch.zeros(int(new.sum())))
        none = torch.zeros_like(new)
        kernel.feature_counts_state.add(table_deltas(len(kernel.layout.tables), tables, new,
                                                     none, none, none))
    pos = torch.cumsum(keep.long(), 0) - 1
    sel = keep.index_select(0, inv)
    item = [seg_, uniq[keep], pos.index_select(0, inv[sel]), g_index[sel], tables[keep]]
    if red is not None:
        red = ColumnReducer(kernel.layout, seg, item[4], kernel.column_groups,
                            kernel.weights.dtype)
    return item, was_seen[keep], nz_before[keep], red


@torch.no_grad()
def eager_update(kernel, plan: LookupPlan, grad_out: Tensor,
                 per_sample_weights: Tensor | None, compiled: bool) -> Tensor | None:
    layout = kernel.layout
    hp = kernel.current_hyperparameters()
    work, grad_w = _per_index(kernel, plan, grad_out, per_sample_weights)
    work = _check_inputs(kernel, work)
    kernel.step += 1
    step = float(kernel.step.item())
    n_tables = len(layout.tables)
    kernel.feature_counts_state.begin()
    kernel.shrink_index.begin()
    refused_rows, refused_tables = 0, set()
    fixed_tables = kernel.fixed_table_mask()
    for item in work:
        seg, uniq, inv, g_index, tables = item
        red = None
        if seg.column_tables:
            red = ColumnReducer(layout, seg, tables, kernel.column_groups, kernel.weights.dtype)
        x, dual, seen, *states = kernel.update_views(seg)
        was_seen = seen.index_select(0, uniq).bool()
        flags_before = x.index_select(0, uniq).ne(0).any(dim=1)
        if fixed_tables is not None:
            item, was_seen, flags_before, red = _fix_support(kernel, seg, red, item, fixed_tables,
                                                             was_seen, flags_before)
            seg, uniq, inv, g_index, tables = item
        seg_hp = kernel.row_hyperparameters(hp, tables)
        refused = accumulate_rows_(
            x, uniq, inv, g_index, dual, states, seen, step=step, hp=seg_hp,
            rule_name=kernel.optimizer, rowwise=kernel.rowwise, exact=kernel.exact,
            compiled=compiled, group_size=None if red is None else red.group_size,
            reduce_sum=None if red is None else red.sum, agree=None if red is None else red.any)
        now_nz = x.index_select(0, uniq).ne(0).any(dim=1)
        was_nz = flags_before
        if red is not None:  # a row is non-zero if any of its column shards is
            both = red.any(torch.stack([flags_before, now_nz], dim=1))
            was_nz, now_nz = both[:, 0], both[:, 1]
        kernel.feature_counts_state.add(table_deltas(n_tables, tables, ~refused, was_seen,
                                                     was_nz, now_nz))
        norms = row_group_norms(x, dual, states, uniq, rule=kernel.rule, step=step, hp=seg_hp,
                                exact=kernel.exact, reduce_sum=None if red is None else red.sum)
        kernel.shrink_index.relink(uniq + seg.row_start, tables, consistent_values(
            shrink_values(kernel, norms, tables), now_nz, seg_hp["lambda21"]))
        if bool(refused.any()):
            refused_rows += int(refused.sum())
            refused_tables |= {layout.tables[int(t)].name for t in tables[refused]}
    kernel.feature_counts_state.end()
    kernel.shrink_index.end()
    if refused_rows and kernel.nonfinite == "raise":
        _raise_overflow(refused_rows, list(refused_tables))
    return grad_w
