"""Small CTR models used by the demo, tests and benchmarks (plain ``torch.nn``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .optim import mark_embedding

__all__ = ["EmbeddingMLP", "train_embedding_mlp"]


class EmbeddingMLP(nn.Module):
    """One embedding table for all fields (field offsets added to ids) followed by an MLP.

    ``embedding.weight`` is ``[sum(vocab_sizes), dim]``: one row = one feature, the groups of the
    Group optimizers (marked with :func:`~lightning_sgl.optim.mark_embedding`, so that
    ``GroupAdam(model.parameters(), lambda21=...)`` regularises it and nothing else).
    ``sparse=True`` gives the table sparse COO gradients (lazy row updates).
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int = 8,
                 hidden: Sequence[int] = (64, 32), sparse: bool = False,
                 init_std: float = 0.01):
        super().__init__()
        self.register_buffer("offsets", torch.cumsum(torch.tensor([0, *vocab_sizes[:-1]]), 0),
                             persistent=False)
        self.embedding = mark_embedding(nn.Embedding(sum(vocab_sizes), dim, sparse=sparse))
        nn.init.normal_(self.embedding.weight, std=init_std)
        layers: list[nn.Module] = []
        width = dim * len(vocab_sizes)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids``: ``[B, F]`` field-local ids -> logits ``[B]``."""
        emb = self.embedding(ids + self.offsets)  # [B, F, dim]
        return self.mlp(emb.flatten(1)).squeeze(-1)


def train_embedding_mlp(make_optimizer, data, epochs: int = 2, batch: int = 256, seed: int = 1,
                        dim: int = 8, on_epoch=None):
    """Train an :class:`EmbeddingMLP` on ``data`` (a ``CTRDataset``-like set, head 80% for
    training) with ``make_optimizer(model)``; returns ``(model, test logits, test set)``.

    ``on_epoch(epoch, mean_train_loss)`` is called after each epoch (e.g. to print progress).
    """
    train_set, test_set = data.split(0.8)
    torch.manual_seed(seed)
    model = EmbeddingMLP(data.vocab_sizes, dim=dim)
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(seed)
    n = len(train_set.labels)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch):
            b = perm[i:i + batch]
            loss = nn.functional.binary_cross_entropy_with_logits(model(train_set.ids[b]),
                                                                  train_set.labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        if on_epoch is not None:
            on_epoch(epoch, total / n)
    with torch.no_grad():
        logits = model(test_set.ids)
    return model, logits, test_set
