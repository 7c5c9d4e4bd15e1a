"""Row services of :class:`~torchrec_ext.kernel.GroupTBE`: column-shard reductions, incremental
feature counts, shrink and weight norms of seen rows, prox re-application, magnitude pruning.

Cost model (``U`` = rows touched, ``S`` = rows seen, ``R`` = rows held):

- feature counts are kept per table and updated in O(U) by every operation that changes rows
  (the update, :func:`reapply_prox`, :func:`prune`); reading them is O(tables). A write by
  anyone else (a checkpoint load, a user's ``copy_``) is detected by the buffers' version
  counters and triggers one O(R) recount;
- norms, re-application and pruning are O(S) and, for column-sharded tables, one all-reduce per
  table.

Column shards: a table split by columns holds only part of every group (row). Per-row partial
sums of squares (group norm, row-wise second moment) are all-reduced over the process group of
the table's shards, and so are per-row decisions (skip a row, is the row non-zero), so that every
shard of a row does the same thing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_sgl.optim.functional import reprox_rows_, row_group_norms, support_rows

from . import native
from .layout import Segment, TableLayout

__all__ = ["ColumnReducer", "row_tables", "table_deltas", "FeatureCounts", "shrink_values",
           "consistent_values"]


def row_tables(n: int, inv: Tensor, index_tables: Tensor) -> Tensor:
    """The table of each of ``n`` unique rows from the table of each index."""
    return torch.zeros(n, dtype=torch.long, device=inv.device).scatter_(0, inv, index_tables)


class ColumnReducer:
    """Reductions over the column shards of the rows of one segment (``rows_tables``: the table
    of each row). Every method is collective over each column-sharded table's group, in sorted
    table order (the same on every rank); shards of one table on this rank are combined first."""

    def __init__(self, layout: TableLayout, seg: Segment, rows_tables: Tensor,
                 groups: dict[str, dist.ProcessGroup | None], dtype: torch.dtype):
        self.names = seg.column_tables
        full = torch.tensor([float(layout.tables[i].full_dim) if i in seg.row_base else 0.0
                             for i in range(len(layout.tables))], device=rows_tables.device,
                            dtype=dtype)
        self.group_size = full[rows_tables].unsqueeze(1)
        by_name = {n: [i for i in seg.tables if layout.tables[i].name == n] for n in self.names}
        self.masks = {n: [rows_tables == i for i in by_name[n]] for n in self.names}
        self.groups = groups

    def _reduce(self, values: Tensor, op, combine) -> Tensor:
        out = values.clone()
        for name in self.names:  # sorted: the same collective order on every rank
            masks = self.masks[name]
            total = values[masks[0]]
            for m in masks[1:]:
                total = combine(total, values[m])
            pg = self.groups.get(name)
            if pg is not None:
                total = total.contiguous()
                dist.all_reduce(total, op=op, group=pg)
            for m in masks:
                out[m] = total
        return out

    def sum(self, partial: Tensor) -> Tensor:
        """Per-row partial sums (``[U, 1]``) summed over the shards of each row."""
        return self._reduce(partial, dist.ReduceOp.SUM, torch.add)

    def any(self, flags: Tensor) -> Tensor:
        """Per-row boolean flags (``[U]`` or ``[U, k]``) OR-ed over the shards of each row."""
        return self._reduce(flags.to(torch.uint8), dist.ReduceOp.MAX, torch.maximum).bool()


def table_deltas(n_tables: int, tables: Tensor, written: Tensor, was_seen: Tensor,
                 was_nz: Tensor, now_nz: Tensor) -> Tensor:
    """``[T, 2]`` changes of (rows seen, seen rows non-zero) from an update of some rows."""
    seen = torch.bincount(tables[written & ~was_seen], minlength=n_tables)
    before = torch.bincount(tables[written & was_seen & was_nz], minlength=n_tables)
    after = torch.bincount(tables[written & now_nz], minlength=n_tables)
    return torch.stack([seen, after - before], dim=1).to(torch.int64)


class FeatureCounts:
    """Per local table: ``(rows seen, seen rows non-zero)``, kept up to date incrementally.

    ``counts`` is an int64 ``[T, 2]`` tensor that the update (native or eager) and the row
    services change by the deltas of the rows they write. The counts are *stale* -- and
    :meth:`recount` rebuilds them in O(rows) -- after a write by anyone else: every load path of
    the kernel (its fused optimizer's and module's ``load_state_dict``, ``TorchRecStrategy``'s
    checkpoint load) calls :meth:`invalidate`, and the version counters of the weights and
    ``seen`` buffers catch in-place writes through the kernel's own views. Our own eager writes
    are bracketed by :meth:`begin` / :meth:`end`, which keep valid counts valid (and stale ones
    stale); the native update writes without touching the version counters.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.counts = torch.zeros(len(kernel.layout.tables), 2, dtype=torch.int64)
        self._valid = True
        self._pending = None
        self._stamp = self._versions()

    def _versions(self) -> tuple[int, int]:
        return self.kernel.weights._version, self.kernel.seen._version

    def invalidate(self) -> None:
        self._valid = False

    def begin(self) -> None:
        """Before one of our writes: remember whether the counts were valid."""
        self._pending = self._valid and self._versions() == self._stamp
        if not self._pending:
            self._valid = False

    def end(self) -> None:
        """After one of our writes (see :meth:`begin`)."""
        if self._pending:
            self._stamp = self._versions()
        self._pending = None

    def stale(self) -> bool:
        return not self._valid or self._versions() != self._stamp

    def add(self, deltas: Tensor) -> None:
        self.counts += deltas.to(self.counts.device)

    @torch.no_grad()
    def local_flags(self, i: int) -> tuple[Tensor, Tensor]:
        """``(seen, non-zero here)`` per row of local table ``i`` (a full O(rows) scan)."""
        k, layout = self.kernel, self.kernel.layout
        return (layout.table_view(k.seen, i, rowwise=True).bool(),
                layout.table_view(k.weights, i).ne(0).any(dim=1))

    @torch.no_grad()
    def recount(self, nonzero: dict[int, Tensor] | None = None) -> None:
        """Rebuild from the buffers; ``nonzero`` may give, per local table, row flags already
        combined over column shards (else this shard's own columns decide). O(rows held) for
        the ``seen`` flags and O(rows seen x d) for the values (unseen rows are not read)."""
        k, layout = self.kernel, self.kernel.layout
        for i in range(len(layout.tables)):
            seen = layout.table_view(k.seen, i, rowwise=True).bool()
            rows = seen.nonzero().view(-1)  # only the seen rows' values are read: O(rows seen x d)
            if nonzero is not None and i in nonzero:
                nz = nonzero[i].index_select(0, rows)
            else:
                nz = layout.table_view(k.weights, i).index_select(0, rows).ne(0).any(dim=1)
            self.counts[i, 0] = rows.numel()
            self.counts[i, 1] = int(nz.sum())
        self._valid = True
        self._pending = None
        self._stamp = self._versions()

    def table(self, i: int) -> tuple[int, int]:
        return int(self.counts[i, 0]), int(self.counts[i, 1])


