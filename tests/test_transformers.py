"""Transformers and language models (issue 16): Linear targets on token inputs (N, T, F), through
attention, LayerNorm, GELU and residuals, scored by replay against the float64 oracle; per-token
losses with ignore_index; the adversarial habits of transformer code (tied embeddings, in-place
residual adds, fused qkv, a causal mask buffer holding -inf)."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from oracle import oracle, token_oracle
from torch import nn

import weightablate as wa

IGNORE = -100


class Block(nn.Module):
    """A GPT block: pre-LayerNorm, fused qkv, causal attention, GELU MLP, in-place residual adds."""

    def __init__(self, d, heads, T, sdpa):
        super().__init__()
        self.heads, self.sdpa, self.inplace = heads, sdpa, True
        self.scale = 1 / math.sqrt(d // heads)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("mask", torch.full((T, T), float("-inf")).triu(1))  # -inf above the diagonal

    def forward(self, x):
        N, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.view(N, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask[:T, :T])
        else:
            att = q @ k.transpose(-2, -1) * self.scale + self.mask[:T, :T]
            a = att.softmax(-1) @ v
        a = self.proj(a.transpose(1, 2).reshape(N, T, d))
        if self.inplace:
            x += a  # in place, as nanoGPT-style code does
        else:
            x = x + a  # (autograd refuses the in-place add: benchmarks/criteria_transformers.py trains)
        x = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return x


class GPT(nn.Module):
    def __init__(self, vocab=23, d=16, heads=2, T=8, layers=2, sdpa=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(0.1 * torch.randn(T, d))
        self.blocks = nn.ModuleList([Block(d, heads, T, sdpa) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied input/output embeddings

    def forward(self, idx):
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def lm_data(N=6, T=8, vocab=23, seed=0):
    """Token ids and next-token labels; the tail of some sequences is padding (ignore_index)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (N, T), generator=g)
    y = torch.roll(idx, -1, 1)
    y[:, -1] = IGNORE
    y[1, 5:] = IGNORE
    y[3, 2:] = IGNORE
    return idx, y


def gpt(**kw):
    torch.manual_seed(0)
    m = GPT(**kw).eval()
    with torch.no_grad():  # LayerNorm affine parameters away from 1/0, so they matter
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(0.3 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return m


def some(n, K, seed=1):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:K]


def assert_tokens_match(res, ref, rtol=1e-7):
    scale = ref["abs_sum"] + 1e-300
    assert ((res.delta_loss - ref["delta_loss"]).abs() <= rtol * scale + 1e-13).all(), \
        (res.delta_loss, ref["delta_loss"])
    assert ((res.delta_kl - ref["delta_kl"]).abs() <= rtol * ref["delta_kl"].abs() + 1e-13).all()
    assert torch.equal(res.flips, ref["flips"])


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("layer", ["blocks.0.qkv", "blocks.0.proj", "blocks.1.fc", "blocks.1.out"])
def test_gpt_token_loss_matches_oracle(layer, sdpa):
    model = gpt(sdpa=sdpa)
    X, y = lm_data()
    n = model.get_submodule(layer).weight.numel()
    w = some(n, 6)
    res = wa.ablate(model, layer, (X, y), w, precision="float64")
    ref = token_oracle(model, layer, X, y, w)
    # the last block's MLP reaches the logits token-wise through ln_f: the LayerNorm closed form
    assert res.method == ("layernorm" if layer.startswith("blocks.1") else "replay")
    if res.method == "layernorm":
        assert_tokens_match(wa.ablate(model, layer, (X, y), w, precision="float64", method="replay"), ref)
    assert res.n_samples == ref["n_tokens"] == int((y != IGNORE).sum())
    assert res.base_loss == pytest.approx(ref["base_loss"], rel=1e-12)
    assert_tokens_match(res, ref)
    assert (res.delta_loss != 0).all()  # the weights do matter: the test can fail


def test_gpt_float32_within_bound_and_bias():
    model = gpt()
    X, y = lm_data(seed=3)
    w = some(16 * 64, 5)
    res = wa.ablate(model, "blocks.1.fc", (X, y), w)  # float32 activations, the self-check runs
    ref = token_oracle(model, "blocks.1.fc", X, y, w)
    err = (res.delta_loss - ref["delta_loss"]).abs()
    assert (err <= 1e-5 * ref["delta_loss"].abs() + 1e-4 * ref["abs_sum"] + 1e-6).all()
    assert "agreed" in res.extra["self_check"]
    b = wa.ablate(model, "blocks.0.proj", (X, y), "bias", precision="float64")
    assert_tokens_match(b, token_oracle(model, "blocks.0.proj", X, y, torch.arange(16), "bias"))


