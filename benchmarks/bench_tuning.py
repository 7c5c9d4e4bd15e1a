"""Cost of the SparsityMonitor's tuning vs the training it interrupts, at production table sizes.

    python benchmarks/bench_tuning.py [--sizes 100000 1000000 4000000] [--ranks 1 2]
                                      [--tunings 10] [--run-steps 5000]

The workload of ``bench_fused.py`` (its ``ctr_stream``: 4 tables x dim 16, batch 512, Poisson(4)
Zipf(1.1) ids per bag, a fresh batch per step with a standard-normal target; row-wise
GroupAdagrad, one thread per rank); on 2 ranks the tables are row-wise split (each
rank holds half of every table's rows and trains on its own batches) and the collectives go over
gloo. The monitor's own code runs on the kernels through an adapter with the same face as its
TorchRec adapter. Two measurements per size:

1. **Held target** (the figure per tuning): every row is seen first (a pass over all ids, one
   bag per row with its own random gradient, so the index holds every row), then
   ``SparsityMonitor(0.2, schedule_share=0)``, the default ``tune_every_n_steps=10``. The first
   tuning moves lambda21 from its initial value to the
   target (it re-applies the prox to the ~80% of the rows that become zero: the bulk that a
   schedule spreads over its ramp) and is reported apart; then ``--tunings`` rounds of 10
   training steps + one tuning: the mean and the largest tuning, how many searched (the others
   found the exact counts on target and were skipped in O(tables)), the rows re-applied per
   tuning, the collectives of a searching tuning (the counts' included), and the share ``tuning / (tuning + 10
   steps)``; then ``--tunings`` rounds whose target moves by 1e-4 each time, with
   ``tolerance=0`` (no dead band), so that every tuning runs an exact search: the cost of a
   search at that size, and its share.
2. **Default-settings run** (the share over a whole fit): a fresh kernel, rows seen only by
   training, ``SparsityMonitor(0.2)`` with the default schedule and refit on a run of
   ``--run-steps`` steps, the Lightning hook's own decisions (``on_train_batch_end``); the total
   tuning time (refit start included) over the total training time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_sgl.callbacks import SparsityMonitor  # noqa: E402
from lightning_sgl.callbacks.sparsity_monitor import DEFAULT_SCHEDULE  # noqa: E402
from torchrec_ext import GroupTBE, TableSpec  # noqa: E402
from torchrec_ext.kernel.index import edge  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused import ctr_stream  # noqa: E402  (the workload of bench_fused.py)

TABLES, DIM, BATCH = 4, 16, 512


def allreduce_cpu(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


class KernelTables:
    """The monitor's table adapter over plain ``GroupTBE`` kernels (one per rank)."""

    def __init__(self, kernel: GroupTBE):
        self.kernel = kernel
        self.names = [t.name for t in kernel.tables]

    def counts(self):
        return self.counts_with(None)[0]

    def counts_with(self, extra):
        local = self.kernel.feature_counts()
        t = torch.tensor([local[n] for n in self.names], dtype=torch.float64).view(-1)
        n = t.numel()
        if extra is not None:
            t = torch.cat([t, extra.reshape(-1).to(torch.float64)])
        t = allreduce_cpu(t)
        counts = {name: (int(s), int(z)) for name, (s, z) in zip(self.names, t[:n].view(-1, 2).tolist())}
        return counts, None if extra is None else t[n:].view(extra.shape)

    def norms(self):
        return {n: (v, DIM) for n, v in self.kernel.shrink_norms().items()}

    def rows(self):  # each rank holds a row-wise split of every table
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {t.name: t.local_rows * world for t in self.kernel.tables}

    def lambda21(self):
        hp = self.kernel.table_hyperparameter_list(self.kernel.current_hyperparameters())
        return {t.name: float(h["lambda21"]) for t, h in zip(self.kernel.tables, hp)}

    def set_lambda21(self, values):
        self.kernel.set_table_hyperparameters({n: {"lambda21": v} for n, v in values.items()})

    def reapply(self):
        self.kernel.reapply_prox()

    # the shrink-norm index (as the monitor's TorchRec adapter: local values, no collective)
    def histograms(self):
        return self.kernel.shrink_histograms()

    def run_counts(self, buckets):
        return {n: self.kernel.shrink_run_counts(n, b) for n, b in buckets.items()}

    def value_counts(self, runs):
        return {n: self.kernel.shrink_value_counts(n, *bj) for n, bj in runs.items()}

    def reapply_between(self, bounds):
        return self.kernel.reapply_prox_between(bounds)

    @staticmethod
    def bucket_edge(b):
        return edge(b)

    # the refit (as the monitor's TorchRec adapter)
    def fix_support(self):
        self.kernel.set_table_hyperparameters({n: {"lambda1": 0.0, "lambda21": 0.0}
                                               for n in self.names})
        self.kernel.set_fixed_support(self.names)

    def scale_dual(self, factor):
        self.kernel.scale_dual(factor)


