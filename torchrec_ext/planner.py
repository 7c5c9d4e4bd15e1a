"""TorchRec planner support: storage estimates that count what a Group-optimized table holds.

TorchRec's ``EmbeddingStorageEstimator`` sizes a table's optimizer state from the optimizer class
it knows (Adam: 2 copies of the weights, row-wise Adagrad: one float per row, anything else: one
copy). A Group-optimized table holds more: the dual (one copy) plus every state of its base
optimizer plus one ``seen`` byte per row -- GroupAdam element-wise is weights + 3 copies, so the
planner would place tables that do not fit. :class:`GroupStorageEstimator` is a drop-in
``ShardEstimator`` (the planner's supported extension point, passed as ``estimator=``) that, for
Group-optimized ``fused`` tables, keeps TorchRec's estimate of everything else (inputs, outputs,
pipelining, the weights themselves) and replaces the optimizer-state term by the bytes the kernel
allocates (:meth:`GroupTBE.table_bytes`). :func:`group_planner` builds an
``EmbeddingShardingPlanner`` whose enumerator uses it (:func:`group_enumerator`);
``TorchRecStrategy`` plans with it.

Cost: O(sharding options x shards) arithmetic per planning; no collective.
"""

from __future__ import annotations

import torch
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.constants import BATCH_SIZE, DEFAULT_PERF_ESTIMATOR
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.estimator import EmbeddingPerfEstimatorFactory
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ShardingOption, Storage

from .embedding import GROUP_OPTIMIZER_TAG
from .kernel import GroupTBE

__all__ = ["GroupStorageEstimator", "group_enumerator", "group_planner", "group_table_config"]


def group_table_config(tensor: torch.Tensor, fused_params: dict | None = None) -> dict | None:
    """``{"optimizer": rule, "rowwise": bool}`` for a table trained by a fused Group optimizer --
    tagged by :func:`~torchrec_ext.apply_group_optimizer`, or through the sharder's
    ``fused_params`` -- else ``None``."""
    for kw in getattr(tensor, "_optimizer_kwargs", None) or []:
        if (kw or {}).get("optimizer") == GROUP_OPTIMIZER_TAG:
            return {"optimizer": kw["sgl_optimizer"], "rowwise": bool(kw.get("rowwise", False))}
    fp = fused_params or {}
    if fp.get("optimizer") == GROUP_OPTIMIZER_TAG:
        return {"optimizer": fp["sgl_optimizer"], "rowwise": bool(fp.get("rowwise", False))}
    return None


class GroupStorageEstimator(EmbeddingStorageEstimator):
    """``EmbeddingStorageEstimator`` that knows the state of Group-optimized tables.

    For every sharding option of a Group-optimized table on the ``fused`` compute kernel, each
    shard's storage is TorchRec's estimate for the same table *without* optimizer state (inputs,
    outputs, weights) plus the kernel's dual, states and ``seen`` flags for the shard's
    ``rows x cols`` (:meth:`GroupTBE.table_bytes`): HBM on a CUDA topology, DDR on CPU. Every
    other table is estimated exactly as by TorchRec. Same arguments as
    ``EmbeddingStorageEstimator``.

    The shards' estimates equal the bytes the kernels allocate up to TorchRec's input/output
    terms (``tests/torchrec/test_planner.py`` compares them for every optimizer and layout).
    """

    def estimate(self, sharding_options: list[ShardingOption], sharder_data_map=None,
                 **kwargs) -> None:
        group = []
        for so in sharding_options:
            sd = (sharder_data_map or {}).get(so.module_type_key)
            cfg = group_table_config(so.tensor, getattr(sd, "fused_params", None))
            if cfg is not None and so.compute_kernel == EmbeddingComputeKernel.FUSED.value:
                group.append((so, so.tensor, cfg))
        # TorchRec's own estimate of these tables as if they had no optimizer state: the optimizer
        # class apply_group_optimizer put on the parameter (only the optimizer term reads it) is
        # hidden for the call and put back whatever happens.
        hidden = {}
        for _, tensor, _ in group:
            if id(tensor) not in hidden and hasattr(tensor, "_optimizer_classes"):
                hidden[id(tensor)] = (tensor, tensor._optimizer_classes)
                tensor._optimizer_classes = [None]
        try:
            super().estimate(sharding_options, sharder_data_map, **kwargs)
        finally:
            for tensor, classes in hidden.values():
                tensor._optimizer_classes = classes
        hbm = self._topology.compute_device in ("cuda", "mtia")
        for so, tensor, cfg in group:
            for shard in so.shards:
                rows, cols = shard.size
                parts = GroupTBE.table_bytes(cfg["optimizer"], rows, cols,
                                             rowwise=cfg["rowwise"], dtype=tensor.dtype)
                extra = sum(v for k, v in parts.items() if k != "weights")
                s = shard.storage
                shard.storage = Storage(hbm=s.hbm + (extra if hbm else 0),
                                        ddr=s.ddr + (0 if hbm else extra), ssd=s.ssd)


def group_enumerator(topology: Topology, *, batch_size: int | None = None,
                     constraints=None) -> EmbeddingEnumerator:
    """TorchRec's ``EmbeddingEnumerator`` with TorchRec's default perf estimator and
    :class:`GroupStorageEstimator` (what :func:`group_planner` plans with)."""
    estimators = [EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topology,
                                                       constraints=constraints),
                  GroupStorageEstimator(topology=topology, constraints=constraints)]
    return EmbeddingEnumerator(topology=topology, batch_size=batch_size or BATCH_SIZE,
                               constraints=constraints, estimator=estimators)


def group_planner(topology: Topology, *, batch_size: int | None = None, constraints=None,
                  **kwargs) -> EmbeddingShardingPlanner:
    """An ``EmbeddingShardingPlanner`` whose storage estimate counts the Group kernels' state
    (its enumerator is :func:`group_enumerator`'s).

    Args:
        topology: the devices to plan for (``Topology(world_size=..., compute_device=...)``).
        batch_size: per-rank batch size (TorchRec's default when ``None``).
        constraints: ``{table: ParameterConstraints}``.
        **kwargs: any other ``EmbeddingShardingPlanner`` argument (``storage_reservation``,
            ``proposer``, ``partitioner``, ...); ``enumerator`` is refused (this helper sets it).
            ``storage_reservation`` defaults to ``FixedPercentageStorageReservation(0.15)``
            (TorchRec's recommended replacement of its heuristic one, which warns that it
            misestimates dense tensors); pass ``HeuristicalStorageReservation(0.15,
            dense_tensor_estimate=...)`` to reserve HBM for a large dense part too.

    Example::

        planner = group_planner(Topology(world_size=2, compute_device="cuda"), batch_size=512)
        plan = planner.collective_plan(model, group_sharders(), dist.group.WORLD)
        model = DistributedModelParallel(model, plan=plan, sharders=group_sharders())
    """
    if "enumerator" in kwargs:
        raise ValueError("Invalid argument enumerator: group_planner sets it (group_enumerator: "
                         "GroupStorageEstimator + TorchRec's perf estimator); build "
                         "EmbeddingShardingPlanner yourself to choose another")
    enumerator = group_enumerator(topology, batch_size=batch_size, constraints=constraints)
    if kwargs.get("storage_reservation") is None:
        from torchrec.distributed.planner.storage_reservations import (
            FixedPercentageStorageReservation,
        )

        kwargs["storage_reservation"] = FixedPercentageStorageReservation(0.15)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size,
                                    constraints=constraints, enumerator=enumerator, **kwargs)
