"""Exact distributed order statistics in a constant number of collectives.

The tuning question "which ``lambda21`` leaves ``keep`` rows non-zero" is an order statistic: a
seen row ``r`` of width ``d`` stays non-zero after the prox iff its shrink norm ``n_r`` exceeds
``sqrt(d) * lambda21``, so with ``u_r = n_r / sqrt(d)`` the answer is the smallest ``t`` with
``#{u_r > t} <= keep``: the ``(keep+1)``-th largest ``u``. :func:`thresholds` finds it for several
groups of values at once (one group per table for per-table targets, one for a global target):

1. one MAX all-reduce: the range of ``log u`` of every group;
2. one SUM all-reduce: a histogram of ``log u`` (``bins`` buckets per group) -> the bucket that
   holds the order statistic;
3. one SUM all-reduce: a linear histogram inside that bucket -> the sub-bucket that holds it;
4. one SUM all-reduce of per-rank counts, and one of the values of that sub-bucket (a handful):
   sorted, they give the exact value.

Five collectives per tuning whatever the number of rows, tables or ranks (the 60-step bisection
it replaces made 60 passes over all values and 60 all-reduces). Cost per rank: O(values) for the
two passes of bucketing, O(bins x groups) for the histograms.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["thresholds", "histogram_thresholds", "first_level", "Collectives", "FULL_FIRST_LEVEL"]

#: thresholds are never below this (a lambda21 of exactly 0 would switch the group lasso off)
FLOOR = 1e-12


class Collectives:
    """Counts the collectives of one tuning; wraps the all-reduce used (SUM and MAX on small
    float64 CPU tensors; identity on one process)."""

    def __init__(self, allreduce: Callable[[Tensor, str], Tensor] | None = None):
        import torch.distributed as dist

        self._allreduce = allreduce
        self.count = 0
        spread = allreduce is not None and dist.is_initialized()
        #: the ranks the all-reduce spans, and this process's place among them
        self.world = dist.get_world_size() if spread else 1
        self.rank = dist.get_rank() if spread else 0

    def __call__(self, t: Tensor, op: str) -> Tensor:
        self.count += 1
        if self._allreduce is None:
            return t
        return self._allreduce(t, op)


def _bucket(values: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    """Bucket index in ``[0, bins)`` of each value on the linear grid ``[lo, hi]``."""
    if hi <= lo:
        return torch.zeros(values.shape, dtype=torch.long)
    idx = ((values - lo) * (bins / (hi - lo))).floor().long()
    return idx.clamp_(0, bins - 1)


def _cross(hist: Tensor, above: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per group (rows of ``hist``): the bucket where the count from the top, starting at
    ``above``, first exceeds ``keep``, and the count strictly above that bucket."""
    from_top = hist.flip(1).cumsum(1) + above[:, None]  # from_top[:, j]: count in the top j+1
    j = (from_top > keep[:, None]).float().argmax(1)  # first bucket from the top that crosses
    bins = hist.shape[1]
    bucket = bins - 1 - j
    strictly_above = from_top.gather(1, j[:, None]).squeeze(1) - hist.gather(
        1, bucket[:, None]).squeeze(1)
    return bucket, strictly_above