# --------------------------------------------------------------------------- seen-row services
def seen_rows(kernel, seg: Segment) -> tuple[Tensor, Tensor]:
    """Segment-local numbers of the seen rows of ``seg`` and their tables. O(segment rows)."""
    layout = kernel.layout
    rows = layout.segment_view(kernel.seen, seg, rowwise=True).view(-1).nonzero().view(-1)
    return rows, layout.segment_row_tables(seg, rows)


def segment_state(kernel, seg: Segment):
    """``(weights, dual, states)`` views of a segment (row-wise states as ``[rows, 1]``)."""
    layout = kernel.layout
    return (layout.segment_view(kernel.weights, seg), layout.segment_view(kernel.dual, seg),
            tuple(layout.segment_view(getattr(kernel, n), seg, kernel.is_rowwise(n))
                  for n in kernel.state_names))


#: seen rows of a segment from which the row services (norms, prox re-application) run
#: ``torch.compile``'d (one fused gather -> compute -> scatter loop instead of ~15 tensor passes;
#: ~5x at 4e5 rows); below it the compile would cost more than it saves
COMPILE_MIN_ROWS = 1 << 16


def _compiled_rows(kernel, rows: Tensor, red) -> bool:
    return kernel.compiled is not False and red is None and rows.numel() >= COMPILE_MIN_ROWS


def reducer(kernel, seg: Segment, tables: Tensor) -> ColumnReducer | None:
    if not seg.column_tables:
        return None
    return ColumnReducer(kernel.layout, seg, tables, kernel.column_groups, kernel.weights.dtype)


