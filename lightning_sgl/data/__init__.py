"""CTR data sets: the synthetic set with planted ground truth and readers of public formats
(:mod:`.readers`), both as :class:`CTRDataset`."""

from .synthetic import CTRDataset, make_synthetic_ctr

__all__ = ["CTRDataset", "make_synthetic_ctr"]
