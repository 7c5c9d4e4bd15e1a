"""A Lightning job run as its own process (Lightning launches the other rank with the same
command): ``python -m tests.lightning.fit_job OUT_DIR CONFIG_JSON``. Writes results to OUT_DIR."""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch


def gather_tables(trainer, module) -> dict:
    """Full table weights (gathered from every shard) and the fused/dense state, on rank 0."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    sd = module.state_dict()
    for k, v in sd.items():
        if isinstance(v, ShardedTensor):
            full = torch.empty(v.size()) if trainer.is_global_zero else None
            v.gather(dst=0, out=full)
            out[k] = full
        else:
            out[k] = v.detach().clone()
    opt_sd = trainer.optimizers[0].state_dict()
    fused = opt_sd.get("fused")
    if fused:
        for _param_key, states in fused["state"].items():
            for name, v in states.items():
                if isinstance(v, ShardedTensor):
                    full = torch.empty(v.size()) if trainer.is_global_zero else None
                    v.gather(dst=0, out=full)
                    out[f"fused/{name}"] = full
    dense = opt_sd.get("dense")
    if dense:
        for idx, st in dense["state"].items():
            for name, v in st.items():
                out[f"dense/{idx}/{name}"] = v.detach().clone() if torch.is_tensor(v) else v
    return out


def main(out_dir: str, cfg: dict) -> None:
    from lightning_sgl import GroupAdagrad, GroupAdam, GroupLasso, SparsityMonitor, TorchRecStrategy
    from lightning_sgl.ctr import CTRDataModule, CTRModule

    pl.seed_everything(cfg.get("seed", 0), workers=True)
    torch.set_num_threads(1)
    dm = CTRDataModule(kjt=cfg.get("model", "dlrm") != "mlp", batch_size=cfg.get("batch", 128),
                       num_samples=cfg.get("samples", 8_000), vocab_size=cfg.get("vocab", 500),
                       num_fields=cfg.get("fields", 4))
    module = CTRModule(dm.vocab_sizes, model=cfg.get("model", "dlrm"), dim=cfg.get("dim", 8),
                       lr=cfg.get("lr", 1e-2))
    opt_cls = {"adam": GroupAdam, "adagrad": GroupAdagrad}[cfg.get("opt", "adam")]
    callbacks = [GroupLasso(opt_cls, **cfg.get("group", {"lr": 0.02, "lambda21": 2e-3}))]
    monitor = None
    if cfg.get("monitor", True):
        monitor = SparsityMonitor(target_feature_rate=cfg.get("target"),
                                  tune_every_n_steps=cfg.get("tune_every", 5),
                                  log_every_n_steps=cfg.get("log_every", 5))
        callbacks.append(monitor)
    pruning = None
    if cfg.get("prune"):
        from lightning_sgl import MagnitudePruning

        pruning = MagnitudePruning(**cfg["prune"])
        callbacks.append(pruning)
    ckpt_dir = cfg.get("ckpt_dir")
    if ckpt_dir:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True,
                                                      save_top_k=-1, every_n_epochs=1))
    if cfg.get("strategy", "torchrec") == "torchrec":
        plan = None
        if cfg.get("plan"):
            plan = _plan(module, cfg["plan"], cfg.get("devices", 2))
        strategy = TorchRecStrategy(plan=plan)
    else:
        strategy = "ddp"
    trainer = pl.Trainer(accelerator="cpu", devices=cfg.get("devices", 2), strategy=strategy,
                         max_epochs=cfg.get("epochs", 1), max_steps=cfg.get("max_steps", -1),
                         callbacks=callbacks, default_root_dir=out_dir, logger=True,
                         enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=cfg.get("log_every", 5),
                         num_sanity_val_steps=0, limit_val_batches=cfg.get("val_batches", 4),
                         deterministic=True)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("resume"))
    tables = gather_tables(trainer, module)
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        result = {"metrics": metrics, "training_step_calls": module.training_step_calls,
                  "closure_calls": trainer.optimizers[0].closure_calls,
                  "global_step": trainer.global_step,
                  "lambda21": monitor.lambda21 if monitor else None,
                  "history": monitor.history if monitor else None,
                  "plot": monitor.plot_path if monitor else None,
                  "pruned": pruning.pruned if pruning else None}
        torch.save(tables, os.path.join(out_dir, "tables.pt"))
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)


def _plan(module, kind: str, world: int):
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        row_wise,
        table_row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan

    from torchrec_ext import group_sharders

    ebc = module.net.ebc
    names = [n.split(".")[0] for n, _ in ebc.embedding_bags.named_parameters()]
    per = {
        "tw": lambda i, n: table_wise(rank=i % world),
        "rw": lambda i, n: row_wise(),
        "cw": lambda i, n: column_wise(ranks=list(range(world))) if world > 1 else table_wise(0),
        "twrw": lambda i, n: table_row_wise(host_index=0),
    }[kind]
    # GroupLasso tags the tables in setup; tag them here too so the plan picks the fused kernel
    from lightning_sgl import GroupAdam
    from torchrec_ext import apply_group_optimizer

    apply_group_optimizer(ebc, GroupAdam, lr=0.02)
    mp = construct_module_sharding_plan(ebc, per_param_sharding={n: per(i, n)
                                                                 for i, n in enumerate(names)},
                                        local_size=world, world_size=world, device_type="cpu",
                                        sharder=group_sharders()[0])
    return ShardingPlan({"net.ebc": mp})


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
