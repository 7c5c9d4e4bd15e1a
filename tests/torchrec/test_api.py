"""The user-facing API: apply_group_optimizer + group_sharders, errors, hyperparameters through
the fused optimizer's param_groups, feature counts."""


import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel

from lightning_sgl.optim import GroupAdaHessian, GroupAdam
from torchrec_ext import apply_group_optimizer, group_sharders


def _ebc():
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=50, feature_names=["u"]),
        EmbeddingBagConfig(name="item", embedding_dim=8, num_embeddings=40, feature_names=["i"]),
    ], device=torch.device("meta"))


class Model(torch.nn.Module):
    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc
        self.head = torch.nn.Linear(16, 1)

    def forward(self, kjt):
        return self.head(self.ebc(kjt).values()).squeeze(-1)


def _kjt(gen, batch=8):
    lengths = torch.ones(2 * batch, dtype=torch.long)
    values = torch.cat([torch.randint(0, 50, (batch,), generator=gen),
                        torch.randint(0, 40, (batch,), generator=gen)])
    return KeyedJaggedTensor.from_lengths_sync(keys=["u", "i"], values=values, lengths=lengths)


def test_two_lines_train_the_tables_fused(single_rank_group):
    ebc = _ebc()
    apply_group_optimizer(ebc, GroupAdam, lr=0.05, lambda21=0.05,
                          per_table={"item": {"lambda21": 0.0}})
    model = DistributedModelParallel(Model(ebc), device=torch.device("cpu"),
                                     sharders=group_sharders())
    dense = torch.optim.Adam([p for n, p in model.named_parameters() if "head" in n], lr=0.01)
    gen = torch.Generator().manual_seed(0)
    before = {k: v.local_shards()[0].tensor.clone() for k, v in model.state_dict().items()
              if "embedding_bags" in k}
    for _ in range(30):
        kjt = _kjt(gen)
        y = torch.randint(0, 2, (8,), generator=gen).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), y)
        dense.zero_grad()
        model.fused_optimizer.zero_grad()
        loss.backward()
        dense.step()
        model.fused_optimizer.step()
    sd = model.state_dict()
    user = sd["ebc.embedding_bags.user.weight"].local_shards()[0].tensor
    item = sd["ebc.embedding_bags.item.weight"].local_shards()[0].tensor
    assert not torch.equal(user, before["ebc.embedding_bags.user.weight"])
    assert (user == 0).all(1).sum() > 0  # lambda21 > 0 deletes rows
    assert (item == 0).all(1).sum() == 0  # per-table override: lambda21 = 0
    for n, p in model.named_parameters():
        if "embedding_bags" in n:
            assert p.grad is None
    # hyperparameters live in the fused optimizer's param groups (one per grouped config)
    groups = model.fused_optimizer.param_groups
    assert sorted(g["lambda21"] for g in groups) == [0.0, 0.05]
    for g in groups:
        g["lr"] = 0.0  # an LR scheduler acts through these; lr must stay > 0
    with pytest.raises(ValueError, match=r"Invalid learning rate \(lr\): 0.0"):
        model.fused_optimizer.step()
    for g in groups:
        g["lr"] = 0.05
        g["lambda21"] = 1e3
    kernels = model.module.ebc.group_kernels()
    for k in kernels:
        k.reapply_prox()
    seen_nonzero = {}
    for k in kernels:
        seen_nonzero.update(k.feature_counts())
    assert all(nz == 0 and seen > 0 for seen, nz in seen_nonzero.values()), seen_nonzero


def test_unsupported_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"GroupAdaHessian cannot run fused.*keep that table dense"):
        apply_group_optimizer(_ebc(), GroupAdaHessian, lr=0.1)
    with pytest.raises(ValueError, match=r"cannot run fused"):
        apply_group_optimizer(_ebc(), torch.optim.Adam, lr=0.1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"Invalid lambda21: -1.0"):
        apply_group_optimizer(_ebc(), GroupAdam, lambda21=-1.0)
    with pytest.raises(ValueError, match=r"Invalid tables: \['nope'\]"):
        apply_group_optimizer(_ebc(), GroupAdam, per_table={"nope": {}})
    with pytest.raises(ValueError, match=r"Invalid arguments \['weight_decay'\]"):
        apply_group_optimizer(_ebc(), GroupAdam, weight_decay=0.1)


def test_variable_batch_per_feature_is_refused(single_rank_group):
    ebc = _ebc()
    apply_group_optimizer(ebc, GroupAdam, lr=0.05)
    model = DistributedModelParallel(Model(ebc), device=torch.device("cpu"),
                                     sharders=group_sharders())
    kernel = next(m for lookup in model.module.ebc._lookups for m in lookup.modules()
                  if type(m).__name__ == "GroupFusedEmbeddingBag")
    vbe = KeyedJaggedTensor(keys=["u", "i"], values=torch.tensor([1, 2, 3]),
                            lengths=torch.tensor([1, 1, 1]), stride_per_key_per_rank=[[1], [2]])
    with pytest.raises(ValueError, match=r"variable batch size per feature \(VBE\) is not "
                                         r"supported"):
        kernel(vbe)
