"""Step time of GroupAdam vs torch.optim.Adam(foreach=True), measured in one process.

Model: one embedding table + MLP, about 5M parameters, dense gradients. Prints the ratio of the
optimizer step time (median over repeats) and of the whole iteration (forward+backward+step).

    python benchmarks/bench_dense.py [--rows 600000] [--dim 8] [--iters 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_sgl import GroupAdam
from lightning_sgl.models import EmbeddingMLP


def build(rows: int, dim: int, fields: int):
    torch.manual_seed(0)
    sizes = [rows // fields] * fields
    return EmbeddingMLP(sizes, dim=dim, hidden=(256, 128))


def measure(model, opt, batches, warmup: int):
    step_t, iter_t = [], []
    for i, (ids, y) in enumerate(batches):
        t0 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            step_t.append(t2 - t1)
            iter_t.append(t2 - t0)
    return statistics.median(step_t), statistics.median(iter_t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=600_000)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--fields", type=int, default=8)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    per_field = args.rows // args.fields
    batches = [(torch.randint(0, per_field, (args.batch, args.fields), generator=gen),
                torch.randint(0, 2, (args.batch,), generator=gen).float())
               for _ in range(args.iters + args.warmup)]
    model = build(args.rows, args.dim, args.fields)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, device cpu")
    results = {}
    configs = {
        "Adam(foreach=True)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True),
        "GroupAdam (eager)": lambda m: GroupAdam(m.parameters(), lr=1e-3, lambda21=1e-4),
        "GroupAdam (compiled)": lambda m: GroupAdam(m.parameters(), lr=1e-3, lambda21=1e-4,
                                                    compiled=True),
    }
    for name, make in configs.items():
        m = build(args.rows, args.dim, args.fields)
        results[name] = measure(m, make(m), batches, args.warmup)
    base_step, base_iter = results["Adam(foreach=True)"]
    print(f"{'optimizer':24s} {'step ms':>9s} {'step ratio':>11s} {'iter ms':>9s} {'iter ratio':>11s}")
    for name, (st, it) in results.items():
        print(f"{name:24s} {st * 1e3:9.2f} {st / base_step:11.2f} {it * 1e3:9.2f} "
              f"{it / base_iter:11.2f}")


if __name__ == "__main__":
    main()
