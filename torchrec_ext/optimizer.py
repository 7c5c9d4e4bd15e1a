"""``GroupFusedOptimizer``: the TorchRec ``FusedOptimizer`` of one :class:`GroupTBE` kernel.

Like TorchRec's ``EmbeddingFusedOptimizer``: ``step()`` is a no-op (the update ran in backward),
the state is keyed by parameter (a table's weight ``ShardedTensor``) and named
``"<table>.<state>"``, and every state is a ``ShardedTensor`` whose local shards alias the
kernel's buffers, so ``load_state_dict`` / ``torch.distributed.checkpoint`` load in place.

States per table:

- ``"<table>.dual"`` and element-wise moments (``exp_avg``, ...): sharded like the weight;
- row-wise moments (``rowwise=True``): a 1-D ``[num_embeddings]`` tensor sharded by rows. Column
  shards of a table hold identical copies; only the shard at column offset 0 publishes it (so the
  global size is the same under every plan) and the others receive it after a load;
- ``"<table>.seen"``: the 1-byte per row "seen in training" flags (row-sharded like row-wise
  state), so the feature rate resumes exactly;
- ``"<table>.shrink"``: float32 per row, the row's shrink norm / sqrt(d) at its last write (the
  ``lambda21`` tuner's index, :mod:`torchrec_ext.kernel.index`; row-sharded likewise), so a
  resumed tuning sees what an uninterrupted one would;
- ``"<table>.step"``: the kernel's step count (replicated).

``param_groups[0]`` holds ``lr``, the lambdas and the base optimizer's hyperparameters; the kernel
reads them at every update, so LR schedulers and lambda21 tuning act on the next backward.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharding_spec import ShardMetadata
from torchrec.optim.fused import FusedOptimizer

from .kernel import GroupTBE

__all__ = ["GroupFusedOptimizer"]


def _shape(t) -> tuple | None:
    """Global shape of a tensor or ShardedTensor (``None`` for anything else)."""
    return tuple(t.size()) if isinstance(t, (torch.Tensor, ShardedTensor)) else None


def _sharded(local: list[Shard], meta: ShardedTensorMetadata, pg) -> ShardedTensor:
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local_shards=local, sharded_tensor_metadata=meta, process_group=pg)


class GroupFusedOptimizer(FusedOptimizer):
    """Fused optimizer view of a :class:`GroupTBE` (see module docstring)."""

    def __init__(self, config, kernel: GroupTBE, pg: dist.ProcessGroup | None = None) -> None:
        self._kernel = kernel
        self._pg = pg
        params: dict[str, Any] = {}
        state: dict[Any, Any] = {}
        by_name: dict[str, list[int]] = {}
        for i, t in enumerate(config.embedding_tables):
            by_name.setdefault(t.name, []).append(i)
        weights = kernel.split_embedding_weights()
        opt_states = kernel.get_optimizer_state()
        self._rowwise_owner: dict[str, int] = {}
        for name, idxs in by_name.items():
            tc = config.embedding_tables[idxs[0]]
            gmeta = copy.deepcopy(tc.global_metadata)
            if gmeta is None or tc.local_metadata is None:  # unsharded (tests): one local shard
                weight = weights[idxs[0]]
                st: dict[str, Any] = {f"{name}.{k}": v for k, v in opt_states[idxs[0]].items()}
            else:
                gmeta.tensor_properties.dtype = weights[idxs[0]].dtype
                gmeta.tensor_properties.requires_grad = False
                weight = _sharded([Shard(weights[i], config.embedding_tables[i].local_metadata)
                                   for i in idxs], gmeta, pg)
                st = {}
                for key in opt_states[idxs[0]]:
                    local = [opt_states[i][key] for i in idxs]
                    if local[0].dim() == 2:  # element-wise: sharded like the weight
                        meta = copy.deepcopy(gmeta)
                        st[f"{name}.{key}"] = _sharded(
                            [Shard(v, config.embedding_tables[i].local_metadata)
                             for v, i in zip(local, idxs)], meta, pg)
                    else:
                        st[f"{name}.{key}"] = self._rowwise_state(config, idxs, local, gmeta)
            for key, view in (("seen", kernel.row_seen_view), ("shrink", kernel.row_shrink_view)):
                local = [view(i) for i in idxs]
                if gmeta is None or tc.local_metadata is None:
                    st[f"{name}.{key}"] = local[0]
                else:
                    st[f"{name}.{key}"] = self._rowwise_state(config, idxs, local, gmeta)
            st[f"{name}.step"] = kernel.step
            params[f"{name}.weight"] = weight
            state[weight] = st
        group = {"params": list(params.values()), **dict(kernel.hp)}
        super().__init__(params, state, [group])
        kernel.hp_provider = lambda: self.param_groups[0]

    def _rowwise_state(self, config, idxs, local, gmeta) -> ShardedTensor:
        shards = [m for m in gmeta.shards_metadata if m.shard_offsets[1] == 0]
        props = copy.deepcopy(gmeta.tensor_properties)
        props.dtype = local[0].dtype
        meta = ShardedTensorMetadata(
            shards_metadata=[ShardMetadata(shard_offsets=[m.shard_offsets[0]],
                                           shard_sizes=[m.shard_sizes[0]], placement=m.placement)
                             for m in shards],
            size=torch.Size([gmeta.size[0]]),
            tensor_properties=props)
        mine = []
        for v, i in zip(local, idxs):
            lm = config.embedding_tables[i].local_metadata
            if lm.shard_offsets[1] == 0:
                mine.append(Shard(v, ShardMetadata(shard_offsets=[lm.shard_offsets[0]],
                                                   shard_sizes=[lm.shard_sizes[0]],
                                                   placement=lm.placement)))
        return _sharded(mine, meta, self._pg)

    # ------------------------------------------------------------------ FusedOptimizer API
    def load_state_dict(self, state_dict) -> None:
        """``KeyedOptimizer.load_state_dict`` after checking, before any copy, that every table
        has exactly this kernel's states (optimizer type, element-wise vs row-wise) with the same
        global shapes; a mismatch raises ``ValueError`` naming the table and state."""
        saved = state_dict.get("state") if isinstance(state_dict, dict) else None
        if saved is None:
            raise ValueError("Invalid state_dict for the fused Group optimizer: no 'state'")
        for key, param in self.params.items():
            mine = self.state.get(param, {})
            theirs = saved.get(key)
            if theirs is None:
                raise ValueError(f"Invalid state_dict for the fused Group optimizer: no state for "
                                 f"{key!r} (has {sorted(saved)[:4]})")
            if set(theirs) != set(mine):
                raise ValueError(
                    f"Invalid state_dict for the fused Group optimizer ({self._kernel.optimizer}"
                    f"{', row-wise' if self._kernel.rowwise else ''}): {key!r} has states "
                    f"{sorted(theirs)}, expected {sorted(mine)} (saved by another optimizer "
                    "type or layout?)")
            for name, value in mine.items():
                if _shape(value) is None:
                    continue
                got = _shape(theirs[name])
                if got != _shape(value):
                    raise ValueError(
                        f"Invalid state_dict for the fused Group optimizer: {name!r} has shape "
                        f"{got}, expected {_shape(value)}")
        super().load_state_dict(state_dict)

    def _push(self) -> None:
        self._kernel.update_hyper_parameters(self.param_groups[0])

    def step(self, closure: Any = None) -> None:
        """No-op for the weights (updated in backward); validates and pushes hyperparameters."""
        self._push()

    def zero_grad(self, set_to_none: bool = False) -> None:
        self._push()

    def set_optimizer_step(self, step: int) -> None:
        self._kernel.set_optimizer_step(step)

    def update_hyper_parameters(self, params_dict: dict[str, Any]) -> None:
        for k, v in params_dict.items():
            if k in self.param_groups[0]:
                self.param_groups[0][k] = v
        self._push()

    def post_load_state_dict(self) -> None:
        """After a load (also through ``CombinedOptimizer``/DMP): push hyperparameters and copy
        row-wise state to every column shard (collective: all ranks load together)."""
        self._push()
        self._kernel.sync_column_shards()
        self._kernel.invalidate_counts()  # tables and seen flags were loaded in place
