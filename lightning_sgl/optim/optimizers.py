r"""The Group optimizers: Algorithm 1 of Yue et al. on top of each base optimizer of Table 1.

Each class's docstring (``help(GroupAdam)``) lists every argument, Algorithm 1 and the
paper reference; they are composed by :func:`_document` from one text of the shared
arguments. With zero lambdas each optimizer equals its base optimizer (Theorem 2).
"""

from __future__ import annotations

import torch

from ._base import GroupOptimizer
from ._validation import check_betas, check_nonnegative, check_unit_interval

__all__ = [
    "GroupSGD",
    "GroupMomentum",
    "GroupAdagrad",
    "GroupAdam",
    "GroupAMSGrad",
    "GroupAdaHessian",
]


_COMMON_ARGS = """\
    lambda1: l1 strength (>= 0): soft-thresholds every coordinate of the dual accumulator
        (``s_t`` below); individual weights become exactly zero.
    lambda21: group-lasso (l21) strength (>= 0), scaled by ``sqrt(d_g)`` per group of
        ``d_g`` coordinates: whole groups (embedding rows = features) become exactly zero.
    lambda2: l2 strength (>= 0) in the denominator ``sigma_t + 2 lambda2``.
    group_by: what one group is, per param group: ``"auto"`` (default) regularises embedding
        tables only -- 2-D parameters marked with ``mark_embedding``, receiving sparse gradients,
        or named ``*emb*`` (pass ``named_parameters()``) -- one group per row; every other
        parameter (MLP weights, biases) takes the base optimizer's plain step with no lambda.
        Opt-in dense groups: ``"row"``, ``"column"`` (``nn.Linear`` weight: one group per input
        unit), ``"tensor"``; ``"none"``: element-wise l1/l2 only.{rowwise}
    exact_group_norm: ``False`` (default) shrinks with Algorithm 1's ``||s_t^g||``; ``True``
        with the exact minimiser of objective (6) (``||A^{{-1/2}} s_t^g||``).
    nonfinite: ``"raise"`` (default): a NaN/Inf gradient is refused with
        ``NonFiniteGradientError`` and nothing is modified; ``"skip"``: rows (groups) whose
        gradient or result is not finite are left as they were. Finite gradients never write a
        non-finite value (rows whose result would overflow keep their value; ``raise`` names
        them).
    compiled: run the ``torch.compile``'d fast path (the same functions as the eager ground
        truth, guarded by a finiteness probe).
"""

_ROWWISE_ARG = """
    rowwise: one second moment per group (FBGEMM's row-wise layout: the row mean of ``g^2``)
        instead of one per coordinate; ``False`` by default."""

_ALGORITHM = r"""
Algorithm 1 (Yue et al.), per step ``t`` and group ``g``:

.. math::
   \begin{aligned}
   &m_t, V_t = \phi_t(g_{1..t}), \psi_t(g_{1..t}) \qquad \sigma_t = \sqrt{V_t}/\alpha_t\\
   &z_t = z_{t-1} + m_t - (\sigma_t - \sigma_{t-1})\, x_t\\
   &s_t = -\operatorname{sign}(z_t)\max(|z_t| - \lambda_1, 0)\\
   &x_{t+1} = \max\!\Big(1 - \frac{\sqrt{d_g}\,\lambda_{21}}{\|s_t^g\|_2}, 0\Big)
      \frac{s_t^g}{\sigma_t + 2\lambda_2}
   \end{aligned}

With ``lambda1 = lambda21 = lambda2 = 0`` it equals its base optimizer (Theorem 2; the epsilon
conventions are in ``docs/optimizers.md``).

Reference:
    Yun Yue, Yongchao Liu, Suo Tong, Minghao Li, Zhen Zhang, Chunyang Wen, Huanjun Bao,
    Lihong Gu, Jinjie Gu, Yixiang Mu. "Adaptive Optimizers with Sparse Group Lasso for Neural
    Networks in CTR Prediction" (Ant Group), Algorithm 1, Theorem 2 and Table 1.
"""