def test_gpt_ignore_index_counts_nothing():
    """Changing the labels of ignored tokens changes nothing; ignoring more tokens changes the sums."""
    model = gpt()
    X, y = lm_data()
    w = some(48 * 16, 4)
    a = wa.ablate(model, "blocks.0.qkv", (X, y), w, precision="float64")
    y2 = y.clone()
    y2[:, :2] = IGNORE
    b = wa.ablate(model, "blocks.0.qkv", (X, y2), w, precision="float64")
    assert b.n_samples == a.n_samples - int((y[:, :2] != IGNORE).sum())
    assert_tokens_match(b, token_oracle(model, "blocks.0.qkv", X, y2, w))
    assert not torch.allclose(a.delta_loss, b.delta_loss)


def test_gpt_naive_backend_counts_tokens():
    model = gpt().double()
    X, y = lm_data()
    w = some(16 * 64, 3)
    nv = wa.ablate(model, "blocks.1.fc", (X, y), w, backend="naive")
    rp = wa.ablate(model, "blocks.1.fc", (X, y), w)
    assert nv.n_samples == rp.n_samples == int((y != IGNORE).sum())
    assert nv.extra["counted"] == rp.extra["counted"] == "tokens" and f"{rp.n_samples} tokens" in repr(rp)
    from weightablate.summary import format_summary, summarize
    assert f"{rp.n_samples} tokens" in format_summary(summarize(rp))
    assert torch.allclose(nv.delta_loss, rp.delta_loss, rtol=1e-9, atol=1e-12)
    assert torch.equal(nv.flips, rp.flips)


def test_token_labels_must_match_logits():
    model = gpt()
    X, y = lm_data()
    with pytest.raises(ValueError, match=r"labels of shape \(6, 7\) for logits \(6, 8, 23\)"):
        wa.ablate(model, "blocks.1.fc", (X, y[:, :7]), 2)
    with pytest.raises(ValueError, match=r"method='closed_form' does not apply.*per token and method 'split'.*"
                                         r"not a known element-wise map"):
        wa.ablate(model, "blocks.0.qkv", (X, y), 2, method="closed_form")


def test_mask_buffer_with_inf_is_accepted_nan_is_not():
    model = gpt()
    X, y = lm_data()
    wa.ablate(model, "blocks.1.out", (X, y), 2)  # the -inf causal mask is fine
    model.blocks[0].mask[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"buffer blocks.0.mask contains NaN"):
        wa.ablate(model, "blocks.1.out", (X, y), 2)
    model.blocks[0].fc.weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"blocks.0.fc.weight contains NaN or inf"):
        wa.ablate(model, "blocks.1.out", (X, y), 2)


class EncoderClassifier(nn.Module):
    """A sequence classifier of nn.TransformerEncoderLayers (mean over tokens)."""

    def __init__(self, norm_first, d=16):
        super().__init__()
        self.inp = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("layer", ["inp", "enc.layers.0.linear1", "enc.layers.1.linear2",
                                   "enc.layers.0.self_attn.out_proj"])
def test_transformer_encoder_layers_match_oracle(layer, norm_first):
    torch.manual_seed(0)
    model = EncoderClassifier(norm_first).eval()
    X, y = torch.randn(10, 6, 5), torch.randint(0, 3, (10,))
    w = some(model.get_submodule(layer).weight.numel(), 6)
    res = wa.ablate(model, layer, (X, y), w, precision="float64")
    ref = oracle(model, layer, X, y, w)
    assert res.method == "replay" and res.n_samples == 10
    assert torch.allclose(res.delta_loss, ref["delta_loss"], rtol=1e-7, atol=1e-13)
    assert torch.allclose(res.delta_kl, ref["delta_kl"], rtol=1e-7, atol=1e-13)
    assert torch.equal(res.flips, ref["flips"])
    assert (res.delta_loss != 0).sum() >= 4  # (a ReLU unit dead on every sample has none)


