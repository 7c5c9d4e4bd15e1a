"""``GroupLasso``: put a Group optimizer on the model's embedding tables before sharding."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..factory import GROUP_LASSO_MARK
from ..optim import (
    GroupAdagrad,
    GroupAdaHessian,
    GroupAdam,
    GroupAMSGrad,
    GroupMomentum,
    GroupOptimizer,
    GroupSGD,
)

__all__ = ["GroupLasso"]

_VALID = (GroupSGD, GroupMomentum, GroupAdagrad, GroupAdam, GroupAMSGrad, GroupAdaHessian)


def _ebcs(module: nn.Module):
    try:
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
    except ImportError:
        return []
    return [(n, m) for n, m in module.named_modules() if isinstance(m, EmbeddingBagCollection)]


def _sharded_group_tables(module: nn.Module) -> bool:
    try:
        from torchrec_ext.feature_rate import group_modules
    except ImportError:  # pragma: no cover - TorchRec not installed
        return False
    return bool(group_modules(module))


def _plain_tables(module: nn.Module):
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]


class GroupLasso(Callback):
    """Train the embedding tables with a Group optimizer (one row = one feature = one group).

    Args:
        optimizer: the Group optimizer class, or its name (``"GroupAdam"``, ``"adam"``, ...).
        lr, lambda1, lambda21, lambda2: the optimizer's learning rate and penalties.
        tables: table names to regularise (TorchRec table names, or module names of plain
            ``nn.Embedding``/``nn.EmbeddingBag`` tables); default all.
        per_table: per-table overrides, e.g. ``{"user_id": {"lambda21": 1e-3}}``.
        optimizer_kwargs: the optimizer's other arguments (``betas``, ``eps``, ``rowwise``, ...)
            as a dict (YAML-friendly); ``**kwargs`` are accepted too. All validated here.

    TorchRec ``EmbeddingBagCollection`` tables get the fused kernel (see
    :func:`torchrec_ext.apply_group_optimizer`); plain tables are marked so that
    :func:`~lightning_sgl.group_optimizers` trains them with the dense Group optimizer (sparse
    gradients welcome).
    """

    def __init__(self, optimizer: str | type[GroupOptimizer] = "GroupAdam", *,
                 lr: float | None = None, lambda1: float = 0.0, lambda21: float = 0.0,
                 lambda2: float = 0.0, tables: list[str] | None = None,
                 per_table: dict[str, dict[str, Any]] | None = None,
                 optimizer_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if isinstance(optimizer, str):
            by_name = {c.__name__.lower(): c for c in _VALID}
            by_name.update({c.rule: c for c in _VALID})
            optimizer = by_name.get(optimizer.lower(), optimizer)
        kwargs = {**({"lr": lr} if lr is not None else {}), "lambda1": lambda1,
                  "lambda21": lambda21, "lambda2": lambda2, **(optimizer_kwargs or {}), **kwargs}
        if not (isinstance(optimizer, type) and issubclass(optimizer, _VALID)):
            raise ValueError(f"Invalid optimizer: {optimizer!r} (valid: "
                             f"{', '.join(c.__name__ for c in _VALID)})")
        self.optimizer = optimizer
        self.tables = tables
        self.per_table = dict(per_table or {})
        self.kwargs = kwargs
        # validate the values now (a throw-away parameter): clear errors before any training
        import torch
        optimizer([torch.nn.Parameter(torch.zeros(1, 1))], group_by="row", **kwargs)
        for _name, kw in self.per_table.items():
            optimizer([torch.nn.Parameter(torch.zeros(1, 1))], group_by="row", **{**kwargs, **kw})

    @property
    def state_key(self) -> str:
        return f"GroupLasso[{self.optimizer.__name__}]"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ebcs = _ebcs(pl_module)
        plain = _plain_tables(pl_module)
        if not ebcs and _sharded_group_tables(pl_module):
            return  # an earlier stage of this Trainer (fit before validate) already sharded them
        if not ebcs and not plain:
            raise ValueError("GroupLasso: the LightningModule has no EmbeddingBagCollection, "
                             "nn.Embedding or nn.EmbeddingBag to regularise")
        known = set()
        for _, ebc in ebcs:
            names = [n.split(".")[0] for n, _ in ebc.embedding_bags.named_parameters()]
            known.update(names)
        known.update(n for n, _ in plain)
        wanted = list(known) if self.tables is None else list(self.tables)
        unknown = sorted(set(wanted) | set(self.per_table) - known)
        unknown = [t for t in unknown if t not in known]
        if unknown:
            raise ValueError(f"Invalid tables: {unknown} (valid: {sorted(known)})")
        for _, ebc in ebcs:
            from torchrec_ext import apply_group_optimizer

            names = [n.split(".")[0] for n, _ in ebc.embedding_bags.named_parameters()]
            mine = [t for t in names if t in wanted]
            if mine:
                apply_group_optimizer(ebc, self.optimizer, tables=mine,
                                      per_table={t: v for t, v in self.per_table.items()
                                                 if t in mine}, **self.kwargs)
        for name, m in plain:
            if name in wanted:
                setattr(m.weight, GROUP_LASSO_MARK,
                        (self.optimizer, {**self.kwargs, **self.per_table.get(name, {})}))