_ADAM_ARGS = """\
    lr: step size (> 0).
    betas: ``(beta1, beta2)``, each in ``[0, 1)``.
    eps: added to ``sqrt(V_t)`` (>= 0; ``0`` takes the ``eps -> 0+`` limit).
"""


def _document(summary: str, args: str, *, rowwise: bool, example: str):
    """Compose a Group optimizer's docstring (Google style): its own summary and arguments, the
    shared arguments, Algorithm 1 and the paper reference -- written once, read by ``help()``."""
    def deco(cls):
        common = _COMMON_ARGS.format(rowwise=_ROWWISE_ARG if rowwise else "")
        cls.__doc__ = (f"{summary.strip()}\n\nArgs:\n    params: an iterable of parameters or "
                       "param-group dicts, as for every ``torch.optim`` optimizer.\n"
                       f"{args}{common}{_ALGORITHM}\nExample::\n\n{example}")
        return cls
    return deco


def _common(lr, lambda1, lambda21, lambda2, group_by, rowwise, exact_group_norm, nonfinite,
            compiled, **extra):
    return dict(lr=lr, lambda1=lambda1, lambda21=lambda21, lambda2=lambda2, group_by=group_by,
                rowwise=rowwise, exact_group_norm=exact_group_norm, nonfinite=nonfinite,
                compiled=compiled, **extra)


@_document(
    r"""Group SGD (Table 1): ``m_t = g_t``, ``V_t = I``, ``alpha_t = lr / sqrt(t)``.

With zero lambdas this is SGD with the step size ``lr / sqrt(t)``.""",
    """\
    lr: base step size ``alpha`` (> 0); the step at ``t`` is ``lr / sqrt(t)``.
""",
    rowwise=False, example="""    opt = GroupSGD(model.parameters(), lr=0.1, lambda21=1e-4)""")
class GroupSGD(GroupOptimizer):
    """See the composed docstring (``help``)."""

    rule = "sgd"

    def __init__(self, params, lr: float = 1e-2, *, lambda1: float = 0.0, lambda21: float = 0.0,
                 lambda2: float = 0.0, group_by: str = "auto", exact_group_norm: bool = False,
                 nonfinite: str = "raise", compiled: bool = False):
        super().__init__(params, _common(lr, lambda1, lambda21, lambda2, group_by, False,
                                         exact_group_norm, nonfinite, compiled))


@_document(
    r"""Group Momentum (Table 1): ``m_t = momentum * m_{t-1} + g_t``, ``V_t = I``,
``alpha_t = lr``.

With zero lambdas this is ``torch.optim.SGD(lr, momentum)`` (no dampening, no Nesterov).""",
    """\
    lr: step size ``alpha`` (> 0).
    momentum: momentum factor in ``[0, 1)``.
""",
    rowwise=False, example="""    opt = GroupMomentum(model.parameters(), lr=0.05, momentum=0.9, lambda21=1e-4)""")
class GroupMomentum(GroupOptimizer):
    """See the composed docstring (``help``)."""

    rule = "momentum"

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, *, lambda1: float = 0.0,
                 lambda21: float = 0.0, lambda2: float = 0.0, group_by: str = "auto",
                 exact_group_norm: bool = False, nonfinite: str = "raise",
                 compiled: bool = False):
        super().__init__(params, _common(lr, lambda1, lambda21, lambda2, group_by, False,
                                         exact_group_norm, nonfinite, compiled,
                                         momentum=momentum))

    def _validate_extra(self, group):
        check_unit_interval("momentum", group["momentum"])


@_document(
    r"""Group Adagrad (Algorithm 3): ``m_t = g_t``, ``sum_t = sum_{t-1} + g_t^2``,
``sigma_t = (sqrt(sum_t) + eps) / clr_t`` with ``clr_t = lr / (1 + (t-1) lr_decay)``.

With zero lambdas this is ``torch.optim.Adagrad`` (same ``eps``, ``lr_decay`` and
``initial_accumulator_value``); ``rowwise=True`` accumulates the row mean of ``g^2``, as
FBGEMM's ``EXACT_ROWWISE_ADAGRAD``. With ``lambda21 = 0`` it is FTRL-proximal (paper, 2.2).""",
    """\
    lr: step size (> 0).
    lr_decay: ``clr_t = lr / (1 + (t-1) lr_decay)`` (>= 0), as ``torch.optim.Adagrad``.
    eps: added to ``sqrt(sum_t)`` (>= 0; ``0`` takes the ``eps -> 0+`` limit).
    initial_accumulator_value: initial ``sum_0`` (>= 0).
""",
    rowwise=True, example="""    opt = GroupAdagrad(model.parameters(), lr=0.05, lambda21=1e-4, rowwise=True)""")
