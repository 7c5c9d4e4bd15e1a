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

__all__ = ["group_modules", "feature_counts", "shrink_norms", "all_group_kernels",
           "seen_row_weight_norms", "prune_seen_rows", "plan_tables", "plan_table_layouts",
           "shrink_histograms", "shrink_run_counts", "shrink_value_counts", "reapply_prox_between"]

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
def _recount(mods, pg, distributed: bool) -> None:
    """Rebuild every kernel's counts from its buffers, O(rows): row-, table- and table-row-wise
    shards locally; a column-sharded table's rows are non-zero if any shard's part is (flags
    all-reduced with MAX, in plan order). Collective: every rank calls it."""
    dev = _pg_device(pg)
    for _, sharded in mods:
        plan = sharded.module_sharding_plan
        shards = _table_shards(sharded)
        combined: dict[int, dict[int, Tensor]] = {}  # id(kernel) -> {local table: flags}
        for name in sorted(n for n, ps in plan.items() if ps.sharding_type in _COLUMN):
            rows = plan[name].sharding_spec.shards[0].shard_sizes[0]
            flags = torch.zeros(rows, dtype=torch.uint8)
            for k, i in shards.get(name, []):
                flags |= k.row_flags(i)[1].to(torch.uint8)
            if distributed:
                f = flags.to(dev)
                dist.all_reduce(f, op=dist.ReduceOp.MAX, group=pg)
                flags = f.cpu()
            for k, i in shards.get(name, []):
                combined.setdefault(id(k), {})[i] = flags.bool()
        for k in sharded.group_kernels():
            k.recount(combined.get(id(k)))


def _has_column_shards(mods) -> bool:
    """Whether the plan (the same on every rank) column-shards a table. O(tables)."""
    return any(ps.sharding_type in _COLUMN for _, m in mods for ps in m.module_sharding_plan.values())


@torch.no_grad()
def feature_counts(module: nn.Module, pg=None, extra: Tensor | None = None):
    """``{"<ebc path>.<table>" or "<table>": (rows seen, seen rows that are non-zero)}``, exact
    over all ranks (collective: call on every rank).

    Args:
        module: the (sharded) model.
        pg: the process group (default: the world).
        extra: a float64 tensor summed over the ranks in the same all-reduce (the first level
            of a threshold search, :class:`~lightning_sgl.SparsityMonitor`); then
            ``(counts, extra summed)`` is returned.

    Cost: O(tables) and one small all-reduce -- the kernels keep their counts up to date as
    they write rows. Only after a write by someone else (a checkpoint load) do they rebuild them,
    O(rows) once: each rank its own, or, with a column-sharded table in the plan, decided over
    all ranks (one more all-reduce, so that the column-shard reductions line up)."""
    distributed = dist.is_initialized() and dist.get_world_size(pg) > 1
    mods = group_modules(module)
    stale = any(k.counts_stale() for _, m in mods for k in m.group_kernels())
    if distributed and _has_column_shards(mods):
        flag = torch.tensor([float(stale)], device=_pg_device(pg))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
        stale = bool(flag.item())
    if stale:
        _recount(mods, pg, distributed and _has_column_shards(mods))
    keys: list[str] = []
    for path, sharded in mods:
        key = _keyed(mods, path)
        keys += [key(n) for n, ps in sorted(sharded.module_sharding_plan.items())
                 if ps.sharding_type != "data_parallel"]
    index = {k: j for j, k in enumerate(keys)}
    local = torch.zeros(len(keys), 2, dtype=torch.float64)
    for path, sharded in mods:
        key = _keyed(mods, path)
        for k in sharded.group_kernels():
            for t, (seen, nz) in zip(k.tables, k.table_counts()):
                if t.col_offset == 0:  # a column-sharded row is counted by one shard
                    local[index[key(t.name)]] += torch.tensor([seen, nz], dtype=torch.float64)
    flat = local.view(-1)
    if extra is not None:
        flat = torch.cat([flat, extra.reshape(-1).to(torch.float64)])
    if distributed and flat.numel():
        flat = flat.to(_pg_device(pg))
        dist.all_reduce(flat, group=pg)
        flat = flat.cpu()
    local = flat[:local.numel()].view(-1, 2)
    counts = {k: (int(local[j, 0]), int(local[j, 1])) for k, j in index.items()}
    if extra is None:
        return counts
    return counts, flat[local.numel():].view(extra.shape)


def _keyed(mods: list, path: str):
    """Table key: the table name, prefixed by the EBC path when there are several EBCs."""
    return (lambda n: n) if len(mods) == 1 else (lambda n: f"{path}.{n}")


def _local(mods: list, path: str, values: dict) -> dict:
    """The entries of ``values`` (keyed as :func:`_keyed` keys them) for the EBC at ``path``,
    keyed by its own table names."""
    if len(mods) == 1:
        return dict(values)
    return {n.rsplit(".", 1)[-1]: v for n, v in values.items() if n.startswith(path + ".")}


def plan_tables(module: nn.Module) -> dict[str, int]:
    """Every model-parallel table of the sharded Group EBCs (same on all ranks): key -> dim."""
    return {k: dim for k, (_, dim, _) in plan_table_layouts(module).items()}


