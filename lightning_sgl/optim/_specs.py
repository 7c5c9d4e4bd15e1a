"""One spec per base optimizer: the facts every front end reads (as FBGEMM keeps one spec per TBE
optimizer for every backend).

A spec holds the optimizer's own hyperparameters with their defaults and checks, its moment rule
(state names, which of them are row-wise under ``rowwise=True``), the initial value of each
state, and whether the fused table kernel runs it. The ``torch.optim`` classes take their
defaults and validation from here, the table kernel its defaults, validation, state layout and
fusability, the TorchRec sharder its option names. Adding an optimizer = one moment rule in
``_moments.py``, one spec here, one thin class in ``optimizers.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ._moments import MomentRule, get_rule
from ._validation import (
    check_betas,
    check_lambdas,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)

__all__ = ["OptimizerSpec", "SPECS", "get_spec", "FUSED_RULES", "LAMBDAS", "FLAGS",
           "validate_hyperparameters", "hyperparameter_names"]

#: the penalties every Group optimizer takes
LAMBDAS = ("lambda1", "lambda21", "lambda2")
#: the layout/behaviour switches every Group optimizer takes (not hyperparameters of the math)
FLAGS = ("rowwise", "exact_group_norm", "nonfinite", "compiled")


def _betas(name, value):
    check_betas(value)


@dataclass(frozen=True)
class OptimizerSpec:
    """The facts of one base optimizer (see the module docstring)."""

    #: key of its moment rule (``_moments.RULES``)
    name: str
    #: the ``torch.optim`` front end's class name
    class_name: str
    #: the optimizer's own hyperparameters (``lr`` included) and their defaults
    defaults: dict
    #: hyperparameter -> ``check(name, value)`` raising ``ValueError``
    checks: dict = field(default_factory=dict)
    #: state name -> the hyperparameter holding its initial value (others start at 0)
    initial: dict = field(default_factory=dict)
    #: whether the fused table kernel runs it (AdaHessian needs Hessian-vector products)
    fused: bool = True

    @property
    def rule(self) -> MomentRule:
        return get_rule(self.name)

    @property
    def rowwise_ok(self) -> bool:
        """Whether ``rowwise=True`` is meaningful (the rule has a second moment)."""
        return bool(self.rule.second_moment_names)

    def validate(self, hp: dict) -> None:
        """``ValueError`` naming the argument and its valid range, for the common values (``lr``,
        the lambdas) and every own hyperparameter present in ``hp``."""
        check_positive("lr", hp["lr"])
        check_lambdas(hp["lambda1"], hp["lambda21"], hp["lambda2"])
        for name, check in self.checks.items():
            if name in hp:
                check(name, hp[name])

    def initial_value(self, state: str, hp: dict) -> float:
        key = self.initial.get(state)
        return float(hp.get(key, self.defaults.get(key, 0.0))) if key else 0.0

    def state_is_rowwise(self, state: str, rowwise: bool) -> bool:
        """Whether ``state`` is one float per row (group) under ``rowwise``."""
        return rowwise and state in self.rule.second_moment_names


_ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
_ADAM_CHECKS = {"betas": _betas, "eps": check_nonnegative}

SPECS: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("sgd", "GroupSGD", dict(lr=1e-2)),
    OptimizerSpec("momentum", "GroupMomentum", dict(lr=1e-2, momentum=0.9),
                  {"momentum": check_unit_interval}),
    OptimizerSpec("adagrad", "GroupAdagrad",
                  dict(lr=1e-2, lr_decay=0.0, eps=1e-10, initial_accumulator_value=0.0),
                  {"lr_decay": check_nonnegative, "eps": check_nonnegative,
                   "initial_accumulator_value": check_nonnegative},
                  initial={"sum": "initial_accumulator_value"}),
    OptimizerSpec("adam", "GroupAdam", dict(_ADAM), dict(_ADAM_CHECKS)),
    OptimizerSpec("amsgrad", "GroupAMSGrad", dict(_ADAM), dict(_ADAM_CHECKS)),
    OptimizerSpec("adahessian", "GroupAdaHessian",
                  dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4, hessian_power=1.0),
                  {**_ADAM_CHECKS, "hessian_power": lambda n, v: _check_power(v)}, fused=False),
)}

#: base optimizers the fused table kernel runs
FUSED_RULES = tuple(n for n, s in SPECS.items() if s.fused)


def _check_power(v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v <= 1.0):
        raise ValueError(f"Invalid hessian_power: {v!r} (valid range: 0 < hessian_power <= 1)")


def get_spec(name: str) -> OptimizerSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"Unknown base optimizer {name!r}; valid: {sorted(SPECS)}") from None


def validate_hyperparameters(name: str, hp: dict) -> None:
    """``get_spec(name).validate(hp)``."""
    get_spec(name).validate(hp)


def hyperparameter_names(fused_only: bool = True) -> tuple[str, ...]:
    """Every hyperparameter name of the (fused) base optimizers, ``lr`` and the lambdas first."""
    names: list[str] = ["lr", *LAMBDAS]
    for s in SPECS.values():
        if s.fused or not fused_only:
            names += [k for k in s.defaults if k not in names]
    return tuple(names)


Check = Callable[[str, object], None]
