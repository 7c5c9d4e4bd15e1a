"""The tuner's order statistics (``lightning_sgl.callbacks._quantile``): equal to sorting, with
ties, zeros, empty groups and heavy tails; 5 collectives on 2 gloo ranks, equal to one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sgl.callbacks._quantile import (
    FLOOR,
    Collectives,
    first_level,
    histogram_thresholds,
    thresholds,
)
from lightning_sgl.callbacks.sparsity_monitor import global_threshold, table_thresholds

from ..torchrec.dist_helpers import spawn


def _check(values: torch.Tensor, keep: int, t: float) -> None:
    """``t`` leaves at most ``keep`` values above it, and as many as that allows."""
    v = values.double()
    v = v[v > FLOOR]
    assert int((v > t).sum()) <= keep
    if v.numel() > keep:
        order = v.sort(descending=True).values
        # every value larger than the (keep+1)-th stays above t; ties at the boundary go below
        assert int((v > t).sum()) == int((v > order[keep]).sum())
        # t is the middle of the gap, so rounding (the kernel's float32 threshold) cannot move a
        # row across it -- also when the gap spans histogram buckets
        below, larger = float(order[keep]), v[v > order[keep]]
        if larger.numel():
            assert t == 0.5 * (below + float(larger.min())), (t, below, float(larger.min()))
    else:
        assert t == FLOOR


@st.composite
def value_sets(draw):
    n = draw(st.integers(0, 400))
    kind = draw(st.sampled_from(["lognormal", "ties", "zeros", "pareto"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "lognormal":
        v = (torch.randn(n, generator=gen, dtype=torch.float64) * 3).exp()
    elif kind == "ties":
        v = torch.randint(1, 5, (n,), generator=gen).double() * 0.25
    elif kind == "zeros":
        v = torch.rand(n, generator=gen, dtype=torch.float64) * (torch.rand(n, generator=gen) > 0.5)
    else:
        v = torch.rand(n, generator=gen, dtype=torch.float64).clamp_min(1e-9) ** -2.0
    keep = draw(st.integers(0, n + 2))
    return v.float().double(), keep


def _by_histogram(groups: list[torch.Tensor], keeps: list[int], coll, given_first=False
                  ) -> list[float]:
    """``histogram_thresholds`` over the kernels' own bucketing (float32 values, as stored; the
    counts per run of a bucket and per value of a run from the bit patterns, as the index's
    native ops return them)."""
    from torchrec_ext.kernel.index import BUCKETS, RUN, RUNS, SHIFT, bucket_of, edge

    buckets = [bucket_of(v) for v in groups]
    hists = [torch.bincount(b, minlength=BUCKETS) for b in buckets]

    def offsets(i: int, b: int) -> torch.Tensor:
        v = groups[i][buckets[i] == b].float()
        bits = torch.where(v > 0, v.view(torch.int32).long(), torch.zeros_like(v, dtype=torch.long))
        return (bits - ((b << SHIFT) + 1)).clamp(0, (1 << SHIFT) - 1)

    def runs(i: int, b: int) -> torch.Tensor:
        return torch.bincount(offsets(i, b) // RUN, minlength=RUNS)

    def values(i: int, b: int, r: int) -> torch.Tensor:
        j = offsets(i, b)
        return torch.bincount(j[j // RUN == r] - r * RUN, minlength=RUN)

    first = first_level(hists) if given_first else None  # (one rank: the all-reduce is the identity)
    return histogram_thresholds(hists, keeps, runs, values, coll, edge, first=first)


@settings(max_examples=200, deadline=None)
@given(value_sets(), value_sets())
def test_histogram_threshold_equals_sorting(case, other):
    """From the index's histograms (bucket, then the float32 patterns inside it): the same count
    above as sorting; ``t`` strictly between the (keep+1)-th largest value and the next larger
    one (the rounding margin of the kernel's own test); ``floor`` when nothing needs cutting; 4
    collectives for both groups together."""
    (values, keep), (values2, keep2) = case, other
    coll = Collectives()
    t, t2 = _by_histogram([values.float(), values2.float()], [keep, keep2], coll)
    assert coll.count == 4
    # one group: levels 1-2 in one all-reduce of the whole histogram; with the first level
    # reduced by the caller (with its counts), 2 of its own; the same thresholds
    for passed, want in ((False, 3), (True, 2)):
        one = Collectives()
        assert _by_histogram([values.float()], [keep], one, given_first=passed) == [t]
        assert one.count == want
    for v, k, th in ((values, keep, t), (values2, keep2, t2)):
        v = v.float().double()
        pos = v[v > FLOOR]
        assert int((pos > th).sum()) <= k
        if pos.numel() > k:
            order = pos.sort(descending=True).values
            assert int((pos > th).sum()) == int((pos > order[k]).sum())
            assert th > float(order[k]) or th == FLOOR
            larger = pos[pos > order[k]]
            assert not larger.numel() or th < float(larger.min())
        else:
            assert th == FLOOR


@settings(max_examples=100, deadline=None)
@given(value_sets(), st.sampled_from([1e-3, 0.01, 0.1, 0.5]))
def test_histogram_threshold_with_a_tolerance_stops_at_the_runs(case, tol):
    """With a tolerance the search stops at the run that holds the cut when that run holds at
    most ``tol x keep`` values: never more than ``keep`` above ``t``, at most that many fewer,
    ``above`` the exact count, one collective less; otherwise the exact answer."""
    values, keep = case
    exact = _by_histogram([values.float()], [keep], Collectives())
    coll, above = Collectives(), []
    from torchrec_ext.kernel.index import BUCKETS, RUN, RUNS, SHIFT, bucket_of, edge

    v = values.float()
    b = bucket_of(v)

    def offsets(bk):
        x = v[b == bk]
        bits = torch.where(x > 0, x.view(torch.int32).long(), torch.zeros_like(x, dtype=torch.long))
        return (bits - ((bk << SHIFT) + 1)).clamp(0, (1 << SHIFT) - 1)

    (t,) = histogram_thresholds(
        [torch.bincount(b, minlength=BUCKETS)], [keep],
        lambda i, bk: torch.bincount(offsets(bk) // RUN, minlength=RUNS),
        lambda i, bk, r: torch.bincount(offsets(bk)[offsets(bk) // RUN == r] - r * RUN,
                                        minlength=RUN),
        coll, edge, tolerance=tol, above=above)
    pos = values.float().double()
    pos = pos[pos > FLOOR]
    n_above = int((pos > t).sum())
    assert n_above <= keep
    if pos.numel() <= keep:  # nothing to cut
        assert t == FLOOR
        return
    assert n_above == above[0]
    if coll.count == 2:  # stopped at the runs
        assert keep - n_above <= tol * keep
    else:
        assert coll.count == 3 and [t] == exact


def test_histogram_threshold_on_ties_and_adjacent_floats():
    """Ties at the cut all fall below; two adjacent float32 values are still split (t is their
    float64 midpoint); zeros (first-seen rows of a refit) count as below every threshold;
    negative control: a keep that cuts inside the ties keeps fewer rows than asked."""
    a = torch.tensor(1.0, dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor(2.0))
    vals = torch.cat([torch.full((5,), 1.0), b.repeat(3), torch.zeros(4)]).float()
    coll = Collectives()
    (t,) = _by_histogram([vals], [3], coll)
    assert float(a) < t < float(b) and int((vals.double() > t).sum()) == 3
    (t,) = _by_histogram([vals], [6], Collectives())  # the cut falls inside the five ties
    assert int((vals.double() > t).sum()) == 3 and t < float(b)
    (t,) = _by_histogram([vals], [8], Collectives())  # everything positive is kept
    assert t == FLOOR


@settings(max_examples=200, deadline=None)
@given(value_sets(), st.sampled_from([2, 16, 4096]))
def test_threshold_equals_sorting(case, bins):
    values, keep = case
    coll = Collectives()
    (t,) = thresholds([values], [keep], coll, bins=bins)
    _check(values, keep, t)
    assert coll.count == 5


def test_gap_across_buckets_gives_the_midpoint():
    """The keep-th largest value far above a tight cluster that holds the (keep+1)-th: the
    threshold is the middle of the gap, not the cluster's bucket edge (which sat within float32
    rounding of the cluster's top value: the fused kernel then kept one row too many)."""
    cluster = 1.0 + torch.arange(1000, dtype=torch.float64) * 1e-9
    values = torch.cat([torch.tensor([100.0, 50.0], dtype=torch.float64), cluster])
    for keep in (1, 2):
        (t,) = thresholds([values], [keep], Collectives())
        _check(values, keep, t)
    (t,) = thresholds([values], [2], Collectives())
    assert t == 0.5 * (float(cluster.max()) + 50.0)


def test_many_groups_in_one_search_and_the_fallback_for_huge_ties():
    gen = torch.Generator().manual_seed(0)
    groups = [torch.rand(1000, generator=gen), torch.zeros(0), torch.full((50,), 0.3),
              torch.rand(20000, generator=gen) ** 3]
    keeps = [100, 5, 10, 1234]
    coll = Collectives()
    out = thresholds(groups, keeps, coll)
    for v, k, t in zip(groups, keeps, out):
        _check(v, k, t)
    assert coll.count == 5
    # more tied values than max_final in the last bucket: a threshold that keeps <= keep
    (t,) = thresholds([torch.full((100,), 0.5)], [10], Collectives(), max_final=8)
    assert int((torch.full((100,), 0.5) > t).sum()) <= 10


def test_table_and_global_thresholds_scale_by_width():
    gen = torch.Generator().manual_seed(1)
    local = {"a": (torch.rand(300, generator=gen) * 4, 4.0), "b": (torch.rand(200, generator=gen),
                                                                  1.0)}
    per = table_thresholds(local, {"a": 30, "b": 50})
    for name, keep in (("a", 30), ("b", 50)):
        v, sc = local[name]
        assert int((v > sc * per[name]).sum()) == keep
    t = global_threshold(local, 100)
    assert sum(int((v > sc * t).sum()) for v, sc in local.values()) == 100


def _rank(rank, port, out):  # spawned: its own interpreter (a forked gloo hangs here)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(7)
        full = [(torch.randn(5000, generator=gen) * 2).exp(), torch.rand(3000, generator=gen)]
        mine = [g[rank::2] for g in full]  # each value on one rank
        local = {"a": (mine[0], 1.0), "b": (mine[1], 1.0)}
        coll = Collectives(lambda t, op: _allreduce(t, op))
        per = table_thresholds(local, {"a": 700, "b": 10}, collectives=coll)
        torch.save({"per": per, "count": coll.count}, os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _allreduce(t, op):
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def test_two_ranks_equal_one_process_in_five_collectives(tmp_path):
    spawn(_rank, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    gen = torch.Generator().manual_seed(7)
    full = [(torch.randn(5000, generator=gen) * 2).exp(), torch.rand(3000, generator=gen)]
    single = table_thresholds({"a": (full[0], 1.0), "b": (full[1], 1.0)}, {"a": 700, "b": 10})
    assert r0["per"] == r1["per"] == single
    assert r0["count"] == r1["count"] == 5
