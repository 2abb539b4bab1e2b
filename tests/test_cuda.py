"""CUDA kernels: against the float64 oracle, against the CPU kernel, odd sizes, poisoned memory.
Marked `cuda`: skipped where no GPU is present (run them with `pytest -m cuda`); test_cuda_emulated.py
runs the same kernel source on the CPU everywhere."""
import pytest
import torch
from oracle import oracle
from test_correctness import digits, make, trained
from test_ops import assert_same_scores, pair_inputs, score_inputs

import weightablate as wa

pytestmark = pytest.mark.cuda
OPS = torch.ops.weightablate


def cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def poison():
    """Fill the caching allocator's free blocks with NaN so unwritten outputs show up."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 5, 33, 20), (64, 300, 1000, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_deltas_cuda_matches_cpu(shape, dtype):
    args = pair_inputs(*shape, dtype=dtype)
    poison()
    got = OPS.pair_deltas(*cuda(args)).cpu()
    torch.testing.assert_close(got, OPS.pair_deltas(*args), rtol=1e-14, atol=0)


@pytest.mark.parametrize("N,C,U,K", [(1, 1, 1, 1), (1, 3, 2, 5), (37, 10, 9, 23), (300, 1001, 17, 40)])
@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("D", [0, 6])
@pytest.mark.parametrize("scale", [1e-6, 1e-2, 50.0])
def test_score_deltas_cuda_matches_cpu(N, C, U, K, head, D, scale):
    args = score_inputs(N, C, U, K, D, scale=scale, head=head)
    poison()
    got = [t.cpu() for t in OPS.score_deltas(*cuda(args), True, True)]
    assert_same_scores(got, OPS.score_deltas(*args, True, True))


@pytest.mark.parametrize("head", ["logits", "relu", "leaky", "batchnorm", "gelu"])
@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_cuda_matches_float64_oracle(head, mode):
    torch.manual_seed(2)
    X, y = digits(300)
    model, layer = make(head)
    trained(model, X, y, steps=50)
    idx = torch.randperm(model.get_submodule(layer).weight.numel())[:60]
    ref = oracle(model, layer, X, y, idx)
    r = wa.ablate(model.cuda(), layer, (X, y), weights=idx, backend="cuda", mode=mode, precision="float64")
    assert r.backend == "cuda"
    err = (r.delta_loss - ref["delta_loss"]).abs()
    assert (err <= 1e-9 * ref["delta_loss"].abs() + ref["round"]).all()
    assert torch.equal(r.flips, ref["flips"]) and torch.equal(r.exact_zero, ref["exact_zero"])


@pytest.mark.parametrize("case", [(7, 5, 33, 10, None, 0.02, True), (4, 40, 70, 101, None, 0.05, True),
                                  (4, 40, 70, 101, None, 1.5, True), (3, 33, 20, 1000, None, 0.02, True),
                                  (10, 20, 50, 10, None, 0.3, False)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("by_class", [False, True])
def test_fused_scores_cuda_matches_cpu(case, dtype, by_class):
    """The GPU's fused kernel against the CPU's (the GPU's libm may differ in the last bits: the
    sums to rounding; the exact-loop and flip counts must agree)."""
    from test_fused import assert_same_scores as same_fused
    from test_fused import fused_inputs, with_moments

    I, J, N, C, K, scale, head = case
    args = fused_inputs(I, J, N, C, K, dtype=dtype, scale=scale, head=head, seed=J + C)
    extra = with_moments(args)
    poison()
    got = [t.cpu() for t in OPS.fused_scores(*cuda(args), *cuda(extra), True, by_class)]
    ref = OPS.fused_scores(*args, *extra, True, by_class)
    same_fused(got[:7], ref[:7])
    assert torch.equal(got[7], ref[7]) and torch.equal(got[8], ref[8])
