"""Fused-table step time (forward + backward + update) against FBGEMM's own fused CPU kernels.

Workloads (one thread, one process, every kernel on the same tables and ids, the runs taking
turns chunk by chunk so that machine noise hits all alike):

- ``ctr`` (default): 4 tables x dim 16, batch 512, multi-hot bags (Poisson(4) ids per bag, so
  mean 4 and ~2% empty bags), heavy-tailed ids (Zipf(1.1) ranks mapped to random rows), swept
  over 1e5, 1e6 and 4e6 rows per table;
- ``uniform``: 8 tables x 100k rows x dim 16, batch 512, one uniform id per bag (the old one).

For each size it prints every kernel's step time divided by FBGEMM ``EXACT_ROWWISE_ADAGRAD`` and
``EXACT_ADAGRAD``; the Group kernels also with a per-table lambda21 set on every table (the same
kernel, divided by its time with one global lambda21); and the update phase alone (the native
backward op, after a forward) divided by a plain gather + scatter (``index_select`` +
``index_copy_``) of the same unique rows of the weights and every state array.

    python benchmarks/bench_fused.py [--workload ctr|uniform] [--sizes 100000 1000000 4000000]
                                     [--iters 120] [--rounds 6] [--eager]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np
import torch

from torchrec_ext import GroupTBE, TableSpec
from torchrec_ext.kernel import native


def ctr_stream(tables, rows, batch, dim, mean_len=4.0, zipf=1.1, seed=0):
    """Endless multi-hot bags with heavy-tailed ids (see the module docstring), TBE layout:
    ``(indices, offsets, target)`` per batch, the loss of a batch being ``(pooled * target).sum()``
    (a fresh standard-normal ``target`` per batch, so rows get gradients of every direction and
    size, as from a model's loss). Each table's Zipf ranks map to rows through one fixed random
    permutation, so the same rows stay hot over the stream."""
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(rows) for _ in range(tables)]
    while True:
        lengths = rng.poisson(mean_len, size=(tables, batch))
        idx = []
        for t in range(tables):
            ranks = (rng.zipf(zipf, size=int(lengths[t].sum())) - 1) % rows
            idx.append(perms[t][ranks])
        lengths = torch.from_numpy(lengths.reshape(-1))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        indices = torch.from_numpy(np.concatenate(idx)).long()
        yield indices, offsets, torch.from_numpy(
            rng.standard_normal((batch, tables * dim), dtype=np.float32))


def ctr_batches(n, tables, rows, batch, dim, mean_len=4.0, zipf=1.1, seed=0):
    """The first ``n`` batches of :func:`ctr_stream`."""
    stream = ctr_stream(tables, rows, batch, dim, mean_len, zipf, seed)
    return [next(stream) for _ in range(n)]


def uniform_batches(n, tables, rows, batch, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, rows, (tables * batch,), generator=gen),
             torch.arange(tables * batch + 1), torch.randn(batch, tables * dim, generator=gen))
            for _ in range(n)]


def step_times(fn, data):
    times = []
    for indices, offsets, target in data:
        t0 = time.perf_counter()
        (fn(indices, offsets) * target).sum().backward()
        times.append(time.perf_counter() - t0)
    return times


def _huge_pages_mib() -> str:
    """AnonHugePages of this process (MiB), or '?' where /proc does not say."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return str(int(line.split()[1]) // 1024)
    except OSError:
        pass
    return "?"


def time_all(runs: dict, data, warmup: int, rounds: int, rewarm: int = 10) -> dict:
    """Median step time of each run; the timed steps are split into ``rounds`` chunks and the runs
    take turns chunk by chunk (a slow spell of the machine hits all of them alike).

    Before each timed chunk a run takes ``rewarm`` untimed steps (warm-up batches, other ids):
    in training a step follows a step of the same kernel, so its hot rows and page-table entries
    are warm; without this, the run after another kernel pays for that kernel's evictions
    (gigabytes at 4M rows per table), and a run that follows a run of the *same* kernel on the
    same ids (global vs per-table lambda21) would get a cache the other one warmed -- a bias of
    up to 3x at 4M rows seen before this was added (with 4 KiB pages the page-table entries of
    gigabyte tables alone are megabytes, and ten steps restore them)."""
    for fn, _, setup in runs.values():
        setup()
        step_times(fn, data[:warmup])
    timed = data[warmup:]
    again = data[max(0, warmup - rewarm):warmup]
    size = max(1, len(timed) // rounds)
    times = {name: [] for name in runs}
    for start in range(0, len(timed), size):
        for name, (fn, _, setup) in runs.items():
            setup()
            step_times(fn, again)
            times[name] += step_times(fn, timed[start:start + size])
    return {name: statistics.median(t) for name, t in times.items()}


def update_phase(kernel: GroupTBE, data, reps: int) -> tuple[float, float]:
    """Median time of the native update op alone and of a plain gather + scatter of the same
    kind of unique rows of the weights and every state array. Batches alternate between the two
    (op on even batches, gather+scatter on odd ones), each measured right after the forward of
    its own batch: both find the rows of the previous step warm and their own rows' dual and
    states cold, as in training (timing the scatter right after the op on the same rows would
    hand it the cache the op just warmed)."""
    lay = kernel.layout
    st = kernel.native_static()
    bufs = [kernel.weights, kernel.dual, *(getattr(kernel, n) for n in kernel.state_names),
            kernel.seen]
    widths = [lay.tables[0].local_cols] * 2 + [
        1 if kernel.is_rowwise(n) else lay.tables[0].local_cols for n in kernel.state_names] + [1]
    views = [b.view(-1, w) for b, w in zip(bufs, widths)]
    t_op, t_gs = [], []
    for i, (indices, offsets, target) in enumerate(data[:2 * reps]):
        batch = (offsets.numel() - 1) // len(kernel.feature_table_map)
        feature = torch.arange(len(kernel.feature_table_map)).repeat_interleave(batch)
        table = torch.tensor(kernel.feature_table_map)[feature]
        base = torch.tensor(lay.row_offsets)[table]
        rows = torch.repeat_interleave(base, offsets[1:] - offsets[:-1]) + indices
        uniq = torch.unique(rows)
        hp = kernel.current_hyperparameters()
        mat = kernel.native_hp(hp).at(float(kernel.step.item()) + 1)
        with torch.no_grad():
            kernel(indices, offsets)
        if i % 2 == 0:
            t0 = time.perf_counter()
            native.backward(target, indices, offsets, None, st["ftm"], st["fcol"],
                            lay.native_tables, kernel.weights, kernel.dual,
                            [getattr(kernel, n) for n in kernel.state_names], st["rowwise"],
                            kernel.seen, mat, kernel.feature_counts_state.counts,
                            kernel.shrink_index.tensors(), rule=kernel.optimizer,
                            rowwise=kernel.rowwise, exact=kernel.exact,
                            mean=kernel.pooling == "mean", skip=False)
            t_op.append(time.perf_counter() - t0)
            kernel.step += 1
        else:
            kernel.feature_counts_state.begin()  # values unchanged: the counts stay valid
            t0 = time.perf_counter()
            for v in views:
                v.index_copy_(0, uniq, v.index_select(0, uniq))
            t_gs.append(time.perf_counter() - t0)
            kernel.feature_counts_state.end()
    return statistics.median(t_op), statistics.median(t_gs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", choices=("ctr", "uniform"), default="ctr")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--tables", type=int, default=None)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6, help="turns the runs take (see time_all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eager", action="store_true", help="also time the eager (compiled=False) path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    ctr = args.workload == "ctr"
    tables = args.tables or (4 if ctr else 8)
    sizes = args.sizes or ([100_000, 1_000_000, 4_000_000] if ctr else [100_000])
    print(f"workload {args.workload}: {tables} tables x dim {args.dim}, batch {args.batch}, "
          + ("Poisson(4) ids per bag, Zipf(1.1) ids" if ctr else "1 uniform id per bag")
          + f"; {torch.get_num_threads()} thread(s); native update "
          + ("built" if native.available() else "NOT built (eager)"))
    for rows in sizes:
        n = args.iters + args.warmup
        data = (ctr_batches if ctr else uniform_batches)(n, tables, rows, args.batch, args.dim)
        ids = sum(int(d[0].numel()) for d in data) / n
        uniq = statistics.mean(len(torch.unique(d[0] + torch.repeat_interleave(
            torch.arange(tables).repeat_interleave(args.batch) * rows, d[1][1:] - d[1][:-1])))
            for d in data[:20])
        specs = [(rows, args.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * tables

        def fbgemm(optim, specs=specs):
            m = SplitTableBatchedEmbeddingBagsCodegen(
                embedding_specs=specs, feature_table_map=list(range(tables)), optimizer=optim,
                learning_rate=0.01, eps=1e-8)
            return (lambda ind, off: m(indices=ind, offsets=off)), m, (lambda: None)

        def group(opt, rowwise, compiled=None, rows=rows):
            hp = dict(lr=0.01, eps=1e-8, lambda21=1e-4)
            m = GroupTBE([TableSpec(f"t{i}", rows, args.dim) for i in range(tables)],
                         list(range(tables)), optimizer=opt, hyperparameters=hp,
                         rowwise=rowwise, compiled=compiled)
            for w in m.split_embedding_weights():
                w.uniform_(-0.01, 0.01)
            return m

        runs = {"FBGEMM EXACT_ROWWISE_ADAGRAD": fbgemm(OptimType.EXACT_ROWWISE_ADAGRAD),
                "FBGEMM EXACT_ADAGRAD": fbgemm(OptimType.EXACT_ADAGRAD)}
        kernels = {}
        for name, opt, rw in (("GroupAdagrad(rowwise)", "adagrad", True),
                              ("GroupAdam(rowwise)", "adam", True),
                              ("GroupAdagrad", "adagrad", False),
                              ("GroupAdam", "adam", False)):
            m = kernels[name] = group(opt, rw)
            per_table = {t.name: {"lambda21": 1e-4 * (1 + 0.1 * i)} for i, t in enumerate(m.tables)}
            clear = {t.name: {"lambda21": None} for t in m.tables}
            runs[name] = (m, m, lambda m=m, c=clear: m.set_table_hyperparameters(c))
            runs[name + " per-table lambda21"] = (
                m, m, lambda m=m, p=per_table: m.set_table_hyperparameters(p))
            if args.eager:
                e = group(opt, rw, compiled=False)
                runs[name + " eager"] = (e, e, lambda: None)
        gc.collect()
        times = time_all(runs, data, args.warmup, args.rounds)
        base_r = times["FBGEMM EXACT_ROWWISE_ADAGRAD"]
        base_e = times["FBGEMM EXACT_ADAGRAD"]
        print(f"\n{rows:,} rows per table: {ids:.0f} ids and {uniq:.0f} unique rows per step; "
              f"{_huge_pages_mib()} MiB of the process in transparent huge pages")
        print("| kernel | ms/step | / EXACT_ROWWISE_ADAGRAD | / EXACT_ADAGRAD | "
              "per-table lambda21 / global | state floats/row |")
        print("|---|---|---|---|---|---|")
        for name, t in times.items():
            if name.endswith("per-table lambda21"):
                continue
            module = runs[name][1]
            if isinstance(module, GroupTBE):
                floats = module.state_bytes_per_row()["state"] / module.weights.element_size()
            else:
                st = module.get_optimizer_state()[0]
                floats = sum(v.numel() for v in st.values()) / rows
            pt = times.get(name + " per-table lambda21")
            ratio = f"{pt / t:.2f}" if pt is not None else ""
            print(f"| {name} | {t * 1e3:.3f} | {t / base_r:.2f} | {t / base_e:.2f} | {ratio} | "
                  f"{floats:g} |")
        if native.available():
            print("\n| update phase (native op) | ms | plain gather+scatter of the same rows ms | ratio |")
            print("|---|---|---|---|")
            for name, m in kernels.items():
                op, gs = update_phase(m, data[args.warmup:], min(30, args.iters))
                print(f"| {name} | {op * 1e3:.3f} | {gs * 1e3:.3f} | {op / gs:.2f} |")
        del runs, kernels, data
        gc.collect()


if __name__ == "__main__":
    main()
