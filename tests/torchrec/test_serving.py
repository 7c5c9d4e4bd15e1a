"""The serving EBC against TorchRec's own ``EmbeddingBagCollection`` (the reference): kept rows
only, every pooling and bag shape, fp32 exact and the quantised types within the bound of
row-wise quantisation; scripting, errors."""

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from torchrec_ext.serving import (
    DATA_TYPES,
    export_serving,
    kept_rows,
    load_serving,
    save_serving,
    served_table_bytes,
)

TABLES = [  # a mean-pooled table, a sum table shared by two features, a table with no kept row
    EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=300, feature_names=["fa"],
                       pooling=PoolingType.MEAN),
    EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=100, feature_names=["fb", "fc"]),
    EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=50, feature_names=["fd"]),
]


def _tables(weighted: bool):
    """TABLES; a weighted EBC sums (torch's embedding_bag takes per-id weights with sum only)."""
    if not weighted:
        return TABLES
    return [EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim,
                               num_embeddings=c.num_embeddings, feature_names=c.feature_names)
            for c in TABLES]


def _trained(weighted: bool = False):
    """An EBC shaped like a trained Group model: zero rows, and rows never seen (non-zero)."""
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=_tables(weighted), is_weighted=weighted,
                                 device=torch.device("cpu"))
    seen = {}
    with torch.no_grad():
        for c in TABLES:
            w = ebc.embedding_bags[c.name].weight
            w.mul_(10)  # rows of norm ~1..10
            w[torch.rand(c.num_embeddings) < 0.6] = 0
            seen[c.name] = (torch.rand(c.num_embeddings) < 0.8).to(torch.uint8)
        ebc.embedding_bags["c"].weight[seen["c"] != 0] = 0  # c: nothing kept
    return ebc, seen


def _reference(ebc, seen):
    """The trained EBC with never-seen rows zeroed: what the export must serve."""
    ref = EmbeddingBagCollection(tables=ebc.embedding_bag_configs(), is_weighted=ebc.is_weighted(),
                                 device=torch.device("cpu"))
    ref.load_state_dict(ebc.state_dict())
    with torch.no_grad():
        for name, s in seen.items():
            ref.embedding_bags[name].weight[s == 0] = 0
    return ref


def _kjt(weighted: bool, dtype=torch.int64, batch: int = 64) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(1)
    keys = ["fd", "fc", "fa", "fb"]  # not the tables' order: the module must permute
    rows = {"fa": 300, "fb": 100, "fc": 100, "fd": 50}
    lengths, values = [], []
    for k in keys:
        ln = torch.randint(0, 7, (batch,), generator=g)  # multi-hot, with empty bags
        lengths.append(ln)
        values.append(torch.randint(0, rows[k], (int(ln.sum()),), generator=g))
    values = torch.cat(values).to(dtype)
    weights = torch.rand(len(values), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values,
                                               lengths=torch.cat(lengths), weights=weights)


def _bound(ebc, seen, kjt, data_type) -> dict[str, torch.Tensor]:
    """Per key and bag: the largest pooled error row-wise quantisation can make. An element of a
    row with range r is off by at most r / (2^bits - 1) / 2, plus fp16 rounding of the scale and
    bias (relative 2^-11 of |min| and of r); fp16 rows are off by 2^-11 of |x|."""
    out = {}
    features = kjt.to_dict()
    for c in ebc.embedding_bag_configs():
        w = ebc.embedding_bags[c.name].weight.detach() * (seen[c.name] != 0).unsqueeze(1)
        if data_type == "fp16":
            per_row = w.abs().amax(1) * 2.0 ** -11
        else:
            lo, hi = w.amin(1), w.amax(1)
            rng = hi - lo
            per_row = rng / (2 ** DATA_TYPES[data_type] - 1) / 2 + (lo.abs() + rng) * 2.0 ** -10
        for f in c.feature_names:
            jt = features[f]
            bag = torch.repeat_interleave(torch.arange(len(jt.lengths())), jt.lengths())
            err = per_row[jt.values().long()]
            if jt.weights_or_none() is not None:
                err = err * jt.weights().abs()
            total = torch.zeros(len(jt.lengths())).index_add_(0, bag, err)
            if c.pooling == PoolingType.MEAN:
                total = total / jt.lengths().clamp(min=1)
            out[f] = total
    return out


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("data_type", list(DATA_TYPES))
def test_serving_ebc_equals_torchrec_ebc_on_kept_rows(data_type, weighted):
    ebc, seen = _trained(weighted)
    served = export_serving(ebc, weights={n: b.weight for n, b in ebc.embedding_bags.items()},
                            seen=seen, data_type=data_type)
    ref = _reference(ebc, seen)
    for dtype in (torch.int64, torch.int32):
        kjt = _kjt(weighted, dtype)
        want, got = ref(kjt), served(kjt)
        assert got.keys() == want.keys() == ["fa", "fb", "fc", "fd"]
        assert got.length_per_key() == want.length_per_key()
        w, g = want.to_dict(), got.to_dict()
        bound = _bound(ebc, seen, kjt, data_type) if data_type != "fp32" else None
        for k in w:
            err = (w[k] - g[k]).abs().amax(1)
            if bound is None:
                assert err.max().item() <= 1e-6, k
            else:
                assert bool((err <= bound[k] * 1.01 + 1e-6).all()), (k, (err - bound[k]).max())
    # kept rows = non-zero and seen; table c has none and serves zeros
    for c in TABLES:
        w = ebc.embedding_bags[c.name].weight
        assert served.kept[c.name] == int((w.ne(0).any(1) & (seen[c.name] != 0)).sum())
    assert served.kept["c"] == 0 and served.kept["a"] > 0
    assert not bool(g["fd"].any())