def make_kernel(local_rows: int) -> GroupTBE:
    kernel = GroupTBE([TableSpec(f"t{i}", local_rows, DIM) for i in range(TABLES)],
                      list(range(TABLES)), optimizer="adagrad", rowwise=True,
                      hyperparameters=dict(lr=0.05, eps=1e-8, lambda21=1e-4))
    for w in kernel.split_embedding_weights():
        w.uniform_(-0.01, 0.01)
    return kernel


def see_every_row(kernel: GroupTBE, local_rows: int, gen: torch.Generator) -> None:
    """One pass over all ids, one row per bag (so every row gets its own standard-normal
    gradient, as from a model's loss: no two rows alike)."""
    per = 1 << 16  # bags per table and call
    for start in range(0, local_rows, per):
        n = min(per, local_rows - start)
        ids = torch.arange(start, start + n).repeat(TABLES)
        offsets = torch.arange(TABLES * n + 1)
        (kernel(ids, offsets) * torch.randn(n, TABLES * DIM, generator=gen)).sum().backward()


def train_steps(kernel: GroupTBE, batches) -> None:
    """Training steps of ``bench_fused.py``: forward, ``(pooled * target).sum()``, backward (the
    fused update)."""
    for ids, offsets, target in batches:
        (kernel(ids, offsets) * target).sum().backward()


def monitor_on(kernel: GroupTBE, **kwargs) -> SparsityMonitor:
    monitor = SparsityMonitor(0.2, **kwargs)
    monitor._tables = KernelTables(kernel)
    monitor.lambda21 = monitor._tables.lambda21()
    return monitor


def timed(world: int, fn, *args) -> float:
    if world > 1:
        dist.barrier()  # the ranks start together: the time is the slower rank's
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def held_target(world: int, local_rows: int, gen, seed: int, tunings: int) -> dict:
    """Measurement 1 (module docstring)."""
    kernel = make_kernel(local_rows)
    see_every_row(kernel, local_rows, gen)
    stream = ctr_stream(TABLES, local_rows, BATCH, DIM, seed=seed)
    monitor = monitor_on(kernel, schedule_share=0.0)  # the target at once (ramp, refit: off)
    every = monitor.tune_every_n_steps

    def train(batches):
        train_steps(kernel, batches)

    def fresh():  # the next steps' batches, made before the clock starts
        return [next(stream) for _ in range(every)]

    train(fresh())
    first = timed(world, monitor._tune, every)
    first_rows = monitor.last_tuning["rows_reapplied"]
    step_times, tune_times, reapplied, searched, coll = [], [], [], 0, 0
    for i in range(tunings):
        step_times.append(timed(world, train, fresh()))
        tune_times.append(timed(world, monitor._tune, (i + 2) * every))
        last = monitor.last_tuning
        reapplied.append(last["rows_reapplied"])
        if not last.get("skipped"):
            searched += 1
            coll = last["collectives"]
    counts = monitor._tables.counts()
    seen = sum(s for s, _ in counts.values())
    # searches: the target nudged by 1e-4 at every tuning, without the dead band (which would
    # skip such a nudge), so that every tuning runs an exact search
    search_times, search_rows = [], []
    monitor.tolerance = 0.0
    for i in range(tunings):
        monitor.target = 0.2 + (1e-4 if i % 2 == 0 else 0.0)
        step_times.append(timed(world, train, fresh()))
        search_times.append(timed(world, monitor._tune, (tunings + i + 2) * every))
        assert not monitor.last_tuning.get("skipped")
        search_rows.append(monitor.last_tuning["rows_reapplied"])
        coll = monitor.last_tuning["collectives"]
    return dict(first=first, first_rows=first_rows, train=statistics.mean(step_times),
                tune=statistics.mean(tune_times), tune_max=max(tune_times), searched=searched,
                tunings=tunings, collectives=coll, reapplied=statistics.mean(reapplied),
                rate=sum(z for _, z in counts.values()) / seen,
                search=statistics.mean(search_times), search_max=max(search_times),
                search_rows=statistics.mean(search_rows))


