"""``SparsityMonitor``: report the feature rate and tune ``lambda21`` to hit a target.

feature rate = rows that are non-zero / rows seen in training (per table and overall), exact
across ranks for every sharding type.

Tuning. After a proximal step, a seen row is zero iff its *shrink norm* (``||s||``, or
``||A^{-1/2} s||`` with ``exact_group_norm``; it does not depend on ``lambda21``) is
``<= sqrt(d) * lambda21``. Every ``tune_every_n_steps`` steps the monitor therefore chooses the
``lambda21`` for which the number of seen rows with a larger norm equals ``target x rows seen``
-- an exact order statistic of the norms (identical on every rank) -- and sets it. Fused
(TorchRec) tables keep a shrink-norm index (:mod:`torchrec_ext.kernel.index`): the threshold
comes from the kernels' histograms (the bucket of the order statistic, then the exact value from
that bucket's rows; 4 all-reduces, :func:`._quantile.histogram_thresholds`) and the prox is
re-applied only to the rows whose norm lies between the old and the new threshold -- the rows
whose zero / non-zero state changes -- so the rate is on target at once, and a kept row takes the
new value's shrinkage at its next update; cost O(tables x buckets + rows that change), not
O(rows). Plain tables take the full pass (every seen row's norm, :func:`._quantile.thresholds`
in 5 all-reduces, the prox re-applied to every seen row). Between tunings training moves the
norms a little (touched rows can revive, newly seen rows join); the next tuning corrects it, and
every epoch ends with a tuning -- at its last batch, so that the epoch's validation and checkpoint
see the on-target tables.

Schedule. With ``schedule_share > 0`` the target is not forced from the first tuning, when the
norms are still noise: it ramps from 1.0 to the final target over that share of the training
steps, starting after ``schedule_start`` of them, ``target_t = target + (1 - target) (1 - (t -
t_0) / T_ramp)^3`` (the cubic schedule of gradual
pruning, Zhu & Gupta 2017, "To prune, or not to prune", arXiv:1710.01878), and holds after it.
``T`` is the trainer's ``estimated_stepping_batches``, fixed at the first ``on_train_start`` and
saved, so a resumed run follows the same curve.

Refit. With ``refit_share > 0`` training ends as a *relaxed* group lasso: for the last
``refit_share`` of the training steps the support is fixed -- one last tuning meets the final
target, then every table trains with ``lambda1 = lambda21 = 0`` and only its non-zero rows move
(:func:`lightning_sgl.optim.functional.support_rows`: a zero row keeps its values and state, a row
first seen during the refit stays zero) -- and the kept rows
get back ``refit_relax`` of the shrinkage the selection needed (their duals, which hold what the
penalty shrank away, are scaled by it once: O(rows seen x dim) for fused tables, O(rows held)
for plain ones, once per training; each row takes it
with its next step), as magnitude pruning's survivors are fine-tuned unshrunk. No tuning runs
after it. Since rows first seen during the refit count as seen zero rows, a support sized for
the rows seen at its start would end below the target on a stream that keeps bringing new ids
(0.173 for a target of 0.2 at 4e6 rows per table); for a rate target the last tuning therefore
keeps ``target x`` the rows seen *projected* to the end of training (or of the first epoch, if
that comes first): the rows seen are recorded at two steps before the refit and their growth
extrapolated (:func:`projected_seen`), so the rate falls from a little above the target to it
over the refit. The start step, the marks and whether the refit began are fixed at the first
``on_train_start`` and saved, so a resumed run refits the same steps with the same support.

Defaults. A monitor with a target and no schedule or refit argument uses
:data:`DEFAULT_SCHEDULE`: target 1.0 (every row kept) for the first 60% of the steps, the cubic
ramp over the next 20%, the refit over the last 20%; ``schedule_share=0, refit_share=0`` is the
paper's setting. Measured (docs/results.md, 5 seeds, Group optimizer AUC minus its base optimizer +
magnitude pruning at rates 0.5 / 0.2 / 0.05, both scored on their final tables): on the synthetic
set both settings are ahead in every cell (the defaults by +0.024 at 0.05 where the paper's
setting is +0.017); on MovieLens-100K the defaults are ahead at 0.2 and 0.05 (GroupAdam +0.011 /
+0.057) and behind at 0.5 (-0.0025; the paper's setting -0.0038).

Memory budget. ``target_bytes`` (overall, or ``{table: bytes}``) sets the targets from the size
of the serving export (:func:`torchrec_ext.serving.export_serving` in ``serve_dtype``: kept rows
plus the id remap, :func:`torchrec_ext.serving.served_table_bytes`): per table, the most kept rows
whose export fits its budget; overall, the largest common feature rate whose tables fit together.
The targets are recomputed from the current counts at every tuning (rows seen grow during
training), and every epoch ends with a tuning, so the export of the final tables is within the
budget. O(tables) per tuning on top of the tuning itself.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..factory import GROUP_LASSO_MARK
from ._quantile import FLOOR, Collectives, _cross, first_level, histogram_thresholds, thresholds
from ._tables import allreduce_cpu, tables_of

__all__ = ["SparsityMonitor", "bisect_threshold", "feature_rates", "global_threshold",
           "table_thresholds", "model_feature_rate", "scheduled_rate", "SCHEDULES",
           "DEFAULT_SCHEDULE", "resolve_schedule",
           "budget_keeps", "mark_steps", "projected_seen"]

#: points of ``SparsityMonitor.history`` kept at most (older points are thinned, see ``_record``)
HISTORY_POINTS = 512
SCHEDULES = ("cubic", "linear")
#: the data types of ``torchrec_ext.serving.DATA_TYPES`` (kept here: no FBGEMM import to check)
SERVE_DTYPES = ("fp32", "fp16", "int8", "int4")


def budget_keeps(budget: int | dict[str, int], seen: dict[str, int],
                 cost: Callable[[str, int], int]) -> dict[str, int]:
    """Rows to keep per table so the served tables fit ``budget`` bytes.

    Args:
        budget: overall bytes, or ``{table: bytes}`` (tables without one keep every seen row).
        seen: rows seen per table (the most a table can keep).
        cost: ``cost(table, kept)``: served bytes of ``table`` with ``kept`` rows (non-decreasing
            in ``kept``).

    Per table: the largest ``k <= seen`` with ``cost(t, k) <= budget[t]`` (a bisection).
    Overall: the largest common rate ``r`` (to 2^-40) with ``sum cost(t, floor(r seen_t)) <=
    budget``. O(tables x log rows).
    """
    def most(t: str, fits) -> int:
        lo, hi = 0, seen[t]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    if isinstance(budget, dict):
        return {t: (most(t, lambda k, t=t: cost(t, k) <= budget[t]) if t in budget else n)
                for t, n in seen.items()}
    lo, hi = 0.0, 1.0
    total = lambda r: sum(cost(t, math.floor(r * n)) for t, n in seen.items())  # noqa: E731
    if total(1.0) <= budget:
        return dict(seen)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
    return {t: math.floor(lo * n) for t, n in seen.items()}


#: the schedule and refit a monitor with a target uses unless told otherwise (see
#: :func:`resolve_schedule`; the figures behind the choice: docs/results.md)
DEFAULT_SCHEDULE = {"schedule_start": 0.6, "schedule_share": 0.2, "refit_share": 0.2}


def resolve_schedule(schedule_start, schedule_share, refit_share, has_target: bool
                     ) -> tuple[float, float, float]:
    """The ``(schedule_start, schedule_share, refit_share)`` a monitor uses: the values given;
    when none of them is given, :data:`DEFAULT_SCHEDULE` if the monitor has a target (else all
    0). Given some, the ones left out are 0 (the defaults apply as a set). O(1)."""
    given = (schedule_start, schedule_share, refit_share)
    if all(v is None for v in given):
        if not has_target:
            return 0.0, 0.0, 0.0
        return (DEFAULT_SCHEDULE["schedule_start"], DEFAULT_SCHEDULE["schedule_share"],
                DEFAULT_SCHEDULE["refit_share"])
    return tuple(0.0 if v is None else v for v in given)


def scheduled_rate(target: float, step: int, ramp_steps: int, schedule: str = "cubic",
                   start: int = 0) -> float:
    """The target rate at ``step`` of a ramp from 1.0 to ``target`` over ``ramp_steps`` steps
    that begins at step ``start`` (1.0 before it, ``target`` after it; ``ramp_steps=0``:
    ``target`` from ``start`` on).

    ``cubic``: ``target + (1 - target) (1 - (step - start) / ramp_steps)^3`` (Zhu & Gupta,
    2017); ``linear``: ``target + (1 - target) (1 - (step - start) / ramp_steps)``. O(1)."""
    if step < start:
        return 1.0
    step -= start
    if ramp_steps <= 0 or step >= ramp_steps:
        return target
    left = 1.0 - step / ramp_steps
    return target + (1.0 - target) * (left ** 3 if schedule == "cubic" else left)


def mark_steps(refit_start: int, total: int) -> list[int]:
    """The two steps at which a monitor records the rows seen, for :func:`projected_seen` at the
    refit's start: ``refit_start - 2w`` and ``refit_start - w``, the window ``w`` the refit's
    length capped at half the steps before it (at least step 1). Empty when there is no room
    for a window of one step. O(1)."""
    w = min(total - refit_start, refit_start // 2)
    if w < 1:
        return []
    return [max(1, refit_start - 2 * w), refit_start - w]


def projected_seen(marks: list, step: int, seen: dict[str, int], end: int,
                   rows: dict[str, int] | None = None) -> dict[str, int]:
    """Rows seen per table projected to step ``end`` from their growth before ``step``.

    What the refit's support is sized for: rows first seen during the refit stay zero, so with
    a stream that keeps bringing new ids a support sized for the rows seen at its start ends
    below the target (at 4e6 rows per table, 0.173 for a target of 0.2: docs/lightning.md).

    ``marks`` holds ``(step, {table: rows seen})`` recorded at the steps of :func:`mark_steps`
    (fewer when a run began after them), ``seen`` the counts at ``step``. With two marks
    ``(s_0, n_0), (s_1, n_1)`` the paces of new rows per step over the two windows are ``p_1 =
    (n_1 - n_0) / (s_1 - s_0)`` and ``p_2 = (n - n_1) / w`` with ``w = step - s_1``. Heavy-tailed
    ids bring new rows ever more slowly, so the growth per window decays geometrically with
    ``r = min(p_2 / p_1, 1)``: over the ``k = (end - step) / w`` windows left (fractional in
    closed form) it is ``p_2 w (r + r^2 + ... + r^k)`` -- never faster than the last window's
    pace. One mark: that pace, linearly (``r = 1``). No mark, or nothing grew: ``seen``.
    O(tables).
    """
    if step >= end or not marks or step <= marks[-1][0]:
        return dict(seen)
    s1, n1 = marks[-1]
    w = step - s1
    k = (end - step) / w
    out = {}
    for t, n in seen.items():
        g2 = n - n1[t] if t in n1 else 0  # (a table without a mark: nothing to go by)
        if g2 <= 0:
            out[t] = n
            continue
        r = 1.0
        if len(marks) > 1:
            s0, n0 = marks[-2]
            g1 = n1[t] - n0.get(t, 0)
            if g1 > 0 and s1 > s0:  # the paces per step of the two windows
                r = min((g2 / w) / (g1 / (s1 - s0)), 1.0)
        grow = g2 * (k if r >= 1.0 else r * (1.0 - r ** k) / (1.0 - r))
        out[t] = n + int(round(grow))
        if rows is not None and t in rows:
            out[t] = max(n, min(out[t], rows[t]))
    return out


def feature_rates(counts: dict[str, tuple[int, int]]) -> tuple[float, dict[str, float]]:
    """Overall and per-table feature rate from ``(seen, non-zero)`` counts (0 if nothing seen)."""
    per = {k: (nz / s if s else 0.0) for k, (s, nz) in counts.items()}
    seen = sum(s for s, _ in counts.values())
    return (sum(nz for _, nz in counts.values()) / seen if seen else 0.0), per


def model_feature_rate(pl_module: pl.LightningModule, optimizer: Any = None
                       ) -> tuple[float, dict[str, float]]:
    """The feature rate of a module's Group tables, overall and per table (what
    :class:`SparsityMonitor` reports), with or without a monitor.

    Args:
        pl_module: the (sharded) LightningModule.
        optimizer: ``trainer.optimizers[0]``; needed for plain ``nn.Embedding`` tables trained
            by ``group_optimizers`` (fused TorchRec tables are found from the module).

    Cost: O(tables) for fused tables (the kernels' incremental counts) plus one all-reduce;
    O(rows seen) for plain tables. Collective when distributed: call it on every rank.
    Returns ``(0.0, {})`` when the module has no Group table.
    """
    tables = tables_of(pl_module, optimizer)
    return feature_rates(tables.counts()) if tables is not None else (0.0, {})


def bisect_threshold(count: Callable[[float], float], target: float, hi: float,
                    lo: float = 1e-12, iters: int = 60) -> float:
    """The smallest threshold ``t`` (to bisection precision, in log space) with
    ``count(t) <= target``, for a non-increasing ``count``: the ``lambda21`` that meets a
    feature-rate target, or a magnitude-pruning threshold.

    Args:
        count: non-increasing function of the threshold (e.g. rows whose norm exceeds it).
        target: the count to reach.
        hi: an upper bound of the answer (``count(hi) <= target``).
        lo: the smallest threshold considered (returned when ``count(lo) <= target``).
        iters: bisection steps, each one call of ``count``.
    """
    if count(lo) <= target:
        return lo
    hi = max(hi, lo * 2)
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if count(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _allreduce(t: torch.Tensor, op: str) -> torch.Tensor:
    return allreduce_cpu(t, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)


def _global_lambda21(local: dict[str, float]) -> dict[str, float]:
    """Per table, the ``lambda21`` its kernels hold, on every rank (a rank without a shard of
    a table reads NaN for it): one MAX all-reduce, at the fit's start. O(tables)."""
    names = sorted(local)
    if not names:
        return {}
    t = torch.tensor([-math.inf if math.isnan(local[n]) else local[n] for n in names],
                     dtype=torch.float64)
    t = allreduce_cpu(t, dist.ReduceOp.MAX)
    return {n: float(v) if math.isfinite(v) else math.nan for n, v in zip(names, t.tolist())}


def _kept(keeps: dict, counts: dict[str, tuple[int, int]]) -> dict:
    """The non-zero rows of ``counts`` as ``keeps`` counts them: per targeted table, or in all
    tables (key ``None``) for a global target."""
    if None in keeps:
        return {None: sum(z for _, z in counts.values())}
    return {n: counts[n][1] for n in keeps}


def _on_target(keeps: dict, counts: dict[str, tuple[int, int]], lam: dict[str, float]) -> bool:
    """Whether exactly the rows to keep are non-zero already, so that a new search would land in
    the same gap between two norms (``keeps``: rows to keep per table, or ``{None: rows}`` for
    a global target, which also needs one common ``lambda21``). A target that keeps every seen
    row does not count: the search would move ``lambda21`` to the floor. O(tables)."""
    if None in keeps:
        values = {lam.get(n) for n in counts}
        seen = sum(s for s, _ in counts.values())
        return (len(values) == 1 and None not in values and not math.isnan(values.pop())
                and keeps[None] < seen and sum(z for _, z in counts.values()) == keeps[None])
    return all(n in lam and not math.isnan(lam[n]) and k < counts[n][0] and counts[n][1] == k
               for n, k in keeps.items())


def _group_runs(tables, names: list[str], b: int) -> torch.Tensor:
    """This rank's run counts of bucket ``b`` summed over tables ``names`` (one search group)."""
    got = tables.run_counts(dict.fromkeys(names, b))
    return sum((got[n] for n in names), torch.zeros_like(got[names[0]]))


def _group_seen(groups: dict, counts: dict[str, tuple[int, int]]) -> list[int]:
    """Rows seen per search group (all ranks)."""
    return [sum(counts[n][0] for n in names) for names in groups.values()]


def table_thresholds(local: dict[str, tuple[torch.Tensor, float]], keeps: dict[str, int],
                     lo: float = FLOOR, collectives: Collectives | None = None
                     ) -> dict[str, float]:
    """Per table ``name``: the threshold ``t`` that leaves ``keeps[name]`` of its values (over
    all ranks) above ``scale * t``; ``local`` maps a table to ``(values on this rank, scale)``.
    With norms as values and ``scale = sqrt(d)`` the threshold is the table's ``lambda21``.

    Exact order statistics from a two-level histogram (:func:`._quantile.thresholds`):
    O(values) per rank and 5 collectives for all tables together. Collective: every rank calls
    it with the same tables in the same order."""
    names = sorted(keeps)
    coll = collectives or Collectives(_allreduce)
    groups = [local[n][0].reshape(-1).double() / local[n][1] for n in names]
    return dict(zip(names, thresholds(groups, [keeps[n] for n in names], coll, floor=lo)))


def global_threshold(local: dict[str, tuple[torch.Tensor, float]], keep: int,
                     lo: float = FLOOR, collectives: Collectives | None = None) -> float:
    """One threshold for all tables together: at most ``keep`` values, over all tables and ranks,
    exceed their table's ``scale * t`` (see :func:`table_thresholds`; 5 collectives)."""
    coll = collectives or Collectives(_allreduce)
    values = [v.reshape(-1).double() / sc for v, sc in local.values()]
    merged = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return thresholds([merged], [keep], coll, floor=lo)[0]


def _check_fraction(name: str, v, valid: str, upper_open: bool) -> None:
    """Refuse ``v`` unless it is a number in [0, 1) (``upper_open``) or [0, 1]."""
    if (isinstance(v, bool) or not isinstance(v, (int, float))
            or not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0)):
        raise ValueError(f"Invalid {name}: {v!r} (valid range: {valid})")