def thresholds(groups: list[Tensor], keeps: list[int], allreduce: Collectives,
               bins: int = 4096, max_final: int = 1 << 16, floor: float = FLOOR) -> list[float]:
    """For each group: a threshold ``t >= floor`` with exactly ``#{values of the group, over all
    ranks, > t} <= keep`` values above it and as many as that allows: ``t`` lies halfway
    between the ``(keep+1)``-th and the next larger value (so that rounding in the kernel's
    own ``norm <= sqrt(d) * lambda21`` test cannot move a row across it; the next larger value
    comes with the fourth all-reduce when it lies above the final bucket); ``floor``
    when at most ``keep`` values exceed ``floor``. Ties at the boundary all fall below ``t``.

    Args:
        groups: this rank's values of each group (any shape; non-negative; each value held by
            one rank only).
        keeps: how many values of each group may stay above the threshold.
        allreduce: ``(tensor, "sum" | "max") -> tensor`` over all ranks (a :class:`Collectives`);
            every rank calls this function with the same number of groups.
        bins: histogram buckets per level (two levels: ``bins**2`` buckets in all).
        floor: the smallest threshold returned.
        max_final: values gathered for the exact last step per group and rank; beyond it (more
            than ``max_final`` equal-to-within-``range/bins**2`` values on one rank) the upper
            edge of the final bucket is returned, which keeps at most ``keep`` values.

    Exact (equal to sorting all values) whenever the final bucket is gathered. Cost: O(values)
    per rank, 5 collectives.
    """
    g = len(groups)
    flat = [v.detach().reshape(-1).to(torch.float64) for v in groups]
    keep = torch.tensor(keeps, dtype=torch.float64)
    pos = [v[v > floor] for v in flat]
    logs = [v.log() for v in pos]
    # 1. range of log u per group: max of (max, -min)
    rng = torch.full((g, 2), float("-inf"), dtype=torch.float64)
    for i, lv in enumerate(logs):
        if lv.numel():
            rng[i, 0], rng[i, 1] = lv.max(), -lv.min()
    rng = allreduce(rng, "max")
    lo = (-rng[:, 1]).tolist()
    hi = rng[:, 0].tolist()
    # 2. histogram of log u
    hist = torch.zeros(g, bins, dtype=torch.float64)
    idx1 = []
    for i, lv in enumerate(logs):
        b = _bucket(lv, lo[i], hi[i], bins) if lv.numel() else lv.long()
        idx1.append(b)
        hist[i].index_add_(0, b, torch.ones_like(lv))
    hist = allreduce(hist, "sum")
    total = hist.sum(1)
    done = total <= keep  # nothing to cut
    b1, above1 = _cross(hist, torch.zeros(g, dtype=torch.float64), keep)
    # 3. linear histogram inside that bucket
    hist2 = torch.zeros(g, bins, dtype=torch.float64)
    inner, idx2 = [], []
    edges = []
    for i, (v, b) in enumerate(zip(pos, idx1)):
        span = (hi[i] - lo[i]) / bins if hi[i] > lo[i] else 0.0
        e_lo = math.exp(lo[i] + span * int(b1[i]))
        e_hi = math.exp(lo[i] + span * (int(b1[i]) + 1))
        edges.append((e_lo, e_hi))
        sel = v[b == b1[i]] if v.numel() else v
        inner.append(sel)
        c = _bucket(sel, e_lo, e_hi, bins) if sel.numel() else sel.long()
        idx2.append(c)
        hist2[i].index_add_(0, c, torch.ones_like(sel))
    hist2 = allreduce(hist2, "sum")
    b2, above2 = _cross(hist2, above1, keep)
    # 4. gather the values of the final sub-bucket, exactly
    finals = [sel[c == b2[i]] for i, (sel, c) in enumerate(zip(inner, idx2))]
    counts = torch.tensor([min(f.numel(), max_final) for f in finals], dtype=torch.float64)
    over = torch.tensor([float(f.numel() > max_final) for f in finals], dtype=torch.float64)
    # the smallest value above the final bucket (the keep-th largest when the bucket holds none
    # of the kept values), as -min in the same MAX all-reduce
    next_up = torch.full((g,), float("-inf"), dtype=torch.float64)
    for i, (v, b, sel, c) in enumerate(zip(pos, idx1, inner, idx2)):
        up = torch.cat([v[b > b1[i]], sel[c > b2[i]]]) if v.numel() else v  # higher buckets
        if up.numel():
            next_up[i] = -up.min()
    width = allreduce(torch.stack([counts, over, next_up]), "max")
    m = int(width[0].max().item()) if g else 0
    buf = torch.zeros(allreduce.world, g, max(m, 1), dtype=torch.float64)  # 0: an empty slot
    for i, f in enumerate(finals):
        top = f.sort(descending=True).values[:m]
        buf[allreduce.rank, i, :top.numel()] = top
    buf = allreduce(buf, "sum")  # each slot written by one rank: the SUM is a gather
    out = []
    for i in range(g):
        if bool(done[i]):
            out.append(floor)
            continue
        span = (edges[i][1] - edges[i][0]) / bins
        upper = edges[i][0] + span * (int(b2[i]) + 1)  # >= every value of the final bucket
        if bool(width[1, i] > 0):
            out.append(max(floor, upper))
            continue
        vals = buf[:, i, :].reshape(-1)
        vals = vals[vals > 0].sort(descending=True).values
        r = int(keep[i].item() - above2[i].item())  # 0-based position in the final bucket
        below = float(vals[r])  # the (keep+1)-th largest value
        larger = vals[vals > below]
        if larger.numel():  # the next larger value, in the same bucket
            above = float(larger.min())
        elif math.isfinite(float(width[2, i])):  # ... or the first value of a higher bucket
            above = -float(width[2, i])
        else:  # nothing larger: every value may go below; any t >= the largest value
            above = 3.0 * below
        out.append(max(floor, 0.5 * (below + above)))
    return out