def default_run(world: int, local_rows: int, seed: int, steps: int) -> dict:
    """Measurement 2 (module docstring): the hook's own decisions on a default-settings run."""
    from types import SimpleNamespace

    kernel = make_kernel(local_rows)
    stream = ctr_stream(TABLES, local_rows, BATCH, DIM, seed=seed)
    monitor = monitor_on(kernel)  # DEFAULT_SCHEDULE: keep all, cubic ramp, refit
    monitor.log_every_n_steps = 10 * steps  # no logging (no LightningModule here)
    monitor.plan_steps(steps, steps)  # on_train_start: the step count, one epoch
    train_s = tune_s = 0.0
    tunings = searches = 0
    for step in range(1, steps + 1):
        train_s += timed(1, train_steps, kernel, [next(stream)])
        before = monitor.last_tuning
        trainer = SimpleNamespace(global_step=step, log_every_n_steps=10 * steps,
                                  is_last_batch=step == steps)  # one epoch
        tune_s += timed(world, monitor.on_train_batch_end, trainer, None, None, None, 0)
        tunings += monitor.last_tuning is not before
        searches += monitor.last_tuning is not before and not monitor.last_tuning.get("skipped")
    counts = monitor._tables.counts()
    seen = sum(s for s, _ in counts.values())
    return dict(run_train=train_s, run_tune=tune_s, run_tunings=tunings, run_searches=searches,
                run_seen=seen,
                run_rate=sum(z for _, z in counts.values()) / seen)


def run(rank: int, world: int, port: int, rows: int, out: dict | None, tunings: int = 10,
        run_steps: int = 5000):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    torch.set_num_threads(1)
    rank_zero_only.rank = rank  # the monitor's messages from rank 0 only
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # the tables' initial weights: a run is reproducible
    gen = torch.Generator().manual_seed(rank)
    got = held_target(world, rows // world, gen, rank, tunings)
    if run_steps:
        got.update(default_run(world, rows // world, 100 + rank, run_steps))
    if rank == 0 and out is not None:
        out.update(got)
    if world > 1:
        dist.destroy_process_group()


def _spawned(rank, world, port, rows, path, tunings, run_steps):
    out = {}
    run(rank, world, port, rows, out, tunings, run_steps)
    if rank == 0:
        torch.save(out, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000, 4_000_000])
    ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--tunings", type=int, default=10, help="held-target tunings timed")
    ap.add_argument("--run-steps", type=int, default=5000,
                    help="steps of the default-settings run (0: skip it)")
    args = ap.parse_args(argv)
    print(f"{TABLES} tables x dim {DIM}, batch {BATCH} per rank, row-wise GroupAdagrad, target "
          f"feature rate 0.2, tune_every_n_steps=10 (the default). Held target: every row seen, "
          f"{args.tunings} tunings; run: {args.run_steps} steps, default schedule "
          f"{DEFAULT_SCHEDULE}")
    print("| rows / table | ranks | first tuning ms (rows re-applied) | tuning ms, mean / max | "
          "searched | rows re-applied / tuning | 10 training steps ms | tuning share | "
          "search ms, mean / max (rows re-applied) | search share | collectives / search | "
          "rate after | default run: tunings (searched), share | run rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rows in args.sizes:
        for world in args.ranks:
            if world == 1:
                out: dict = {}
                run(0, 1, 0, rows, out, args.tunings, args.run_steps)
            else:
                import socket
                import tempfile

                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                path = os.path.join(tempfile.mkdtemp(), "out.pt")
                mp.spawn(_spawned, args=(world, port, rows, path, args.tunings, args.run_steps),
                         nprocs=world, join=True)
                out = torch.load(path)
            share = out["tune"] / (out["tune"] + out["train"])
            line = (f"| {rows:,} | {world} | {out['first'] * 1e3:.0f} ({out['first_rows']:,}) | "
                    f"{out['tune'] * 1e3:.2f} / {out['tune_max'] * 1e3:.2f} | "
                    f"{out['searched']}/{out['tunings']} | {out['reapplied']:,.0f} | "
                    f"{out['train'] * 1e3:.1f} | {share:.1%} | "
                    f"{out['search'] * 1e3:.2f} / {out['search_max'] * 1e3:.2f} "
                    f"({out['search_rows']:,.0f}) | "
                    f"{out['search'] / (out['search'] + out['train']):.1%} | "
                    f"{out['collectives']} | {out['rate']:.4f} | ")
            if "run_train" in out:
                run_share = out["run_tune"] / (out["run_tune"] + out["run_train"])
                line += (f"{out['run_tunings']} ({out['run_searches']} searched), "
                         f"{run_share:.1%} | {out['run_rate']:.4f} |")
            else:
                line += "- | - |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
