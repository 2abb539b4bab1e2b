"""nn.MultiheadAttention's packed in_proj_weight (3E x E: q, k, v rows) and in_proj_bias as targets,
scored by replay against the float64 oracle; the model left exactly as it was; what is refused."""
import pytest
import torch
from oracle import oracle, token_oracle
from torch import nn

import weightablate as wa

IGNORE = -100
D = 16


def randomize_in_proj_bias(model):
    """torch zero-initialises in_proj_bias: make it matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
                m.in_proj_bias.normal_(0, 0.3)
    return model


class Encoder(nn.Module):
    """nn.TransformerEncoderLayers, a sequence classifier (mean over the tokens that count), with a
    key padding mask from the input (token 0) and/or a causal mask."""

    def __init__(self, norm_first, causal=False, T=7):
        super().__init__()
        self.emb = nn.Embedding(9, D)
        layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)
        self.causal = causal
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1))  # bool, as the padding mask

    def forward(self, idx):
        pad = idx == 0
        T = idx.shape[1]
        h = self.enc(self.emb(idx), mask=self.mask[:T, :T] if self.causal else None, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def encoder(norm_first, causal=False):
    torch.manual_seed(0)
    return randomize_in_proj_bias(Encoder(norm_first, causal)).eval()


def encoder_data(N=6, T=7):
    g = torch.Generator().manual_seed(1)
    X = torch.randint(1, 9, (N, T), generator=g)
    X[1, 4:] = 0
    X[4, 2:] = 0
    return X, torch.randint(0, 3, (N,), generator=g)


class AttentionLM(nn.Module):
    """A bare nn.MultiheadAttention self-attention (causal attn_mask) in a small LM, per-token logits."""

    def __init__(self, vocab=11, d=8, heads=2, T=6, need_weights=False, is_causal=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.need_weights, self.is_causal = need_weights, is_causal
        self.register_buffer("mask", torch.full((T, T), float("-inf")).triu(1))

    def forward(self, idx):
        x = self.emb(idx)
        T = idx.shape[1]
        a, _ = self.attn(x, x, x, attn_mask=self.mask[:T, :T], need_weights=self.need_weights,
                         is_causal=self.is_causal)
        return self.out(self.norm(x + a))


def lm(**kw):
    torch.manual_seed(0)
    return randomize_in_proj_bias(AttentionLM(**kw)).eval()


def lm_data(N=5, T=6, vocab=11):
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, vocab, (N, T), generator=g)
    y = torch.roll(idx, -1, 1)
    y[:, -1] = IGNORE
    y[2, 3:] = IGNORE
    return idx, y


def qkv_rows(E, per=2, seed=3):
    """Flat indices into in_proj_weight (3E, E): ``per`` entries from each of the q, k and v blocks."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([b * E * E + torch.randperm(E * E, generator=g)[:per] for b in range(3)])


def snapshot(model):
    return ([n for n, _ in model.named_modules()], list(model.modules()), list(model.parameters()),
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, before):
    names, modules, params, state = before
    assert [n for n, _ in model.named_modules()] == names
    assert list(model.modules()) == modules  # the same objects
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


def assert_matches(res, ref):
    assert torch.allclose(res.delta_loss, ref["delta_loss"], rtol=1e-7, atol=1e-13), (res.delta_loss, ref["delta_loss"])
    assert torch.allclose(res.delta_kl, ref["delta_kl"], rtol=1e-7, atol=1e-13)
    assert torch.equal(res.flips, ref["flips"])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_in_proj_matches_oracle(norm_first, causal):
    model = encoder(norm_first, causal)
    X, y = encoder_data()
    before = snapshot(model)
    w = qkv_rows(D)
    res = wa.ablate(model, "enc.layers.0.self_attn", (X, y), w, precision="float64")
    ref = oracle(model, "enc.layers.0.self_attn", X, y, w, "in_proj_weight")
    assert res.method == "replay" and res.layer == "enc.layers.0.self_attn" and res.param == "in_proj_weight"
    assert res.weight_shape == (3 * D, D) and res.layer_shape == (3 * D, D)
    assert torch.equal(res.weight, model.enc.layers[0].self_attn.in_proj_weight.detach().reshape(-1)[w])
    assert_matches(res, ref)
    assert (res.delta_loss[:2 * 2] != 0).all() and (res.delta_loss[4:] != 0).all()  # q and v rows matter
    wb = torch.tensor([0, 5, D + 1, D + 9, 2 * D + 2, 3 * D - 1])  # q, k and v entries of in_proj_bias
    b = wa.ablate(model, "enc.layers.1.self_attn", (X, y), wb, param="bias", precision="float64")
    assert b.param == "in_proj_bias" and b.weight_shape == (3 * D,)
    assert_matches(b, oracle(model, "enc.layers.1.self_attn", X, y, wb, "in_proj_bias"))
    assert (b.delta_loss[[0, 1, 4, 5]] != 0).all()  # (a k bias shifts every score of a query alike: ~0)
    assert_unchanged(model, before)


