"""Storage layout of a :class:`~torchrec_ext.kernel.GroupTBE`: flat buffers with per-table offsets.

The layout mirrors FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen``: one flat weight buffer for
all tables of a kernel with per-table element offsets, element-wise optimizer state with the same
offsets, row-wise state and the 1-byte ``seen`` flags with one entry per row (per-table row
offsets). Storage order groups tables by their local width, so that every run of equal-width
tables (a *segment*) is one ``[rows, width]`` matrix: the eager update is one vectorised call per
segment. Nothing here allocates per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TableSpec", "Segment", "TableLayout"]


@dataclass(frozen=True)
class TableSpec:
    """One local (shard of a) table. ``embedding_dim`` is the full width of the table's rows."""

    name: str
    local_rows: int
    local_cols: int
    embedding_dim: int | None = None
    row_offset: int = 0
    col_offset: int = 0

    @property
    def full_dim(self) -> int:
        return self.embedding_dim or self.local_cols

    @property
    def column_sharded(self) -> bool:
        return self.full_dim != self.local_cols


class Segment:
    """A run of tables of equal local width, stored as one ``[rows, width]`` block."""

    def __init__(self, width: int, elem_start: int, row_start: int):
        self.width = width
        self.tables: list[int] = []  # table indices (config order), in storage order
        self.row_base: dict[int, int] = {}  # table index -> first row inside the segment
        self.rows = 0
        self.elem_start = elem_start  # element offset in the flat buffers
        self.row_start = row_start  # row offset in the flat row-wise buffers
        #: names of the column-sharded tables in this segment, sorted (collective order)
        self.column_tables: list[str] = []


class TableLayout:
    """Offsets of every table in the flat buffers, segments of equal width, and views."""

    def __init__(self, tables: Sequence[TableSpec]):
        self.tables = list(tables)
        order = sorted(range(len(self.tables)), key=lambda i: self.tables[i].local_cols)
        self.weights_offsets = [0] * len(self.tables)  # into the flat element buffers
        self.row_offsets = [0] * len(self.tables)  # into the flat row buffers
        self.segment_of = [0] * len(self.tables)
        self.segments: list[Segment] = []
        elem, row = 0, 0
        for i in order:
            t = self.tables[i]
            if not self.segments or self.segments[-1].width != t.local_cols:
                self.segments.append(Segment(t.local_cols, elem, row))
            seg = self.segments[-1]
            seg.row_base[i] = seg.rows
            seg.tables.append(i)
            seg.rows += t.local_rows
            self.segment_of[i] = len(self.segments) - 1
            self.weights_offsets[i] = elem
            self.row_offsets[i] = row
            elem += t.local_rows * t.local_cols
            row += t.local_rows
        self.num_elements, self.num_rows = elem, row
        self._check_column_shards()
        for seg in self.segments:
            seg.column_tables = sorted({self.tables[i].name for i in seg.tables
                                        if self.tables[i].column_sharded})
        #: per-table int64 vectors for the native update: element offset, row offset, width, rows
        self.native_tables = tuple(torch.tensor(v, dtype=torch.int64) for v in (
            self.weights_offsets, self.row_offsets, [t.local_cols for t in self.tables],
            [t.local_rows for t in self.tables]))

    def _check_column_shards(self) -> None:
        widths: dict[str, set[int]] = {}
        for t in self.tables:
            if t.column_sharded:
                widths.setdefault(t.name, set()).add(t.local_cols)
        for name, w in widths.items():
            if len(w) > 1:
                raise ValueError(f"column shards of table {name!r} on one rank have different "
                                 f"widths {sorted(w)}; use equal column shards")

    @property
    def has_column_shards(self) -> bool:
        return any(seg.column_tables for seg in self.segments)

    def segment_view(self, buf: Tensor, seg: Segment, rowwise: bool = False) -> Tensor:
        """``[rows, width]`` (or ``[rows, 1]`` for row buffers) view of a segment."""
        if rowwise:
            return buf[seg.row_start: seg.row_start + seg.rows].view(seg.rows, 1)
        return buf[seg.elem_start: seg.elem_start + seg.rows * seg.width].view(seg.rows, seg.width)

    def table_view(self, buf: Tensor, i: int, rowwise: bool = False) -> Tensor:
        """``[rows, cols]`` view of table ``i`` (``[rows]`` for row buffers); aliases ``buf``."""
        t = self.tables[i]
        if rowwise:
            return buf[self.row_offsets[i]: self.row_offsets[i] + t.local_rows]
        off = self.weights_offsets[i]
        return buf[off: off + t.local_rows * t.local_cols].view(t.local_rows, t.local_cols)

    def segment_row_tables(self, seg: Segment, rows: Tensor) -> Tensor:
        """The table index of each of ``rows`` (segment-local row numbers)."""
        tables = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
        for i in seg.tables:
            lo = seg.row_base[i]
            tables[(rows >= lo) & (rows < lo + self.tables[i].local_rows)] = i
        return tables
