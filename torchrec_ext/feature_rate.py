"""Feature rate of sharded Group tables: exact counts across ranks for every sharding type.

feature rate = non-zero rows / rows seen in training. Table-, row- and table-row-wise shards hold
disjoint whole rows: their local counts are summed over ranks. A column-wise table has every row
on several shards: a row is seen if its shards saw it and non-zero if *any* shard's part is
non-zero, so per-row flags are combined with an all-reduce(MAX) and the row is counted once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .kernel import GroupTBE
from .sharder import ShardedGroupEmbeddingBagCollection

__all__ = ["group_modules", "feature_counts", "seen_row_norms", "all_group_kernels",
           "seen_row_weight_norms", "prune_seen_rows", "plan_tables"]

_COLUMN = ("column_wise", "table_column_wise")


def group_modules(module: nn.Module) -> list[tuple[str, ShardedGroupEmbeddingBagCollection]]:
    """The sharded Group EBCs inside ``module`` with their names (sorted: same order on all
    ranks)."""
    found = [(n, m) for n, m in module.named_modules()
             if isinstance(m, ShardedGroupEmbeddingBagCollection)]
    return sorted(found, key=lambda x: x[0])


def all_group_kernels(module: nn.Module) -> list[GroupTBE]:
    return [k for _, m in group_modules(module) for k in m.group_kernels()]


def _table_shards(sharded: ShardedGroupEmbeddingBagCollection):
    """table name -> list of (kernel, local table index)."""
    out: dict[str, list[tuple[GroupTBE, int]]] = {}
    for k in sharded.group_kernels():
        for i, t in enumerate(k.tables):
            out.setdefault(t.name, []).append((k, i))
    return out


def _pg_device(pg) -> torch.device:
    if dist.is_initialized() and dist.get_backend(pg) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def feature_counts(module: nn.Module, pg=None) -> dict[str, tuple[int, int]]:
    """``{"<ebc path>.<table>" or "<table>": (rows seen, seen rows that are non-zero)}``, exact
    over all ranks (collective: call on every rank)."""
    distributed = dist.is_initialized() and dist.get_world_size(pg) > 1
    result: dict[str, tuple[int, int]] = {}
    mods = group_modules(module)
    for path, sharded in mods:
        plan = sharded.module_sharding_plan
        shards = _table_shards(sharded)
        names = sorted(n for n, ps in plan.items() if ps.sharding_type != "data_parallel")
        summed = [n for n in names if plan[n].sharding_type not in _COLUMN]
        local = torch.zeros(len(summed), 2, dtype=torch.float64)
        for j, name in enumerate(summed):
            for k, i in shards.get(name, []):
                seen, nz = k.row_flags(i)
                local[j, 0] += seen.sum()
                local[j, 1] += (seen & nz).sum()
        dev = _pg_device(pg)
        if distributed and len(summed):
            local = local.to(dev)
            dist.all_reduce(local, group=pg)
            local = local.cpu()
        key = _keyed(mods, path)
        for j, name in enumerate(summed):
            result[key(name)] = (int(local[j, 0]), int(local[j, 1]))
        for name in (n for n in names if n not in summed):
            rows = plan[name].sharding_spec.shards[0].shard_sizes[0]
            flags = torch.zeros(2, rows, dtype=torch.uint8)
            for k, i in shards.get(name, []):
                seen, nz = k.row_flags(i)
                flags[0] |= seen.to(torch.uint8)
                flags[1] |= nz.to(torch.uint8)
            if distributed:
                f = flags.to(dev)
                dist.all_reduce(f, op=dist.ReduceOp.MAX, group=pg)
                flags = f.cpu()
            seen = flags[0].bool()
            result[key(name)] = (int(seen.sum()), int((seen & flags[1].bool()).sum()))
    return result


def _keyed(mods: list, path: str):
    """Table key: the table name, prefixed by the EBC path when there are several EBCs."""
    return (lambda n: n) if len(mods) == 1 else (lambda n: f"{path}.{n}")


def plan_tables(module: nn.Module) -> dict[str, int]:
    """Every model-parallel table of the sharded Group EBCs (same on all ranks): key -> dim."""
    out: dict[str, int] = {}
    mods = group_modules(module)
    for path, sharded in mods:
        key = _keyed(mods, path)
        for cfg in sharded._embedding_bag_configs:
            if sharded.module_sharding_plan[cfg.name].sharding_type != "data_parallel":
                out[key(cfg.name)] = cfg.embedding_dim
    return out


def _per_table(module: nn.Module, local) -> dict[str, tuple[Tensor, int]]:
    """``local(kernel) -> {table: tensor}`` concatenated over this rank's kernels, with every
    table of the plan present (empty where it has no rows here) and its embedding dim."""
    dims = plan_tables(module)
    parts: dict[str, list] = {k: [] for k in dims}
    mods = group_modules(module)
    for path, sharded in mods:
        key = _keyed(mods, path)
        for k in sharded.group_kernels():
            for name, t in local(k).items():
                parts[key(name)].append(t)
    return {k: (torch.cat(v) if v else torch.zeros(0), dims[k]) for k, v in parts.items()}


@torch.no_grad()
def seen_row_norms(module: nn.Module) -> dict[str, tuple[Tensor, int]]:
    """Local shrink norms of seen rows per table (each row reported by one rank) and the group
    width; see :meth:`GroupTBE.seen_row_norms`. Collective for column-sharded tables."""
    return _per_table(module, lambda k: k.seen_row_norms())


@torch.no_grad()
def seen_row_weight_norms(module: nn.Module) -> dict[str, Tensor]:
    """Local full-row L2 norms of seen rows per table (each row reported by one rank; every
    table of the plan present, possibly empty). Collective for column-sharded tables."""
    return {k: v for k, (v, _) in _per_table(module, lambda k: k.seen_row_weight_norms()).items()}


@torch.no_grad()
def prune_seen_rows(module: nn.Module, thresholds: dict[str, float]) -> None:
    """Zero the seen rows whose full-row norm is <= the table's threshold (collective for CW)."""
    mods = group_modules(module)
    for path, sharded in mods:
        local = {n.rsplit(".", 1)[-1] if len(mods) > 1 else n: v for n, v in thresholds.items()
                 if len(mods) == 1 or n.startswith(path + ".")}
        for k in sharded.group_kernels():
            k.prune_seen_rows(local)
