"""Serving export: the kept rows of each table in FBGEMM's inference TBE, behind an id remap.

After Group-lasso training most rows are exactly zero, and rows that no batch ever touched were
never trained. A served table holds only its **kept rows** -- rows that were *seen* in training
(the kernel's ``<table>.seen`` flags) *and* are non-zero -- moved to the front; every other id
(deleted by the l21 penalty, or never seen) maps to ``-1`` in FBGEMM's per-table
``index_remapping`` array and contributes a zero row. Never-seen rows are zero by definition in
the export (their weights are their random initialisation, not a learned value).

The tables run in ``IntNBitTableBatchedEmbeddingBagsCodegen`` (FBGEMM's inference TBE, the kernel
under TorchRec's quantized ``EmbeddingBagCollection``), in ``fp32``, ``fp16``, ``int8`` or ``int4``
(row-wise quantised with an fp16 scale and bias per row, as FBGEMM and TorchRec quantise them).
:class:`ServingEmbeddingBagCollection` takes and returns what an ``EmbeddingBagCollection`` does
(``KeyedJaggedTensor`` -> ``KeyedTensor``, same keys in the same order), so it replaces the
trained model's EBC; the model then passes ``torch.jit.script`` (the path of TorchRec inference),
and :func:`save_serving` writes the scripted model atomically. A serving process needs only
``torch``, ``fbgemm_gpu`` and ``torchrec`` (for the ``KeyedJaggedTensor`` input)::

    import fbgemm_gpu, torch                      # registers FBGEMM's operators
    model = torch.jit.load("model.pt")            # or torchrec_ext.serving.load_serving

Sources (:func:`export_serving`): a ``torch.distributed.checkpoint`` directory (a
``TorchRecStrategy`` checkpoint or any DCP save holding ``...embedding_bags.<table>.weight`` and,
optionally, the fused optimizer's ``<table>.seen``) -- only those tensors are read, and the files
holding them are checked against the checkpoint's manifest when it has one -- or weights in
memory (an ``EmbeddingBagCollection``, sharded ones gathered to rank 0, or ``{table: weight}``
with optional seen flags).

Cost: the export is O(rows held) once (a scan for kept rows, the quantisation of kept rows).
Serving memory per table: ``kept x row bytes`` (fp32 ``4d``, fp16 ``2d``, int8 ``d + 4``, int4
``d/2 + 4``; FBGEMM packs rows on CPU, pads them to 16 bytes on GPU, and aligns each table to
128 bytes) plus the remap array, 4 bytes per original row (per feature of the table). Lookup:
O(ids) -- a range check, one remap read and one row read per id.

Reference: FBGEMM ``split_table_batched_embeddings_ops_inference`` (``index_remapping``,
``pruned_array_lookup``); TorchRec ``torchrec.quant.embedding_modules``.
"""

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import fbgemm_gpu  # noqa: F401  (registers the FBGEMM operators the inference TBE calls)
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
)
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

__all__ = ["DATA_TYPES", "row_bytes", "served_table_bytes", "ServingTable",
           "ServingEmbeddingBagCollection", "kept_rows", "read_checkpoint_tables", "gather_tables",
           "export_serving", "save_serving", "load_serving"]

#: the data types a served table can have, with their bits per element
DATA_TYPES = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
FORMAT = "lightning_sgl.serving/1"
_EXTRA = "lightning_sgl_serving.json"


@dataclass
class ServingTable:
    """One table to serve: its layout and the kept rows' ids (sorted) and fp32 weights.

    Args:
        name: the table name (``EmbeddingBagConfig.name``).
        feature_names: the features that look it up.
        pooling: ``"sum"`` or ``"mean"``.
        num_embeddings: rows of the trained table (the id range served).
        ids: int64 ``[kept]`` ids of the kept rows, strictly increasing.
        weights: float32 ``[kept, dim]`` their weights.
    """

    name: str
    feature_names: list[str]
    pooling: str  # "sum" | "mean"
    num_embeddings: int
    ids: Tensor  # int64 [kept], strictly increasing
    weights: Tensor  # float32 [kept, dim]

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])


def row_bytes(dim: int, data_type="fp32") -> int:
    """Bytes of one served row: fp32 ``4d``, fp16 ``2d``, int8 ``d + 4``, int4 ``d/2 + 4`` (the
    4 bytes: an fp16 scale and bias)."""
    bits = DATA_TYPES[_data_type(data_type)]
    return dim * bits // 8 + (4 if bits < 16 else 0)


