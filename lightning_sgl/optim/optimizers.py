r"""The Group optimizers: Algorithm 1 of Yue et al. on top of each base optimizer of Table 1.

All share the keyword arguments

- ``lr`` (alpha), ``lambda1`` (l1), ``lambda21`` (group lasso), ``lambda2`` (l2);
- ``group_by`` in ``{"auto", "row", "column", "tensor", "none"}`` (per param group);
- ``rowwise``: one second moment per group (FBGEMM's row-wise layout) instead of per element;
- ``exact_group_norm``: ``False`` = Algorithm 1's ``||s_t||``; ``True`` = the exact minimiser of
  objective (6) (``||A^{-1/2} s_t||``);
- ``nonfinite``: ``"raise"`` (default: refuse the step, nothing modified) or ``"skip"`` (rows whose
  gradient holds NaN/Inf are left untouched, like rows absent from a sparse gradient);
- ``compiled``: run the ``torch.compile``'d fast path (same code as the eager ground truth).

.. math::
   \begin{aligned}
   &m_t, V_t = \phi_t(g_{1..t}), \psi_t(g_{1..t}) \qquad \sigma_t = \sqrt{V_t}/\alpha_t\\
   &z_t = z_{t-1} + m_t - (\sigma_t - \sigma_{t-1})\, x_t\\
   &s_t = -\operatorname{sign}(z_t)\max(|z_t| - \lambda_1, 0)\\
   &x_{t+1} = \max\!\Big(1 - \frac{\sqrt{d_g}\,\lambda_{21}}{\|s_t^g\|_2}, 0\Big)
      \frac{s_t^g}{\sigma_t + 2\lambda_2}\quad\text{for every group } g
   \end{aligned}

With ``lambda1 = lambda21 = lambda2 = 0`` each optimizer equals its base optimizer (Theorem 2):
see ``docs/optimizers.md`` for the epsilon conventions.
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


def _common(lr, lambda1, lambda21, lambda2, group_by, rowwise, exact_group_norm, nonfinite,
            compiled, **extra):
    return dict(lr=lr, lambda1=lambda1, lambda21=lambda21, lambda2=lambda2, group_by=group_by,
                rowwise=rowwise, exact_group_norm=exact_group_norm, nonfinite=nonfinite,
                compiled=compiled, **extra)


class GroupSGD(GroupOptimizer):
    r"""Group SGD: ``m_t = g_t``, ``V_t = I``, ``alpha_t = lr / sqrt(t)`` (Table 1).

    With zero lambdas this is SGD with the step size ``lr / sqrt(t)``.
    """

    rule = "sgd"

    def __init__(self, params, lr: float = 1e-2, *, lambda1: float = 0.0, lambda21: float = 0.0,
                 lambda2: float = 0.0, group_by: str = "auto", exact_group_norm: bool = False,
                 nonfinite: str = "raise", compiled: bool = False):
        super().__init__(params, _common(lr, lambda1, lambda21, lambda2, group_by, False,
                                         exact_group_norm, nonfinite, compiled))


class GroupMomentum(GroupOptimizer):
    r"""Group Momentum: ``m_t = momentum * m_{t-1} + g_t``, ``V_t = I``, ``alpha_t = lr``.

    With zero lambdas this is ``torch.optim.SGD(lr, momentum)`` (no dampening, no Nesterov).
    """

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


class GroupAdagrad(GroupOptimizer):
    r"""Group Adagrad (Algorithm 3): ``m_t = g_t``, ``sum_t = sum_{t-1} + g_t^2``,
    ``sigma_t = (sqrt(sum_t) + eps) / clr_t`` with ``clr_t = lr / (1 + (t-1) lr_decay)``.

    With zero lambdas this is ``torch.optim.Adagrad`` (same ``eps``, ``lr_decay`` and
    ``initial_accumulator_value``); ``rowwise=True`` accumulates the row mean of ``g^2``, as
    FBGEMM's ``EXACT_ROWWISE_ADAGRAD``. With ``lambda21 = 0`` it is FTRL-proximal (paper, 2.2).
    """

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


class GroupAdam(_AdamFamily):
    r"""Group Adam (Algorithm 2): Adam's moments, ``m_t = exp_avg / (1 - beta1^t)``,
    ``sigma_t = (sqrt(exp_avg_sq / (1 - beta2^t)) + eps) / lr``.

    With zero lambdas this is ``torch.optim.Adam`` (same ``eps`` placement, which is Algorithm 2's
    ``sqrt(V_t) + eps``). ``rowwise=True`` keeps one second moment per row.
    """

    rule = "adam"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, *, lambda1: float = 0.0, lambda21: float = 0.0,
                 lambda2: float = 0.0, group_by: str = "auto", rowwise: bool = False,
                 exact_group_norm: bool = False, nonfinite: str = "raise",
                 compiled: bool = False):
        super().__init__(params, lr, betas, eps, lambda1, lambda21, lambda2, group_by, rowwise,
                         exact_group_norm, nonfinite, compiled)


class GroupAMSGrad(_AdamFamily):
    r"""Group AMSGrad: as :class:`GroupAdam` with ``max_exp_avg_sq = max(max_exp_avg_sq,
    exp_avg_sq)`` in ``sigma_t`` (the convention of ``torch.optim.Adam(amsgrad=True)``)."""

    rule = "amsgrad"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, *, lambda1: float = 0.0, lambda21: float = 0.0,
                 lambda2: float = 0.0, group_by: str = "auto", rowwise: bool = False,
                 exact_group_norm: bool = False, nonfinite: str = "raise",
                 compiled: bool = False):
        super().__init__(params, lr, betas, eps, lambda1, lambda21, lambda2, group_by, rowwise,
                         exact_group_norm, nonfinite, compiled)


class GroupAdaHessian(_AdamFamily):
    r"""Group AdaHessian: Adam's rule with ``V`` accumulating ``D_t^2``, the squared Hutchinson
    estimate of the Hessian diagonal, ``D_t = mean_k z_k * (H_t z_k)`` with Rademacher ``z_k``
    (Yao et al., AdaHessian), and ``sigma_t = ((V_t/(1-beta2^t))^{k/2} + eps) / lr`` with
    ``k = hessian_power``. 4-D (convolution) kernels use AdaHessian's spatial averaging of ``|D|``.

    ``step(closure)`` needs a closure that computes the loss and calls
    ``loss.backward(create_graph=True)``; the Hessian-vector products are taken from that graph.
    """

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