def shrink_values(kernel, norms: Tensor, tables: Tensor) -> Tensor:
    """What the shrink-norm index stores for rows of local tables ``tables`` with group norms
    ``norms``: ``norm / sqrt(d)`` (``d`` the table's full width), float32."""
    full = torch.tensor([float(t.full_dim) ** 0.5 for t in kernel.layout.tables],
                        dtype=norms.dtype, device=norms.device)
    return (norms.reshape(-1) / full[tables]).to(torch.float32)


def consistent_values(values: Tensor, nonzero: Tensor, lambda21) -> Tensor:
    """The values the index stores (``consistent_u`` of the native kernel): each row's ``u``
    moved, where the prox's own ``norm <= sqrt(d) * lambda21`` test rounded the other way (only
    ever for ``u`` within a float32 step of ``lambda21``), to the nearest float32 on the side
    of ``lambda21`` that matches the row's zero / non-zero state -- so that the index's count
    above ``lambda21`` is the feature count. ``lambda21``: a float or per-row ``[n, 1]``."""
    lam = torch.as_tensor(lambda21, dtype=torch.float64, device=values.device).reshape(-1)
    lam = lam.expand(values.numel()) if lam.numel() == 1 else lam
    below = lam.to(torch.float32)
    below = torch.where(below.double() > lam, torch.nextafter(below, torch.tensor(-float("inf"))),
                        below)
    above = torch.nextafter(below, torch.tensor(float("inf")))
    v = values.reshape(-1)
    over = v.double() > lam
    nz = nonzero.reshape(-1).to(v.device)
    return torch.where(nz, torch.where(over, v, above), torch.where(over, below, v))


def _segment_rows(kernel, seg: Segment, selected: Tensor | None) -> tuple[Tensor, Tensor]:
    """The seen rows of ``seg`` (``selected``: only those of these kernel rows, sorted)."""
    if selected is None:
        return seen_rows(kernel, seg)
    sel = selected.to(kernel.seen.device)
    sel = sel[(sel >= seg.row_start) & (sel < seg.row_start + seg.rows)] - seg.row_start
    rows = sel[kernel.layout.segment_view(kernel.seen, seg, rowwise=True).view(-1)
               .index_select(0, sel).bool()]
    return rows, kernel.layout.segment_row_tables(seg, rows)


@torch.no_grad()
def store_shrink_norms(kernel) -> None:
    """Recompute the stored shrink norm of every seen row from the tables' state (the index
    rebuild after an outside write), consistent with the rows' zero / non-zero state
    (:func:`consistent_values`; a column-sharded table's rows as computed). O(S); collective for
    column-sharded tables."""
    hp = kernel.current_hyperparameters()
    for seg, rows, tables, norms in _seen_norms(kernel):
        values = shrink_values(kernel, norms, tables)
        if not seg.column_tables:
            x = kernel.layout.segment_view(kernel.weights, seg)
            values = consistent_values(values, x.index_select(0, rows).ne(0).any(dim=1),
                                       kernel.row_hyperparameters(hp, tables)["lambda21"])
        kernel.shrink.index_copy_(0, rows + seg.row_start, values)


@torch.no_grad()
def reapply_prox(kernel, selected: Tensor | None = None) -> None:
    """The proximal step with the current hyperparameters on every seen row (``selected``: on
    those of these kernel rows, sorted and unique) -- of a table with a fixed support, on its
    support rows only (``support_rows``) -- counts updated from the rows' before/after state,
    their shrink norms stored and relinked in the index. Natively for ``native.REPROX_RULES``
    on the native engine, else eager. O(rows re-applied x d); collective for column-sharded
    tables (``selected`` must then be the same rows on every shard)."""
    step = max(float(kernel.step.item()), 1.0)
    hp = kernel.current_hyperparameters()
    if _native_reprox_applies(kernel):
        _native_reprox(kernel, selected, step, hp)
        return
    fixed_tables = kernel.fixed_table_mask()
    kernel.feature_counts_state.begin()
    kernel.shrink_index.begin()
    for seg in kernel.layout.segments:
        rows, tables = _segment_rows(kernel, seg, selected)
        red = reducer(kernel, seg, tables)
        x, dual, states = segment_state(kernel, seg)
        was_nz = x.index_select(0, rows).ne(0).any(dim=1)
        if red is not None:
            was_nz = red.any(was_nz)
        if fixed_tables is not None and bool(fixed_tables[tables].any()):
            keep = ~fixed_tables[tables] | support_rows(was_nz.unsqueeze(1))
            rows, tables, was_nz = rows[keep], tables[keep], was_nz[keep]
            red = reducer(kernel, seg, tables)
        row_hp = kernel.row_hyperparameters(hp, tables)
        norms = row_group_norms(x, dual, states, rows, rule=kernel.rule, step=step, hp=row_hp,
                                exact=kernel.exact, reduce_sum=None if red is None else red.sum,
                                compiled=_compiled_rows(kernel, rows, red))
        refused = reprox_rows_(x, dual, states, rows, rule=kernel.rule, step=step,
                               hp=row_hp, exact=kernel.exact,
                               group_size=None if red is None else red.group_size,
                               reduce_sum=None if red is None else red.sum,
                               compiled=_compiled_rows(kernel, rows, red))
        now_nz = x.index_select(0, rows).ne(0).any(dim=1)
        if red is not None:
            now_nz = red.any(now_nz)
        ones = torch.ones_like(was_nz)
        kernel.feature_counts_state.add(table_deltas(len(kernel.layout.tables), tables, ~refused,
                                                     ones, was_nz, now_nz))
        kernel.shrink_index.relink(rows + seg.row_start, tables, consistent_values(
            shrink_values(kernel, norms, tables), now_nz, row_hp["lambda21"]))
    kernel.feature_counts_state.end()
    kernel.shrink_index.end()