def served_table_bytes(kept: int, num_embeddings: int, dim: int, features: int = 1,
                       data_type="fp32") -> int:
    """Bytes one table takes in a :class:`ServingEmbeddingBagCollection` (what its ``nbytes``
    adds up): the kept rows packed and aligned to 128 bytes (FBGEMM's CPU layout) plus one
    int32 remap entry per original row per feature. O(1)."""
    weights = kept * row_bytes(dim, data_type)
    return -(-weights // 128) * 128 + 4 * num_embeddings * features


def _data_type(data_type) -> str:
    """``"int8"``, ``DataType.INT8`` or ``SparseType.INT8`` -> ``"int8"``."""
    name = getattr(data_type, "name", data_type)
    key = str(name).lower()
    if key not in DATA_TYPES:
        raise ValueError(f"Invalid data_type: {data_type!r} (valid options: "
                         f"{', '.join(DATA_TYPES)})")
    return key


def kept_rows(weight: Tensor, seen: Tensor | None = None) -> Tensor:
    """Sorted int64 ids of the rows to serve: non-zero and (when ``seen`` is given) seen.

    Args:
        weight: ``[num_embeddings, dim]`` table.
        seen: ``[num_embeddings]`` flags (any dtype; non-zero = seen in training), or ``None``
            for a table without them (then every non-zero row is kept).
    """
    if weight.dim() != 2:
        raise ValueError(f"Invalid weight: shape {tuple(weight.shape)} (expected [rows, dim])")
    keep = weight.detach().ne(0).any(dim=1)
    if seen is not None:
        if seen.shape != (weight.shape[0],):
            raise ValueError(f"Invalid seen: shape {tuple(seen.shape)} (expected "
                             f"[{weight.shape[0]}], one flag per row)")
        keep &= seen.detach().to(keep.device).ne(0)
    return keep.nonzero().view(-1).to(torch.int64).cpu()


def _configs(tables) -> list:
    """``EmbeddingBagConfig`` list from an EBC (``embedding_bag_configs()``; a sharded EBC keeps
    them in ``_embedding_bag_configs``) or a list."""
    if hasattr(tables, "embedding_bag_configs"):
        return list(tables.embedding_bag_configs())
    if isinstance(getattr(tables, "_embedding_bag_configs", None), list):
        return list(tables._embedding_bag_configs)
    configs = list(tables)
    if not configs or not all(hasattr(c, "name") and hasattr(c, "feature_names")
                              for c in configs):
        raise ValueError("Invalid tables: expected an EmbeddingBagCollection or a non-empty list "
                         "of EmbeddingBagConfig")
    return configs


def _pooling(config) -> str:
    pooling = config.pooling.name.lower()
    if pooling not in ("sum", "mean"):
        raise ValueError(f"Invalid pooling of table {config.name!r}: {pooling!r} (valid options: "
                         "sum, mean)")
    return pooling


# --------------------------------------------------------------------------- checkpoint reading
def _matches(keys, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [k for k in keys if rx.search(k)]


def read_checkpoint_tables(path: str | os.PathLike, names: Sequence[str]
                           ) -> dict[str, tuple[Tensor, Tensor | None]]:
    """``{table: (weight, seen or None)}`` from a DCP checkpoint directory, reading only those
    tensors (no optimizer moments, no process group).

    The weight is the tensor whose key ends in ``embedding_bags.<table>.weight`` outside the
    optimizer state; the seen flags are the fused optimizer's ``<table>.seen`` of that parameter.
    A checkpoint with a ``manifest.json`` (written by ``TorchRecStrategy``) has the files holding
    these tensors verified first (size and SHA-256), so a corrupt shard is refused naming its
    file. Cost: O(rows of the named tables) of loading and memory; the verification hashes the
    files that hold them, which with DCP's one file per rank also hold that rank's optimizer
    state (read, not loaded).

    Args:
        path: the checkpoint directory (``resolve``-d like ``TorchRecStrategy`` does: an
            interrupted publish is found at its ``.old`` name).
        names: the tables to read.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    import lightning_sgl.checkpoint as ckpt

    folder = ckpt.resolve(os.fspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Invalid checkpoint {folder!r}: not a directory")
    try:
        reader = FileSystemReader(folder)
        meta = reader.read_metadata()
    except Exception as err:
        raise ValueError(f"Invalid checkpoint {folder!r}: no readable DCP metadata "
                         f"({type(err).__name__}: {str(err)[:200]})") from err
    keys = list(meta.state_dict_metadata)
    wanted: dict[str, tuple[str, str | None]] = {}
    for name in names:
        n = re.escape(name)
        weight = [k for k in _matches(keys, rf"(^|[./])embedding_bags\.{n}\.weight$")
                  if "optimizer" not in k and "/state/" not in k and ".state." not in k]
        if len(weight) != 1:
            raise ValueError(f"Invalid checkpoint {folder!r}: table {name!r} weight found "
                             f"{len(weight)} times ({weight[:3]})")
        seen = _matches(keys, rf"embedding_bags\.{n}\.weight[./]{n}\.seen$")
        if len(seen) > 1:
            raise ValueError(f"Invalid checkpoint {folder!r}: table {name!r} seen flags found "
                             f"{len(seen)} times ({seen[:3]})")
        wanted[name] = (weight[0], seen[0] if seen else None)
    fqns = {k for pair in wanted.values() for k in pair if k is not None}
    if os.path.exists(os.path.join(folder, ckpt.MANIFEST)):
        files = sorted({info.relative_path for idx, info in meta.storage_data.items()
                        if idx.fqn in fqns} | {".metadata"})
        ckpt.verify(folder, [f for f in files if f in ckpt.read_manifest(folder)["files"]])
    state = {}
    for fqn in fqns:
        md = meta.state_dict_metadata[fqn]
        state[fqn] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {name: (state[w], state[s] if s is not None else None)
            for name, (w, s) in wanted.items()}


def _sharded(t) -> bool:
    return type(t).__name__ in ("ShardedTensor", "DTensor")


def _is_sharded_ebc(module) -> bool:
    return isinstance(module, nn.Module) and hasattr(module, "fused_optimizer") and any(
        _sharded(v) for v in module.state_dict().values())


def gather_tables(sharded, dst: int = 0) -> dict[str, tuple[Tensor, Tensor | None]] | None:
    """Full weights and seen flags of a sharded EBC (trained by a fused Group optimizer) on rank
    ``dst``; ``None`` on the other ranks. Collective: every rank of the EBC's process group calls
    it, with the same ``dst``. Memory on ``dst``: the full tables (as in TorchRec's
    ``state_dict`` consolidation). O(rows held) of communication.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    weights = sharded.state_dict()
    # seen flags: a rank holds only the tables it has shards of, so the pieces travel in one
    # gather_object (every rank takes part, whatever it holds)
    pieces: dict[str, list[tuple[int, Tensor]]] = {}
    for per_param in sharded.fused_optimizer.state_dict()["state"].values():
        for key, value in per_param.items():
            if key.endswith(".seen"):
                name = key[:-len(".seen")]
                pieces[name] = ([(int(sh.metadata.shard_offsets[0]), sh.tensor.detach().clone())
                                 for sh in value.local_shards()] if _sharded(value)
                                else [(0, value.detach().clone())])
    gathered = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(pieces, gathered, dst=dst)

    found = {}
    for c in _configs(sharded):  # the same order on every rank: one gather per table
        w = weights[f"embedding_bags.{c.name}.weight"]
        full = torch.empty(tuple(w.size()), dtype=w.dtype) if rank == dst else None
        if _sharded(w):
            w.gather(dst=dst, out=full)
        elif rank == dst:
            full.copy_(w.detach())
        seen = None
        if rank == dst:
            parts = [p for g in gathered for p in g.get(c.name, [])]
            if parts:
                seen = torch.zeros(c.num_embeddings, dtype=parts[0][1].dtype)
                for offset, flags in parts:
                    seen[offset:offset + len(flags)] = flags
        found[c.name] = (full, seen)
    return found if rank == dst else None


# --------------------------------------------------------------------------- the serving module
def _quantize(weights: Tensor, data_type: str) -> tuple[Tensor, Tensor | None]:
    """FBGEMM's row layout of ``weights`` (fp32 [n, d]): ``(data bytes, scale-bias bytes)``."""
    if data_type == "fp32":
        return weights.contiguous().view(torch.uint8), None
    if data_type == "fp16":
        return weights.half().contiguous().view(torch.uint8), None
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(
        weights.contiguous(), DATA_TYPES[data_type])
    return q[:, :-4], q[:, -4:]


class ServingEmbeddingBagCollection(nn.Module):
    """An ``EmbeddingBagCollection`` for serving: kept rows only, in FBGEMM's inference TBE.

    ``forward(KeyedJaggedTensor) -> KeyedTensor`` with the keys and widths of the trained EBC, in
    its order; an id that is not kept contributes a zero row (mean pooling still counts it, as the
    trained EBC does); an id outside ``[0, num_embeddings)`` raises ``ValueError`` naming the
    feature. Scriptable
    (``torch.jit.script``). Build it with :func:`export_serving`.

    Args:
        tables: the tables (one :class:`ServingTable` each, in the trained EBC's order).
        data_type: ``"fp32"``, ``"fp16"``, ``"int8"`` or ``"int4"`` (TorchRec ``DataType`` and
            FBGEMM ``SparseType`` members are accepted too).
        is_weighted: the input KJT carries per-id weights (a weighted EBC).

    Attributes:
        kept: ``{table: kept rows}``; num_embeddings: ``{table: rows of the trained table}``;
        nbytes: bytes of the served tables (rows as stored by FBGEMM + remap arrays).
    """

    # the attribute types TorchScript reads (this module does not use ``from __future__ import
    # annotations``: TorchScript cannot resolve string annotations of class attributes)
    kept: dict[str, int]
    num_embeddings: dict[str, int]
    _group_features: list[list[str]]
    _group_rows: list[list[int]]
    _keys: list[str]
    _lengths: list[int]
    _placed: list[list[int]]

    def __init__(self, tables: Sequence[ServingTable], data_type="fp32",
                 is_weighted: bool = False) -> None:
        super().__init__()
        dtype = _data_type(data_type)
        tables = list(tables)
        if not tables:
            raise ValueError("Invalid tables: empty (at least one table to serve)")
        bits = DATA_TYPES[dtype]
        for t in tables:  # validate everything before building anything
            if t.weights.dim() != 2 or t.ids.shape != (t.weights.shape[0],):
                raise ValueError(f"Invalid table {t.name!r}: ids [kept] and weights [kept, dim] "
                                 "must have the same length")
            if bits < 8 and t.dim % (8 // bits):
                raise ValueError(f"Invalid data_type {dtype!r} for table {t.name!r}: dim {t.dim} "
                                 f"is not a multiple of {8 // bits}")
            if len(t.ids) and (bool((t.ids[1:] <= t.ids[:-1]).any()) or int(t.ids[0]) < 0
                               or int(t.ids[-1]) >= t.num_embeddings):
                raise ValueError(f"Invalid table {t.name!r}: ids must be strictly increasing in "
                                 f"[0, {t.num_embeddings})")
            if not bool(torch.isfinite(t.weights).all()):
                raise ValueError(f"Invalid table {t.name!r}: non-finite weights")
        self.data_type = dtype
        self.is_weighted = is_weighted
        self.kept = {t.name: len(t.ids) for t in tables}
        self.num_embeddings = {t.name: t.num_embeddings for t in tables}
        groups: dict[str, list[ServingTable]] = {}
        for t in tables:
            groups.setdefault(t.pooling, []).append(t)
        sparse_type = getattr(SparseType, dtype.upper())
        modes = {"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}
        tbes = []
        #: per TBE, its features in its order; per output key, (TBE, column start, width)
        self._group_features = []
        self._group_rows = []
        placed: dict[str, tuple[int, int, int]] = {}
        nbytes = 0
        for g, (pooling, members) in enumerate(groups.items()):
            specs, feature_map, features, remaps, qweights = [], [], [], [], []
            col = 0
            for i, t in enumerate(members):
                specs.append((t.name, len(t.ids), t.dim, sparse_type, EmbeddingLocation.HOST))
                remap = torch.full((t.num_embeddings,), -1, dtype=torch.int32)
                remap[t.ids] = torch.arange(len(t.ids), dtype=torch.int32)
                remaps.append(remap)
                qweights.append(_quantize(t.weights.float().cpu(), dtype))
                for f in t.feature_names:
                    feature_map.append(i)
                    features.append(f)
                    placed[f] = (g, col, t.dim)
                    col += t.dim
            tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
                specs, feature_table_map=feature_map, index_remapping=remaps,
                pooling_mode=modes[pooling], device="cpu", output_dtype=SparseType.FP32,
                bounds_check_mode=BoundsCheckMode.FATAL)
            if len(feature_map) > len(members):
                # a table shared by several features: FBGEMM 1.8 indexes the remap offsets by
                # *feature* but builds them per table, so give every feature its own copy of its
                # table's remap (4 more bytes per row per extra feature) and its row count
                tbe.set_index_remappings_array([remaps[i] for i in feature_map])
                tbe.original_rows_per_table = torch.tensor(
                    [members[i].num_embeddings for i in feature_map], dtype=torch.int64)
            tbe.initialize_weights()
            tbe.assign_embedding_weights(qweights)
            nbytes += tbe.weights_host.numel() + tbe.index_remappings_array.numel() * 4
            tbes.append(tbe)
            self._group_features.append(features)
            self._group_rows.append([members[i].num_embeddings for i in feature_map])
        self.tbes = nn.ModuleList(tbes)
        self.nbytes = int(nbytes)
        self._keys = [f for t in tables for f in t.feature_names]
        self._lengths = [t.dim for t in tables for _ in t.feature_names]
        self._placed = [list(placed[f]) for f in self._keys]
        self._single = len(tbes) == 1

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``KeyedJaggedTensor`` -> ``KeyedTensor`` (one pooled ``[B, dim]`` block per key)."""
        keys = features.keys()
        outs: list[Tensor] = []
        for g, tbe in enumerate(self.tbes):
            order: list[int] = [keys.index(f) for f in self._group_features[g]]
            kjt = features.permute(order)
            values = kjt.values()
            bound = torch.repeat_interleave(
                torch.tensor(self._group_rows[g], dtype=values.dtype),
                torch.tensor(kjt.length_per_key()), output_size=values.numel())
            bad = (values < 0) | (values >= bound)
            if bool(bad.any()):  # O(ids); FBGEMM's own check would only say "idx < num_rows"
                at = int(bad.nonzero()[0])
                f = int((torch.tensor(kjt.length_per_key()).cumsum(0) <= at).sum())
                raise ValueError("Invalid id " + str(int(values[at])) + " in feature '"
                                 + self._group_features[g][f] + "' (valid: [0, "
                                 + str(self._group_rows[g][f]) + "))")
            per_sample = kjt.weights_or_none() if self.is_weighted else None
            outs.append(tbe(values, kjt.offsets().to(values.dtype), per_sample))
        if self._single:
            values = outs[0]
        else:
            values = torch.cat([outs[p[0]][:, p[1]:p[1] + p[2]] for p in self._placed], dim=1)
        return KeyedTensor(keys=self._keys, length_per_key=self._lengths, values=values)


# --------------------------------------------------------------------------- export, save, load
def export_serving(tables, *, checkpoint: str | os.PathLike | None = None,
                   weights: Mapping[str, Tensor] | None = None,
                   seen: Mapping[str, Tensor] | None = None, data_type="fp32",
                   is_weighted: bool | None = None) -> ServingEmbeddingBagCollection | None:
    """The serving EBC of trained tables: kept rows (non-zero and seen) in FBGEMM's inference TBE.

    Args:
        tables: the trained model's ``EmbeddingBagCollection`` (its weights are used when
            neither ``checkpoint`` nor ``weights`` is given; a sharded one is gathered with
            :func:`gather_tables` -- a collective, the module is returned on rank 0 and ``None``
            on the others) or its ``EmbeddingBagConfig`` list: table names, feature names,
            pooling.
        checkpoint: a DCP checkpoint directory to read the weights and seen flags from (see
            :func:`read_checkpoint_tables`).
        weights: ``{table: [num_embeddings, dim]}`` weights in memory.
        seen: ``{table: [num_embeddings] flags}`` for in-memory weights; a table without flags
            keeps every non-zero row.
        data_type: ``"fp32"`` | ``"fp16"`` | ``"int8"`` | ``"int4"``.
        is_weighted: the EBC takes per-id weights (default: ``tables.is_weighted()`` or False).

    Returns:
        A :class:`ServingEmbeddingBagCollection` to put in place of the model's EBC (``None`` on
        the ranks other than 0 when ``tables`` is sharded).
    """
    dtype = _data_type(data_type)
    if checkpoint is not None and weights is not None:
        raise ValueError("Invalid arguments: checkpoint and weights are both given (pass one)")
    if seen is not None and weights is None:
        raise ValueError("Invalid seen: only with weights (a checkpoint holds its own flags)")
    configs = _configs(tables)
    names = [c.name for c in configs]
    if is_weighted is None:
        is_weighted = bool(tables.is_weighted()) if hasattr(tables, "is_weighted") else False
    if checkpoint is not None:
        pairs = read_checkpoint_tables(checkpoint, names)
    elif weights is None and _is_sharded_ebc(tables):
        pairs = gather_tables(tables)
        if pairs is None:
            return None
    else:
        if weights is None:
            if not isinstance(tables, nn.Module) or not hasattr(tables, "embedding_bags"):
                raise ValueError("Invalid arguments: give checkpoint= or weights= with a config "
                                 "list (there are no weights in it)")
            weights = {n: tables.embedding_bags[n].weight for n in names}
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"Invalid weights: no table {missing[0]!r} (tables: "
                             f"{', '.join(names)})")
        pairs = {n: (weights[n], (seen or {}).get(n)) for n in names}
    out = []
    for c in configs:
        w, flags = pairs[c.name]
        if not isinstance(w, Tensor) or w.is_meta or type(w).__name__ in ("ShardedTensor",
                                                                          "DTensor"):
            raise ValueError(f"Invalid weights of table {c.name!r}: {type(w).__name__} (a full, "
                             "unsharded tensor; export a sharded model from its checkpoint)")
        if tuple(w.shape) != (c.num_embeddings, c.embedding_dim):
            raise ValueError(f"Invalid weights of table {c.name!r}: shape {tuple(w.shape)} "
                             f"(the config says [{c.num_embeddings}, {c.embedding_dim}])")
        ids = kept_rows(w, flags)
        out.append(ServingTable(c.name, list(c.feature_names), _pooling(c), c.num_embeddings,
                                ids, w.detach().cpu().float()[ids].clone()))
    return ServingEmbeddingBagCollection(out, data_type=dtype, is_weighted=is_weighted)


def _serving_modules(model: nn.Module) -> list[ServingEmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, ServingEmbeddingBagCollection)]


def save_serving(model: nn.Module, path: str | os.PathLike) -> int:
    """Script ``model`` (``torch.jit.script``) and write it to ``path`` atomically (a temporary
    file in the same folder, fsync, rename); returns the file's size in bytes.

    The file carries a ``lightning_sgl_serving.json`` record (format, per table kept rows, rows,
    data type) that :func:`load_serving` checks. Scripting happens before anything is written,
    so a model that does not script leaves no file. TorchScript is the format TorchRec
    inference serves (``torch.export`` cannot trace FBGEMM's inference TBE: its ``AtomicCounter``
    script object has no fake class), so torch's deprecation notice for ``torch.jit`` is not
    repeated here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated",
                                category=DeprecationWarning)
        scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model)
    info = {"format": FORMAT, "tables": {}}
    for m in _serving_modules(model) if not isinstance(model, torch.jit.ScriptModule) else []:
        for name, kept in m.kept.items():
            info["tables"][name] = {"kept": kept, "rows": m.num_embeddings[name],
                                    "data_type": m.data_type}
    import lightning_sgl.checkpoint as ckpt

    path = os.fspath(path)
    with ckpt.atomic_write(path) as f, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated",
                                category=DeprecationWarning)
        torch.jit.save(scripted, f, _extra_files={_EXTRA: json.dumps(info)})
    return os.path.getsize(path)


def load_serving(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load a file written by :func:`save_serving`; anything else (garbage, truncated, another
    TorchScript file) raises ``ValueError`` naming the path. A serving process that should not
    import this package loads the file with ``import fbgemm_gpu; torch.jit.load(path)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Invalid serving file {path!r}: does not exist")
    extra = {_EXTRA: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated",
                                    category=DeprecationWarning)
            module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise ValueError(f"Invalid serving file {path!r}: not readable ({type(err).__name__}: "
                         f"{str(err)[:200]})") from err
    try:
        info = json.loads(extra[_EXTRA] or "{}")
    except ValueError:
        info = {}
    if info.get("format") != FORMAT:
        raise ValueError(f"Invalid serving file {path!r}: format {info.get('format')!r} "
                         f"(expected {FORMAT!r}; write it with save_serving)")
    return module
