"""One adapter per family of diffusers attention processors: how each builds Q, K and V, and what it returns.

The reuse processor (`processor.py`) computes, keeps and reuses attention in the (batch, heads, tokens, dim) layout;
a family says how its processor gets there and back, following that processor's code step by step:

Standard  `AttnProcessor2_0` and kin (UNets, PixArt, DiT): spatial and group norms, keys from the (normed) text or
          the tokens, QK norms (2_0 only), `to_out`, residual connection and rescale.
Joint     `JointAttnProcessor2_0` (SD3, SD3.5): sample then context tokens in one sequence, per-stream QK norms,
          the output split back, `to_add_out` unless the context is `context_pre_only`.
Flux      `FluxAttnProcessor` (Flux double- and single-stream blocks): context then sample tokens, QK norms, then
          rotary embeddings on the joint Q and K; single-stream layers have no output projection.
Wan       `WanAttnProcessor` (Wan 2.x video): QK norms over all heads, rotary embeddings on self-attention;
          cross-attention to the text. Image context (added KV, I2V) is refused.

The map spans the whole joint sequence: a reuse call applies the kept map to fresh V of both streams, `qk` keeps
Q and K after the norms and rotary embeddings, `output` keeps what `project` returns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.models import attention_processor as ap
from diffusers.models.embeddings import apply_rotary_emb

from .math import context, enter, leave, split

__all__ = ["Frame", "Standard", "Joint", "Flux", "Wan", "family_of", "supported_names"]


class Frame(NamedTuple):
    """One call's inputs as a family reads them."""

    x: torch.Tensor  # the tokens queries come from, (batch, tokens, channels)
    text: torch.Tensor | None  # the encoder stream or the text keys come from
    residual: torch.Tensor | None = None  # the layer's input, for a residual connection
    shape: tuple | None = None  # a 4-D input's shape, restored on the way out
    rotary: object = None  # rotary embeddings applied to Q and K


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


class Standard:
    """`AttnProcessor2_0` and the processors with its math: the SDPA ones scale by 1/sqrt(head_dim) whatever
    `attn.scale` says, and only AttnProcessor2_0 applies the QK norms."""

    def __init__(self, original):
        self.default_scale = isinstance(original, _DEFAULT_SCALE)
        self.qk_norm = isinstance(original, ap.AttnProcessor2_0)

    def frame(self, attn, hidden_states, encoder_hidden_states, temb=None, rotary=None) -> Frame:
        x, residual, shape = enter(attn, hidden_states, temb)
        return Frame(x, context(attn, x, encoder_hidden_states), residual, shape)

    def call_frame(self, attn, hidden_states, encoder_hidden_states, args, temb, image_rotary_emb,
                   rotary_emb) -> Frame:
        """The frame of a processor call as diffusers makes it: `args` are the positionals after the mask, where
        UNet layers pass `temb` and Flux and Wan layers their rotary embedding."""
        fifth = args[0] if args else None
        rotary = next((r for r in (image_rotary_emb, rotary_emb, fifth) if r is not None), None)
        return self.frame(attn, hidden_states, encoder_hidden_states, temb if temb is not None else fifth, rotary)

    def scale(self, attn, query: torch.Tensor) -> float:
        return query.shape[-1] ** -0.5 if self.default_scale else attn.scale

    def qkv(self, attn, x, text) -> tuple:
        """Q, K, V as (batch, heads, tokens, dim) from the query tokens and the key tokens."""
        norm_q, norm_k = (attn.norm_q, attn.norm_k) if self.qk_norm else (None, None)
        return split(attn, attn.to_q(x), norm_q), split(attn, attn.to_k(text), norm_k), split(attn, attn.to_v(text))

    def qkv_of(self, attn, frame: Frame) -> tuple:
        return self.qkv(attn, frame.x, frame.text)

    def value(self, attn, frame: Frame) -> torch.Tensor:
        return split(attn, attn.to_v(frame.text))

    def tokens(self, frame: Frame) -> tuple:
        """(batch, queries, keys) of this call."""
        return frame.x.shape[0], frame.x.shape[1], frame.text.shape[1]

    def mask(self, attn, mask, query, key, heads: bool):
        """The layer's mask for SDPA (batch, heads, queries, keys) or for the explicit map (batch*heads, ., keys)."""
        if mask is None:
            return None
        b, keys = query.shape[0], key.shape[2]
        mask = attn.prepare_attention_mask(mask, keys, b)
        return mask.view(b, attn.heads, -1, mask.shape[-1]) if heads else mask

    def project(self, attn, out: torch.Tensor, frame: Frame):
        """The attention output (batch, tokens, heads*dim) through `to_out`."""
        return attn.to_out[1](attn.to_out[0](out))

    def leave(self, attn, projected, frame: Frame):
        return leave(attn, projected, frame.residual, frame.shape)


