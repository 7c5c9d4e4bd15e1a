"""Streaming CTR readers: ``IterableDataset``s over files of any size, split by rank and worker.

Formats (``FORMATS``):

- ``criteo``: Criteo TSV (``label, I1..I13, C1..C26``; Kaggle ``train.txt`` or Terabyte days);
  integer features become ``floor(log2(x + 1))`` buckets, as in :func:`.readers.read_criteo`.
- ``avazu``: Avazu CSV with a header (``click`` label; ``hour`` -> hour-of-day and day fields).
- ``libsvm``: ``label idx:val idx:val ...`` -- one multi-hot field; labels 0/1 (-1 and +1 are
  read as 0 and 1, libsvm's convention for binary classes).
- ``libffm``: ``label field:idx:val ...`` -- one multi-hot field per field number.
- ``criteo_binary``: TorchRec's preprocessed Criteo layout, a folder of ``day_<k>_dense.npy``
  (float32 ``log(x - min + 2)``, bucketed here as ``floor(v / ln 2)``), ``day_<k>_sparse.npy``
  and ``day_<k>_labels.npy`` (``BinaryCriteoUtils.tsv_to_npys``), read in row ranges with
  ``BinaryCriteoUtils.load_npy_range``.

Samples are ``(ids [F] int64, label)`` for the one-id-per-field formats (what the in-memory
:class:`.CTRDataset` gives) and ``(Bags, label)`` for libsvm/libffm, where :class:`Bags` holds
per-field lengths, ids and (when a value is not 1) per-id weights (TorchRec's KJT weights).

Vocabulary, the user's choice:

- ``min_count`` (default): a first pass counts every field's values (a progress bar on a
  terminal) and maps the values seen at least ``min_count`` times to ``1..n`` in order of first
  appearance, the others to 0 -- exactly :func:`.readers._encode`'s mapping, so the streaming and
  in-memory readers give the same ids. The pass is cached on disk (keyed by the file's path,
  size, modification time, format and ``min_count``); memory O(distinct values).
- ``hash_size``: ``id = crc32(value) % hash_size`` per field (integers: ``value % hash_size``, as
  TorchRec's DLRM hashes the binary layout); no pass over the values, memory O(1).

Splitting: a line index (the byte offset of every 65,536th line, cached with the vocabulary)
lets each shard seek to its first line. ``part=(a, b)`` takes data lines ``[int(a N), int(b N))``
(``CTRDataset.split``'s head/tail rule); that range is split into ``world_size`` contiguous rank
ranges (with ``even=True`` each rank gets ``floor(n / world_size)`` lines, dropping at most
``world_size - 1``, so every rank runs the same number of steps), and each rank's range into
``num_workers`` worker ranges. Every line of the part is read by exactly one (rank, worker).

Memory: O(chunk) per worker while reading -- one line (text) or ``chunk_rows`` rows (binary), a
shuffle buffer when asked -- plus the vocabulary and the index (N / 65,536 offsets).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..checkpoint import atomic_write
from .readers import AvazuLayout, _label, _Lines, criteo_tokens, finite_number

__all__ = ["FORMATS", "Bags", "StreamingCTRDataset", "collate_bags"]

FORMATS = ("criteo", "avazu", "libsvm", "libffm", "criteo_binary")
_NAMES = {"criteo": "Criteo", "avazu": "Avazu", "libsvm": "libsvm", "libffm": "libffm",
          "criteo_binary": "Criteo binary"}
_INDEX_EVERY = 1 << 16
_VERSION = 1


class Bags(NamedTuple):
    """One multi-hot sample: ``lengths [F]``, ``ids [sum(lengths)]`` field by field, and
    ``weights`` (float32, same length) or ``None`` when every value is 1."""

    lengths: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor | None


def collate_bags(batch: list[tuple[Bags, torch.Tensor]]):
    """``[(Bags, label)]`` -> ``(KeyedJaggedTensor with keys f0..f{F-1}, labels [B])``.

    The samples' ids (sample-major, fields in order) are put key-major, as a KJT wants, with one
    stable sort by (field, sample): O(ids log ids) in torch, no Python loop over fields."""
    from torchrec import KeyedJaggedTensor

    lengths = torch.stack([b.lengths for b, _ in batch])  # [B, F]
    n_samples, fields = lengths.shape
    ids = torch.cat([b.ids for b, _ in batch])
    weighted = any(b.weights is not None for b, _ in batch)
    field = torch.repeat_interleave(torch.arange(fields).repeat(n_samples), lengths.reshape(-1))
    sample = torch.repeat_interleave(torch.arange(n_samples), lengths.sum(1))
    order = torch.sort(field * n_samples + sample, stable=True).indices
    weights = None
    if weighted:
        weights = torch.cat([b.weights if b.weights is not None else torch.ones(len(b.ids))
                             for b, _ in batch])[order]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{f}" for f in range(fields)], values=ids[order],
        lengths=lengths.t().reshape(-1), weights=weights)
    return kjt, torch.stack([y for _, y in batch])


# --------------------------------------------------------------------------- caching
def _cache_dir(cache_dir: str | None) -> str:
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        cache_dir = os.path.join(base, "lightning_sgl")
    os.makedirs(cache_dir, exist_ok=True)
    return cache_dir


def _files(path: str, fmt: str) -> list[str]:
    if fmt == "criteo_binary":
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Invalid path: {path!r} is not a folder of day_<k>_*.npy "
                                    "files (TorchRec's preprocessed Criteo layout)")
        days = sorted(glob.glob(os.path.join(path, "day_*_sparse.npy")),
                      key=lambda p: int(re.findall(r"day_(\d+)_sparse", p)[-1]))
        if not days:
            raise FileNotFoundError(f"Invalid path: {path!r} holds no day_<k>_sparse.npy")
        return days
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Invalid path: {path!r} does not exist")
    return [path]


def _key(files: list[str], *parts) -> str:
    h = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(json.dumps([_VERSION, *parts]).encode())
    return h.hexdigest()[:20]


def _save_json(path: str, payload) -> None:
    with atomic_write(path, "w") as f:
        json.dump(payload, f)


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # absent or unreadable: rebuilt (a cache, not a source of truth)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the stack
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None, leave=False)


# --------------------------------------------------------------------------- text formats
def _line_index(path: str, cache_dir: str | None) -> dict:
    """``{"lines": N, "offsets": [byte offset of line 0, K, 2K, ...]}`` of a text file (a line
    is what ``for raw in file`` yields). One pass in 16 MiB chunks; cached."""
    cache = os.path.join(_cache_dir(cache_dir), f"index-{_key([path], 'index')}.json")
    found = _load_json(cache)
    if found is not None:
        return found
    offsets, lines, pos, last = [0], 0, 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            start = 0
            while True:
                i = chunk.find(b"\n", start)
                if i < 0:
                    break
                lines += 1
                if lines % _INDEX_EVERY == 0:
                    offsets.append(pos + i + 1)
                start = i + 1
            pos += len(chunk)
            last = chunk[-1:]
    if pos and last != b"\n":
        lines += 1  # a last line without a newline
    index = {"lines": lines, "offsets": offsets}
    _save_json(cache, index)
    return index


def _pair(token: str, lines: _Lines, what: str, parts: int) -> list[str]:
    pieces = token.split(":")
    if len(pieces) != parts:
        raise lines.error(f"{what} {token!r} is not {'idx:val' if parts == 2 else 'field:idx:val'}")
    return pieces


def _value(v: str, token: str, lines: _Lines) -> float:
    return finite_number(v, lines, f"value of {token!r}")


def _svm_label(value: str, lines: _Lines) -> float:
    return 0.0 if value in ("-1", "-1.0") else 1.0 if value == "+1" else _label(value, lines)


def _parse_libsvm(line: str, lines: _Lines, _fields: int | None):
    parts = line.split()
    if not parts:
        raise lines.error("empty line (expected: label idx:val ...)")
    ids, vals = [], []
    for tok in parts[1:]:
        idx, val = _pair(tok, lines, "feature", 2)
        if not idx.isdigit():
            raise lines.error(f"feature {tok!r}: index {idx!r} is not a non-negative integer")
        ids.append(idx)
        vals.append(_value(val, tok, lines))
    return _svm_label(parts[0], lines), [ids], [vals]


def _parse_libffm(line: str, lines: _Lines, fields: int | None):
    parts = line.split()
    if not parts:
        raise lines.error("empty line (expected: label field:idx:val ...)")
    per: dict[int, tuple[list[str], list[float]]] = {}
    for tok in parts[1:]:
        field, idx, val = _pair(tok, lines, "feature", 3)
        if not (field.isdigit() and idx.isdigit()):
            raise lines.error(f"feature {tok!r}: field and index must be non-negative integers")
        f = int(field)
        if fields is not None and f >= fields:
            raise lines.error(f"feature {tok!r}: field {f} >= num_fields {fields}")
        ids, vals = per.setdefault(f, ([], []))
        ids.append(idx)
        vals.append(_value(val, tok, lines))
    n = fields if fields is not None else (max(per) + 1 if per else 0)
    return (_svm_label(parts[0], lines), [per.get(f, ([], []))[0] for f in range(n)],
            [per.get(f, ([], []))[1] for f in range(n)])


class _Text:
    """Lines ``[first, first + count)`` of the data (header excluded) parsed to
    ``(label, tokens, values)``: one token per field and ``None`` (criteo, avazu), or per field a
    list of tokens and a list of values (libsvm, libffm)."""

    def __init__(self, path: str, fmt: str, index: dict, fields: int | None):
        self.path, self.fmt, self.index, self.fields = path, fmt, index, fields
        self.header = 1 if fmt == "avazu" else 0
        self.layout = None
        if fmt == "avazu":
            head = _Lines(path, "Avazu", count=1)
            self.layout = AvazuLayout(next(csv.reader(head), None), head)

    @property
    def rows(self) -> int:
        return max(self.index["lines"] - self.header, 0)

    def read(self, first: int, count: int) -> Iterator[tuple]:
        if count <= 0:
            return
        physical = first + self.header
        k = physical // _INDEX_EVERY
        lines = _Lines(self.path, _NAMES[self.fmt], offset=self.index["offsets"][k],
                       line=k * _INDEX_EVERY, count=physical - k * _INDEX_EVERY + count)
        it = iter(lines)
        for _ in range(physical - k * _INDEX_EVERY):  # skip to the shard's first line
            next(it)
        if self.fmt == "criteo":
            for line in it:
                label, tokens = criteo_tokens(line, lines)
                yield label, tokens, None
        elif self.fmt == "avazu":
            for row in csv.reader(it):
                label, tokens = self.layout.tokens(row, lines)
                yield label, tokens, None
        else:
            parse = _parse_libsvm if self.fmt == "libsvm" else _parse_libffm
            for line in it:
                yield parse(line, lines, self.fields)


class _Binary:
    """Rows of TorchRec's preprocessed Criteo days, as ``(label, tokens, None)``."""

    def __init__(self, days: list[str], chunk_rows: int):
        from torchrec.datasets.criteo import BinaryCriteoUtils

        self.utils = BinaryCriteoUtils
        self.days = [(d, d.replace("_sparse.npy", "_dense.npy"),
                      d.replace("_sparse.npy", "_labels.npy")) for d in days]
        self.counts = []
        for sparse, dense, labels in self.days:
            for f in (dense, labels):
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"Invalid Criteo binary folder: {f!r} is missing")
            shapes = [tuple(self.utils.get_shape_from_npy(f)) for f in (sparse, dense, labels)]
            if len({s[0] for s in shapes}) != 1 or shapes[0][1] != 26 or shapes[1][1] != 13:
                raise ValueError(f"Invalid Criteo binary file {sparse!r}: shapes {shapes} "
                                 "(expected [N, 26] sparse, [N, 13] dense, [N, 1] labels)")
            self.counts.append(shapes[0][0])
        self.chunk_rows = chunk_rows

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def read(self, first: int, count: int) -> Iterator[tuple]:
        start = 0
        for (sparse, dense, labels), n in zip(self.days, self.counts):
            lo, hi = max(first, start), min(first + count, start + n)
            row = lo - start
            while row < hi - start:
                m = min(self.chunk_rows, hi - start - row)
                s = self.utils.load_npy_range(sparse, row, m)
                d = self.utils.load_npy_range(dense, row, m)
                y = self.utils.load_npy_range(labels, row, m)
                buckets = d.astype("float64") / math.log(2)
                for r in range(m):
                    label = float(y[r, 0])
                    if label not in (0.0, 1.0):
                        raise ValueError(f"Invalid Criteo binary file {labels!r}, row {row + r}: "
                                         f"label {label} is not 0 or 1")
                    tokens = [int(math.floor(v)) if math.isfinite(v) else -1 for v in buckets[r]]
                    yield label, tokens + [int(v) for v in s[r]], None
                row += m
            start += n