class GroupAdagrad(GroupOptimizer):
    """See the composed docstring (``help``)."""

    rule = "adagrad"

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0, eps: float = 1e-10,
                 initial_accumulator_value: float = 0.0, *, lambda1: float = 0.0,
                 lambda21: float = 0.0, lambda2: float = 0.0, group_by: str = "auto",
                 rowwise: bool = False, exact_group_norm: bool = False,
                 nonfinite: str = "raise", compiled: bool = False):
        super().__init__(params, _common(lr, lambda1, lambda21, lambda2, group_by, rowwise,
                                         exact_group_norm, nonfinite, compiled, lr_decay=lr_decay,
                                         eps=eps,
                                         initial_accumulator_value=initial_accumulator_value))

    def _validate_extra(self, group):
        check_nonnegative("lr_decay", group["lr_decay"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("initial_accumulator_value", group["initial_accumulator_value"])


class _AdamFamily(GroupOptimizer):
    def __init__(self, params, lr, betas, eps, lambda1, lambda21, lambda2, group_by, rowwise,
                 exact_group_norm, nonfinite, compiled, **extra):
        super().__init__(params, _common(lr, lambda1, lambda21, lambda2, group_by, rowwise,
                                         exact_group_norm, nonfinite, compiled,
                                         betas=tuple(betas) if isinstance(betas, list) else betas,
                                         eps=eps, **extra))

    def _validate_extra(self, group):
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])


@_document(
    r"""Group Adam (Algorithm 2): Adam's moments, ``m_t = exp_avg / (1 - beta1^t)``,
``sigma_t = (sqrt(exp_avg_sq / (1 - beta2^t)) + eps) / lr``.

With zero lambdas this is ``torch.optim.Adam`` (same ``eps`` placement, which is Algorithm 2's
``sqrt(V_t) + eps``). ``rowwise=True`` keeps one second moment per row.""",
    _ADAM_ARGS,
    rowwise=True, example="""    opt = GroupAdam(model.parameters(), lr=1e-3, lambda21=1e-4)  # MLP: plain Adam""")
class GroupAdam(_AdamFamily):
    """See the composed docstring (``help``)."""

    rule = "adam"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, *, lambda1: float = 0.0, lambda21: float = 0.0,
                 lambda2: float = 0.0, group_by: str = "auto", rowwise: bool = False,
                 exact_group_norm: bool = False, nonfinite: str = "raise",
                 compiled: bool = False):
        super().__init__(params, lr, betas, eps, lambda1, lambda21, lambda2, group_by, rowwise,
                         exact_group_norm, nonfinite, compiled)


@_document(
    r"""Group AMSGrad: as :class:`GroupAdam` with ``max_exp_avg_sq = max(max_exp_avg_sq,
exp_avg_sq)`` in ``sigma_t`` (the convention of ``torch.optim.Adam(amsgrad=True)``).""",
    _ADAM_ARGS,
    rowwise=True, example="""    opt = GroupAMSGrad(model.parameters(), lr=1e-3, lambda21=1e-4)""")
class GroupAMSGrad(GroupAdam):
    """See the composed docstring (``help``). Adam's arguments; only the rule differs."""

    rule = "amsgrad"


