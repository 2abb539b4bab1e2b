"""The LayerNorm closed form against models built to break it (found by an adversarial review):
per-channel modules on token tensors, a value added to itself, a unit whose logit direction is
zero while the normalisation still moves the logits, batches with no counted token. Each against
the float64 token oracle with verify=False, so the self-check cannot hide a wrong number."""
import pytest
import torch
from oracle import token_oracle
from torch import nn

import weightablate as wa

IGNORE = -100


class LM(nn.Module):
    """emb -> x + proj(act(fc(x))) (or u + u) -> ln_f -> head, per token."""

    def __init__(self, vocab=11, d=8, T=5, act=None, ln=None, self_add=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.3 * torch.randn(T, d))
        self.fc, self.proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.act = act if act is not None else nn.GELU()
        self.ln_f = ln if ln is not None else nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.self_add = self_add

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        u = self.proj(self.act(self.fc(x)))
        x = u + u if self.self_add else x + u
        return self.head(self.ln_f(x))


def data(N=4, T=5, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (N, T), generator=g), torch.randint(0, vocab, (N, T), generator=g)


def close(res, ref, rtol=1e-9):
    scale = ref["delta_loss"].abs().max()
    assert ((res.delta_loss - ref["delta_loss"]).abs() <= rtol * scale).all(), (res.delta_loss, ref["delta_loss"])
    assert torch.equal(res.flips, ref["flips"])


@pytest.mark.parametrize("act", ["prelu", "batchnorm"])
def test_per_channel_modules_on_tokens_act_on_axis_1(act):
    """PReLU(16) / BatchNorm1d(16) on (N, T=16, 16 units): torch applies them along the tokens."""
    torch.manual_seed(0)
    mod = nn.PReLU(16) if act == "prelu" else nn.BatchNorm1d(16)
    with torch.no_grad():
        mod.weight.copy_(torch.linspace(-1, 1, 16))
        if act == "batchnorm":
            mod.running_mean.normal_(), mod.running_var.uniform_(0.5, 2), mod.bias.normal_()
    model = LM(T=16, act=mod).eval()
    X, y = data(N=3, T=16)
    w = torch.arange(96, 104)
    res = wa.ablate(model, "fc", (X, y), w, precision="float64", verify=False)
    assert res.method == "replay" and "axis 1" in res.head
    close(res, token_oracle(model, "fc", X, y, w))


@pytest.mark.parametrize("layer", ["fc", "proj"])
def test_a_value_added_to_itself_is_not_a_residual(layer):
    torch.manual_seed(0)
    model = LM(self_add=True).eval()
    X, y = data()
    w = torch.arange(12)
    res = wa.ablate(model, layer, (X, y), w, precision="float64", verify=False)
    assert res.method == "replay" and "to itself" in res.head
    close(res, token_oracle(model, layer, X, y, w))


def test_exact_zero_when_only_the_normalisation_moves_the_logits():
    """Feature 4 of the residual has a zero column in the head and rows that sum to 0: B_i = 0, yet
    its change rescales the LayerNorm (alpha A_t): the loss changes, exact_zero must be False."""
    torch.manual_seed(0)
    model = LM(vocab=3, ln=nn.LayerNorm(8, elementwise_affine=False)).eval()
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1., -1., .5, -.5, 0., 0., .25, -.25],
                                              [0., .5, -1., 1., 0., -.5, .75, -.75],
                                              [2., 0., -1., 0., 0., -1., 0., 0.]]))
    X, y = data(vocab=3)
    w = torch.arange(4 * 16, 5 * 16)  # row 4 of proj
    ref = token_oracle(model, "proj", X, y, w)
    for mode in ("auto", "exact"):
        res = wa.ablate(model, "proj", (X, y), w, precision="float64", verify=False, mode=mode)
        assert res.method == "layernorm"
        close(res, ref)
        assert not res.exact_zero.any() and (res.delta_loss != 0).all()


def test_batches_without_a_counted_token():
    torch.manual_seed(0)
    model = LM().eval()
    X, y = data(N=3)
    y[0] = IGNORE  # the first batch of batch_size=1 counts nothing: the self-check says it did not run
    w = torch.arange(20)
    ref = token_oracle(model, "fc", X, y, w)
    for kw in ({}, {"mode": "exact"}, {"method": "replay"}):
        res = wa.ablate(model, "fc", (X, y), w, precision="float64", batch_size=1, **kw)
        close(res, ref)
        assert res.n_samples == int((y != IGNORE).sum())
        assert res.extra["self_check"].startswith("not run: no token of the first batch counts")
    y[:] = IGNORE
    with pytest.raises(ValueError, match=r"^data: no prediction counts: every label is ignore_index"):
        wa.ablate(model, "fc", (X, y), w)


@pytest.mark.parametrize("big,layer", [(1e60, "fc"), (1e150, "proj")])
def test_a_huge_residual_value_is_scored_exactly(big, layer):
    """One token's residual holds 1e60 / 1e150: x^6 of its moments overflows (those entries go to the
    exact form; d = 0 entries stay 0, not 0 * inf), and s s0 (s + s0) would overflow in alpha."""
    torch.manual_seed(4)
    model = LM(vocab=24).double().eval()
    X, y = data(N=3, vocab=24, seed=2)
    with torch.no_grad():
        model.emb.weight[X[0, 0], 2] = big
    w = torch.arange(0, 128, 5)
    ref = token_oracle(model, layer, X, y, w)
    for kw in ({}, {"backend": "torch"}, {"mode": "exact"}):
        res = wa.ablate(model, layer, (X, y), w, precision="float64", verify=False, **kw)
        assert torch.isfinite(res.delta_loss).all() and torch.isfinite(res.delta_kl).all(), kw
        close(res, ref)


def test_a_massive_activation_along_the_unit_goes_to_the_exact_form():
    """A residual feature ~1e5 larger than the rest (as in large LMs), ablating the unit writing it:
    alpha a and beta b nearly cancel and the KL would be a small difference of the moments' order-2
    terms; the cancellation guard sends those pairs to the exact form (KL as mode="exact")."""
    torch.manual_seed(0)
    model = LM(vocab=24).double().eval()
    with torch.no_grad():
        model.proj.bias[2] += 1e5
    X, y = data(N=2, vocab=24, seed=1)
    w = torch.arange(2 * 16, 3 * 16)  # proj's row 2: the massive feature
    auto = wa.ablate(model, "proj", (X, y), w, precision="float64", verify=False)
    exact = wa.ablate(model, "proj", (X, y), w, precision="float64", verify=False, mode="exact")
    assert auto.extra["exact_fraction"] > 0.5
    assert ((auto.delta_kl - exact.delta_kl).abs() <= 1e-9 * exact.delta_kl.abs()).all()
    assert torch.allclose(auto.delta_loss, exact.delta_loss, rtol=1e-10, atol=0)
