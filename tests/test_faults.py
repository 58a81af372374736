"""Faults and misuse: nothing is left behind by an exception, and every misuse gets a clear error, not a wrong image."""

import threading

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import STEPS, run

from attnreuse import Schedule, apply_attention_reuse


def _raise_at(step, error):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise error
        return kwargs
    return callback


@pytest.mark.parametrize("error", [ValueError("from a callback"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_an_exception_in_a_pipeline_call_leaves_an_empty_cache_and_a_fresh_position(sd_pipe, error):
    with apply_attention_reuse(sd_pipe, Schedule("110100")) as handle:
        clean = run(sd_pipe)
        with pytest.raises(type(error)):
            run(sd_pipe, callback_on_step_end=_raise_at(1, error))  # after the store call, before a reuse
        stats = handle.stats()
        assert stats["cache_bytes"] == 0 and stats["peak_cache_bytes"] > 0
        assert not handle.tracker.in_generation
        handle.reset()  # allowed: the failed generation is over
        np.testing.assert_array_equal(run(sd_pipe), clean)


def test_an_exception_inside_a_model_call_frees_the_cache(sd_pipe):
    calls = {"n": 0}

    def fail_at_the_fourth(module, args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("a layer failed")

    with apply_attention_reuse(sd_pipe.unet, Schedule("110100")) as handle:
        hook = sd_pipe.unet.mid_block.register_forward_pre_hook(fail_at_the_fourth)
        with pytest.raises(RuntimeError, match="a layer failed"):
            run(sd_pipe)
        hook.remove()
        assert handle.stats()["cache_bytes"] == 0 and not handle.tracker.in_generation


def test_a_bare_model_handle_checks_the_length_and_an_explicit_generation_frees_its_cache(sd_pipe):
    unet = sd_pipe.unet
    with apply_attention_reuse(unet, "1100"):
        with pytest.raises(ValueError, match="the schedule has 4 entries but the denoiser was called again"):
            run(sd_pipe, steps=8)  # the timestep keeps going down past the 4th call: not a second generation
    x, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with apply_attention_reuse(unet, "1100") as handle, torch.no_grad():
        with handle.generation():  # a manual loop stopped after the store call
            unet(x, 900, encoder_hidden_states=text)
            unet(x, 800, encoder_hidden_states=text)
            assert handle.stats()["cache_bytes"] > 0
        assert handle.stats()["cache_bytes"] == 0 and handle.stats()["peak_cache_bytes"] > 0


@pytest.mark.parametrize("mode", ["map", "qk", "output"])
def test_a_batch_change_within_a_generation_is_an_error_in_every_mode(sd_pipe, mode):
    unet = sd_pipe.unet
    with apply_attention_reuse(unet, "100", mode=mode), torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), 900, encoder_hidden_states=torch.randn(2, 7, 32))
        with pytest.raises(RuntimeError, match="changed within one generation"):
            unet(torch.randn(4, 4, 16, 16), 800, encoder_hidden_states=torch.randn(4, 7, 32))


def test_a_second_thread_is_refused_while_a_generation_runs(sd_pipe):
    errors, started, release = [], threading.Event(), threading.Event()

    def pause(pipe, i, t, kwargs):  # the first thread holds its generation open here
        if i == 1:
            started.set()
            release.wait(60)
        return kwargs

    with apply_attention_reuse(sd_pipe, Schedule("110100")) as handle:
        generate = lambda: errors.append(_caught(lambda: run(sd_pipe, callback_on_step_end=pause)))  # noqa: E731
        first = threading.Thread(target=generate)
        first.start()
        started.wait(60)
        with pytest.raises(RuntimeError, match="another thread"):
            run(sd_pipe)
        release.set()
        first.join(60)
        assert handle.stats()["cache_bytes"] == 0
    # the second call replaced the shared scheduler's timesteps: the first thread is told so, not given a wrong image
    assert errors and isinstance(errors[0], RuntimeError) and "timesteps were replaced" in str(errors[0])


def _caught(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - returned for the test to inspect
        return err
    return None


def test_a_generation_inside_another_ones_callback_and_reset_during_a_generation_are_refused(sd_pipe):
    def nested(pipe, i, t, kwargs):
        if i == 1:
            run(sd_pipe, steps=STEPS)
        return kwargs

    def reset(pipe, i, t, kwargs):
        if i == 1:
            handle.reset()
        return kwargs

    with apply_attention_reuse(sd_pipe, Schedule("110100")) as handle:
        clean = run(sd_pipe)
        with pytest.raises(RuntimeError, match="inside another one's generation"):
            run(sd_pipe, callback_on_step_end=nested)
        with pytest.raises(RuntimeError, match=r"reset\(\) during a generation"):
            run(sd_pipe, callback_on_step_end=reset)
        np.testing.assert_array_equal(run(sd_pipe), clean)  # and nothing was left behind


def test_processors_changed_after_apply_are_detected_and_kept_by_remove(sd_pipe):
    handle = apply_attention_reuse(sd_pipe, Schedule("110100"))
    sd_pipe.enable_attention_slicing()
    sliced = dict(sd_pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="were changed after apply"):
        run(sd_pipe)
    handle.remove()
    after = sd_pipe.unet.attn_processors
    assert all(after[k] is sliced[k] for k in sliced)  # remove() did not undo the user's slicing
    sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