class Joint(Standard):
    """SD3's joint attention (`JointAttnProcessor2_0`): [sample; context] in one sequence."""

    def __init__(self, original):
        self.default_scale, self.qk_norm = True, True

    def frame(self, attn, hidden_states, encoder_hidden_states, temb=None, rotary=None) -> Frame:
        return Frame(hidden_states, encoder_hidden_states)

    def qkv_of(self, attn, frame: Frame) -> tuple:
        q, k, v = self.qkv(attn, frame.x, frame.x)
        if frame.text is None:
            return q, k, v
        d, text = q.shape[-1], frame.text
        cq, ck = _heads(attn.add_q_proj(text), d), _heads(attn.add_k_proj(text), d)
        cq = attn.norm_added_q(cq) if attn.norm_added_q is not None else cq
        ck = attn.norm_added_k(ck) if attn.norm_added_k is not None else ck
        cv = _heads(attn.add_v_proj(text), d)
        return torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)

    def value(self, attn, frame: Frame) -> torch.Tensor:
        v = split(attn, attn.to_v(frame.x))
        if frame.text is None:
            return v
        return torch.cat([v, _heads(attn.add_v_proj(frame.text), v.shape[-1])], dim=2)

    def tokens(self, frame: Frame) -> tuple:
        joint = frame.x.shape[1] + (0 if frame.text is None else frame.text.shape[1])
        return frame.x.shape[0], joint, joint

    def mask(self, attn, mask, query, key, heads: bool):
        return None  # JointAttnProcessor2_0 ignores the mask

    def project(self, attn, out: torch.Tensor, frame: Frame):
        if frame.text is None:
            return attn.to_out[1](attn.to_out[0](out))
        sample, text = out[:, : frame.x.shape[1]], out[:, frame.x.shape[1]:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](sample)), text

    def leave(self, attn, projected, frame: Frame):
        return projected


