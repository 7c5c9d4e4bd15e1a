"""``MagnitudePruning``: the paper's baseline (Section 4.2) for embedding tables, sharded or not.

Three steps: (1) train; at ``1 - fine_tune_fraction`` of the training steps keep, per table, the
top-N rows by L2 norm among the rows seen in training (N = round(target x rows seen)) and set the
others to 0; (2) fine-tune on the remaining share of the data, during which pruned rows may come
back (new data touches them) and new rows appear; (3) at the end of training prune again, so the
target holds exactly. ``fine_tune_fraction=0`` prunes once, at the end.

The end is the last optimizer step (``trainer.estimated_stepping_batches``), pruned in that
batch's ``on_train_batch_end`` -- *before* the last epoch's validation and checkpoint, so that
the metrics logged at the end of training and the saved model are the pruned model's. A run
that stops earlier (``max_time``, early stopping, an interrupt) is pruned in ``on_train_end``
instead, after its last validation. Each step is pruned at most once (gradient accumulation
calls the hook for every micro-batch of a step).

Row norms are full-row norms (column shards combined) and the threshold is found over all ranks
(bisection on all-reduced counts), so every sharding type gives the same result.

Use it with ``GroupLasso(GroupAdam, lambda21=0)``: with all lambdas zero the Group optimizers are
their base optimizers (Theorem 2), so this is Adam (Adagrad, ...) + magnitude pruning, on the same
fused kernels as the Group runs.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ._tables import tables_of
from .sparsity_monitor import feature_rates, table_thresholds

__all__ = ["MagnitudePruning"]


class MagnitudePruning(Callback):
    """Prune embedding rows by magnitude to a target feature rate (see module docstring).

    Args:
        target_feature_rate: share of seen rows kept per table, in (0, 1].
        fine_tune_fraction: share of the training steps after the first pruning, in [0, 1)
            (the paper tries 0, 0.1, 0.2, 0.3).
    """

    def __init__(self, target_feature_rate: float, fine_tune_fraction: float = 0.1) -> None:
        v = target_feature_rate
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise ValueError(f"Invalid target_feature_rate: {v!r} (valid range: 0 < rate <= 1)")
        f = fine_tune_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ValueError(f"Invalid fine_tune_fraction: {f!r} (valid range: 0 <= f < 1)")
        self.target = float(target_feature_rate)
        self.fine_tune_fraction = float(fine_tune_fraction)
        self.prune_step: int | None = None
        #: the last optimizer step, where the final pruning runs (None: unknown, on_train_end)
        self.final_step: int | None = None
        self.pruned: list[dict[str, Any]] = []  # per pruning: step and counts after it
        self._tables = None

    @property
    def state_key(self) -> str:
        return "MagnitudePruning"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._tables = tables_of(pl_module, optimizer)
        if self._tables is None:
            raise ValueError("MagnitudePruning: no embedding table under a Group optimizer found "
                             "(add GroupLasso(GroupAdam, lambda21=0) and return "
                             "group_optimizers(self, ...) from configure_optimizers)")
        total = trainer.estimated_stepping_batches
        self.final_step = int(total) if math.isfinite(total) else None
        self.prune_step = None if self.fine_tune_fraction == 0 else max(
            1, round((1.0 - self.fine_tune_fraction) * total))

    def prune(self, step: int) -> dict[str, tuple[int, int]]:
        """Keep the top round(target x seen) rows of every table; returns the counts after."""
        counts = self._tables.counts()
        norms = self._tables.weight_norms()
        keeps = {name: round(self.target * counts[name][0]) for name in norms}
        # every table's threshold in one search (5 collectives for all tables together)
        found = table_thresholds({n: (v, 1.0) for n, v in norms.items()}, keeps, lo=1e-30)
        thresholds = {name: 0.0 if keeps[name] >= counts[name][0] else found[name]
                      for name in norms}
        self._tables.prune(thresholds)
        after = self._tables.counts()
        self.pruned.append({"step": step, "counts": after})
        rate, _ = feature_rates(after)
        rank_zero_info(f"MagnitudePruning: step {step}, feature rate {rate:.4f} "
                       f"(target {self.target})")
        return after

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step in (self.prune_step, self.final_step) and not self._pruned_at(step):
            self.prune(step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._pruned_at(trainer.global_step):  # stopped before the last step
            self.prune(trainer.global_step)

    def _pruned_at(self, step: int) -> bool:
        return bool(self.pruned) and self.pruned[-1]["step"] == step

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": list(self.pruned), "prune_step": self.prune_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = list(state_dict.get("pruned", []))
