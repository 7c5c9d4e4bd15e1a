"""Sharder and sharded EmbeddingBagCollection that put Group-optimizer tables on the fused kernel.

Usage (two lines in an existing TorchRec model)::

    apply_group_optimizer(model.ebc, GroupAdam, lr=1e-3, lambda21=1e-4)
    model = DistributedModelParallel(model, device=device, sharders=group_sharders())

``apply_group_optimizer`` tags the tables (as ``_apply_optimizer_in_backward`` would) so that the
planner picks the ``fused`` compute kernel; the sharded module swaps TorchRec's FBGEMM kernel for
:class:`~torchrec_ext.embedding.GroupFusedEmbeddingBag` when lookups are built, and creates one
process group per column-sharded table so that group norms stay exact.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from lightning_sgl.optim import GroupOptimizer
from lightning_sgl.optim.functional import FLAGS, FUSED_RULES, SPECS, hyperparameter_names

from .embedding import GROUP_OPTIMIZER_TAG, GroupFusedEmbeddingBag, is_group_fused_params
from .kernel import GroupTBE

__all__ = ["apply_group_optimizer", "group_sharders", "GroupEmbeddingBagCollectionSharder",
           "ShardedGroupEmbeddingBagCollection", "creating_group_kernels", "is_group_tagged"]

#: every keyword a fused Group optimizer takes (hyperparameters of the fusable specs and flags)
_OPTION_KEYS = (*hyperparameter_names(), *FLAGS)
_FUSED_CLASSES = ", ".join(SPECS[r].class_name for r in FUSED_RULES)
_COLUMN_TYPES = (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value)


def apply_group_optimizer(ebc: EmbeddingBagCollection, optimizer_cls: type[GroupOptimizer], *,
                          tables: list[str] | None = None,
                          per_table: dict[str, dict[str, Any]] | None = None,
                          **kwargs: Any) -> None:
    """Train the tables of ``ebc`` with a fused Group optimizer once sharded by DMP.

    Args:
        ebc: the ``EmbeddingBagCollection`` (may live on the meta device).
        optimizer_cls: ``GroupSGD``, ``GroupMomentum``, ``GroupAdagrad``, ``GroupAdam`` or
            ``GroupAMSGrad`` (``GroupAdaHessian`` needs Hessian-vector products: keep such tables
            dense).
        tables: the tables to tag (default: all).
        per_table: per-table overrides, e.g. ``{"user_id": {"lambda21": 1e-3}}``.
        **kwargs: the optimizer's keyword arguments (``lr``, ``lambda1``, ``lambda21``,
            ``lambda2``, ``betas``, ``eps``, ``rowwise``, ``exact_group_norm``, ...).

    Raises ``ValueError`` for an unsupported optimizer, an unknown table or argument, or an
    invalid value (the optimizer's own checks run here, before sharding).
    """
    rule = getattr(optimizer_cls, "rule", None)
    if rule not in FUSED_RULES:
        raise ValueError(
            f"Invalid optimizer_cls: {getattr(optimizer_cls, '__name__', optimizer_cls)} cannot "
            f"run fused (valid: {_FUSED_CLASSES}); keep that table dense (outside the Group "
            "sharder's EBC) and train it with the torch.optim Group optimizer")
    params = {name.split(".")[0]: p for name, p in ebc.embedding_bags.named_parameters()}
    per_table = per_table or {}
    chosen = list(params) if tables is None else list(tables)
    unknown = [t for t in [*chosen, *per_table] if t not in params]
    if unknown:
        raise ValueError(f"Invalid tables: {unknown} not in the collection (valid: {list(params)})")
    tags = {}
    for name in chosen:  # validate every table first: a refused call tags nothing
        kw = {**kwargs, **per_table.get(name, {})}
        bad = [k for k in kw if k not in _OPTION_KEYS]
        if bad:
            raise ValueError(f"Invalid arguments {bad} for a fused {optimizer_cls.__name__} "
                             f"(valid: {', '.join(_OPTION_KEYS)})")
        opt = optimizer_cls([params[name]], group_by="row", **kw)  # validates every value
        defaults = {k: v for k, v in opt.defaults.items() if k in _OPTION_KEYS}
        tags[name] = (opt, {"optimizer": GROUP_OPTIMIZER_TAG, "sgl_optimizer": rule, **defaults})
    for name, (opt, fused_kwargs) in tags.items():
        p = params[name]
        p._in_backward_optimizers = [opt]
        p._optimizer_classes = [optimizer_cls]
        p._optimizer_kwargs = [fused_kwargs]


def is_group_tagged(param) -> bool:
    """Whether ``param`` was tagged by :func:`apply_group_optimizer`."""
    return any((kw or {}).get("optimizer") == GROUP_OPTIMIZER_TAG
               for kw in getattr(param, "_optimizer_kwargs", None) or [])


@contextlib.contextmanager
def creating_group_kernels():
    """While active, grouped configs tagged for a Group optimizer get our fused kernel."""
    original = GroupedPooledEmbeddingsLookup._create_embedding_kernel

    def create(self, config, device, pg, sharding_type, env):
        if (config.compute_kernel == EmbeddingComputeKernel.FUSED
                and is_group_fused_params(config.fused_params)):
            return GroupFusedEmbeddingBag(config=config, pg=pg, device=device,
                                          sharding_type=sharding_type, env=env)
        return original(self, config, device, pg, sharding_type, env)

    GroupedPooledEmbeddingsLookup._create_embedding_kernel = create
    try:
        yield
    finally:
        GroupedPooledEmbeddingsLookup._create_embedding_kernel = original


class ShardedGroupEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """``ShardedEmbeddingBagCollection`` whose fused Group tables run :class:`GroupTBE`."""

    def __init__(self, module, table_name_to_parameter_sharding, env, *args, **kwargs) -> None:
        params = {n.split(".")[0]: p for n, p in module.embedding_bags.named_parameters()}
        dp = sorted(n for n, ps in table_name_to_parameter_sharding.items()
                    if ps.sharding_type == ShardingType.DATA_PARALLEL.value
                    and n in params and is_group_tagged(params[n]))
        if dp:
            raise ValueError(
                f"Invalid sharding plan: table(s) {dp} are tagged for a fused Group optimizer but "
                "planned data_parallel, where only a dense optimizer could train them (and the "
                "group lasso would not act). Plan them table_wise, row_wise, column_wise or "
                "table_row_wise (the Group sharder's planner never picks data_parallel), or do "
                "not tag them and train them with the torch.optim Group optimizer.")
        super().__init__(module, table_name_to_parameter_sharding, env, *args, **kwargs)
        self._setup_column_groups(table_name_to_parameter_sharding, env)

    def _create_lookups(self) -> None:
        with creating_group_kernels():
            super()._create_lookups()

    def group_kernels(self) -> list[GroupTBE]:
        """This rank's Group kernels (the table-batched modules)."""
        out = []
        for lookup in self._lookups:
            for m in lookup.modules():
                if isinstance(m, GroupFusedEmbeddingBag):
                    out.append(m.emb_module)
        return out

    def _setup_column_groups(self, plan, env) -> None:
        """One process group per column-sharded table, created in sorted order on every rank."""
        groups: dict[str, Any] = {}
        owners: dict[str, int] = {}
        world = dist.is_initialized() and dist.get_world_size(env.process_group) > 1
        for name in sorted(plan):
            ps = plan[name]
            if ps.sharding_type not in _COLUMN_TYPES:
                continue
            shards = ps.sharding_spec.shards
            ranks = sorted({s.placement.rank() for s in shards})
            owners[name] = next(s.placement.rank() for s in shards if s.shard_offsets[1] == 0)
            groups[name] = dist.new_group(ranks) if world and len(ranks) > 1 else None
        self._column_groups = groups
        for kernel in self.group_kernels():
            kernel.set_column_groups(groups, owners)


class GroupEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """EBC sharder that offers every sharding type on CPU too and builds the Group kernels."""

    def shard(self, module, params, env, device: torch.device | None = None,
              module_fqn: str | None = None) -> ShardedGroupEmbeddingBagCollection:
        return ShardedGroupEmbeddingBagCollection(
            module=module, table_name_to_parameter_sharding=params, env=env,
            fused_params=self.fused_params, device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry, module_fqn=module_fqn)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        """Every model-parallel sharding type, on CPU too. Not ``data_parallel``: a tagged table
        placed there would lose its fused Group optimizer (TorchRec's planner picks it for
        small tables); an explicit plan that asks for it is refused with a clear error."""
        return [ShardingType.TABLE_WISE.value,
                ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value,
                ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            return [EmbeddingComputeKernel.DENSE.value]
        return [EmbeddingComputeKernel.FUSED.value]

    @property
    def sharded_module_type(self):
        return ShardedGroupEmbeddingBagCollection


def group_sharders(fused_params: dict[str, Any] | None = None) -> list:
    """TorchRec's default sharders with the EBC sharder replaced by the Group one."""
    rest = [s for s in get_default_sharders() if s.module_type is not EmbeddingBagCollection]
    return [GroupEmbeddingBagCollectionSharder(fused_params=fused_params), *rest]
