"""Shared fixtures of the Lightning tests."""

import pytest

from .test_lightning import ROOT
from .zygote import Pair


@pytest.fixture(scope="session")
def pair():
    """Two pre-imported rank processes (ranks 0 and 1) that fork one 2-rank job per call."""
    p = Pair(ROOT)
    yield p
    p.close()