def _pattern(x: float) -> int:
    """The float32 bit pattern of ``x`` as an unsigned integer."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _from_pattern(p: int) -> float:
    return struct.unpack("<f", struct.pack("<I", int(p)))[0]


#: the first level all-reduces the whole histograms when they hold at most this many counts in
#: all (one collective less; a gloo all-reduce of 32k doubles costs about what one of 8 does),
#: else their sums over ``bins`` groups of buckets
FULL_FIRST_LEVEL = 1 << 15


def first_level(hists: list[Tensor], bins: int = 256) -> Tensor:
    """What the first all-reduce of :func:`histogram_thresholds` carries (float64 ``[groups,
    n]``): the whole histograms if they hold at most :data:`FULL_FIRST_LEVEL` counts in all,
    else their sums over ``bins`` groups of consecutive buckets. A caller may all-reduce it
    together with its own values (one collective) and pass the result as ``first``. O(groups x
    buckets)."""
    h = torch.stack([x.to(torch.float64).reshape(-1) for x in hists])
    if h.numel() <= FULL_FIRST_LEVEL:
        return h
    f = -(-h.shape[1] // bins)
    return torch.nn.functional.pad(h, (0, bins * f - h.shape[1])).view(len(hists), bins, f).sum(2)


def histogram_thresholds(hists: list[Tensor], keeps: list[int],
                         runs: Callable[[int, int], Tensor],
                         values: Callable[[int, int, int], Tensor],
                         allreduce: Collectives, edge: Callable[[int], float],
                         floor: float = FLOOR, bins: int = 256,
                         above: list[int] | None = None,
                         first: Tensor | None = None, tolerance: float = 0.0,
                         known_runs: list[dict[int, Tensor]] | None = None) -> list[float]:
    """:func:`thresholds` from histograms kept by the kernels instead of a pass over all values.

    Group ``i`` has this rank's counts ``hists[i]`` per bucket, bucket ``b`` holding the float32
    values in ``(edge(b), edge(b + 1)]`` (every bucket the same number ``P`` of float32 values;
    e.g. the kernels' shrink-norm index, :mod:`torchrec_ext.kernel.index`), in ``bins`` runs of
    ``w = P / bins`` consecutive values: ``runs(i, b)`` returns this rank's count per run of
    bucket ``b`` in group ``i`` (``[bins]``), ``values(i, b, r)`` its count per value of run
    ``r`` (``[w]``, in increasing order; values ``<= 0`` counted as the first of run 0). The
    threshold is exact -- the same count above it as sorting all values would give (see
    :func:`thresholds`) -- in four SUM all-reduces of at most ``bins`` counts per group
    (levels 1-2 in one when small, below), whatever the number of values or ranks:

    1. the histograms summed over groups of consecutive buckets (``bins`` groups);
    2. the buckets of the group that holds the ``(keep+1)``-th largest value ``v*`` -> its bucket;
    3. that bucket's run counts -> the run;
    4. the counts of that run's values one by one -> ``v*`` itself.

    ``t`` is the midpoint (float64) of ``v*`` and the next larger value when that lies in the
    same run, else of ``v*`` and the first value after the run (every larger value is at least
    that large), so that rounding in the kernel's own ``norm <= sqrt(d) * lambda21`` test cannot
    move a row across it; ties at ``v*`` all fall below; ``floor`` when at most ``keep`` values
    exceed ``floor``.

    Levels 1 and 2 are one all-reduce of the whole histograms when they are small (at most
    :data:`FULL_FIRST_LEVEL` counts in all, e.g. one group of the index's buckets): 3
    collectives. ``first``: the first level already all-reduced by the caller (of
    :func:`first_level` ``(hists, bins)``, e.g. in one collective with its own counts; not
    counted here).

    ``tolerance``: when, in every group, the run that holds ``v*`` holds at most ``tolerance x
    keep`` values (over all ranks), level 4 is skipped: ``t`` is the midpoint of the run's last
    value and the next float32, every value of the run falls below, and up to that many fewer
    than ``keep`` stay above (the same decision on every rank: it reads all-reduced counts).
    0 (the default): always exact.

    ``known_runs``: per group, all-reduced run counts of some buckets (sent by the caller with
    ``first``, where it guessed the cut would fall): when every group's bucket is among them,
    level 3 needs no collective (the decision reads all-reduced values: the same on every rank).

    ``above`` (a list, filled if given): per group, how many values (over all ranks) lie above
    the threshold returned -- known from the histograms, no collective.

    Cost per rank: O(groups x buckets) for the sums, ``runs`` of one bucket and ``values`` of one
    run per group; 3 or 4 collectives (one less with ``first``, one less with a right guess in
    ``known_runs``, one less when ``tolerance`` allows).
    """
    g = len(hists)
    if g == 0:
        return []
    h = torch.stack([x.to(torch.float64).reshape(-1) for x in hists])
    keep = torch.tensor(keeps, dtype=torch.float64)
    zero = torch.zeros(g, dtype=torch.float64)
    # 1-2. the bucket that holds v*
    coarse = allreduce(first_level(hists, bins), "sum") if first is None else first
    done = coarse.sum(1) <= keep
    c1, above1 = _cross(coarse, zero, keep)
    if coarse.shape[1] == h.shape[1]:  # the whole histograms: c1 is the bucket
        above2 = above1
        buckets = [int(c) for c in c1.tolist()]
    else:
        f = -(-h.shape[1] // bins)  # buckets per group of level 1
        h = torch.nn.functional.pad(h, (0, bins * f - h.shape[1]))
        fine = allreduce(torch.stack([h[i, int(c) * f: (int(c) + 1) * f]
                                      for i, c in enumerate(c1.tolist())]), "sum")
        j1, above2 = _cross(fine, above1, keep)
        buckets = [int(c) * f + int(j) for c, j in zip(c1.tolist(), j1.tolist())]
    # 3-4. the value v* inside it
    n_values = _pattern(edge(1)) - _pattern(edge(0))
    if n_values % bins:
        raise ValueError(f"Invalid bins: {bins} (a bucket's {n_values} values in equal runs)")
    w = n_values // bins  # values per run
    cnt = torch.zeros(g, bins, dtype=torch.float64)
    guessed = known_runs is not None and all(
        bool(done[i]) or buckets[i] in known_runs[i] for i in range(g))
    for i in range(g):
        if not bool(done[i]):
            got = (known_runs[i][buckets[i]] if guessed else runs(i, buckets[i]))
            got = got.to(torch.float64).reshape(-1)
            if got.numel() != bins:
                raise ValueError(f"Invalid run counts: {got.numel()} runs per bucket, expected "
                                 f"{bins}")
            cnt[i] = got
    run_sums = cnt if guessed else allreduce(cnt, "sum")
    c3, above3 = _cross(run_sums, above2, keep)
    in_run = run_sums.gather(1, c3[:, None]).squeeze(1)
    if tolerance > 0 and bool(((in_run <= tolerance * keep) | done).all()):  # stop at the runs
        out = []
        for i in range(g):
            if above is not None:
                above.append(int(coarse[i].sum().item()) if bool(done[i])
                             else int(above3[i].item()))
            if bool(done[i]):
                out.append(floor)
                continue
            last = _pattern(edge(buckets[i])) + (int(c3[i]) + 1) * w  # the run's last value
            out.append(max(floor, 0.5 * (_from_pattern(last) + _from_pattern(last + 1))))
        return out
    one = torch.zeros(g, w, dtype=torch.float64)
    for i in range(g):
        if not bool(done[i]):
            got = values(i, buckets[i], int(c3[i])).to(torch.float64).reshape(-1)
            if got.numel() != w:
                raise ValueError(f"Invalid value counts: {got.numel()} values per run, the "
                                 f"edges give {w}")
            one[i] = got
    one = allreduce(one, "sum")
    j4, above4 = _cross(one, above3, keep)
    out = []
    for i in range(g):
        if above is not None:
            above.append(int(coarse[i].sum().item()) if bool(done[i]) else int(above4[i].item()))
        if bool(done[i]):
            out.append(floor)
            continue
        first = _pattern(edge(buckets[i])) + 1 + int(c3[i]) * w  # the run's first value
        star = first + int(j4[i])  # v*
        larger = one[i, int(j4[i]) + 1:].nonzero()
        nxt = star + 1 + int(larger[0]) if larger.numel() else first + w
        out.append(max(floor, 0.5 * (_from_pattern(star) + _from_pattern(nxt))))
    return out