def test_encoder_in_proj_float32_self_check_and_naive_backend():
    model = encoder(False)
    X, y = encoder_data()
    w = qkv_rows(D, per=1)
    res = wa.ablate(model, "enc.layers.0.self_attn", (X, y), w)  # float32, the self-check runs
    assert "agreed" in res.extra["self_check"]
    ref = oracle(model, "enc.layers.0.self_attn", X, y, w, "in_proj_weight")
    assert ((res.delta_loss - ref["delta_loss"]).abs() <= 1e-5 * ref["delta_loss"].abs() + 1e-4 * ref["abs_sum"]
            + 1e-7).all()
    model64 = encoder(False).double()
    before = snapshot(model64)
    nv = wa.ablate(model64, "enc.layers.0.self_attn", (X, y), w, backend="naive")
    rp = wa.ablate(model64, "enc.layers.0.self_attn", (X, y), w)
    assert nv.method == "naive" and nv.param == rp.param == "in_proj_weight" and nv.layer == rp.layer
    assert torch.allclose(nv.delta_loss, rp.delta_loss, rtol=1e-9, atol=1e-13)
    assert torch.equal(nv.flips, rp.flips)
    assert_unchanged(model64, before)


@pytest.mark.parametrize("need_weights,is_causal", [(False, False), (True, False), (False, True)])
def test_bare_attention_lm_matches_token_oracle(need_weights, is_causal):
    model = lm(need_weights=need_weights, is_causal=is_causal)
    X, y = lm_data()
    before = snapshot(model)
    w = qkv_rows(8, per=3)
    res = wa.ablate(model, "attn", (X, y), w, param="in_proj_weight", precision="float64")
    ref = token_oracle(model, "attn", X, y, w, "in_proj_weight")
    assert res.n_samples == ref["n_tokens"] and res.coords()["out"].tolist() == (w // 8).tolist()
    assert torch.allclose(res.delta_loss, ref["delta_loss"], rtol=1e-7, atol=1e-13)
    assert torch.allclose(res.delta_kl, ref["delta_kl"], rtol=1e-7, atol=1e-13)
    assert torch.equal(res.flips, ref["flips"])
    assert (res.delta_loss[:3] != 0).all() and (res.delta_loss[6:] != 0).all()
    b = wa.ablate(model, model.attn, (X, y), "bias", precision="float64")  # the module itself, every entry
    assert b.param == "in_proj_bias" and b.layer == "attn" and len(b) == 24
    rb = token_oracle(model, "attn", X, y, torch.arange(24), "in_proj_bias")
    assert torch.allclose(b.delta_loss, rb["delta_loss"], rtol=1e-7, atol=1e-13)
    assert_unchanged(model, before)


def test_result_round_trip(tmp_path):
    model = lm()
    X, y = lm_data()
    res = wa.ablate(model, "attn", (X, y), 5, precision="float64")
    res.save(tmp_path / "r.npz")
    back = wa.load(tmp_path / "r.npz")
    assert back.param == "in_proj_weight" and back.layer == "attn" and back.weight_shape == (24, 8)
    assert torch.equal(back.delta_loss, res.delta_loss)


class CrossAttention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(11, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, 11)

    def forward(self, idx):
        x = self.emb(idx)
        mem = x.flip(1)
        return self.out(self.attn(x, mem, mem, need_weights=False)[0])


class Twice(AttentionLM):
    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.out(x)


class SeqFirst(AttentionLM):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, idx):
        x = self.emb(idx).transpose(0, 1)
        return self.out(self.attn(x, x, x, need_weights=False)[0].transpose(0, 1))


class Kdim(CrossAttention):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)

    def forward(self, idx):
        x = self.emb(idx)
        return self.out(self.attn(x, x[..., :4], x[..., :4], need_weights=False)[0])


@pytest.mark.parametrize("cls,error,match", [
    (CrossAttention, ValueError, r"query that is not its key and value \(cross-attention\).*backend='naive'"),
    (Twice, ValueError, r"'attn.in_proj' runs 2 times per forward pass.*backend='naive'"),
    (SeqFirst, ValueError, r"in_proj_weight is the target has batch_first=False.*batch_first=True"),
    (Kdim, ValueError, r"kdim/vdim other than embed_dim.*q_proj_weight.*scaled_dot_product_attention"),
])
def test_refused_by_name_and_model_unchanged(cls, error, match):
    torch.manual_seed(0)
    model = cls().eval()
    X, y = lm_data()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        wa.ablate(model, "attn", (X, y), 3)
    assert_unchanged(model, before)
    if cls is not Kdim:  # the naive loop zeroes the entry wherever it is read
        r = wa.ablate(model, "attn", (X, y), 2, backend="naive")
        assert r.param == "in_proj_weight" and (r.delta_loss != 0).all()
        assert_unchanged(model, before)


