"""TorchRec integration: fused Group optimizers on EmbeddingBagCollection tables.

``apply_group_optimizer(model.ebc, GroupAdam, lr=..., lambda21=...)`` then
``DistributedModelParallel(model, device=..., sharders=group_sharders())``.
"""

from .kernel import FUSED_RULES, GroupTBE, TableSpec
from .sharder import (
    GroupEmbeddingBagCollectionSharder,
    ShardedGroupEmbeddingBagCollection,
    apply_group_optimizer,
    group_sharders,
)

__all__ = [
    "apply_group_optimizer",
    "group_sharders",
    "GroupEmbeddingBagCollectionSharder",
    "ShardedGroupEmbeddingBagCollection",
    "GroupTBE",
    "TableSpec",
    "FUSED_RULES",
]
