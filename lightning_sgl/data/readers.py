"""Readers for public CTR data formats, returning the same container as the synthetic set.

- ``criteo``: Criteo Kaggle (Display Advertising Challenge) ``train.txt``: tab-separated
  ``label, I1..I13, C1..C26`` (counts as in ``torchrec.datasets.criteo``). Integer
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

from .synthetic import CTRDataset

__all__ = ["read", "read_criteo", "read_avazu", "read_movielens", "criteo_tokens", "AvazuLayout",
           "finite_number"]

#: Criteo's columns after the label (``torchrec.datasets.criteo``'s INT/CAT_FEATURE_COUNT)
INT_FEATURE_COUNT, CAT_FEATURE_COUNT = 13, 26


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


def _container(ids: torch.Tensor, labels: list[float], sizes: list[int]) -> CTRDataset:
    y = torch.tensor(labels, dtype=torch.float32)
    return CTRDataset(ids=ids, labels=y, vocab_sizes=sizes, informative=[torch.zeros(0,
                        dtype=torch.long)] * len(sizes), weights=[torch.zeros(s) for s in sizes],
                        probabilities=torch.full_like(y, float("nan")))


class _Lines:
    """The lines of a text file, counted: decoding errors become ``ValueError`` naming the file
    and line (``line`` is the number of the last line read, 1-based).

    ``offset`` (a byte position at the start of line ``line + 1``) and ``count`` read a range:
    the streaming readers start a shard there without reading what comes before.
    """

    def __init__(self, path: str, fmt: str, encoding: str = "utf-8", offset: int = 0,
                 line: int = 0, count: int | None = None):
        self.path, self.fmt, self.encoding, self.line = path, fmt, encoding, line
        self.offset, self.count = offset, count

    def __iter__(self):
        with open(self.path, "rb") as f:  # decoded line by line: errors point at their line
            f.seek(self.offset)
            for i, raw in enumerate(f):
                if self.count is not None and i >= self.count:
                    return
                self.line += 1
                try:
                    yield raw.decode(self.encoding)
                except UnicodeDecodeError as err:
                    raise self.error(f"not {self.encoding} text ({err.reason} at byte "
                                     f"{err.start} of the line)") from None

    def error(self, what: str, line: int | None = None) -> ValueError:
        n = line if line is not None else max(self.line, 1)
        return ValueError(f"Invalid {self.fmt} file {self.path!r}, line {n}: {what}")


def _label(value: str, lines: _Lines, name: str = "label") -> float:
    """A click label: 0 or 1 (also written 0.0 / 1.0); anything else is refused."""
    try:
        y = float(value)
    except ValueError:
        raise lines.error(f"{name} {value!r} is not a number (expected 0 or 1)") from None
    if y not in (0.0, 1.0):
        raise lines.error(f"{name} {value!r} is not 0 or 1")
    return y


def _int_bucket(v: str, lines: _Lines, field: str) -> str:
    if v == "":
        return "missing"
    try:
        x = int(v)
    except ValueError:
        raise lines.error(f"integer feature {field} is {v!r} (expected an integer or empty)"
                          ) from None
    return "neg" if x < 0 else str((x + 1).bit_length() - 1)  # floor(log2(x + 1)), exact


def criteo_tokens(line: str, lines: _Lines) -> tuple[float, list[str]]:
    """One Criteo TSV line -> ``(label, 39 field tokens)``: integer features as
    ``floor(log2(x + 1))`` buckets ("neg", "missing"), categorical values as they are."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT:
        raise lines.error(f"{len(parts)} tab-separated columns (expected "
                          f"{1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT}: label, "
                          f"{INT_FEATURE_COUNT} integer, {CAT_FEATURE_COUNT} categorical)")
    tokens = [_int_bucket(parts[1 + j], lines, f"I{j + 1}") for j in range(INT_FEATURE_COUNT)]
    return _label(parts[0], lines), tokens + parts[1 + INT_FEATURE_COUNT:]


def read_criteo(path: str, max_rows: int | None = None, min_count: int = 1) -> CTRDataset:
    cols: list[list[str]] | None = None
    labels = []
    lines = _Lines(path, "Criteo")
    for i, line in enumerate(lines):
        if max_rows is not None and i >= max_rows:
            break
        label, tokens = criteo_tokens(line, lines)
        cols = cols or [[] for _ in tokens]
        labels.append(label)
        for col, t in zip(cols, tokens):
            col.append(t)
    ids, sizes = _encode(cols or [[] for _ in range(39)], min_count)
    return _container(ids, labels, sizes)


