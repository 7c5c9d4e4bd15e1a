"""Streaming readers on generated files of every format: the same samples in the same order as
the in-memory readers (or an independent parse), every sample exactly once over 2 ranks x 2
workers, equal rank shares, hashing, the cache, and malformed input named by file and line."""

import math
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.bench_readers import FORMATS, write
from lightning_sgl.data import readers
from lightning_sgl.data.streaming import Bags, StreamingCTRDataset, collate_bags

ROWS = 1_000


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("streams")
    return {fmt: write(fmt, str(d / (fmt if fmt == "criteo_binary" else f"{fmt}.txt")), ROWS,
                       tag=True) for fmt in FORMATS}


def _tag(sample, fmt) -> int:
    """The row number the generator wrote into every sample."""
    x, _ = sample
    if isinstance(x, Bags):
        return int(x.ids[0])  # vocabulary ids of the tag follow first appearance: row order
    return int(x[13 if fmt == "criteo" else 2 if fmt == "avazu" else 13])


@pytest.mark.parametrize("fmt,min_count", [("criteo", 1), ("criteo", 3), ("avazu", 1),
                                           ("avazu", 2)])
def test_streaming_equals_in_memory_reader(files, tmp_path, fmt, min_count):
    ref = readers.read(fmt, files[fmt], min_count=min_count)
    ds = StreamingCTRDataset(files[fmt], fmt, min_count=min_count, cache_dir=str(tmp_path))
    ids, labels = zip(*ds)
    assert torch.equal(torch.stack(ids), ref.ids)
    assert torch.equal(torch.stack(labels), ref.labels)
    assert ds.vocab_sizes == ref.vocab_sizes
    # the head/tail parts are the in-memory split's
    train, val = ref.split(0.8)
    head = StreamingCTRDataset(files[fmt], fmt, min_count=min_count, cache_dir=str(tmp_path),
                               part=(0.0, 0.8), vocabulary=ds.vocabulary)
    tail = StreamingCTRDataset(files[fmt], fmt, min_count=min_count, cache_dir=str(tmp_path),
                               part=(0.8, 1.0), vocabulary=ds.vocabulary)
    assert torch.equal(torch.stack([x for x, _ in head]), train.ids)
    assert torch.equal(torch.stack([x for x, _ in tail]), val.ids)


def _reference(fmt: str, path: str):
    """An independent parse of the multi-hot and binary formats: (label, per-field raw values,
    per-field values)."""
    out = []
    if fmt == "criteo_binary":
        for day in (0, 1):
            s = np.load(os.path.join(path, f"day_{day}_sparse.npy"))
            d = np.load(os.path.join(path, f"day_{day}_dense.npy"))
            y = np.load(os.path.join(path, f"day_{day}_labels.npy"))
            for r in range(len(s)):
                toks = [[math.floor(float(v) / math.log(2))] for v in d[r]] + [[int(v)] for v in s[r]]
                out.append((float(y[r, 0]), toks, None))
        return out
    for line in open(path):
        label, *feats = line.split()
        fields: dict[int, list] = {}
        for tok in feats:
            parts = tok.split(":")
            f = 0 if fmt == "libsvm" else int(parts[0])
            fields.setdefault(f, []).append((parts[-2], float(parts[-1])))
        n = 1 if fmt == "libsvm" else 5
        out.append((float(label), [[i for i, _ in fields.get(f, [])] for f in range(n)],
                    [[v for _, v in fields.get(f, [])] for f in range(n)]))
    return out


@pytest.mark.parametrize("fmt", ["libsvm", "libffm", "criteo_binary"])
def test_streaming_matches_an_independent_parse(files, tmp_path, fmt):
    ds = StreamingCTRDataset(files[fmt], fmt, cache_dir=str(tmp_path))
    ref = _reference(fmt, files[fmt])
    samples = list(ds)
    assert len(samples) == len(ref) == ROWS
    # the vocabulary: first appearance order per field, ids from 1
    vocab = [dict() for _ in ref[0][1]]
    for _, toks, _ in ref:
        for f, ts in enumerate(toks):
            for t in ts:
                vocab[f].setdefault(t, len(vocab[f]) + 1)
    assert ds.vocab_sizes == [len(v) + 1 for v in vocab]
    for (x, y), (label, toks, vals) in zip(samples, ref):
        assert float(y) == label
        want = [vocab[f][t] for f, ts in enumerate(toks) for t in ts]
        if isinstance(x, Bags):
            assert x.lengths.tolist() == [len(ts) for ts in toks]
            assert x.ids.tolist() == want
            flat = [v for vs in vals for v in vs]
            assert (x.weights is None) == all(v == 1.0 for v in flat)
            if x.weights is not None:
                assert x.weights.tolist() == flat
        else:
            assert x.tolist() == want


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_two_workers_read_every_sample_exactly_once(files, tmp_path, fmt):
    seen = []
    counts = []
    for rank in range(2):
        ds = StreamingCTRDataset(files[fmt], fmt, cache_dir=str(tmp_path), rank=rank,
                                 world_size=2, part=(0.0, 0.8))
        collate = collate_bags if fmt in ("libsvm", "libffm") else None
        n = 0
        for batch in DataLoader(ds, batch_size=32, num_workers=2, collate_fn=collate):
            x, _ = batch
            if fmt in ("libsvm", "libffm"):
                jt = x["f0"]
                starts = torch.cat([torch.zeros(1, dtype=torch.long), jt.lengths().cumsum(0)[:-1]])
                seen += jt.values()[starts].tolist()
            else:
                seen += x[:, 13 if fmt in ("criteo", "criteo_binary") else 2].tolist()
            n += len(batch[1])
        counts.append(n)
    whole = StreamingCTRDataset(files[fmt], fmt, cache_dir=str(tmp_path), part=(0.0, 0.8))
    want = [_tag(s, fmt) for s in whole]
    assert sorted(seen) == sorted(want) and len(set(want)) == len(want) == int(ROWS * 0.8)
    assert counts == [400, 400]


