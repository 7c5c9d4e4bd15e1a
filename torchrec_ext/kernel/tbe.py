"""``GroupTBE``: table-batched embedding bags trained by a fused Group optimizer.

The module of this package that users (and the TorchRec glue) hold; it composes the layout
(:mod:`.layout`), the lookup plan (:mod:`.plan`), the forward (:mod:`.forward`), the update
(:mod:`.update`, native or eager) and the row services (:mod:`.rows`). It imports with torch
alone; FBGEMM is used for the CPU forward when installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_sgl.optim.functional import (
    FUSED_RULES,
    LAMBDAS,
    NONFINITE_OPTIONS,
    check_bool,
    check_choice,
    get_spec,
    validate_hyperparameters,
)

from . import native, rows
from .forward import fbgemm_applies, fbgemm_pool, plan_pool
from .index import BLOCK_BYTES, BUCKETS, LANES, MERGE, RUN, RUNS, ShrinkIndex, bucket_of
from .layout import TableLayout, TableSpec
from .plan import check_ids, check_offsets, make_plan
from .update import eager_update, native_update, warn_once

__all__ = ["GroupTBE", "COMPILE_MIN_WEIGHTS", "OVERRIDABLE", "REAPPLY_MARGIN"]

#: relative widening of the (old, new] lambda21 interval of :meth:`GroupTBE.reapply_prox_between`:
#: a re-application recomputes a row's norm from its stored state, which differs from the norm
#: of its last write (whose float32 ``u`` the index holds) by a few float32 steps at most
#: (``(z + sigma x) - sigma x`` per element, then the rounding of ``u``); 2e-6 is >= 16 of them.
#: Kept small because shrink norms crowd (at 4e6 rows a relative 1e-5 held ~2,400 rows).
REAPPLY_MARGIN = 2e-6

#: rows per chunk of :meth:`GroupTBE.scale_dual`'s pass (bounds its temporaries to a factor per
#: row of the chunk, whatever the table's size)
SCALE_CHUNK = 1 << 18

#: on CUDA, ``compiled=None`` compiles the update of kernels with at least this many weights
COMPILE_MIN_WEIGHTS = 1 << 20
#: hyperparameters a table may override inside a kernel (``set_table_hyperparameters``)
OVERRIDABLE = ("lr", *LAMBDAS)


class GroupTBE(nn.Module):
    """Table-batched embedding bags with a fused Group optimizer (Algorithm 1 of Yue et al.).

    The layout is FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen``'s (one flat weight buffer,
    per-table offsets; element-wise state with the same offsets, row-wise state one float per
    row), the forward takes TBE-style ``(indices, offsets, per_sample_weights)``, and the backward
    *is* the optimizer step on the rows of the batch (see :mod:`torchrec_ext.kernel.update`).

    Args:
        tables: local tables (or shards), in the order features refer to them.
        feature_table_map: for each feature, the index of its table in ``tables``.
        pooling: ``"sum"`` or ``"mean"``.
        optimizer: base optimizer: one of :data:`~lightning_sgl.optim.functional.FUSED_RULES`.
        hyperparameters: ``lr``, ``lambda1``, ``lambda21``, ``lambda2`` and the base optimizer's
            own (``betas``, ``eps``, ``momentum``, ``lr_decay``, ``initial_accumulator_value``);
            missing ones take the optimizer spec's defaults (those of the ``torch.optim`` class).
        rowwise: one second moment per row (FBGEMM's row-wise layout).
        exact_group_norm: the exact minimiser of objective (6) instead of Algorithm 1's norm.
        nonfinite: ``"raise"`` (a NaN/Inf gradient raises, nothing is modified) or ``"skip"``.
        compiled: ``None`` (default): the fast engine where one applies -- the native update on
            CPU (built at install), ``torch.compile`` on CUDA for kernels of at least
            :data:`COMPILE_MIN_WEIGHTS` weights; ``True``: the fast engine always; ``False``:
            the eager PyTorch update (the ground truth).
        device, dtype: of the buffers (float32 or float64).

    Reference: Yue et al., *Adaptive Optimizers with Sparse Group Lasso*, Algorithm 1.
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
        if compiled is not None:
            check_bool("compiled", compiled)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Invalid dtype: {dtype} (the Group fused kernel keeps float32 or "
                             "float64 tables)")
        self.spec = get_spec(optimizer)
        self.rule = self.spec.rule
        if rowwise and not self.spec.rowwise_ok:
            raise ValueError(f"Invalid rowwise: True (optimizer {optimizer!r} has no second moment)")
        hp = {**self.spec.defaults, **dict.fromkeys(LAMBDAS, 0.0), **(hyperparameters or {})}
        unknown = set(hp) - set(self.spec.defaults) - set(LAMBDAS)
        if unknown:
            raise ValueError(f"Invalid hyperparameters for {optimizer!r}: {sorted(unknown)} "
                             f"(valid: lr, lambda1, lambda21, lambda2, "
                             f"{', '.join(k for k in self.spec.defaults if k != 'lr')})")
        if isinstance(hp.get("betas"), list):
            hp["betas"] = tuple(hp["betas"])
        validate_hyperparameters(optimizer, hp)
        self.optimizer = optimizer
        self.hp = hp
        self.pooling = pooling
        self.rowwise = rowwise
        self.exact = exact_group_norm
        self.nonfinite = nonfinite
        self.compiled = compiled
        self.layout = TableLayout(tables)
        self.tables = self.layout.tables
        self.feature_table_map = list(feature_table_map)
        if any(not 0 <= t < len(self.tables) for t in self.feature_table_map):
            raise ValueError("feature_table_map refers to a table index out of range")
        #: hyperparameters are read from here at each update (the fused optimizer's param group)
        self.hp_provider: Callable[[], dict] | None = None
        self.column_groups: dict[str, dist.ProcessGroup | None] = {}
        self.column_owners: dict[str, int] = {}
        #: per-table overrides of ``OVERRIDABLE`` hyperparameters (e.g. a tuned lambda21)
        self.table_overrides: dict[str, dict[str, float]] = {}
        #: tables whose support is fixed (a refit; see ``set_fixed_support``)
        self.fixed_support: frozenset[str] = frozenset()

        n_elem, n_rows = self.layout.num_elements, self.layout.num_rows
        self.register_buffer("weights", native.table_buffer(n_elem, dtype, device))
        self.register_buffer("dual", native.table_buffer(n_elem, dtype, device))
        self.state_names = tuple(self.rule.state_names)
        for name in self.state_names:
            n = n_rows if self.is_rowwise(name) else n_elem
            self.register_buffer(name, native.table_buffer(n, dtype, device,
                                                           self.spec.initial_value(name, hp)))
        self.register_buffer("step", torch.zeros(1, dtype=torch.float64, device=device))
        #: 1 byte per row: the row was seen in a training batch
        self.register_buffer("seen", native.table_buffer(n_rows, torch.uint8, device))
        #: 4 bytes per row: the row's shrink norm / sqrt(d) at its last write (see .index)
        self.register_buffer("shrink", native.table_buffer(n_rows, torch.float32, device))
        self._dummy = torch.zeros((), requires_grad=True, device=device)
        self.feature_counts_state = rows.FeatureCounts(self)
        self.shrink_index = ShrinkIndex(self)
        self._cache: dict = {}

    # ------------------------------------------------------------------ layout helpers
    def is_rowwise(self, name: str) -> bool:
        return self.spec.state_is_rowwise(name, self.rowwise)

    def update_views(self, seg) -> tuple[Tensor, ...]:
        """``(weights, dual, seen, *states)`` views of a segment, cached across steps (rebuilt
        when a buffer was replaced, e.g. by ``.to()``)."""
        bufs = (self.weights, self.dual, self.seen, *(getattr(self, n) for n in self.state_names))
        cache = self._cache.setdefault("views", {})
        views = cache.get(id(seg))
        if views is None or any(v._base is not b for v, b in zip(views, bufs)):
            lay = self.layout
            views = cache[id(seg)] = (
                lay.segment_view(self.weights, seg), lay.segment_view(self.dual, seg),
                lay.segment_view(self.seen, seg, rowwise=True).view(-1),
                *(lay.segment_view(getattr(self, n), seg, self.is_rowwise(n))
                  for n in self.state_names))
        return views

    def _arange(self, n: int, device) -> Tensor:
        key = ("arange", n, str(device))
        a = self._cache.get(key)
        if a is None:
            a = self._cache[key] = torch.arange(n, device=device)
        return a

    def native_hp(self, hp: dict) -> native.HpMatrix:
        """The native update's hyperparameter matrix for ``hp`` and the current overrides
        (rebuilt only when one of them changed)."""
        key = (id(hp), repr(self.table_overrides), self.fixed_support)
        ent = self._cache.get("hp_matrix")
        if ent is None or ent[0] != key or ent[2] is not hp:
            ent = self._cache["hp_matrix"] = (key, native.HpMatrix(
                self.optimizer, self.table_hyperparameter_list(hp),
                [t.local_cols for t in self.tables],
                [t.name in self.fixed_support for t in self.tables]), hp)
        return ent[1]

    def native_static(self) -> dict:
        st = self._cache.get("native")
        if st is None:
            cols = [0]
            for t in self.feature_table_map:
                cols.append(cols[-1] + self.tables[t].local_cols)
            st = self._cache["native"] = dict(
                ftm=torch.tensor(self.feature_table_map, dtype=torch.int64),
                fcol=torch.tensor(cols[:-1], dtype=torch.int64),
                rowwise=torch.tensor([self.is_rowwise(n) for n in self.state_names],
                                     dtype=torch.uint8))
        return st

    # ------------------------------------------------------------------ FBGEMM-like API
    def split_embedding_weights(self) -> list[Tensor]:
        """Per-table ``[local_rows, local_cols]`` views of the flat weights (they alias it)."""
        return [self.layout.table_view(self.weights, i) for i in range(len(self.tables))]

    def get_optimizer_state(self) -> list[dict[str, Tensor]]:
        """Per table: ``{"dual": [rows, cols], <moment>: [rows, cols] or [rows] (row-wise)}``;
        views that alias the kernel's buffers (loading into them is in place)."""
        out = []
        for i in range(len(self.tables)):
            d = {"dual": self.layout.table_view(self.dual, i)}
            for name in self.state_names:
                d[name] = self.layout.table_view(getattr(self, name), i, self.is_rowwise(name))
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
        if self.hp_provider is None:
            return self.hp
        src = self.hp_provider()
        hp = {k: src.get(k, v) for k, v in self.hp.items()}
        if isinstance(hp.get("betas"), list):
            hp["betas"] = tuple(hp["betas"])
        # validate only when a value changed (this runs at every update)
        key = tuple(tuple(float(e) for e in v) if isinstance(v, tuple) else float(v)
                    for v in hp.values())
        cached = self._cache.get("validated_hp")
        if cached is not None and cached[0] == key:
            return cached[1]
        validate_hyperparameters(self.optimizer, hp)
        self._cache["validated_hp"] = (key, hp)
        return hp

    # ------------------------------------------------------------------ per-table overrides
    def set_table_hyperparameters(self, values: dict[str, dict[str, float]]) -> None:
        """Per-table overrides of ``lr``, ``lambda1``, ``lambda21``, ``lambda2`` (merged into the
        current ones; ``None`` removes an override). Validated as a whole first: on error
        nothing changes. The native and compiled updates read them as data."""
        names = {t.name for t in self.tables}
        new = {k: dict(v) for k, v in self.table_overrides.items()}
        hp = self.current_hyperparameters()
        for table, over in values.items():
            if table not in names:
                raise ValueError(f"Invalid table: {table!r} not in this kernel "
                                 f"(valid: {sorted(names)})")
            bad = sorted(set(over) - set(OVERRIDABLE))
            if bad:
                raise ValueError(f"Invalid per-table hyperparameters {bad} for {table!r} "
                                 f"(valid: {', '.join(OVERRIDABLE)})")
            merged = {**new.get(table, {}), **over}
            merged = {k: float(v) for k, v in merged.items() if v is not None}
            validate_hyperparameters(self.optimizer, {**hp, **merged})
            new[table] = merged
        self.table_overrides = {k: v for k, v in new.items() if v}

    def set_fixed_support(self, tables) -> None:
        """Fix the support of these tables (by name; an empty iterable: none) -- the refit of a
        *relaxed* group lasso. While a table's support is fixed, a touched row trains only if
        it is seen and non-zero (:func:`lightning_sgl.optim.functional.support_rows`): a zero
        row keeps its values and state (at ``lambda21 = 0`` its dual would revive it), a row
        seen for the first time is set to zero and marked seen, and :meth:`reapply_prox` skips
        zero rows. The penalties are not changed here (a refit also sets ``lambda1`` and
        ``lambda21`` to 0, see ``SparsityMonitor(refit_share=...)``). Validated first: on error
        nothing changes. O(tables); the update's cost is unchanged (one more pass over the
        touched row, in registers)."""
        new = frozenset(tables or ())
        names = {t.name for t in self.tables}
        unknown = sorted(new - names)
        if unknown:
            raise ValueError(f"Invalid tables: {unknown} not in this kernel (valid: "
                             f"{sorted(names)})")
        self.fixed_support = new

    def fixed_table_mask(self, device=None) -> Tensor | None:
        """Per local table: whether its support is fixed (``None`` when no table's is)."""
        if not self.fixed_support:
            return None
        return torch.tensor([t.name in self.fixed_support for t in self.tables],
                            dtype=torch.bool, device=device or self.weights.device)

    def table_hyperparameter_list(self, hp: dict) -> list[dict]:
        """Per local table: the hyperparameters its rows use."""
        return [{**hp, **self.table_overrides.get(t.name, {})} for t in self.tables]

    def row_hyperparameters(self, hp: dict, row_tables: Tensor) -> dict:
        """``hp`` with a ``[U, 1]`` tensor for every key that a table of these rows overrides."""
        if not self.table_overrides:
            return hp
        keys = sorted({k for t in self.tables for k in self.table_overrides.get(t.name, {})})
        out = dict(hp)
        for k in keys:
            per_table = torch.tensor([float(self.table_overrides.get(t.name, {}).get(k, hp[k]))
                                      for t in self.tables], dtype=self.weights.dtype,
                                     device=self.weights.device)
            out[k] = per_table[row_tables].unsqueeze(1)
        return out

    # ------------------------------------------------------------------ column shards
    def set_column_groups(self, groups: dict[str, dist.ProcessGroup | None],
                          owners: dict[str, int] | None = None) -> None:
        """Process group of every column-sharded table's shards (``None``: all shards are on this
        rank) and the global rank of its column-offset-0 shard (owner of row-wise state)."""
        self.column_groups = dict(groups)
        self.column_owners = dict(owners or {})

    def row_seen_view(self, i: int) -> Tensor:
        """The ``seen`` flags (uint8) of local table ``i``, a view of the kernel buffer."""
        return self.layout.table_view(self.seen, i, rowwise=True)

    def row_shrink_view(self, i: int) -> Tensor:
        """The stored shrink norms / sqrt(d) (float32) of local table ``i``, a view."""
        return self.layout.table_view(self.shrink, i, rowwise=True)

    def sync_column_shards(self) -> None:
        """Copy row-wise state and ``seen`` from each column-sharded table's column-offset-0 shard
        to its other shards (after a checkpoint load). Collective."""
        rows.sync_column_shards(self)

    # ------------------------------------------------------------------ engines
    def engine(self, per_sample_weights: Tensor | None = None) -> str:
        """``"native"``, ``"compiled"`` or ``"eager"``: what the next update runs on."""
        if self.compiled is False:
            return "eager"
        if self.weights.device.type == "cpu":
            if self.layout.has_column_shards:
                warn_once("cw", "torchrec_ext: column-sharded tables run the eager update (their "
                                "group norms are all-reduced in the middle of the row step)")
                return "eager"
            if per_sample_weights is not None and per_sample_weights.requires_grad:
                warn_once("psw", "torchrec_ext: learned per-sample weights run the eager update "
                                 "(their gradient needs the rows before the update)")
                return "eager"
            if native.available():
                return "native"
            native.warn_missing()
            return "eager"
        if self.compiled or self.weights.numel() >= COMPILE_MIN_WEIGHTS:
            return "compiled"
        return "eager"

    # ------------------------------------------------------------------ forward
    def forward(self, indices: Tensor, offsets: Tensor,
                per_sample_weights: Tensor | None = None) -> Tensor:
        """Pooled lookup. ``indices``: ids local to each feature's table, feature-major;
        ``offsets``: ``F*B + 1`` bag offsets. Returns ``[B, sum of feature widths]``. The
        backward updates the rows (see the class docstring)."""
        n_features = len(self.feature_table_map)
        if n_features == 0:
            return torch.zeros(0, 0, device=self.weights.device, dtype=self.weights.dtype)
        if (offsets.numel() - 1) % n_features != 0:
            raise ValueError(f"Invalid offsets: {offsets.numel()} entries; expected F*B+1 with "
                             f"F={n_features} features")
        batch = (offsets.numel() - 1) // n_features
        indices, offsets = indices.long(), offsets.long()
        if not (indices.numel() == offsets.numel() - 1
                and torch.equal(offsets, self._arange(offsets.numel(), offsets.device))):
            check_offsets(offsets, indices.numel())
        engine = self.engine(per_sample_weights)
        fb = fbgemm_applies(self.weights, self.pooling, per_sample_weights)
        plan = None
        if engine != "native" or not fb:
            plan = make_plan(self.layout, self.feature_table_map, indices, offsets, batch,
                             per_sample_weights is None, check=not fb,
                             cache=self._cache.setdefault("bags", {}))
        ctx = (engine, indices, offsets, plan, fb)
        return _GroupLookup.apply(self._dummy, self, ctx, per_sample_weights)

    def _pool(self, ctx, per_sample_weights: Tensor | None) -> Tensor:
        engine, indices, offsets, plan, fb = ctx
        if not fb:
            return plan_pool(self, plan, per_sample_weights)
        try:
            return fbgemm_pool(self, indices, offsets, per_sample_weights, self._cache)
        except RuntimeError:  # FBGEMM checked the ids: name the table and the range
            p = plan or make_plan(self.layout, self.feature_table_map, indices, offsets,
                                  (offsets.numel() - 1) // len(self.feature_table_map),
                                  per_sample_weights is None, False, self._cache.setdefault(
                                      "bags", {}))
            check_ids(self.layout, *p.id_check)
            raise

    def _backward(self, ctx, grad_out: Tensor, per_sample_weights: Tensor | None):
        engine, indices, offsets, plan, _ = ctx
        if self.shrink_index.pristine:
            self.shrink_index.before_first_update()
        if engine == "native":
            native_update(self, indices, offsets, grad_out, per_sample_weights)
            return None
        return eager_update(self, plan, grad_out, per_sample_weights, engine == "compiled")

    # ------------------------------------------------------------------ feature rate support
    def invalidate_counts(self) -> None:
        """Mark the feature counts stale (the next read recounts, O(rows)): call after writing
        the tables or ``seen`` flags by other means than this kernel (every load path of the
        TorchRec glue and of ``TorchRecStrategy`` does). The shrink-norm index is rebuilt too,
        from the ``shrink`` values loaded with the tables."""
        self.feature_counts_state.invalidate()
        self.shrink_index.invalidate(recompute=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.invalidate_counts()

    def counts_stale(self) -> bool:
        """Whether someone else wrote the weights or ``seen`` since the counts were updated."""
        return self.feature_counts_state.stale()

    def recount(self, nonzero: dict[int, Tensor] | None = None) -> None:
        """Rebuild the counts from the buffers, O(rows) (``nonzero``: per local table, row flags
        already combined over column shards)."""
        self.feature_counts_state.recount(nonzero)

    def table_counts(self) -> list[tuple[int, int]]:
        """Per local table ``(rows seen, seen rows non-zero)``, O(tables); recounted first if
        stale (a column shard then counts its own columns: see ``feature_rate``)."""
        if self.counts_stale():
            self.recount()
        return [self.feature_counts_state.table(i) for i in range(len(self.tables))]

    @torch.no_grad()
    def feature_counts(self) -> dict[str, tuple[int, int]]:
        """Per table on this rank: ``(rows seen in training, seen rows that are non-zero)``,
        summed over its local row shards; a column-sharded table is reported by its
        column-offset-0 shard only. O(tables) (after an outside write, one O(rows) recount)."""
        out: dict[str, tuple[int, int]] = {}
        for t, (s, n) in zip(self.tables, self.table_counts()):
            if t.col_offset != 0:
                continue
            a, b = out.get(t.name, (0, 0))
            out[t.name] = (a + s, b + n)
        return out

    @torch.no_grad()
    def row_flags(self, i: int) -> tuple[Tensor, Tensor]:
        """``(seen, non-zero)`` boolean flags of the rows of local table ``i`` (O(rows) scan)."""
        return self.feature_counts_state.local_flags(i)

    @torch.no_grad()
    def scale_dual(self, factor: float) -> None:
        """Multiply the stored dual of every seen row by ``factor`` (the refit's give-back of
        shrinkage, ``SparsityMonitor(refit_relax=...)``); a row never seen holds the dual it was
        created with and is left as it is. The weights are not touched, so the feature counts
        stay valid; the shrink-norm index is rebuilt at its next use (the norms moved).

        Args:
            factor: a finite number (validated first: on error nothing changes).

        Cost: one sequential pass over each table's dual, in chunks of :data:`SCALE_CHUNK`
        rows: each row multiplied by ``factor`` if seen, else by exactly 1 (the same bits), so
        no gather / scatter of the seen rows (at 4 x 4e6 rows x dim 16 with 7e6 rows seen:
        ~75 ms on one thread, where the gather / scatter of the seen rows took ~1 s)."""
        factor = float(factor)
        if not math.isfinite(factor):
            raise ValueError(f"Invalid factor: {factor!r} (a finite number)")
        for i in range(len(self.tables)):
            seen = self.row_seen_view(i)
            dual = self.layout.table_view(self.dual, i)
            one = torch.ones((), dtype=dual.dtype, device=dual.device)
            f = torch.full((), factor, dtype=dual.dtype, device=dual.device)
            for a in range(0, seen.numel(), SCALE_CHUNK):
                b = min(a + SCALE_CHUNK, seen.numel())
                dual[a:b].mul_(torch.where(seen[a:b].bool(), f, one).unsqueeze(1))
        self.shrink_index.invalidate(recompute=True)

    def reapply_prox(self) -> None:
        """Re-apply the proximal step with the current hyperparameters to every seen row (so a
        changed ``lambda21`` also acts on rows the batches do not touch). O(seen rows);
        collective for column-sharded tables: call it on every rank."""
        rows.reapply_prox(self)

    def reapply_prox_between(self, bounds: dict[str, tuple[float, float]]) -> int:
        """After ``lambda21`` of table ``t`` moved from ``bounds[t][0]`` to ``bounds[t][1]``:
        re-apply the prox to the rows whose zero/non-zero state that change can flip -- the seen rows
        whose stored shrink norm / sqrt(d) ``u`` lies in ``(min, max]`` of the two values
        (widened by a relative :data:`REAPPLY_MARGIN` on both sides, so that rounding between
        the stored ``u`` and the kernel's own ``norm <= sqrt(d) * lambda21`` test cannot leave
        a row out) -- found through the shrink-norm index. Every other row is zero under both
        values or non-zero under both and keeps its values (the new ``lambda21`` reaches its
        magnitude at its next update). Returns the number of rows re-applied.

        Cost: O(rows of the buckets spanned + rows re-applied x dim) with the native index (no
        pass over the other rows; on the native engine the walk feeds the update's row loop
        directly, :func:`.rows.reapply_prox_between_native`); collective for column-sharded
        tables (every shard stores the same ``u``, so it finds the same rows), and then called
        on every shard even when no row changes."""
        self.shrink_index.ensure()
        parts = []
        for i, t in enumerate(self.tables):
            if t.name not in bounds:
                continue
            a, b = sorted(float(v) for v in bounds[t.name])
            if a == b:
                continue
            a, b = a * (1.0 - REAPPLY_MARGIN), b * (1.0 + REAPPLY_MARGIN)
            lo, hi = (int(v) for v in bucket_of(torch.tensor([a, b])))
            parts.append(((i, lo, hi), (a, b)))
        ranges, values = [r for r, _ in parts], [v for _, v in parts]
        done = rows.reapply_prox_between_native(self, ranges, values)
        if done is not None:
            return done
        selected = self.shrink_index.rows_in(ranges, values)
        if selected.numel() or any(t.column_sharded for t in self.tables):
            rows.reapply_prox(self, selected)
        return int(selected.numel())

    def shrink_histograms(self) -> dict[str, Tensor]:
        """Per table (a column-sharded one reported by its column-offset-0 shard): int64
        ``[BUCKETS]``, its seen rows per shrink-norm bucket (:mod:`.index`). O(tables x buckets)
        with the native index (rebuilt first if stale: O(rows), collective for CW)."""
        self.shrink_index.ensure()
        out: dict[str, Tensor] = {}
        for i, t in enumerate(self.tables):
            if t.col_offset == 0:
                h = self.shrink_index.histogram(i)
                out[t.name] = out[t.name] + h if t.name in out else h.clone()
        return out

    def shrink_run_counts(self, name: str, bucket: int) -> Tensor:
        """int64 ``[RUNS]``: table ``name``'s seen rows (its column-offset-0 shards) per run of
        ``bucket`` (:meth:`.index.ShrinkIndex.run_counts`). O(RUNS) for a bucket of more than
        ``SPLIT`` rows, else O(rows of the bucket), with the native index."""
        out = torch.zeros(RUNS, dtype=torch.int64)
        for i, t in enumerate(self.tables):
            if t.name == name and t.col_offset == 0:
                out += self.shrink_index.run_counts(i, bucket)
        return out

    def shrink_value_counts(self, name: str, bucket: int, run: int) -> Tensor:
        """int64 ``[RUN]``: table ``name``'s seen rows (its column-offset-0 shards) per float32
        value of run ``run`` of ``bucket`` (:meth:`.index.ShrinkIndex.value_counts`). O(rows of
        the run) with the native index."""
        out = torch.zeros(RUN, dtype=torch.int64)
        for i, t in enumerate(self.tables):
            if t.name == name and t.col_offset == 0:
                out += self.shrink_index.value_counts(i, bucket, run)
        return out

    def shrink_norms(self) -> dict[str, Tensor]:
        """Per table: the shrink norms of its seen rows (``group_norms``; a row is zero after
        ``reapply_prox`` iff its norm <= sqrt(d) * lambda21, d the table's full width). A
        column-sharded table's rows are reported once, by its column-offset-0 shard. Collective
        for column-sharded tables."""
        return rows.shrink_norms(self)

    def seen_row_weight_norms(self) -> dict[str, Tensor]:
        """Per table: full-row L2 norms of its seen rows (column shards summed), reported by
        the column-offset-0 shard only. Collective for column shards."""
        return rows.weight_norms(self)

    def prune_seen_rows(self, thresholds: dict[str, float]) -> None:
        """Magnitude pruning: set to 0 every seen row of table ``t`` whose full-row L2 norm is
        ``<= thresholds[t]`` (weights only: with lambdas 0 the stored dual is 0, so the row
        restarts from 0 if a later batch touches it). Collective for column shards."""
        rows.prune(self, thresholds)

    @staticmethod
    def table_bytes(optimizer: str, rows: int, cols: int, *, rowwise: bool = False,
                    dtype: torch.dtype = torch.float32) -> dict[str, int]:
        """Bytes a ``GroupTBE`` allocates for one table (or shard) of ``rows x cols``: the
        weights, the dual, every state of the optimizer (``rows`` values when row-wise, else
        ``rows x cols``) and the ``seen`` flags (1 byte per row). Pure arithmetic, O(states);
        the TorchRec planner's storage estimate uses it (:mod:`torchrec_ext.planner`).

        Returns ``{"weights", "dual", <state names>..., "seen", "shrink"}`` and, with the native
        extension, ``"shrink_index"`` (the bucket lists, counts and run blocks of :mod:`.index`:
        at most ``rows // MERGE`` blocks, reserved, touched only when a bucket needs one)."""
        spec = get_spec(optimizer)
        if rowwise and not spec.rowwise_ok:
            raise ValueError(f"Invalid rowwise: True (optimizer {optimizer!r} has no second moment)")
        es = torch.empty((), dtype=dtype).element_size()
        out = {"weights": rows * cols * es, "dual": rows * cols * es}
        for name in spec.rule.state_names:
            out[name] = (rows if spec.state_is_rowwise(name, rowwise) else rows * cols) * es
        out["seen"] = rows
        out["shrink"] = 4 * rows
        if native.available():  # the shrink-norm index's lists and blocks (.index), host memory
            out["shrink_index"] = (12 * rows + (12 + 4 * LANES) * BUCKETS
                                   + BLOCK_BYTES * (rows // MERGE))
        return out

    def state_bytes_per_row(self) -> dict[str, float]:
        """Optimizer-state bytes per row (excluding the weights), and bookkeeping bytes."""
        n_rows = max(1, self.seen.numel())
        state = sum(getattr(self, n).numel() * getattr(self, n).element_size()
                    for n in ("dual", *self.state_names))
        return {"state": state / n_rows, "bookkeeping": self.seen.element_size()}

    def allocated_bytes(self) -> int:
        """Bytes of every buffer of the kernel (weights, dual, states, seen, shrink, step) and of
        its shrink-norm index."""
        index = self.shrink_index.nbytes() if self.shrink_index.linked else 0
        return sum(b.numel() * b.element_size() for b in self.buffers()) + index


class _GroupLookup(torch.autograd.Function):
    """Forward: pooled lookup. Backward: the fused update; returns no weight gradient."""

    @staticmethod
    def forward(actx, dummy, kernel: GroupTBE, ctx, per_sample_weights):
        actx.kernel = kernel
        actx.ctx = ctx
        actx.save_for_backward(per_sample_weights if per_sample_weights is not None
                               else torch.empty(0))
        actx.has_weights = per_sample_weights is not None
        with torch.no_grad():
            return kernel._pool(ctx, per_sample_weights)

    @staticmethod
    def backward(actx, grad_out):
        (w,) = actx.saved_tensors
        w = w if actx.has_weights else None
        if w is not None and actx.needs_input_grad[3]:
            w = w.detach().requires_grad_(True)
        grad_w = actx.kernel._backward(actx.ctx, grad_out.contiguous(), w)
        return None, None, None, grad_w
