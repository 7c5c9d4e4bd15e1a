"""Readers of the public CTR formats, on tiny files written here."""

import pytest
import torch

from lightning_sgl.data import readers


def test_criteo_tsv(tmp_path):
    rows = []
    for i in range(6):
        ints = [str(i * 3), "", "-1"] + [str(j) for j in range(10)]
        cats = [f"{(i + j) % 3:08x}" for j in range(26)]
        rows.append("\t".join([str(i % 2), *ints, *cats]))
    p = tmp_path / "train.txt"
    p.write_text("\n".join(rows) + "\n")
    d = readers.read("criteo", str(p))
    assert d.ids.shape == (6, 39) and d.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert all(int(d.ids[:, f].max()) < v for f, v in enumerate(d.vocab_sizes))
    a, b = d.split(0.5)
    assert len(a.labels) == 3
    with pytest.raises(ValueError, match=r"Invalid Criteo file .*bad.txt.*, line 1: 2 tab-"
                                         r"separated columns \(expected 40"):
        (tmp_path / "bad.txt").write_text("1\t2\n")
        readers.read("criteo", str(tmp_path / "bad.txt"))


def test_avazu_csv(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("id,click,hour,C1,banner_pos,site_id\n"
                 "1,0,14102100,1005,0,abc\n2,1,14102101,1005,1,abd\n3,1,14102223,1002,0,abc\n")
    d = readers.read("avazu", str(p))
    assert d.ids.shape == (3, 5) and d.labels.tolist() == [0, 1, 1]
    assert d.ids[0, 0] != d.ids[1, 0]  # hour of day differs


def test_movielens_as_ctr(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t0\n2\t10\t3\t0\n1\t11\t4\t0\n")
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    d = readers.read("movielens", str(tmp_path))
    assert d.labels.tolist() == [1.0, 0.0, 1.0]  # rating >= 4
    assert d.ids.shape == (3, 5)
    assert torch.equal(d.ids[:, 0], torch.tensor([1, 2, 1]))


def test_unknown_source_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid source: 'kdd'"):
        readers.read("kdd", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"Invalid path"):
        readers.read("criteo", str(tmp_path / "nope"))


def test_movielens_recbole_atomic_files(tmp_path):
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "196\t242\t3\t881250949\n186\t302\t4\t891717742\n196\t302\t5\t1\n")
    (tmp_path / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "196\t49\tM\twriter\t55105\n186\t39\tF\texecutive\t00000\n")
    d = readers.read("movielens", str(tmp_path))
    assert d.labels.tolist() == [0.0, 1.0, 1.0]
    assert d.ids.shape == (3, 5)
