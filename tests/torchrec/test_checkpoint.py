"""torch.distributed.checkpoint: save under one plan, load under another, continue: the result
equals the uninterrupted run (weights and every state, row-wise state included)."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_sgl.optim import GroupAdagrad, GroupAdam

from . import dist_helpers as H

K, MORE = 4, 5
CONFIGS = {
    "adam": (GroupAdam, dict(lr=0.05, lambda21=1.0)),
    "adagrad_rowwise": (GroupAdagrad, dict(lr=0.1, lambda21=1.0, rowwise=True)),
}


def _state(model):
    return {"model": model.state_dict(), "optim": model.fused_optimizer.state_dict()}


def _worker(rank, port, plan_a, plan_b, outdir):
    H.init_process(rank, port)
    batches = H.rank_batches(K + MORE)
    for name, (cls, kw) in CONFIGS.items():
        full = H.build_model(cls, kw, plan_a)
        H.set_full_weights(full, H.full_init())
        H.train(full, batches, rank)
        torch.save(H.local_shards(full), os.path.join(outdir, f"{name}-full-{rank}.pt"))

        first = H.build_model(cls, kw, plan_a)
        H.set_full_weights(first, H.full_init())
        H.train(first, batches[:K], rank)
        ckpt = os.path.join(outdir, f"ckpt-{name}")
        dcp.save(_state(first), checkpoint_id=ckpt)

        second = H.build_model(cls, kw, plan_b)  # fresh random init, other plan
        state = _state(second)
        dcp.load(state, checkpoint_id=ckpt)
        second.fused_optimizer.load_state_dict(state["optim"])
        H.train(second, batches[K:], rank)
        torch.save(H.local_shards(second), os.path.join(outdir, f"{name}-resumed-{rank}.pt"))
    torch.distributed.barrier()  # all ranks done before gloo tears down its threads
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("plan_a,plan_b", [("tw", "rw"), ("rw", "cw"), ("cw", "tw"),
                                           ("twrw", "mixed")])
def test_resume_under_another_plan_equals_uninterrupted(plan_a, plan_b, tmp_path):
    H.spawn(_worker, plan_a, plan_b, str(tmp_path))
    for name in CONFIGS:
        full = H.assemble([torch.load(tmp_path / f"{name}-full-{r}.pt") for r in range(H.WORLD)])
        res = H.assemble([torch.load(tmp_path / f"{name}-resumed-{r}.pt")
                          for r in range(H.WORLD)])
        assert full.keys() == res.keys()
        worst = max((full[k].float() - res[k].float()).abs().max().item() for k in full)
        print(f"{plan_a}->{plan_b}/{name}: max diff {worst:.2e} over {sorted(full)}")
        assert worst <= 1e-6
