"""Fused table step time (forward + backward + update) vs FBGEMM's own fused CPU kernels.

8 tables x 100k rows x dim 16, batch 512, 1 id per feature, one thread, one process. Prints each
Group kernel's time divided by FBGEMM ``EXACT_ADAGRAD`` and ``EXACT_ROWWISE_ADAGRAD`` on the same
tables and ids, and the optimizer-state bytes per row.

    python benchmarks/bench_fused.py [--iters 200] [--rounds 10] [--threads 1] [--eager]

The Group kernels run with their default ``compiled=None``, which compiles the update for tables
this size (see ``torchrec_ext.kernel.COMPILE_MIN_WEIGHTS``); ``--eager`` adds the eager ground
truth (``compiled=False``).

The runs take turns in rounds (``--rounds``) so that machine noise affects all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)

from torchrec_ext import GroupTBE, TableSpec


def batches(n, tables, rows, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        indices = torch.randint(0, rows, (tables * batch,), generator=gen)
        offsets = torch.arange(tables * batch + 1)
        out.append((indices, offsets, torch.randn(batch, tables * 16, generator=gen)))
    return out


def step_times(fn, data):
    times = []
    for indices, offsets, target in data:
        t0 = time.perf_counter()
        (fn(indices, offsets) * target).sum().backward()
        times.append(time.perf_counter() - t0)
    return times


def time_all(runs: dict, data, warmup: int, rounds: int) -> dict:
    """Median step time of each run. The timed steps are split into ``rounds`` chunks and the
    runs take turns chunk by chunk, so that a slow spell of the machine hits all of them alike
    (the ratios are what is reported)."""
    for fn, _ in runs.values():
        step_times(fn, data[:warmup])
    timed = data[warmup:]
    size = max(1, len(timed) // rounds)
    times = {name: [] for name in runs}
    for start in range(0, len(timed), size):
        for name, (fn, _) in runs.items():
            times[name] += step_times(fn, timed[start:start + size])
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10, help="turns the runs take (see time_all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eager", action="store_true", help="also time the eager (compiled=False) path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = batches(args.iters + args.warmup, args.tables, args.rows, args.batch)
    specs = [(args.rows, args.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * args.tables

    def fbgemm(optim):
        m = SplitTableBatchedEmbeddingBagsCodegen(embedding_specs=specs,
                                                  feature_table_map=list(range(args.tables)),
                                                  optimizer=optim, learning_rate=0.01, eps=1e-8)
        return lambda i, o: m(indices=i.int(), offsets=o.int()), m

    def group(opt, rowwise, compiled=None):
        hp = dict(lr=0.01, eps=1e-8, lambda21=1e-4)
        m = GroupTBE([TableSpec(f"t{i}", args.rows, args.dim) for i in range(args.tables)],
                     list(range(args.tables)), optimizer=opt, hyperparameters=hp,
                     rowwise=rowwise, compiled=compiled)
        for w in m.split_embedding_weights():
            w.uniform_(-0.01, 0.01)
        return m, m

    runs = {"FBGEMM EXACT_ADAGRAD": fbgemm(OptimType.EXACT_ADAGRAD),
            "FBGEMM EXACT_ROWWISE_ADAGRAD": fbgemm(OptimType.EXACT_ROWWISE_ADAGRAD)}
    for compiled in ((None, False) if args.eager else (None,)):
        tag = " eager" if compiled is False else ""
        runs[f"GroupAdagrad{tag}"] = group("adagrad", False, compiled)
        runs[f"GroupAdagrad(rowwise){tag}"] = group("adagrad", True, compiled)
        runs[f"GroupAdam{tag}"] = group("adam", False, compiled)
        runs[f"GroupAdam(rowwise){tag}"] = group("adam", True, compiled)
    times = time_all(runs, data, args.warmup, args.rounds)
    base_e = times["FBGEMM EXACT_ADAGRAD"]
    base_r = times["FBGEMM EXACT_ROWWISE_ADAGRAD"]
    print(f"{args.tables} tables x {args.rows} rows x dim {args.dim}, batch {args.batch}, "
          f"1 id/feature, {torch.get_num_threads()} thread(s)")
    print("| kernel | ms/step | / EXACT_ADAGRAD | / EXACT_ROWWISE_ADAGRAD | state floats/row | "
          "bookkeeping bytes/row |")
    print("|---|---|---|---|---|---|")
    for name, t in times.items():
        module = runs[name][1]
        if isinstance(module, GroupTBE):
            b = module.state_bytes_per_row()
            floats, book = b["state"] / 4, b["bookkeeping"]
        else:
            st = module.get_optimizer_state()[0]
            floats = sum(v.numel() for v in st.values()) / args.rows
            book = 0
        print(f"| {name} | {t * 1e3:.3f} | {t / base_e:.2f} | {t / base_r:.2f} | {floats:g} | "
              f"{book} |")
    auto = [m for name, (_, m) in runs.items() if isinstance(m, GroupTBE) and m.compiled is None]
    if auto:
        print(f"\nGroup kernels without a tag: compiled=None -> "
              f"{'compiled' if auto[0]._compile_update() else 'eager'} update at this size")


if __name__ == "__main__":
    main()
