"""Compact serving tables: only the non-zero rows of each table plus an id map.

After Group-lasso training most rows are exactly zero. ``export_compact`` keeps, per table, the
sorted ids of the non-zero rows and their weights; ``CompactEmbeddingBagCollection`` looks ids up
with a binary search (an id that is not kept - deleted or never trained to non-zero - gets a zero
row), so pooled outputs, hence predictions, equal the full tables'. It can replace the
``EmbeddingBagCollection`` of the trained model for serving.

File format (``torch.save``, read with ``load_compact``)::

    {"format": "lightning_sgl.compact/1",
     "tables": {name: {"ids": int64 [n_kept] (sorted), "weights": [n_kept, dim],
                       "num_embeddings": int, "feature_names": [str], "pooling": "sum"|"mean"}}}

``export_from_checkpoint`` builds it from a ``torch.distributed.checkpoint`` directory (a
``TorchRecStrategy`` checkpoint or any DCP save of the model's ``state_dict``) without a process
group or the training job.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["CompactTable", "CompactEmbeddingBagCollection", "export_compact", "save_compact",
           "load_compact", "export_from_checkpoint", "table_weights_from_checkpoint"]

FORMAT = "lightning_sgl.compact/1"


@dataclass
class CompactTable:
    ids: Tensor  # sorted int64 ids of the kept (non-zero) rows
    weights: Tensor  # [n_kept, dim]
    num_embeddings: int
    feature_names: list[str]
    pooling: str = "sum"

    @property
    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size() + \
            self.weights.numel() * self.weights.element_size()


def _table_info(ebc) -> dict[str, tuple[list[str], str]]:
    """name -> (feature names, pooling) from an EBC (sharded or not) or a list of configs."""
    configs = getattr(ebc, "_embedding_bag_configs", None)
    if configs is None and hasattr(ebc, "embedding_bag_configs"):
        configs = ebc.embedding_bag_configs()
    if configs is None:
        configs = ebc
    return {c.name: (list(c.feature_names), c.pooling.name.lower()) for c in configs}


def export_compact(weights: dict[str, Tensor], configs) -> dict[str, CompactTable]:
    """Compact tables from full weights ``{table: [num_embeddings, dim]}`` and the EBC's table
    configs (``EmbeddingBagConfig`` list, or the EBC itself)."""
    info = _table_info(configs)
    out = {}
    for name, w in weights.items():
        w = w.detach().cpu()
        keep = w.ne(0).any(dim=1).nonzero().view(-1)
        feats, pooling = info[name]
        out[name] = CompactTable(keep.to(torch.int64), w[keep].clone(), w.shape[0], feats,
                                 pooling)
    return out


def save_compact(tables: dict[str, CompactTable], path: str) -> dict[str, int]:
    """Write the documented format atomically (temporary file in the same folder, fsync,
    rename); returns ``{"compact_bytes", "full_bytes"}``."""
    payload = {"format": FORMAT, "tables": {
        n: {"ids": t.ids, "weights": t.weights, "num_embeddings": t.num_embeddings,
            "feature_names": t.feature_names, "pooling": t.pooling} for n, t in tables.items()}}
    # atomic: a crash leaves the previous file or the new one, never a truncated mix
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".compact-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    full = sum(t.num_embeddings * t.weights.shape[1] * t.weights.element_size()
               for t in tables.values())
    return {"compact_bytes": sum(t.nbytes for t in tables.values()), "full_bytes": full}


def load_compact(path: str) -> CompactEmbeddingBagCollection:
    """Read a file written by :func:`save_compact`; a file that is not one (garbage, truncated,
    another format, inconsistent tables) raises ``ValueError`` naming the path."""
    try:
        payload = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling errors of every kind
        raise ValueError(f"Invalid compact file {path!r}: not readable ({type(err).__name__}: "
                         f"{str(err)[:200]})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"Invalid compact file {path!r}: format {fmt!r} (expected {FORMAT!r})")
    tables = {}
    for name, t in payload.get("tables", {}).items():
        ids, w = t.get("ids"), t.get("weights")
        if not (torch.is_tensor(ids) and torch.is_tensor(w) and ids.dim() == 1 and w.dim() == 2
                and len(ids) == len(w)):
            raise ValueError(f"Invalid compact file {path!r}: table {name!r} needs ids [n] and "
                             "weights [n, dim] of the same length")
        if len(ids) and (bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0
                         or int(ids[-1]) >= int(t["num_embeddings"])):
            raise ValueError(f"Invalid compact file {path!r}: table {name!r} ids must be strictly "
                             f"increasing in [0, {t['num_embeddings']})")
        tables[name] = CompactTable(**t)
    return CompactEmbeddingBagCollection(tables)


class CompactEmbeddingBagCollection(nn.Module):
    """Drop-in serving replacement of an ``EmbeddingBagCollection`` holding only kept rows."""

    def __init__(self, tables: dict[str, CompactTable]) -> None:
        super().__init__()
        self._names = list(tables)
        self._features: list[tuple[str, str]] = []  # (feature, table)
        self._pooling: dict[str, str] = {}
        for i, (name, t) in enumerate(tables.items()):
            self.register_buffer(f"ids_{i}", t.ids)
            self.register_buffer(f"weights_{i}", t.weights)
            self._pooling[name] = t.pooling
            self._features += [(f, name) for f in t.feature_names]
        self._dims = {n: t.weights.shape[1] for n, t in tables.items()}
        self._num = {n: t.num_embeddings for n, t in tables.items()}

    def _table(self, name: str) -> tuple[Tensor, Tensor]:
        i = self._names.index(name)
        return getattr(self, f"ids_{i}"), getattr(self, f"weights_{i}")

    def lookup(self, name: str, ids: Tensor) -> Tensor:
        """Rows for ``ids`` (zero rows for ids that are not kept)."""
        kept, weights = self._table(name)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self._num[name]):
            raise ValueError(f"ids out of range for table {name!r} (valid [0, {self._num[name]}))")
        pos = torch.searchsorted(kept, ids).clamp(max=max(len(kept) - 1, 0))
        hit = (kept[pos] == ids) if len(kept) else torch.zeros_like(ids, dtype=torch.bool)
        rows = weights[pos] if len(kept) else torch.zeros(len(ids), self._dims[name])
        return torch.where(hit.unsqueeze(1), rows, torch.zeros_like(rows))

    def forward(self, features):
        """``KeyedJaggedTensor`` -> ``KeyedTensor`` pooled per feature, as the EBC does."""
        from torchrec.sparse.jagged_tensor import KeyedTensor

        jt = features.to_dict()
        values, keys, lengths = [], [], []
        for feat, table in self._features:
            j = jt[feat]
            ln = j.lengths()
            bag = torch.repeat_interleave(torch.arange(len(ln)), ln)
            rows = self.lookup(table, j.values().long())
            w = j.weights_or_none()
            if w is not None:
                rows = rows * w.unsqueeze(1)
            pooled = torch.zeros(len(ln), self._dims[table], dtype=rows.dtype)
            pooled.index_add_(0, bag, rows)
            if self._pooling[table] == "mean":
                pooled = pooled / ln.clamp(min=1).unsqueeze(1).to(pooled.dtype)
            values.append(pooled)
            keys.append(feat)
            lengths.append(self._dims[table])
        return KeyedTensor(keys=keys, length_per_key=lengths, values=torch.cat(values, dim=1))


def table_weights_from_checkpoint(path: str, tables: Iterable[str]) -> dict[str, Tensor]:
    """Full table weights from a DCP checkpoint directory (no process group needed)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(path, out)
        state = torch.load(out, weights_only=False)
    flat: dict[str, Tensor] = {}

    def walk(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif torch.is_tensor(obj):
            flat[prefix] = obj

    walk(state)
    found = {}
    for name in tables:
        keys = [k for k in flat if k.endswith(f"embedding_bags.{name}.weight")]
        if len(keys) != 1:
            raise ValueError(f"Invalid checkpoint {path!r}: table {name!r} found {len(keys)} times "
                             f"({keys[:3]})")
        found[name] = flat[keys[0]]
    return found


def export_from_checkpoint(path: str, configs, out_path: str) -> dict[str, int]:
    """Compact tables from a DCP checkpoint, saved to ``out_path``; returns the byte counts."""
    names = list(_table_info(configs))
    return save_compact(export_compact(table_weights_from_checkpoint(path, names), configs),
                        out_path)
