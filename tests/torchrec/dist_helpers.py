"""Multi-process (gloo, 127.0.0.1) harness for the sharding tests.

Each test spawns 2 ranks that build the same DLRM-style EmbeddingBagCollection, shard it with
DistributedModelParallel under a plan, initialise every shard from one seeded full table, train on
per-rank batches, and write their local shards (weights and every optimizer state, with offsets)
to files. The parent assembles full tables and compares them with an unsharded ``GroupTBE`` that
saw the concatenated global batch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

TABLES = [("t0", 40, 8, ["f0", "f3"]), ("t1", 30, 8, ["f1"]), ("t2", 50, 16, ["f2"])]
FEATURES = ["f0", "f1", "f2", "f3"]
FEATURE_TABLE = {"f0": 0, "f1": 1, "f2": 2, "f3": 0}
BATCH = 4
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_init(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(r, d, generator=gen) * 0.4 - 0.2 for _, r, d, _ in TABLES]


#: (step, rank, sample, output column) whose upstream gradient is +inf in the poisoned runs:
#: column 17 is inside table t2's first column shard (t2 covers output columns 16..31)
POISON = (2, 0, 0, 17)  # sample 0: its bags are never empty


def rank_batches(steps: int, seed: int = 1, poison: tuple | None = None):
    """``[step][rank] -> (indices, lengths, target)`` in KJT feature-major order; ``poison``:
    one target entry set to +inf (a non-finite gradient on part of one row's columns)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        per_rank = []
        for _ in range(WORLD):
            idx, lens = [], []
            for f in FEATURES:
                rows = TABLES[FEATURE_TABLE[f]][1]
                ln = torch.randint(0, 3, (BATCH,), generator=gen)
                ln[0] = 1
                lens.append(ln)
                idx.append(torch.randint(0, rows, (int(ln.sum()),), generator=gen))
            width = sum(TABLES[FEATURE_TABLE[f]][2] for f in FEATURES)
            per_rank.append((torch.cat(idx), torch.cat(lens), torch.randn(BATCH, width,
                                                                          generator=gen)))
        out.append(per_rank)
    if poison is not None:
        step, rank, sample, col = poison
        out[step][rank][2][sample, col] = float("inf")
    return out


def global_tbe_batch(per_rank):
    """The concatenated global batch (rank 0's samples, then rank 1's) in TBE layout."""
    idx, lens = [], []
    for fi in range(len(FEATURES)):
        for indices, lengths, _ in per_rank:
            starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            lo, hi = int(starts[fi * BATCH]), int(starts[(fi + 1) * BATCH])
            idx.append(indices[lo:hi])
            lens.append(lengths[fi * BATCH:(fi + 1) * BATCH])
    lengths = torch.cat(lens)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    target = torch.cat([t for _, _, t in per_rank], dim=0)
    return torch.cat(idx), offsets, target


def unsharded_run(optimizer: str, hp: dict, rowwise: bool, steps: int, init_seed=0, seed=1,
                  nonfinite: str = "raise", poison: tuple | None = None):
    from torchrec_ext import GroupTBE, TableSpec

    kernel = GroupTBE([TableSpec(n, r, d) for n, r, d, _ in TABLES],
                      [FEATURE_TABLE[f] for f in FEATURES], optimizer=optimizer,
                      hyperparameters=hp, rowwise=rowwise, nonfinite=nonfinite)
    for w, full in zip(kernel.split_embedding_weights(), full_init(init_seed)):
        w.copy_(full)
    for per_rank in rank_batches(steps, seed, poison):
        indices, offsets, target = global_tbe_batch(per_rank)
        # TorchRec divides embedding gradients by the world size (DDP's averaging convention)
        (kernel(indices, offsets) * target / WORLD).sum().backward()
    names = [n for n, *_ in TABLES]
    weights = dict(zip(names, kernel.split_embedding_weights()))
    states = {n: st for n, st in zip(names, kernel.get_optimizer_state())}
    return weights, states


# ----------------------------------------------------------------------------- rank side
def init_process(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def build_model(optimizer_cls, kwargs, plan_name: str):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        row_wise,
        table_row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    from torchrec_ext import apply_group_optimizer, group_sharders

    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=fs)
                for n, r, d, fs in TABLES], device=torch.device("meta"))
    apply_group_optimizer(ebc, optimizer_cls, **kwargs)
    plans = {
        "tw": {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": table_wise(rank=1)},
        "rw": {"t0": row_wise(), "t1": row_wise(), "t2": row_wise()},
        "cw": {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": column_wise(ranks=[0, 1])},
        "twrw": {"t0": table_row_wise(host_index=0), "t1": table_row_wise(host_index=0),
                 "t2": table_row_wise(host_index=0)},
        "mixed": {"t0": row_wise(), "t1": table_wise(rank=0), "t2": column_wise(ranks=[1, 0])},
        "cw_local": {"t0": table_wise(rank=0), "t1": table_wise(rank=1),
                     "t2": column_wise(ranks=[0, 0])},
    }
    module_plan = construct_module_sharding_plan(
        ebc, per_param_sharding=plans[plan_name], local_size=WORLD, world_size=WORLD,
        device_type="cpu", sharder=group_sharders()[0])
    model = DistributedModelParallel(_Wrap(ebc), device=torch.device("cpu"),
                                     plan=ShardingPlan({"ebc": module_plan}),
                                     sharders=group_sharders())
    return model


class _Wrap(torch.nn.Module):
    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        pooled = self.ebc(kjt).to_dict()  # columns in FEATURES order (the reference's layout)
        return torch.cat([pooled[f] for f in FEATURES], dim=1)


def set_full_weights(model, full: list[torch.Tensor]) -> None:
    names = [n for n, *_ in TABLES]
    sd = model.state_dict()
    for name, tensor in zip(names, full):
        st = sd[f"ebc.embedding_bags.{name}.weight"]
        for shard in st.local_shards():
            r0, c0 = shard.metadata.shard_offsets
            r, c = shard.metadata.shard_sizes
            shard.tensor.copy_(tensor[r0:r0 + r, c0:c0 + c])


def train(model, batches, rank: int) -> None:
    from torchrec import KeyedJaggedTensor

    for per_rank in batches:
        indices, lengths, target = per_rank[rank]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=indices, lengths=lengths)
        (model(kjt) * target).sum().backward()


def local_shards(model) -> dict:
    """``{key: [(offsets, tensor)]}`` for weights and every fused optimizer state."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out: dict[str, list] = {}
    items = dict(model.state_dict())
    for param_state in model.fused_optimizer.state_dict()["state"].values():
        items.update(param_state)
    for key, value in items.items():
        if isinstance(value, ShardedTensor):
            out[key] = [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
                        for s in value.local_shards()]
        elif isinstance(value, torch.Tensor):
            out[key] = [(None, value.detach().clone())]
    return out


def assemble(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's ``local_shards``."""
    keys = set().union(*parts)
    full = {}
    for key in keys:
        pieces = [p for part in parts for p in part.get(key, [])]
        if pieces[0][0] is None:
            full[key] = pieces[0][1]
            continue
        shape = [max(o[i] + t.shape[i] for o, t in pieces) for i in range(pieces[0][1].dim())]
        t = torch.full(shape, float("nan"))
        for o, piece in pieces:
            t[tuple(slice(a, a + s) for a, s in zip(o, piece.shape))] = piece
        full[key] = t
    return full


def spawn(fn: Callable, *args, attempts: int = 2) -> None:
    """Run ``fn(rank, port, *args)`` on 2 ranks. A rank killed by a signal (seen once as a gloo
    SIGABRT while connecting, on a freshly reused port) is retried once on a new port; Python
    exceptions (assertion failures) are never retried."""
    import torch.multiprocessing as mp

    for attempt in range(attempts):
        try:
            mp.spawn(fn, args=(free_port(), *args), nprocs=WORLD, join=True)
            return
        except mp.ProcessExitedException:
            if attempt == attempts - 1:
                raise
