"""The core identities of attention reuse, on tiny SD and SDXL pipelines built locally."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from helpers import STEPS, CallCounter, attention_modules, run

from attnreuse import AttentionReuseConfig, AttentionReuseHelper, Schedule, apply_attention_reuse
from attnreuse.pipelines.sampling import use_sampler


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_all_compute_schedule_equals_unpatched_pipeline(arch, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    reference = run(pipe, ["a red circle", "a blue square"])
    with apply_attention_reuse(pipe, Schedule.all_compute(STEPS)) as handle:
        patched = run(pipe, ["a red circle", "a blue square"])
        assert set(c["reused"] for c in handle.stats()["layers"].values()) == {0}
    np.testing.assert_allclose(patched, reference, rtol=0, atol=1e-6)


def test_steps_before_the_first_reuse_match_the_unpatched_pipeline(sd_pipe):
    """The store call (explicit softmax map) gives the same result as the model's own attention."""
    def latents_per_step(pipe):
        seen = []

        def callback(pipe, i, t, kwargs):
            seen.append(kwargs["latents"].clone())
            return kwargs
        run(sd_pipe, callback_on_step_end=callback, output_type="latent")
        return seen

    reference = latents_per_step(sd_pipe)
    with apply_attention_reuse(sd_pipe, Schedule.hurry(STEPS, 3)):
        reused = latents_per_step(sd_pipe)
    for step in range(STEPS - 3):  # step STEPS-4 is the store call
        torch.testing.assert_close(reused[step], reference[step], rtol=0, atol=1e-5)
    assert not torch.equal(reused[-1], reference[-1])  # the reuse steps do change the sample


