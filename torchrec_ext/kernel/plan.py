"""The lookup plan of one batch: which rows of which segment each index reads, and its bag.

Built in the forward of the eager (and ``torch.compile``) paths; the native CPU update reads the
raw ``(indices, offsets)`` and needs none of it. Ids and offsets are validated here (or by
FBGEMM's forward, which then only needs :func:`check_ids` to word its error).

One id per bag (the common CTR case) needs no per-index bookkeeping: the bag of index ``k`` is
``k``. If moreover all tables have one width and there are no per-sample weights, the plan is
*batch-major*: rows are ordered like the output ``[B, F * width]``, so the lookup is one gather
into the output and the output gradient is the per-index gradient, without transposes.

Cost: O(number of ids in the batch); per-batch-size constants are cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import TableLayout

__all__ = ["SegmentPlan", "LookupPlan", "make_plan", "check_ids", "check_offsets", "bag_scale"]


@dataclass(frozen=True)
class SegmentPlan:
    features: tuple[int, ...]  # the features whose tables are in this segment
    sel: Tensor | None  # which indices of the batch belong to this segment (None: all)
    rows: Tensor  # segment-local row of each of those indices
    bag: Tensor  # segment-local bag of each index (feature position x batch + sample)
    table: Tensor  # table of each index
    identity_bag: bool  # bag == index position
    batch_major: bool


@dataclass(frozen=True)
class LookupPlan:
    batch: int
    lengths: Tensor | None  # bag lengths (None: one id per bag)
    segments: tuple[SegmentPlan, ...]
    offsets: Tensor
    indices: Tensor
    id_check: tuple[Tensor, Tensor, Tensor]  # (ids, row limits, tables), for check_ids


def check_offsets(offsets: Tensor, n_indices: int) -> None:
    """``ValueError`` unless ``offsets`` starts at 0, never decreases and ends at
    ``n_indices``."""
    if offsets.numel() == 0:
        raise ValueError("Invalid offsets: empty (expected F*B+1 bag boundaries)")
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != n_indices or bool((offsets[1:] < offsets[:-1]).any()):
        bad = int((offsets[1:] < offsets[:-1]).nonzero()[0, 0]) + 1 if bool(
            (offsets[1:] < offsets[:-1]).any()) else None
        raise ValueError(
            f"Invalid offsets: must start at 0, never decrease and end at len(indices)="
            f"{n_indices}; got first {first}, last {last}"
            + (f", offsets[{bad}]={int(offsets[bad])} < offsets[{bad - 1}]="
               f"{int(offsets[bad - 1])}" if bad is not None else ""))


def check_ids(layout: TableLayout, ids: Tensor, limits: Tensor, table: Tensor) -> None:
    """Raise ``ValueError`` naming the table if an id is outside ``[0, limit)``."""
    # 0 <= id < limit  <=>  id | (limit - 1 - id) >= 0: one reduction for both bounds
    if not ids.numel() or int(torch.bitwise_or(limits - 1 - ids, ids).min()) >= 0:
        return
    ids, limits, table = ids.reshape(-1), limits.reshape(-1), table.reshape(-1)
    k = int(((ids < 0) | (ids >= limits)).nonzero()[0, 0])
    t = layout.tables[int(table[k])]
    raise ValueError(
        f"ids out of range for table {t.name!r}: got id {int(ids[k])}, valid "
        f"[0, {t.local_rows}) on this shard; remap or hash ids into the table's "
        "num_embeddings before the lookup")


def _bag_static(layout: TableLayout, ftm: list[int], batch: int, device, cache: dict) -> dict:
    """Per-bag constants for a batch size (cached): bag ids, each bag's feature, table, row
    limit and segment row base, and each segment's feature mask and positions."""
    key = (batch, str(device))
    st = cache.get(key)
    if st is not None:
        return st
    n_features = len(ftm)
    ftm_t = torch.tensor(ftm, device=device)
    limits = torch.tensor([t.local_rows for t in layout.tables], device=device)
    base = torch.tensor([layout.segments[layout.segment_of[i]].row_base[i]
                         for i in range(len(layout.tables))], device=device)
    feature = torch.arange(n_features, device=device).repeat_interleave(batch)
    table = ftm_t[feature]
    segments = []
    for s in range(len(layout.segments)):
        feats = tuple(f for f, t in enumerate(ftm) if layout.segment_of[t] == s)
        fmask = torch.zeros(n_features, dtype=torch.bool, device=device)
        fmask[list(feats)] = True
        pos = torch.full((n_features,), -1, dtype=torch.long, device=device)
        pos[list(feats)] = torch.arange(len(feats), device=device)
        segments.append((feats, fmask, pos))
    st = cache[key] = dict(
        arange=torch.arange(n_features * batch + 1, device=device),
        bags=torch.arange(n_features * batch, device=device), feature=feature,
        table=table, limit=limits[table], base=base[table], segments=segments,
        table_bm=table.view(n_features, batch).t().reshape(-1))
    for k in ("limit", "base"):  # batch-major [B, F] copies
        st[k + "_bm"] = st[k].view(n_features, batch).t().contiguous()
    return st