class SeparateQKV(nn.Module):
    """Attention from separate q/k/v Linears and F.scaled_dot_product_attention(is_causal=True), per-token logits."""

    def __init__(self, vocab=11, d=8, heads=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.heads = heads

    def forward(self, idx):
        x = self.emb(idx)
        N, T, d = x.shape
        q, k, v = (f(x).view(N, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(N, T, d)
        return self.out(self.norm(x + self.o(a)))


@pytest.mark.parametrize("layer", ["q", "k", "v", "o"])
def test_separate_qkv_linears_match_oracle(layer):
    torch.manual_seed(0)
    model = SeparateQKV().eval()
    X, y = lm_data(N=5, T=6, vocab=11, seed=2)
    w = some(64, 6)
    for param, idx in (("weight", w), ("bias", torch.arange(8))):
        res = wa.ablate(model, layer, (X, y), idx, param=param, precision="float64")
        assert_tokens_match(res, token_oracle(model, layer, X, y, idx, param))


def tiny_vit():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    with torch.no_grad():  # torchvision zero-initialises the head: nothing would change the logits
        vit.heads.head.weight.normal_(0, 0.3)
        vit.heads.head.bias.normal_(0, 0.1)
    return vit


@pytest.mark.parametrize("layer", ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_1.mlp.0",
                                   "encoder.layers.encoder_layer_1.mlp.3",
                                   "encoder.layers.encoder_layer_0.self_attention.out_proj", "heads.head"])
def test_vit_matches_oracle(layer):
    model = tiny_vit()
    X, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    w = some(model.get_submodule(layer).weight.numel(), 5)
    res = wa.ablate(model, layer, (X, y), w, precision="float64")
    ref = oracle(model, layer, X, y, w)
    assert res.method == {"heads.head": "logits", "encoder.layers.encoder_layer_0.mlp.0": "replay"}.get(
        layer, "layernorm" if "layer_1" in layer else "replay")
    assert torch.allclose(res.delta_loss, ref["delta_loss"], rtol=1e-7, atol=1e-13)
    assert torch.allclose(res.delta_kl, ref["delta_kl"], rtol=1e-7, atol=1e-13)
    assert torch.equal(res.flips, ref["flips"])
    assert (res.delta_loss != 0).all()


def test_wanda_sparsegpt_taylor_over_tokens():
    """The criteria on a GPT layer read every token: against direct float64 computations."""
    from weightablate import criteria

    model = gpt()
    X, y = lm_data()
    layer = model.blocks[1].fc
    seen = {}
    h = layer.register_forward_hook(lambda m, a, o: seen.update(a=a[0].detach().double()))
    w = layer.weight.detach().double()
    try:
        logits = model(X)
    finally:
        h.remove()
    a = seen["a"].reshape(-1, 16)  # every token, padding included: the layer sees them all
    scores = criteria.compute(model, "blocks.1.fc", (X, y), ("wanda", "sparsegpt", "taylor"))
    assert torch.allclose(scores["wanda"], w.abs() * a.norm(dim=0), rtol=1e-6)
    H = a.t() @ a
    H += 0.01 * H.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    assert torch.allclose(scores["sparsegpt"], w ** 2 / torch.linalg.inv(H).diagonal(), rtol=1e-6)
    loss = F.cross_entropy(logits.reshape(-1, 23).double(), y.reshape(-1), ignore_index=IGNORE, reduction="sum")
    (g,) = torch.autograd.grad(loss, layer.weight)
    assert torch.allclose(scores["taylor"], (g.double() * w).abs(), rtol=1e-5, atol=1e-12)


def test_sparsegpt_needs_a_linear():
    from weightablate import criteria

    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).eval()
    with pytest.raises(ValueError, match=r"sparsegpt needs an nn.Linear layer, '0' is a Conv2d"):
        criteria.compute(conv, "0", (torch.randn(2, 1, 4, 4), torch.tensor([0, 1])), ("sparsegpt",))


def test_tied_lm_head_as_target_is_refused():
    model = gpt()
    X, y = lm_data()
    with pytest.raises(ValueError, match=r"head"):
        wa.ablate(model, "head", (X, y), 2)
    r = wa.ablate(model, "head", (X, y), 2, backend="naive")  # the naive loop zeroes the shared entry
    assert r.n_samples == int((y != IGNORE).sum())


class PaddedEncoder(nn.Module):
    """nn.TransformerEncoder with a key padding mask computed from the input (token id 0 = padding)."""

    def __init__(self, norm_first):
        super().__init__()
        self.emb = nn.Embedding(9, 16)
        self.inp = nn.Linear(16, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, idx):
        pad = idx == 0
        h = self.enc(self.inp(self.emb(idx)), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_key_padding_mask_matches_oracle(norm_first):
    torch.manual_seed(0)
    model = PaddedEncoder(norm_first).eval()
    X = torch.randint(1, 9, (6, 7))
    X[1, 4:] = 0
    X[4, 2:] = 0
    y = torch.randint(0, 3, (6,))
    for layer in ("inp", "enc.layers.1.linear1", "enc.layers.0.self_attn.out_proj"):
        w = some(model.get_submodule(layer).weight.numel(), 5)
        res = wa.ablate(model, layer, (X, y), w, precision="float64")
        ref = oracle(model, layer, X, y, w)
        assert torch.allclose(res.delta_loss, ref["delta_loss"], rtol=1e-7, atol=1e-13), layer
        assert torch.equal(res.flips, ref["flips"])


def test_nested_tensor_encoder_with_padding_is_refused():
    torch.manual_seed(0)
    model = PaddedEncoder(False).eval()
    model.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    X = torch.randint(1, 9, (4, 7))
    X[1, 4:] = 0
    with pytest.raises(ValueError, match=r"enable_nested_tensor=True.*src_key_padding_mask"):
        wa.ablate(model.eval(), "enc.layers.0.linear1", (X, torch.zeros(4, dtype=torch.long)), 2)


def test_layernorm_closed_form_splits_tokens_within_max_memory():
    model = gpt()
    X, y = lm_data()
    w = some(16 * 64, 6)
    a = wa.ablate(model, "blocks.1.fc", (X, y), w, precision="float64", by_class=True)
    b = wa.ablate(model, "blocks.1.fc", (X, y), w, precision="float64", by_class=True, max_memory=3000)
    assert a.method == b.method == "layernorm"
    assert torch.allclose(a.delta_loss, b.delta_loss, rtol=1e-12, atol=1e-15)
    assert torch.allclose(a.class_loss, b.class_loss, rtol=1e-12, atol=1e-15)
    assert torch.equal(a.flips, b.flips) and torch.equal(a.exact_zero, b.exact_zero)
    assert torch.allclose(a.class_loss.sum(1), a.delta_loss, rtol=1e-12, atol=1e-15)


def test_taylor_on_an_in_place_residual_says_why():
    from weightablate import criteria

    model = gpt()
    X, y = lm_data()
    with pytest.raises(ValueError, match=r"taylor needs the gradient and autograd cannot compute it"):
        criteria.compute(model, "blocks.0.qkv", (X, y), ("taylor",))
    for b in model.blocks:
        b.inplace = False  # the same function, out of place: autograd follows it
    assert criteria.compute(model, "blocks.0.qkv", (X, y), ("taylor",))["taylor"].abs().sum() > 0


@pytest.mark.parametrize("layer,scale", [("blocks.1.fc", 0.2), ("blocks.1.out", 1.0)])
def test_layernorm_moment_path_matches_oracle_and_exact_mode(layer, scale):
    """The O(1) moment path (mode="auto") on whole rows: most (weight, token)s certified, the rest
    scored by the exact form; against the float64 oracle and mode="exact" (O(vocabulary) throughout)."""
    model = gpt()
    with torch.no_grad():
        model.get_submodule(layer).weight.mul_(scale)
    X, y = lm_data()
    n_in = model.get_submodule(layer).in_features
    w = torch.arange(3 * n_in)  # three whole rows
    ref = token_oracle(model, layer, X, y, w)
    auto = wa.ablate(model, layer, (X, y), w, precision="float64", by_class=True)
    exact = wa.ablate(model, layer, (X, y), w, precision="float64", by_class=True, mode="exact")
    assert "mixed moments" in auto.head and "O(vocabulary)" in exact.head
    assert 0 < auto.extra["exact_fraction"] < 0.5, auto.extra  # both parts of the path ran
    assert_tokens_match(auto, ref, rtol=1e-9)
    assert torch.allclose(auto.delta_loss, exact.delta_loss, rtol=1e-10, atol=1e-16)
    assert torch.allclose(auto.delta_kl, exact.delta_kl, rtol=1e-9, atol=1e-16)
    assert torch.allclose(auto.class_loss, exact.class_loss, rtol=1e-9, atol=1e-15)
    for field in ("flips", "new_errors", "new_correct", "exact_zero"):
        assert torch.equal(getattr(auto, field), getattr(exact, field)), field


def test_layernorm_moment_path_without_the_certificate_is_all_exact(monkeypatch):
    """CERTIFY = 0: no truncation passes, every (weight, token) is scored by the exact form; the
    same numbers as with the certificate."""
    from weightablate import token_moments

    model = gpt()
    X, y = lm_data()
    w = some(16 * 64, 40)
    a = wa.ablate(model, "blocks.1.fc", (X, y), w, precision="float64")
    monkeypatch.setattr(token_moments, "CERTIFY", 0.0)
    b = wa.ablate(model, "blocks.1.fc", (X, y), w, precision="float64")
    assert a.extra["exact_fraction"] < 1 and b.extra["exact_fraction"] == 1
    assert torch.allclose(a.delta_loss, b.delta_loss, rtol=1e-10, atol=1e-16)
    assert torch.equal(a.flips, b.flips)