def test_even_shares_drop_at_most_world_minus_one(files, tmp_path):
    shares = [StreamingCTRDataset(files["criteo"], "criteo", cache_dir=str(tmp_path),
                                  part=(0.0, 0.999), rank=r, world_size=3, even=True).num_samples
              for r in range(3)]
    assert shares == [333] * 3  # 999 lines: nothing dropped
    shares = [StreamingCTRDataset(files["criteo"], "criteo", cache_dir=str(tmp_path),
                                  rank=r, world_size=3, even=True).num_samples for r in range(3)]
    assert shares == [333] * 3  # 1000 lines: one dropped
    uneven = [StreamingCTRDataset(files["criteo"], "criteo", cache_dir=str(tmp_path),
                                  rank=r, world_size=3).num_samples for r in range(3)]
    assert sum(uneven) == 1000


def test_hashing_needs_no_pass_and_stays_in_range(files, tmp_path):
    ds = StreamingCTRDataset(files["criteo"], "criteo", hash_size=97, cache_dir=str(tmp_path))
    assert ds.vocabulary is None and ds.vocab_sizes == [97] * 39
    ids = torch.stack([x for x, _ in ds])
    assert int(ids.min()) >= 0 and int(ids.max()) < 97 and len(ids.unique()) > 50
    again = torch.stack([x for x, _ in StreamingCTRDataset(files["criteo"], "criteo",
                                                           hash_size=97)])
    assert torch.equal(ids, again)  # crc32: the same ids in every process
    with pytest.raises(ValueError, match=r"Invalid num_fields: None \(libffm with hash_size"):
        StreamingCTRDataset(files["libffm"], "libffm", hash_size=10)


def test_vocabulary_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = write("criteo", str(tmp_path / "c.txt"), 50)
    cache = tmp_path / "cache"
    a = StreamingCTRDataset(str(path), "criteo", cache_dir=str(cache))
    assert len(list(cache.glob("vocab-*.json"))) == 1
    from lightning_sgl.data import streaming

    def refuse(*a, **k):
        raise AssertionError("the vocabulary pass ran again")
    monkeypatch.setattr(streaming._Text, "read", refuse)
    b = StreamingCTRDataset(str(path), "criteo", cache_dir=str(cache))  # from the cache
    assert b.vocabulary == a.vocabulary
    monkeypatch.undo()
    with open(path, "a") as f:  # a changed file: a new key, a new pass
        f.write(open(path).readline())
    StreamingCTRDataset(str(path), "criteo", cache_dir=str(cache))
    assert len(list(cache.glob("vocab-*.json"))) == 2


def test_lines_past_the_index_stride_are_found(tmp_path, monkeypatch):
    """Shards start by seeking to the nearest indexed line; a small stride exercises it."""
    from lightning_sgl.data import streaming

    monkeypatch.setattr(streaming, "_INDEX_EVERY", 7)
    path = write("libsvm", str(tmp_path / "s.txt"), 100, tag=True)
    ds = StreamingCTRDataset(path, "libsvm", cache_dir=str(tmp_path / "cache"), part=(0.33, 0.9))
    tags = [int(x.ids[0]) for x, _ in ds]
    first = StreamingCTRDataset(path, "libsvm", cache_dir=str(tmp_path / "cache"))
    everything = [int(x.ids[0]) for x, _ in first]
    assert tags == everything[33:90]


def test_shuffle_buffer_permutes_the_same_samples(files, tmp_path):
    def tags(**kw):
        ds = StreamingCTRDataset(files["avazu"], "avazu", cache_dir=str(tmp_path), **kw)
        return [int(x[2]) for x, _ in ds]

    plain, a, b = tags(), tags(shuffle_buffer=64, seed=1), tags(shuffle_buffer=64, seed=1)
    assert a == b and a != plain and sorted(a) == sorted(plain)  # deterministic, a permutation
    assert tags(shuffle_buffer=64, seed=2) != a


def test_collate_bags_puts_ids_key_major_with_weights():
    """Against a per-sample, per-field reference: values, weights (1 where a sample has none)
    and lengths of every key."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for b in range(7):
        ln = torch.randint(0, 4, (3,), generator=g)
        ids = torch.randint(0, 100, (int(ln.sum()),), generator=g)
        w = torch.rand(len(ids), generator=g) if b % 2 else None
        batch.append((Bags(ln, ids, w), torch.tensor(float(b % 2))))
    kjt, y = collate_bags(batch)
    d = kjt.to_dict()
    for f in range(3):
        ids = torch.cat([bg.ids.split(bg.lengths.tolist())[f] for bg, _ in batch])
        ws = torch.cat([(bg.weights if bg.weights is not None else torch.ones(len(bg.ids)))
                        .split(bg.lengths.tolist())[f] for bg, _ in batch])
        assert torch.equal(d[f"f{f}"].values(), ids)
        assert torch.equal(d[f"f{f}"].weights(), ws)
        assert torch.equal(d[f"f{f}"].lengths(), torch.stack([bg.lengths[f] for bg, _ in batch]))
    assert y.tolist() == [float(b % 2) for b in range(7)]
    unweighted, _ = collate_bags([(Bags(torch.tensor([1, 0]), torch.tensor([5]), None),
                                   torch.tensor(1.0))])
    assert unweighted.weights_or_none() is None
