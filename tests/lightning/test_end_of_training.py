"""The end of training: the last epoch's validation sees the tables training leaves.

Lightning validates an epoch *before* ``on_train_epoch_end`` and ``on_train_end``. A pruning or a
tuning done there changes the model after its last validation (and after an epoch-end
checkpoint): the logged metrics then describe a model that is not the one saved. These tests fit
a small plain-table model in-process and check, at the last validation, the feature rate and the
AUC against the final model's (``trainer.validate`` after ``fit``).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_sgl import GroupLasso, MagnitudePruning, SparsityMonitor
from lightning_sgl.callbacks import model_feature_rate
from lightning_sgl.ctr import CTRDataModule, CTRModule


class RateAtValidation(Callback):
    """The feature rate and step at every validation start during ``fit``."""

    def __init__(self):
        self.seen: list[tuple[int, float]] = []

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            rate, _ = model_feature_rate(pl_module, trainer.optimizers[0])
            self.seen.append((trainer.global_step, rate))


class StopAt(Callback):
    """Stop training after ``step`` (a stop ``estimated_stepping_batches`` does not know of)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _setup(lambda21: float, callbacks: list, epochs: int):
    warnings.filterwarnings("ignore")
    dm = CTRDataModule(kjt=False, seed=0, source="synthetic", num_samples=6_000, num_fields=4,
                       vocab_size=300, batch_size=64)
    pl.seed_everything(0, verbose=False)
    module = CTRModule(dm.vocab_sizes, model="mlp", sparse=True, seed=0, dim=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[GroupLasso("GroupAdam", lr=0.01, lambda21=lambda21),
                                    *callbacks])
    return dm, module, trainer


def _fit(lambda21: float, callbacks: list, epochs: int = 1):
    probe = RateAtValidation()
    dm, module, trainer = _setup(lambda21, [*callbacks, probe], epochs)
    trainer.fit(module, datamodule=dm)
    fit_auc = float(trainer.callback_metrics["val_auc"])
    final_rate, _ = model_feature_rate(module, trainer.optimizers[0])
    trainer.validate(module, datamodule=dm, verbose=False)
    return probe.seen, fit_auc, float(trainer.callback_metrics["val_auc"]), final_rate, trainer


@pytest.mark.parametrize("fine_tune", [0.0, 0.3])
def test_magnitude_pruning_prunes_before_the_last_validation(fine_tune):
    pruning = MagnitudePruning(0.2, fine_tune_fraction=fine_tune)
    seen, fit_auc, final_auc, final_rate, trainer = _fit(0.0, [pruning], epochs=2)
    steps = [p["step"] for p in pruning.pruned]
    assert steps[-1] == trainer.global_step == trainer.estimated_stepping_batches
    assert len(steps) == (2 if fine_tune else 1)  # on_train_end did not prune a second time
    last_step, last_rate = seen[-1]
    assert last_step == trainer.global_step
    # the last validation saw the pruned tables: the target, not the revived (or unpruned) ones
    assert last_rate == pytest.approx(0.2, abs=2e-3)
    assert last_rate == final_rate
    assert seen[0][1] > 0.5  # negative control: the first epoch's validation saw unpruned rows
    assert fit_auc == final_auc  # the logged end-of-fit AUC is the final model's


def test_magnitude_pruning_stopped_early_prunes_at_train_end():
    pruning = MagnitudePruning(0.2, fine_tune_fraction=0.0)
    dm, module, trainer = _setup(0.0, [pruning, StopAt(40)], epochs=2)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 40 < trainer.estimated_stepping_batches
    assert [p["step"] for p in pruning.pruned] == [40]  # by on_train_end
    rate, _ = model_feature_rate(module, trainer.optimizers[0])
    assert rate == pytest.approx(0.2, abs=2e-3)


def test_sparsity_monitor_ends_each_epoch_on_target_before_its_validation():
    # the paper's setting: the penalty to the end, so the rate drifts between tunings and
    # only the epoch's last tuning puts it back on target
    monitor = SparsityMonitor(0.3, tune_every_n_steps=7, schedule_share=0.0, refit_share=0.0,
                              plot=False)
    seen, fit_auc, final_auc, final_rate, trainer = _fit(1e-4, [monitor], epochs=2)
    assert [s for s, _ in seen] == [trainer.global_step // 2, trainer.global_step]
    assert trainer.global_step % 7  # the last batch is not a tuning step of the interval
    for _, rate in seen:
        assert rate == pytest.approx(0.3, abs=2e-3)
    assert seen[-1][1] == final_rate
    assert fit_auc == final_auc
