"""Small CTR models used by the demo, tests and benchmarks (plain ``torch.nn``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["EmbeddingMLP"]


class EmbeddingMLP(nn.Module):
    """One embedding table for all fields (field offsets added to ids) followed by an MLP.

    ``embedding.weight`` is ``[sum(vocab_sizes), dim]``: one row = one feature, the groups of the
    Group optimizers. ``sparse=True`` gives the table sparse COO gradients (lazy row updates).
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int = 8,
                 hidden: Sequence[int] = (64, 32), sparse: bool = False,
                 init_std: float = 0.01):
        super().__init__()
        self.register_buffer("offsets", torch.cumsum(torch.tensor([0, *vocab_sizes[:-1]]), 0),
                             persistent=False)
        self.embedding = nn.Embedding(sum(vocab_sizes), dim, sparse=sparse)
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