def _reference_attention(attn, x_map, ctx_map, x_now, ctx_now):
    """softmax(Q K^T * scale) from the map call's inputs, applied to V of the current call (written out here)."""
    assert attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
    assert attn.rescale_output_factor == 1.0 and not attn.norm_cross
    batch, heads = x_now.shape[0], attn.heads

    def split(t):
        return t.reshape(batch, t.shape[1], heads, -1).permute(0, 2, 1, 3)

    q = split(attn.to_q(x_map))
    k = split(attn.to_k(x_map if ctx_map is None else ctx_map))
    v = split(attn.to_v(x_now if ctx_now is None else ctx_now))
    a = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    out = (a @ v).permute(0, 2, 1, 3).reshape(batch, x_now.shape[1], -1)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_reuse_call_equals_cached_map_times_fresh_values(arch, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if arch == "sd" else sdxl_pipe
    schedule = Schedule("110100110")  # reuse at 2 (map of 1), 4 and 5 (map of 3), 8 (map of 7)
    last_compute = {2: 1, 4: 3, 5: 3, 8: 7}
    records = {}

    def recorder(name):
        def hook(module, args, kwargs, output):
            records.setdefault(name, []).append(
                (args[0].detach().clone(), kwargs.get("encoder_hidden_states"), output.detach().clone()))
        return hook

    modules = attention_modules(pipe)
    hooks = [m.register_forward_hook(recorder(n), with_kwargs=True) for n, m in modules]
    with apply_attention_reuse(pipe, schedule):
        run(pipe, ["a green triangle", "a purple square"], steps=len(schedule))
    for h in hooks:
        h.remove()
    assert len(modules) >= 8 and {len(calls) for calls in records.values()} == {len(schedule)}
    with torch.no_grad():
        for name, attn in modules:
            calls = records[name]
            for step, source in last_compute.items():
                x_map, ctx_map, _ = calls[source]
                x_now, ctx_now, out_now = calls[step]
                expected = _reference_attention(attn, x_map, ctx_map, x_now, ctx_now)
                torch.testing.assert_close(out_now, expected, rtol=1e-4, atol=1e-5, msg=f"{name} at step {step}")
            # and a compute call really is fresh: it differs from reusing the previous map
            x_prev, ctx_prev, _ = calls[2]
            x_now, ctx_now, out_now = calls[3]
            if ctx_now is None:
                assert not torch.allclose(out_now, _reference_attention(attn, x_prev, ctx_prev, x_now, ctx_now))


# sampler name -> number of model calls for STEPS sampler steps
SAMPLER_CALLS = {"ddim": STEPS, "dpm++": STEPS, "euler": STEPS, "heun": 2 * (STEPS - 1) + 1,
                 "dpm2": 2 * (STEPS - 1) + 1}


@pytest.mark.parametrize("sampler", sorted(SAMPLER_CALLS))
def test_hurry_runs_q_and_k_exactly_n_minus_r_times(sampler, sd_pipe):
    use_sampler(sd_pipe, sampler)
    reuse = 2
    schedule = Schedule.hurry(STEPS, reuse)
    calls = SAMPLER_CALLS[sampler]
    expected = schedule.expand(calls, order=sd_pipe.scheduler.order)
    if sampler in ("heun", "dpm2"):  # every call of the last two sampler steps reuses: 2 + 1 of 11 calls
        assert expected == Schedule("11111111000")
    self_attn = attention_modules(sd_pipe, "self")
    q = CallCounter([(n, m.to_q) for n, m in self_attn])
    k = CallCounter([(n, m.to_k) for n, m in self_attn])
    v = CallCounter([(n, m.to_v) for n, m in self_attn])
    unet = CallCounter([("unet", sd_pipe.unet)])
    with apply_attention_reuse(sd_pipe, schedule) as handle:
        run(sd_pipe)
        stats = handle.stats()
    assert unet.counts["unet"] == calls
    assert q.values() == k.values() == {sum(expected)}
    assert v.values() == {calls}  # V is computed fresh at every call
    for layer in stats["layers"].values():
        assert layer["computed"] == sum(expected) and layer["reused"] == calls - sum(expected)
        assert layer["stored"] == 1  # lookahead: only the compute call right before the reuse run keeps maps


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm2"])
def test_schedule_per_model_call_is_taken_as_is(sampler, sd_pipe):
    use_sampler(sd_pipe, sampler)
    calls = SAMPLER_CALLS[sampler]
    schedule = Schedule([1] * (calls - 3) + [0, 1, 0])
    q = CallCounter([(n, m.to_q) for n, m in attention_modules(sd_pipe, "self")])
    with apply_attention_reuse(sd_pipe, schedule) as handle:
        run(sd_pipe)
        assert {c["stored"] for c in handle.stats()["layers"].values()} == {2}
    assert q.values() == {calls - 2}


def test_cross_attention_reuse_is_an_exact_output_cache(sd_pipe):
    cross = attention_modules(sd_pipe, "cross")
    q = CallCounter([(n, m.to_q) for n, m in cross])
    v = CallCounter([(n, m.to_v) for n, m in cross])
    with apply_attention_reuse(sd_pipe, Schedule.hurry(STEPS, 3), attention="cross") as handle:
        run(sd_pipe)
        assert all(name.endswith("attn2") for name in handle.layers)
    assert q.values() == v.values() == {STEPS - 3}  # a cached cross output needs no projection at all


@pytest.mark.parametrize("options", [
    dict(guidance_scale=1.0),
    dict(guidance_scale=7.5, num_images_per_prompt=2),
    dict(prompt=["a red circle", "a blue square", "a small green triangle"], guidance_scale=3.0),
])
def test_batches_and_guidance(options, sd_pipe):
    prompt = options.pop("prompt", "a red circle")
    reference = run(sd_pipe, prompt, **options)
    with apply_attention_reuse(sd_pipe, Schedule.hurry(STEPS, 3)) as handle:
        first = run(sd_pipe, prompt, **options)
        second = run(sd_pipe, prompt, **options)  # no manual reset between generations
        assert handle.stats()["generations"] == 2
    assert first.shape == reference.shape
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - reference).max() < 0.05  # close to the full output, not equal to it


