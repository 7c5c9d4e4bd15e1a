"""Theorem 2: with all lambdas zero each Group optimizer equals its base optimizer.

50 steps, float64, a small MLP + embedding model; parameters and shared state compared to 1e-10.
"""

import copy
import math

import pytest
import torch

from lightning_sgl.optim import _functional

from .helpers import TinyCTR, batches, loss_fn
from .infos import BY_NAME, FIRST_ORDER

STEPS = 50


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("info", FIRST_ORDER, ids=lambda i: i.name)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_equals_torch_optim(info, compiled, monkeypatch):
    if compiled:  # the compiled path for every size (it is skipped below COMPILE_MIN_NUMEL)
        monkeypatch.setattr(_functional, "COMPILE_MIN_NUMEL", 0)
    ours = TinyCTR()
    ref = copy.deepcopy(ours)
    opt = info.cls(ours.parameters(), **info.kwargs, compiled=compiled)
    ref_opt = info.reference(ref.parameters())
    sched = info.scheduler(ref_opt) if info.scheduler else None
    for ids, y in batches(STEPS):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(model, ids, y).backward()
            o.step()
        if sched:
            sched.step()
    diff = _max_diff(ours.parameters(), ref.parameters())
    print(f"{info.name}: max |param diff| after {STEPS} steps = {diff:.3e}")
    assert diff <= 1e-10
    for p, q in zip(ours.parameters(), ref.parameters()):
        for name in info.shared_state:
            assert (opt.state[p][name] - ref_opt.state[q][name]).abs().max() <= 1e-10, name
        assert opt.state[p]["step"].item() == STEPS


def _plain_adahessian(params, lr, betas, eps, seed, hessian_power=1.0):
    """An independent AdaHessian (Yao et al.), written directly from the paper."""
    gen = torch.Generator().manual_seed(seed)
    state = [dict(m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in params]
    t = 0

    def step(loss):
        nonlocal t
        t += 1
        grads = torch.autograd.grad(loss, params, create_graph=True)
        zs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
        hzs = torch.autograd.grad(grads, params, grad_outputs=zs)
        with torch.no_grad():
            for p, g, z, hz, s in zip(params, grads, zs, hzs, state):
                d = z * hz
                s["m"].mul_(betas[0]).add_(g.detach(), alpha=1 - betas[0])
                s["v"].mul_(betas[1]).addcmul_(d, d, value=1 - betas[1])
                bc1 = 1 - betas[0] ** t
                bc2 = 1 - betas[1] ** t
                denom = (s["v"] / bc2) ** (hessian_power / 2) + eps
                p.sub_(lr / bc1 * s["m"] / denom)

    return step, state


def test_adahessian_equals_plain_adahessian():
    info = BY_NAME["adahessian"]
    ours = TinyCTR()
    ref = copy.deepcopy(ours)
    opt = info.cls(ours.parameters(), **info.kwargs)
    kw = info.kwargs
    ref_step, ref_state = _plain_adahessian(list(ref.parameters()), kw["lr"], kw["betas"],
                                            kw["eps"], kw["seed"])
    for ids, y in batches(STEPS):
        def closure(ids=ids, y=y):
            opt.zero_grad()
            loss = loss_fn(ours, ids, y)
            loss.backward(create_graph=True)
            return loss
        opt.step(closure)
        ref_step(loss_fn(ref, ids, y))
    diff = _max_diff(ours.parameters(), ref.parameters())
    print(f"adahessian: max |param diff| after {STEPS} steps = {diff:.3e}")
    assert diff <= 1e-10
    for p, s in zip(ours.parameters(), ref_state):
        assert (opt.state[p]["exp_avg"] - s["m"]).abs().max() <= 1e-10
        assert (opt.state[p]["exp_hessian_diag_sq"] - s["v"]).abs().max() <= 1e-10


@pytest.mark.parametrize("info", FIRST_ORDER, ids=lambda i: i.name)
def test_dual_stays_zero_without_regularisation(info):
    """The stored dual u_t = z_t + sigma_t x_{t+1} is 0 (rounding) when no lambda is active."""
    model = TinyCTR()
    opt = info.cls(model.parameters(), **info.kwargs)
    for ids, y in batches(10):
        opt.zero_grad()
        loss_fn(model, ids, y).backward()
        opt.step()
    for p in model.parameters():
        assert opt.state[p]["dual"].abs().max() <= 1e-9 * max(1.0, math.sqrt(p.numel()))


def test_lr_scheduler_acts_like_torch():
    """An LR scheduler on the Group optimizer equals the same scheduler on torch.optim.Adam."""
    ours = TinyCTR()
    ref = copy.deepcopy(ours)
    opt = BY_NAME["adam"].cls(ours.parameters(), lr=0.02)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.02)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5) for o in (opt, ref_opt)]
    for ids, y in batches(20):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(model, ids, y).backward()
            o.step()
        for s in scheds:
            s.step()
    assert _max_diff(ours.parameters(), ref.parameters()) <= 1e-10
