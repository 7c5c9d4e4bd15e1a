"""state_dict round trip, hyperparameters changed between steps, compiled fast path == eager."""

import copy

import pytest
import torch

from lightning_sgl.optim import GroupAdagrad, GroupAdam, _functional

from .helpers import TinyCTR, batches, loss_fn, train_steps, twin
from .infos import FIRST_ORDER

LAMBDAS = dict(lambda1=1e-3, lambda21=3e-2, lambda2=1e-3)


@pytest.mark.parametrize("info", FIRST_ORDER, ids=lambda i: i.name)
def test_state_dict_round_trip_resumes_exactly(info):
    data = batches(12)
    full = TinyCTR()
    opt_full = info.cls(full.parameters(), **info.kwargs, **LAMBDAS)
    train_steps(full, opt_full, data)

    part = TinyCTR()
    opt_part = info.cls(part.parameters(), **info.kwargs, **LAMBDAS)
    train_steps(part, opt_part, data[:5])
    saved = copy.deepcopy((part.state_dict(), opt_part.state_dict()))
    resumed = TinyCTR(seed=99)
    resumed.load_state_dict(saved[0])
    opt_res = info.cls(resumed.parameters(), **info.kwargs, **LAMBDAS)
    opt_res.load_state_dict(saved[1])
    train_steps(resumed, opt_res, data[5:])
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_lambda21_changed_between_steps_takes_effect():
    model = TinyCTR()
    emb = model.net.embedding.weight
    opt = GroupAdam([{"params": [emb], "lambda21": 0.0}], lr=0.05)
    data = batches(6)
    train_steps(model, opt, data[:3])
    assert not (emb == 0).all(1).any()
    opt.param_groups[0]["lambda21"] = 10.0
    train_steps(model, opt, data[3:4])
    assert (emb == 0).all()  # every row touched or not: dense step applies the prox to all


@pytest.fixture
def fresh_dynamo(monkeypatch):
    # compile even the tiny test tensors (the library runs tensors below the threshold eagerly)
    monkeypatch.setattr(_functional, "COMPILE_MIN_NUMEL", 0)
    _functional._WARNED.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cls,kw", [(GroupAdam, dict(lr=0.05)), (GroupAdam, dict(lr=0.05,
                                    rowwise=True, exact_group_norm=True)),
                                    (GroupAdagrad, dict(lr=0.1))],
                         ids=["adam", "adam-rowwise-exact", "adagrad"])
@pytest.mark.parametrize("sparse", [False, True])
def test_compiled_path_equals_eager(cls, kw, sparse, fresh_dynamo):
    """The torch.compile'd path runs the same math; params and every state agree."""
    data = batches(8)
    eager = TinyCTR(sparse=sparse)
    fast = twin(eager)
    oe = cls(eager.parameters(), **kw, **LAMBDAS)
    of = cls(fast.parameters(), **kw, **LAMBDAS, compiled=True)
    for t, (ids, y) in enumerate(data):
        if t == 4:  # hyperparameters change without a recompile or a mismatch
            for o in (oe, of):
                o.param_groups[0]["lambda21"] = 0.05
                o.param_groups[0]["lr"] = 0.02
        for m, o in ((eager, oe), (fast, of)):
            o.zero_grad()
            loss_fn(m, ids, y).backward()
            o.step()
    assert _functional._COMPILED, "the compiled path did not run"
    assert not _functional._WARNED, "a compiled variant fell back to eager"
    for p, q in zip(eager.parameters(), fast.parameters()):
        assert (p - q).abs().max() <= 1e-12
        for k in oe.state[p]:
            assert (oe.state[p][k] - of.state[q][k]).abs().max() <= 1e-12, k


@pytest.mark.parametrize("info", FIRST_ORDER, ids=lambda i: i.name)
def test_reapply_prox_is_identity_without_change_and_applies_new_lambda21(info):
    model = TinyCTR()
    emb = model.net.embedding.weight
    rest = [p for p in model.parameters() if p is not emb]
    opt = info.cls([{"params": [emb], "lambda21": 0.0}, {"params": rest}], **info.kwargs)
    train_steps(model, opt, batches(5))
    before = [p.detach().clone() for p in model.parameters()]
    opt.reapply_prox()
    for p, q in zip(model.parameters(), before):
        assert (p - q).abs().max() <= 1e-12
    opt.param_groups[0]["lambda21"] = 1e6
    opt.reapply_prox()
    assert (emb == 0).all()