def test_kept_rows_are_non_zero_and_seen():
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -2.0], [3.0, 3.0]])
    assert kept_rows(w).tolist() == [1, 2, 3]
    assert kept_rows(w, torch.tensor([1, 1, 0, 1], dtype=torch.uint8)).tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"Invalid seen: shape \(3,\) \(expected \[4\]"):
        kept_rows(w, torch.ones(3))


def test_id_out_of_range_is_refused():
    ebc, seen = _trained()
    served = export_serving(ebc, weights={n: b.weight for n, b in ebc.embedding_bags.items()},
                            seen=seen)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["fa", "fb", "fc", "fd"],
                                              values=torch.tensor([1, 100, 2, 3]),
                                              lengths=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Invalid id 100 in feature 'fb' \(valid: \[0, 100\)\)"):
        served(kjt)
    with pytest.raises(Exception, match=r"Invalid id 100 in feature 'fb'"):  # scripted too
        torch.jit.script(served)(kjt)


def test_scripted_round_trip_and_bytes(tmp_path):
    ebc, seen = _trained()
    kjt = _kjt(False)
    sizes = {}
    for data_type in DATA_TYPES:
        served = export_serving(ebc, weights={n: b.weight for n, b in ebc.embedding_bags.items()},
                                seen=seen, data_type=data_type)
        path = tmp_path / f"{data_type}.pt"
        save_serving(served, path)
        assert (load_serving(path)(kjt).values() - served(kjt).values()).abs().max() == 0
        kept = served.kept
        sizes[data_type] = served.nbytes
        # a remap array per feature (b serves two features: FBGEMM needs one copy each)
        remap = 4 * sum(c.num_embeddings * len(c.feature_names) for c in TABLES)
        row = {"fp32": lambda d: 4 * d, "fp16": lambda d: 2 * d, "int8": lambda d: d + 4,
               "int4": lambda d: d // 2 + 4}[data_type]
        # FBGEMM on CPU packs rows (no row padding) and aligns each table to 128 bytes
        weights = sum(-(-kept[c.name] * row(c.embedding_dim) // 128) * 128 for c in TABLES)
        assert served.nbytes == weights + remap
        assert served.nbytes == sum(served_table_bytes(
            kept[c.name], c.num_embeddings, c.embedding_dim, len(c.feature_names), data_type)
            for c in TABLES)  # the budget's cost model (SparsityMonitor(target_bytes=...))
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] >= sizes["int4"]


def _sharded_worker(rank, port, outdir):
    """2 ranks: a DMP model with row-, table- and column-wise Group tables, trained; rank 0
    exports it from memory (a collective) and scores a batch."""
    import os

    from lightning_sgl.optim import GroupAdam

    from . import dist_helpers as H

    H.init_process(rank, port)
    model = H.build_model(GroupAdam, dict(lr=0.05, lambda21=0.3), "mixed")
    H.set_full_weights(model, H.full_init())
    H.train(model, H.rank_batches(6), rank)
    served = export_serving(model.module.ebc, data_type="fp32")
    torch.save(H.local_shards(model), os.path.join(outdir, f"shards-{rank}.pt"))
    if rank == 0:
        kjt = _mixed_kjt()
        torch.save({"out": served(kjt).to_dict(), "kept": served.kept},
                   os.path.join(outdir, "served.pt"))
    else:
        assert served is None
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _mixed_kjt():
    from . import dist_helpers as H

    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 4, (len(H.FEATURES) * 16,), generator=g)
    values = []
    for i, f in enumerate(H.FEATURES):
        rows = H.TABLES[H.FEATURE_TABLE[f]][1]
        values.append(torch.randint(0, rows, (int(lengths[i * 16:(i + 1) * 16].sum()),),
                                    generator=g))
    return KeyedJaggedTensor.from_lengths_sync(keys=H.FEATURES, values=torch.cat(values),
                                               lengths=lengths)


def test_sharded_model_exports_on_rank_zero(tmp_path):
    from . import dist_helpers as H

    H.spawn(_sharded_worker, str(tmp_path))
    full = H.assemble([torch.load(tmp_path / f"shards-{r}.pt") for r in range(H.WORLD)])
    got = torch.load(tmp_path / "served.pt")
    configs = [EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=fs)
               for n, r, d, fs in H.TABLES]
    weights = {n: full[f"ebc.embedding_bags.{n}.weight"] for n, *_ in H.TABLES}
    seen = {n: full[f"{n}.seen"].view(-1) for n, *_ in H.TABLES}
    want = export_serving(configs, weights=weights, seen=seen)
    assert got["kept"] == want.kept
    assert 0 < sum(want.kept.values()) < sum(r for _, r, _, _ in H.TABLES)
    ref = want(_mixed_kjt()).to_dict()
    assert max((got["out"][k] - ref[k]).abs().max().item() for k in ref) == 0.0


def test_the_monitor_budget_knows_every_served_data_type():
    from lightning_sgl.callbacks.sparsity_monitor import SERVE_DTYPES

    assert SERVE_DTYPES == tuple(DATA_TYPES)