class AvazuLayout:
    """The columns of an Avazu CSV, from its header: label ``click``; ``hour`` (YYMMDDHH) as
    hour-of-day and day fields; ``id`` dropped; every other column a field."""

    def __init__(self, header: list[str] | None, lines: _Lines):
        if header is None or "click" not in header:
            raise lines.error("a CSV header with 'click' is required", line=1)
        self.width = len(header)
        self.pos = {c: k for k, c in enumerate(header)}
        self.names = [c for c in header if c not in ("id", "click", "hour")]

    def tokens(self, row: list[str], lines: _Lines) -> tuple[float, list[str]]:
        """One CSV row -> ``(label, field tokens)``."""
        if len(row) != self.width:
            raise lines.error(f"{len(row)} comma-separated fields (the header has "
                              f"{self.width})")
        hour = row[self.pos["hour"]] if "hour" in self.pos else ""
        return (_label(row[self.pos["click"]], lines, "click"),
                [hour[-2:], hour[:6]] + [row[self.pos[c]] for c in self.names])


def read_avazu(path: str, max_rows: int | None = None, min_count: int = 1) -> CTRDataset:
    labels = []
    lines = _Lines(path, "Avazu")
    reader = csv.reader(lines)
    layout = AvazuLayout(next(reader, None), lines)
    cols: list[list[str]] = [[] for _ in range(len(layout.names) + 2)]
    for i, row in enumerate(reader):
        if max_rows is not None and i >= max_rows:
            break
        label, tokens = layout.tokens(row, lines)
        labels.append(label)
        for col, t in zip(cols, tokens):
            col.append(t)
    ids, sizes = _encode(cols, min_count)
    return _container(ids, labels, sizes)


def _read_atomic(lines: _Lines | str):
    """The rows of a RecBole atomic file (tab-separated, header ``name:type``) as dicts; a row
    whose field count differs from the header's is refused naming the file and line."""
    # latin-1: the shipped item titles are not all UTF-8 (only ids and numbers are used)
    lines = lines if isinstance(lines, _Lines) else _Lines(lines, "RecBole atomic", "latin-1")
    header = None
    for line in lines:
        parts = line.rstrip("\r\n").split("\t")
        if header is None:
            header = [h.split(":")[0] for h in parts]
            continue
        if len(parts) != len(header):
            raise lines.error(f"{len(parts)} tab-separated fields (the header has {len(header)})")
        yield dict(zip(header, parts))


def _read_movielens_atomic(folder: str, max_rows: int | None, min_count: int) -> CTRDataset:
    """MovieLens-100K in RecBole's atomic format (``ml-100k.inter``, ``.user``, ``.item``)."""
    base = next(os.path.join(folder, f)[: -len(".inter")] for f in sorted(os.listdir(folder))
                if f.endswith(".inter"))
    users = {r["user_id"]: [str(int(r["age"]) // 10), r["gender"], r["occupation"]]
             for r in _read_atomic(base + ".user")} if os.path.exists(base + ".user") else {}
    items = {r["item_id"]: (r.get("class", "").split(" ") or ["none"])[0]
             for r in _read_atomic(base + ".item")} if os.path.exists(base + ".item") else {}
    labels: list[float] = []
    cols: list[list[str]] = [[], []] + ([[], [], []] if users else []) + ([[]] if items else [])
    inter = _Lines(base + ".inter", "RecBole atomic", "latin-1")
    for i, r in enumerate(_read_atomic(inter)):
        if max_rows is not None and i >= max_rows:
            break
        labels.append(1.0 if _rating(r["rating"], inter) >= 4 else 0.0)
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


def finite_number(text: str, lines: _Lines, what: str) -> float:
    """``float(text)``, refused naming the file and line (``what`` names the field) when it is
    not a number or not finite."""
    try:
        x = float(text)
    except ValueError:
        raise lines.error(f"{what} is not a number") from None
    if not math.isfinite(x):
        raise lines.error(f"{what} is not finite")
    return x


def _rating(value: str, lines: _Lines) -> float:
    return finite_number(value, lines, f"rating {value!r}")


def read_movielens(path: str, max_rows: int | None = None, min_count: int = 1) -> CTRDataset:
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
    lines = _Lines(data, "MovieLens", encoding="latin-1")
    for i, line in enumerate(lines):
        if max_rows is not None and i >= max_rows:
            break
        parts = line.split()
        if len(parts) != 4:
            raise lines.error(f"{len(parts)} fields (expected user, item, rating, timestamp)")
        user, item, rating, _ = parts
        labels.append(1.0 if _rating(rating, lines) >= 4 else 0.0)
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


def read(source: str, path: str, max_rows: int | None = None, min_count: int = 1) -> CTRDataset:
    """Read ``source`` in {"criteo", "avazu", "movielens"} from ``path``."""
    readers = {"criteo": read_criteo, "avazu": read_avazu, "movielens": read_movielens}
    if source not in readers:
        raise ValueError(f"Invalid source: {source!r} (valid options: {', '.join(readers)})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Invalid path: {path!r} does not exist")
    return readers[source](path, max_rows=max_rows, min_count=min_count)
