"""The shrink-norm index of a :class:`~torchrec_ext.kernel.GroupTBE`: what a ``lambda21`` tuning
needs, kept up to date by the writes themselves instead of a pass over every row.

After a proximal step a seen row is zero iff its shrink norm ``||s||`` (``||A^{-1/2} s||`` with
``exact_group_norm``) is ``<= sqrt(d) * lambda21``. The kernel keeps, per row, ``u = ||s|| /
sqrt(d)`` as of the row's last write (``shrink``, float32, saved with the optimizer state as
``"<table>.shrink"``) and, per table, a histogram of ``u`` over its seen rows in
:data:`BUCKETS` logarithmic buckets (bucket ``b`` holds ``(E_b, E_{b+1}]``, ``E_b`` the float32
whose bit pattern is ``b << SHIFT``: 128 buckets per octave, read off the bits). On CPU with the
native extension every bucket also links its rows (:data:`LANES` doubly linked lists by row id,
12 bytes per row), so

- the tuner reads the histograms in O(tables x buckets) instead of computing every row's norm;
- the value counts of one bucket (the refinement of the order statistic) and the rows whose
  norm lies between an old and a new threshold (the only rows whose zero/non-zero state a new
  ``lambda21`` changes) come from one walk of the buckets concerned, in C++.

Writers: the native update relinks the rows it writes (O(1) each, in the row loop); the eager
update, the prox re-application and the refit's first-seen rows relink theirs through
``shrink_index_relink`` (O(rows written)). The value stored is ``u`` moved, where the prox's own
float32 test ``norm <= sqrt(d) * lambda21`` rounded the other way (only ever for ``u`` within a
float32 step of ``lambda21``), to the float32 on the side of ``lambda21`` that matches the row's
zero state (``consistent_u`` in C++, :func:`.rows.consistent_values`): the count of seen rows
with ``u > lambda21`` is then exactly the table's non-zero count. Anything else that writes the tables (a checkpoint
load, magnitude pruning, a user's ``copy_``) makes the index stale: the version counters of the
weights, dual, ``seen`` and ``shrink`` buffers catch it (the native update does not move them),
and the next use rebuilds the index in O(rows) -- from the stored ``shrink`` after a load (it
was loaded with the rest, so a resumed run sees the same index as an uninterrupted one), from
the tables' state otherwise. Without the native extension (CUDA, a torch-only install) there are
no lists: the histograms and the rows of a bucket range come from a vectorised pass over
``shrink`` (O(rows held), on the device).
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

from . import native

__all__ = ["SHIFT", "BUCKETS", "LANES", "bucket_of", "edge", "ShrinkIndex"]

#: low bits of a float32 dropped by the bucketing: 2^(23 - SHIFT) buckets per octave
SHIFT = 16
#: buckets per table (every positive float32, and 0 in bucket 0)
BUCKETS = 1 << (31 - SHIFT)
#: lists per bucket (rows by id modulo LANES): a walk follows them in turn, overlapping misses
LANES = 8


def bucket_of(u: Tensor) -> Tensor:
    """Bucket of each (float32) value: the largest ``b`` with ``E_b < u`` (0 for ``u <= 0``)."""
    u = u.to(torch.float32).contiguous()
    b = (u.view(torch.int32).to(torch.int64) - 1) >> SHIFT
    return torch.where(u > 0, b, torch.zeros_like(b)).clamp_(max=BUCKETS - 1)


def edge(b: int) -> float:
    """``E_b``: the float32 with bit pattern ``b << SHIFT`` (as a Python float, exactly)."""
    return struct.unpack("<f", struct.pack("<I", int(b) << SHIFT))[0]


class ShrinkIndex:
    """Histograms (and, natively, bucket lists) of one kernel's ``shrink`` values."""

    def __init__(self, kernel):
        self.kernel = kernel
        n, t = kernel.layout.num_rows, len(kernel.layout.tables)
        self.linked = native.available() and kernel.weights.device.type == "cpu"
        if self.linked:
            self.bucket = torch.full((n,), -1, dtype=torch.int32)
            self.next = torch.full((n,), -1, dtype=torch.int32)
            self.prev = torch.full((n,), -1, dtype=torch.int32)
            self.heads = torch.full((t * BUCKETS * LANES,), -1, dtype=torch.int32)
            self.hist = torch.zeros(t * BUCKETS, dtype=torch.int64)
        self._mode = None  # None: current; "relink": from the stored shrink; "recompute"
        self._pending = None
        self._stamp = self._versions()

    # ------------------------------------------------------------------ validity
    def _versions(self) -> tuple[int, ...]:
        k = self.kernel
        return k.weights._version, k.dual._version, k.seen._version, k.shrink._version

    def invalidate(self, recompute: bool) -> None:
        """The tables were written by someone else: rebuild before the next use (from the
        stored ``shrink`` if it was written with them, else from the tables' state)."""
        if recompute or self._mode is None:
            self._mode = "recompute" if recompute else "relink"

    def stale(self) -> bool:
        return self._mode is not None or self._versions() != self._stamp

    def needs_recompute(self) -> bool:
        """Stale, and not only by a load that brought the ``shrink`` values with it."""
        return self.stale() and self._mode != "relink"

    def begin(self) -> None:
        """Before one of our own (version-moving) writes: remember whether the index was valid."""
        self._pending = not self.stale()

    def end(self) -> None:
        if self._pending:
            self._stamp = self._versions()
        self._pending = None

    def tensors(self) -> list[Tensor]:
        """What the native ops take (empty without lists)."""
        if not self.linked:
            return []
        return [self.kernel.shrink, self.bucket, self.next, self.prev, self.heads, self.hist]

    # ------------------------------------------------------------------ writes
    def relink(self, rows: Tensor, tables: Tensor, values: Tensor) -> None:
        """Store ``values`` as the shrink of kernel rows ``rows`` (of local tables ``tables``)
        and move them to their buckets. O(len(rows))."""
        values = values.detach().reshape(-1).to(torch.float32)
        if self.linked:
            torch.ops.lightning_sgl.shrink_index_relink(
                rows.reshape(-1).long().cpu().contiguous(), tables.reshape(-1).long().cpu()
                .contiguous(), values.cpu().contiguous(), self.tensors())
        else:
            self.kernel.shrink.index_copy_(0, rows.reshape(-1).long(), values)

    @torch.no_grad()
    def ensure(self, recompute: bool | None = None) -> None:
        """Rebuild if stale: O(rows held), and to recompute (an outside write, or ``recompute``
        -- then also when not stale) the shrink norms of the seen rows: collective for
        column-sharded tables, so every rank must then call it (``feature_rate`` agrees on
        it over the ranks)."""
        if not recompute and not self.stale():
            return
        from . import rows as row_services

        k = self.kernel
        recompute = bool(recompute) or self._mode != "relink"
        self._mode = None
        if recompute:
            row_services.store_shrink_norms(k)
        if self.linked:
            for buf, v in ((self.bucket, -1), (self.next, -1), (self.prev, -1), (self.heads, -1)):
                buf.fill_(v)
            self.hist.zero_()
            rows = k.seen.nonzero().view(-1)
            self.relink(rows, self.local_tables(rows), k.shrink.index_select(0, rows))
        self._stamp = self._versions()

    # ------------------------------------------------------------------ reads
    def local_tables(self, rows: Tensor) -> Tensor:
        """The local table of each kernel row."""
        offs = torch.tensor(self.kernel.layout.row_offsets, device=rows.device)
        order = offs.argsort()
        return order[torch.searchsorted(offs[order], rows, right=True) - 1]

    def histogram(self, i: int) -> Tensor:
        """int64 ``[BUCKETS]``: seen rows of local table ``i`` per bucket. O(buckets) with
        lists, else O(rows of the table)."""
        if self.linked:
            return self.hist[i * BUCKETS: (i + 1) * BUCKETS]
        k = self.kernel
        seen = k.row_seen_view(i).bool()
        u = k.layout.table_view(k.shrink, i, rowwise=True)[seen]
        return torch.bincount(bucket_of(u), minlength=BUCKETS).cpu()

    def rows_in(self, ranges: list[tuple[int, int, int]],
                bounds: list[tuple[float, float]] | None = None) -> Tensor:
        """Sorted kernel rows of local table ``t`` in buckets ``[lo, hi]``, for every
        ``(t, lo, hi)``; with ``bounds``, only those whose stored value lies in ``(a, b]`` (one
        ``(a, b)`` per range). O(rows of the buckets walked + buckets) with lists, else O(rows
        of those tables)."""
        if not ranges:
            return torch.zeros(0, dtype=torch.long)
        if bounds is None:
            bounds = [(float("-inf"), float("inf"))] * len(ranges)
        if self.linked:
            out = torch.ops.lightning_sgl.shrink_index_rows(
                torch.tensor(ranges, dtype=torch.int64).view(-1, 3),
                torch.tensor(bounds, dtype=torch.float64).view(-1, 2), self.tensors())
            return out.sort().values
        k = self.kernel
        parts = []
        for (i, lo, hi), (a, b) in zip(ranges, bounds):
            base = k.layout.row_offsets[i]
            u = k.layout.table_view(k.shrink, i, rowwise=True)
            bk = bucket_of(u)
            sel = (k.row_seen_view(i).bool() & (bk >= lo) & (bk <= hi) & (u.double() > a)
                   & (u.double() <= b))
            parts.append(sel.nonzero().view(-1) + base)
        return torch.cat(parts).sort().values.cpu()

    def value_counts(self, i: int, b: int) -> Tensor:
        """int64 ``[2**SHIFT]``: how many seen rows of local table ``i`` in bucket ``b`` hold each
        of the bucket's float32 values (``out[j]``: bit pattern ``(b << SHIFT) + 1 + j``; a value
        ``<= 0`` counts as ``j = 0``). O(rows of the bucket) with lists, else O(rows of the
        table)."""
        if self.linked:
            return torch.ops.lightning_sgl.shrink_index_patterns(i, b, self.tensors())
        k = self.kernel
        u = k.layout.table_view(k.shrink, i, rowwise=True)
        u = u[k.row_seen_view(i).bool() & (bucket_of(u) == b)]
        bits = torch.where(u > 0, u.view(torch.int32).long(), torch.zeros_like(u, dtype=torch.long))
        j = (bits - ((b << SHIFT) + 1)).clamp(0, (1 << SHIFT) - 1)
        return torch.bincount(j, minlength=1 << SHIFT).cpu()
