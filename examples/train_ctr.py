"""Train a CTR model with Lightning, a Group optimizer on the tables, and lambda21 auto-tuning.

    python examples/train_ctr.py fit --config examples/configs/synthetic_dlrm.yaml
    python examples/train_ctr.py fit --config examples/configs/synthetic_dlrm.yaml \
        --model.model dcn --trainer.callbacks.1.init_args.target_feature_rate 0.05

Models: ``dlrm`` and ``dcn`` (TorchRec EmbeddingBagCollection, sharded by TorchRecStrategy) and
``mlp`` (plain nn.Embedding, plain DDP). Data: ``synthetic`` (built in), ``criteo`` (Kaggle TSV),
``avazu`` (CSV), ``movielens`` (100K folder). Validation logs ``val_auc`` and ``val_logloss``;
SparsityMonitor logs the feature rate and writes ``sparsity_monitor.png`` into the log folder.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_sgl.ctr import CTRDataModule, CTRModule


class CTRCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_sizes", "model.vocab_sizes", apply_on="instantiate")


def main(args=None) -> None:
    cli = CTRCLI(CTRModule, CTRDataModule, args=args, save_config_kwargs={"overwrite": True})
    trainer = cli.trainer
    if trainer.is_global_zero and trainer.state.fn == "fit":
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        print("\n=== results ===")
        if "val_auc" in m:
            print(f"validation AUC {m['val_auc']:.4f}   log loss {m.get('val_logloss', float('nan')):.4f}")
        if "feature_rate" in m:
            per = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("feature_rate/")}
            print(f"feature rate {m['feature_rate']:.4f} (non-zero rows / rows seen)")
            print("per table: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(per.items())))
        for cb in trainer.callbacks:
            if getattr(cb, "plot_path", None):
                print(f"plot: {cb.plot_path}")


if __name__ == "__main__":
    main()