def test_other_refusals():
    model = lm()
    X, y = lm_data()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"structure='out'.*one entry at a time"):
        wa.ablate(model, "attn", (X, y), 2, structure="out")
    with pytest.raises(ValueError, match=r"param must be one of .*in_proj_bias"):
        wa.ablate(model, "attn", (X, y), 2, param="out_proj")
    with pytest.raises(ValueError, match=r"method='closed_form' does not apply"):  # raised inside: view removed
        wa.ablate(model, "attn", (X, y), 2, method="closed_form")
    assert_unchanged(model, before)
    model.attn = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
    with pytest.raises(ValueError, match=r"no in_proj_bias"):
        wa.ablate(model, "attn", (X, y), "bias")
    assert wa.ablate(model, "attn", (X, y), 2).weight_shape == (24, 8)  # no bias: the weight still works


def test_hook_on_the_attention_is_refused():
    model = lm()
    X, y = lm_data()
    handle = model.attn.register_forward_hook(lambda m, a, out: (2 * out[0], out[1]))
    try:
        with pytest.raises(ValueError, match=r"module 'attn' \(MultiheadAttention\) holds the target and has a "
                                             r"forward hook"):
            wa.ablate(model, "attn", (X, y), 2)
        with pytest.raises(ValueError, match=r"forward hook"):
            wa.ablate(model, "attn.out_proj", (X, y), 2)
    finally:
        handle.remove()


def test_bias_kv_and_zero_attn_match_token_oracle():
    model = lm(need_weights=True)
    torch.manual_seed(1)
    model.attn = randomize_in_proj_bias(nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True,
                                                              add_zero_attn=True)).eval()
    X, y = lm_data()
    w = qkv_rows(8, per=2)
    res = wa.ablate(model, "attn", (X, y), w, precision="float64")
    ref = token_oracle(model, "attn", X, y, w, "in_proj_weight")
    assert torch.allclose(res.delta_loss, ref["delta_loss"], rtol=1e-7, atol=1e-13)
    assert torch.equal(res.flips, ref["flips"])


def test_a_3d_attn_mask_tied_to_the_batch_is_refused_by_name():
    """A per-(sample, head) attn_mask (N * heads, T, T) cannot be stacked with the ablations: a
    ValueError naming it (not torch's shape error); backend="naive" is exact."""
    E, H, T, N = 8, 2, 6, 5

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.attn = nn.Embedding(11, E), nn.MultiheadAttention(E, H, batch_first=True)
            self.out = nn.Linear(E, 11)
            self.register_buffer("mask", torch.full((T, T), float("-inf")).triu(1))

        def forward(self, idx):
            x = self.emb(idx)
            t = idx.shape[1]
            a, _ = self.attn(x, x, x, attn_mask=self.mask[:t, :t].expand(idx.shape[0] * H, t, t))
            return self.out(x + a)

    torch.manual_seed(0)
    m = M().eval()
    g = torch.Generator().manual_seed(2)
    X, y = torch.randint(0, 11, (N, T), generator=g), torch.randint(0, 11, (N, T), generator=g)
    w = torch.arange(0, 192, 7)
    with pytest.raises(ValueError, match=r"ablations stacked along the batch axis.*\(N \* heads, T, T\)"):
        wa.ablate(m, "attn", (X, y), w, precision="float64")
    assert not hasattr(m.attn, "in_proj")
    res = wa.ablate(m, "attn", (X, y), w, precision="float64", backend="naive")
    ref = token_oracle(m, "attn", X, y, w, param="in_proj_weight")
    assert torch.allclose(res.delta_loss, ref["delta_loss"], rtol=1e-12, atol=1e-15)


class _Tiny(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.emb, self.attn, self.out = nn.Embedding(11, 8), attn, nn.Linear(8, 11)

    def forward(self, idx):
        x = self.emb(idx)
        a, _ = self.attn(x, x, x)
        return self.out(x + a)


def test_a_subclass_keeping_torchs_forward_is_followed():
    """A MultiheadAttention subclass with only its own __init__ runs torch's forward: its twin applies."""
    from weightablate import criteria

    class MyAttention(nn.MultiheadAttention):
        pass

    torch.manual_seed(0)
    m = _Tiny(MyAttention(8, 2, batch_first=True)).eval()
    X, y = torch.randint(0, 11, (3, 5)), torch.randint(0, 11, (3, 5))
    w = torch.arange(0, 192, 5)
    res = wa.ablate(m, "attn", (X, y), w, precision="float64")
    ref = token_oracle(m, "attn", X, y, w, param="in_proj_weight")
    assert torch.allclose(res.delta_loss, ref["delta_loss"], rtol=1e-10, atol=1e-14)
    with pytest.raises(TypeError, match=r"^layer 'attn' is an nn.MultiheadAttention: the criteria read"):
        criteria.compute(m, "attn", (X, y), ("wanda",))
    with pytest.raises(ValueError, match=r"^structure='out': labels of shape \(3, 5\) are per token"):
        wa.ablate(m, "out", (X, y), [0, 1], structure="out")
    with pytest.raises(ValueError, match=r"its Linear, Conv2d and MultiheadAttention layers are: .*'attn'"):
        wa.ablate(m, "atn", (X, y), 3)
