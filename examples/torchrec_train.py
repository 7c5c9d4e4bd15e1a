"""DLRM-style model on the synthetic CTR data, 2 ranks (gloo on CPU, NCCL on GPU), no Lightning.

The tables train with a fused GroupAdam (two lines: ``apply_group_optimizer`` and
``group_sharders``); the dense part with Adam through DDP (DMP wraps it). Prints loss, validation
AUC and the share of zero rows per table.

    python examples/torchrec_train.py [--world-size 2] [--epochs 1] [--lambda21 3e-3]
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.distributed import DistributedModelParallel

from lightning_sgl import GroupAdam
from lightning_sgl.data import make_synthetic_ctr
from lightning_sgl.metrics import roc_auc
from torchrec_ext import apply_group_optimizer, group_sharders
from torchrec_ext.models import DLRMLite, kjt_from_ids


def run(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    data = make_synthetic_ctr(num_samples=args.samples, num_fields=8, vocab_size=2_000, seed=0)
    train, test = data.split(0.8)
    torch.manual_seed(0)
    model = DLRMLite(data.vocab_sizes, dim=args.dim)
    apply_group_optimizer(model.ebc, GroupAdam, lr=args.lr, lambda21=args.lambda21)
    model = DistributedModelParallel(model, device=device, sharders=group_sharders())
    dense = torch.optim.Adam([p for n, p in model.named_parameters() if "embedding_bags" not in n],
                             lr=args.lr)
    if rank == 0:
        print(model.plan)
    local = torch.arange(rank, len(train.labels), world)  # each rank its share of the data
    gen = torch.Generator().manual_seed(1)
    step = 0
    for epoch in range(args.epochs):
        perm = local[torch.randperm(len(local), generator=gen)]
        n_batches = len(perm) // args.batch
        for b in range(n_batches):
            idx = perm[b * args.batch:(b + 1) * args.batch]
            kjt = kjt_from_ids(train.ids[idx]).to(device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(kjt), train.labels[idx].to(device))
            dense.zero_grad()
            model.fused_optimizer.zero_grad()
            loss.backward()  # the tables are updated here, inside backward
            dense.step()
            model.fused_optimizer.step()
            step += 1
            if rank == 0 and step % 50 == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}", flush=True)
    # validation: each rank scores its share of the test set, rank 0 computes the AUC
    model.eval()
    with torch.no_grad():
        share = torch.arange(rank, len(test.labels), world)
        scores = torch.cat([model(kjt_from_ids(test.ids[share[i:i + 4096]]).to(device)).cpu()
                            for i in range(0, len(share), 4096)])
    gathered = [None] * world
    dist.all_gather_object(gathered, (share, scores))
    # zero rows per table from the full (gathered) tables
    sd = model.state_dict()
    zero = {}
    for name in sorted(k for k in sd if k.endswith(".weight") and "embedding_bags" in k):
        st = sd[name]
        full = torch.empty(st.size()) if rank == 0 else None
        st.gather(dst=0, out=full)
        if rank == 0:
            zero[name.split(".")[-2]] = (full == 0).all(dim=1).float().mean().item()
    if rank == 0:
        order = torch.cat([s for s, _ in gathered])
        preds = torch.cat([p for _, p in gathered])
        auc = roc_auc(preds, test.labels[order])
        print(f"validation AUC {auc:.4f}")
        print("zero-row share per table: " + ", ".join(f"{k} {v:.1%}" for k, v in zero.items()))
        print(f"overall zero rows: {sum(zero.values()) / len(zero):.1%}")
    dist.barrier()  # every rank done with the gathers before gloo tears down its threads
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--samples", type=int, default=60_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--lambda21", type=float, default=3e-3)
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args.world_size, port, args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