def _native_reprox(kernel, selected: Tensor | None, step: float, hp: dict) -> None:
    """:func:`reapply_prox` on the native engine (CPU, no column shards, a rule of
    ``native.REPROX_RULES``): one C++ pass over the rows, the update's own row loop with a zero
    gradient (``tests/torchrec/test_kernel.py`` compares it with the eager re-application).
    O(rows x dim)."""
    rows = kernel.seen.nonzero().view(-1) if selected is None else selected.to(torch.long)
    if selected is not None and rows.numel():  # sorted and unique (reapply_prox's contract)
        rows = rows[kernel.seen.index_select(0, rows).bool()]
    if not rows.numel():
        return
    args, kwargs = _native_buffers(kernel, step, hp)
    # a row whose result would not be finite keeps its values, as in the eager path
    native.reprox(rows.contiguous(), *args, **kwargs)


def _native_reprox_applies(kernel) -> bool:
    """Whether the prox is re-applied natively: the native engine and a rule whose
    zero-gradient step is the prox alone (``native.REPROX_RULES``)."""
    return kernel.engine() == "native" and kernel.optimizer in native.REPROX_RULES


def _native_buffers(kernel, step: float, hp: dict) -> tuple[tuple, dict]:
    """What the native re-applications take after their rows: the tables, the buffers, the
    hyperparameter matrix at ``step``, the counts and the index; the rule's flags."""
    return ((kernel.layout.native_tables, kernel.weights, kernel.dual,
             [getattr(kernel, n) for n in kernel.state_names], kernel.seen,
             kernel.native_hp(hp).at(step), kernel.feature_counts_state.counts,
             kernel.shrink_index.tensors()),
            dict(rule=kernel.optimizer, rowwise=kernel.rowwise, exact=kernel.exact))


def reapply_prox_between_native(kernel, ranges: list[tuple[int, int, int]],
                                bounds: list[tuple[float, float]]) -> int | None:
    """:func:`reapply_prox` on the seen rows of local table ``t`` whose stored shrink (the
    index's ``u``) lies in ``(a, b]``, for every ``(t, lo, hi)`` of ``ranges`` (``[lo, hi]``:
    the buckets that hold ``(a, b]``) and ``(a, b)`` of ``bounds`` -- natively in one pass: the
    index walk hands each row straight to the update's row loop (no list of rows back to
    Python, no sort). The same rows, and for each the same step, as ``reapply_prox(kernel,
    rows_in(ranges, bounds))``. Returns the rows re-applied, or ``None`` where this path does
    not apply (not the native engine, a rule outside ``native.REPROX_RULES``, no native index):
    the caller then takes that general path. O(rows of the runs walked + rows re-applied x d),
    no collective (the native engine has no column shards)."""
    index = kernel.shrink_index
    if not (_native_reprox_applies(kernel) and index.linked):
        return None
    if not ranges:
        return 0
    args, kwargs = _native_buffers(kernel, max(float(kernel.step.item()), 1.0),
                                   kernel.current_hyperparameters())
    done, _ = native.reprox_between(  # a refused row keeps its values, as in reapply_prox
        torch.tensor(ranges, dtype=torch.int64).view(-1, 3),
        torch.tensor(bounds, dtype=torch.float64).view(-1, 2), *args, **kwargs)
    return done


