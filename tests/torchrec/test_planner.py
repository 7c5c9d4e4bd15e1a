"""The planner's storage estimate of Group-optimized tables == the bytes the kernels allocate.

For every fused Group optimizer, element-wise and row-wise: TorchRec's planner (through
``group_planner`` / ``GroupStorageEstimator``) estimates each table shard's storage; the tables are
sharded by DMP under the plan it chose, and the estimate is compared with what the Group kernels
really allocate (weights + dual + every state + seen): within 5%. Negative control: TorchRec's own
``EmbeddingStorageEstimator`` misses the state of the element-wise optimizers by far more.
"""


import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator

from lightning_sgl.optim import GroupAdagrad, GroupAdam, GroupAMSGrad, GroupMomentum, GroupSGD
from torchrec_ext import GroupTBE, TableSpec, apply_group_optimizer, group_sharders
from torchrec_ext.kernel import native
from torchrec_ext.planner import GroupStorageEstimator, group_planner

TABLES = [("user_id", 60_000, 16), ("item_id", 25_000, 32)]
CASES = [(GroupSGD, False), (GroupMomentum, False), (GroupAdagrad, False), (GroupAdagrad, True),
         (GroupAdam, False), (GroupAdam, True), (GroupAMSGrad, False), (GroupAMSGrad, True)]
IDS = [f"{c.__name__}{'-rowwise' if rw else ''}" for c, rw in CASES]


def _ebc(cls, rowwise):
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=[f"f_{n}"])
        for n, r, d in TABLES], device=torch.device("meta"))
    kw = {"rowwise": True} if rowwise else {}
    apply_group_optimizer(ebc, cls, lr=0.01, lambda21=1e-4, **kw)
    return ebc


class _Model(torch.nn.Module):
    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc


def _estimates(ebc, topology, estimator, constraints=None):
    """``{(table, sharding type): [shard storage bytes]}`` for every option TorchRec enumerates."""
    enum = EmbeddingEnumerator(topology=topology, batch_size=512, constraints=constraints,
                               estimator=[estimator])
    out = {}
    for so in enum.enumerate(_Model(ebc), group_sharders()):
        dev = "hbm" if topology.compute_device == "cuda" else "ddr"
        out[(so.name, so.sharding_type)] = [getattr(s.storage, dev) for s in so.shards]
    return out


@pytest.mark.parametrize("cls,rowwise", CASES, ids=IDS)
def test_estimate_equals_allocated_bytes(single_rank_group, cls, rowwise):
    topo = Topology(world_size=1, local_world_size=1, compute_device="cpu")
    ebc = _ebc(cls, rowwise)
    plan = group_planner(topo, batch_size=512).collective_plan(_Model(ebc), group_sharders(),
                                                               dist.group.WORLD)
    chosen = {n: ps.sharding_type for n, ps in plan.plan["ebc"].items()}
    est = _estimates(ebc, topo, GroupStorageEstimator(topology=topo))
    torchrec_est = _estimates(ebc, topo, EmbeddingStorageEstimator(topology=topo))
    estimated = sum(sum(est[(n, t)]) for n, t in chosen.items())
    torchrec_estimated = sum(sum(torchrec_est[(n, t)]) for n, t in chosen.items())
    dmp = DistributedModelParallel(_Model(ebc), device=torch.device("cpu"), plan=plan,
                                   sharders=group_sharders())
    kernels = dmp.module.ebc.group_kernels()
    allocated = sum(k.allocated_bytes() for k in kernels)
    assert abs(estimated - allocated) <= 0.05 * allocated, (estimated, allocated)
    # the kernel's own formula is exact for the tables it holds (io terms aside)
    spec = sum(sum(GroupTBE.table_bytes(cls.rule, r, d, rowwise=rowwise).values())
               for _, r, d in TABLES)
    # + per kernel: the step counter and, natively, the index's block-pool header (3 int32)
    assert allocated == spec + (8 + (12 if native.available() else 0)) * len(kernels)
    if not rowwise and cls.rule in ("adagrad", "adam", "amsgrad"):  # negative control
        assert abs(torchrec_estimated - allocated) > 0.2 * allocated, (torchrec_estimated,
                                                                       allocated)


@pytest.mark.parametrize("cls,rowwise", [(GroupAdam, False), (GroupAdagrad, True)],
                         ids=["GroupAdam", "GroupAdagrad-rowwise"])
@pytest.mark.parametrize("sharding", ["row_wise", "column_wise", "table_row_wise"])
def test_shard_estimates_on_two_ranks(cls, rowwise, sharding):
    """Per shard of a 2-rank plan (planned, not sharded): the estimate matches a kernel built for
    exactly that shard (same rows x cols), io terms aside."""
    topo = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    cons = {n: ParameterConstraints(sharding_types=[sharding]) for n, _, _ in TABLES}
    ebc = _ebc(cls, rowwise)
    enum = EmbeddingEnumerator(topology=topo, batch_size=512, constraints=cons,
                               estimator=[GroupStorageEstimator(topology=topo, constraints=cons)])
    options = [so for so in enum.enumerate(_Model(ebc), group_sharders())
               if so.sharding_type == sharding]
    assert {so.name for so in options} == {n for n, _, _ in TABLES}
    for so in options:
        for shard in so.shards:
            rows, cols = shard.size
            k = GroupTBE([TableSpec(so.name, rows, cols)], [0], optimizer=cls.rule,
                         rowwise=rowwise)
            real = k.allocated_bytes()
            assert abs(shard.storage.ddr - real) <= 0.05 * real, (so.name, shard.size,
                                                                 shard.storage.ddr, real)


def test_cuda_topology_counts_the_state_in_hbm():
    topo = Topology(world_size=1, local_world_size=1, compute_device="cuda")
    ebc = _ebc(GroupAdam, False)
    group = _estimates(ebc, topo, GroupStorageEstimator(topology=topo))
    plain = _estimates(ebc, topo, EmbeddingStorageEstimator(topology=topo))
    name, rows, cols = TABLES[0]
    state = sum(v for k, v in GroupTBE.table_bytes("adam", rows, cols).items() if k != "weights")
    # TorchRec counts one weights-sized state for an optimizer class it does not know
    assert sum(group[(name, "table_wise")]) - sum(plain[(name, "table_wise")]) == (
        state - rows * cols * 4)


def test_group_planner_refuses_an_enumerator():
    topo = Topology(world_size=1, local_world_size=1, compute_device="cpu")
    with pytest.raises(ValueError, match="Invalid argument enumerator: group_planner sets it"):
        group_planner(topo, enumerator=None)
