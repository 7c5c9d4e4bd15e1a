"""Lightning pieces for CTR experiments: a data module and a LightningModule (MLP, DCN, DLRM).

``CTRDataModule`` serves the built-in synthetic set (or any ``CTRDataset``-like ids/labels, e.g.
from the readers in :mod:`lightning_sgl.data.readers`) as ``(features, labels)`` batches, where
features are a TorchRec ``KeyedJaggedTensor`` (keys ``f0..f{F-1}``) for the TorchRec models or an
``ids [B, F]`` tensor for the plain ``nn.Embedding`` MLP.

``CTRModule`` trains with BCE, logs ``train_loss``, ``val_auc`` and ``val_logloss`` (torchmetrics)
and returns :func:`lightning_sgl.group_optimizers` from ``configure_optimizers``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import make_synthetic_ctr
from .factory import group_optimizers
from .models import EmbeddingMLP

__all__ = ["CTRDataModule", "CTRModule", "DCN"]


def _kjt_collate(batch):
    from torchrec_ext.models import kjt_from_ids

    ids = torch.stack([b[0] for b in batch])
    labels = torch.stack([b[1] for b in batch])
    return kjt_from_ids(ids), labels


def _ids_collate(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


class CTRDataModule(pl.LightningDataModule):
    """CTR data as batches; ``source="synthetic"`` (default) or a reader's output.

    Args:
        source: ``"synthetic"``, ``"criteo"``, ``"avazu"`` or ``"movielens"``.
        path: file or folder for the real data sets.
        kjt: batches of ``KeyedJaggedTensor`` (TorchRec models) instead of ids tensors.
        batch_size, num_samples, num_fields, vocab_size, seed: synthetic-set options.
        train_fraction: head share used for training (the tail is validation).
        max_rows: read at most this many rows of a real data set.
    """

    def __init__(self, source: str = "synthetic", path: str | None = None, kjt: bool = True,
                 batch_size: int = 256, num_samples: int = 60_000, num_fields: int = 8,
                 vocab_size: int = 2_000, seed: int = 0, train_fraction: float = 0.8,
                 max_rows: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        valid = ("synthetic", "criteo", "avazu", "movielens")
        if source not in valid:
            raise ValueError(f"Invalid source: {source!r} (valid options: {', '.join(valid)})")
        if source != "synthetic" and path is None:
            raise ValueError(f"Invalid path: None (source {source!r} needs a file or folder)")
        self.save_hyperparameters()
        self.data = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        h = self.hparams
        if h.source == "synthetic":
            data = make_synthetic_ctr(num_samples=h.num_samples, num_fields=h.num_fields,
                                      vocab_size=h.vocab_size, seed=h.seed)
        else:
            from .data import readers

            data = readers.read(h.source, h.path, max_rows=h.max_rows)
        self.data = data
        self.train_set, self.val_set = data.split(h.train_fraction)

    @property
    def vocab_sizes(self) -> list[int]:
        self.setup()
        return list(self.data.vocab_sizes)

    def _loader(self, part, shuffle: bool) -> DataLoader:
        return DataLoader(part.dataset(), batch_size=self.hparams.batch_size, shuffle=shuffle,
                          drop_last=shuffle, num_workers=self.hparams.num_workers,
                          collate_fn=_kjt_collate if self.hparams.kjt else _ids_collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)


class DCN(nn.Module):
    """Deep & Cross Network over pooled field embeddings of a TorchRec EBC (the paper's DCN)."""

    def __init__(self, vocab_sizes: list[int], dim: int = 8, cross_layers: int = 2,
                 hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        from torchrec import EmbeddingBagCollection

        from torchrec_ext.models import field_tables

        self.fields = len(vocab_sizes)
        self.ebc = EmbeddingBagCollection(tables=field_tables(vocab_sizes, dim),
                                          device=torch.device("meta"))
        width = self.fields * dim
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cross_layers))
        layers: list[nn.Module] = []
        w = width
        for h in hidden:
            layers += [nn.Linear(w, h), nn.ReLU()]
            w = h
        self.deep = nn.Sequential(*layers)
        self.out = nn.Linear(width + w, 1)

    def forward(self, kjt) -> torch.Tensor:
        pooled = self.ebc(kjt).to_dict()
        x0 = torch.cat([pooled[f"f{f}"] for f in range(self.fields)], dim=1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.out(torch.cat([x, self.deep(x0)], dim=1)).squeeze(-1)


class CTRModule(pl.LightningModule):
    """CTR model trained with BCE.

    Args:
        vocab_sizes: ids per field.
        model: ``"dlrm"`` (TorchRec EBC + dot interactions), ``"dcn"`` (TorchRec EBC + cross
            network) or ``"mlp"`` (plain ``nn.Embedding`` + MLP; works under plain DDP).
        dim: embedding dimension.
        lr: dense optimizer learning rate (the tables' optimizer comes from ``GroupLasso``).
        dense_optimizer: ``"adam"`` or ``"adagrad"`` for the dense part.
        sparse: sparse gradients for the ``mlp`` model's table.
        seed: seed of the weight initialisation.
        lr_decay_gamma: if set, ``ExponentialLR(gamma)`` stepped every optimizer step, on every
            param group (the tables' fused optimizer and the dense part alike).
    """

    def __init__(self, vocab_sizes: list[int], model: str = "dlrm", dim: int = 8,
                 lr: float = 1e-2, dense_optimizer: str = "adam", sparse: bool = True,
                 seed: int = 0, lr_decay_gamma: float | None = None) -> None:
        super().__init__()
        valid = ("dlrm", "dcn", "mlp")
        if model not in valid:
            raise ValueError(f"Invalid model: {model!r} (valid options: {', '.join(valid)})")
        if lr_decay_gamma is not None and (isinstance(lr_decay_gamma, bool) or not isinstance(
                lr_decay_gamma, (int, float)) or not 0.0 < lr_decay_gamma <= 1.0):
            raise ValueError(f"Invalid lr_decay_gamma: {lr_decay_gamma!r} (valid range: "
                             "0 < gamma <= 1, or None)")
        if dense_optimizer not in ("adam", "adagrad"):
            raise ValueError(f"Invalid dense_optimizer: {dense_optimizer!r} (valid options: "
                             "'adam', 'adagrad')")
        self.save_hyperparameters()
        torch.manual_seed(seed)
        if model == "dlrm":
            from torchrec_ext.models import DLRMLite

            self.net = DLRMLite(list(vocab_sizes), dim=dim)
        elif model == "dcn":
            self.net = DCN(list(vocab_sizes), dim=dim)
        else:
            self.net = EmbeddingMLP(list(vocab_sizes), dim=dim, sparse=sparse)
        from torchmetrics.classification import BinaryAUROC

        self.val_auc = BinaryAUROC()
        self.training_step_calls = 0

    def forward(self, features) -> torch.Tensor:
        return self.net(features)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.training_step_calls += 1
        features, labels = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self(features), labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        features, labels = batch
        logits = self(features)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        self.val_auc.update(torch.sigmoid(logits), labels.long())
        self.log("val_logloss", loss, sync_dist=True, batch_size=len(labels))
        self.log("val_auc", self.val_auc, batch_size=len(labels))

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch[0]))

    def configure_optimizers(self) -> Any:
        dense = torch.optim.Adam if self.hparams.dense_optimizer == "adam" else torch.optim.Adagrad
        opt = group_optimizers(self, dense=dense, lr=self.hparams.lr)
        gamma = self.hparams.get("lr_decay_gamma")
        if gamma is None:
            return opt
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
