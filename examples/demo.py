"""Demo: a small embedding + MLP CTR model on the built-in synthetic data, Adam vs GroupAdam.

Prints loss, AUC and the share of embedding rows that are exactly zero (deleted features).
Run with ``make demo`` (or ``python examples/demo.py``).
"""

from __future__ import annotations

import argparse

import torch

from lightning_sgl import GroupAdam
from lightning_sgl.data import make_synthetic_ctr
from lightning_sgl.metrics import log_loss, roc_auc
from lightning_sgl.models import train_embedding_mlp


def train(make_opt, data, epochs: int, batch: int, seed: int = 1):
    model, logits, test_set = train_embedding_mlp(
        make_opt, data, epochs, batch, seed,
        on_epoch=lambda e, loss: print(f"  epoch {e + 1}: train loss {loss:.4f}"))
    p = torch.sigmoid(logits)
    train_set, _ = data.split(0.8)
    zero = (model.embedding.weight == 0).all(dim=1)
    seen = torch.unique(train_set.ids + model.offsets)
    informative = data.informative_global()
    return dict(auc=roc_auc(p, test_set.labels), logloss=log_loss(p, test_set.labels),
                zero_rows=zero.float().mean().item(),
                feature_rate=(~zero[seen]).float().mean().item(),
                informative_kept=(~zero[informative]).float().mean().item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=60_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lambda21", type=float, default=5e-3)
    args = ap.parse_args(argv)
    data = make_synthetic_ctr(num_samples=args.samples, num_fields=8, vocab_size=2_000, seed=0)
    print(f"synthetic CTR: {args.samples} samples, 8 fields x 2000 ids, "
          f"{len(data.informative_global())} planted informative ids")

    def group_adam(m):
        emb = m.embedding.weight
        rest = [p for p in m.parameters() if p is not emb]
        return GroupAdam([{"params": [emb], "lambda21": args.lambda21},
                          {"params": rest, "group_by": "none"}], lr=1e-2)

    runs = {"Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
            f"GroupAdam(lambda21={args.lambda21:g})": group_adam}
    results = {}
    for name, make in runs.items():
        print(f"{name}:")
        results[name] = train(make, data, args.epochs, args.batch)
    print(f"\n{'optimizer':28s} {'AUC':>7s} {'logloss':>8s} {'zero rows':>10s} "
          f"{'feature rate':>13s} {'informative kept':>17s}")
    for name, r in results.items():
        print(f"{name:28s} {r['auc']:7.4f} {r['logloss']:8.4f} {r['zero_rows']:10.1%} "
              f"{r['feature_rate']:13.1%} {r['informative_kept']:17.1%}")


if __name__ == "__main__":
    main()
