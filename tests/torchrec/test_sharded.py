"""2 gloo ranks: every sharding plan equals the unsharded run (weights and every state), for
GroupAdam and row-wise GroupAdagrad with lambda21 > 0; column-wise without the all-reduce of the
group norm differs (negative control)."""

import os

import pytest
import torch

from lightning_sgl.optim import GroupAdagrad, GroupAdam

from . import dist_helpers as H

STEPS = int(os.environ.get("SGL_SHARDED_STEPS", "8"))
CONFIGS = {
    "adam": (GroupAdam, dict(lr=0.05, lambda21=1.0, lambda1=1e-3), "adam", False),
    "adagrad_rowwise": (GroupAdagrad, dict(lr=0.1, lambda21=1.0, rowwise=True), "adagrad", True),
}


def _worker(rank, port, plan, outdir, negative, poison=None):
    H.init_process(rank, port)
    for name, (cls, kw, _, _) in CONFIGS.items():
        if poison is not None:
            kw = {**kw, "nonfinite": "skip"}
        model = H.build_model(cls, kw, plan)
        if negative:  # drop the cross-shard all-reduce of column-sharded tables
            for m in model.module.ebc.group_kernels():
                m.set_column_groups({})
        H.set_full_weights(model, H.full_init())
        H.train(model, H.rank_batches(STEPS, poison=poison), rank)
        # fused tables never get a weight gradient
        grads = [n for n, p in model.named_parameters() if "embedding_bags" in n and p.grad is not None]
        assert not grads, grads
        torch.save(H.local_shards(model), os.path.join(outdir, f"{name}-{rank}.pt"))
    torch.distributed.barrier()  # all ranks done before gloo tears down its threads
    torch.distributed.destroy_process_group()


def _run(plan, tmp_path, negative=False, poison=None):
    H.spawn(_worker, plan, str(tmp_path), negative, poison)
    results = {}
    for name, (_, kw, opt, rowwise) in CONFIGS.items():
        parts = [torch.load(tmp_path / f"{name}-{r}.pt") for r in range(H.WORLD)]
        full = H.assemble(parts)
        hp = {k: v for k, v in kw.items() if k != "rowwise"}
        ref_w, ref_s = H.unsharded_run(opt, hp, rowwise, STEPS, poison=poison,
                                       nonfinite="skip" if poison else "raise")
        worst, zero = 0.0, 0
        for table, w in ref_w.items():
            got = full[f"ebc.embedding_bags.{table}.weight"]
            worst = max(worst, (got - w).abs().max().item())
            zero += int((w == 0).all(1).sum())
            for state, v in ref_s[table].items():
                key = f"{table}.{state}"
                worst = max(worst, (full[key].reshape(v.shape) - v).abs().max().item())
        results[name] = (worst, zero)
    return results


@pytest.mark.parametrize("plan", ["tw", "rw", "cw", "twrw", "mixed", "cw_local"])
def test_sharded_equals_unsharded(plan, tmp_path):
    for name, (worst, zero) in _run(plan, tmp_path).items():
        print(f"{plan}/{name}: max diff {worst:.2e}, zero rows {zero}")
        assert zero > 0, "lambda21 zeroed no row: the comparison would prove little"
        assert worst <= 1e-6


def test_column_wise_without_allreduce_differs(tmp_path):
    results = _run("cw", tmp_path, negative=True)
    for name, (worst, _) in results.items():
        print(f"cw without all-reduce/{name}: max diff {worst:.2e}")
        assert worst > 1e-3


def test_column_wise_skip_agrees_across_shards(tmp_path):
    """nonfinite="skip" on a column-sharded table: an inf upstream gradient that reaches only
    the first column shard of some t2 rows. No abort (the shards' skip decisions are
    all-reduced), and the result equals the unsharded kernel that skips those whole rows; the
    poison did change the run (it differs from the clean unsharded run)."""
    results = _run("cw", tmp_path, poison=H.POISON)
    for name, (_, kw, opt, rowwise) in CONFIGS.items():
        worst, zero = results[name]
        hp = {k: v for k, v in kw.items() if k != "rowwise"}
        clean, _ = H.unsharded_run(opt, hp, rowwise, STEPS)
        skipped, _ = H.unsharded_run(opt, hp, rowwise, STEPS, nonfinite="skip", poison=H.POISON)
        moved = (clean["t2"] - skipped["t2"]).abs().max().item()
        print(f"cw skip/{name}: max diff to unsharded skip {worst:.2e}; poison moved t2 by "
              f"{moved:.2e}")
        assert worst <= 1e-6
        assert moved > 1e-4
