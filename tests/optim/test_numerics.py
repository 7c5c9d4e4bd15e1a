"""Numerics that hold: any finite gradient (up to 1e30) and finite hyperparameters never put a
non-finite value into a weight or a state; with lambdas 0 the step equals ``torch.optim``
wherever ``torch.optim`` itself stays finite. Sparse duplicates whose sum overflows are refused,
``eps=0`` leaves never-updated coordinates alone, and the default grouping never regularises an
MLP."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sgl.optim import GroupAdagrad, GroupAdam, NonFiniteGradientError, mark_embedding

from .helpers import TinyCTR, batches, train_steps
from .infos import FIRST_ORDER

SHAPE = (5, 3)


@st.composite
def gradients(draw, steps=3):
    """Gradients whose entries span 1e-30 .. 1e30 in magnitude, with random signs and zeros."""
    out = []
    for _ in range(steps):
        exps = draw(st.lists(st.floats(-30, 30), min_size=SHAPE[0] * SHAPE[1],
                             max_size=SHAPE[0] * SHAPE[1]))
        signs = draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=len(exps),
                              max_size=len(exps)))
        out.append([s * 10.0 ** e for s, e in zip(signs, exps)])
    return out


def _states_finite(opt, p):
    return all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v))


def _run(cls, kw, grads, dtype, lambdas):
    table = torch.nn.Parameter(torch.linspace(-1, 1, 15, dtype=dtype).reshape(SHAPE))
    mark_embedding(table)
    opt = cls([table], **kw, **lambdas)
    history = []
    for g in grads:
        table.grad = torch.tensor(g, dtype=dtype).reshape(SHAPE)
        try:
            opt.step()
        except NonFiniteGradientError:
            pass  # refused (or rows kept): the assertions below still hold
        assert torch.isfinite(table).all(), "a non-finite weight was written"
        assert _states_finite(opt, table), "a non-finite state was written"
        history.append(table.detach().clone())
    return history


@pytest.mark.parametrize("info", FIRST_ORDER, ids=lambda i: i.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@settings(max_examples=25, deadline=None)
@given(grads=gradients(), lr_exp=st.floats(-4, 0),
       lam=st.sampled_from([0.0, 1e-3, 0.5]))
def test_finite_gradients_never_write_nonfinite_values(info, dtype, grads, lr_exp, lam):
    kw = {**info.kwargs, "lr": 10.0 ** lr_exp}
    lambdas = dict(lambda1=lam, lambda21=lam, lambda2=lam)
    for nonfinite in ("raise", "skip"):
        _run(info.cls, {**kw, "nonfinite": nonfinite}, grads, dtype, lambdas)


@pytest.mark.parametrize("info", FIRST_ORDER, ids=lambda i: i.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@settings(max_examples=25, deadline=None)
@given(grads=gradients())
def test_lambda_zero_equals_torch_optim_wherever_torch_is_finite(info, dtype, grads):
    ours = _run(info.cls, info.kwargs, grads, dtype, {})
    ref = torch.nn.Parameter(torch.linspace(-1, 1, 15, dtype=dtype).reshape(SHAPE))
    ref_opt = info.reference([ref])
    sched = info.scheduler(ref_opt) if info.scheduler else None
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for g, x in zip(grads, ours):
        ref.grad = torch.tensor(g, dtype=dtype).reshape(SHAPE)
        ref_opt.step()
        if sched:
            sched.step()
        finite = torch.isfinite(ref).all() and _states_finite(ref_opt, ref)
        if not finite:
            break  # torch.optim itself overflowed: nothing left to compare
        err = ((x - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
        assert err <= tol, err


def test_sparse_duplicates_whose_sum_overflows_are_refused():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = GroupAdam(emb.parameters(), lr=0.1, lambda21=1e-3)
    before = emb.weight.detach().clone()
    big = 3e38  # finite float32; twice it is not
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]),
                                              torch.tensor([[big, 0.0], [big, 0.0]]), (4, 2))
    with pytest.raises(NonFiniteGradientError, match=r"non-finite \(NaN/Inf\) gradient"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state


def test_overflowing_result_keeps_the_row_and_raises_naming_it():
    """Finite gradients, a state at the float range: the row's new second moment would be inf.
    The row (and its state) stay as they were, the other rows are updated, and the step says so."""
    table = mark_embedding(torch.nn.Parameter(torch.ones(3, 2)))
    opt = GroupAdagrad([table], lr=0.1, lambda21=1e-3)
    table.grad = torch.ones(3, 2)
    opt.step()
    opt.state[table]["sum"][0] = 3e38  # row 0 is at the edge of float32
    before, acc = table.detach().clone(), opt.state[table]["sum"].clone()
    table.grad = torch.full((3, 2), 1e19)  # (1e19)^2 = 1e38: finite, but 3e38 + 1e38 is not
    with pytest.raises(NonFiniteGradientError, match=r"non-finite values \(overflow.*1 group\(s\) "
                                                     r"of param \(3, 2\)"):
        opt.step()
    assert torch.equal(table[0], before[0]) and torch.equal(opt.state[table]["sum"][0], acc[0])
    assert not torch.equal(table[1], before[1])
    assert torch.isfinite(table).all() and torch.isfinite(opt.state[table]["sum"]).all()


@pytest.mark.parametrize("cls", [GroupAdam, GroupAdagrad])
def test_eps_zero_keeps_coordinates_without_a_gradient(cls):
    """eps = 0: a coordinate that never had a gradient has sigma = 0; like torch.optim (lambdas
    0) it keeps its value instead of becoming 0 (the limit of the step as eps -> 0+)."""
    p = mark_embedding(torch.nn.Parameter(torch.tensor([[0.5, -0.25], [1.0, 2.0]])))
    opt = cls([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([[0.3, 0.0], [0.0, 0.0]])
    opt.step()
    assert torch.equal(p[1], torch.tensor([1.0, 2.0]))  # never had a gradient
    assert p[0, 1].item() == -0.25
    assert torch.isfinite(p).all()


def _dead_mlp_units(model):
    """Names of MLP weights with an input unit (column) or an output unit (row) exactly 0."""
    return [name for name, p in model.named_parameters() if "embedding" not in name
            and p.dim() == 2 and ((p == 0).all(dim=0).any() or (p == 0).all(dim=1).any())]


def test_default_grouping_leaves_the_mlp_alone():
    """``GroupAdam(model.parameters(), lambda21=...)`` (the docs' form) regularises the marked
    embedding table only: no MLP unit is deleted, while table rows are. Negative control: the
    same lambda on explicit row groups deletes MLP units."""
    model = TinyCTR()
    opt = GroupAdam(model.parameters(), lr=1e-2, lambda21=0.05)
    train_steps(model, opt, batches(30))
    emb = model.net.embedding.weight
    assert (emb == 0).all(1).any(), "lambda21 deleted no table row: the test proves little"
    assert not _dead_mlp_units(model)
    control = TinyCTR()
    matrices = [p for p in control.parameters() if p.dim() == 2]
    vectors = [p for p in control.parameters() if p.dim() != 2]
    train_steps(control, GroupAdam([{"params": matrices, "group_by": "row"}, {"params": vectors}],
                                   lr=1e-2, lambda21=0.05), batches(30))
    assert _dead_mlp_units(control), "the negative control deleted no MLP unit"


def test_lambdas_that_reach_no_parameter_are_warned_once():
    lin = torch.nn.Linear(3, 2)
    opt = GroupAdam(lin.parameters(), lambda21=1e-3)
    lin(torch.ones(1, 3)).sum().backward()
    with pytest.warns(UserWarning, match=r"lambda21 set in param group 0, but none of its "
                                         r"parameters is an embedding table"):
        opt.step()
    assert not (lin.weight == 0).any()
    assert math.isfinite(float(lin.weight.sum()))
