"""Shared pieces of the TorchRec tests: a pure-PyTorch reference and batch generators."""

from __future__ import annotations

import torch

from lightning_sgl.optim import GroupAdagrad, GroupAdam, GroupAMSGrad, GroupMomentum, GroupSGD

CLASSES = {"sgd": GroupSGD, "momentum": GroupMomentum, "adagrad": GroupAdagrad,
           "adam": GroupAdam, "amsgrad": GroupAMSGrad}
HP = {"sgd": dict(lr=0.2), "momentum": dict(lr=0.05, momentum=0.9),
      "adagrad": dict(lr=0.1, eps=1e-8), "adam": dict(lr=0.05, betas=(0.8, 0.99), eps=1e-8),
      "amsgrad": dict(lr=0.05, betas=(0.8, 0.99), eps=1e-8)}
LAMBDAS = dict(lambda1=1e-2, lambda21=3.0, lambda2=1e-2)


def lambdas_for(opt: str) -> dict:
    """Lambdas strong enough to zero some rows within 20 steps of the test batches."""
    return dict(LAMBDAS, lambda21=10.0) if opt == "momentum" else dict(LAMBDAS)


def make_batch(gen, vocab_per_feature, batch, max_len=3, weighted=False, dtype=torch.float32):
    """TBE-style (indices, offsets, per_sample_weights) for features with the given vocab sizes."""
    idx, lens = [], []
    for v in vocab_per_feature:
        ln = torch.randint(0, max_len + 1, (batch,), generator=gen)
        ln[0] = max(1, int(ln[0]))  # every feature has at least one id (steps stay aligned)
        lens.append(ln)
        idx.append(torch.randint(0, v, (int(ln.sum()),), generator=gen))
    lengths = torch.cat(lens)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.cat(idx)
    w = torch.rand(len(indices), generator=gen, dtype=dtype) + 0.5 if weighted else None
    return indices, offsets, w


class Reference(torch.nn.Module):
    """Pooled lookups over ``nn.Embedding(sparse=True)`` tables, trained by the torch.optim Group
    optimizer with sparse gradients (lazy rows): the independent reference for the fused kernel."""

    def __init__(self, weights, feature_table_map, pooling):
        super().__init__()
        self.tables = torch.nn.ModuleList()
        for w in weights:
            e = torch.nn.Embedding(*w.shape, sparse=True, dtype=w.dtype)
            e.weight.data.copy_(w)
            self.tables.append(e)
        self.ftm = list(feature_table_map)
        self.pooling = pooling

    def forward(self, indices, offsets, w=None):
        n_f = len(self.ftm)
        batch = (len(offsets) - 1) // n_f
        lengths = offsets[1:] - offsets[:-1]
        outs = []
        for f, t in enumerate(self.ftm):
            lo, hi = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
            ids = indices[lo:hi]
            ln = lengths[f * batch:(f + 1) * batch]
            bag = torch.repeat_interleave(torch.arange(batch), ln)
            vals = self.tables[t](ids)
            scale = torch.ones(len(ids), dtype=vals.dtype)
            if w is not None:
                scale = scale * w[lo:hi]
            if self.pooling == "mean":
                scale = scale / ln.clamp(min=1)[bag].to(vals.dtype)
            pooled = torch.zeros(batch, vals.shape[1], dtype=vals.dtype).index_add(
                0, bag, vals * scale[:, None])
            outs.append(pooled)
        return torch.cat(outs, dim=1)