def test_cache_is_per_cfg_branch_and_freed_at_the_end(sd_pipe):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, handle.stats()))
        return kwargs

    schedule = Schedule("111000")
    with apply_attention_reuse(sd_pipe, schedule, attention="self") as handle:
        run(sd_pipe, ["a red circle", "a blue square"], num_images_per_prompt=2, callback_on_step_end=callback)
        final = handle.stats()
    sizes = [s["cache_bytes"] for _, s in seen]
    assert sizes[:2] == [0, 0] and sizes[2] > 0 and len(set(sizes[2:5])) == 1  # stored at call 2, kept
    assert final["cache_bytes"] == 0 and final["peak_cache_bytes"] == sizes[2]  # freed after the last call
    expected = 0
    for name, attn in attention_modules(sd_pipe, "self"):
        tokens = 16 * 16 if name.startswith(("down_blocks.0", "up_blocks.1")) else 8 * 8
        expected += 2 * 4 * attn.heads * tokens * tokens * 4  # CFG x 4 images x heads x tokens^2 x fp32
    assert sizes[2] == expected
    layer = next(iter(seen[2][1]["layers"].values()))
    assert layer["cache_bytes"] > 0 and layer["stored"] == 1


def test_cache_dtype_halves_the_cache(sd_pipe):
    peaks = {}
    for dtype in (None, torch.float16):
        with apply_attention_reuse(sd_pipe, Schedule.hurry(STEPS, 2), attention="self", cache_dtype=dtype) as h:
            image = run(sd_pipe)
            peaks[dtype] = h.stats()["peak_cache_bytes"]
    assert peaks[torch.float16] * 2 == peaks[None] > 0
    assert np.isfinite(image).all()


def test_callback_and_interrupted_generation_then_a_clean_run(sd_pipe):
    schedule = Schedule("110100")
    with apply_attention_reuse(sd_pipe, schedule):
        clean = run(sd_pipe)

        def stop_early(pipe, i, t, kwargs):
            if i == 2:
                pipe._interrupt = True
            return kwargs
        run(sd_pipe, callback_on_step_end=stop_early)
        after = run(sd_pipe)  # the new pipeline call starts a new generation by itself
    np.testing.assert_array_equal(after, clean)


def test_img2img_with_fewer_steps_than_the_scheduler(sd_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    for sampler in ("ddim", "euler"):
        use_sampler(pipe, sampler)
        unet = CallCounter([("unet", pipe.unet)])
        q = CallCounter([(n, m.to_q) for n, m in attention_modules(pipe, "self")])
        with apply_attention_reuse(pipe, Schedule.hurry(4, 2)):  # 8 steps at strength 0.5 run 4
            run(pipe, image=image, steps=8, strength=0.5)
        assert unet.counts["unet"] == 4 and q.values() == {2}
        with apply_attention_reuse(pipe, Schedule.hurry(8, 2)):
            with pytest.raises(ValueError, match="has 8 entries but this generation makes 4 denoiser calls"):
                run(pipe, image=image, steps=8, strength=0.5)
        unet.remove()
        q.remove()


@pytest.mark.parametrize("sampler", sorted(SAMPLER_CALLS))
def test_sdxl_pipeline_with_reuse(sampler, sdxl_pipe):
    use_sampler(sdxl_pipe, sampler)
    reference = run(sdxl_pipe)
    schedule = Schedule.hurry(STEPS, 3)
    q = CallCounter([(n, m.to_q) for n, m in attention_modules(sdxl_pipe, "self")])
    with apply_attention_reuse(sdxl_pipe, schedule) as handle:
        first, second = run(sdxl_pipe), run(sdxl_pipe)
        assert len(handle.layers) == 16
    computes = sum(schedule.expand(SAMPLER_CALLS[sampler], sdxl_pipe.scheduler.order))
    assert q.values() == {2 * computes}  # two generations
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - reference).max() < 0.05


def test_remove_restores_processors_and_outputs(sd_pipe):
    user_processor = AttnProcessor()
    sd_pipe.unet.set_attn_processor(user_processor)
    before = dict(sd_pipe.unet.attn_processors)
    reference = run(sd_pipe)
    handle = apply_attention_reuse(sd_pipe, Schedule.hurry(STEPS, 3))
    assert all(type(p).__name__ == "ReuseAttnProcessor" for p in sd_pipe.unet.attn_processors.values())
    run(sd_pipe)
    handle.remove()
    after = sd_pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not sd_pipe.unet._forward_pre_hooks and not sd_pipe.unet._forward_hooks
    np.testing.assert_array_equal(run(sd_pipe), reference)
    handle.remove()  # a second remove is a no-op


