"""One table of optimizer configurations (OptimizerInfo-style), shared by every optim test."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lightning_sgl.optim import (
    GroupAdagrad,
    GroupAdaHessian,
    GroupAdam,
    GroupAMSGrad,
    GroupMomentum,
    GroupSGD,
)


@dataclass
class OptimInfo:
    name: str
    cls: type
    kwargs: dict
    #: builds the base torch.optim optimizer equal to ``cls`` with zero lambdas (Theorem 2), and
    #: an optional per-step LR scheduler factory
    reference: object = None
    scheduler: object = None
    #: state names shared with the torch.optim reference (compared too)
    shared_state: tuple = ()
    rowwise: bool = True
    #: hyperparameter -> list of (bad value, message regex)
    bad: dict = field(default_factory=dict)


COMMON_BAD = {
    "lr": [(0.0, r"Invalid learning rate \(lr\): 0.0 \(valid range: lr > 0"),
           (-1e-3, r"Invalid learning rate \(lr\): -0.001"),
           (float("nan"), r"Invalid learning rate \(lr\): nan")],
    "lambda1": [(-1.0, r"Invalid lambda1: -1.0 \(valid range: lambda1 >= 0"),
                (float("nan"), r"Invalid lambda1: nan")],
    "lambda21": [(-0.1, r"Invalid lambda21: -0.1 \(valid range: lambda21 >= 0"),
                 (float("nan"), r"Invalid lambda21: nan"),
                 (float("inf"), r"Invalid lambda21: inf")],
    "lambda2": [(-1e-9, r"Invalid lambda2: -1e-09"), (float("nan"), r"Invalid lambda2: nan")],
    "group_by": [("rows", r"Invalid group_by: 'rows' \(valid options: 'auto', 'row', 'column', "
                          r"'tensor', 'none'\)")],
    "nonfinite": [("ignore", r"Invalid nonfinite: 'ignore' \(valid options: 'raise', 'skip'\)")],
}
ADAM_BAD = {
    "betas": [((1.0, 0.999), r"Invalid beta parameter at index 0: 1.0 \(valid range"),
              ((0.9, -0.1), r"Invalid beta parameter at index 1: -0.1"),
              ((0.9, 1.5), r"Invalid beta parameter at index 1: 1.5")],
    "eps": [(-1e-8, r"Invalid eps: -1e-08 \(valid range: eps >= 0")],
}


def _sqrt_decay(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / math.sqrt(e + 1))


OPTIMS = [
    OptimInfo("sgd", GroupSGD, dict(lr=0.05),
              reference=lambda p: torch.optim.SGD(p, lr=0.05), scheduler=_sqrt_decay,
              rowwise=False),
    OptimInfo("momentum", GroupMomentum, dict(lr=0.02, momentum=0.9),
              reference=lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
              shared_state=("momentum_buffer",), rowwise=False,
              bad={"momentum": [(1.0, r"Invalid momentum: 1.0 \(valid range: 0 <= momentum < 1\)"),
                                (-0.5, r"Invalid momentum: -0.5")]}),
    OptimInfo("adagrad", GroupAdagrad, dict(lr=0.1, eps=1e-10, lr_decay=0.01,
                                            initial_accumulator_value=0.1),
              reference=lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10, lr_decay=0.01,
                                                      initial_accumulator_value=0.1),
              shared_state=("sum",),
              bad={"eps": [(-1.0, r"Invalid eps: -1.0")],
                   "lr_decay": [(-0.1, r"Invalid lr_decay: -0.1")],
                   "initial_accumulator_value": [(-1.0, r"Invalid initial_accumulator_value")]}),
    OptimInfo("adam", GroupAdam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8),
              reference=lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-8),
              shared_state=("exp_avg", "exp_avg_sq"), bad=ADAM_BAD),
    OptimInfo("amsgrad", GroupAMSGrad, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8),
              reference=lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-8,
                                                   amsgrad=True),
              shared_state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), bad=ADAM_BAD),
    OptimInfo("adahessian", GroupAdaHessian, dict(lr=0.05, betas=(0.9, 0.99), eps=1e-4, seed=3),
              bad={**ADAM_BAD,
                   "hessian_power": [(0.0, r"Invalid hessian_power: 0.0 \(valid range"),
                                     (1.5, r"Invalid hessian_power: 1.5")]}),
]
BY_NAME = {o.name: o for o in OPTIMS}
FIRST_ORDER = [o for o in OPTIMS if o.name != "adahessian"]


def bad_inputs(info: OptimInfo):
    """(argument, value, message regex) for every bad hyperparameter of ``info``."""
    table = {**COMMON_BAD, **info.bad}
    return [(arg, v, msg) for arg, cases in table.items() for v, msg in cases]
