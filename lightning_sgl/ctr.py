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


_STREAM_ONLY = ("libsvm", "libffm", "criteo_binary")
_SOURCES = ("synthetic", "criteo", "avazu", "movielens", *_STREAM_ONLY)


class CTRDataModule(pl.LightningDataModule):
    """CTR data as batches; ``source="synthetic"`` (default) or a public format.

    Real data sets are read in memory (:mod:`lightning_sgl.data.readers`: small sets) or
    streamed (:class:`lightning_sgl.data.streaming.StreamingCTRDataset`: files of any size, split
    by rank and worker, bounded memory). The head ``train_fraction`` of the rows trains, the tail
    validates; streamed, every rank reads the same number of rows (at most ``world_size - 1``
    rows of each part are dropped) so all ranks run the same number of steps.

    Args:
        source: ``"synthetic"``, ``"criteo"``, ``"avazu"``, ``"movielens"`` (in memory or
            streamed), ``"libsvm"``, ``"libffm"``, ``"criteo_binary"`` (streamed).
        path: file or folder for the real data sets.
        kjt: batches of ``KeyedJaggedTensor`` (TorchRec models) instead of ids tensors.
        batch_size, num_samples, num_fields, vocab_size, seed: synthetic-set options.
        train_fraction: head share used for training (the tail is validation).
        max_rows: read at most this many rows of a real data set (in memory only).
        num_workers: ``DataLoader`` workers (streamed: each reads its own share of the file).
        streaming: stream the file (default: True for the streamed-only formats, else False).
        min_count: vocabulary: values seen fewer times share id 0 (a first pass, cached).
        hash_size: streamed: hash values into this many ids per field instead (no pass).
        cache_dir: streamed: where the line index and vocabulary are cached.
        shuffle_buffer: streamed: shuffle training samples within a buffer of this size.
    """

    def __init__(self, source: str = "synthetic", path: str | None = None, kjt: bool = True,
                 batch_size: int = 256, num_samples: int = 60_000, num_fields: int = 8,
                 vocab_size: int = 2_000, seed: int = 0, train_fraction: float = 0.8,
                 max_rows: int | None = None, num_workers: int = 0,
                 streaming: bool | None = None, min_count: int = 1,
                 hash_size: int | list[int] | None = None, cache_dir: str | None = None,
                 shuffle_buffer: int = 0) -> None:
        super().__init__()
        if source not in _SOURCES:
            raise ValueError(f"Invalid source: {source!r} (valid options: {', '.join(_SOURCES)})")
        if source != "synthetic" and path is None:
            raise ValueError(f"Invalid path: None (source {source!r} needs a file or folder)")
        if streaming is None:
            streaming = source in _STREAM_ONLY
        if streaming and source in ("synthetic", "movielens"):
            raise ValueError(f"Invalid streaming: True for source {source!r} (streamed formats: "
                             f"criteo, avazu, {', '.join(_STREAM_ONLY)})")
        if not streaming and source in _STREAM_ONLY:
            raise ValueError(f"Invalid streaming: False for source {source!r} (it is read "
                             "streamed only)")
        if streaming and max_rows is not None:
            raise ValueError("Invalid max_rows: streamed sources are read whole (use "
                             "train_fraction, or a shorter file)")
        if not streaming and hash_size is not None:
            raise ValueError("Invalid hash_size: only for streamed sources (streaming=True)")
        if not kjt and source in ("libsvm", "libffm"):
            raise ValueError(f"Invalid kjt: False for source {source!r} (multi-hot bags need "
                             "KeyedJaggedTensor batches)")
        self.save_hyperparameters()
        self.hparams.streaming = streaming
        self.data = None

    def _stream(self, part):
        from .data.streaming import StreamingCTRDataset

        h = self.hparams
        return StreamingCTRDataset(
            h.path, h.source, min_count=h.min_count, hash_size=h.hash_size, part=part,
            even=True, cache_dir=h.cache_dir, seed=h.seed,
            vocabulary=self.train_set.vocabulary if self.data is not None else None)

    def prepare_data(self) -> None:
        """Streamed with a vocabulary: its pass (and the line index) runs once, on rank 0,
        and is cached for every rank's ``setup``."""
        if self.hparams.streaming and self.hparams.hash_size is None:
            self._stream((0.0, 1.0))

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        h = self.hparams
        if h.source == "synthetic":
            data = make_synthetic_ctr(num_samples=h.num_samples, num_fields=h.num_fields,
                                      vocab_size=h.vocab_size, seed=h.seed)
        elif h.streaming:
            self.train_set = self._stream((0.0, h.train_fraction))
            self.data = self.train_set
            self.val_set = self._stream((h.train_fraction, 1.0))
            return
        else:
            from .data import readers

            data = readers.read(h.source, h.path, max_rows=h.max_rows, min_count=h.min_count)
        self.data = data
        self.train_set, self.val_set = data.split(h.train_fraction)

    @property
    def vocab_sizes(self) -> list[int]:
        self.setup()
        return list(self.data.vocab_sizes)

    def _loader(self, part, shuffle: bool) -> DataLoader:
        h = self.hparams
        collate = _kjt_collate if h.kjt else _ids_collate
        if h.streaming:
            from .data.streaming import collate_bags

            trainer = getattr(self, "trainer", None)
            if trainer is not None:  # this rank's share
                part.set_rank(trainer.global_rank, trainer.world_size)
            part.shuffle_buffer = h.shuffle_buffer if shuffle else 0
            if h.source in ("libsvm", "libffm"):
                collate = collate_bags
            return DataLoader(part, batch_size=h.batch_size, num_workers=h.num_workers,
                              collate_fn=collate)
        return DataLoader(part.dataset(), batch_size=h.batch_size, shuffle=shuffle,
                          drop_last=shuffle, num_workers=h.num_workers, collate_fn=collate)

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
