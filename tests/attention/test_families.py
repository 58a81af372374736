"""The transformer processor families (SD3 joint, SD3.5 dual, Flux double and single stream, Wan self and cross),
at store and reuse calls, against each layer's *own* processor run with the kept map swapped in for SDPA."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

from attnreuse import Schedule, apply_attention_reuse

TEXT, IMAGE = 5, 16


class Layer(torch.nn.Module, AttentionMixin):
    """A model holding one attention layer of a transformer family."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, **inputs):
        return self.attn(**inputs)


def _rotary(tokens: int) -> tuple:
    """Flux's rotary embedding as FluxPosEmbed returns it: (cos, sin), each (tokens, head_dim)."""
    angles = torch.randn(tokens, 4)
    return torch.cos(angles).repeat_interleave(2, -1), torch.sin(angles).repeat_interleave(2, -1)


def _wan_rotary() -> tuple:
    return WanRotaryPosEmbed(8, (1, 2, 2), 64)(torch.randn(2, 4, 1, 8, 8))  # (1, 16 tokens, 1, 8) each


def _flux_mask() -> torch.Tensor:
    mask = torch.ones(2, 1, 1, TEXT + IMAGE, dtype=torch.bool)
    mask[1, ..., TEXT - 2:TEXT] = False  # the second prompt's last two text tokens are padding
    return mask


# name: (the layer, what each call passes besides fresh hidden states, whether the call passes a new text)
CASES = {
    "sd3-joint": (lambda: Attention(query_dim=32, added_kv_proj_dim=32, dim_head=8, heads=4, out_dim=32,
                                    context_pre_only=False, bias=True, processor=JointAttnProcessor2_0(),
                                    qk_norm="rms_norm", eps=1e-6), lambda: {}, True),
    "sd3-context-pre-only": (lambda: Attention(query_dim=32, added_kv_proj_dim=32, dim_head=8, heads=4, out_dim=32,
                                               context_pre_only=True, bias=True, processor=JointAttnProcessor2_0(),
                                               qk_norm="rms_norm", eps=1e-6), lambda: {}, True),
    "sd35-dual": (lambda: Attention(query_dim=32, dim_head=8, heads=4, out_dim=32, bias=True,
                                    processor=JointAttnProcessor2_0(), qk_norm="rms_norm", eps=1e-6),
                  lambda: {}, False),
    "flux-double": (lambda: FluxAttention(query_dim=32, added_kv_proj_dim=32, dim_head=8, heads=4, out_dim=32,
                                          context_pre_only=False, bias=True, eps=1e-6),
                    lambda: {"image_rotary_emb": _rotary(TEXT + IMAGE)}, True),
    "flux-double-masked": (lambda: FluxAttention(query_dim=32, added_kv_proj_dim=32, dim_head=8, heads=4,
                                                 out_dim=32, context_pre_only=False, bias=True, eps=1e-6),
                           lambda: {"image_rotary_emb": _rotary(TEXT + IMAGE), "attention_mask": _flux_mask()},
                           True),
    "flux-single": (lambda: FluxAttention(query_dim=32, dim_head=8, heads=4, out_dim=32, bias=True, eps=1e-6,
                                          pre_only=True), lambda: {"image_rotary_emb": _rotary(IMAGE)}, False),
    "wan-self": (lambda: WanAttention(dim=32, heads=4, dim_head=8, eps=1e-6, processor=WanAttnProcessor()),
                 lambda: {"rotary_emb": _wan_rotary()}, False),
}


def make_calls(case: str, count: int = 4) -> list[dict]:
    """Inputs of `count` calls with fresh hidden states (and a fresh text stream where the layer has one)."""
    _, extra, text = CASES[case]
    shared = extra()  # rotary embeddings and masks stay within a generation
    calls = []
    for _ in range(count):
        call = {"hidden_states": torch.randn(2, IMAGE, 32), **shared}
        if text:
            call["encoder_hidden_states"] = torch.randn(2, TEXT, 32)
        calls.append(call)
    return calls


def _probabilities(query, key, mask, scale):
    """softmax(Q K^T * scale + mask) in float64, as SDPA defines it (a boolean mask keeps the True keys)."""
    logits = query.double() @ key.double().transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return logits.softmax(-1)


