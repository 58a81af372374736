"""Every feature of diffusers' Attention layer, at store and reuse calls, against math written out here."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from helpers import MAP_DTYPES, OneLayer, assert_rounded, packed

from attnreuse import Schedule, apply_attention_reuse
from attnreuse.attention.math import FP8_SCALE


def reference(attn, x_map, x_now, ctx_map=None, ctx_now=None, mask=None, temb_map=None, temb_now=None, scale=None,
              qk_norm=True):
    """diffusers' attention math, written out: A from the map call's inputs, V from the current call's."""
    def prepare(x, temb):
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        return x

    def context(x, ctx):
        if ctx is None:
            return x
        return attn.norm_cross(ctx) if attn.norm_cross is not None else ctx

    def heads(t, norm=None):
        t = t.reshape(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)
        return norm(t) if norm is not None else t

    h_map, h_now = prepare(x_map, temb_map), prepare(x_now, temb_now)
    q = heads(attn.to_q(h_map), attn.norm_q if qk_norm else None).double()
    k = heads(attn.to_k(context(h_map, ctx_map)), attn.norm_k if qk_norm else None).double()
    v = heads(attn.to_v(context(h_now, ctx_now))).double()
    logits = q @ k.transpose(-1, -2) * (attn.scale if scale is None else scale)
    if mask is not None:
        logits = logits + mask[:, None].double()  # (batch, 1, keys) -> (batch, heads, queries, keys)
    out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).flatten(2).float()
    out = attn.to_out[1](attn.to_out[0](out))
    if x_now.ndim == 4:
        out = out.transpose(1, 2).reshape(x_now.shape)
    if attn.residual_connection:
        out = out + x_now
    return out / attn.rescale_output_factor


CASES = {
    # VAE-style: 4-D input, group norm, residual connection, rescale factor, upcast softmax
    "vae": (dict(query_dim=32, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True,
                 rescale_output_factor=2.0, upcast_softmax=True, bias=True), dict(x=(2, 32, 4, 4))),
    # MoVQ-style: spatial norm conditioned on temb
    "spatial": (dict(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True),
                dict(x=(2, 32, 4, 4), temb=(2, 4, 2, 2))),
    # cross-attention with a layer-normed context and a padding mask
    "cross": (dict(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, cross_attention_norm="layer_norm"),
              dict(x=(2, 16, 32), ctx=(2, 7, 24), mask=True)),
    # QK norm and a non-default scale (scale_qk=False means scale 1)
    "qknorm": (dict(query_dim=32, heads=4, dim_head=8, qk_norm="layer_norm", scale_qk=False), dict(x=(2, 16, 32))),
}


def make_calls(shapes, count=4):
    """Inputs of `count` calls; call 1 passes call 0's context object (the output cache holds), the others new."""
    calls = []
    for _ in range(count):
        call = {"hidden_states": torch.randn(shapes["x"])}
        if "temb" in shapes:
            call["temb"] = torch.randn(shapes["temb"])
        if "ctx" in shapes:
            call["encoder_hidden_states"] = torch.randn(shapes["ctx"])
        if shapes.get("mask"):
            mask = torch.zeros(shapes["x"][0], 1, shapes["ctx"][1])  # as the UNet passes encoder_attention_mask
            mask[..., -2:] = -10000.0  # the last two context tokens are padding
            call["attention_mask"] = mask
        calls.append(call)
    calls[1]["encoder_hidden_states"] = calls[0].get("encoder_hidden_states")
    return calls


