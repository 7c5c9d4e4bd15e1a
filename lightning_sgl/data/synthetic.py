"""A seeded synthetic CTR data set with a planted set of informative ids.

Each sample has ``num_fields`` categorical fields with one id each. Ids of a field are drawn from a
power law (``P(rank r) ~ (r + 1)^-zipf_exponent``, ranks randomly permuted onto ids), like real
categorical features. A planted subset of ids per field is *informative*: it carries a weight
``w = +-U(0.5, 1.5) * signal_scale``; every other id has weight 0 (noise). The label is
``Bernoulli(sigmoid(bias + sum_f w[f, id_f] + pairwise))`` where ``pairwise`` is a small
interaction between the first two fields' informative ids (so an MLP has something to learn).

Informative ids are drawn among ids whose expected count in ``num_samples`` draws is at least
``min_informative_count`` (an id seen twice cannot be learned by any method), and the ground truth
is returned so tests can check which features a sparse model kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["CTRDataset", "make_synthetic_ctr"]


@dataclass
class CTRDataset:
    """A CTR data set held in memory: categorical ids per field, click labels and, for the
    synthetic set, the planted ground truth (what the real-data readers return too, with
    ``informative`` empty and ``probabilities`` NaN).

    Args:
        ids: ``[N, F]`` int64; ``ids[:, f]`` are ids local to field ``f`` (``< vocab_sizes[f]``).
        labels: ``[N]`` float32 in ``{0, 1}``.
        vocab_sizes: rows of each field's table.
        informative: per field, the sorted ids that carry signal (empty for real data).
        weights: per field, ``[vocab]`` true weights (0 for noise ids; zeros for real data).
        probabilities: ``[N]`` true click probabilities (NaN for real data).
    """

    ids: Tensor  # [N, F] int64
    labels: Tensor  # [N] float32 in {0, 1}
    vocab_sizes: list[int]
    informative: list[Tensor]  # per field: sorted int64 ids carrying signal
    weights: list[Tensor]  # per field: [vocab] true weights (0 for noise ids)
    probabilities: Tensor  # [N] true click probabilities

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def split(self, train_fraction: float = 0.8) -> tuple[CTRDataset, CTRDataset]:
        """Head/tail split (the tail plays the role of the later test days)."""
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"Invalid train_fraction: {train_fraction} (valid range: (0, 1))")
        n = int(len(self.labels) * train_fraction)
        a = CTRDataset(self.ids[:n], self.labels[:n], self.vocab_sizes, self.informative,
                       self.weights, self.probabilities[:n])
        b = CTRDataset(self.ids[n:], self.labels[n:], self.vocab_sizes, self.informative,
                       self.weights, self.probabilities[n:])
        return a, b

    def dataset(self) -> TensorDataset:
        """``(ids [F], label)`` pairs for a ``DataLoader``."""
        return TensorDataset(self.ids, self.labels)

    def offsets(self) -> Tensor:
        """Start of each field in a single concatenated table (``[F]``)."""
        sizes = torch.tensor([0] + self.vocab_sizes[:-1])
        return torch.cumsum(sizes, 0)

    def informative_global(self) -> Tensor:
        """Informative ids as rows of one concatenated table (field offsets added)."""
        off = self.offsets()
        return torch.cat([ids + off[f] for f, ids in enumerate(self.informative)])


def make_synthetic_ctr(
    num_samples: int = 50_000,
    num_fields: int = 8,
    vocab_size: int | list[int] = 2_000,
    informative_fraction: float = 0.1,
    zipf_exponent: float = 1.05,
    signal_scale: float = 1.0,
    interaction_scale: float = 0.5,
    bias: float = -1.0,
    min_informative_count: float = 50.0,
    seed: int = 0,
) -> CTRDataset:
    """Generate the data set (deterministic for a given ``seed``).

    Args:
        num_samples: number of samples N.
        num_fields: number of categorical fields F.
        vocab_size: ids per field (one int for all fields, or a list of F ints).
        informative_fraction: share of each field's vocabulary planted as informative.
        zipf_exponent: power-law exponent of id frequencies.
        signal_scale: std of informative ids' weights.
        interaction_scale: strength of the field-0 x field-1 interaction.
        bias: logit offset (sets the base click rate).
        min_informative_count: informative ids are drawn among ids with at least this expected
            count in ``num_samples`` samples.
        seed: random seed.
    """
    if num_samples < 1 or num_fields < 1:
        raise ValueError(f"Invalid num_samples/num_fields: {num_samples}/{num_fields} (>= 1)")
    if not 0.0 < informative_fraction <= 1.0:
        raise ValueError(
            f"Invalid informative_fraction: {informative_fraction} (valid range: (0, 1])")
    if zipf_exponent < 0:
        raise ValueError(f"Invalid zipf_exponent: {zipf_exponent} (valid range: >= 0)")
    sizes = [vocab_size] * num_fields if isinstance(vocab_size, int) else list(vocab_size)
    if len(sizes) != num_fields or min(sizes) < 1:
        raise ValueError(f"Invalid vocab_size: {vocab_size} (an int >= 1 or a list of {num_fields})")
    gen = torch.Generator().manual_seed(seed)
    ids, informative, weights = [], [], []
    logits = torch.full((num_samples,), float(bias), dtype=torch.float64)
    for v in sizes:
        ranks = torch.arange(v, dtype=torch.float64)
        probs = (ranks + 1.0) ** (-zipf_exponent)
        probs /= probs.sum()
        perm = torch.randperm(v, generator=gen)  # rank r -> id perm[r]
        rank_draw = torch.multinomial(probs, num_samples, replacement=True, generator=gen)
        field_ids = perm[rank_draw]
        eligible = perm[probs * num_samples >= min_informative_count]
        if len(eligible) == 0:
            eligible = perm[:1]
        k = max(1, min(len(eligible), round(informative_fraction * v)))
        chosen = eligible[torch.randperm(len(eligible), generator=gen)[:k]].sort().values
        w = torch.zeros(v, dtype=torch.float64)
        # magnitudes bounded away from 0 (in [0.5, 1.5] * signal_scale): a planted id carries signal
        sign = torch.randint(0, 2, (k,), generator=gen, dtype=torch.float64) * 2 - 1
        mag = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
        w[chosen] = sign * mag * signal_scale
        logits += w[field_ids]
        ids.append(field_ids)
        informative.append(chosen)
        weights.append(w)
    ids_t = torch.stack(ids, dim=1)
    if num_fields >= 2 and interaction_scale:
        logits += interaction_scale * torch.sign(weights[0][ids_t[:, 0]]) * torch.sign(
            weights[1][ids_t[:, 1]])
    p = torch.sigmoid(logits)
    labels = torch.bernoulli(p, generator=gen).float()
    return CTRDataset(ids_t, labels, sizes, informative, [w.float() for w in weights], p.float())
