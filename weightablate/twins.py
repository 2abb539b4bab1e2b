"""Traceable forwards for torch.nn modules whose own forward torch.fx cannot trace.

nn.TransformerEncoder and nn.TransformerEncoderLayer choose between a fused fast path and the
plain computation with ``if``s on tensor properties (``src.dim()``, ``src.is_nested``), which fx
refuses. When such a module must be opened (it holds the target layer), the tracer runs the twin
below instead: torch's plain path, the same function of the inputs.

nn.MultiheadAttention is a leaf (replay runs it as a module on the changed inputs, in float64)
unless its out_proj is the target: then it is traced as two nodes, the attention context (one call
of torch's own multi_head_attention_forward with an identity output projection, which is exact:
one product by 1 and zeros per entry) and out_proj called as the nn.Linear it is.

Its packed in-projection (in_proj_weight, in_proj_bias) is made a target by ``in_proj_view``: while
``ablate`` runs, an nn.Linear whose weight and bias ARE the module's own Parameters is its
submodule ``in_proj``, and the twin computes ``qkv = in_proj(x)`` (torch's packed self-attention
projection), then the context with identity q/k/v projections (exact, as above), then out_proj."""
from __future__ import annotations

import contextlib

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


def _encoder_layer(self: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                   is_causal: bool = False):
    # torch's plain path; the masks go to MultiheadAttention as given (it canonicalises them itself)
    x = src
    if self.norm_first:
        x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        x = x + self._ff_block(self.norm2(x))
    else:
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        x = self.norm2(x + self._ff_block(x))
    return x


def _encoder(self: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    if src_key_padding_mask is not None and getattr(self, "use_nested_tensor", False):
        # its fast path (eval, no grad) returns zeros at the padded positions, the plain path does not
        raise ValueError("model: an nn.TransformerEncoder built with enable_nested_tensor=True is given a "
                         "src_key_padding_mask: its fused path writes zeros at the padded positions, which no "
                         "traced graph follows; build it with enable_nested_tensor=False (the same function "
                         "elsewhere), or use backend='naive'")
    output = src
    for mod in self.layers:
        output = mod(output, src_mask=mask, is_causal=bool(is_causal),
                     src_key_padding_mask=src_key_padding_mask)
    if self.norm is not None:
        output = self.norm(output)
    return output


class Refused(ValueError):
    """A construct a twin cannot follow: trace() passes its message on as it is."""


IN_PROJ = "in_proj"  # the name of the in-projection view while it is installed


class InProj(nn.Linear):
    """nn.MultiheadAttention's packed in-projection as an nn.Linear (3E x E): its weight and bias are
    the attention's own in_proj_weight and in_proj_bias Parameters (the same objects)."""


@contextlib.contextmanager
def in_proj_view(mha: nn.MultiheadAttention):
    """Install ``mha.in_proj`` (an InProj sharing mha's Parameters) for the duration; always removed,
    so the model's modules, parameters and state_dict are as before."""
    if hasattr(mha, IN_PROJ):
        raise ValueError(f"layer: this nn.MultiheadAttention already has an attribute {IN_PROJ!r}; weightablate "
                         "needs that name for its in-projection while it ablates in_proj_weight")
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    view = InProj(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    view.weight = weight
    if bias is not None:
        view.bias = bias
    mha.add_module(IN_PROJ, view)
    try:
        yield view
    finally:
        del mha._modules[IN_PROJ]


def mha_context(query, key, value, in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight,
                bias_k, bias_v, num_heads: int, add_zero_attn: bool, key_padding_mask, need_weights: bool,
                attn_mask, average_attn_weights: bool, is_causal: bool):
    """nn.MultiheadAttention (batch_first, eval) up to its output projection: the context (N, T, E)
    and the attention weights (or None), by torch's own function. No in_proj_weight and no
    q_proj_weight: query, key and value are projected already (identity in-projections, exact)."""
    E = query.shape[-1]
    eye = torch.eye(E, dtype=query.dtype, device=query.device)
    if in_proj_weight is None and q_proj_weight is None:
        q_proj_weight = k_proj_weight = v_proj_weight = eye
    q, k, v = (t.transpose(1, 0) for t in (query, key, value))
    ctx, weights = F.multi_head_attention_forward(
        q, k, v, E, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn, 0.0, eye, None,
        training=False, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        use_separate_proj_weight=in_proj_weight is None, q_proj_weight=q_proj_weight, k_proj_weight=k_proj_weight,
        v_proj_weight=v_proj_weight, average_attn_weights=average_attn_weights, is_causal=is_causal)
    return ctx.transpose(1, 0), weights


torch.fx.wrap("mha_context")  # one graph node: its mask handling branches on tensor properties


def _mha(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
         average_attn_weights=True, is_causal=False):
    view = self._modules.get(IN_PROJ)
    view = view if isinstance(view, InProj) else None
    what = "in_proj_weight" if view is not None else "out_proj"
    if not self.batch_first:
        raise Refused(f"model: an nn.MultiheadAttention whose {what} is the target has batch_first=False: the "
                      "batch is not the first axis of its inputs, which replay needs; build it with "
                      "batch_first=True")
    if view is None:
        ctx, weights = mha_context(query, key, value, self.in_proj_weight, self.in_proj_bias, self.q_proj_weight,
                                   self.k_proj_weight, self.v_proj_weight, self.bias_k, self.bias_v, self.num_heads,
                                   self.add_zero_attn, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        return self.out_proj(ctx), weights
    if not (query is key and key is value):
        raise Refused("model: an nn.MultiheadAttention whose in_proj_weight is the target is called with a query "
                      "that is not its key and value (cross-attention): the packed weight's q rows then act on "
                      "other inputs than its k and v rows, which weightablate does not follow; write the "
                      "attention with nn.Linear q, k, v projections and F.scaled_dot_product_attention, or use "
                      "backend='naive'")
    E = self.embed_dim
    qkv = view(query)  # torch's packed self-attention projection: one Linear, then q, k, v
    ctx, weights = mha_context(qkv[:, :, :E], qkv[:, :, E:2 * E], qkv[:, :, 2 * E:], None, None, None, None, None,
                               self.bias_k, self.bias_v, self.num_heads, self.add_zero_attn, key_padding_mask,
                               need_weights, attn_mask, average_attn_weights, is_causal)
    return self.out_proj(ctx), weights


TWINS = {nn.TransformerEncoderLayer: _encoder_layer, nn.TransformerEncoder: _encoder, nn.MultiheadAttention: _mha}


def twin(module: nn.Module, torch_cls: type | None):
    """The traceable forward of ``module`` (bound), or None when fx traces its own. ``torch_cls``: the
    torch.nn class whose forward it runs (weightablate.graph.torch_base: a subclass that keeps torch's
    forward gets its base's twin, one with a forward of its own none)."""
    f = TWINS.get(torch_cls)
    return (lambda *args, **kwargs: f(module, *args, **kwargs)) if f is not None else None
