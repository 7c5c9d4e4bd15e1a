"""Property tests (hypothesis) of the proximal step."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lightning_sgl.optim._prox import prox, soft_threshold

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
lam = st.floats(0.0, 10.0, allow_nan=False, width=64)
sigma_el = st.floats(1e-3, 1e3, allow_nan=False, width=64)


@st.composite
def problems(draw):
    g = draw(st.integers(1, 4))
    d = draw(st.integers(1, 6))
    z = torch.tensor(draw(arrays("float64", (g, d), elements=finite)))
    rowwise = draw(st.booleans())
    shape = (g, 1) if rowwise else (g, d)
    sigma = torch.tensor(draw(arrays("float64", shape, elements=sigma_el)))
    return z, sigma, draw(lam), draw(lam), draw(lam), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(problems())
def test_group_zero_iff_norm_below_threshold(p):
    z, sigma, l1, l21, l2, _ = p
    x = prox(z, sigma, l1, l21, l2, exact=False)
    s = soft_threshold(z, l1)
    scale = s.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    norms = torch.linalg.vector_norm(s / scale, dim=1) * scale.squeeze(1)  # no underflow
    zero = (x == 0).all(dim=1)
    thr = math.sqrt(z.shape[1]) * l21
    # at the boundary itself rounding of the norm decides; stay 1e-12 (relative) away from it
    assume(((norms - thr).abs() > 1e-12 * (thr + norms)).all() or thr == 0)
    # a (sub)normal-tiny s divided by sigma + 2*lambda2 underflows to 0 without any shrink
    assume(bool(((s == 0) | (s.abs() > 1e-200)).all()))
    assert torch.equal(zero, norms <= thr)


@settings(max_examples=300, deadline=None)
@given(problems(), lam)
def test_larger_lambda21_never_increases_group_norm(p, extra):
    z, sigma, l1, l21, l2, exact = p
    a = torch.linalg.vector_norm(prox(z, sigma, l1, l21, l2, exact), dim=1)
    b = torch.linalg.vector_norm(prox(z, sigma, l1, l21 + extra, l2, exact), dim=1)
    assert (b <= a + 1e-12 * (1 + a)).all()


@settings(max_examples=300, deadline=None)
@given(problems())
def test_lambda1_zeroes_exactly_small_coordinates(p):
    z, sigma, l1, _, l2, exact = p
    x = prox(z, sigma, l1, 0.0, l2, exact)
    assert torch.equal(x == 0, z.abs() <= l1)


@settings(max_examples=300, deadline=None)
@given(problems())
def test_output_finite_for_finite_input(p):
    z, sigma, l1, l21, l2, exact = p
    assert torch.isfinite(prox(z, sigma, l1, l21, l2, exact)).all()


@settings(max_examples=100, deadline=None)
@given(problems())
def test_sign_is_opposite_of_z(p):
    z, sigma, l1, l21, l2, exact = p
    x = prox(z, sigma, l1, l21, l2, exact)
    assert (x * z <= 0).all()


def test_zero_denominator_gives_zero_not_nan():
    z = torch.zeros(2, 3, dtype=torch.float64)
    x = prox(z, torch.zeros(2, 1, dtype=torch.float64), 0.0, 0.0, 0.0)
    assert torch.equal(x, torch.zeros_like(x))


@pytest.mark.parametrize("tiny", [4.9407e-324, 2.2251e-309, 1e-310])
@pytest.mark.parametrize("lambda21", [0.0, 1e-320, 1e-3])
def test_subnormal_groups_stay_finite(tiny, lambda21):
    """Found by hypothesis: a subnormal group norm made ``t / norm`` (a Python number divided by
    a tensor is ``t * reciprocal(norm)`` = 0 * inf) NaN. With lambda21 = 0 the prox is exactly
    ``-z / sigma``."""
    z = torch.tensor([[tiny, -tiny]], dtype=torch.float64)
    sigma = torch.ones(1, 2, dtype=torch.float64)
    x = prox(z, sigma, 0.0, lambda21, 0.0)
    assert torch.isfinite(x).all()
    if lambda21 == 0.0:
        assert torch.equal(x, -z)