def with_kept_map(model, store_call: dict, reuse_call: dict, monkeypatch):
    """The layer's own processor at `reuse_call`, with SDPA given the map of `store_call`'s Q and K (after every
    norm and rotary embedding the processor applies) and the reuse call's V: the definition of a map reuse."""
    kept = {}
    sdpa = F.scaled_dot_product_attention

    def capture(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        kept["map"] = _probabilities(query, key, attn_mask, scale)
        return sdpa(query, key, value, attn_mask=attn_mask, scale=scale)

    def apply(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        return (kept["map"] @ value.double()).to(value.dtype)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", capture)
        model(**store_call)
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", apply)
        return model(**reuse_call)


def _close(actual, expected, **tolerance):
    actual, expected = (x if isinstance(x, tuple) else (x,) for x in (actual, expected))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tolerance)


def _differ(actual, expected) -> bool:
    actual, expected = (x if isinstance(x, tuple) else (x,) for x in (actual, expected))
    return all(not torch.allclose(a, e, atol=1e-4) for a, e in zip(actual, expected))


@pytest.mark.parametrize("mode", ["map", "qk"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reuse_calls_apply_the_kept_map_to_fresh_values(case, mode, monkeypatch):
    """map and qk: a reuse call is the layer's own processor with call 0's map (joint sequence, post-norm,
    post-rotary) applied to the current V of every stream; the store call equals the plain call."""
    torch.manual_seed(0)
    model = Layer(CASES[case][0]()).eval()
    calls = make_calls(case)
    with torch.no_grad():
        plain = [model(**c) for c in calls]
        with apply_attention_reuse(model, Schedule("1001"), mode=mode) as handle:  # store, reuse, reuse, compute
            patched = [model(**c) for c in calls]
            counts = handle.stats()["layers"]["attn"]
        assert (counts["computed"], counts["stored"], counts["reused"]) == (2, 1, 2)
        _close(patched[0], plain[0], rtol=1e-5, atol=1e-5)
        _close(patched[3], plain[3], rtol=0, atol=0)  # a plain compute call runs the layer's own processor
        for i in (1, 2):
            expected = with_kept_map(model, calls[0], calls[i], monkeypatch)
            _close(patched[i], expected, rtol=1e-4, atol=1e-5)
            assert _differ(patched[i], plain[i])  # and it is not a fresh computation


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_mode_returns_what_the_store_call_returned(case):
    """mode="output": every stream of a reuse call is the store call's output, projections included."""
    torch.manual_seed(0)
    model = Layer(CASES[case][0]()).eval()
    calls = make_calls(case, 3)
    with torch.no_grad():
        plain = model(**calls[0])
        with apply_attention_reuse(model, Schedule("100"), mode="output"):
            patched = [model(**c) for c in calls]
    for out in patched:
        _close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["output", "map", "qk"])
def test_wan_cross_attention_is_exact_while_the_text_stays(mode, monkeypatch):
    """Wan's cross-attention to the text is the exact cross cache in every mode: the store call's output while the
    text is the same tensor, the kept map applied to the new text's V once it changes."""
    torch.manual_seed(0)
    model = Layer(WanAttention(dim=32, heads=4, dim_head=8, eps=1e-6, cross_attention_dim_head=8,
                               processor=WanAttnProcessor())).eval()
    text = torch.randn(2, TEXT, 32)
    calls = [{"hidden_states": torch.randn(2, IMAGE, 32), "encoder_hidden_states": t}
             for t in (text, text, torch.randn(2, TEXT, 32))]
    with torch.no_grad():
        with apply_attention_reuse(model, Schedule("100"), mode=mode) as handle:
            patched = [model(**c) for c in calls]
            assert handle.layout.attention["attn"] == "cross"
        _close(patched[1], model(**calls[0]), rtol=1e-5, atol=1e-5)
        _close(patched[2], with_kept_map(model, calls[0], calls[2], monkeypatch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_compute_is_bit_identical_and_remove_restores_the_processor(case):
    torch.manual_seed(0)
    model = Layer(CASES[case][0]()).eval()
    original = model.attn.processor
    calls = make_calls(case, 3)
    with torch.no_grad():
        plain = [model(**c) for c in calls]
        handle = apply_attention_reuse(model, Schedule("111"))
        patched = [model(**c) for c in calls]
        handle.remove()
    assert model.attn.processor is original
    for a, b in zip(patched, plain):
        _close(a, b, rtol=0, atol=0)


def test_unsupported_processors_are_refused_by_name():
    """A processor whose math no family reproduces, fused projections and Wan's image context are refused at
    apply time with the layer's name."""
    from diffusers.models.attention_processor import FusedJointAttnProcessor2_0

    model = Layer(CASES["sd3-joint"][0]())
    model.attn.set_processor(FusedJointAttnProcessor2_0())
    with pytest.raises(ValueError, match="'attn' uses FusedJointAttnProcessor2_0"):
        apply_attention_reuse(model, Schedule("10"))
    image = Layer(WanAttention(dim=32, heads=4, dim_head=8, added_kv_proj_dim=32, cross_attention_dim_head=8,
                               processor=WanAttnProcessor()))
    with pytest.raises(ValueError, match="image context"):
        apply_attention_reuse(image, Schedule("10"))
    fused = Layer(FluxAttention(query_dim=32, dim_head=8, heads=4, out_dim=32, bias=True, pre_only=True))
    fused.attn.fuse_projections()
    with pytest.raises(ValueError, match="fused QKV"):
        apply_attention_reuse(fused, Schedule("10"))
    assert isinstance(Layer(Attention(query_dim=32)).attn.processor, AttnProcessor2_0)