class Flux(Joint):
    """Flux's attention (`FluxAttnProcessor`): [context; sample], rotary embeddings after the QK norms."""

    def frame(self, attn, hidden_states, encoder_hidden_states, temb=None, rotary=None) -> Frame:
        return Frame(hidden_states, encoder_hidden_states if attn.added_kv_proj_dim is not None else None,
                     rotary=rotary)

    def qkv_of(self, attn, frame: Frame) -> tuple:
        d = attn.head_dim
        q, k, v = (_heads(proj(frame.x), d) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if frame.text is not None:
            cq, ck, cv = (_heads(proj(frame.text), d) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q = torch.cat([attn.norm_added_q(cq), q], dim=2)
            k = torch.cat([attn.norm_added_k(ck), k], dim=2)
            v = torch.cat([cv, v], dim=2)
        if frame.rotary is not None:
            q, k = apply_rotary_emb(q, frame.rotary), apply_rotary_emb(k, frame.rotary)  # tokens on dim 2
        return q, k, v

    def value(self, attn, frame: Frame) -> torch.Tensor:
        v = _heads(attn.to_v(frame.x), attn.head_dim)
        if frame.text is None:
            return v
        return torch.cat([_heads(attn.add_v_proj(frame.text), attn.head_dim), v], dim=2)

    def mask(self, attn, mask, query, key, heads: bool):
        """Flux passes its mask to SDPA as it is: broadcast to (batch, heads, queries, keys), additive for the map."""
        if mask is None:
            return None
        b, h, q, _ = query.shape
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
        mask = mask.expand(b, h, q, key.shape[2])
        return mask if heads else mask.reshape(b * h, q, -1)

    def project(self, attn, out: torch.Tensor, frame: Frame):
        if frame.text is None:
            return out  # single-stream blocks project attention and MLP together, outside the layer
        text, sample = out[:, : frame.text.shape[1]], out[:, frame.text.shape[1]:]
        return attn.to_out[1](attn.to_out[0](sample.contiguous())), attn.to_add_out(text.contiguous())


def _wan_rotary(x: torch.Tensor, rotary) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding (interleaved pairs) for x in (batch, heads, tokens, dim)."""
    cos, sin = (f.transpose(1, 2) for f in rotary)  # (1, tokens, 1, dim) -> (1, 1, tokens, dim)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(x)


class Wan(Standard):
    """Wan's attention (`WanAttnProcessor`): QK norms over all heads before the split, rotary on self-attention."""

    def __init__(self, original):
        self.default_scale, self.qk_norm = True, True

    def frame(self, attn, hidden_states, encoder_hidden_states, temb=None, rotary=None) -> Frame:
        text = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return Frame(hidden_states, text, rotary=rotary)

    def qkv_of(self, attn, frame: Frame) -> tuple:
        h = attn.heads
        q = attn.norm_q(attn.to_q(frame.x)).unflatten(2, (h, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(frame.text)).unflatten(2, (h, -1)).transpose(1, 2)
        v = attn.to_v(frame.text).unflatten(2, (h, -1)).transpose(1, 2)
        if frame.rotary is not None:
            q, k = _wan_rotary(q, frame.rotary), _wan_rotary(k, frame.rotary)
        return q, k, v

    def value(self, attn, frame: Frame) -> torch.Tensor:
        return attn.to_v(frame.text).unflatten(2, (attn.heads, -1)).transpose(1, 2)

    def mask(self, attn, mask, query, key, heads: bool):
        return Flux.mask(self, attn, mask, query, key, heads)

    def leave(self, attn, projected, frame: Frame):
        return projected


_DEFAULT_SCALE = tuple(getattr(ap, n) for n in ("AttnProcessor2_0", "AttnProcessorNPU") if hasattr(ap, n))
_STANDARD = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU")


def _families() -> dict:
    """{processor class: family}: the processors whose math a family reproduces exactly."""
    found = {getattr(ap, n): Standard for n in _STANDARD if hasattr(ap, n)}
    found[ap.JointAttnProcessor2_0] = Joint
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    except ImportError:  # an older diffusers: those families are not there to patch
        return found
    found.update({FluxAttnProcessor: Flux, WanAttnProcessor: Wan})
    return found


FAMILIES = _families()


def family_of(attn, processor):
    """The family of `processor` on layer `attn`, or a string that says why it cannot be reused."""
    if getattr(attn, "fused_projections", False):
        return "has fused QKV projections; call unfuse_qkv_projections() first"
    family = FAMILIES.get(type(processor))
    if family is None:
        return (f"uses {type(processor).__name__}, whose math attnreuse cannot reproduce at store and reuse calls. "
                f"Supported: {supported_names()}")
    if family is Wan and getattr(attn, "add_k_proj", None) is not None:
        return "attends to image context through added K/V projections (Wan I2V), which attnreuse does not reuse"
    if family is Standard and getattr(attn, "added_kv_proj_dim", None) is not None:
        return "has added K/V projections (AttnAddedKVProcessor-style), which attnreuse does not reuse"
    return family(processor)


def supported_names() -> list[str]:
    return [p.__name__ for p in FAMILIES]
