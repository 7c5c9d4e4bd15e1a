"""lightning-sgl: sparse-group-lasso adaptive optimizers for CTR models."""

from .optim import (
    GroupAdagrad,
    GroupAdaHessian,
    GroupAdam,
    GroupAMSGrad,
    GroupMomentum,
    GroupOptimizer,
    GroupSGD,
    NonFiniteGradientError,
    mark_embedding,
)

__version__ = "0.1.0"

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
]
