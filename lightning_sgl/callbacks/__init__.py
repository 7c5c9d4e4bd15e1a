"""Lightning callbacks: GroupLasso (Group optimizers on tables), SparsityMonitor (feature rate,
lambda21 tuning), MagnitudePruning (the paper's baseline)."""

from .group_lasso import GroupLasso
from .magnitude_pruning import MagnitudePruning
from .sparsity_monitor import SparsityMonitor, bisect_lambda21, feature_rates

__all__ = ["GroupLasso", "MagnitudePruning", "SparsityMonitor", "bisect_lambda21", "feature_rates"]
