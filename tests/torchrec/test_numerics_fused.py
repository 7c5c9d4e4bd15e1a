"""Fused numerics that hold: any finite output gradient (entries up to 1e30 in magnitude) and
finite hyperparameters never put a non-finite value into a table or its optimizer state, on
every engine, element-wise and row-wise. A row whose result would not be finite keeps its old
value and state under both policies; ``raise`` then names it, ``skip`` goes on silently.

The dense counterpart (``torch.optim`` front end) is ``tests/optim/test_numerics.py``.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sgl.optim import NonFiniteGradientError
from torchrec_ext import GroupTBE, TableSpec
from torchrec_ext.kernel import native

from .helpers import HP

TABLES = [TableSpec("a", 6, 4), TableSpec("b", 5, 8)]
FTM = [0, 1, 0]
BATCH = 3
ENGINES = ["eager"] + (["native"] if native.available() else [])
CASES = [(o, r) for o in HP for r in (False, True) if not (r and o in ("sgd", "momentum"))]


@st.composite
def output_gradients(draw, steps=3):
    """Upstream gradients of the pooled output: magnitudes 1e-30 .. 1e30, random signs/zeros."""
    width = sum(TABLES[t].local_cols for t in FTM) * BATCH
    out = []
    for _ in range(steps):
        exps = draw(st.lists(st.floats(-30, 30), min_size=width, max_size=width))
        signs = draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=width,
                              max_size=width))
        out.append(torch.tensor([s * 10.0 ** e for s, e in zip(signs, exps)]
                                ).reshape(BATCH, -1))
    return out


def _batch():
    # duplicates inside a bag and across features of the shared table; an empty bag
    indices = torch.tensor([0, 0, 5, 1, 2, 4, 4, 3, 1, 0, 5, 5])
    lengths = torch.tensor([2, 1, 0, 2, 1, 2, 1, 1, 2])
    return indices, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def _all_finite(kernel):
    return (all(torch.isfinite(w).all() for w in kernel.split_embedding_weights())
            and all(torch.isfinite(v).all() for s in kernel.get_optimizer_state()
                    for v in s.values()))


@pytest.mark.parametrize("opt,rowwise", CASES, ids=[f"{o}-{'rw' if r else 'ew'}" for o, r in CASES])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("policy", ["raise", "skip"])
@settings(max_examples=15, deadline=None)
@given(grads=output_gradients(), lr_exp=st.floats(-4, 0),
       lam=st.sampled_from([0.0, 1e-3, 0.5]))
def test_finite_gradients_never_write_nonfinite_values(opt, rowwise, engine, policy, grads,
                                                       lr_exp, lam):
    hp = {**HP[opt], "lr": 10.0 ** lr_exp, "lambda1": lam, "lambda21": lam, "lambda2": lam}
    kernel = GroupTBE(TABLES, FTM, optimizer=opt, hyperparameters=hp, rowwise=rowwise,
                      nonfinite=policy, compiled=engine == "native")
    assert kernel.engine() == engine
    with torch.no_grad():
        for w in kernel.split_embedding_weights():
            w.copy_(torch.linspace(-1, 1, w.numel()).reshape(w.shape))
    indices, offsets = _batch()
    for g in grads:
        out = kernel(indices, offsets)
        try:
            out.backward(g)
        except NonFiniteGradientError as err:
            assert policy == "raise"
            assert "table" in str(err)  # names what it kept
        assert _all_finite(kernel), "a non-finite weight or state was written"
