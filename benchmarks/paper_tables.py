"""Reproduce the paper's comparisons (Tables 2-3, Figures 1-3, Table 4) on a CTR data set.

For each base optimizer (Adam, Adagrad) and seed: the base optimizer alone (no pruning), the base
optimizer + MagnitudePruning at each target feature rate, and its Group version with
SparsityMonitor tuning lambda21 to the same rate -- with the monitor's default schedule and
refit, or with ``--paper`` the paper's setting (the target from the first tuning, no refit).
Prints markdown tables (mean AUC, feature rate, Welch t-test p-value of Group vs base+pruning)
and writes the figures.

    python benchmarks/paper_tables.py --data synthetic --seeds 5 [--paper]
    python benchmarks/paper_tables.py --data movielens --path data/ml-100k --seeds 5 [--paper]
    python benchmarks/paper_tables.py --data synthetic --seeds 5 --refit-relax 1   # a sweep point

AUC and log loss are those of the final tables: a ``trainer.validate`` after ``fit`` (the same
as the fit's last validation now that MagnitudePruning prunes at the last step; ``fit_auc`` in
the JSON is the fit's). The base optimizers run as their Group version with all lambdas 0
(Theorem 2: identical), so both sides use the same code path. Runs are single-process (plain nn.Embedding with sparse
gradients + MLP) to fit the 2-core budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings

import torch


def train_once(data_kw: dict, model_kw: dict, group: dict, callbacks: list, seed: int,
               epochs: int) -> dict:
    import lightning.pytorch as pl

    from lightning_sgl import GroupLasso
    from lightning_sgl.ctr import CTRDataModule, CTRModule

    dm = CTRDataModule(kjt=False, seed=0, **data_kw)  # one data set; seeds vary init + order
    pl.seed_everything(seed, verbose=False)
    module = CTRModule(dm.vocab_sizes, model="mlp", sparse=True, seed=seed, **model_kw)
    opt = group.pop("optimizer")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[GroupLasso(opt, **group), *callbacks])
    trainer.fit(module, datamodule=dm)
    fit_auc = float(trainer.callback_metrics.get("val_auc", float("nan")))
    trainer.validate(module, datamodule=dm, verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    m["fit_auc"] = fit_auc
    tables = [c for c in trainer.callbacks if type(c).__name__ in ("SparsityMonitor",)]
    from lightning_sgl.callbacks import model_feature_rate

    rate, _ = model_feature_rate(module, trainer.optimizers[0])
    lam = tables[0].lambda21 if tables else {}
    return {"auc": m.get("val_auc", float("nan")), "fit_auc": m["fit_auc"],
            "logloss": m.get("val_logloss", float("nan")), "rate": rate,
            "lambda21": statistics.fmean(lam.values()) if lam else None}


def summarize(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def pvalue(a: list[float], b: list[float]) -> float:
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="synthetic",
                    choices=["synthetic", "criteo", "avazu", "movielens"])
    ap.add_argument("--path", default=None)
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.2, 0.05])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=60_000, help="synthetic set size")
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--fine-tune", type=float, default=0.1,
                    help="MagnitudePruning fine-tune share (paper: 0, 0.1, 0.2, 0.3)")
    ap.add_argument("--optimizers", nargs="+", default=["adam", "adagrad"])
    ap.add_argument("--schedule-share", type=float, default=None,
                    help="SparsityMonitor(schedule_share=...) of the Group runs (default: the "
                         "monitor's default)")
    ap.add_argument("--refit-share", type=float, default=None,
                    help="SparsityMonitor(refit_share=...) of the Group runs (default: the "
                         "monitor's default)")
    ap.add_argument("--refit-relax", type=float, default=None,
                    help="SparsityMonitor(refit_relax=...) of the Group runs: the share of the "
                         "shrinkage the refit gives back (default: the monitor's default)")
    ap.add_argument("--paper", action="store_true",
                    help="the paper's setting: no target schedule (the target from the first "
                         "tuning) and no refit")
    ap.add_argument("--extras", action="store_true",
                    help="also Figure 2 (s_t vs exact norm), Figure 3 (l1 vs l21), Table 4 (dims)")
    ap.add_argument("--out", default="outputs/paper_tables")
    args = ap.parse_args(argv)
    if args.paper:
        if args.schedule_share or args.refit_share or args.refit_relax is not None:
            ap.error("--paper means no schedule and no refit: drop --schedule-share/"
                     "--refit-share/--refit-relax")
        args.schedule_share = args.refit_share = 0.0
    monitor_kw = {k: v for k, v in (("schedule_share", args.schedule_share),
                                     ("refit_share", args.refit_share),
                                     ("refit_relax", args.refit_relax)) if v is not None}
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    data_kw = dict(source=args.data, path=args.path, max_rows=args.max_rows,
                   num_samples=args.samples, batch_size=256)
    lrs = {"adam": 0.01, "adagrad": 0.05}
    names = {"adam": ("Adam", "GroupAdam"), "adagrad": ("Adagrad", "GroupAdagrad")}
    from lightning_sgl import MagnitudePruning, SparsityMonitor

    results: dict = {}
    t0 = time.time()
    for opt in args.optimizers:
        base, grp = names[opt]
        lr = lrs[opt]
        for seed in range(args.seeds):
            common = dict(optimizer=grp, lr=lr)
            r = train_once(data_kw, {"dim": args.dim}, {**common, "lambda21": 0.0}, [], seed,
                           args.epochs)
            results.setdefault((opt, "base", 1.0), []).append(r)
            for rate in args.rates:
                r = train_once(data_kw, {"dim": args.dim}, {**common, "lambda21": 0.0},
                               [MagnitudePruning(rate, fine_tune_fraction=args.fine_tune)],
                               seed, args.epochs)
                results.setdefault((opt, "pruned", rate), []).append(r)
                r = train_once(data_kw, {"dim": args.dim}, {**common, "lambda21": 1e-4},
                               [SparsityMonitor(rate, tune_every_n_steps=5, plot=False,
                                                **monitor_kw)],
                               seed, args.epochs)
                results.setdefault((opt, "group", rate), []).append(r)
            print(f"[{time.time() - t0:6.0f}s] {base} seed {seed} done", flush=True)

    probe = SparsityMonitor(0.5, **monitor_kw)  # the settings the Group runs used
    setting = ("the paper's setting: no schedule, no refit" if args.paper else
               f"target 1.0 until {probe.schedule_start:.0%} of training, {probe.schedule} ramp "
               f"over {probe.schedule_share:.0%}, refit over the last {probe.refit_share:.0%}"
               f" giving back {probe.refit_relax:g} of the shrinkage")
    sched = f", {setting}"
    lines = [f"## {args.data}: AUC at matched feature rates ({args.seeds} seeds, mean ± std"
             f"{sched})", ""]
    for opt in args.optimizers:
        base, grp = names[opt]
        ref = results[(opt, "base", 1.0)]
        lines += [f"### {base} vs {grp}", "",
                  f"{base} without pruning: AUC {summarize([r['auc'] for r in ref])}, "
                  f"feature rate {summarize([r['rate'] for r in ref])}", "",
                  f"| target rate | {base} + pruning AUC | rate | {grp} AUC | rate | "
                  f"{grp} - pruned | p-value |",
                  "|---|---|---|---|---|---|---|"]
        for rate in args.rates:
            p = results[(opt, "pruned", rate)]
            g = results[(opt, "group", rate)]
            pa, ga = [r["auc"] for r in p], [r["auc"] for r in g]
            lines.append(f"| {rate} | {summarize(pa)} | {summarize([r['rate'] for r in p])} | "
                         f"{summarize(ga)} | {summarize([r['rate'] for r in g])} | "
                         f"{statistics.fmean(ga) - statistics.fmean(pa):+.4f} | "
                         f"{pvalue(ga, pa):.3g} |")
        lines.append("")
    report = "\n".join(lines)
    print(report)
    relax = f"_relax{args.refit_relax:g}" if args.refit_relax is not None else ""
    tag = ("_paper" if args.paper else
           f"_start{probe.schedule_start:g}_schedule{probe.schedule_share:g}"
           f"_refit{probe.refit_share:g}{relax}")
    with open(os.path.join(args.out, f"tables_{args.data}{tag}.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, f"results_{args.data}{tag}.json"), "w") as f:
        json.dump({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in results.items()}, f, indent=1)
    figure1(results, args, names, "_paper" if args.paper else relax)
    if args.extras:
        extras(data_kw, args, monitor_kw)


def figure1(results, args, names, tag: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.optimizers), figsize=(5 * len(args.optimizers), 4),
                             squeeze=False)
    for ax, opt in zip(axes[0], args.optimizers):
        base, grp = names[opt]
        for kind, label, style in (("pruned", f"{base} + pruning", "o--"),
                                   ("group", grp, "s-")):
            xs = [statistics.fmean(r["rate"] for r in results[(opt, kind, rate)])
                  for rate in args.rates]
            ys = [statistics.fmean(r["auc"] for r in results[(opt, kind, rate)])
                  for rate in args.rates]
            ax.plot(xs, ys, style, label=label)
        ref = results[(opt, "base", 1.0)]
        ax.axhline(statistics.fmean(r["auc"] for r in ref), color="gray", ls=":",
                   label=f"{base}, no pruning")
        ax.set_xscale("log")
        ax.set_xticks(args.rates, [f"{r:g}" for r in args.rates])
        ax.minorticks_off()
        ax.set_xlabel("feature rate (non-zero / seen rows)")
        ax.set_ylabel("validation AUC")
        note = {"": "", "_paper": " (paper setting)"}.get(tag, f" ({tag[1:]})")
        ax.set_title(f"{args.data}{note}: AUC vs feature rate")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, f"figure1_{args.data}{tag}.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def extras(data_kw, args, monitor_kw: dict) -> None:
    """Figure 3 (feature rate vs lambda: l1 vs l21), Figure 2 (s_t vs exact norm), Table 4; the
    Group runs with a target use the tables' monitor settings (``monitor_kw``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_sgl import SparsityMonitor

    lams = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, label in (("lambda21", "l21 (group)"), ("lambda1", "l1")):
        rates = []
        for lam in lams:
            r = train_once(data_kw, {"dim": args.dim}, {"optimizer": "GroupAdam", "lr": 0.01,
                                                         key: lam},
                           [SparsityMonitor(None, plot=False)], 0, args.epochs)
            rates.append(r["rate"])
        ax.plot(lams, rates, "o-", label=label)
        print(f"Figure 3 {label}: " + ", ".join(f"{lam:g}->{r:.3f}" for lam, r in zip(lams, rates)))
    ax.set_xscale("log")
    ax.set_xlabel("lambda")
    ax.set_ylabel("feature rate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"figure3_{args.data}.png"), dpi=100)
    print("Figure 2 (Algorithm 1's ||s_t|| vs the exact ||A^-1/2 s_t||), AUC at matched rates:")
    for rate in args.rates:
        row = []
        for exact in (False, True):
            r = train_once(data_kw, {"dim": args.dim},
                           {"optimizer": "GroupAdam", "lr": 0.01, "lambda21": 1e-4,
                            "optimizer_kwargs": {"exact_group_norm": exact}},
                           [SparsityMonitor(rate, tune_every_n_steps=5, plot=False,
                                            **monitor_kw)], 0, args.epochs)
            row.append(f"{'exact' if exact else 's_t'} AUC {r['auc']:.4f} (rate {r['rate']:.3f})")
        print(f"  rate {rate}: " + "; ".join(row))
    print("Table 4 (embedding dimension), GroupAdam at rate 0.2 vs Adam + pruning:")
    from lightning_sgl import MagnitudePruning

    for dim in (4, 8, 16):
        g = train_once(data_kw, {"dim": dim}, {"optimizer": "GroupAdam", "lr": 0.01,
                                                "lambda21": 1e-4},
                       [SparsityMonitor(0.2, tune_every_n_steps=5, plot=False, **monitor_kw)], 0,
                       args.epochs)
        p = train_once(data_kw, {"dim": dim}, {"optimizer": "GroupAdam", "lr": 0.01,
                                                "lambda21": 0.0},
                       [MagnitudePruning(0.2, fine_tune_fraction=args.fine_tune)], 0, args.epochs)
        print(f"  dim {dim}: GroupAdam {g['auc']:.4f} (rate {g['rate']:.3f}), "
              f"Adam+pruning {p['auc']:.4f} (rate {p['rate']:.3f})")


if __name__ == "__main__":
    main()
