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
    dmp = getattr(trainer.strategy, "dmp", None)
    if "fused" not in opt_sd and dmp is not None:  # no fused part returned: read it from DMP
        opt_sd = {"fused": dmp.fused_optimizer.state_dict(), "dense": opt_sd}
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


def _module(cfg: dict, vocab_sizes):
    from lightning_sgl.ctr import CTRModule

    class PlainAdamModule(CTRModule):
        """``configure_optimizers`` returns a plain torch.optim.Adam over ``self.parameters()``:
        the fused tables' state is not in it (the strategy must save it anyway)."""

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    cls = PlainAdamModule if cfg.get("plain_optimizer") else CTRModule
    return cls(vocab_sizes, model=cfg.get("model", "dlrm"), dim=cfg.get("dim", 8),
               lr=cfg.get("lr", 1e-2), lr_decay_gamma=cfg.get("gamma"))


def _trainer(cfg: dict, out_dir: str, callbacks: list, plan=None):
    from lightning_sgl import TorchRecStrategy

    strategy = TorchRecStrategy(plan=plan) if cfg.get("strategy", "torchrec") == "torchrec" \
        else "ddp"
    return pl.Trainer(accelerator="cpu", devices=cfg.get("devices", 2), strategy=strategy,
                      max_epochs=cfg.get("epochs", 1), max_steps=cfg.get("max_steps", -1),
                      callbacks=callbacks, default_root_dir=out_dir, logger=True,
                      enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=cfg.get("log_every", 5),
                      num_sanity_val_steps=0, limit_val_batches=cfg.get("val_batches", 4),
                      deterministic=True)


def main(out_dir: str, cfg: dict) -> None:
    from lightning_sgl import GroupAdagrad, GroupAdam, GroupLasso, SparsityMonitor
    from lightning_sgl.ctr import CTRDataModule

    if cfg.get("fault"):
        from . import faults

        faults.install(cfg["fault"], int(os.environ.get("LOCAL_RANK", "0")))
    pl.seed_everything(cfg.get("seed", 0), workers=True)
    torch.set_num_threads(1)
    dm = CTRDataModule(kjt=cfg.get("model", "dlrm") != "mlp", batch_size=cfg.get("batch", 128),
                       num_samples=cfg.get("samples", 8_000), vocab_size=cfg.get("vocab", 500),
                       num_fields=cfg.get("fields", 4))
    module = _module(cfg, dm.vocab_sizes)
    opt_cls = {"adam": GroupAdam, "adagrad": GroupAdagrad}[cfg.get("opt", "adam")]
    group_kw = cfg.get("group", {"lr": 0.02, "lambda21": 2e-3})
    callbacks = [GroupLasso(opt_cls, **group_kw)]
    monitor = None
    if cfg.get("monitor", True):
        # schedule and refit: the monitor's defaults unless the job names them
        sched = {k: cfg[k] for k in ("schedule_share", "schedule_start", "schedule",
                                     "refit_share") if k in cfg}
        monitor = SparsityMonitor(target_feature_rate=cfg.get("target"),
                                  tune_every_n_steps=cfg.get("tune_every", 5),
                                  log_every_n_steps=cfg.get("log_every", 5),
                                  target_bytes=cfg.get("target_bytes"),
                                  serve_dtype=cfg.get("serve_dtype", "fp32"), **sched)
        callbacks.append(monitor)
    if cfg.get("stop_after_epoch") is not None:  # a run interrupted after that epoch
        callbacks.append(_StopAfter(cfg["stop_after_epoch"]))
    pruning = None
    if cfg.get("prune"):
        from lightning_sgl import MagnitudePruning

        pruning = MagnitudePruning(**cfg["prune"])
        callbacks.append(pruning)
    ckpt_dir = cfg.get("ckpt_dir")
    if ckpt_dir:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True,
                                                      save_top_k=-1, every_n_epochs=1))
    step_ckpt = cfg.get("step_ckpt")  # {"dir": ..., "keep": "last" | "all"}: save every step
    if step_ckpt:
        keep_all = step_ckpt.get("keep") == "all"
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=step_ckpt["dir"], filename="{step}", every_n_train_steps=1,
            save_last=not keep_all, save_top_k=-1 if keep_all else 0))
    plan = _plan(module, cfg["plan"], cfg.get("devices", 2)) if cfg.get("plan") else None
    trainer = _trainer(cfg, out_dir, callbacks, plan)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("resume"))
    tables = gather_tables(trainer, module)
    validated = {}
    if cfg.get("validate"):  # the trained model, then ckpt_path= on this and on a fresh Trainer
        validated["trained"] = trainer.validate(module, datamodule=dm, verbose=False)[0]
        path = cfg["validate"]
        validated["after_fit"] = trainer.validate(module, datamodule=dm, ckpt_path=path,
                                                  verbose=False)[0]
        fresh_module = _module(cfg, dm.vocab_sizes)
        with torch.no_grad():  # other weights than the checkpoint's: the load must replace them
            for p in fresh_module.net.top.parameters():
                p.normal_()
        fresh = _trainer(cfg, out_dir, [GroupLasso(opt_cls, **group_kw)], plan)
        validated["fresh"] = fresh.validate(fresh_module, datamodule=dm, ckpt_path=path,
                                            verbose=False)[0]
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        opt = trainer.optimizers[0]
        result = {"metrics": metrics, "training_step_calls": module.training_step_calls,
                  "closure_calls": getattr(opt, "closure_calls", None),
                  "global_step": trainer.global_step,
                  "lrs": [float(g["lr"]) for g in opt.param_groups],
                  "validated": validated,
                  "lambda21": monitor.lambda21 if monitor else None,
                  "ramp_steps": monitor.ramp_steps if monitor else None,
                  "ramp_start": monitor.ramp_start if monitor else None,
                  "refit_start": monitor.refit_start if monitor else None,
                  "refitting": monitor.refitting if monitor else None,
                  "history": monitor.history if monitor else None,
                  "plot": monitor.plot_path if monitor else None,
                  "pruned": pruning.pruned if pruning else None}
        torch.save(tables, os.path.join(out_dir, "tables.pt"))
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)


class _StopAfter(pl.Callback):
    """Stop at the end of epoch ``epoch`` (after ModelCheckpoint saved it): the same run as an
    uninterrupted one, cut short, as a killed job would be."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


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
