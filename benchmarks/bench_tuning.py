"""Cost of one SparsityMonitor tuning vs the training it interrupts, at production table sizes.

    python benchmarks/bench_tuning.py [--sizes 100000 1000000 4000000] [--ranks 1 2]

The workload of ``bench_fused.py`` (4 tables x dim 16, batch 512, Poisson(4) Zipf(1.1) ids per
bag, row-wise GroupAdagrad, one thread per rank). Every row is seen first (a pass over all ids),
then the monitor's own ``_tune`` (counts, shrink norms, the threshold search, the prox
re-application) runs on the tables through an adapter with the same face as the monitor's
TorchRec adapter; on 2 ranks the tables are row-wise split (each rank holds half of every
table's rows and trains on its own batches) and the collectives go over gloo. Printed per size:
the time of one tuning, of ``tune_every_n_steps`` (default 10) training steps, the share, the
share over a run with the monitor's default schedule (tunings run on the ramp only --
``DEFAULT_SCHEDULE["schedule_share"]`` of the steps: before it a tuning that keeps every row is
skipped in O(tables), during the refit none runs), and the number of collectives of the
threshold search.
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
        local = self.kernel.feature_counts()
        t = torch.tensor([local[n] for n in self.names], dtype=torch.float64)
        t = allreduce_cpu(t)
        return {n: (int(s), int(z)) for n, (s, z) in zip(self.names, t.tolist())}

    def norms(self):
        return {n: (v, DIM) for n, v in self.kernel.shrink_norms().items()}

    def lambda21(self):
        hp = self.kernel.table_hyperparameter_list(self.kernel.current_hyperparameters())
        return {t.name: float(h["lambda21"]) for t, h in zip(self.kernel.tables, hp)}

    def set_lambda21(self, values):
        self.kernel.set_table_hyperparameters({n: {"lambda21": v} for n, v in values.items()})

    def reapply(self):
        self.kernel.reapply_prox()


def zipf_batch(gen, rows: int):
    lengths = torch.poisson(torch.full((TABLES * BATCH,), 4.0), generator=gen).long()
    n = int(lengths.sum())
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    ids = ((rows + 1.0) ** (u ** 1.1) - 1.0).long().clamp(max=rows - 1)  # heavy head
    ids = (ids * 2654435761) % rows
    return ids, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def run(rank: int, world: int, port: int, rows: int, out: dict | None):
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    local_rows = rows // world
    kernel = GroupTBE([TableSpec(f"t{i}", local_rows, DIM) for i in range(TABLES)],
                      list(range(TABLES)), optimizer="adagrad", rowwise=True,
                      hyperparameters=dict(lr=0.05, eps=1e-8, lambda21=1e-4))
    for w in kernel.split_embedding_weights():
        w.uniform_(-0.01, 0.01)
    gen = torch.Generator().manual_seed(rank)
    # see every row once: bags of consecutive ids covering each table
    per = TABLES * BATCH * 8
    for start in range(0, local_rows, per // TABLES):
        ids = torch.cat([torch.arange(start, min(start + per // TABLES, local_rows))
                         for _ in range(TABLES)])
        n = min(per // TABLES, local_rows - start)
        lengths = torch.full((TABLES * BATCH,), 0, dtype=torch.long)
        lengths[::BATCH] = n  # one bag per table holds the whole slice
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        kernel(ids, offsets).sum().backward()
    batches = [zipf_batch(gen, local_rows) for _ in range(40)]
    monitor = SparsityMonitor(0.2, schedule_share=0.0)  # a tuning on the target (ramp, refit: off)
    monitor._tables = KernelTables(kernel)
    monitor.lambda21 = monitor._tables.lambda21()

    def train(steps):
        t0 = time.perf_counter()
        for i in range(steps):
            ids, offsets = batches[i % len(batches)]
            kernel(ids, offsets).sum().backward()
        return time.perf_counter() - t0

    train(10)
    step_times, tune_times = [], []
    for i in range(5):  # the median skips the first tunings' compiles of the row services
        step_times.append(train(monitor.tune_every_n_steps))
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        monitor._tune((i + 2) * monitor.tune_every_n_steps)
        tune_times.append(time.perf_counter() - t0)
    counts = monitor._tables.counts()
    seen = sum(s for s, _ in counts.values())
    rate = sum(z for _, z in counts.values()) / seen
    if rank == 0 and out is not None:
        out.update(train=statistics.median(step_times), tune=statistics.median(tune_times),
                   collectives=monitor.last_tuning["threshold_collectives"], seen=seen, rate=rate)
    if world > 1:
        dist.destroy_process_group()


def _spawned(rank, world, port, rows, path):
    out = {}
    run(rank, world, port, rows, out)
    if rank == 0:
        torch.save(out, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000, 4_000_000])
    ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args(argv)
    print(f"{TABLES} tables x dim {DIM}, batch {BATCH} per rank, row-wise GroupAdagrad, every row "
          "seen; target feature rate 0.2, tune_every_n_steps=10 (the default)")
    print("| rows / table | ranks | one tuning ms | 10 training steps ms | tuning share | "
          "share, default schedule run | threshold collectives | rate after |")
    print("|---|---|---|---|---|---|---|---|")
    ramp = DEFAULT_SCHEDULE["schedule_share"]
    for rows in args.sizes:
        for world in args.ranks:
            if world == 1:
                out: dict = {}
                run(0, 1, 0, rows, out)
            else:
                import socket
                import tempfile

                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                path = os.path.join(tempfile.mkdtemp(), "out.pt")
                mp.spawn(_spawned, args=(world, port, rows, path), nprocs=world, join=True)
                out = torch.load(path)
            share = out["tune"] / (out["tune"] + out["train"])
            run_share = ramp * out["tune"] / (ramp * out["tune"] + out["train"])
            print(f"| {rows:,} | {world} | {out['tune'] * 1e3:.1f} | {out['train'] * 1e3:.1f} | "
                  f"{share:.0%} | {run_share:.0%} | {out['collectives']} | {out['rate']:.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