def make_plan(layout: TableLayout, ftm: list[int], indices: Tensor, offsets: Tensor, batch: int,
              unweighted: bool, check: bool, cache: dict) -> LookupPlan:
    """The plan of a batch; ids validated when ``check`` (see the module docstring)."""
    st = _bag_static(layout, ftm, batch, indices.device, cache)
    n_features = len(ftm)
    n_bags = n_features * batch
    single = len(layout.segments) == 1
    lengths = None
    if not (indices.numel() == n_bags and torch.equal(offsets, st["arange"])):
        lengths = offsets[1:] - offsets[:-1]  # offsets were checked by the forward
    batch_major = single and lengths is None and unweighted
    if batch_major:  # [B, F] order, like the output
        ids = indices.view(n_features, batch).t()
        bag, table, limits, base = st["bags"], st["table_bm"], st["limit_bm"], st["base_bm"]
    elif lengths is None:
        ids, bag, table, limits, base = indices, st["bags"], st["table"], st["limit"], st["base"]
    else:
        ids, bag = indices, torch.repeat_interleave(st["bags"], lengths)
        table, limits, base = st["table"][bag], st["limit"][bag], st["base"][bag]
    if check:
        check_ids(layout, ids, limits, table)
    rows = (base + ids).view(-1)
    if single:
        segs = (SegmentPlan(tuple(range(n_features)), None, rows, bag, table, lengths is None,
                            batch_major),)
    else:
        feature = st["feature"] if lengths is None else st["feature"][bag]
        out = []
        for feats, fmask, pos in st["segments"]:
            sel = fmask[feature]
            # local bag id: position of the feature inside the segment, times batch
            seg_bag = pos[feature[sel]] * batch + bag[sel] % batch
            out.append(SegmentPlan(feats, sel, rows[sel], seg_bag, table[sel], False, False))
        segs = tuple(out)
    return LookupPlan(batch, lengths, segs, offsets, indices, (ids, limits, table))


def bag_scale(plan: LookupPlan, seg: SegmentPlan, weights: Tensor | None, mean: bool,
              dtype: torch.dtype) -> Tensor | None:
    """Per-index factor: the per-sample weight, divided by the bag length for MEAN pooling."""
    scale = weights
    if mean and plan.lengths is not None:  # else: one id per bag, length 1
        feats = torch.tensor(seg.features, device=plan.lengths.device)
        bag_len = plan.lengths.view(-1, plan.batch)[feats].reshape(-1)[seg.bag]
        inv = 1.0 / bag_len.clamp(min=1).to(dtype)
        scale = inv if scale is None else scale * inv
    return scale
