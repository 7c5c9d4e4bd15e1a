"""Data sets for CTR experiments (synthetic now; Criteo/Avazu/MovieLens readers later)."""

from .synthetic import SyntheticCTR, make_synthetic_ctr

__all__ = ["SyntheticCTR", "make_synthetic_ctr"]
