"""``GroupTBE``: table-batched embedding bags trained by a fused Group optimizer (pure PyTorch).

The layout mirrors FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen``: one flat weight buffer for
all tables of a kernel with per-table offsets, flat optimizer state with the same offsets
(element-wise state) or one float per row (row-wise state), and a forward that takes the
TBE-style ``(indices, offsets, per_sample_weights)``.

The forward (pooled lookup) runs FBGEMM's own CPU TBE forward on the flat weights (same layout)
for float32 CPU tables, ``embedding_bag`` elsewhere. The update happens inside backward and
touches only the rows present in the batch:

    grad_output -> per-bag gradient -> per-index gradient (x per-sample weight, / bag length for
    MEAN) -> unique rows -> :func:`~lightning_sgl.optim._functional.accumulate_rows_`: summed
    per row, ``group_step`` (the same function the ``torch.optim`` classes call), rows and their
    ``seen`` flags written back in place -- one compiled loop nest with ``compiled=True``
    (AOTInductor on CPU, ``torch.compile`` on CUDA)

No weight gradient is ever materialised. The math is :func:`lightning_sgl.optim._functional.group_step`;
nothing here re-implements it.

One id per bag without per-sample weights (the common CTR case) takes a *batch-major* plan: the
rows are ordered like the output ``[B, F * width]``, so the output gradient is the per-index
gradient as it is (no transposes, no per-index gather).

Storage order groups tables by their local width, so that every run of equal-width tables (a
*segment*) is one ``[rows, width]`` matrix: one vectorised update per segment and step.

Column shards: a table split by columns over several shards holds only part of every group
(row). ``set_column_groups`` gives each column-sharded table the process group of its shards;
the per-row partial sums of squares (group norm, row-wise second moment) are then all-reduced
over that group, so the result equals the unsharded table's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_sgl.optim._functional import accumulate_rows_, group_norms, reprox
from lightning_sgl.optim._moments import get_rule
from lightning_sgl.optim._validation import (
    NONFINITE_OPTIONS,
    NonFiniteGradientError,
    check_betas,
    check_bool,
    check_choice,
    check_lambdas,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)

__all__ = ["TableSpec", "GroupTBE", "FUSED_RULES", "COMPILE_MIN_WEIGHTS", "validate_hyperparameters"]

#: ``compiled=None`` compiles the update of kernels with at least this many weights (4 MiB fp32)
COMPILE_MIN_WEIGHTS = 1 << 20

#: base optimizers that can run fused (AdaHessian needs a Hessian-vector product: keep dense)
FUSED_RULES = ("sgd", "momentum", "adagrad", "adam", "amsgrad")

_DEFAULTS = {
    "sgd": dict(lr=1e-2),
    "momentum": dict(lr=1e-2, momentum=0.9),
    "adagrad": dict(lr=1e-2, eps=1e-10, lr_decay=0.0, initial_accumulator_value=0.0),
    "adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
    "amsgrad": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
}


def validate_hyperparameters(rule: str, hp: dict) -> None:
    """Raise ``ValueError`` naming the argument and its valid range (same checks as torch.optim
    front end)."""
    check_choice("optimizer", rule, FUSED_RULES)
    check_positive("lr", hp["lr"])
    check_lambdas(hp["lambda1"], hp["lambda21"], hp["lambda2"])
    if "betas" in hp:
        check_betas(hp["betas"])
    if "eps" in hp:
        check_nonnegative("eps", hp["eps"])
    if "momentum" in hp:
        check_unit_interval("momentum", hp["momentum"])
    if "lr_decay" in hp:
        check_nonnegative("lr_decay", hp["lr_decay"])
    if "initial_accumulator_value" in hp:
        check_nonnegative("initial_accumulator_value", hp["initial_accumulator_value"])


@dataclass(frozen=True)
class TableSpec:
    """One local (shard of a) table. ``embedding_dim`` is the full width of the table's rows."""

    name: str
    local_rows: int
    local_cols: int
    embedding_dim: int | None = None
    row_offset: int = 0
    col_offset: int = 0

    @property
    def full_dim(self) -> int:
        return self.embedding_dim or self.local_cols

    @property
    def column_sharded(self) -> bool:
        return self.full_dim != self.local_cols


class _Segment:
    """A run of tables of equal local width, stored as one ``[rows, width]`` block."""

    def __init__(self, width: int, tables: list[int], row_base: dict[int, int], rows: int,
                 elem_start: int, row_start: int):
        self.width = width
        self.tables = tables  # table indices (config order), storage order
        self.row_base = row_base  # table index -> first row inside the segment
        self.rows = rows
        self.elem_start = elem_start  # element offset in the flat buffers
        self.row_start = row_start  # row offset in the flat row-wise buffers
        #: names of the column-sharded tables in this segment, sorted (collective order)
        self.column_tables: list[str] = []


def _fbgemm_forward_op():
    """FBGEMM's CPU TBE forward (pooled lookup), if this FBGEMM build registers it."""
    try:
        import fbgemm_gpu  # noqa: F401  (registers the fbgemm ops)

        return torch.ops.fbgemm.split_embedding_codegen_forward_cpu
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover
        return None


_FBGEMM_FORWARD = _fbgemm_forward_op()


