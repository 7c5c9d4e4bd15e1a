"""``GroupFusedEmbeddingBag``: the TorchRec compute kernel around :class:`GroupTBE`.

It plays the role of TorchRec's ``BatchedFusedEmbeddingBag`` (a ``BaseBatchedEmbeddingBag`` and a
``FusedOptimizerModule``) for grouped tables whose ``fused_params`` carry a Group optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.utils import append_prefix
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizer, FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lightning_sgl.optim.functional import FLAGS, hyperparameter_names

from .kernel import GroupTBE, TableSpec
from .optimizer import GroupFusedOptimizer

__all__ = ["GroupFusedEmbeddingBag", "GROUP_OPTIMIZER_TAG", "is_group_fused_params",
           "kernel_kwargs_from_fused_params"]

#: value of ``fused_params["optimizer"]`` for tables trained by a Group optimizer
GROUP_OPTIMIZER_TAG = "lightning_sgl.group"
#: hyperparameters carried by ``fused_params`` (``lr`` is TorchRec's ``learning_rate``)
_HP_KEYS = tuple(k for k in hyperparameter_names() if k != "lr")


def is_group_fused_params(fused_params: dict | None) -> bool:
    return bool(fused_params) and fused_params.get("optimizer") == GROUP_OPTIMIZER_TAG


def kernel_kwargs_from_fused_params(fused_params: dict) -> dict:
    """The :class:`GroupTBE` arguments carried by a grouped config's ``fused_params``."""
    hp = {k: fused_params[k] for k in _HP_KEYS if k in fused_params}
    if "learning_rate" in fused_params:
        hp["lr"] = fused_params["learning_rate"]
    kw = {k: fused_params[k] for k in FLAGS if k in fused_params}
    return dict(optimizer=fused_params["sgl_optimizer"], hyperparameters=hp, **kw)


class GroupFusedEmbeddingBag(BaseBatchedEmbeddingBag[torch.Tensor], FusedOptimizerModule):
    """Fused Group-optimizer kernel for one grouped embedding config (one rank's shards)."""

    def __init__(self, config: GroupedEmbeddingConfig, pg: dist.ProcessGroup | None = None,
                 device: torch.device | None = None, sharding_type=None, env=None) -> None:
        super().__init__(config, pg, device, sharding_type)
        tables = [TableSpec(t.name, t.local_rows, t.local_cols, t.embedding_dim, ro, co)
                  for t, ro, co in zip(config.embedding_tables, self._row_offset,
                                       self._col_offset)]
        pooling = "mean" if self._pooling == PoolingMode.MEAN else "sum"
        dtype = data_type_to_dtype(config.data_type)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid data_type: {config.data_type} (the Group fused kernel keeps "
                             "fp32 or fp64 tables)")
        self._emb_module = GroupTBE(tables, self._feature_table_map, pooling=pooling,
                                    device=device, dtype=dtype,
                                    **kernel_kwargs_from_fused_params(config.fused_params))
        self._optim = GroupFusedOptimizer(config, self._emb_module, pg)
        self.init_parameters()

    # TorchRec reads table slices through this attribute (state_dict registration, composability)
    @property
    def _param_per_table(self) -> dict[str, TableBatchedEmbeddingSlice]:  # type: ignore[override]
        out: dict[str, TableBatchedEmbeddingSlice] = {}
        counts: dict[str, int] = {}
        for t in self._config.embedding_tables:
            counts[t.name] = counts.get(t.name, 0) + 1
        first = {}
        for i, t in enumerate(self._config.embedding_tables):
            first.setdefault(t.name, i)
        for name, i in first.items():
            t = self._emb_module.tables[i]
            start = self._emb_module.layout.weights_offsets[i]
            sl = TableBatchedEmbeddingSlice(
                data=self._emb_module.weights, start_offset=start,
                end_offset=start + counts[name] * t.local_rows * t.local_cols,
                num_embeddings=-1, embedding_dim=t.local_cols)
            sl._in_backward_optimizers = [EmptyFusedOptimizer()]
            out[name] = sl
        return out

    @_param_per_table.setter
    def _param_per_table(self, value) -> None:
        self.__dict__["_param_per_table_unused"] = value

    @property
    def emb_module(self) -> GroupTBE:  # type: ignore[override]
        return self._emb_module

    @property
    def fused_optimizer(self) -> FusedOptimizer:
        return self._optim

    def forward(self, features: KeyedJaggedTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if features.variable_stride_per_key():
            raise ValueError(
                "variable batch size per feature (VBE) is not supported by the Group fused kernel; "
                "pad every feature to the same batch size (or disable VBE in the input pipeline)")
        weights = features.weights_or_none()
        if weights is not None and not torch.is_floating_point(weights):
            weights = None
        return self._emb_module(features.values(), features.offsets(), weights)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._emb_module.invalidate_counts()  # the tables were (maybe) written in place

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Fused parameters are not exposed as buffers (no external optimizer may touch them)."""
        yield from ()

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for config, tensor in zip(self._config.embedding_tables,
                                  self._emb_module.split_embedding_weights()):
            param = nn.Parameter(tensor, requires_grad=False)
            param._in_backward_optimizers = [EmptyFusedOptimizer()]
            yield append_prefix(prefix, f"{config.name}.weight"), param

    def init_parameters(self) -> None:
        for w, t in zip(self._emb_module.split_embedding_weights(), self._config.embedding_tables):
            lo, hi = t.get_weight_init_min(), t.get_weight_init_max()
            if lo is None or hi is None:
                b = math.sqrt(1.0 / t.num_embeddings)
                lo, hi = -b, b
            w.uniform_(lo, hi)
