"""Group (sparse-group-lasso) adaptive optimizers: the math core and the torch.optim front end.

Layer 1+2 of lightning-sgl: depends on torch only.
"""

from ._base import GroupOptimizer, mark_embedding, resolve_group_by
from ._validation import NonFiniteGradientError
from .optimizers import (
    GroupAdagrad,
    GroupAdaHessian,
    GroupAdam,
    GroupAMSGrad,
    GroupMomentum,
    GroupSGD,
)

__all__ = [
    "GroupOptimizer",
    "GroupSGD",
    "GroupMomentum",
    "GroupAdagrad",
    "GroupAdam",
    "GroupAMSGrad",
    "GroupAdaHessian",
    "NonFiniteGradientError",
    "mark_embedding",
    "resolve_group_by",
]
