"""TorchRec integration: fused Group optimizers on EmbeddingBagCollection tables.

``apply_group_optimizer(model.ebc, GroupAdam, lr=..., lambda21=...)`` then
``DistributedModelParallel(model, device=..., sharders=group_sharders())``.

The table kernel (:mod:`torchrec_ext.kernel`, ``GroupTBE``) imports with torch alone; the
TorchRec glue (sharder, sharded EBC, fused optimizer, feature rate, serving export) is imported on first
use of its names and needs ``torchrec`` and ``fbgemm_gpu``.
"""

from __future__ import annotations

import importlib

from .kernel import FUSED_RULES, GroupTBE, TableSpec

_LAZY = {
    "apply_group_optimizer": "sharder",
    "group_sharders": "sharder",
    "GroupEmbeddingBagCollectionSharder": "sharder",
    "ShardedGroupEmbeddingBagCollection": "sharder",
    "is_group_tagged": "sharder",
    "group_planner": "planner",
    "GroupStorageEstimator": "planner",
    "export_serving": "serving",
    "save_serving": "serving",
    "load_serving": "serving",
    "ServingEmbeddingBagCollection": "serving",
}


def __getattr__(name: str):
    """TorchRec-dependent names are imported on first use (``torchrec_ext.kernel`` and this
    package import with torch alone)."""
    if name in _LAZY:
        try:
            module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        except ImportError as err:
            raise ImportError(f"torchrec_ext.{name} needs torchrec and fbgemm_gpu ({err}); "
                              "install them with scripts/install.sh") from err
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchrec_ext' has no attribute {name!r}")


__all__ = [
    "apply_group_optimizer",
    "group_sharders",
    "GroupEmbeddingBagCollectionSharder",
    "ShardedGroupEmbeddingBagCollection",
    "is_group_tagged",
    "group_planner",
    "GroupStorageEstimator",
    "export_serving",
    "save_serving",
    "load_serving",
    "ServingEmbeddingBagCollection",
    "GroupTBE",
    "TableSpec",
    "FUSED_RULES",
]