def _seen_norms(kernel):
    """Per segment: ``(segment, seen rows, their tables, their shrink norms [S, 1])``."""
    step = max(float(kernel.step.item()), 1.0)
    hp = kernel.current_hyperparameters()
    for seg in kernel.layout.segments:
        rows, tables = seen_rows(kernel, seg)
        red = reducer(kernel, seg, tables)
        x, dual, states = segment_state(kernel, seg)
        norms = row_group_norms(x, dual, states, rows, rule=kernel.rule, step=step,
                                hp=kernel.row_hyperparameters(hp, tables), exact=kernel.exact,
                                reduce_sum=None if red is None else red.sum,
                                compiled=_compiled_rows(kernel, rows, red))
        yield seg, rows, tables, norms


@torch.no_grad()
def shrink_norms(kernel) -> dict[str, Tensor]:
    """Per table: the shrink norms of its seen rows (see ``GroupTBE.shrink_norms``)."""
    out: dict[str, list] = {}
    for seg, _, tables, norms in _seen_norms(kernel):
        _by_table(kernel, seg, tables, norms.view(-1), out)
    return {k: torch.cat(v) for k, v in out.items()}


def _weight_norms(kernel, seg: Segment):
    rows, tables = seen_rows(kernel, seg)
    red = reducer(kernel, seg, tables)
    x = kernel.layout.segment_view(kernel.weights, seg).index_select(0, rows)
    sq = (x * x).sum(dim=1, keepdim=True)
    return rows, tables, torch.sqrt(red.sum(sq) if red is not None else sq).view(-1)


@torch.no_grad()
def weight_norms(kernel) -> dict[str, Tensor]:
    """Per table: full-row L2 norms of its seen rows (column shards combined)."""
    out: dict[str, list] = {}
    for seg in kernel.layout.segments:
        _, tables, norms = _weight_norms(kernel, seg)
        _by_table(kernel, seg, tables, norms, out)
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def prune(kernel, thresholds: dict[str, float]) -> None:
    """Zero every seen row of table ``t`` whose full-row norm is ``<= thresholds[t]``; counts
    updated (pruned rows that were non-zero stop counting). A column-sharded row is zeroed on
    all its shards when any shard's threshold drops it (the decision is all-reduced), so a row
    is never left half pruned. O(S); collective for CW."""
    n = len(kernel.layout.tables)
    kernel.feature_counts_state.begin()
    for seg in kernel.layout.segments:
        rows, tables, norms = _weight_norms(kernel, seg)
        thr = torch.tensor([float(thresholds.get(t.name, -1.0)) for t in kernel.layout.tables],
                           dtype=norms.dtype, device=norms.device)[tables]
        drop = norms <= thr
        red = reducer(kernel, seg, tables)
        if red is not None:
            drop = red.any(drop)
        nz = norms > 0
        kernel.layout.segment_view(kernel.weights, seg).index_fill_(0, rows[drop], 0.0)
        ones = torch.ones_like(drop)
        kernel.feature_counts_state.add(table_deltas(n, tables, drop, ones, nz, ~ones))
    kernel.feature_counts_state.end()


def _by_table(kernel, seg: Segment, tables: Tensor, values: Tensor, out: dict) -> None:
    """Append each table's entries of ``values`` (one per seen row) to ``out[name]``; a
    column-sharded table's rows only from its column-offset-0 shard (reported once)."""
    for i in seg.tables:
        if kernel.layout.tables[i].col_offset == 0:
            out.setdefault(kernel.layout.tables[i].name, []).append(values[tables == i])


@torch.no_grad()
def sync_column_shards(kernel) -> None:
    """Copy row-wise state and ``seen`` from each column-sharded table's column-offset-0 shard
    to its other shards (a checkpoint load fills only the owner's copy). Collective."""
    layout = kernel.layout
    rowwise_names = [n for n in kernel.state_names if kernel.is_rowwise(n)] + ["seen", "shrink"]
    names = sorted({t.name for t in layout.tables if t.column_sharded})
    for name in names:
        local = [i for i, t in enumerate(layout.tables) if t.name == name]
        owner = next((i for i in local if layout.tables[i].col_offset == 0), None)
        for state in rowwise_names:
            buf = getattr(kernel, state)
            src = layout.table_view(buf, owner if owner is not None else local[0], True)
            pg = kernel.column_groups.get(name)
            if pg is not None:
                dist.broadcast(src, src=kernel.column_owners[name], group=pg)
            for i in local:
                dst = layout.table_view(buf, i, True)
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
