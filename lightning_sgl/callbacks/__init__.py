"""Lightning callbacks: GroupLasso (put Group optimizers on tables), SparsityMonitor."""

from .group_lasso import GroupLasso
from .sparsity_monitor import SparsityMonitor, bisect_lambda21, feature_rates

__all__ = ["GroupLasso", "SparsityMonitor", "bisect_lambda21", "feature_rates"]
