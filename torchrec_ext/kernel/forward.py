"""The forward of :class:`~torchrec_ext.kernel.GroupTBE`: pooled lookups (SUM or MEAN).

On CPU float32 tables it is FBGEMM's own CPU TBE forward (``split_embedding_codegen_forward_cpu``,
a JIT-compiled prefetching kernel) on the kernel's flat weights -- the layout is FBGEMM's, table
``t`` at element offset ``weights_offsets[t]`` with rows of width ``local_cols`` -- when
``fbgemm_gpu`` is installed; FBGEMM checks the ids, and on its error :func:`plan.check_ids` words
it. Elsewhere (CUDA, float64, MEAN with per-sample weights, no FBGEMM) it is
``torch.nn.functional.embedding_bag`` over the lookup plan. FBGEMM is imported on first use only,
so the kernel imports with torch alone.

Cost: O(ids x width) reads; no allocation beyond the output.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .plan import LookupPlan, bag_scale

__all__ = ["fbgemm_forward_op", "fbgemm_applies", "fbgemm_pool", "plan_pool"]


@functools.cache
def fbgemm_forward_op():
    """FBGEMM's CPU TBE forward, or ``None`` (FBGEMM not installed, or no CPU op in it)."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers the fbgemm ops)

        return torch.ops.fbgemm.split_embedding_codegen_forward_cpu
    except (ImportError, AttributeError, RuntimeError, OSError):
        return None


def fbgemm_applies(weights: Tensor, pooling: str, per_sample_weights: Tensor | None) -> bool:
    return (weights.device.type == "cpu" and weights.dtype == torch.float32
            and (per_sample_weights is None or pooling == "sum")
            and fbgemm_forward_op() is not None)


def fbgemm_pool(kernel, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None,
                cache: dict) -> Tensor:
    """FBGEMM's CPU forward on the kernel's flat weights (raises FBGEMM's error on bad ids)."""
    st = cache.get("fbgemm")
    if st is None:
        layout, ftm = kernel.layout, kernel.feature_table_map
        dims = [layout.tables[t].local_cols for t in ftm]
        rows = [layout.tables[t].local_rows for t in ftm]
        d_off = [0]
        for d in dims:
            d_off.append(d_off[-1] + d)
        hash_cumsum = [0]  # only its per-feature differences (= table rows) are read
        for r in rows:
            hash_cumsum.append(hash_cumsum[-1] + max(r, 1))
        st = cache["fbgemm"] = (
            torch.tensor([layout.weights_offsets[t] for t in ftm], dtype=torch.int64),
            torch.tensor(d_off, dtype=torch.int32), d_off[-1],
            torch.tensor(hash_cumsum, dtype=torch.int64))
    w_off, d_off, total_d, hash_cumsum = st
    w = (None if per_sample_weights is None  # None: undefined tensor = unweighted
         else per_sample_weights.detach().to(torch.float32).contiguous())
    return fbgemm_forward_op()(kernel.weights, w_off, d_off, total_d, hash_cumsum, indices,
                               offsets, 1 if kernel.pooling == "mean" else 0, w, 0)


def plan_pool(kernel, plan: LookupPlan, per_sample_weights: Tensor | None) -> Tensor:
    """``embedding_bag`` over the plan's segments -> ``[B, sum of feature widths]``."""
    layout, batch = kernel.layout, plan.batch
    if plan.segments[0].batch_major:  # one id per bag: the pooled value is the row
        table = layout.segment_view(kernel.weights, layout.segments[0])
        return nn.functional.embedding_bag(plan.segments[0].rows, table, plan.offsets,
                                           mode="sum", include_last_offset=True).view(batch, -1)
    outs = []
    for seg, sp in zip(layout.segments, plan.segments):
        w = None
        if per_sample_weights is not None:
            w = per_sample_weights if sp.sel is None else per_sample_weights[sp.sel]
            w = w.to(kernel.weights.dtype)
        scale = bag_scale(plan, sp, w, kernel.pooling == "mean", kernel.weights.dtype)
        table = layout.segment_view(kernel.weights, seg)
        n_bags = len(sp.features) * batch
        offsets = plan.offsets if sp.sel is None else torch.cat(
            [sp.bag.new_zeros(1), torch.bincount(sp.bag, minlength=n_bags).cumsum(0)])
        pooled = nn.functional.embedding_bag(sp.rows, table, offsets, mode="sum",
                                             per_sample_weights=scale, include_last_offset=True)
        outs.append(pooled.view(len(sp.features), batch, seg.width))
    if len(layout.segments) == 1:
        return outs[0].transpose(0, 1).reshape(batch, -1)
    by_feature = {}
    for sp, o in zip(plan.segments, outs):
        for k, f in enumerate(sp.features):
            by_feature[f] = o[k]
    return torch.cat([by_feature[f] for f in range(len(kernel.feature_table_map))], dim=1)
