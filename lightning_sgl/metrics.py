"""Small, dependency-free metrics used by tests, examples and benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["roc_auc", "log_loss", "zero_row_share"]


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with averaged ranks for ties)."""
    scores = scores.detach().double().flatten().cpu()
    labels = labels.detach().flatten().cpu().bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both positive and negative labels")
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    if len(uniq) < len(s):
        ends = torch.cumsum(counts, 0).double()
        avg = ends - (counts.double() - 1) / 2
        ranks[order] = avg[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(probs: Tensor, labels: Tensor, eps: float = 1e-7) -> float:
    p = probs.detach().double().clamp(eps, 1 - eps)
    y = labels.detach().double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def zero_row_share(weight: Tensor, rows: Tensor | None = None) -> float:
    """Share of rows (optionally among ``rows``) that are exactly zero."""
    w = weight.detach()
    if rows is not None:
        w = w[rows]
    return float((w == 0).all(dim=1).float().mean())