def _quiet_sync_advice() -> None:
    """Silence Lightning's "use sync_dist=True when logging on epoch level" advice for the
    monitor's own metric names (their values are global already); every other metric keeps it."""
    warnings.filterwarnings(
        "ignore", message=r"It is recommended to use `self\.log\('(feature_rate|rows_seen/|"
                          r"rows_nonzero/|lambda21/)")


class SparsityMonitor(Callback):
    """Log the feature rate of group-regularised tables and optionally tune ``lambda21``.

    Args:
        target_feature_rate: ``None`` (report only), a float in (0, 1] for the overall rate, or
            ``{table: rate}`` per table.
        log_every_n_steps: logging interval (default: the Trainer's ``log_every_n_steps``).
        tune_every_n_steps: tuning interval in optimizer steps.
        warmup_steps: steps before the first tuning.
        schedule_share: share of the training steps, in [0, 1), over which the target ramps
            from 1.0 to ``target_feature_rate`` (0: the target from the first tuning, as in the
            paper).
        schedule: the ramp's shape, ``"cubic"`` (gradual pruning's) or ``"linear"``.
        schedule_start: share of the training steps, in [0, 1), before the ramp begins (the
            target is 1.0 until then: the tables train almost unpenalised, as after gradual
            pruning's start step ``t0``).
        refit_share: share of the training steps, in [0, 1), at the end of training in which
            the selected rows are refit with the support fixed and ``lambda1 = lambda21 = 0``
            (0: no refit, as in the paper). ``schedule_start + schedule_share + refit_share``
            must not exceed 1.
        refit_relax: the share, in [0, 1], of the shrinkage the refit gives back to the kept
            rows: their stored duals (which hold what the penalties shrank away) are scaled by
            it once when the refit begins, and a row takes the restored part with its next
            step. 1: the relaxed lasso's unshrunk values; 0: training continues from the shrunk
            values. Default 0.5, the best balance over both data sets of docs/results.md
            (its sweep of 0.5 / 0.75 / 1); use 1 where nearly every id matters (MovieLens-100K
            at rate 0.5: -0.0018 AUC vs magnitude pruning with 1, -0.0025 with 0.5).

            Defaults of these three: with a target and none of them given,
            :data:`DEFAULT_SCHEDULE` (start 0.6, ramp 0.2, refit 0.2: the best of the measured
            settings on both data sets of docs/results.md); given some, the others are 0; the
            paper's setting is ``schedule_share=0, refit_share=0``.
        target_bytes: instead of ``target_feature_rate``, a budget in bytes of the serving
            export, overall (an int) or ``{table: bytes}`` (TorchRec tables only).
        serve_dtype: the data type the budget is for: ``"fp32"``, ``"fp16"``, ``"int8"`` or
            ``"int4"``.
        tolerance: relative dead band, in [0, 1), of the fused (TorchRec) tables' tuning: a
            tuning whose exact counts keep within ``tolerance x`` the rows the target asks for
            (per table, or in all for a global target; for a budget only below it, never
            above) does not search again, and a search may stop at a run of float32 values
            holding at most ``tolerance / 2 x`` those rows (one collective less) -- keeping up
            to that many fewer. Default 0.005 (0.5%, a tenth of the +-5% the targets are held
            to; docs/lightning.md has the costs it saves); 0: every tuning off the exact count
            searches, and every search is exact. Plain tables always search.
        plot: write ``sparsity_monitor.png`` (feature rate and lambda21 over steps) at fit end.

    Logs ``feature_rate`` (progress bar), ``feature_rate/<table>``, ``rows_seen/<table>``,
    ``rows_nonzero/<table>`` and ``lambda21/<table>`` (the tuned value; during a refit the
    tables train with 0).
    """

    def __init__(self, target_feature_rate: float | dict[str, float] | None = None, *,
                 log_every_n_steps: int | None = None, tune_every_n_steps: int = 10,
                 warmup_steps: int = 0, schedule_share: float | None = None,
                 schedule: str = "cubic", schedule_start: float | None = None,
                 refit_share: float | None = None, refit_relax: float = 0.5,
                 target_bytes: int | dict[str, int] | None = None,
                 serve_dtype: str = "fp32", tolerance: float = 0.005, plot: bool = True) -> None:
        self._validate_target(target_feature_rate)
        if target_bytes is not None:
            if target_feature_rate is not None:
                raise ValueError("Invalid target_bytes: give target_bytes or "
                                 "target_feature_rate, not both")
            items = target_bytes.items() if isinstance(target_bytes, dict) else [("", target_bytes)]
            for name, v in items:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    arg = f"target_bytes[{name!r}]" if name else "target_bytes"
                    raise ValueError(f"Invalid {arg}: {v!r} (a positive number of bytes)")
        if serve_dtype not in SERVE_DTYPES:
            raise ValueError(f"Invalid serve_dtype: {serve_dtype!r} (valid options: "
                             f"{', '.join(SERVE_DTYPES)})")
        schedule_start, schedule_share, refit_share = resolve_schedule(
            schedule_start, schedule_share, refit_share,
            target_feature_rate is not None or target_bytes is not None)
        for name, v in (("schedule_share", schedule_share), ("schedule_start", schedule_start),
                        ("refit_share", refit_share)):
            _check_fraction(name, v, "0 <= share < 1", upper_open=True)
        if refit_share and target_feature_rate is None and target_bytes is None:
            raise ValueError("Invalid refit_share: a refit needs target_feature_rate or "
                             "target_bytes")
        _check_fraction("refit_relax", refit_relax, "0 <= relax <= 1", upper_open=False)
        _check_fraction("tolerance", tolerance, "0 <= tolerance < 1", upper_open=True)
        if schedule_start and not schedule_share:
            raise ValueError("Invalid schedule_start: a start needs a ramp (schedule_share > 0)")
        if refit_share and schedule_start + schedule_share + refit_share > 1.0 + 1e-9:
            raise ValueError(f"Invalid refit_share: {refit_share!r} with schedule_start "
                             f"{schedule_start!r} and schedule_share {schedule_share!r} (the "
                             "ramp must end before the refit: schedule_start + schedule_share + "
                             "refit_share <= 1)")
        if schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {schedule!r} (valid options: "
                             f"{', '.join(SCHEDULES)})")
        if schedule_share and target_feature_rate is None and target_bytes is None:
            raise ValueError("Invalid schedule_share: a schedule needs target_feature_rate or "
                             "target_bytes")
        for name, v in (("log_every_n_steps", log_every_n_steps),
                        ("tune_every_n_steps", tune_every_n_steps)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"Invalid {name}: {v!r} (valid range: integer >= 1)")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (valid range: integer >= 0)")
        self.target = target_feature_rate
        self.target_bytes, self.serve_dtype = target_bytes, serve_dtype
        self._tunes = target_feature_rate is not None or target_bytes is not None
        self.log_every_n_steps = log_every_n_steps
        self.tune_every_n_steps = tune_every_n_steps
        self.warmup_steps = warmup_steps
        self.plot = plot
        self.schedule_share, self.schedule = float(schedule_share), schedule
        #: steps of the ramp (fixed at the first train start, saved for resume)
        self.ramp_steps: int | None = None
        self.schedule_start = float(schedule_start)
        #: first step of the ramp (fixed with ``ramp_steps``, saved)
        self.ramp_start = 0
        self.refit_share = float(refit_share)
        self.refit_relax = float(refit_relax)
        self.tolerance = float(tolerance)
        #: first step of the refit (``None``: none; fixed at the first train start, saved)
        self.refit_start: int | None = None
        #: whether the refit began (the support is fixed; saved for resume)
        self.refitting = False
        #: the steps at which the rows seen are recorded, and the step the refit's projection
        #: of the rows seen is for (set with ``refit_start`` for a rate target; saved): see
        #: :meth:`plan_steps` and :func:`projected_seen`
        self.mark_steps: list[int] = []
        self.projection_end: int | None = None
        #: ``(step, {table: rows seen})`` recorded at ``mark_steps`` (saved)
        self.seen_marks: list[tuple[int, dict[str, int]]] = []
        self._tuned_step: int | None = None  # the step of the last tuning (not saved)
        self.lambda21: dict[str, float] = {}
        #: (step, rate, mean lambda21), at most HISTORY_POINTS points (see ``_record``)
        self.history: list[tuple[int, float, float]] = []
        self.history_stride = 1
        self._history_seen = 0
        #: figures of the last tuning (collectives of the threshold search, rows seen)
        self.last_tuning: dict[str, int] = {}
        #: what the last threshold search asked for and left (``keeps``, ``nonzero`` per table)
        self.searched: dict | None = None
        #: the target of the last search (in memory only: it steers which collectives carry
        #: what, never a result; the same on every rank)
        self._searched_target = None
        #: (groups, all-reduced first level, rows seen per group) of the last search that sent
        #: its first level with the counts (in memory only, the same on every rank: it guides
        #: which run counts travel with the next one, never a result)
        self._last_cut = None
        self.plot_path: str | None = None
        self._tables = None

    @staticmethod
    def _validate_target(target) -> None:
        if target is None:
            return
        items = target.items() if isinstance(target, dict) else [("", target)]
        for name, v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < v <= 1.0):
                arg = f"target_feature_rate[{name!r}]" if name else "target_feature_rate"
                raise ValueError(f"Invalid {arg}: {v!r} (valid range: 0 < rate <= 1)")

    @property
    def state_key(self) -> str:
        return "SparsityMonitor"

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from .group_lasso import GroupLasso

        _quiet_sync_advice()
        if any(isinstance(c, GroupLasso) for c in trainer.callbacks):
            return
        tagged = any(hasattr(p, GROUP_LASSO_MARK) or any(
            (kw or {}).get("optimizer") == "lightning_sgl.group"
            for kw in getattr(p, "_optimizer_kwargs", [])) for p in pl_module.parameters())
        if not tagged:
            raise ValueError("SparsityMonitor: no group-regularised table found (add the "
                             "GroupLasso callback, or apply_group_optimizer to the tables)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._tables = tables_of(pl_module, optimizer)
        if self._tables is None:
            raise ValueError("SparsityMonitor: no group-regularised table found after setup "
                             "(configure_optimizers must return group_optimizers(self, ...))")
        if isinstance(self.target, dict):
            unknown = sorted(set(self.target) - set(self._tables.names))
            if unknown:
                raise ValueError(f"Invalid target_feature_rate: unknown tables {unknown} "
                                 f"(valid: {self._tables.names})")
        if self.target_bytes is not None:
            self._check_budget()
        needs = ((self.ramp_steps is None and self.schedule_share)
                 or (self.refit_start is None and self.refit_share))
        total = trainer.estimated_stepping_batches if needs else 0
        if not math.isfinite(total):
            arg = "schedule_share" if self.schedule_share else "refit_share"
            raise ValueError(f"Invalid {arg}: the number of training steps is not known (an "
                             "iterable data set without a length: set Trainer(max_steps=...))")
        if self.lambda21:  # resumed: the tuned values are ours to restore
            self._tables.set_lambda21(self.lambda21)
        else:
            self.lambda21 = _global_lambda21(self._tables.lambda21())
        batches = trainer.num_training_batches
        epoch = (math.ceil(batches / max(1, trainer.accumulate_grad_batches))
                 if math.isfinite(batches) else None)
        self.plan_steps(total, epoch)
        if self.refitting:  # resumed inside the refit: fix the support again (no re-application)
            self._tables.fix_support()

    def plan_steps(self, total: int, epoch_steps: int | None = None) -> None:
        """Fix the schedule's and the refit's steps for a run of ``total`` optimizer steps
        (``on_train_start`` passes the trainer's ``estimated_stepping_batches`` and the
        optimizer steps of one epoch): the ramp's start and length, the refit's start and, for a
        rate target, the refit's projection of the rows seen (:func:`projected_seen`): the step
        it is for -- the end of training, or of the first epoch if that comes first (a data
        set read once has shown its rows; a second pass brings none) -- and the steps at which
        the rows seen are recorded for it (:func:`mark_steps`; none when the refit begins after
        that step). A resumed monitor keeps the saved run's steps (only what is still unset is
        planned). O(1)."""
        if self.ramp_steps is None:  # not resumed: the ramp follows this fit's length
            self.ramp_steps = int(self.schedule_share * total)
            self.ramp_start = int(self.schedule_start * total)
        if self.refit_start is None and self.refit_share:  # likewise the refit
            self.refit_start = int(total) - int(self.refit_share * total)
            if self.target is not None:  # a budget counts kept rows: nothing to project
                end = int(total) if epoch_steps is None else min(int(total), int(epoch_steps))
                self.projection_end = end
                self.mark_steps = mark_steps(self.refit_start, end)

    def _cost(self):
        from torchrec_ext.serving import served_table_bytes

        layouts = self._tables.layouts()
        return lambda t, k: served_table_bytes(k, *layouts[t], data_type=self.serve_dtype)

    def _check_budget(self) -> None:
        """Refuse a budget below what one row per (budgeted) table costs, before any change."""
        if not hasattr(self._tables, "layouts"):
            raise ValueError("Invalid target_bytes: a budget needs TorchRec tables (sharded "
                             "Group EBCs); plain tables have no serving export")
        cost, names = self._cost(), self._tables.names
        if isinstance(self.target_bytes, dict):
            unknown = sorted(set(self.target_bytes) - set(names))
            if unknown:
                raise ValueError(f"Invalid target_bytes: unknown tables {unknown} (valid: "
                                 f"{names})")
            for t, b in self.target_bytes.items():
                if cost(t, 1) > b:
                    raise ValueError(f"Invalid target_bytes[{t!r}]: {b} bytes is below what one "
                                     f"row of it costs in {self.serve_dtype} ({cost(t, 1)} bytes "
                                     "with its id remap)")
        elif sum(cost(t, 1) for t in names) > self.target_bytes:
            raise ValueError(f"Invalid target_bytes: {self.target_bytes} bytes is below what one "
                             f"row per table costs in {self.serve_dtype} "
                             f"({sum(cost(t, 1) for t in names)} bytes with the id remaps)")

    def current_target(self, step: int, counts: dict[str, tuple[int, int]] | None = None
                       ) -> float | dict[str, float] | None:
        """The target at ``step`` on the schedule (the final target when there is none); with
        ``target_bytes``, the per-table rates the budget allows for the current ``counts``."""
        if self.target_bytes is not None:
            counts = counts if counts is not None else self._tables.counts()
            seen = {t: s for t, (s, _) in counts.items()}
            keeps = budget_keeps(self.target_bytes, seen, self._cost())
            final = {t: (keeps[t] / seen[t] if seen[t] else 1.0) for t in seen}
            if not self.ramp_steps:
                return final
            return {t: scheduled_rate(v, step, self.ramp_steps, self.schedule, self.ramp_start)
                    for t, v in final.items()}
        if self.target is None or not self.ramp_steps:
            return self.target
        if isinstance(self.target, dict):
            return {k: scheduled_rate(v, step, self.ramp_steps, self.schedule, self.ramp_start)
                    for k, v in self.target.items()}
        return scheduled_rate(self.target, step, self.ramp_steps, self.schedule, self.ramp_start)

    # ------------------------------------------------------------------ tuning
    def _tune(self, step: int, project_to: int | None = None) -> None:
        """Set the ``lambda21`` that meets the target and re-apply the prox where it changes.

        ``project_to``: a rate target keeps ``target x`` the rows seen projected to that step
        (:func:`projected_seen`, from ``seen_marks``; at most the rows seen now) instead of the
        rows seen now -- the refit's start, so that its fixed support meets the target at the
        end of training.

        Cost per rank, fused tables: O(tables x buckets) for the histograms, per table the run
        counts of one bucket and a walk of one run for the exact value, and the prox on the
        rows whose stored norm lies between the old and the new threshold (O(rows of the
        buckets walked + those rows x dim)); collectives: on several ranks the counts travel
        with the threshold's first level in one all-reduce, then 2 more (a global target, or
        per-table targets whose histograms are small) or 3 for the threshold, all tables
        together (on one rank no collective); with column-sharded tables also the index's
        rebuild decision and one norm all-reduce per such table in the re-application. Plain
        tables: the counts, the shrink norms and the prox re-application of every seen row
        (O(rows seen x dim)), 5 collectives for the threshold. ``last_tuning`` records the
        figures (``threshold_collectives``: the search's own; ``collectives``: the tuning's,
        the counts' included; ``rows_reapplied``, ``skipped``).

        Skipped in O(tables) when the search and the re-application would change nothing:
        with no collective at all while the target keeps every row (before the ramp) and
        every ``lambda21`` is the floor this monitor set; with the counts' all-reduce only
        while the target keeps every seen row, every seen row is non-zero and every
        ``lambda21`` is already at the floor; and, fused tables only, when the exact counts
        are on target already -- exactly the rows to keep are non-zero (per table, or in all
        with one common ``lambda21`` for a global target), so the threshold the search would
        return lies in the same gap between two norms as the one set and zeroes the same rows
        -- or exactly what the last search left for the same rows to keep. Plain tables search
        at every other tuning (the behaviour the paper-table figures were made with)."""
        self._tuned_step = step
        tables = self._tables
        coll = Collectives(_allreduce)
        skipped = {"threshold_collectives": 0, "collectives": 0, "skipped": 1,
                   "rows_reapplied": 0}
        if self.target_bytes is None and self._keeps_all_at_floor(self.current_target(step)):
            self.last_tuning = skipped  # no collective at all
            return
        fused = hasattr(tables, "histograms")  # the kernels' shrink-norm index
        search = None
        if fused and coll.world > 1 and self._likely_search(step):
            # the threshold's first level travels with the counts (one collective less)
            hists = tables.histograms()
            groups = self._groups(sorted(hists))
            local = first_level([sum((hists[n] for n in names), torch.zeros_like(hists[names[0]]))
                                 for names in groups.values()]) if groups else None
            guess = self._guess_buckets(step, groups, local, len(next(iter(hists.values()))))
            extra = local
            if guess:  # the run counts of the buckets the cut most likely falls in, too
                runs = torch.stack([torch.cat([_group_runs(tables, names, b) for b in guess[i]])
                                    for i, names in enumerate(groups.values())])
                extra = torch.cat([local.reshape(-1), runs.reshape(-1).to(torch.float64)])
            counts, reduced = tables.counts_with(extra)
            first = None if local is None else reduced.reshape(-1)[:local.numel()].view(local.shape)
            known = None
            if guess:
                got = reduced.reshape(-1)[local.numel():].view(len(groups), len(guess[0]), -1)
                known = [{b: got[i, j] for j, b in enumerate(guess[i])} for i in range(len(groups))]
            search = (hists, groups, first, known)
            if first is not None:
                self._last_cut = (list(groups), first, _group_seen(groups, counts))
        else:
            counts = tables.counts()
        skipped["collectives"] = int(coll.world > 1)
        target = self.current_target(step, counts)
        skipped["rows_seen"] = sum(s for s, _ in counts.values())
        if self._keeps_everything(target, counts):
            self.last_tuning = skipped
            return
        seen = {n: s for n, (s, _) in counts.items()}
        base = seen
        if project_to is not None and self.target_bytes is None:
            base = projected_seen(self.seen_marks, step, seen, project_to, tables.rows())
        if isinstance(target, dict):
            # the floor of an exact budget share stays in the budget; rates round to nearest
            rnd = math.floor if self.target_bytes is not None else round
            keeps = {n: min(seen[n], rnd(target[n] * base[n] + 1e-9)) for n in counts
                     if n in target}
        else:
            keeps = {None: min(sum(seen.values()), round(target * sum(base.values())))}
        old = tables.lambda21()
        # (plain tables search at every tuning, as the paper-table figures were made with)
        if fused and (_on_target(keeps, counts, self._searched_lambda21())
                      or self._as_searched(keeps, counts) or self._within(keeps, counts)):
            self.last_tuning = skipped
            return
        if fused:
            new, left = self._indexed_thresholds(tables, keeps, coll, search,
                                                 tolerance=self.tolerance / 2)
            # the rows' zero / non-zero state was decided under the value now set (or the one
            # this monitor last set, if someone else changed it since): the span of all of them
            bounds = {}
            for n, v in new.items():
                span = [x for x in (old.get(n), self.lambda21.get(n), v)
                        if x is not None and not math.isnan(x)]
                bounds[n] = (min(span), max(span))
            tables.set_lambda21(new)
            reapplied = tables.reapply_between(bounds)
        else:
            scaled = {k: (v, math.sqrt(d)) for k, (v, d) in tables.norms().items()}
            if None in keeps:
                new = dict.fromkeys(scaled, global_threshold(scaled, keeps[None],
                                                             collectives=coll))
            else:
                new = table_thresholds({n: scaled[n] for n in keeps}, keeps, collectives=coll)
            tables.set_lambda21(new)
            tables.reapply()
            reapplied = sum(s for s, _ in counts.values())
            left = {}  # plain tables search at every tuning: nothing to compare with
        self._searched_target = target
        self.lambda21 = {**self.lambda21, **new}  # what was set: the same on every rank
        # what this search left (the count above each new threshold): a later tuning that
        # finds the same skips
        self.searched = {"keeps": [[n, k] for n, k in keeps.items()],
                         "nonzero": [[n, z] for n, z in left.items()],
                         "lambda21": {n: float(v) for n, v in new.items()}}
        self.last_tuning = {"threshold_collectives": coll.count,
                            "collectives": coll.count + int(coll.world > 1),
                            "rows_seen": sum(s for s, _ in counts.values()),
                            "rows_projected": sum(base.values()),
                            "rows_reapplied": reapplied}

    def _within(self, keeps: dict, counts: dict[str, tuple[int, int]]) -> bool:
        """The dead band: a search ran before (so ``lambda21`` is this monitor's) and the exact
        non-zero rows are within ``tolerance x keep`` of the rows to keep, per targeted table
        or in all -- for a memory budget only at or below them (the export must fit).
        O(tables)."""
        if not self.tolerance or self.searched is None:
            return False
        kept = _kept(keeps, counts)
        low = self.target_bytes is not None
        return all(abs(kept[n] - k) <= self.tolerance * k and not (low and kept[n] > k)
                   for n, k in keeps.items())

    def _likely_search(self, step: int) -> bool:
        """Whether this tuning will most likely search -- the target moved since the last search
        (on a ramp), or a budget's ramp is running -- so that the threshold's first level is
        worth sending with the counts; a held target is mostly skipped, and then only the counts
        travel. Decided from the schedule and the last search: the same on every rank.
        O(tables)."""
        if self.target_bytes is not None:
            return bool(self.ramp_steps) and (
                self.ramp_start < step <= self.ramp_start + self.ramp_steps)
        return self.current_target(step) != self._searched_target

    def _guess_buckets(self, step: int, groups: dict, local, buckets: int
                       ) -> list[list[int]] | None:
        """Per group, the buckets (the likeliest and its two neighbours) the cut will fall in:
        where the rows to keep now, estimated from the last search's rows seen, cut that
        search's all-reduced histograms -- on a ramp the cut moves little between tunings. From
        what every rank holds alike, so the same on every rank; ``None`` without a last search
        of the same groups, with a budget (its rows to keep need the counts), or when the first
        level is not the whole histograms. O(groups x buckets)."""
        last = self._last_cut
        if (last is None or local is None or self.target_bytes is not None
                or last[0] != list(groups) or tuple(last[1].shape) != tuple(local.shape)
                or local.shape[1] != buckets):
            return None
        rate = self.current_target(step)
        rates = [rate[n] if isinstance(rate, dict) else rate for n in groups]
        keep = torch.tensor([round(r * s) for r, s in zip(rates, last[2])], dtype=torch.float64)
        at, _ = _cross(last[1], torch.zeros(len(rates), dtype=torch.float64), keep)
        if not all(0 < int(c) < buckets - 1 for c in at.tolist()):
            return None
        return [[int(c) - 1, int(c), int(c) + 1] for c in at.tolist()]

    def _groups(self, names: list[str]) -> dict[str | None, list[str]]:
        """The groups a search over tables ``names`` cuts, keyed as its ``keeps`` are: one per
        targeted table (per-table targets, a memory budget), or ``None`` -> every table (a
        global target). O(tables)."""
        if self.target_bytes is not None:
            return {n: [n] for n in names}
        if isinstance(self.target, dict):
            return {n: [n] for n in names if n in self.target}
        return {None: list(names)} if names else {}

    @staticmethod
    def _indexed_thresholds(tables, keeps: dict, coll: Collectives, search=None,
                            tolerance: float = 0.0) -> tuple[dict[str, float], dict]:
        """``lambda21`` per table from the kernels' shrink-norm histograms (``keeps``: rows to
        keep per table, or ``{None: rows}`` over all tables with one common value), and the rows
        above each new value (keyed as ``keeps``): the bucket that holds the order statistic
        from the all-reduced histograms, then the exact value from that bucket's run counts and
        one run's value counts (:func:`._quantile.histogram_thresholds`: 3 or 4 collectives).
        ``search``: ``(histograms, groups, first level all-reduced)`` read and reduced already
        (with the counts, see :meth:`_tune`); ``tolerance``: that of
        :func:`._quantile.histogram_thresholds`. O(tables x buckets) plus, per table, the run
        counts of one bucket (O(runs) for a crowded bucket, a walk of at most ``SPLIT`` rows
        otherwise) and a walk of one run."""
        first = known = None
        if search is not None:
            hists, groups, first, known = search
            if list(groups) != sorted(keeps, key=lambda n: (n is not None, n)):
                first = known = None  # (not the groups the first level was made for)
        else:
            hists = tables.histograms()
        above: list[int] = []
        if None in keeps:
            names = sorted(hists)
            merged = sum((hists[n] for n in names), torch.zeros_like(next(iter(hists.values()))))

            def runs(i: int, b: int) -> torch.Tensor:
                got = tables.run_counts(dict.fromkeys(names, b))
                return sum(got[n] for n in names)

            def values(i: int, b: int, r: int) -> torch.Tensor:
                got = tables.value_counts(dict.fromkeys(names, (b, r)))
                return sum(got[n] for n in names)

            (t,) = histogram_thresholds([merged], [keeps[None]], runs, values, coll,
                                        tables.bucket_edge, above=above, first=first,
                                        tolerance=tolerance, known_runs=known)
            return dict.fromkeys(names, t), {None: above[0]}
        names = sorted(keeps)
        ts = histogram_thresholds(
            [hists[n] for n in names], [keeps[n] for n in names],
            lambda i, b: tables.run_counts({names[i]: b})[names[i]],
            lambda i, b, r: tables.value_counts({names[i]: (b, r)})[names[i]], coll,
            tables.bucket_edge, above=above, first=first, tolerance=tolerance, known_runs=known)
        return dict(zip(names, ts)), {n: above[i] for i, n in enumerate(names)}

    def _searched_lambda21(self) -> dict[str, float]:
        """The ``lambda21`` values the last search set: the same on every rank (a table's value
        read from the kernels is known only where a shard of it lives), so that every skip
        decision is the same on every rank. Empty before the first search."""
        return dict(self.searched["lambda21"]) if self.searched else {}

    def _as_searched(self, keeps: dict, counts: dict[str, tuple[int, int]]) -> bool:
        """Whether the last search asked for the same rows to keep and the tables hold exactly
        the non-zero rows it left (per targeted table, or in all for a global target): a new
        search would return the same answer up to ties at the cut (which keep the count a few
        rows below the target at production sizes, so that the exact-hit test alone would
        search every time). The monitor owns ``lambda21`` while it tunes: a value set behind
        its back between two tunings is not looked for. O(tables)."""
        last = self.searched
        return (last is not None and [[n, k] for n, k in keeps.items()] == last["keeps"]
                and [[n, z] for n, z in _kept(keeps, counts).items()] == last["nonzero"])

    def _at_floor(self) -> bool:
        """The last search set the floor for every table. O(tables)."""
        lam = self._searched_lambda21()
        return set(self._tables.names) <= set(lam) and all(v <= FLOOR for v in lam.values())

    def _keeps_all_at_floor(self, target) -> bool:
        """Without any collective: the target keeps every row (1.0 for every table) and the
        last search set the floor for every table. A search would return the floor again and
        the re-application between the floor and itself touches no row (a plain table's full
        re-application at the floor changes a row only after an outside write). O(tables)."""
        rates = target.values() if isinstance(target, dict) else [target]
        covered = not isinstance(target, dict) or set(self._tables.names) <= set(target)
        return covered and all(r >= 1.0 for r in rates) and self._at_floor()

    def _keeps_everything(self, target, counts: dict[str, tuple[int, int]]) -> bool:
        """Whether a tuning now would keep every seen row with the lambda21 already set."""
        rates = target.values() if isinstance(target, dict) else [target]
        covered = not isinstance(target, dict) or set(counts) <= set(target)
        return (covered and all(r >= 1.0 for r in rates)
                and all(nz == seen for seen, nz in counts.values())
                and self._at_floor())

    # ------------------------------------------------------------------ hooks
    def _log(self, pl_module: pl.LightningModule, step: int, on_epoch: bool) -> None:
        counts = self._tables.counts()
        rate, per = feature_rates(counts)
        # the values are global already (identical on every rank): no sync_dist. Lightning's
        # advice to sync epoch-level values does not apply to them and is filtered for these
        # names only (see _quiet_sync_advice); syncing would add collectives that Lightning runs
        # at rank-dependent points (the progress bar computes on rank 0 only) -- a gloo abort
        kw = dict(on_step=not on_epoch, on_epoch=on_epoch, batch_size=1, sync_dist=False)
        pl_module.log("feature_rate", rate, prog_bar=True, **kw)
        for name, (seen, nz) in counts.items():
            pl_module.log(f"feature_rate/{name}", per[name], **kw)
            pl_module.log(f"rows_seen/{name}", float(seen), **kw)
            pl_module.log(f"rows_nonzero/{name}", float(nz), **kw)
            pl_module.log(f"lambda21/{name}", float(self.lambda21.get(name, float("nan"))), **kw)
        lam = [v for v in self.lambda21.values() if not math.isnan(v)]
        self._record((step, rate, sum(lam) / len(lam) if lam else float("nan")))

    def _record(self, point: tuple[int, float, float]) -> None:
        """Append to ``history``, bounded: when it holds ``HISTORY_POINTS`` points every other
        point is dropped (the first and the newest stay), and from then on only every
        ``history_stride``-th logged point is kept -- a fixed-size, evenly thinned curve, so
        checkpoints stay small however long training runs."""
        self._history_seen += 1
        if (self._history_seen - 1) % self.history_stride:
            return
        self.history.append(point)
        if len(self.history) >= HISTORY_POINTS:
            self.history = self.history[::2]
            self.history_stride *= 2

    def _start_refit(self, step: int) -> None:
        """One last tuning on the final target -- for a rate target sized for the rows seen
        projected to the end of training (:func:`projected_seen`) -- then the support fixed,
        the penalties off and the duals scaled by ``refit_relax`` (once per training: O(rows
        seen x dim) on fused tables)."""
        self._tune(step, project_to=self.projection_end)
        self._tables.fix_support()
        self._tables.scale_dual(self.refit_relax)
        self.refitting = True
        rate, _ = feature_rates(self._tables.counts())
        projected = self.last_tuning.get("rows_projected")
        seen = self.last_tuning.get("rows_seen")
        more = (f" (kept for {projected:,} rows seen at step {self.projection_end}, projected "
                f"from {seen:,} now)" if projected and seen and projected > seen else "")
        rank_zero_info(f"SparsityMonitor: step {step}: refit with the support fixed, feature "
                       f"rate {rate:.4f}{more}")

    def _mark_due(self, step: int) -> bool:
        """Whether ``step`` records the rows seen for the refit's projection. O(1)."""
        k = len(self.seen_marks)
        return k < len(self.mark_steps) and step >= self.mark_steps[k]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.refitting:  # once the support is fixed, no tuning runs
            if self._mark_due(step):  # one all-reduce, at most twice per training
                self.seen_marks.append(
                    (step, {n: s for n, (s, _) in self._tables.counts().items()}))
            if self.refit_start is not None and step >= self.refit_start:
                self._start_refit(step)
            elif (self._tunes and step > self.warmup_steps
                    and (step % self.tune_every_n_steps == 0 or trainer.is_last_batch)):
                # the epoch's last batch tunes too: the epoch ends on target *before* its
                # validation and checkpoint, which then see the tables training leaves
                self._tune(step)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step % every == 0:
            self._log(pl_module, step, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self._tunes and trainer.global_step > self.warmup_steps and not self.refitting
                and self._tuned_step != trainer.global_step):
            # end every epoch on target (the rate drifts a little between tunings); normally
            # done at the last batch already, here when the epoch stopped early (max_steps,
            # limit_train_batches)
            self._tune(trainer.global_step)
        self._log(pl_module, trainer.global_step, on_epoch=True)
        rate, per = feature_rates(self._tables.counts())
        rank_zero_info(f"SparsityMonitor: step {trainer.global_step} feature rate {rate:.4f} "
                       + " ".join(f"{k}={v:.4f}" for k, v in per.items()))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.plot or not self.history:
            return
        folder = trainer.log_dir or trainer.default_root_dir  # collective: every rank asks
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            self.plot_path = os.path.join(folder, "sparsity_monitor.png")
            self._plot(self.plot_path)
            rank_zero_info(f"SparsityMonitor: wrote {self.plot_path}")

    def _plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h[0] for h in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [h[1] for h in self.history], color="tab:blue", label="feature rate")
        if self.target is not None and not isinstance(self.target, dict):
            ax.axhline(self.target, color="tab:blue", ls=":", label="target")
        ax.set_xlabel("step")
        ax.set_ylabel("feature rate (non-zero / seen rows)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(steps, [h[2] for h in self.history], color="tab:red", label="lambda21")
        ax2.set_ylabel("lambda21", color="tab:red")
        ax2.set_yscale("log")
        ax.set_title("SparsityMonitor")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"lambda21": dict(self.lambda21), "history": list(self.history),
                "history_stride": self.history_stride, "history_seen": self._history_seen,
                "target": self.target, "target_bytes": self.target_bytes,
                "ramp_steps": self.ramp_steps, "ramp_start": self.ramp_start,
                "schedule_start": self.schedule_start,
                "schedule": self.schedule, "schedule_share": self.schedule_share,
                "refit_share": self.refit_share, "refit_relax": self.refit_relax,
                "refit_start": self.refit_start, "projection_end": self.projection_end,
                "mark_steps": list(self.mark_steps),
                "seen_marks": [[st, dict(n)] for st, n in self.seen_marks],
                "refitting": self.refitting, "searched": self.searched}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lambda21 = dict(state_dict.get("lambda21", {}))
        self.searched = state_dict.get("searched")
        self.history = [tuple(h) for h in state_dict.get("history", [])]
        self.history_stride = int(state_dict.get("history_stride", 1))
        self._history_seen = int(state_dict.get("history_seen", len(self.history)))
        if state_dict.get("ramp_steps") is not None and self.schedule_share:
            self.ramp_steps = int(state_dict["ramp_steps"])  # the saved run's curve
            self.ramp_start = int(state_dict.get("ramp_start", 0))
        if state_dict.get("refit_start") is not None and self.refit_share:
            self.refit_start = int(state_dict["refit_start"])  # the saved run's refit steps
            self.refitting = bool(state_dict.get("refitting", False))
            if self.target is not None:  # and its projection (none saved: none made)
                end = state_dict.get("projection_end")
                self.projection_end = None if end is None else int(end)
                self.mark_steps = [int(v) for v in state_dict.get("mark_steps", [])]
                self.seen_marks = [(int(st), {str(k): int(v) for k, v in n.items()})
                                   for st, n in state_dict.get("seen_marks", [])]