@pytest.mark.parametrize("mode", ["map", "qk"])
@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])
@pytest.mark.parametrize("case", sorted(CASES))
def test_store_and_reuse_calls_against_written_out_math(case, processor, mode):
    """map and qk keep different things but apply the same A (call 0's) to the current V."""
    torch.manual_seed(0)
    options, shapes = CASES[case]
    model = OneLayer(**options).eval()
    model.attn.set_processor(processor())
    attn = model.attn
    # diffusers' own processors differ: SDPA ignores attn.scale, and only AttnProcessor2_0 applies QK norms
    sdpa = processor is AttnProcessor2_0
    scale = (attn.inner_dim // attn.heads) ** -0.5 if sdpa else None
    calls = make_calls(shapes)
    with torch.no_grad():
        unpatched = [model(**c) for c in calls]
        with apply_attention_reuse(model, Schedule("1001"), mode=mode) as handle:  # store, reuse, reuse, compute
            patched = [model(**c) for c in calls]
            counts = handle.stats()["layers"]["attn"]
        assert counts == {"attention": counts["attention"], "computed": 2, "stored": 1, "reused": 2, "skipped": 0,
                          "cache": None, "cache_bytes": 0}
        # call 0 stores: explicit softmax map, same result as the layer's own processor
        torch.testing.assert_close(patched[0], unpatched[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched[3], unpatched[3], rtol=0, atol=0)  # plain compute: the own processor
        for i in (1, 2):  # reuse: A of call 0, V of call i
            expected = reference(attn, calls[0]["hidden_states"], calls[i]["hidden_states"],
                                 calls[0].get("encoder_hidden_states"), calls[i].get("encoder_hidden_states"),
                                 calls[0].get("attention_mask"), calls[0].get("temb"), calls[i].get("temb"), scale,
                                 sdpa)
            torch.testing.assert_close(patched[i], expected, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(patched[i], unpatched[i], atol=1e-4)  # and it is not a fresh computation


@pytest.mark.parametrize("case", sorted(set(CASES) - {"cross"}))
def test_output_mode_returns_the_stored_attention_output(case):
    """mode="output": a self-attention reuse call returns the store call's to_out(A V); only the residual path is
    current."""
    torch.manual_seed(0)
    options, shapes = CASES[case]
    model = OneLayer(**options).eval()
    attn = model.attn
    calls = make_calls(shapes, 3)
    with torch.no_grad():
        unpatched = model(**calls[0])
        with apply_attention_reuse(model, Schedule("100"), mode="output"):
            patched = [model(**c) for c in calls]
    torch.testing.assert_close(patched[0], unpatched, rtol=1e-5, atol=1e-5)
    r, residual = attn.rescale_output_factor, attn.residual_connection
    for i in (1, 2):
        expected = unpatched * r - residual * calls[0]["hidden_states"] + residual * calls[i]["hidden_states"]
        torch.testing.assert_close(patched[i], expected / r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["output", "map", "qk"])
def test_cross_attention_stays_exact_when_the_text_changes_in_every_mode(mode):
    """Cross-attention is the exact cross cache in every mode, output mode included: the store call's output while
    the text is the same tensor, and A_kept V_new once the text changes (a prompt edited in a callback)."""
    torch.manual_seed(0)
    options, shapes = CASES["cross"]
    model = OneLayer(**options).eval()
    calls = make_calls(shapes, 3)  # call 1 passes call 0's text object, call 2 a new text
    with torch.no_grad():
        with apply_attention_reuse(model, Schedule("100"), mode=mode):
            patched = [model(**c) for c in calls]
        x, ctx = [c["hidden_states"] for c in calls], [c["encoder_hidden_states"] for c in calls]
        mask = calls[0]["attention_mask"]
        same_text = reference(model.attn, x[0], x[1], ctx[0], ctx[1], mask, scale=model.attn.scale)
        new_text = reference(model.attn, x[0], x[2], ctx[0], ctx[2], mask, scale=model.attn.scale)
    torch.testing.assert_close(patched[1], same_text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patched[2], new_text, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(patched[2], patched[1], atol=1e-3)  # the new text was not ignored


@pytest.mark.parametrize("dtype", MAP_DTYPES[1:], ids=str)
def test_reduced_precision_map_reuse_is_the_rounded_map_times_v(dtype):
    """With `cache_dtype`, the cache holds A rounded to that dtype, and a reuse call applies that A to the fresh V:
    a 16-bit map multiplies V rounded to its dtype (one read of A, no copy), an fp8 map is dequantised first. A
    store call with a 16-bit map gives what a reuse of its map computes at the same call; with an fp8 map, the
    plain call's output."""
    torch.manual_seed(0)
    model = OneLayer(query_dim=32, heads=4, dim_head=8).eval()
    attn = model.attn
    x0, x1 = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    with torch.no_grad():
        plain = model(x0)
        with apply_attention_reuse(model, Schedule("10"), cache_dtype=dtype) as handle:
            stored = model(x0)
            kept = handle.cache.slots["attn"].attn_map
            reused = model(x1)
        heads = lambda t: t.view(2, 64, 4, 8).transpose(1, 2).reshape(8, 64, 8)  # noqa: E731
        exact = torch.softmax(heads(attn.to_q(x0)).double() @ heads(attn.to_k(x0)).double().transpose(1, 2)
                              * 8 ** -0.5, -1)
        scale = FP8_SCALE.get(dtype)

        def applied(x):  # the kept map applied to the V of input x, then the output projection
            value = heads(attn.to_v(x)).double()
            if scale is None:  # 16-bit: both factors rounded, the product rounded to the map's dtype
                product = (exact.to(dtype).double() @ value.to(dtype).double()).to(dtype)
            else:
                product = packed(exact, dtype).double() @ value / scale
            return attn.to_out[0](product.float().view(2, 4, 64, 8).transpose(1, 2).reshape(2, 64, 32))

        fresh = model(x1)
        torch.testing.assert_close(stored, plain if scale else applied(x0), rtol=1e-5 if scale else 0,
                                   atol=1e-6 if scale else 1e-4)
        assert kept.dtype == dtype and kept.shape == (8, 64, 64)
        assert_rounded(kept, packed(exact.float(), dtype))
        torch.testing.assert_close(reused, applied(x1), rtol=0, atol=1e-4)  # the rounding is the only difference
    assert (reused - fresh).abs().max() > 1e-2  # and the reuse did not recompute the map
    if scale is None:
        assert (stored - plain).abs().max() > 0  # the 16-bit store's output is the rounded product
    with apply_attention_reuse(model, Schedule("10"), cache_dtype=dtype):
        differentiable = model(x0)  # autograd on: the one-shot store, as under torch.compile, gives the same
    torch.testing.assert_close(differentiable.detach(), stored, rtol=0, atol=1e-4)
