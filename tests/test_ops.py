"""The compiled ops against the PyTorch reference on random inputs, odd sizes, and opcheck."""
import pytest
import torch

import weightablate  # noqa: F401  (registers the ops)
from weightablate import _reference

OPS = torch.ops.weightablate


def pair_inputs(I, J, N, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a_t = torch.relu(torch.randn(J, N, generator=g)).to(dtype)
    z_t = torch.randn(I, N, generator=g).to(dtype)
    flat = torch.randperm(I * J, generator=g)[:K]
    w = torch.randn(K, generator=g).to(dtype)
    gain = torch.rand(I, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(I, generator=g, dtype=torch.float64) * 0.1
    slope = torch.rand(I, generator=g, dtype=torch.float64) * 0.2
    return a_t, z_t, flat // J, flat % J, w, gain, shift, slope


def score_inputs(N, C, U, K, D, seed=0, scale=1.0, head=True):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(K, N, generator=g, dtype=torch.float64) * scale
    d[torch.rand(K, N, generator=g) < 0.4] = 0.0
    unit = torch.randint(0, U if head else C, (K,), generator=g)
    logits = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    probs = torch.softmax(logits, 1)
    labels = torch.randint(0, C, (N,), generator=g)
    V = torch.randn(U, C, generator=g, dtype=torch.float64) * 0.3 if head else None
    moments = slot = None
    if head and D:
        slot = torch.full((U,), -1, dtype=torch.int64)
        used = torch.arange(U)[torch.rand(U, generator=g) < 0.7]
        slot[used] = torch.arange(used.numel())
        moments = torch.stack([(V[used] ** k) @ probs.t() for k in range(1, D + 1)])
    return d, unit, V, probs, logits, labels, moments, slot


def assert_same_scores(got, ref):
    """Two implementations' score_deltas outputs: float64 sums to rounding, counts exactly."""
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(got[6], ref[6], rtol=1e-10, atol=1e-300)
    # KL ~ d^2 var / 2 inherits d * (rounding of E_p v): ~1e-16 / (|d| var) relative, 1e-10 at d = 1e-6
    torch.testing.assert_close(got[1], ref[1], rtol=1e-8, atol=1e-300)
    for g, r in zip(got[2:6], ref[2:6]):
        assert torch.equal(g, r)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 5, 33, 20), (16, 64, 257, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_deltas_matches_reference(shape, dtype):
    args = pair_inputs(*shape, dtype=dtype)
    got, ref = OPS.pair_deltas(*args), _reference.pair_deltas(*args)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("N,C,U,K", [(1, 1, 1, 1), (1, 3, 2, 5), (37, 10, 9, 23), (64, 101, 17, 40)])
@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("D", [0, 2, 6])
@pytest.mark.parametrize("scale", [1e-6, 1e-4, 3e-3, 2e-2, 0.1, 1.0, 50.0])  # every Horner degree
def test_score_deltas_matches_reference(N, C, U, K, head, D, scale):
    args = score_inputs(N, C, U, K, D, scale=scale, head=head)
    got = OPS.score_deltas(*args, True, True)
    assert_same_scores(got, _reference.score_deltas(*args, True, True))
    torch.testing.assert_close(got[6].sum(1), got[0], rtol=1e-12, atol=1e-300)


def test_moment_path_matches_exact_loop():
    args = score_inputs(200, 50, 8, 30, 6, scale=1e-3)
    with_m = OPS.score_deltas(*args, True)
    without = OPS.score_deltas(*args[:6], None, None, True)
    torch.testing.assert_close(with_m[0], without[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(with_m[1], without[1], rtol=1e-8, atol=0)


def test_score_deltas_kl_is_a_kl():
    """KL >= 0, and d = 0 everywhere gives exactly zero deltas and nonzero=False."""
    d, *rest = score_inputs(50, 10, 5, 12, 6)
    out = OPS.score_deltas(d, *rest, True)
    assert (out[1] >= 0).all()
    zero = OPS.score_deltas(torch.zeros_like(d), *rest, True)
    assert (zero[0] == 0).all() and (zero[1] == 0).all() and not zero[5].any()


def test_opcheck():
    torch.library.opcheck(OPS.pair_deltas, pair_inputs(5, 4, 9, 6))
    torch.library.opcheck(OPS.score_deltas, (*score_inputs(9, 4, 3, 5, 3), True))
    torch.library.opcheck(OPS.score_deltas, (*score_inputs(9, 4, 3, 5, 3), True, True))
    torch.library.opcheck(OPS.score_deltas, (*score_inputs(9, 4, 3, 5, 0, head=False), False))


def test_bad_arguments_are_named():
    a_t, z_t, rows, cols, w, gain, shift, slope = pair_inputs(5, 4, 9, 6)
    with pytest.raises(RuntimeError, match="rows out of range"):
        OPS.pair_deltas(a_t, z_t, rows + 100, cols, w, gain, shift, slope)
    with pytest.raises(RuntimeError, match="one dtype"):
        OPS.pair_deltas(a_t.double(), z_t, rows, cols, w, gain, shift, slope)
    d, unit, V, probs, logits, labels, m, slot = score_inputs(9, 4, 3, 5, 3)
    with pytest.raises(RuntimeError, match="labels out of range"):
        OPS.score_deltas(d, unit, V, probs, logits, labels + 10, m, slot, True)
    with pytest.raises(RuntimeError, match="d must be float64"):
        OPS.score_deltas(d.float(), unit, V, probs, logits, labels, m, slot, True)
