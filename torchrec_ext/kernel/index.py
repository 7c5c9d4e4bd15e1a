"""The shrink-norm index of a :class:`~torchrec_ext.kernel.GroupTBE`: what a ``lambda21`` tuning
needs, kept up to date by the writes themselves instead of a pass over every row.

After a proximal step a seen row is zero iff its shrink norm ``||s||`` (``||A^{-1/2} s||`` with
``exact_group_norm``) is ``<= sqrt(d) * lambda21``. The kernel keeps, per row, ``u = ||s|| /
sqrt(d)`` as of the row's last write (``shrink``, float32, saved with the optimizer state as
``"<table>.shrink"``) and, per table, a histogram of ``u`` over its seen rows in
:data:`BUCKETS` logarithmic buckets (bucket ``b`` holds ``(E_b, E_{b+1}]``, ``E_b`` the float32
whose bit pattern is ``b << SHIFT``: 128 buckets per octave, read off the bits). On CPU with the
native extension every bucket also links its rows (:data:`LANES` doubly linked lists by row id,
12 bytes per row). Shrink norms crowd: on a heavy-tailed workload most rows are seen a few times
and their ``u`` lie within a few buckets (at 4e6 rows per table one bucket held ~8% of them), so
a bucket of more than :data:`SPLIT` rows also gets a *block*: a count and lists for each of its
:data:`RUNS` runs of :data:`RUN` consecutive float32 values, its rows linked there instead (given
back below :data:`MERGE` rows; at most ``rows // MERGE`` blocks per table, :data:`BLOCK_BYTES`
each, reserved but touched only when used). So

- the tuner reads the histograms in O(tables x buckets) instead of computing every row's norm;
- the refinement of the order statistic inside the bucket that holds it reads that bucket's
  run counts (O(RUNS) with a block, a walk of at most SPLIT rows without) and then the value
  counts of one run (a walk of that run);
- the rows whose norm lies between an old and a new threshold (the only rows whose zero/non-zero
  state a new ``lambda21`` changes) come from walks of the buckets in between, and of only the
  runs at either end inside a bucket with a block, in C++.

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

__all__ = ["SHIFT", "BUCKETS", "RUNS", "RUN", "LANES", "SPLIT", "MERGE", "bucket_of", "edge",
           "ShrinkIndex"]

#: low bits of a float32 dropped by the bucketing: 2^(23 - SHIFT) buckets per octave
SHIFT = 16
#: buckets per table (every positive float32, and 0 in bucket 0)
BUCKETS = 1 << (31 - SHIFT)
#: runs per bucket, and float32 values per run (``RUNS * RUN == 2**SHIFT``)
RUNS = 256
RUN = (1 << SHIFT) // RUNS
#: lists per bucket (rows by id modulo LANES): a walk follows them in turn, overlapping misses
LANES = 8
#: a bucket holding more rows than this gets a count and lists per run (a block) ...
SPLIT = 8192
#: ... which it gives back when it holds fewer than this: every bucket with a block holds at
#: least MERGE rows, so a table of ``n`` rows uses at most ``n // MERGE`` blocks
MERGE = 2048
#: bytes of one block (heads and counts of its runs, its place in the pool)
BLOCK_BYTES = RUNS * (4 * LANES + 8) + 4  # + its id in the pool


def bucket_of(u: Tensor) -> Tensor:
    """Bucket of each (float32) value: the largest ``b`` with ``E_b < u`` (0 for ``u <= 0``)."""
    u = u.to(torch.float32).contiguous()
    b = (u.view(torch.int32).to(torch.int64) - 1) >> SHIFT
    return torch.where(u > 0, b, torch.zeros_like(b)).clamp_(max=BUCKETS - 1)


def edge(b: int) -> float:
    """``E_b``: the float32 with bit pattern ``b << SHIFT`` (as a Python float, exactly)."""
    return struct.unpack("<f", struct.pack("<I", int(b) << SHIFT))[0]


def blocks_for(rows: list[int], merge: int = MERGE) -> int:
    """The most blocks tables of ``rows`` rows can use at once (each holds >= ``merge`` rows)."""
    return sum(int(r) // merge for r in rows)


class ShrinkIndex:
    """Histograms (and, natively, bucket and run lists) of one kernel's ``shrink`` values.

    Args:
        kernel: the :class:`~torchrec_ext.kernel.GroupTBE` whose rows are indexed.
        split, merge: a bucket gets a block of per-run counts and lists above ``split`` rows and
            gives it back below ``merge`` (``1 <= merge <= split``): :data:`SPLIT`,
            :data:`MERGE` by default (tests make them small).
    """

    def __init__(self, kernel, split: int = SPLIT, merge: int = MERGE):
        if not 1 <= merge <= split:
            raise ValueError(f"Invalid split/merge: {split}/{merge} (1 <= merge <= split)")
        self.kernel = kernel
        n, t = kernel.layout.num_rows, len(kernel.layout.tables)
        self.linked = native.available() and kernel.weights.device.type == "cpu"
        if self.linked:
            self.split, self.merge = int(split), int(merge)
            blocks = blocks_for([tb.local_rows for tb in kernel.layout.tables], merge)
            self.bucket = torch.full((n,), -1, dtype=torch.int32)
            self.next = torch.full((n,), -1, dtype=torch.int32)
            self.prev = torch.full((n,), -1, dtype=torch.int32)
            self.heads = torch.full((t * BUCKETS * LANES,), -1, dtype=torch.int32)
            self.hist = torch.zeros(t * BUCKETS, dtype=torch.int64)
            self.block = torch.full((t * BUCKETS,), -1, dtype=torch.int32)
            # a block is cleared when a bucket takes it: pages of unused blocks are never touched
            self.run_heads = torch.empty(blocks * RUNS * LANES, dtype=torch.int32)
            self.run_hist = torch.empty(blocks * RUNS, dtype=torch.int64)
            self.pool = torch.empty(3 + blocks, dtype=torch.int32)
            self._reset_blocks()
        self._mode = None  # None: current; "relink": from the stored shrink; "recompute"
        self._pending = None
        self._stamp = self._versions()
        #: no update has run yet (see :meth:`before_first_update`)
        self.pristine = True

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

    def before_first_update(self) -> None:
        """Called by the kernel before its first update. Writes before any row was seen (the
        tables' initialisation, a load of untrained tables) change nothing the index holds: if
        no row is seen and none is linked, a stale index is valid as it is (empty) -- re-stamped
        here, so that the first tuning does not rebuild it (a pass over every row, and every
        seen row's norm recomputed) for nothing. O(rows held) once (the ``seen`` scan), and
        only when stale."""
        self.pristine = False
        if not self.stale():
            return
        if self.linked and bool(self.hist.any()):
            return
        if not bool(self.kernel.seen.any()):
            self._mode = None
            self._stamp = self._versions()

    def begin(self) -> None:
        """Before one of our own (version-moving) writes: remember whether the index was valid."""
        self._pending = not self.stale()

    def end(self) -> None:
        if self._pending:
            self._stamp = self._versions()
        self._pending = None

    def _reset_blocks(self) -> None:
        """Every bucket without a block, every block free (``pool``: split, merge, free count,
        the free ids)."""
        self.block.fill_(-1)
        blocks = self.pool.numel() - 3
        self.pool[:3] = torch.tensor([self.split, self.merge, blocks], dtype=torch.int32)
        self.pool[3:] = torch.arange(blocks, dtype=torch.int32)

    def tensors(self) -> list[Tensor]:
        """What the native ops take (empty without lists)."""
        if not self.linked:
            return []
        return [self.kernel.shrink, self.bucket, self.next, self.prev, self.heads, self.hist,
                self.block, self.run_heads, self.run_hist, self.pool]

    def nbytes(self) -> int:
        """Host bytes of the lists, counts and blocks (``shrink`` itself not included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors()[1:])

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
            self._reset_blocks()
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
        ``(a, b)`` per range). With lists: O(buckets + rows walked), a bucket with a block
        walking only its runs that meet ``(a, b]`` (so a cut inside a bucket of a million rows
        walks the few runs at the cut); else O(rows of those tables)."""
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

    def _bucket_values(self, i: int, b: int) -> Tensor:
        """Without lists: the stored values of the seen rows of local table ``i`` in bucket
        ``b``. O(rows of the table)."""
        k = self.kernel
        u = k.layout.table_view(k.shrink, i, rowwise=True)
        return u[k.row_seen_view(i).bool() & (bucket_of(u) == b)]

    @staticmethod
    def _offsets(u: Tensor, b: int) -> Tensor:
        """Each value's position among the ``2**SHIFT`` float32 values of bucket ``b`` (a value
        ``<= 0`` at 0)."""
        bits = torch.where(u > 0, u.view(torch.int32).long(), torch.zeros_like(u, dtype=torch.long))
        return (bits - ((b << SHIFT) + 1)).clamp(0, (1 << SHIFT) - 1)

    def run_counts(self, i: int, b: int) -> Tensor:
        """int64 ``[RUNS]``: how many seen rows of local table ``i`` in bucket ``b`` lie in each
        run of :data:`RUN` consecutive float32 values (``out[j]``: bit patterns ``(b << SHIFT) +
        1 + j * RUN + [0, RUN)``; a value ``<= 0`` in run 0). O(RUNS) for a bucket with a block,
        O(rows of the bucket) (``<= split``) for one without; without lists O(rows of the
        table)."""
        if self.linked:
            return torch.ops.lightning_sgl.shrink_index_runs(i, b, self.tensors())
        j = self._offsets(self._bucket_values(i, b), b) // RUN
        return torch.bincount(j, minlength=RUNS).cpu()

    def value_counts(self, i: int, b: int, j: int) -> Tensor:
        """int64 ``[RUN]``: how many seen rows of local table ``i`` hold each float32 value of run
        ``j`` of bucket ``b`` (``out[m]``: bit pattern ``(b << SHIFT) + 1 + j * RUN + m``; a
        value ``<= 0`` counts as ``m = 0`` of run 0). O(rows of the run) for a bucket with a
        block, O(rows of the bucket) for one without; without lists O(rows of the table)."""
        if self.linked:
            return torch.ops.lightning_sgl.shrink_index_patterns(i, b, j, self.tensors())
        off = self._offsets(self._bucket_values(i, b), b)
        off = off[off // RUN == j] - j * RUN
        return torch.bincount(off, minlength=RUN).cpu()
