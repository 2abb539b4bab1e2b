"""The compiled CPU kernel of the LayerNorm moment path (weightablate::token_moment_scores) against its
PyTorch reference (weightablate.token_moments.score_pairs_reference): on random moments and scalars, and
end to end through wa.ablate on the small GPT of test_transformers."""
import pytest
import torch
from test_transformers import gpt, lm_data, token_oracle

import weightablate as wa
from weightablate import token_moments
from weightablate.token_moments import TokenStats, score_pairs, score_pairs_reference, unit_moments

pytestmark = pytest.mark.skipif(not token_moments.has_kernel(), reason="token_moment_scores is not compiled")


def _case(K, M, U, V, seed, scale, zero_units=0):
    """TokenStats and unit moments of random directions, and pairs' alpha, beta (K, M) over orders of
    magnitude, some exactly zero; the first ``zero_units`` units have constant directions (b-moments 0)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    A = torch.randn(M, V, generator=g, dtype=f64)
    logits = 3 * torch.randn(M, V, generator=g, dtype=f64)
    probs = logits.softmax(1)
    labels = torch.randint(0, V, (M,), generator=g)
    ts = TokenStats(A, logits, probs, labels)
    B = torch.randn(U, V, generator=g, dtype=f64)
    B[:zero_units] = 0.7
    mom = unit_moments(ts, B)
    mag = scale * 10.0 ** torch.empty(K, M, dtype=f64).uniform_(-6, 0, generator=g)
    alpha = mag * torch.randn(K, M, generator=g, dtype=f64)
    beta = mag * torch.randn(K, M, generator=g, dtype=f64)
    zero = torch.rand(K, M, generator=g) < 0.1
    alpha[zero], beta[zero] = 0.0, 0.0
    beta[torch.rand(K, M, generator=g) < 0.05] = 0.0
    slot = torch.randint(0, U, (K,), generator=g)
    return alpha, beta, slot, ts, mom


def _compare(alpha, beta, slot, ts, mom):
    dce, kl, und = score_pairs(alpha, beta, slot, ts, mom)
    rdce, rkl, rund = score_pairs_reference(alpha, beta, slot, ts, mom)
    assert dce.dtype == kl.dtype == torch.float64 and und.dtype == torch.bool
    assert torch.equal(und, rund)
    ok = ~rund
    assert torch.allclose(kl[ok], rkl[ok], rtol=1e-12, atol=0)
    assert torch.allclose(dce[ok], rdce[ok], rtol=1e-12, atol=0)
    return und


@pytest.mark.parametrize("K,M,U,V", [(1, 1, 1, 5), (1, 37, 2, 11), (9, 1, 3, 7), (23, 700, 5, 31), (4, 1030, 4, 3)])
def test_kernel_matches_reference(K, M, U, V):
    seen_und = seen_dec = 0
    for seed, scale in ((0, 1.0), (1, 0.3), (2, 3.0)):
        alpha, beta, slot, ts, mom = _case(K, M, U, V, seed, scale, zero_units=min(1, U - 1))
        und = _compare(alpha, beta, slot, ts, mom)
        seen_und += int(und.sum())
        seen_dec += int((~und).sum())
    assert seen_dec > 0
    if K * M > 100:
        assert seen_und > 0  # both outcomes of the certificate ran


def test_kernel_covers_every_branch():
    """x > 1/2, |S| beyond the log series (log1p), moments all zero (a constant direction, one
    class), alpha = beta = 0."""
    alpha, beta, slot, ts, mom = _case(64, 300, 6, 13, 5, 1.0, zero_units=2)
    x = alpha.abs() * ts.a_max[None] + beta.abs() * mom["range"][slot][:, None]
    und = score_pairs_reference(alpha, beta, slot, ts, mom)[2]
    mu = {k: v.t()[slot] for k, v in mom["mu"].items()}
    S = alpha * mu[(1, 0)] + beta * mu[(0, 1)]
    assert (x > 0.5).any()
    assert ((S.abs() > token_moments.LOG_SERIES_MAX) & ~und).any()
    assert ((alpha == 0) & (beta == 0)).any()
    assert (slot < 2).any()
    _compare(alpha, beta, slot, ts, mom)
    # one class: q = 0, every moment zero
    alpha, beta, slot, ts, mom = _case(5, 40, 2, 1, 6, 1.0)
    assert torch.equal(mom["packed"], torch.zeros_like(mom["packed"]))
    _compare(alpha, beta, slot, ts, mom)


def test_kernel_follows_certify(monkeypatch):
    alpha, beta, slot, ts, mom = _case(8, 200, 3, 9, 7, 0.3)
    monkeypatch.setattr(token_moments, "CERTIFY", 0.0)
    und = _compare(alpha, beta, slot, ts, mom)
    assert und[(alpha != 0) | (beta != 0)].all()


def test_kernel_refuses_bad_arguments():
    alpha, beta, slot, ts, mom = _case(3, 10, 2, 5, 8, 1.0)
    op = torch.ops.weightablate.token_moment_scores
    args = [alpha, beta, slot, mom["packed"], ts.gap_a, mom["gap_b"].t(), ts.a_max, ts.q, mom["range"], 5, 1e-10]
    bad = list(args)
    bad[2] = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="slot out of range"):
        op(*bad)
    bad = list(args)
    bad[3] = mom["packed"][:, :20]
    with pytest.raises(RuntimeError, match="moments must be"):
        op(*bad)
    bad = list(args)
    bad[0] = alpha.float()
    with pytest.raises(RuntimeError):
        op(*bad)


@pytest.mark.parametrize("layer,scale", [("blocks.1.fc", 0.2), ("blocks.1.out", 1.0), ("blocks.1.fc", 1.0)])
def test_ablate_kernel_matches_reference_and_oracle(layer, scale, monkeypatch):
    model = gpt()
    with torch.no_grad():
        model.get_submodule(layer).weight.mul_(scale)
    X, y = lm_data()
    n_in = model.get_submodule(layer).in_features
    w = torch.arange(3 * n_in)
    calls = []
    reference = token_moments.score_pairs_reference
    monkeypatch.setattr(token_moments, "score_pairs_reference", lambda *a: calls.append(1) or reference(*a))
    fast = wa.ablate(model, layer, (X, y), w, precision="float64", by_class=True)
    assert not calls and "mixed moments" in fast.head  # the kernel scored every chunk
    monkeypatch.setattr(token_moments, "has_kernel", lambda: False)
    slow = wa.ablate(model, layer, (X, y), w, precision="float64", by_class=True)
    assert calls
    assert fast.extra["exact_fraction"] == slow.extra["exact_fraction"] < 1
    for field in ("delta_loss", "delta_kl", "class_loss"):
        assert torch.allclose(getattr(fast, field), getattr(slow, field), rtol=1e-12, atol=1e-300), field
    for field in ("flips", "new_errors", "new_correct", "exact_zero"):
        assert torch.equal(getattr(fast, field), getattr(slow, field)), field
    ref = token_oracle(model, layer, X, y, w)
    scale_ = ref["abs_sum"] + 1e-300
    assert ((fast.delta_loss - ref["delta_loss"]).abs() <= 1e-9 * scale_ + 1e-13).all()
    assert ((fast.delta_kl - ref["delta_kl"]).abs() <= 1e-9 * ref["delta_kl"].abs() + 1e-13).all()
    assert torch.equal(fast.flips, ref["flips"])


def test_backend_torch_takes_the_reference(monkeypatch):
    model = gpt()
    X, y = lm_data()
    calls = []
    reference = token_moments.score_pairs_reference
    monkeypatch.setattr(token_moments, "score_pairs_reference", lambda *a: calls.append(1) or reference(*a))
    a = wa.ablate(model, "blocks.1.fc", (X, y), torch.arange(64), precision="float64", backend="torch")
    assert calls
    b = wa.ablate(model, "blocks.1.fc", (X, y), torch.arange(64), precision="float64")
    assert torch.allclose(a.delta_loss, b.delta_loss, rtol=1e-12, atol=1e-300)


def test_opcheck():
    alpha, beta, slot, ts, mom = _case(6, 50, 3, 7, 9, 1.0)
    args = (alpha, beta, slot, mom["packed"], ts.gap_a, mom["gap_b"].t().contiguous(), ts.a_max, ts.q, mom["range"],
            7, 1e-10)
    torch.library.opcheck(torch.ops.weightablate.token_moment_scores, args)
