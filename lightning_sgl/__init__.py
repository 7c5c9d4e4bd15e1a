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

_LAZY = {
    "TorchRecStrategy": ("lightning_sgl.strategy", "TorchRecStrategy"),
    "GroupLasso": ("lightning_sgl.callbacks", "GroupLasso"),
    "SparsityMonitor": ("lightning_sgl.callbacks", "SparsityMonitor"),
    "MagnitudePruning": ("lightning_sgl.callbacks", "MagnitudePruning"),
    "group_optimizers": ("lightning_sgl.factory", "group_optimizers"),
    "ModelOptimizer": ("lightning_sgl.factory", "ModelOptimizer"),
}


def __getattr__(name: str):
    """Lightning/TorchRec front ends are imported on first use (``import lightning_sgl`` stays
    light for users of the optimizers only)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_sgl' has no attribute {name!r}")

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
    "TorchRecStrategy",
    "GroupLasso",
    "SparsityMonitor",
    "MagnitudePruning",
    "group_optimizers",
    "ModelOptimizer",
]