def unique_rows(rows: Tensor, sorted: bool = False) -> tuple[Tensor, Tensor]:
    """``(unique rows, inverse)`` of a batch's row ids. On CPU through NumPy's quicksort-based
    ``unique`` (2-3x faster than ``torch.unique`` for a few thousand ids; the result is sorted
    either way), elsewhere ``torch.unique``."""
    if rows.device.type == "cpu":
        u, inv = np.unique(rows.numpy(), return_inverse=True)
        return torch.from_numpy(u), torch.from_numpy(inv.reshape(-1))
    return torch.unique(rows, sorted=sorted, return_inverse=True)


class GroupTBE(nn.Module):
    """Table-batched embedding bags with a fused Group optimizer.

    Args:
        tables: local tables (or shards), in the order features refer to them.
        feature_table_map: for each feature, the index of its table in ``tables``.
        pooling: ``"sum"`` or ``"mean"``.
        optimizer: base optimizer: one of :data:`FUSED_RULES`.
        hyperparameters: ``lr``, ``lambda1``, ``lambda21``, ``lambda2`` and the base optimizer's
            own (``betas``, ``eps``, ``momentum``, ``lr_decay``, ``initial_accumulator_value``);
            missing ones take the ``torch.optim`` front end's defaults.
        rowwise: one second moment per row (FBGEMM's row-wise layout).
        exact_group_norm: the exact minimiser of objective (6) instead of Algorithm 1's norm.
        nonfinite: ``"raise"`` (a NaN/Inf gradient raises, nothing is modified) or ``"skip"``.
        compiled: run the update compiled (AOTInductor on CPU, ``torch.compile`` on CUDA; eager
            is the ground truth). ``None``
            (default): compile when the kernel holds at least :data:`COMPILE_MIN_WEIGHTS`
            weights, where the one-off compile (seconds, at the first backward) pays.
    """

    def __init__(self, tables: Sequence[TableSpec], feature_table_map: Sequence[int],
                 pooling: str = "sum", optimizer: str = "adam", hyperparameters: dict | None = None,
                 rowwise: bool = False, exact_group_norm: bool = False, nonfinite: str = "raise",
                 compiled: bool | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if optimizer not in FUSED_RULES:
            raise ValueError(
                f"Invalid optimizer: {optimizer!r} cannot run fused on an embedding table "
                f"(valid: {', '.join(FUSED_RULES)}); keep that table dense (compute kernel "
                "'dense' or data-parallel) and train it with the torch.optim Group optimizer")
        check_choice("pooling", pooling, ("sum", "mean"))
        check_choice("nonfinite", nonfinite, NONFINITE_OPTIONS)
        check_bool("rowwise", rowwise)
        check_bool("exact_group_norm", exact_group_norm)
        self.rule = get_rule(optimizer)
        if rowwise and not self.rule.second_moment_names:
            raise ValueError(f"Invalid rowwise: True (optimizer {optimizer!r} has no second moment)")
        hp = {**_DEFAULTS[optimizer], "lambda1": 0.0, "lambda21": 0.0, "lambda2": 0.0,
              **(hyperparameters or {})}
        unknown = set(hp) - set(_DEFAULTS[optimizer]) - {"lambda1", "lambda21", "lambda2"}
        if unknown:
            raise ValueError(f"Invalid hyperparameters for {optimizer!r}: {sorted(unknown)} "
                             f"(valid: lr, lambda1, lambda21, lambda2, "
                             f"{', '.join(k for k in _DEFAULTS[optimizer] if k != 'lr')})")
        if isinstance(hp.get("betas"), list):
            hp["betas"] = tuple(hp["betas"])
        validate_hyperparameters(optimizer, hp)
        self.optimizer = optimizer
        self.hp = hp
        self.pooling = pooling
        self.rowwise = rowwise
        self.exact = exact_group_norm
        self.nonfinite = nonfinite
        if compiled is not None:
            check_bool("compiled", compiled)
        self.compiled = compiled
        self.tables = list(tables)
        self.feature_table_map = list(feature_table_map)
        if any(not 0 <= t < len(self.tables) for t in self.feature_table_map):
            raise ValueError("feature_table_map refers to a table index out of range")
        #: hyperparameters are read from here at each update (the fused optimizer's param group)
        self.hp_provider: Callable[[], dict] | None = None
        self._column_groups: dict[str, dist.ProcessGroup | None] = {}
        self._column_owners: dict[str, int] = {}
        #: per-table lambda21 overriding the param group's (set by a tuner, e.g. SparsityMonitor)
        self.table_lambda21: dict[str, float] = {}

        # ---- layout: tables sorted (stably) by local width; equal widths form a segment
        order = sorted(range(len(self.tables)), key=lambda i: self.tables[i].local_cols)
        self.weights_offsets = [0] * len(self.tables)
        self.row_offsets = [0] * len(self.tables)  # into the flat row-wise buffers
        self.segment_of: list[int] = [0] * len(self.tables)
        self.segments: list[_Segment] = []
        elem, row = 0, 0
        for i in order:
            t = self.tables[i]
            if not self.segments or self.segments[-1].width != t.local_cols:
                self.segments.append(_Segment(t.local_cols, [], {}, 0, elem, row))
            seg = self.segments[-1]
            seg.row_base[i] = seg.rows
            seg.tables.append(i)
            seg.rows += t.local_rows
            self.segment_of[i] = len(self.segments) - 1
            self.weights_offsets[i] = elem
            self.row_offsets[i] = row
            elem += t.local_rows * t.local_cols
            row += t.local_rows
        self._check_column_shards()
        for seg in self.segments:
            seg.column_tables = sorted({self.tables[i].name for i in seg.tables
                                        if self.tables[i].column_sharded})

        kw = dict(device=device, dtype=dtype)
        self.register_buffer("weights", torch.zeros(elem, **kw))
        self.register_buffer("dual", torch.zeros(elem, **kw))
        init = float(hp.get("initial_accumulator_value", 0.0))
        self.state_names = tuple(self.rule.state_names)
        for name in self.state_names:
            n = row if (rowwise and name in self.rule.second_moment_names) else elem
            self.register_buffer(name, torch.full((n,), init if name == "sum" else 0.0, **kw))
        self.register_buffer("step", torch.zeros(1, dtype=torch.float64, device=device))
        #: 1 byte per row: the row was seen in a training batch
        self.register_buffer("seen", torch.zeros(row, dtype=torch.uint8, device=device))
        self._dummy = torch.zeros((), requires_grad=True, device=device)

        # per-feature static data
        self._feature_dims = [self.tables[t].local_cols for t in self.feature_table_map]
        self._single_segment = len(self.segments) == 1

    # ------------------------------------------------------------------ layout helpers
    def _check_column_shards(self) -> None:
        widths: dict[str, set[int]] = {}
        for t in self.tables:
            if t.column_sharded:
                widths.setdefault(t.name, set()).add(t.local_cols)
        for name, w in widths.items():
            if len(w) > 1:
                raise ValueError(f"column shards of table {name!r} on one rank have different "
                                 f"widths {sorted(w)}; use equal column shards")

    def _is_rowwise(self, name: str) -> bool:
        return self.rowwise and name in self.rule.second_moment_names

    def _seg_view(self, buf: Tensor, seg: _Segment, rowwise: bool = False) -> Tensor:
        if rowwise:
            return buf[seg.row_start: seg.row_start + seg.rows].view(seg.rows, 1)
        return buf[seg.elem_start: seg.elem_start + seg.rows * seg.width].view(seg.rows, seg.width)

    def _compile_update(self) -> bool:
        if self.compiled is None:
            return self.weights.numel() >= COMPILE_MIN_WEIGHTS
        return self.compiled

    def _update_views(self, seg: _Segment) -> tuple[Tensor, ...]:
        """``(weights, dual, seen, *states)`` views of a segment, cached across steps (rebuilt
        when a buffer was replaced, e.g. by ``.to()``)."""
        bufs = (self.weights, self.dual, self.seen, *(getattr(self, n) for n in self.state_names))
        cache = self.__dict__.setdefault("_view_cache", {})
        views = cache.get(id(seg))
        if views is None or any(v._base is not b for v, b in zip(views, bufs)):
            views = cache[id(seg)] = (
                self._seg_view(self.weights, seg), self._seg_view(self.dual, seg),
                self._seg_view(self.seen, seg, rowwise=True).view(-1),
                *(self._seg_view(getattr(self, n), seg, self._is_rowwise(n))
                  for n in self.state_names))
        return views

    def _table_view(self, buf: Tensor, i: int, rowwise: bool = False) -> Tensor:
        t = self.tables[i]
        if rowwise:
            return buf[self.row_offsets[i]: self.row_offsets[i] + t.local_rows]
        off = self.weights_offsets[i]
        return buf[off: off + t.local_rows * t.local_cols].view(t.local_rows, t.local_cols)

    # ------------------------------------------------------------------ FBGEMM-like API
    def split_embedding_weights(self) -> list[Tensor]:
        """Per-table ``[local_rows, local_cols]`` views of the flat weights (they alias it)."""
        return [self._table_view(self.weights, i) for i in range(len(self.tables))]

    def get_optimizer_state(self) -> list[dict[str, Tensor]]:
        """Per table: ``{"dual": [rows, cols], <moment>: [rows, cols] or [rows] (row-wise)}``;
        views that alias the kernel's buffers (loading into them is in place)."""
        out = []
        for i in range(len(self.tables)):
            d = {"dual": self._table_view(self.dual, i)}
            for name in self.state_names:
                d[name] = self._table_view(getattr(self, name), i, self._is_rowwise(name))
            out.append(d)
        return out

    def get_learning_rate(self) -> float:
        return float(self.current_hyperparameters()["lr"])

    def set_learning_rate(self, lr: float) -> None:
        self.update_hyper_parameters({"lr": lr})

    def set_optimizer_step(self, step: int) -> None:
        self.step.fill_(float(step))

    def update_hyper_parameters(self, params: dict) -> None:
        """Set hyperparameters (validated first; nothing changes on error)."""
        new = {**self.hp, **{k: v for k, v in params.items() if k in self.hp}}
        validate_hyperparameters(self.optimizer, new)
        self.hp = new

    def current_hyperparameters(self) -> dict:
        """The values the next update uses (from ``hp_provider`` if set), validated."""
        if self.hp_provider is not None:
            src = self.hp_provider()
            hp = {k: src.get(k, v) for k, v in self.hp.items()}
            if isinstance(hp.get("betas"), list):
                hp["betas"] = tuple(hp["betas"])
            # validate only when a value changed (this runs at every update)
            key = tuple(tuple(float(e) for e in v) if isinstance(v, tuple) else float(v)
                        for v in hp.values())
            cached = self.__dict__.get("_validated_hp")
            if cached is not None and cached[0] == key:
                return cached[1]
            validate_hyperparameters(self.optimizer, hp)
            self.__dict__["_validated_hp"] = (key, hp)
            return hp
        return self.hp

    def set_column_groups(self, groups: dict[str, dist.ProcessGroup | None],
                          owners: dict[str, int] | None = None) -> None:
        """Process group of every column-sharded table's shards (``None``: all shards are on this
        rank) and the global rank of its column-offset-0 shard (owner of row-wise state)."""
        self._column_groups = dict(groups)
        self._column_owners = dict(owners or {})

    def row_seen_view(self, i: int) -> Tensor:
        """The ``seen`` flags (uint8) of local table ``i``, a view of the kernel buffer."""
        return self._table_view(self.seen, i, rowwise=True)

    @torch.no_grad()
    def sync_column_shards(self) -> None:
        """Copy row-wise state from each column-sharded table's column-offset-0 shard to its other
        shards (after a checkpoint load, which fills only the owner's copy). Collective."""
        rowwise_names = [n for n in self.state_names if self._is_rowwise(n)] + ["seen"]
        names = sorted({t.name for t in self.tables if t.column_sharded})
        for name in names:
            local = [i for i, t in enumerate(self.tables) if t.name == name]
            owner = next((i for i in local if self.tables[i].col_offset == 0), None)
            for state in rowwise_names:
                buf = getattr(self, state)
                src = self._table_view(buf, owner if owner is not None else local[0], True)
                pg = self._column_groups.get(name)
                if pg is not None:
                    dist.broadcast(src, src=self._column_owners[name], group=pg)
                for i in local:
                    dst = self._table_view(buf, i, True)
                    if dst.data_ptr() != src.data_ptr():
                        dst.copy_(src)

    # ------------------------------------------------------------------ forward
    def forward(self, indices: Tensor, offsets: Tensor,
                per_sample_weights: Tensor | None = None) -> Tensor:
        """Pooled lookup. ``indices``: ids local to each feature's table, feature-major;
        ``offsets``: ``F*B + 1`` bag offsets. Returns ``[B, sum of feature widths]``."""
        n_features = len(self.feature_table_map)
        if n_features == 0:
            return torch.zeros(0, 0, device=self.weights.device, dtype=self.weights.dtype)
        if (offsets.numel() - 1) % n_features != 0:
            raise ValueError(f"offsets has {offsets.numel()} entries; expected F*B+1 with "
                             f"F={n_features} features")
        batch = (offsets.numel() - 1) // n_features
        # FBGEMM's forward checks the ids itself (then ours runs only to word the error)
        fbgemm = self._fbgemm_forward_applies(per_sample_weights)
        plan = self._plan(indices.long(), offsets.long(), batch, per_sample_weights is None,
                          check_ids=not fbgemm)
        plan["fbgemm_forward"] = fbgemm
        return _GroupLookup.apply(self._dummy, self, plan, per_sample_weights)

    def _plan(self, indices: Tensor, offsets: Tensor, batch: int, unweighted: bool = False,
              check_ids: bool = True) -> dict:
        """Per segment: rows (segment-local), bag ids, tables; ids validated.

        ``lengths`` is ``None`` when every bag holds exactly one id (the common CTR case): then
        the bag of index ``k`` is ``k`` and no per-index bookkeeping is built. If moreover all
        tables have one width and there are no per-sample weights, the plan is *batch-major*:
        rows are ordered like the output ``[B, F * width]``, so the lookup is one gather into
        the output and the output gradient is the per-index gradient, without transposes."""
        st = self._bag_static(batch, indices.device)
        n_features = len(self.feature_table_map)
        n_bags = n_features * batch
        lengths = None
        if not (indices.numel() == n_bags and torch.equal(offsets, st["arange"])):
            lengths = offsets[1:] - offsets[:-1]
        batch_major = self._single_segment and lengths is None and unweighted
        if batch_major:  # [B, F] order, like the output
            ids = indices.view(n_features, batch).t()
            bag, table, limits, base = st["bags"], st["table_bm"], st["limit_bm"], st["base_bm"]
        elif lengths is None:
            ids, bag, table, limits, base = indices, st["bags"], st["table"], st["limit"], st["base"]
        else:
            ids, bag = indices, torch.repeat_interleave(st["bags"], lengths)
            table, limits, base = st["table"][bag], st["limit"][bag], st["base"][bag]
        if check_ids:
            self._check_ids(ids, limits, table)
        rows = (base + ids).view(-1)
        if self._single_segment:
            segs = [dict(features=list(range(len(self.feature_table_map))), sel=None, rows=rows,
                         bag=bag, table=table, identity_bag=lengths is None,
                         batch_major=batch_major)]
        else:
            feature = st["feature"] if lengths is None else st["feature"][bag]
            segs = []
            for feats, fmask, pos in st["segments"]:
                sel = fmask[feature]
                # local bag id: position of the feature inside the segment, times batch
                seg_bag = pos[feature[sel]] * batch + bag[sel] % batch
                segs.append(dict(features=feats, sel=sel, rows=rows[sel], bag=seg_bag,
                                 table=table[sel], identity_bag=False, batch_major=False))
        return dict(batch=batch, lengths=lengths, segments=segs, bag=bag, offsets=offsets,
                    indices=indices, id_check=(ids, limits, table))

    def _check_ids(self, ids: Tensor, limits: Tensor, table: Tensor) -> None:
        """Raise ``ValueError`` naming the table if an id is outside ``[0, limit)``."""
        # 0 <= id < limit  <=>  id | (limit - 1 - id) >= 0: one reduction for both bounds
        if not ids.numel() or int(torch.bitwise_or(limits - 1 - ids, ids).min()) >= 0:
            return
        ids, limits, table = ids.reshape(-1), limits.reshape(-1), table.reshape(-1)
        k = int(((ids < 0) | (ids >= limits)).nonzero()[0, 0])
        t = self.tables[int(table[k])]
        raise ValueError(
            f"ids out of range for table {t.name!r}: got id {int(ids[k])}, valid "
            f"[0, {t.local_rows}) on this shard; remap or hash ids into the table's "
            "num_embeddings before the lookup")

    def _bag_static(self, batch: int, device) -> dict:
        """Per-bag constants for a batch size (cached): bag ids, each bag's feature, table, row
        limit and segment row base, and each segment's feature mask and positions."""
        cache = self.__dict__.setdefault("_bag_cache", {})
        key = (batch, str(device))
        st = cache.get(key)
        if st is None:
            n_features = len(self.feature_table_map)
            ftm = torch.tensor(self.feature_table_map, device=device)
            limits = torch.tensor([t.local_rows for t in self.tables], device=device)
            base = torch.tensor([self.segments[self.segment_of[i]].row_base[i]
                                 for i in range(len(self.tables))], device=device)
            feature = torch.arange(n_features, device=device).repeat_interleave(batch)
            table = ftm[feature]
            segments = []
            for s in range(len(self.segments)):
                feats = [f for f, t in enumerate(self.feature_table_map) if self.segment_of[t] == s]
                fmask = torch.zeros(n_features, dtype=torch.bool, device=device)
                fmask[feats] = True
                pos = torch.full((n_features,), -1, dtype=torch.long, device=device)
                pos[feats] = torch.arange(len(feats), device=device)
                segments.append((feats, fmask, pos))
            st = cache[key] = dict(
                arange=torch.arange(n_features * batch + 1, device=device),
                bags=torch.arange(n_features * batch, device=device), feature=feature,
                table=table, limit=limits[table], base=base[table], segments=segments,
                table_bm=table.view(n_features, batch).t().reshape(-1))
            for k in ("limit", "base"):  # batch-major [B, F] copies
                st[k + "_bm"] = st[k].view(n_features, batch).t().contiguous()
        return st

    def _bag_scale(self, plan, seg_plan, weights_sel):
        """Per-index factor: per-sample weight, divided by the bag length for MEAN pooling."""
        scale = weights_sel
        if self.pooling == "mean" and plan["lengths"] is not None:  # else: one id per bag
            lengths = plan["lengths"]
            batch = plan["batch"]
            feats = torch.tensor(seg_plan["features"], device=lengths.device)
            bag_len = lengths.view(-1, batch)[feats].reshape(-1)[seg_plan["bag"]]
            inv = 1.0 / bag_len.clamp(min=1).to(self.weights.dtype)
            scale = inv if scale is None else scale * inv
        return scale

    def _fbgemm_forward(self, plan: dict, per_sample_weights: Tensor | None) -> Tensor | None:
        """FBGEMM's CPU TBE forward on our flat weights (same layout: table ``t`` at element
        offset ``weights_offsets[t]``, rows of width ``local_cols``), or ``None`` where it does
        not apply (not CPU float32, MEAN with per-sample weights, op missing). FBGEMM checks the
        ids; on its error our check names the table and the valid range."""
        if not plan.get("fbgemm_forward", False):
            return None
        st = self.__dict__.get("_fbgemm_static")
        if st is None:
            ftm = self.feature_table_map
            dims = [self.tables[t].local_cols for t in ftm]
            rows = [self.tables[t].local_rows for t in ftm]
            d_off = [0]
            for d in dims:
                d_off.append(d_off[-1] + d)
            hash_cumsum = [0]  # only its per-feature differences (= table rows) are read
            for r in rows:
                hash_cumsum.append(hash_cumsum[-1] + max(r, 1))
            st = self.__dict__["_fbgemm_static"] = (
                torch.tensor([self.weights_offsets[t] for t in ftm], dtype=torch.int64),
                torch.tensor(d_off, dtype=torch.int32), d_off[-1],
                torch.tensor(hash_cumsum, dtype=torch.int64))
        w_off, d_off, total_d, hash_cumsum = st
        w = (None if per_sample_weights is None  # None: undefined tensor = unweighted
             else per_sample_weights.detach().to(torch.float32).contiguous())
        try:
            return _FBGEMM_FORWARD(self.weights, w_off, d_off, total_d, hash_cumsum,
                                   plan["indices"], plan["offsets"],
                                   1 if self.pooling == "mean" else 0, w, 0)
        except RuntimeError:
            self._check_ids(*plan["id_check"])  # raises our error for an id out of range
            raise

    def _fbgemm_forward_applies(self, per_sample_weights: Tensor | None) -> bool:
        return (_FBGEMM_FORWARD is not None and self.weights.device.type == "cpu"
                and self.weights.dtype == torch.float32
                and (per_sample_weights is None or self.pooling == "sum"))

    def _pool(self, plan: dict, per_sample_weights: Tensor | None) -> Tensor:
        batch = plan["batch"]
        out = self._fbgemm_forward(plan, per_sample_weights)
        if out is not None:
            return out
        if plan["segments"][0]["batch_major"]:  # one id per bag: the pooled value is the row
            rows = plan["segments"][0]["rows"]
            table = self._seg_view(self.weights, self.segments[0])
            # embedding_bag with one id per bag: a gather (FBGEMM's prefetching kernel on CPU)
            return nn.functional.embedding_bag(rows, table, plan["offsets"], mode="sum",
                                               include_last_offset=True).view(batch, -1)
        outs = []
        for seg, sp in zip(self.segments, plan["segments"]):
            w = None
            if per_sample_weights is not None:
                w = per_sample_weights if sp["sel"] is None else per_sample_weights[sp["sel"]]
                w = w.to(self.weights.dtype)
            scale = self._bag_scale(plan, sp, w)
            table = self._seg_view(self.weights, seg)
            n_bags = len(sp["features"]) * batch
            offsets = plan["offsets"] if sp["sel"] is None else torch.cat(
                [sp["bag"].new_zeros(1), torch.bincount(sp["bag"], minlength=n_bags).cumsum(0)])
            pooled = nn.functional.embedding_bag(
                sp["rows"], table, offsets, mode="sum", per_sample_weights=scale,
                include_last_offset=True)
            outs.append(pooled.view(len(sp["features"]), batch, seg.width))
        if self._single_segment:
            o = outs[0]
            return o.transpose(0, 1).reshape(batch, -1)
        cols = []
        by_feature = {}
        for sp, o in zip(plan["segments"], outs):
            for k, f in enumerate(sp["features"]):
                by_feature[f] = o[k]
        for f in range(len(self.feature_table_map)):
            cols.append(by_feature[f])
        return torch.cat(cols, dim=1)

    def _bag_grads(self, plan: dict, grad_out: Tensor) -> list[Tensor]:
        """Per segment: gradient of each bag, ``[F_seg * B, width]``."""
        batch = plan["batch"]
        if self._single_segment:
            seg = self.segments[0]
            if plan["segments"][0]["batch_major"]:
                return [grad_out.reshape(-1, seg.width)]
            n = len(self.feature_table_map)
            return [grad_out.reshape(batch, n, seg.width).transpose(0, 1).reshape(-1, seg.width)]
        starts = [0]
        for d in self._feature_dims:
            starts.append(starts[-1] + d)
        out = []
        for seg, sp in zip(self.segments, plan["segments"]):
            parts = [grad_out[:, starts[f]: starts[f + 1]] for f in sp["features"]]
            out.append(torch.stack(parts, 0).reshape(-1, seg.width))
        return out

    # ------------------------------------------------------------------ backward = update
    def _segment_hp(self, hp: dict, seg: _Segment, row_tables: Tensor | None) -> dict:
        """``hp`` with a per-row ``lambda21`` if some table of the segment overrides it."""
        if not self.table_lambda21:
            return hp
        names = {self.tables[i].name for i in seg.tables}
        if not names & set(self.table_lambda21):
            return hp
        lam = torch.tensor([float(self.table_lambda21.get(t.name, hp["lambda21"]))
                            for t in self.tables], dtype=self.weights.dtype,
                           device=self.weights.device)
        return {**hp, "lambda21": lam[row_tables].unsqueeze(1)}

    def _reduce_for(self, seg: _Segment, uniq_tables: Tensor | None):
        """``(group_size, reduce_sum)`` for a segment's rows (column shards; else ``None``s)."""
        cw = seg.column_tables
        if not cw:
            return None, None
        full = torch.tensor([float(self.tables[i].full_dim) if i in seg.row_base else 0.0
                             for i in range(len(self.tables))], device=uniq_tables.device,
                            dtype=self.weights.dtype)
        group_size = full[uniq_tables].unsqueeze(1)
        by_name = {n: [i for i in seg.tables if self.tables[i].name == n] for n in cw}
        masks = {n: [uniq_tables == i for i in by_name[n]] for n in cw}
        groups = self._column_groups

        def reduce_sum(partial: Tensor) -> Tensor:
            out = partial.clone()
            for name in cw:  # sorted: the same collective order on every rank
                total = sum(partial[m] for m in masks[name])
                pg = groups.get(name)
                if pg is not None:
                    dist.all_reduce(total, group=pg)
                for m in masks[name]:
                    out[m] = total
            return out

        return group_size, reduce_sum

    @torch.no_grad()
    def _update(self, plan: dict, grad_out: Tensor, per_sample_weights: Tensor | None):
        hp = self.current_hyperparameters()
        bag_grads = self._bag_grads(plan, grad_out)
        work = []
        grad_w = None
        if per_sample_weights is not None and per_sample_weights.requires_grad:
            grad_w = torch.zeros_like(per_sample_weights)
        for seg, sp, gb in zip(self.segments, plan["segments"], bag_grads):
            w = None
            if per_sample_weights is not None:
                w = per_sample_weights if sp["sel"] is None else per_sample_weights[sp["sel"]]
                w = w.detach().to(self.weights.dtype)
            g_index = gb if sp["identity_bag"] else gb.index_select(0, sp["bag"])
            if grad_w is not None:  # d out / d weight_i = <grad_bag, row> (/ len for MEAN)
                mean_scale = self._bag_scale(plan, sp, None)
                rows_val = self._seg_view(self.weights, seg).index_select(0, sp["rows"])
                gw = (g_index * rows_val).sum(1)
                if mean_scale is not None:
                    gw = gw * mean_scale
                if sp["sel"] is None:
                    grad_w += gw.to(grad_w.dtype)
                else:
                    grad_w[sp["sel"]] += gw.to(grad_w.dtype)
            scale = self._bag_scale(plan, sp, w)
            if scale is not None:
                g_index = g_index * scale.unsqueeze(1)
            # sorted unique rows line column shards up across ranks; otherwise order is free
            uniq, inv = unique_rows(sp["rows"], sorted=bool(seg.column_tables))
            work.append((seg, uniq, inv, g_index, sp["table"]))
        # NaN/Inf: refuse (or drop the rows) before anything is written. A finite sum of squares
        # of all per-index gradients bounds every entry and every row sum: all finite.
        if work and not math.isfinite(sum(float(torch.dot(g.reshape(-1), g.reshape(-1)))
                                          for _, _, _, g, _ in work)):
            work = self._finite_rows(work)
        self.step += 1
        step = float(self.step.item())
        for seg, uniq, inv, g_index, index_tables in work:
            row_tables = None
            if seg.column_tables or self.table_lambda21:
                row_tables = self._row_tables(len(uniq), inv, index_tables)
            group_size, reduce_sum = self._reduce_for(seg, row_tables)
            x, dual, seen, *states = self._update_views(seg)
            seg_hp = self._segment_hp(hp, seg, row_tables)
            accumulate_rows_(x, uniq, inv, g_index, dual, states, seen, step=step, hp=seg_hp,
                             rule_name=self.optimizer, rowwise=self.rowwise, exact=self.exact,
                             compiled=self._compile_update() and seg_hp is hp,
                             group_size=group_size,
                             reduce_sum=reduce_sum)
        return grad_w

    @staticmethod
    def _row_tables(n: int, inv: Tensor, index_tables: Tensor) -> Tensor:
        """The table of each of ``n`` unique rows from the table of each index."""
        return torch.zeros(n, dtype=torch.long, device=inv.device).scatter_(0, inv, index_tables)

    def _finite_rows(self, work: list) -> list:
        """The slow path for a batch with NaN/Inf (or overflowing) gradients: sum each row's
        gradient; raise if a row sum is not finite (``nonfinite="raise"``), else keep only the
        finite rows (their gradients passed already summed)."""
        out, bad = [], set()
        for seg, uniq, inv, g_index, index_tables in work:
            g_rows = torch.zeros(len(uniq), seg.width, dtype=g_index.dtype,
                                 device=g_index.device).index_add_(0, inv, g_index)
            ok = torch.isfinite(g_rows).all(1)
            tables = self._row_tables(len(uniq), inv, index_tables)
            bad |= {self.tables[int(t)].name for t in tables[~ok]}
            n = int(ok.sum())
            out.append((seg, uniq[ok], torch.arange(n, device=uniq.device), g_rows[ok],
                        tables[ok]))
        if bad and self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite (NaN/Inf) gradient for rows of table(s) {sorted(bad)}; no weight or "
                "optimizer state was modified. Use nonfinite='skip' to skip such rows.")
        return out

    # ------------------------------------------------------------------ feature rate support
    @torch.no_grad()
    def feature_counts(self) -> dict[str, tuple[int, int]]:
        """Per table (summed over its local shards): ``(rows seen in training, seen rows that
        are non-zero)``, local to this rank. For a column-sharded table each shard counts its
        own columns' non-zero rows; ``row_nonzero`` gives the flags to combine across shards."""
        out: dict[str, tuple[int, int]] = {}
        for i, t in enumerate(self.tables):
            seen = self._table_view(self.seen, i, rowwise=True).bool()
            nz = self._table_view(self.weights, i).ne(0).any(dim=1)
            s, n = out.get(t.name, (0, 0))
            out[t.name] = (s + int(seen.sum()), n + int((seen & nz).sum()))
        return out

    @torch.no_grad()
    def row_flags(self, i: int) -> tuple[Tensor, Tensor]:
        """``(seen, non-zero)`` boolean flags of the rows of local table ``i``."""
        return (self._table_view(self.seen, i, rowwise=True).bool(),
                self._table_view(self.weights, i).ne(0).any(dim=1))

    def _seen_rows(self, seg: _Segment):
        rows = self._seg_view(self.seen, seg, rowwise=True).view(-1).nonzero().view(-1)
        tables = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
        for i in seg.tables:
            lo = seg.row_base[i]
            tables[(rows >= lo) & (rows < lo + self.tables[i].local_rows)] = i
        return rows, tables

    def _gather_state(self, seg: _Segment, rows: Tensor):
        x = self._seg_view(self.weights, seg)
        dual = self._seg_view(self.dual, seg)
        states = tuple(self._seg_view(getattr(self, n), seg, self._is_rowwise(n))
                       .index_select(0, rows) for n in self.state_names)
        return x, dual, states

    @torch.no_grad()
    def reapply_prox(self) -> None:
        """Re-apply the proximal step with the current hyperparameters to every seen row (so a
        changed ``lambda21`` also acts on rows the batches do not touch). Collective for
        column-sharded tables: call it on every rank."""
        hp = self.current_hyperparameters()
        step = max(float(self.step.item()), 1.0)
        for seg in self.segments:
            rows, tables = self._seen_rows(seg)
            group_size, reduce_sum = self._reduce_for(seg, tables)
            x, dual, states = self._gather_state(seg, rows)
            x_new, dual_new = reprox(x.index_select(0, rows), dual.index_select(0, rows), states,
                                     rule=self.rule, step=step,
                                     hp=self._segment_hp(hp, seg, tables), exact=self.exact,
                                     group_size=group_size, reduce_sum=reduce_sum)
            x.index_copy_(0, rows, x_new)
            dual.index_copy_(0, rows, dual_new)

    def _by_table(self, seg: _Segment, tables: Tensor, values: Tensor,
                  out: dict[str, list]) -> None:
        """Append each table's entries of ``values`` (one per seen row) to ``out[name]``; a
        column-sharded table's rows only from its column-offset-0 shard (reported once)."""
        for i in seg.tables:
            if self.tables[i].col_offset == 0:
                out.setdefault(self.tables[i].name, []).append(values[tables == i])

    def _seen_weight_norms(self, seg: _Segment):
        """``(rows, tables, full-row L2 norms)`` of a segment's seen rows (column shards
        summed: collective for them)."""
        rows, tables = self._seen_rows(seg)
        _, reduce_sum = self._reduce_for(seg, tables)
        x = self._seg_view(self.weights, seg).index_select(0, rows)
        sq = (x * x).sum(dim=1, keepdim=True)
        return rows, tables, torch.sqrt(reduce_sum(sq) if reduce_sum is not None else sq).view(-1)

    @torch.no_grad()
    def seen_row_norms(self) -> dict[str, Tensor]:
        """Per table: the shrink norms of its seen rows (``group_norms``; a row is zero after
        ``reapply_prox`` iff its norm <= sqrt(d) * lambda21, d the table's full width). A
        column-sharded table's rows are reported once, by its column-offset-0 shard. Collective
        for column-sharded tables."""
        hp = self.current_hyperparameters()
        step = max(float(self.step.item()), 1.0)
        out: dict[str, list] = {}
        for seg in self.segments:
            rows, tables = self._seen_rows(seg)
            _, reduce_sum = self._reduce_for(seg, tables)
            x, dual, states = self._gather_state(seg, rows)
            norms = group_norms(x.index_select(0, rows), dual.index_select(0, rows), states,
                                rule=self.rule, step=step, hp=hp, exact=self.exact,
                                reduce_sum=reduce_sum).view(-1)
            self._by_table(seg, tables, norms, out)
        return {k: torch.cat(v) for k, v in out.items()}

    @torch.no_grad()
    def seen_row_weight_norms(self) -> dict[str, Tensor]:
        """Per table: full-row L2 norms of its seen rows (column shards summed), reported by
        the column-offset-0 shard only. Collective for column shards."""
        out: dict[str, list] = {}
        for seg in self.segments:
            _, tables, norms = self._seen_weight_norms(seg)
            self._by_table(seg, tables, norms, out)
        return {k: torch.cat(v) for k, v in out.items()}

    @torch.no_grad()
    def prune_seen_rows(self, thresholds: dict[str, float]) -> None:
        """Magnitude pruning: set to 0 every seen row of table ``t`` whose full-row L2 norm is
        ``<= thresholds[t]`` (weights only: with lambdas 0 the stored dual is 0, so the row
        restarts from 0 if a later batch touches it). Collective for column shards."""
        for seg in self.segments:
            rows, tables, norms = self._seen_weight_norms(seg)
            thr = torch.tensor([float(thresholds.get(t.name, -1.0)) for t in self.tables],
                               dtype=norms.dtype, device=norms.device)[tables]
            self._seg_view(self.weights, seg).index_fill_(0, rows[norms <= thr], 0.0)

    def state_bytes_per_row(self) -> dict[str, float]:
        """Optimizer-state bytes per row (excluding the weights), and bookkeeping bytes."""
        rows = max(1, self.seen.numel())
        state = sum(getattr(self, n).numel() * getattr(self, n).element_size()
                    for n in ("dual", *self.state_names))
        return {"state": state / rows, "bookkeeping": self.seen.element_size()}


class _GroupLookup(torch.autograd.Function):
    """Forward: pooled lookup. Backward: the fused update; returns no weight gradient."""

    @staticmethod
    def forward(ctx, dummy, kernel: GroupTBE, plan: dict, per_sample_weights):
        ctx.kernel = kernel
        ctx.plan = plan
        ctx.save_for_backward(per_sample_weights if per_sample_weights is not None
                              else torch.empty(0))
        ctx.has_weights = per_sample_weights is not None
        with torch.no_grad():
            return kernel._pool(plan, per_sample_weights)

    @staticmethod
    def backward(ctx, grad_out):
        (w,) = ctx.saved_tensors
        w = w if ctx.has_weights else None
        if w is not None and ctx.needs_input_grad[3]:
            w = w.detach().requires_grad_(True)
        grad_w = ctx.kernel._update(ctx.plan, grad_out.contiguous(), w)
        return None, None, None, grad_w
