"""Lightning callbacks: GroupLasso (Group optimizers on tables), SparsityMonitor (feature rate,
lambda21 tuning), MagnitudePruning (the paper's baseline)."""

from .group_lasso import GroupLasso
from .magnitude_pruning import MagnitudePruning
from .sparsity_monitor import SparsityMonitor, bisect_threshold, feature_rates, model_feature_rate

__all__ = ["GroupLasso", "MagnitudePruning", "SparsityMonitor", "bisect_threshold", "feature_rates",
           "model_feature_rate"]