# --------------------------------------------------------------------------- the data set
class StreamingCTRDataset(IterableDataset):
    """A CTR file (or folder) read as a stream, split by rank and ``DataLoader`` worker.

    Args:
        path: the file (a folder of ``day_<k>_*.npy`` for ``criteo_binary``).
        fmt: one of ``FORMATS``.
        min_count: vocabulary pass: values seen fewer times share id 0 (ignored with
            ``hash_size``).
        hash_size: hash every field's values into this many ids (an int, or one per field)
            instead of a vocabulary pass.
        num_fields: libffm fields (default: one more than the largest field number, from the
            vocabulary pass; required with ``hash_size``).
        part: ``(a, b)``, the share of the data lines to read: ``(0, 0.8)`` the head for
            training, ``(0.8, 1)`` the tail for validation.
        rank, world_size: this process's place (default: ``torch.distributed``'s when
            initialised, else ``0, 1``); :meth:`set_rank` changes them.
        even: every rank gets ``floor(n / world_size)`` lines (the same number of steps).
        shuffle_buffer: shuffle within a buffer of this many samples (0: file order).
        seed: the buffer shuffle's seed (with the rank and worker).
        cache_dir: where the index and vocabulary are cached (default
            ``$XDG_CACHE_HOME/lightning_sgl``).
        chunk_rows: rows read at once from the binary layout.
        vocabulary: share the vocabulary of another instance over the same file (its
            ``vocabulary``), e.g. the validation part of a training set.
    """

    def __init__(self, path: str, fmt: str, *, min_count: int = 1,
                 hash_size: int | list[int] | None = None, num_fields: int | None = None,
                 part: tuple[float, float] = (0.0, 1.0), rank: int | None = None,
                 world_size: int | None = None, even: bool = False, shuffle_buffer: int = 0,
                 seed: int = 0, cache_dir: str | None = None, chunk_rows: int = 4096,
                 vocabulary: list[dict] | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"Invalid fmt: {fmt!r} (valid options: {', '.join(FORMATS)})")
        if not (isinstance(min_count, int) and min_count >= 1):
            raise ValueError(f"Invalid min_count: {min_count!r} (an integer >= 1)")
        sizes = [hash_size] if isinstance(hash_size, int) else hash_size
        if sizes is not None and not all(isinstance(h, int) and h >= 1 for h in sizes):
            raise ValueError(f"Invalid hash_size: {hash_size!r} (a positive integer or a list)")
        if not (len(part) == 2 and 0.0 <= part[0] < part[1] <= 1.0):
            raise ValueError(f"Invalid part: {part!r} (expected (a, b) with 0 <= a < b <= 1)")
        if fmt == "libffm" and hash_size is not None and num_fields is None:
            raise ValueError("Invalid num_fields: None (libffm with hash_size needs num_fields)")
        if shuffle_buffer < 0:
            raise ValueError(f"Invalid shuffle_buffer: {shuffle_buffer} (>= 0)")
        self.path, self.fmt, self.min_count, self.part = path, fmt, min_count, tuple(part)
        self.even, self.shuffle_buffer, self.seed = even, shuffle_buffer, seed
        self.cache_dir = cache_dir
        self._one_hot = fmt in ("criteo", "avazu", "criteo_binary")
        files = _files(path, fmt)
        if fmt == "criteo_binary":
            self._source = _Binary(files, chunk_rows)
        else:
            if os.path.getsize(path) == 0:
                raise ValueError(f"Invalid {_NAMES[fmt]} file {path!r}, line 1: the file is empty")
            self._source = _Text(path, fmt, _line_index(path, cache_dir), num_fields)
        self._files = files
        if sizes is not None:
            self.vocabulary = None
            n = num_fields if fmt == "libffm" else {"criteo": 39, "criteo_binary": 39,
                                                    "libsvm": 1}.get(fmt)
            if n is None:  # avazu: from the header
                n = len(self._source.layout.names) + 2
            if len(sizes) == 1:
                sizes = sizes * n
            if len(sizes) != n:
                raise ValueError(f"Invalid hash_size: {len(sizes)} sizes for {n} fields")
            self.vocab_sizes = list(sizes)
            if fmt == "libffm":
                self._source.fields = n
        else:
            self.vocabulary = vocabulary if vocabulary is not None else self._build_vocabulary()
            self.vocab_sizes = [len(v) + 1 for v in self.vocabulary]
            if fmt == "libffm":
                self._source.fields = len(self.vocabulary)
        self._hash = sizes
        total = self._source.rows
        self.first, self.stop = int(total * self.part[0]), int(total * self.part[1])
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        self.set_rank(rank if rank is not None else (dist.get_rank() if on else 0),
                      world_size if world_size is not None else (dist.get_world_size() if on
                                                                 else 1))

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def set_rank(self, rank: int, world_size: int) -> None:
        """Read the share of rank ``rank`` of ``world_size`` (a data module calls it in
        ``setup``, where the trainer knows its place)."""
        if not (0 <= rank < world_size):
            raise ValueError(f"Invalid rank: {rank} (valid: [0, {world_size}))")
        self.rank, self.world_size = rank, world_size

    def rank_range(self) -> tuple[int, int]:
        """``(first line, line count)`` of this rank's share of the part."""
        n = self.stop - self.first
        if self.even:
            each = n // self.world_size
            return self.first + self.rank * each, each
        lo = self.first + self.rank * n // self.world_size
        return lo, self.first + (self.rank + 1) * n // self.world_size - lo

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (all workers together)."""
        return self.rank_range()[1]

    # ---------------------------------------------------------------- vocabulary
    def _build_vocabulary(self) -> list[dict]:
        """Per field ``{value: id}`` with ids ``1..n`` for values seen ``>= min_count`` times,
        in order of first appearance. One pass over every line; cached."""
        key = _key(self._files, self.fmt, self.min_count, "vocab")
        cache = os.path.join(_cache_dir(self.cache_dir), f"vocab-{key}.json")
        found = _load_json(cache)
        if found is None:
            counts: list[Counter] = []
            bar = _progress(sum(os.path.getsize(f) for f in self._files),
                            f"vocabulary of {os.path.basename(self.path)}")
            done = 0
            one_hot = self._one_hot
            for i, (_, tokens, _) in enumerate(self._source.read(0, self._source.rows)):
                while len(counts) < len(tokens):  # libffm: fields appear as they come
                    counts.append(Counter())
                if one_hot:
                    for c, t in zip(counts, tokens):
                        c[t] += 1
                else:
                    for c, ts in zip(counts, tokens):
                        c.update(ts)
                if bar is not None and i % 65536 == 65535:
                    pos = int(bar.total * (i + 1) / max(self._source.rows, 1))
                    bar.update(pos - done)
                    done = pos
            if bar is not None:
                bar.close()
            found = [[v for v, n in c.items() if n >= self.min_count] for c in counts]
            _save_json(cache, found)
        return [{v: i + 1 for i, v in enumerate(values)} for values in found]

    @staticmethod
    def _hashed(t, h: int) -> int:
        return t % h if isinstance(t, int) else zlib.crc32(t.encode()) % h

    def _encode(self, f: int, tokens: list) -> list[int]:
        if self._hash is not None:
            return [self._hashed(t, self._hash[f]) for t in tokens]
        vocab = self.vocabulary[f] if f < len(self.vocabulary) else {}
        return [vocab.get(t, 0) for t in tokens]

    # ---------------------------------------------------------------- iteration
    def _samples(self, first: int, count: int):
        if self._one_hot:  # one token per field: one pass over the fields per sample
            hashes, vocab = self._hash, self.vocabulary
            for label, tokens, _ in self._source.read(first, count):
                ids = ([self._hashed(t, h) for t, h in zip(tokens, hashes)] if hashes is not None
                       else [v.get(t, 0) for v, t in zip(vocab, tokens)])
                yield (torch.tensor(ids, dtype=torch.long),
                       torch.tensor(label, dtype=torch.float32))
            return
        for label, tokens, values in self._source.read(first, count):
            y = torch.tensor(label, dtype=torch.float32)
            ids = [self._encode(f, ts) for f, ts in enumerate(tokens)]
            flat_vals = [v for vs in values for v in vs]
            weights = None if all(v == 1.0 for v in flat_vals) else torch.tensor(
                flat_vals, dtype=torch.float32)
            yield Bags(torch.tensor([len(i) for i in ids], dtype=torch.long),
                       torch.tensor([i for fi in ids for i in fi], dtype=torch.long), weights), y

    def __iter__(self):
        first, count = self.rank_range()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        lo = first + worker * count // workers
        hi = first + (worker + 1) * count // workers
        samples = self._samples(lo, hi - lo)
        if not self.shuffle_buffer:
            yield from samples
            return
        rng = random.Random(hash((self.seed, self.rank, worker)))
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf
