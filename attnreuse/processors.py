"""The attention processor that computes, stores or reuses attention maps.

It follows diffusers' `AttnProcessor` (spatial/group norms, 4-D inputs, `norm_cross`, masks, `attn.scale`,
upcasting, residual connection, rescale factor). A plain compute call goes to the layer's own processor,
so a schedule without reuse gives exactly the unpatched model's output.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models import attention_processor as ap

from .cache import COMPUTE, REUSE, ReuseState, Slot

__all__ = ["ReuseAttnProcessor", "SUPPORTED_PROCESSORS"]

# Processors whose math is plain softmax(Q K^T * scale) V; anything else (IP-Adapter, added KV, fused QKV...)
# would be silently changed at store and reuse calls, so it is refused at apply time.
SUPPORTED_PROCESSORS: tuple[type, ...] = tuple(
    getattr(ap, name)
    for name in ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU")
    if hasattr(ap, name)
)

_DEFAULT_SCALE = tuple(getattr(ap, n) for n in ("AttnProcessor2_0", "AttnProcessorNPU") if hasattr(ap, n))


def _enter(attn, hidden_states: torch.Tensor, temb):
    """Input side of a diffusers attention layer: spatial norm, 4-D to tokens, group norm."""
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


def _exit(attn, projected: torch.Tensor, residual: torch.Tensor, shape) -> torch.Tensor:
    """Output side: back to 4-D, residual connection, rescale (after `to_out`)."""
    if shape is not None:
        projected = projected.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        projected = projected + residual
    return projected / attn.rescale_output_factor


def _context(attn, hidden_states, encoder_hidden_states):
    if encoder_hidden_states is None:
        return hidden_states
    if attn.norm_cross:
        return attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states


def _heads(attn, x: torch.Tensor, norm=None) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch * heads, tokens, dim), with the optional per-head norm."""
    x = attn.head_to_batch_dim(x)
    return norm(x) if norm is not None else x


def _attention_map(attn, query: torch.Tensor, key: torch.Tensor, mask, scale: float, perturb=None) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) as diffusers' `Attention.get_attention_scores` (upcasting included), but
    with the scale the layer's own processor applies. `perturb` (analyses only) maps the logits before the mask
    is added."""
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    folded = mask if perturb is None else None  # the mask goes into baddbmm unless the bare logits are needed
    if folded is None:
        folded, beta = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                                   device=query.device), 0
    else:
        beta = 1
    scores = torch.baddbmm(folded, query, key.transpose(-1, -2), beta=beta, alpha=scale)
    if attn.upcast_softmax:
        scores = scores.float()
    if perturb is not None:
        scores = perturb(scores)
        if mask is not None:
            scores = scores + mask
    return scores.softmax(dim=-1).to(dtype)


def _project_out(attn, out: torch.Tensor) -> torch.Tensor:
    out = attn.batch_to_head_dim(out)
    return attn.to_out[1](attn.to_out[0](out))


class ReuseAttnProcessor:
    """Attention with a map cache, driven by the shared `ReuseState`.

    compute: the layer's original processor runs unchanged (fast SDPA where it was SDPA).
    store:   A = softmax(Q K^T * scale) is computed explicitly, kept, and A V is returned.
    reuse:   Q, K and the softmax are skipped; the kept A is applied to V from the current hidden states.
             For cross-attention V comes from the text, which is constant within a generation, so while the
             encoder states are the same tensor the kept output to_out(A V) is returned as is (exact).
    """

    def __init__(self, name: str, original, state: ReuseState):
        self.name = name
        self.original = original
        self.state = state
        # follow the conventions of the processor being replaced: diffusers' SDPA processors scale by
        # 1/sqrt(head_dim) whatever attn.scale says, and only AttnProcessor2_0 applies the QK norms
        self._scale_default = isinstance(original, _DEFAULT_SCALE)
        self._qk_norm = isinstance(original, ap.AttnProcessor2_0)
        params = inspect.signature(original.__call__).parameters
        self._original_kwargs = {k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        action = self.state.action
        if action == COMPUTE:
            self.state.counts[self.name].computed += 1
            extra = {k: v for k, v in dict(kwargs, temb=temb).items() if k in self._original_kwargs and v is not None}
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra)
        hidden_states, residual, shape = _enter(attn, hidden_states, temb)
        context = _context(attn, hidden_states, encoder_hidden_states)
        if action == REUSE:
            return _exit(attn, self._reuse(attn, hidden_states, context, encoder_hidden_states), residual, shape)
        stored = self._store(attn, hidden_states, context, encoder_hidden_states, attention_mask)  # STORE
        return _exit(attn, stored, residual, shape)

    def _store(self, attn, hidden_states, context, encoder_hidden_states, attention_mask):
        batch, queries, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = _heads(attn, attn.to_q(hidden_states), attn.norm_q if self._qk_norm else None)
        key = _heads(attn, attn.to_k(context), attn.norm_k if self._qk_norm else None)
        value = _heads(attn, attn.to_v(context))
        scale = query.shape[-1] ** -0.5 if self._scale_default else attn.scale
        attn_map = _attention_map(attn, query, key, attention_mask, scale)
        out = _project_out(attn, torch.bmm(attn_map, value))
        dtype = self.state.cache_dtype or attn_map.dtype
        slot = Slot(attn_map.to(dtype))
        if encoder_hidden_states is not None:
            slot.output, slot.context, slot.context_version = out, encoder_hidden_states, encoder_hidden_states._version
        self.state.put(self.name, slot)
        counts = self.state.counts[self.name]
        counts.computed += 1
        counts.stored += 1
        return out

    def _reuse(self, attn, hidden_states, context, encoder_hidden_states):
        slot = self.state.get(self.name)
        self.state.counts[self.name].reused += 1
        if (slot.output is not None and encoder_hidden_states is slot.context
                and encoder_hidden_states._version == slot.context_version
                and slot.output.shape[:2] == hidden_states.shape[:2]):
            return slot.output
        value = _heads(attn, attn.to_v(context))
        attn_map = slot.attn_map
        if attn_map.shape[0] != value.shape[0] or attn_map.shape[1] != hidden_states.shape[1] \
                or attn_map.shape[2] != value.shape[1]:
            raise RuntimeError(
                f"attnreuse: layer {self.name!r} cached a map of shape {tuple(attn_map.shape)} (batch*heads, queries, "
                f"keys) but call {self.state.call} has batch*heads={value.shape[0]}, queries={hidden_states.shape[1]}, "
                f"keys={value.shape[1]}. The batch or resolution changed within one generation (e.g. CFG run as "
                "separate calls); reset the handle between such calls."
            )
        return _project_out(attn, torch.bmm(attn_map.to(value.dtype), value))