def test_layer_filter_patches_only_matching_layers(sd_pipe):
    with apply_attention_reuse(sd_pipe, Schedule.hurry(STEPS, 3), layers=["up_blocks.*", "mid_block"]) as handle:
        assert handle.layers and all(n.startswith(("up_blocks.", "mid_block.")) for n in handle.layers)
        kept = {k for k, p in sd_pipe.unet.attn_processors.items() if isinstance(p, AttnProcessor2_0)}
        assert kept and all(k.startswith("down_blocks.") for k in kept)
        run(sd_pipe)


def test_model_target_and_manual_loop(sd_pipe):
    """Applied to the UNet itself, a generation ends after len(schedule) calls or when t goes back up."""
    schedule = Schedule.hurry(STEPS, 3)
    with apply_attention_reuse(sd_pipe, schedule):
        via_pipeline = run(sd_pipe)
    with apply_attention_reuse(sd_pipe.unet, schedule) as handle:
        first, second = run(sd_pipe), run(sd_pipe)
        assert handle.stats()["generations"] == 2
        run(sd_pipe, steps=STEPS, callback_on_step_end=_interrupt_at(1))  # abandoned after 2 calls
        third = run(sd_pipe)  # the timestep going back up starts a new generation
    np.testing.assert_array_equal(first, via_pipeline)
    np.testing.assert_array_equal(second, via_pipeline)
    np.testing.assert_array_equal(third, via_pipeline)


def _interrupt_at(step):
    def callback(pipe, i, t, kwargs):
        if i == step:
            pipe._interrupt = True
        return kwargs
    return callback


def test_helper_and_config(sd_pipe):
    reference = run(sd_pipe)
    helper = AttentionReuseHelper(sd_pipe)
    with pytest.raises(ValueError, match="set_params"):
        helper.enable()
    helper.set_params(schedule=f"hurry:{STEPS}:3")
    helper.enable()
    with pytest.raises(ValueError, match="already"):
        helper.enable()
    reused = run(sd_pipe)
    helper.disable()
    np.testing.assert_array_equal(run(sd_pipe), reference)
    config = AttentionReuseConfig(Schedule.hurry(STEPS, 3))
    with apply_attention_reuse(sd_pipe, config):
        np.testing.assert_array_equal(run(sd_pipe), reused)


def test_schedule_with_timesteps_moves_to_another_step_count(sd_pipe):
    sd_pipe.scheduler.set_timesteps(STEPS)
    found = Schedule("111010").at_timesteps(sd_pipe.scheduler.timesteps.tolist())
    sd_pipe.scheduler.set_timesteps(2 * STEPS)
    moved = found.for_timesteps(sd_pipe.scheduler.timesteps.tolist())
    assert len(moved) == 2 * STEPS and moved.num_reuse >= 2
    q = CallCounter([(n, m.to_q) for n, m in attention_modules(sd_pipe, "self")])
    with apply_attention_reuse(sd_pipe, found) as handle:
        run(sd_pipe, steps=2 * STEPS)
        assert {c["reused"] for c in handle.stats()["layers"].values()} == {moved.num_reuse}
    assert q.values() == {sum(moved)}
    with apply_attention_reuse(sd_pipe, Schedule("111010")):  # without timesteps a length mismatch is an error
        with pytest.raises(ValueError, match="has 6 entries"):
            run(sd_pipe, steps=2 * STEPS)


def test_a_generation_that_stops_early_frees_its_cache(sdxl_pipe):
    """SDXL's denoising_end stops the loop before the scheduler's last timestep; the pipeline call's end frees."""
    unet = CallCounter([("unet", sdxl_pipe.unet)])
    with apply_attention_reuse(sdxl_pipe, Schedule("110000")) as handle:
        run(sdxl_pipe, denoising_end=0.5)
        assert 2 <= unet.counts["unet"] < STEPS and handle.stats()["cache_bytes"] == 0
        assert handle.stats()["peak_cache_bytes"] > 0
        first, second = run(sdxl_pipe), run(sdxl_pipe)
        assert handle.stats()["generations"] == 3
    np.testing.assert_array_equal(first, second)
    assert "maybe_free_model_hooks" not in vars(sdxl_pipe)  # the instance wrapper is gone after remove()