@_document(
    r"""Group AdaHessian: Adam's rule with ``V`` accumulating ``D_t^2``, the squared Hutchinson
estimate of the Hessian diagonal, ``D_t = mean_k z_k * (H_t z_k)`` with Rademacher ``z_k``
(Yao et al., AdaHessian), and ``sigma_t = ((V_t/(1-beta2^t))^{k/2} + eps) / lr`` with
``k = hessian_power``. 4-D (convolution) kernels use AdaHessian's spatial averaging of ``|D|``.

``step(closure)`` needs a closure that computes the loss and calls
``loss.backward(create_graph=True)``; the Hessian-vector products are taken from that graph.""",
    """\
    lr: step size (> 0).
    betas: ``(beta1, beta2)``, each in ``[0, 1)``.
    eps: added to ``V^{k/2}`` (>= 0).
    hessian_power: ``k`` in ``(0, 1]``.
    n_samples: Rademacher probes per step (integer >= 1).
    seed: seed of the probes' generator (reproducible runs).
""",
    rowwise=True, example="""    opt = GroupAdaHessian(model.parameters(), lr=0.15, lambda21=1e-4)
    opt.step(closure)  # closure: loss.backward(create_graph=True)""")
class GroupAdaHessian(_AdamFamily):
    """See the composed docstring (``help``)."""

    rule = "adahessian"

    def __init__(self, params, lr: float = 0.15, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-4, hessian_power: float = 1.0, n_samples: int = 1,
                 seed: int = 0, *, lambda1: float = 0.0, lambda21: float = 0.0,
                 lambda2: float = 0.0, group_by: str = "auto", rowwise: bool = False,
                 exact_group_norm: bool = False, nonfinite: str = "raise",
                 compiled: bool = False):
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"Invalid n_samples: {n_samples!r} (valid range: integer >= 1)")
        super().__init__(params, lr, betas, eps, lambda1, lambda21, lambda2, group_by, rowwise,
                         exact_group_norm, nonfinite, compiled, hessian_power=hessian_power)
        self.n_samples = n_samples
        self._generator = torch.Generator().manual_seed(int(seed))

    def _validate_extra(self, group):
        super()._validate_extra(group)
        v = group["hessian_power"]
        if not isinstance(v, (int, float)) or not (0.0 < v <= 1.0):
            raise ValueError(f"Invalid hessian_power: {v!r} (valid range: 0 < hessian_power <= 1)")

    def _hutchinson(self, params, grads):
        """Hessian diagonal estimate ``mean_k z_k * (H z_k)`` (Rademacher ``z_k``)."""
        diag = [torch.zeros_like(p) for p in params]
        for k in range(self.n_samples):
            zs = [(torch.randint(0, 2, p.shape, generator=self._generator) * 2 - 1)
                  .to(device=p.device, dtype=p.dtype) for p in params]
            hzs = torch.autograd.grad(grads, params, grad_outputs=zs,
                                      retain_graph=k < self.n_samples - 1)
            for d, z, hz in zip(diag, zs, hzs):
                d.add_(z * hz, alpha=1.0 / self.n_samples)
        for i, d in enumerate(diag):
            if d.dim() == 4:  # AdaHessian's spatial averaging for conv kernels
                diag[i] = d.abs().mean(dim=[2, 3], keepdim=True).expand_as(d).clone()
        return diag

    def step(self, closure=None):
        """One step; ``closure`` must compute the loss and call ``backward(create_graph=True)``."""
        if closure is None:
            raise ValueError(
                "GroupAdaHessian.step needs a Hessian-capable closure: a callable that computes "
                "the loss and calls loss.backward(create_graph=True)")
        with torch.enable_grad():
            loss = closure()
        work = self._collect()
        params = [p for _, p, _, _ in work]
        for _, p, name, _ in work:
            if p.grad.is_sparse or not p.grad.requires_grad:
                raise ValueError(
                    "GroupAdaHessian needs a Hessian-capable closure: the gradient of "
                    f"{name or tuple(p.shape)} has no graph (call loss.backward(create_graph=True)"
                    " in the closure; sparse gradients are not supported)")
        with torch.enable_grad():
            diag = self._hutchinson(params, [p.grad for p in params])
        for p in params:
            p.grad = p.grad.detach()
        with torch.no_grad():
            self._update(work, dict(zip(params, diag)))
        return loss

    def state_dict(self):
        sd = super().state_dict()
        sd["hutchinson_rng"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        rng = state_dict.pop("hutchinson_rng", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            self._generator.set_state(rng)
