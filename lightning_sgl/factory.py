"""``group_optimizers``: the fused table optimizers and a dense optimizer as one optimizer.

Lightning steps one optimizer with a closure (forward + backward). ``ModelOptimizer.step(closure)``
runs the closure **exactly once**, then steps every part: the fused TorchRec tables were already
updated inside backward (their ``step`` only pushes hyperparameters), the Group optimizer of plain
``nn.Embedding``/``nn.EmbeddingBag`` tables marked by the ``GroupLasso`` callback, and the dense
optimizer of everything else. ``param_groups`` lists all parts' groups, so LR schedulers act on
both the tables and the dense part.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .optim import GroupAdaHessian, GroupOptimizer

__all__ = ["ModelOptimizer", "group_optimizers", "GROUP_LASSO_MARK"]

#: attribute set by ``GroupLasso`` on plain embedding parameters: (optimizer class, kwargs)
GROUP_LASSO_MARK = "_sgl_group_lasso"


class ModelOptimizer(Optimizer):
    """The optimizer of a whole model: several optimizers stepped as one ``torch.optim``
    optimizer, the closure run exactly once per step.

    What :func:`group_optimizers` returns (TorchRec's ``CombinedOptimizer`` pattern, for parts
    that are not all keyed): ``param_groups`` is the list of every part's group dicts (the
    same dicts, so LR schedulers and ``LearningRateMonitor`` act on the parts), ``state`` the
    plain parts' state, ``state_dict()`` one entry per part. Step pre/post hooks and
    ``state_dict``/``load_state_dict`` hooks registered on it fire as on any optimizer.

    Args:
        parts: ``(name, optimizer)`` pairs (``None`` optimizers are dropped): a TorchRec
            ``KeyedOptimizer`` of fused tables, Group optimizers, dense ``torch.optim``
            optimizers. Names must be unique.

    Example::

        opt = ModelOptimizer([("tables", GroupAdam(tables, lambda21=1e-4)),
                              ("dense", torch.optim.Adam(mlp.parameters()))])
        opt.step(closure)  # closure runs once; then every part steps
    """

    def __init__(self, parts: list[tuple[str, Any]]) -> None:
        parts = [(n, o) for n, o in parts if o is not None]
        if not parts:
            raise ValueError("ModelOptimizer needs at least one optimizer")
        names = [n for n, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"Invalid parts: duplicate names {names}")
        self.parts: OrderedDict[str, Any] = OrderedDict(parts)
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        # Optimizer.__init__ would add param groups (they belong to the parts); this is the rest
        # of it, as TorchRec's CombinedOptimizer does: step() runs the step pre/post hooks
        self._patch_step_function()
        #: number of times a closure was run by ``step`` (one per step)
        self.closure_calls = 0

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return [g for opt in self.parts.values() for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:
        raise AttributeError("ModelOptimizer.param_groups is the union of its parts' groups")

    @property
    def state(self):  # type: ignore[override]
        """State of the plain torch parts (the fused tables' state lives in their kernels)."""
        out = {}
        for opt in self.parts.values():
            if isinstance(opt, Optimizer) and not hasattr(opt, "params"):
                out.update(opt.state)
        return out

    @state.setter
    def state(self, value) -> None:
        raise AttributeError("ModelOptimizer.state is its parts' state")

    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """Run ``closure`` once (forward + backward; the fused tables update in backward), then
        step every part."""
        loss = None
        hessian = [o for o in self.parts.values() if isinstance(o, GroupAdaHessian)]
        if closure is not None:
            self.closure_calls += 1
            if hessian:  # AdaHessian evaluates the closure itself (it needs create_graph)
                loss = hessian[0].step(closure)
            else:
                with torch.enable_grad():
                    loss = closure()
        for opt in self.parts.values():
            if closure is not None and hessian and opt is hessian[0]:
                continue
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{part name: part.state_dict()}``; the state-dict pre/post hooks run around it."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        out = {name: opt.state_dict() for name, opt in self.parts.items()}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load every part (each validates before it mutates); refused as a whole when a part
        is missing. The load pre/post hooks run around it."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        missing = [n for n in self.parts if n not in state_dict]
        if missing:
            raise ValueError(f"Invalid state_dict: no state for parts {missing} "
                             f"(has {sorted(state_dict)})")
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict[name])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("add param groups to the part optimizers")

    def __repr__(self) -> str:
        return f"ModelOptimizer({', '.join(f'{n}={type(o).__name__}' for n, o in self.parts.items())})"


def _fused_optimizer(module: nn.Module):
    """A TorchRec ``CombinedOptimizer`` of every sharded module's fused optimizer, or None."""
    try:
        from torchrec.distributed.types import ShardedModule
        from torchrec.optim.keyed import CombinedOptimizer
    except ImportError:  # TorchRec not installed: no fused tables
        return None
    parts = []
    for name, m in module.named_modules():
        if isinstance(m, ShardedModule) and hasattr(m, "fused_optimizer"):
            opt = m.fused_optimizer
            if opt.params:
                parts.append((name, opt))
    if not parts:
        return None
    combined = CombinedOptimizer(parts)
    combined.save_param_groups(True)  # lr after schedulers, lambdas: part of every checkpoint
    return combined


def group_optimizers(module: nn.Module, dense: Any = torch.optim.Adam,
                     **dense_kwargs: Any) -> ModelOptimizer:
    """Build the optimizer a LightningModule returns from ``configure_optimizers``.

    Args:
        module: the LightningModule (call from ``configure_optimizers``: tables are sharded then).
        dense: the dense part's optimizer: a ``torch.optim.Optimizer`` class or callable taking
            the parameters (``dense_kwargs`` passed), an optimizer instance, or ``None``.
        **dense_kwargs: keyword arguments of ``dense`` (e.g. ``lr=1e-3``).

    Parts: ``"fused"`` (the TorchRec fused tables, trained inside backward), ``"tables"`` (a Group
    optimizer for ``nn.Embedding``/``nn.EmbeddingBag`` tables marked by ``GroupLasso``, one param
    group per table) and ``"dense"`` (every other trainable parameter).
    """
    fused = _fused_optimizer(module)
    marked: list[tuple[str, nn.Parameter, type, dict]] = []
    rest: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad or hasattr(p, "_in_backward_optimizers"):
            continue  # fused TorchRec table (or tagged for one)
        mark = getattr(p, GROUP_LASSO_MARK, None)
        if mark is not None:
            marked.append((name, p, *mark))
        else:
            rest.append(p)
    tables = None
    if marked:
        classes = {cls for _, _, cls, _ in marked}
        if len(classes) != 1:
            raise ValueError(f"Invalid GroupLasso setup: one Group optimizer class expected, got "
                             f"{sorted(c.__name__ for c in classes)}")
        cls = classes.pop()
        groups = [{"params": [p], "param_names": [n], **kw, "group_by": "row",
                   "track_seen": True} for n, p, _, kw in marked]
        lr = groups[0].get("lr")
        tables = cls(groups, **({"lr": lr} if lr is not None else {}))
    dense_opt = None
    if isinstance(dense, Optimizer):
        dense_opt = dense
    elif dense is not None and rest:
        if isinstance(dense, type) and issubclass(dense, GroupOptimizer):
            dense_kwargs.setdefault("group_by", "none")
        dense_opt = dense(rest, **dense_kwargs)
    parts = [("fused", fused), ("tables", tables), ("dense", dense_opt)]
    return ModelOptimizer(parts)
