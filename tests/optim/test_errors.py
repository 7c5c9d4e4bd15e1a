"""Bad input: clear ValueError naming the argument and its valid range; nothing half-updated."""

import copy

import pytest
import torch

from lightning_sgl.optim import GroupAdaHessian, GroupAdam, GroupSGD, NonFiniteGradientError

from .helpers import TinyCTR, batches, loss_fn
from .infos import OPTIMS, bad_inputs

CASES = [(info, arg, value, msg) for info in OPTIMS for arg, value, msg in bad_inputs(info)]


def _snapshot(model, opt):
    return copy.deepcopy([p.detach().clone() for p in model.parameters()]), copy.deepcopy(
        opt.state_dict())


def _assert_unchanged(model, opt, snap):
    params, sd = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for k in now["state"]:
        for name, v in now["state"][k].items():
            assert torch.equal(v, sd["state"][k][name]), name


def _step(model, opt, ids, y, adahessian=False):
    if adahessian:
        def closure():
            opt.zero_grad()
            loss = loss_fn(model, ids, y)
            loss.backward(create_graph=True)
            return loss
        return opt.step(closure)
    opt.zero_grad()
    loss_fn(model, ids, y).backward()
    return opt.step()


@pytest.mark.parametrize("info,arg,value,msg", CASES,
                         ids=[f"{c[0].name}-{c[1]}-{c[2]!r}" for c in CASES])
def test_bad_hyperparameter_at_construction(info, arg, value, msg):
    model = TinyCTR()
    with pytest.raises(ValueError, match=msg):
        info.cls(model.parameters(), **{**info.kwargs, arg: value})


@pytest.mark.parametrize("info,arg,value,msg", CASES,
                         ids=[f"{c[0].name}-{c[1]}-{c[2]!r}" for c in CASES])
def test_bad_hyperparameter_set_between_steps_leaves_everything_unchanged(info, arg, value, msg):
    model = TinyCTR()
    opt = info.cls(model.parameters(), **info.kwargs)
    data = batches(2)
    ah = info.name == "adahessian"
    _step(model, opt, *data[0], adahessian=ah)
    opt.param_groups[0][arg] = value
    if not ah:
        opt.zero_grad()
        loss_fn(model, *data[1]).backward()
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=msg):
        if ah:
            _step(model, opt, *data[1], adahessian=True)
        else:
            opt.step()
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("group_by", ["row", "column"])
def test_row_or_column_grouping_on_a_vector_is_refused(group_by):
    bias = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=rf"Invalid group_by: '{group_by}' needs a 2-D parameter, "
                                         r"got shape \(3,\)"):
        GroupAdam([bias], group_by=group_by)


def test_bad_param_group_added_later_is_not_kept():
    model = TinyCTR()
    opt = GroupAdam(model.parameters())
    with pytest.raises(ValueError, match="Invalid lambda21"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lambda21": -1.0})
    assert len(opt.param_groups) == 1


def test_rowwise_on_sgd_is_refused():
    model = TinyCTR()
    opt = GroupSGD(model.parameters())
    opt.param_groups[0]["rowwise"] = True
    loss_fn(model, *batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"Invalid rowwise: True \(GroupSGD has no second moment"):
        opt.step()
    assert not opt.state


def test_adahessian_without_closure():
    model = TinyCTR()
    opt = GroupAdaHessian(model.parameters())
    loss_fn(model, *batches(1)[0]).backward()
    with pytest.raises(ValueError, match="needs a Hessian-capable closure"):
        opt.step()


def test_adahessian_closure_without_create_graph():
    model = TinyCTR()
    opt = GroupAdaHessian(model.parameters())
    snap = _snapshot(model, opt)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, *batches(1)[0])
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"create_graph=True"):
        opt.step(closure)
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("sparse", [False, True])
def test_nonfinite_gradient_raises_and_changes_nothing(bad, sparse):
    model = TinyCTR(sparse=sparse)
    opt = GroupAdam(model.parameters(), lr=0.1, lambda21=0.01)
    data = batches(2)
    _step(model, opt, *data[0])
    opt.zero_grad()
    loss_fn(model, *data[1]).backward()
    emb = model.net.embedding.weight
    if sparse:
        g = emb.grad.coalesce()
        v = g.values().clone()
        v[0, 0] = bad
        emb.grad = torch.sparse_coo_tensor(g.indices(), v, g.shape)
    else:
        emb.grad[3, 1] = bad
    snap = _snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match=r"non-finite \(NaN/Inf\) gradient.*"
                                                     r"nonfinite='skip'"):
        opt.step()
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("sparse", [False, True])
def test_nonfinite_skip_leaves_bad_rows_and_updates_the_rest(sparse):
    model = TinyCTR(sparse=sparse)
    emb = model.net.embedding.weight
    opt = GroupAdam(model.parameters(), lr=0.1, lambda21=0.01, nonfinite="skip")
    ids = torch.tensor([[0, 0, 0], [1, 1, 1]])
    y = torch.tensor([1.0, 0.0], dtype=torch.float64)
    before = emb.detach().clone()
    opt.zero_grad()
    loss_fn(model, ids, y).backward()
    if sparse:
        g = emb.grad.coalesce()
        v = g.values().clone()
        v[g.indices()[0] == 0] = float("nan")
        emb.grad = torch.sparse_coo_tensor(g.indices(), v, g.shape)
    else:
        emb.grad[0, 2] = float("nan")
    opt.step()
    assert torch.equal(emb[0], before[0])
    assert torch.equal(opt.state[emb]["exp_avg"][0], torch.zeros_like(emb[0]))
    assert not torch.equal(emb[1], before[1])
    assert torch.isfinite(emb).all()
    for p in model.parameters():
        for v in opt.state[p].values():
            assert torch.isfinite(v).all()
