"""Bad input gets a clear error that names the problem, before any sampling."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import STEPS, CallCounter, attention_modules, run

from attnreuse import Schedule, apply_attention_reuse, attention_layers
from attnreuse.pipelines.sampling import use_sampler


def test_wrong_length_is_refused_before_any_sampling(sd_pipe):
    steps_run = []
    q = CallCounter([(n, m.to_q) for n, m in attention_modules(sd_pipe)])
    with apply_attention_reuse(sd_pipe, Schedule.hurry(STEPS + 2, 3)):
        with pytest.raises(ValueError, match=f"has {STEPS + 2} entries but this generation makes {STEPS} denoiser "
                                             f"calls; expected a schedule of length {STEPS}"):
            run(sd_pipe, callback_on_step_end=lambda p, i, t, kw: steps_run.append(i) or kw)
        assert steps_run == [] and q.values() == {0}
        run(sd_pipe, steps=STEPS + 2)  # the same handle works once the step count matches


def test_wrong_length_for_heun_names_both_accepted_lengths(sd_pipe):
    use_sampler(sd_pipe, "heun")
    with apply_attention_reuse(sd_pipe, Schedule("1110")):
        with pytest.raises(ValueError, match=r"length 11 \(one per model call\) or 6 \(one per sampler step\)"):
            run(sd_pipe)


def test_target_without_attention_layers():
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
                                cross_attention_dim=32, norm_num_groups=16)
    with pytest.raises(ValueError, match="UNet2DConditionModel has no diffusers attention layers"):
        apply_attention_reuse(unet, "hurry:4:2")
    with pytest.raises(ValueError, match="Linear has no diffusers attention layers"):
        apply_attention_reuse(torch.nn.Linear(2, 2), "hurry:4:2")
    with pytest.raises(TypeError, match="needs a diffusers pipeline with a `unet` or `transformer`"):
        apply_attention_reuse("runwayml/stable-diffusion-v1-5", "hurry:4:2")


def test_layer_filters_that_match_nothing(sd_pipe):
    before = dict(sd_pipe.unet.attn_processors)
    with pytest.raises(ValueError, match=r"Layer filter 'up_blocks\.9\.\*' matches no all attention layer"):
        apply_attention_reuse(sd_pipe, "hurry:4:2", layers=["up_blocks.*", "up_blocks.9.*"])
    with pytest.raises(ValueError, match="Layer filter 'down_blocks.0.attentions.0.attn1' matches no"):
        apply_attention_reuse(sd_pipe, "hurry:4:2", layers="down_blocks.0.attentions.0.attn1")
    cross = next(n for n, kind in attention_layers(sd_pipe).items() if kind == "cross")
    with pytest.raises(ValueError, match="matches no self attention layer"):
        apply_attention_reuse(sd_pipe, "hurry:4:2", layers=[cross], attention="self")
    after = sd_pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # nothing was patched
    assert not hasattr(sd_pipe.unet, "_attnreuse_handle")


def test_bad_options(sd_pipe):
    with pytest.raises(ValueError, match="attention must be one of"):
        apply_attention_reuse(sd_pipe, "hurry:4:2", attention="both-ways")
    with pytest.raises(ValueError, match="cache_dtype must be a floating torch.dtype"):
        apply_attention_reuse(sd_pipe, "hurry:4:2", cache_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"mode must be one of \('map', 'qk', 'output', 'auto'\), got 'flash'"):
        apply_attention_reuse(sd_pipe, "hurry:4:2", mode="flash")
    with pytest.raises(ValueError, match="max_cache_bytes must be at least 0, got -1"):
        apply_attention_reuse(sd_pipe, "hurry:4:2", max_cache_bytes=-1)
    with pytest.raises(ValueError, match="first step of a schedule must compute"):
        apply_attention_reuse(sd_pipe, [0, 1, 1])
    with pytest.raises(ValueError, match="entry 2 is 3"):
        apply_attention_reuse(sd_pipe, [1, 0, 3])
    with pytest.raises(TypeError, match="not both"):
        from attnreuse import AttentionReuseConfig
        apply_attention_reuse(sd_pipe, AttentionReuseConfig("hurry:4:2"), attention="self")


def test_double_apply_is_refused(sd_pipe):
    with apply_attention_reuse(sd_pipe, "hurry:4:2"):
        with pytest.raises(ValueError, match="already applied to this model; call handle.remove"):
            apply_attention_reuse(sd_pipe, "hurry:4:2")
    apply_attention_reuse(sd_pipe, "hurry:4:2").remove()  # fine once removed


def test_unsupported_processor_and_fused_projections(sd_pipe):
    class MyProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            return hidden_states

    name = next(iter(attention_layers(sd_pipe)))
    sd_pipe.unet.get_submodule(name).set_processor(MyProcessor())
    with pytest.raises(ValueError, match=f"Layer '{name}' uses MyProcessor"):
        apply_attention_reuse(sd_pipe, "hurry:4:2")
    with apply_attention_reuse(sd_pipe, "hurry:4:2", layers=["up_blocks.*"]) as handle:  # leave it out
        assert name not in handle.layers
    sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
    sd_pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV projections; call unfuse_qkv_projections"):
        apply_attention_reuse(sd_pipe, "hurry:4:2")


def test_batch_change_within_a_generation_is_an_error_not_a_wrong_image(sd_pipe):
    unet = sd_pipe.unet
    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, 32)
    with apply_attention_reuse(unet, "100"), torch.no_grad():
        unet(x, 900, encoder_hidden_states=context)
        with pytest.raises(RuntimeError, match="changed within one generation"):
            unet(torch.randn(4, 4, 16, 16), 800, encoder_hidden_states=torch.randn(4, 77, 32))


@pytest.mark.parametrize("options, error, message", [
    (dict(layers=5), TypeError, "layers must be a layer name, a pattern or a list of them, got int"),
    (dict(layers=[]), ValueError, r"layers=\[\] selects no layer"),
    (dict(layers=["up_blocks.*", 3]), TypeError, "layers holds 3"),
    (dict(max_cache_bytes=True), TypeError, "max_cache_bytes must be a whole number, got True"),
    (dict(max_cache_bytes=2.5), TypeError, "max_cache_bytes must be a whole number"),
    (dict(kernels="yes"), TypeError, "kernels must be True or False"),
    (dict(cache_dtype="float16"), ValueError, "cache_dtype must be a floating torch.dtype"),
])
def test_options_of_the_wrong_type_are_named(sd_pipe, options, error, message):
    with pytest.raises(error, match=message):
        apply_attention_reuse(sd_pipe, "hurry:4:2", **options)
    assert not hasattr(sd_pipe.unet, "_attnreuse_handle")


def test_numpy_integers_are_whole_numbers(sd_pipe):
    import numpy as np

    with apply_attention_reuse(sd_pipe, Schedule.hurry(np.int64(STEPS), np.int32(2)),
                               max_cache_bytes=np.int64(2**30)) as handle:
        assert handle.config.max_cache_bytes == 2**30 and len(handle.config.schedule) == STEPS
        run(sd_pipe)
