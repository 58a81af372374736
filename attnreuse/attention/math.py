"""The attention math of a diffusers `Attention` layer, in small pure functions.

They follow `AttnProcessor2_0` (diffusers, `models/attention_processor.py`) step by step, so that a store or reuse
call and an analysis probe do exactly what the layer's own processor does around the attention map.
"""

from __future__ import annotations

import torch

__all__ = ["enter", "leave", "context", "split", "merge", "flat", "attention_map", "times_map", "pack",
           "unscale", "output_via_map", "FP8_SCALE"]

# fp8 maps are kept as A * scale so that probabilities of about 1/tokens stay normal numbers (e4m3's smallest
# normal is 2^-6); A <= 1, so the scale is the format's largest value.
FP8_SCALE = {getattr(torch, n): torch.finfo(getattr(torch, n)).max
             for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


def enter(attn, hidden_states: torch.Tensor, temb):
    """Input side of a diffusers attention layer: spatial norm, 4-D to tokens, group norm (AttnProcessor2_0)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape


def leave(attn, projected: torch.Tensor, residual: torch.Tensor, shape) -> torch.Tensor:
    """Output side, after `to_out`: back to 4-D, residual connection, rescale (AttnProcessor2_0)."""
    if shape is not None:
        projected = projected.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        projected = projected + residual
    factor = attn.rescale_output_factor
    return projected if factor == 1.0 else projected / factor  # a division by 1 would be one launch per layer


def context(attn, hidden_states, encoder_hidden_states):
    """What keys and values are computed from: the text (normed if the layer says so), else the tokens."""
    if encoder_hidden_states is None:
        return hidden_states
    if attn.norm_cross:
        return attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states


def split(attn, x: torch.Tensor, norm=None) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim) as a view, with the optional per-head norm."""
    x = x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
    return norm(x) if norm is not None else x


def merge(attn, out: torch.Tensor) -> torch.Tensor:
    """(batch, heads, queries, dim) -> to_out((batch, queries, heads * dim))."""
    out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    return attn.to_out[1](attn.to_out[0](out))


def flat(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, dim) -> (batch * heads, tokens, dim)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def attention_map(attn, query: torch.Tensor, key: torch.Tensor, mask, scale: float, perturb=None) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) for flat Q and K, as `Attention.get_attention_scores` (upcasting included)
    with the scale the layer's processor applies. `perturb` maps the logits before the mask is added."""
    dtype = query.dtype
    if getattr(attn, "upcast_attention", False):
        query, key = query.float(), key.float()
    folded = mask if perturb is None else None  # the mask goes into baddbmm unless the bare logits are needed
    if folded is None:
        folded, beta = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                                   device=query.device), 0
    else:
        beta = 1
    scores = torch.baddbmm(folded, query, key.transpose(-1, -2), beta=beta, alpha=scale)
    if getattr(attn, "upcast_softmax", False):
        scores = scores.float()
    if perturb is not None:
        scores = perturb(scores)
        if mask is not None:
            scores = scores + mask
    return scores.softmax(dim=-1).to(dtype)


def times_map(attn_map: torch.Tensor, value: torch.Tensor, factor) -> torch.Tensor:
    """A V (batch*heads, queries, dim) with A as kept: a 16-bit map multiplies V rounded to its dtype (A is read
    once, never copied); an fp8 map has no matmul, so it is dequantised and `factor` undoes its scale."""
    if factor is not None:
        return torch.bmm(attn_map.to(value.dtype), value) * factor
    return torch.bmm(attn_map, value.to(attn_map.dtype)).to(value.dtype)


def unscale(dtype) -> float | None:
    """The factor that undoes the scale of a map kept in `dtype` (None unless fp8)."""
    scale = FP8_SCALE.get(dtype)
    return None if scale is None else 1.0 / scale


def pack(attn_map: torch.Tensor, dtype) -> tuple:
    """The map in the cache's dtype, and the factor that undoes an fp8 scale (None otherwise)."""
    if dtype is None or dtype == attn_map.dtype:
        return attn_map, None
    scale = FP8_SCALE.get(dtype)
    return (attn_map if scale is None else attn_map * scale).to(dtype), unscale(dtype)


def output_via_map(map_dtype, dtype) -> bool:
    """Whether a store's output is its kept map times V, as a reuse computes it: for a 16-bit map in another
    dtype than the model's, so every call of the layer applies the map as kept (fp8 has no matmul)."""
    return map_dtype in (torch.float16, torch.bfloat16) and map_dtype != dtype
