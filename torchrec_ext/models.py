"""A small DLRM-style CTR model on a TorchRec ``EmbeddingBagCollection`` (one table per field)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

__all__ = ["DLRMLite", "field_tables", "kjt_from_ids"]


def field_tables(vocab_sizes: list[int], dim: int) -> list[EmbeddingBagConfig]:
    """One table ``t{f}`` with feature ``f{f}`` per categorical field."""
    return [EmbeddingBagConfig(name=f"t{f}", embedding_dim=dim, num_embeddings=v,
                               feature_names=[f"f{f}"]) for f, v in enumerate(vocab_sizes)]


def kjt_from_ids(ids: torch.Tensor) -> KeyedJaggedTensor:
    """``ids [B, F]`` (one id per field) -> a KJT with keys ``f0..f{F-1}``."""
    batch, fields = ids.shape
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{f}" for f in range(fields)], values=ids.t().reshape(-1),
        lengths=torch.ones(batch * fields, dtype=torch.long))


class DLRMLite(nn.Module):
    """Pooled field embeddings -> pairwise dot interactions + the embeddings -> MLP -> logit."""

    def __init__(self, vocab_sizes: list[int], dim: int = 16, hidden: tuple[int, ...] = (64, 32),
                 device: torch.device | str = "meta"):
        super().__init__()
        self.fields = len(vocab_sizes)
        self.ebc = EmbeddingBagCollection(tables=field_tables(vocab_sizes, dim),
                                          device=torch.device(device))
        n_pairs = self.fields * (self.fields - 1) // 2
        layers: list[nn.Module] = []
        width = self.fields * dim + n_pairs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.top = nn.Sequential(*layers)
        self.register_buffer("_iu", torch.triu_indices(self.fields, self.fields, offset=1),
                             persistent=False)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(kjt).to_dict()
        emb = torch.stack([pooled[f"f{f}"] for f in range(self.fields)], dim=1)  # [B, F, D]
        inter = torch.bmm(emb, emb.transpose(1, 2))[:, self._iu[0], self._iu[1]]
        return self.top(torch.cat([emb.flatten(1), inter], dim=1)).squeeze(-1)
