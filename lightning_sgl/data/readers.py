"""Readers for public CTR data formats, returning the same container as the synthetic set.

- ``criteo``: Criteo Kaggle (Display Advertising Challenge) ``train.txt``: tab-separated
  ``label, I1..I13, C1..C26`` (field names and counts from ``torchrec.datasets.criteo``). Integer
  features become categorical by ``floor(log2(x + 1))`` buckets (negatives and missing -> 0).
- ``avazu``: Avazu ``train`` CSV with a header: ``id, click, hour, C1, banner_pos, ...``; label
  ``click``; ``hour`` (YYMMDDHH) becomes hour-of-day and weekday fields; ``id`` is dropped.
- ``movielens``: MovieLens-100K folder, GroupLens layout (``u.data``: user, item, rating, time;
  optional ``u.user`` and ``u.item``) or RecBole's atomic files (``ml-100k.inter``, ``.user``,
  ``.item``, as shipped in the RecBole 1.2.1 wheel under ``recbole/dataset_example/ml-100k``),
  as CTR: label = rating >= 4; fields user, item (+ age bucket, gender, occupation, first genre
  when the side files exist).

Categorical values are mapped to contiguous ids per field in order of appearance; values seen
fewer than ``min_count`` times share id 0. The result has no planted ground truth
(``informative`` is empty).
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter

import torch

from .synthetic import SyntheticCTR

__all__ = ["read", "read_criteo", "read_avazu", "read_movielens"]


def _encode(columns: list[list[str]], min_count: int) -> tuple[torch.Tensor, list[int]]:
    ids, sizes = [], []
    for col in columns:
        counts = Counter(col)
        mapping: dict[str, int] = {}
        out = []
        for v in col:
            if counts[v] < min_count:
                out.append(0)
                continue
            if v not in mapping:
                mapping[v] = len(mapping) + 1
            out.append(mapping[v])
        ids.append(torch.tensor(out, dtype=torch.long))
        sizes.append(len(mapping) + 1)
    return torch.stack(ids, dim=1), sizes


def _container(ids: torch.Tensor, labels: list[float], sizes: list[int]) -> SyntheticCTR:
    y = torch.tensor(labels, dtype=torch.float32)
    return SyntheticCTR(ids=ids, labels=y, vocab_sizes=sizes, informative=[torch.zeros(0,
                        dtype=torch.long)] * len(sizes), weights=[torch.zeros(s) for s in sizes],
                        probabilities=torch.full_like(y, float("nan")))


def _int_bucket(v: str) -> str:
    if v == "":
        return "missing"
    x = int(v)
    return "neg" if x < 0 else str(int(math.floor(math.log2(x + 1))))


def read_criteo(path: str, max_rows: int | None = None, min_count: int = 1) -> SyntheticCTR:
    from torchrec.datasets.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT

    n_fields = INT_FEATURE_COUNT + CAT_FEATURE_COUNT
    cols: list[list[str]] = [[] for _ in range(n_fields)]
    labels = []
    with open(path) as f:
        for i, line in enumerate(f):
            if max_rows is not None and i >= max_rows:
                break
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 1 + n_fields:
                raise ValueError(f"Invalid Criteo line {i + 1} in {path}: {len(parts)} columns "
                                 f"(expected {1 + n_fields}: label, 13 integer, 26 categorical)")
            labels.append(float(parts[0]))
            for j in range(INT_FEATURE_COUNT):
                cols[j].append(_int_bucket(parts[1 + j]))
            for j in range(CAT_FEATURE_COUNT):
                cols[INT_FEATURE_COUNT + j].append(parts[1 + INT_FEATURE_COUNT + j])
    ids, sizes = _encode(cols, min_count)
    return _container(ids, labels, sizes)


def read_avazu(path: str, max_rows: int | None = None, min_count: int = 1) -> SyntheticCTR:
    labels, cols = [], None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "click" not in reader.fieldnames:
            raise ValueError(f"Invalid Avazu file {path}: a CSV header with 'click' is required")
        names = [c for c in reader.fieldnames if c not in ("id", "click", "hour")]
        cols = [[] for _ in range(len(names) + 2)]
        for i, row in enumerate(reader):
            if max_rows is not None and i >= max_rows:
                break
            labels.append(float(row["click"]))
            hour = row.get("hour", "")
            cols[0].append(hour[-2:])  # hour of day
            cols[1].append(hour[:6])  # day (YYMMDD)
            for j, c in enumerate(names):
                cols[2 + j].append(row[c])
    ids, sizes = _encode(cols, min_count)
    return _container(ids, labels, sizes)


def _read_atomic(path: str) -> list[dict[str, str]]:
    """A RecBole atomic file (tab-separated, header ``name:type``)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        return [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f]


