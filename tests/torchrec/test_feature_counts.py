"""Incremental feature counts == a full scan of the tables, on 2 gloo ranks, for TW, RW, CW and
TWRW plans: after training steps, ``reapply_prox`` with a larger per-table lambda21, magnitude
pruning, more steps, a DCP load under another plan, steps after the load, and a refit (the
support fixed, lambda1 = lambda21 = 0, the prox re-applied, more steps: no row joins the support,
also for column-sharded tables, whose zero test is agreed over the shards).

The ranks report ``feature_rate.feature_counts`` (O(tables): the kernels' own counters -- the test
asserts they were not stale, so nothing was recounted, except right after the load) and dump every
table shard (weights and ``seen`` flags); the parent assembles the full tables and counts seen
rows and seen rows with any non-zero coordinate itself.
"""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_sgl.optim import GroupAdagrad, GroupAdam

from . import dist_helpers as H

CONFIGS = {"tw": (GroupAdam, dict(lr=0.05, lambda21=0.3), "rw"),
           "rw": (GroupAdagrad, dict(lr=0.1, lambda21=0.3, rowwise=True), "cw"),
           "cw": (GroupAdam, dict(lr=0.05, lambda21=0.3), "twrw"),
           "twrw": (GroupAdagrad, dict(lr=0.1, lambda21=0.3, rowwise=True), "tw")}


def _kernels(model):
    from torchrec_ext import feature_rate

    return feature_rate.all_group_kernels(model)


def _dump(model):
    out = []
    for k in _kernels(model):
        for i, t in enumerate(k.tables):
            out.append((t.name, t.row_offset, t.col_offset,
                        k.split_embedding_weights()[i].detach().clone(),
                        k.row_seen_view(i).clone()))
    return out


def _worker(rank, port, plan, outdir):
    from torchrec_ext import feature_rate

    H.init_process(rank, port)
    cls, kw, other = CONFIGS[plan]
    batches = H.rank_batches(10)
    model = H.build_model(cls, kw, plan)
    H.set_full_weights(model, H.full_init())
    feature_rate.feature_counts(model)  # the initial weights were written from outside: recount
    records = []

    def record(stage, expect_fresh=True):
        if expect_fresh:  # the counters were kept up to date: nothing needs a recount
            assert not any(k.counts_stale() for k in _kernels(model)), stage
        records.append((stage, feature_rate.feature_counts(model), _dump(model)))

    H.train(model, batches[:3], rank)
    record("train")
    for k in _kernels(model):  # a tuner's move: a larger lambda21 on t0 and t2, re-applied
        names = {t.name for t in k.tables} & {"t0", "t2"}
        k.set_table_hyperparameters({n: {"lambda21": 0.8} for n in names})
    for k in _kernels(model):
        k.reapply_prox()
    record("reapply")
    norms = feature_rate.seen_row_weight_norms(model)
    thresholds = {n: float(v.median()) if v.numel() else 0.0 for n, v in norms.items()}
    feature_rate.prune_seen_rows(model, thresholds)
    record("prune")
    H.train(model, batches[3:5], rank)
    record("train-more")
    ckpt = os.path.join(outdir, "ckpt")
    state = {"model": model.state_dict(), "optim": model.fused_optimizer.state_dict()}
    dcp.save(state, checkpoint_id=ckpt)

    model = H.build_model(cls, kw, other)  # another plan, random init: all of it is replaced
    state = {"model": model.state_dict(), "optim": model.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    model.fused_optimizer.load_state_dict(state["optim"])
    assert any(k.counts_stale() for k in _kernels(model))  # the load marked them stale
    record("load", expect_fresh=False)
    H.train(model, batches[5:8], rank)
    record("after-load")
    for k in _kernels(model):  # the refit of SparsityMonitor(refit_share=...)
        names = [t.name for t in k.tables]
        k.set_table_hyperparameters({n: {"lambda1": 0.0, "lambda21": 0.0} for n in names})
        k.set_fixed_support(names)
        k.reapply_prox()
    H.train(model, batches[8:], rank)
    record("refit")
    torch.save(records, os.path.join(outdir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _full_scan(dumps):
    """``{table: (seen, seen and non-zero)}`` from every rank's shards."""
    tables = {n: (r, d) for n, r, d, _ in H.TABLES}
    weights = {n: torch.full((r, d), float("nan")) for n, (r, d) in tables.items()}
    seen = {n: torch.full((r,), -1, dtype=torch.int16) for n, (r, _) in tables.items()}
    for name, r0, c0, w, s in dumps:
        rows, cols = w.shape
        weights[name][r0:r0 + rows, c0:c0 + cols] = w
        prev = seen[name][r0:r0 + rows]
        assert ((prev == -1) | (prev == s.to(torch.int16))).all(), "column shards disagree"
        seen[name][r0:r0 + rows] = s.to(torch.int16)
    out = {}
    for n in tables:
        assert not weights[n].isnan().any() and (seen[n] >= 0).all(), n
        flags = seen[n] > 0
        out[n] = (int(flags.sum()), int((flags & (weights[n] != 0).any(1)).sum()))
    return out


def _support(dumps):
    """``{table: rows non-zero on any column shard}`` from every rank's shards."""
    out = {n: torch.zeros(r, dtype=torch.bool) for n, r, _, _ in H.TABLES}
    for name, r0, _, w, _ in dumps:
        out[name][r0:r0 + w.shape[0]] |= (w != 0).any(1)
    return out


@pytest.mark.parametrize("plan", list(CONFIGS))
def test_incremental_counts_equal_a_full_scan(plan, tmp_path):
    H.spawn(_worker, plan, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(H.WORLD)]
    stages = [s for s, _, _ in ranks[0]]
    assert stages == ["train", "reapply", "prune", "train-more", "load", "after-load", "refit"]
    previous = None
    for j, stage in enumerate(stages):
        reported = [r[j][1] for r in ranks]
        assert reported[0] == reported[1], stage  # every rank gets the global counts
        expected = _full_scan([d for r in ranks for d in r[j][2]])
        print(plan, stage, expected)
        assert reported[0] == expected, (stage, reported[0], expected)
        if stage in ("reapply", "prune"):  # these moves really removed rows
            assert sum(v[1] for v in expected.values()) < sum(v[1] for v in previous.values())
        previous = expected
    load = dict((s, c) for s, c, _ in ranks[0])
    assert load["load"] == load["train-more"]  # the checkpoint carried the tables whole
    before, after = (_support([d for r in ranks for d in r[j][2]]) for j in (5, 6))
    for name in before:  # the refit's support is a subset of what it started from
        assert not bool((after[name] & ~before[name]).any()), name
        assert int(after[name].sum()) > 0, name
