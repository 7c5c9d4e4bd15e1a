"""Sparse COO gradients: lazy row semantics.

Rows absent from a sparse gradient keep weights, dual and moments; present rows take one step of
Algorithm 1 with the global step's bias corrections. Where this meets the dense update:

- Group Adagrad has no decay, so once every row had a gradient at step 1, a row's absence from a
  later dense step changes nothing either: sparse == dense;
- Group Adam decays its moments every dense step, so sparse == dense only when every row is
  touched at every step.
"""

import copy

import pytest
import torch

from lightning_sgl.optim import GroupAdagrad, GroupAdam, GroupAMSGrad

from .helpers import TinyCTR, batches, loss_fn, train_steps

LAMBDAS = dict(lambda1=1e-3, lambda21=2e-2, lambda2=1e-3)


def _pair(cls, kwargs, data):
    dense = TinyCTR(sparse=False)
    sparse = TinyCTR(sparse=True)
    sparse.load_state_dict(dense.state_dict())
    emb_d, emb_s = dense.net.embedding.weight, sparse.net.embedding.weight
    opts = []
    for m, emb in ((dense, emb_d), (sparse, emb_s)):
        rest = [p for p in m.parameters() if p is not emb]
        opts.append(cls([{"params": [emb], **LAMBDAS}, {"params": rest}], **kwargs))
    train_steps(dense, opts[0], data)
    train_steps(sparse, opts[1], data)
    assert emb_s.grad.is_sparse
    return dense, sparse, opts


def _assert_same(dense, sparse, opts, tol=1e-12):
    for p, q in zip(dense.parameters(), sparse.parameters()):
        assert (p - q).abs().max() <= tol
        sd, ss = opts[0].state[p], opts[1].state[q]
        assert sd.keys() == ss.keys()
        for k in sd:
            assert (sd[k] - ss[k]).abs().max() <= tol, k


@pytest.mark.parametrize("rowwise", [False, True])
def test_sparse_adagrad_equals_dense_once_all_rows_seen(rowwise):
    data = batches(20, batch=6, touch_all_first=True)  # later batches touch few rows
    dense, sparse, opts = _pair(GroupAdagrad, dict(lr=0.1, rowwise=rowwise), data)
    zero_rows = (dense.net.embedding.weight == 0).all(1).sum().item()
    print(f"rowwise={rowwise}: {zero_rows} zero rows")
    assert zero_rows > 0  # the regulariser is active
    _assert_same(dense, sparse, opts)


@pytest.mark.parametrize("cls", [GroupAdam, GroupAMSGrad])
@pytest.mark.parametrize("rowwise", [False, True])
def test_sparse_adam_equals_dense_when_every_row_touched(cls, rowwise):
    vocab = (7, 5, 9)
    full = torch.stack([torch.arange(9) % v for v in vocab], 1)
    gen = torch.Generator().manual_seed(0)
    data = [(full, torch.randint(0, 2, (9,), generator=gen).double()) for _ in range(20)]
    dense, sparse, opts = _pair(cls, dict(lr=0.05, rowwise=rowwise), data)
    _assert_same(dense, sparse, opts)


def test_absent_rows_keep_weights_and_state():
    model = TinyCTR(sparse=True)
    emb = model.net.embedding.weight
    opt = GroupAdam([{"params": [emb], **LAMBDAS}], lr=0.05)
    ids = torch.tensor([[0, 0, 0]])
    train_steps(model, opt, [(ids, torch.ones(1, dtype=torch.float64))])
    before_w = emb.detach().clone()
    before = {k: v.clone() for k, v in opt.state[emb].items()}
    ids2 = torch.tensor([[1, 1, 1]])  # rows 1, 8, 13 of the concatenated table
    train_steps(model, opt, [(ids2, torch.zeros(1, dtype=torch.float64))])
    touched = {1, 7 + 1, 12 + 1}
    for r in range(emb.shape[0]):
        same = torch.equal(emb[r], before_w[r])
        assert same == (r not in touched), r
        for k in ("exp_avg", "exp_avg_sq", "dual"):
            assert torch.equal(opt.state[emb][k][r], before[k][r]) == (r not in touched)
    assert opt.state[emb]["step"].item() == 2  # global step


def test_sparse_gradient_with_column_grouping_is_refused():
    model = TinyCTR(sparse=True)
    emb = model.net.embedding.weight
    opt = GroupAdam([emb], lr=0.1, group_by="column")
    loss_fn(model, *batches(1)[0]).backward()
    with pytest.raises(ValueError, match=r"Invalid group_by: 'column' for a sparse gradient"):
        opt.step()
    assert not opt.state


def test_duplicate_ids_are_summed():
    """nn.Embedding emits one sparse row per occurrence; the update uses their sum."""
    a, b = TinyCTR(sparse=True), None
    b = copy.deepcopy(a)
    ids = torch.tensor([[2, 3, 4], [2, 3, 4], [2, 1, 0]])
    y = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    oa = GroupAdagrad([a.net.embedding.weight], lr=0.1, **LAMBDAS)
    ob = GroupAdagrad([b.net.embedding.weight], lr=0.1, **LAMBDAS)
    train_steps(a, oa, [(ids, y)])
    ob.zero_grad()
    loss_fn(b, ids, y).backward()
    b.net.embedding.weight.grad = b.net.embedding.weight.grad.coalesce()
    ob.step()
    assert torch.equal(a.net.embedding.weight, b.net.embedding.weight)