def plan_table_layouts(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Every model-parallel table of the sharded Group EBCs: key -> ``(num_embeddings, dim,
    features)`` (what its serving export's size depends on). O(tables)."""
    out: dict[str, tuple[int, int, int]] = {}
    mods = group_modules(module)
    for path, sharded in mods:
        key = _keyed(mods, path)
        for cfg in sharded._embedding_bag_configs:
            if sharded.module_sharding_plan[cfg.name].sharding_type != "data_parallel":
                out[key(cfg.name)] = (cfg.num_embeddings, cfg.embedding_dim,
                                      len(cfg.feature_names))
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
def shrink_norms(module: nn.Module) -> dict[str, tuple[Tensor, int]]:
    """Local shrink norms of seen rows per table (each row reported by one rank) and the group
    width; see :meth:`GroupTBE.shrink_norms`. Collective for column-sharded tables."""
    return _per_table(module, lambda k: k.shrink_norms())


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
        local = _local(mods, path, thresholds)
        for k in sharded.group_kernels():
            k.prune_seen_rows(local)


# --------------------------------------------------------------------------- shrink-norm index
def _ensure_indexes(module: nn.Module, pg=None) -> list:
    """Every kernel's shrink-norm index up to date. With a column-sharded table in the plan the
    rebuild is decided over all ranks (one tiny all-reduce, so that the column-shard reductions
    of a recompute line up); without, each rank rebuilds its own (no collective). Returns
    ``group_modules(module)``. O(tables); a rebuild is O(rows), once after an outside write."""
    mods = group_modules(module)
    kernels = [k for _, m in mods for k in m.group_kernels()]
    if not _has_column_shards(mods):
        for k in kernels:
            k.shrink_index.ensure()
        return mods
    flags = torch.tensor([[float(k.shrink_index.stale()), float(k.shrink_index.needs_recompute())]
                          for k in kernels] or [[0.0, 0.0]]).amax(0)
    if dist.is_initialized() and dist.get_world_size(pg) > 1:
        flags = flags.to(_pg_device(pg))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=pg)
        flags = flags.cpu()
    for k in kernels:
        k.shrink_index.ensure(recompute=bool(flags[1]))
    return mods


@torch.no_grad()
def shrink_histograms(module: nn.Module, pg=None) -> dict[str, Tensor]:
    """Per table of the plan: int64 ``[BUCKETS]``, this rank's seen rows per shrink-norm bucket
    (:mod:`torchrec_ext.kernel.index`; a column-sharded row counted by one shard). O(tables x
    buckets) with the native index; collective with a column-sharded table in the plan (the
    rebuild decision)."""
    from .kernel.index import BUCKETS

    mods = _ensure_indexes(module, pg)
    out = {k: torch.zeros(BUCKETS, dtype=torch.int64) for k in plan_tables(module)}
    for path, sharded in mods:
        key = _keyed(mods, path)
        for k in sharded.group_kernels():
            for name, h in k.shrink_histograms().items():
                out[key(name)] += h.cpu()
    return out


def _summed_over_kernels(module: nn.Module, asked: dict, size: int, read) -> dict[str, Tensor]:
    """Per table key of ``asked``: ``read(kernel, local name, asked[key])`` summed over this
    rank's kernels that hold a shard of it (int64 ``[size]``)."""
    out = {k: torch.zeros(size, dtype=torch.int64) for k in asked}
    mods = group_modules(module)
    for path, sharded in mods:
        key = _keyed(mods, path)
        for k in sharded.group_kernels():
            for name in {t.name for t in k.tables}:
                if key(name) in asked:
                    out[key(name)] += read(k, name, asked[key(name)])
    return out


@torch.no_grad()
def shrink_run_counts(module: nn.Module, buckets: dict[str, int]) -> dict[str, Tensor]:
    """Per table ``t`` of ``buckets``: this rank's seen rows per run of shrink-norm bucket
    ``buckets[t]`` (int64 ``[RUNS]``, :meth:`GroupTBE.shrink_run_counts`). O(RUNS) per kernel
    for a crowded bucket, else O(its rows), with the native index; no collective."""
    from .kernel.index import RUNS

    return _summed_over_kernels(module, buckets, RUNS,
                                lambda k, name, b: k.shrink_run_counts(name, b))


@torch.no_grad()
def shrink_value_counts(module: nn.Module, runs: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    """Per table ``t`` of ``runs``: this rank's seen rows per float32 value of run ``runs[t][1]``
    of shrink-norm bucket ``runs[t][0]`` (int64 ``[RUN]``, :meth:`GroupTBE.shrink_value_counts`).
    O(rows of the run) with the native index; no collective."""
    from .kernel.index import RUN

    return _summed_over_kernels(module, runs, RUN,
                                lambda k, name, bj: k.shrink_value_counts(name, *bj))


@torch.no_grad()
def reapply_prox_between(module: nn.Module, bounds: dict[str, tuple[float, float]]) -> int:
    """:meth:`GroupTBE.reapply_prox_between` on every kernel (``bounds``: table key -> (old,
    new) lambda21). Returns the rows re-applied on this rank. Collective for CW."""
    mods = group_modules(module)
    touched = 0
    for path, sharded in mods:
        local = _local(mods, path, bounds)
        for k in sharded.group_kernels():
            touched += k.reapply_prox_between(local)
    return touched
