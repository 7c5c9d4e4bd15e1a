"""CUDA checks for a bare torch + CUDA machine (no TorchRec, no FBGEMM needed).

    scripts/gpu_check.sh              # on a GPU machine: every check on CUDA, then a timing
    scripts/gpu_check.sh --dry-run    # anywhere: the same checks on CPU at small size (CI)

1. Theorem 2 on the device: every Group optimizer with zero lambdas == its ``torch.optim`` base
   (Momentum/SGD, Adagrad, Adam, AMSGrad), eager and compiled, 8 steps.
2. ``GroupTBE`` on the device == ``GroupTBE`` on CPU (eager), lambdas > 0 (rows zeroed),
   element-wise and row-wise, 8 steps: weights and every state.
3. The fast update (Triton through ``torch.compile`` on CUDA; the native update on CPU) == the
   eager update on the same device.
4. Timing: one step of ``GroupTBE`` (row-wise GroupAdagrad and GroupAdam) vs ``nn.EmbeddingBag``
   + ``torch.optim.SparseAdam`` on the same tables and multi-hot Zipf ids, in one process, runs
   taking turns.

Prints one JSON line per check and exits non-zero when a check fails. Budget: < 8 minutes on a
GPU (the compile of each configuration is the main cost).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_sgl.optim import (  # noqa: E402
    GroupAdagrad,
    GroupAdam,
    GroupAMSGrad,
    GroupMomentum,
    mark_embedding,
)
from torchrec_ext.kernel import GroupTBE, TableSpec  # noqa: E402

FAILED: list[str] = []


def report(check: str, ok: bool, **figures) -> None:
    print(json.dumps({"check": check, "ok": bool(ok), **figures}), flush=True)
    if not ok:
        FAILED.append(check)


# ------------------------------------------------------------------ 1. Theorem 2 on the device
THEOREM2 = [
    ("momentum", GroupMomentum, dict(lr=0.05, momentum=0.9),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    ("adagrad", GroupAdagrad, dict(lr=0.1, eps=1e-10),
     lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10)),
    ("adam", GroupAdam, dict(lr=0.01, eps=1e-8), lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8)),
    ("amsgrad", GroupAMSGrad, dict(lr=0.01, eps=1e-8),
     lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8, amsgrad=True)),
]


def theorem2(device: str, steps: int = 8) -> None:
    for name, cls, kw, base in THEOREM2:
        for compiled in (False, True):
            gen = torch.Generator().manual_seed(0)
            x0 = torch.randn(64, 16, generator=gen, dtype=torch.float64)
            grads = [torch.randn(64, 16, generator=gen, dtype=torch.float64) for _ in range(steps)]
            a = torch.nn.Parameter(x0.clone().to(device))
            b = torch.nn.Parameter(x0.clone().to(device))
            mark_embedding(a)
            opt_a, opt_b = cls([a], **kw, compiled=compiled), base([b])
            for g in grads:
                a.grad, b.grad = g.to(device), g.to(device)
                opt_a.step()
                opt_b.step()
            err = (a - b).abs().max().item()
            report(f"theorem2/{name}/{'compiled' if compiled else 'eager'}", err <= 1e-10,
                   device=device, max_abs_diff=err)


# ------------------------------------------------------------------ 2-3. GroupTBE on the device
TABLES = [TableSpec("a", 50, 16), TableSpec("b", 40, 8), TableSpec("c", 30, 16)]
FTM = [0, 1, 2, 0]
HP = {"adagrad": dict(lr=0.1, eps=1e-8), "adam": dict(lr=0.05, betas=(0.8, 0.99), eps=1e-8)}
LAMBDAS = dict(lambda1=1e-2, lambda21=4.0, lambda2=1e-3)


def _batches(steps: int, batch: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(0, 5, (len(FTM) * batch,), generator=gen)
        ids = torch.cat([torch.randint(0, TABLES[FTM[f]].local_rows, (int(n),), generator=gen)
                         for f, n in zip((i // batch for i in range(len(lengths))), lengths)])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        width = sum(TABLES[t].local_cols for t in FTM)
        out.append((ids, offsets, torch.randn(batch, width, generator=gen)))
    return out


def _train(kernel: GroupTBE, device: str, batches) -> dict[str, torch.Tensor]:
    for ids, offsets, target in batches:
        out = kernel(ids.to(device), offsets.to(device))
        (out * target.to(device)).sum().backward()
    state = {"weights": kernel.weights.detach().cpu()}
    for i, st in enumerate(kernel.get_optimizer_state()):
        for k, v in st.items():
            state[f"{i}.{k}"] = v.detach().cpu()
    return state


def _kernel(opt: str, rowwise: bool, device: str, compiled: bool) -> GroupTBE:
    k = GroupTBE(TABLES, FTM, optimizer=opt, hyperparameters={**HP[opt], **LAMBDAS},
                 rowwise=rowwise, compiled=compiled, device=device)
    with torch.no_grad():
        k.weights.copy_(torch.linspace(-0.3, 0.3, k.weights.numel()).to(device))
    return k


def _diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs() / b[k].abs().clamp(min=1.0)).max().item() for k in a)


def kernel_checks(device: str, steps: int = 8) -> None:
    batches = _batches(steps)
    for opt in HP:
        for rowwise in (False, True):
            tag = f"{opt}/{'rowwise' if rowwise else 'elementwise'}"
            cpu = _train(_kernel(opt, rowwise, "cpu", False), "cpu", batches)
            eager = _kernel(opt, rowwise, device, False)
            dev = _train(eager, device, batches)
            layout = _kernel(opt, rowwise, "cpu", False).layout
            zero_rows = sum(int(layout.table_view(cpu["weights"], i).eq(0).all(1).sum())
                            for i in range(len(TABLES)))
            err = _diff(dev, cpu)
            report(f"kernel/{device}-vs-cpu/{tag}", err <= 2e-6, max_rel_diff=err,
                   rows_zeroed=zero_rows)
            fast = _kernel(opt, rowwise, device, True)
            engine = fast.engine()
            err = _diff(_train(fast, device, batches), dev)
            report(f"kernel/{engine}-vs-eager/{tag}", err <= 2e-6, device=device,
                   engine=engine, max_rel_diff=err)


# ------------------------------------------------------------------ 4. timing
def _zipf_batch(gen, rows: int, tables: int, batch: int, hot: int) -> tuple:
    """Multi-hot bags (Poisson-ish lengths around ``hot``), Zipf(1.05)-like ids."""
    lengths = torch.randint(1, 2 * hot, (tables * batch,), generator=gen)
    n = int(lengths.sum())
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    ids = ((rows + 1.0) ** u - 1.0).long().clamp(max=rows - 1)  # log-uniform ~ Zipf(1)
    ids = (ids * 2654435761) % rows  # scatter the hot ids over the table
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return ids, offsets


def timing(device: str, rows: int, tables: int = 4, dim: int = 16, batch: int = 512,
           hot: int = 4, steps: int = 30, rounds: int = 3) -> None:
    gen = torch.Generator().manual_seed(2)
    data = []
    for _ in range(8):
        ids, offsets = _zipf_batch(gen, rows, tables, batch, hot)
        local = ids  # per-feature local ids (one feature per table)
        data.append((local.to(device), offsets.to(device)))
    specs = [TableSpec(f"t{i}", rows, dim) for i in range(tables)]
    ftm = list(range(tables))

    def group(opt, rowwise):
        k = GroupTBE(specs, ftm, optimizer=opt, hyperparameters={**HP[opt], "lambda21": 1e-4},
                     rowwise=rowwise, device=device)

        def step(i):
            ids, offsets = data[i % len(data)]
            k(ids, offsets).sum().backward()
        return step

    def sparse_adam():
        bags = [torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True).to(device)
                for _ in range(tables)]
        opt = torch.optim.SparseAdam([b.weight for b in bags], lr=0.01)

        def step(i):
            ids, offsets = data[i % len(data)]
            # feature-major bags: feature f owns bags [f*batch, (f+1)*batch)
            bounds = offsets[torch.arange(0, tables + 1, device=device) * batch].tolist()
            outs = [bag(ids[lo:hi], offsets[f * batch:(f + 1) * batch] - lo)
                    for f, (bag, lo, hi) in enumerate(zip(bags, bounds[:-1], bounds[1:]))]
            opt.zero_grad()
            torch.cat(outs, 1).sum().backward()
            opt.step()
        return step

    runs = {"GroupAdagrad rowwise": group("adagrad", True), "GroupAdam rowwise": group("adam", True),
            "GroupAdam": group("adam", False), "EmbeddingBag+SparseAdam": sparse_adam()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in runs.values():  # warm-up (compiles)
        for i in range(3):
            step(i)
    sync()
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):  # runs take turns
        for name, step in runs.items():
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                step(i)
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / steps * 1e3)
    base = best["EmbeddingBag+SparseAdam"]
    report("timing", True, device=device, rows_per_table=rows, tables=tables, dim=dim,
           batch=batch, mean_ids_per_bag=hot, ms_per_step={k: round(v, 3) for k, v in best.items()},
           ratio_to_sparse_adam={k: round(v / base, 3) for k, v in best.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check on CPU at a small size (no GPU needed)")
    parser.add_argument("--rows", type=int, nargs="*", default=None,
                        help="rows per table of the timing (default 1e5 1e6 on CUDA, 1e4 dry)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to run the checks on CPU)",
              file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    t0 = time.perf_counter()
    print(json.dumps({"torch": torch.__version__, "device": device,
                      "gpu": torch.cuda.get_device_name() if device == "cuda" else None}))
    theorem2(device)
    kernel_checks(device)
    for rows in args.rows or ([10_000] if args.dry_run else [100_000, 1_000_000]):
        timing(device, rows, steps=5 if args.dry_run else 30, rounds=1 if args.dry_run else 3)
    print(json.dumps({"failed": FAILED, "seconds": round(time.perf_counter() - t0, 1)}))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
