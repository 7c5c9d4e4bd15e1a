"""The same training as ``fit_job`` written with plain TorchRec code (no Lightning): the reference
for the Lightning run. ``python -m tests.lightning.plain_job OUT_DIR CONFIG_JSON`` spawns 2 ranks."""

from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, world, port, out_dir, cfg):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler
    from torchrec.distributed import DistributedModelParallel

    from lightning_sgl import GroupAdam
    from lightning_sgl.ctr import CTRDataModule, CTRModule, _kjt_collate
    from torchrec_ext import apply_group_optimizer, group_sharders

    from .fit_job import gather_tables  # noqa: F401  (same gathering code)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    pl.seed_everything(cfg.get("seed", 0), workers=True)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dm = CTRDataModule(kjt=True, batch_size=cfg.get("batch", 128),
                       num_samples=cfg.get("samples", 8_000), vocab_size=cfg.get("vocab", 500),
                       num_fields=cfg.get("fields", 4))
    module = CTRModule(dm.vocab_sizes, model="dlrm", dim=cfg.get("dim", 8), lr=cfg.get("lr", 1e-2))
    group = cfg.get("group", {"lr": 0.02, "lambda21": 2e-3})
    apply_group_optimizer(module.net.ebc, GroupAdam, **group)
    pl.seed_everything(cfg.get("seed", 0), workers=True)  # Lightning re-seeds before setup
    model = DistributedModelParallel(module, device=torch.device("cpu"), sharders=group_sharders())
    dense_params = [p for _, p in module.named_parameters()
                    if p.requires_grad and not hasattr(p, "_in_backward_optimizers")]
    dense = torch.optim.Adam(dense_params, lr=cfg.get("lr", 1e-2))
    dm.setup()
    sampler = DistributedSampler(dm.train_set.dataset(), num_replicas=world, rank=rank,
                                 shuffle=True, seed=cfg.get("seed", 0))
    loader = DataLoader(dm.train_set.dataset(), batch_size=cfg.get("batch", 128), sampler=sampler,
                        drop_last=True, collate_fn=_kjt_collate)
    for epoch in range(cfg.get("epochs", 1)):
        sampler.set_epoch(epoch)
        for kjt, labels in loader:
            dense.zero_grad()
            model.fused_optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
            loss.backward()
            dense.step()
            model.fused_optimizer.step()
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, ShardedTensor):
            full = torch.empty(v.size()) if rank == 0 else None
            v.gather(dst=0, out=full)
            out[k] = full
        else:
            out[k] = v.detach().clone()
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "tables.pt"))
    dist.barrier()  # every rank done with the gathers before gloo tears down its threads
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, cfg = sys.argv[1], json.loads(sys.argv[2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(2, port, out_dir, cfg), nprocs=2, join=True)