def _read_movielens_atomic(folder: str, max_rows: int | None, min_count: int) -> SyntheticCTR:
    """MovieLens-100K in RecBole's atomic format (``ml-100k.inter``, ``.user``, ``.item``)."""
    base = next(os.path.join(folder, f)[: -len(".inter")] for f in sorted(os.listdir(folder))
                if f.endswith(".inter"))
    users = {r["user_id"]: [str(int(r["age"]) // 10), r["gender"], r["occupation"]]
             for r in _read_atomic(base + ".user")} if os.path.exists(base + ".user") else {}
    items = {r["item_id"]: (r.get("class", "").split(" ") or ["none"])[0]
             for r in _read_atomic(base + ".item")} if os.path.exists(base + ".item") else {}
    labels: list[float] = []
    cols: list[list[str]] = [[], []] + ([[], [], []] if users else []) + ([[]] if items else [])
    for i, r in enumerate(_read_atomic(base + ".inter")):
        if max_rows is not None and i >= max_rows:
            break
        labels.append(1.0 if float(r["rating"]) >= 4 else 0.0)
        cols[0].append(r["user_id"])
        cols[1].append(r["item_id"])
        k = 2
        if users:
            for j, v in enumerate(users.get(r["user_id"], ["?", "?", "?"])):
                cols[k + j].append(v)
            k += 3
        if items:
            cols[k].append(items.get(r["item_id"], "none"))
    ids, sizes = _encode(cols, min_count)
    return _container(ids, labels, sizes)


def read_movielens(path: str, max_rows: int | None = None, min_count: int = 1) -> SyntheticCTR:
    if os.path.isdir(path) and any(f.endswith(".inter") for f in os.listdir(path)):
        return _read_movielens_atomic(path, max_rows, min_count)
    data = os.path.join(path, "u.data") if os.path.isdir(path) else path
    folder = os.path.dirname(data)
    users: dict[str, list[str]] = {}
    items: dict[str, str] = {}
    if os.path.exists(os.path.join(folder, "u.user")):
        with open(os.path.join(folder, "u.user"), encoding="latin-1") as f:
            for line in f:
                uid, age, gender, occupation, _ = line.rstrip("\n").split("|")
                users[uid] = [str(int(age) // 10), gender, occupation]
    if os.path.exists(os.path.join(folder, "u.item")):
        with open(os.path.join(folder, "u.item"), encoding="latin-1") as f:
            for line in f:
                parts = line.rstrip("\n").split("|")
                genres = parts[5:]
                first = next((str(k) for k, g in enumerate(genres) if g == "1"), "none")
                items[parts[0]] = first
    labels = []
    cols: list[list[str]] = [[], []] + ([[], [], []] if users else []) + ([[]] if items else [])
    with open(data) as f:
        for i, line in enumerate(f):
            if max_rows is not None and i >= max_rows:
                break
            user, item, rating, _ = line.split()
            labels.append(1.0 if int(rating) >= 4 else 0.0)
            cols[0].append(user)
            cols[1].append(item)
            k = 2
            if users:
                for j, v in enumerate(users.get(user, ["?", "?", "?"])):
                    cols[k + j].append(v)
                k += 3
            if items:
                cols[k].append(items.get(item, "none"))
    ids, sizes = _encode(cols, min_count)
    return _container(ids, labels, sizes)


def read(source: str, path: str, max_rows: int | None = None, min_count: int = 1) -> SyntheticCTR:
    """Read ``source`` in {"criteo", "avazu", "movielens"} from ``path``."""
    readers = {"criteo": read_criteo, "avazu": read_avazu, "movielens": read_movielens}
    if source not in readers:
        raise ValueError(f"Invalid source: {source!r} (valid options: {', '.join(readers)})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Invalid path: {path!r} does not exist")
    return readers[source](path, max_rows=max_rows, min_count=min_count)
