"""Shared model, data and loss for the optimizer tests."""

import copy

import torch

from lightning_sgl.models import EmbeddingMLP


class TinyCTR(torch.nn.Module):
    """Small MLP + embedding model (float64) used by the optimizer tests."""

    def __init__(self, sparse=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = EmbeddingMLP([7, 5, 9], dim=4, hidden=(6,), sparse=sparse, init_std=0.3)
        self.double()

    def forward(self, ids):
        return self.net(ids)


def twin(model: TinyCTR) -> TinyCTR:
    """A deep copy with its embedding table marked again (``copy.deepcopy`` of a Parameter keeps
    its data only, not the ``mark_embedding`` attribute)."""
    from lightning_sgl.optim import mark_embedding

    out = copy.deepcopy(model)
    mark_embedding(out.net.embedding)
    return out


def batches(n_steps, batch=12, seed=1, vocab=(7, 5, 9), touch_all_first=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n_steps):
        ids = torch.stack([torch.randint(0, v, (batch,), generator=gen) for v in vocab], 1)
        if touch_all_first and t == 0:
            ids = torch.stack([torch.arange(max(vocab)) % v for v in vocab], 1)
        y = torch.randint(0, 2, (len(ids),), generator=gen).double()
        out.append((ids, y))
    return out


def loss_fn(model, ids, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(model(ids), y)



def train_steps(model, opt, data):
    """One optimizer step per ``(ids, y)`` batch."""
    for ids, y in data:
        opt.zero_grad()
        loss_fn(model, ids, y).backward()
        opt.step()
