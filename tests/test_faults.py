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


def test_a_bare_model_loop_that_stops_before_the_plans_end_is_said_when_the_next_one_starts(sd_pipe, caplog):
    unet, x, text = sd_pipe.unet, torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with apply_attention_reuse(unet, "110100"), torch.no_grad():
        for t in (900, 700, 500, 900, 700, 500, 300, 100, 50):  # 3 calls, then a whole generation of 6
            unet(x, t, encoder_hidden_states=text)
    said = [r.getMessage() for r in caplog.records if "went back up" in r.getMessage()]
    assert said == ["attnreuse: a generation ended after 3 of its plan's 6 calls (the timestep went back up before "
                    "the plan's end); build the plan for the loop's calls, or pass scheduler= to apply."]


@pytest.mark.parametrize("mode", ["map", "qk", "output"])
def test_a_batch_change_within_a_generation_is_an_error_in_every_mode(sd_pipe, mode):
    unet = sd_pipe.unet
    with apply_attention_reuse(unet, "100", mode=mode), torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), 900, encoder_hidden_states=torch.randn(2, 7, 32))
        with pytest.raises(RuntimeError, match="changed within one generation"):
            unet(torch.randn(4, 4, 16, 16), 800, encoder_hidden_states=torch.randn(4, 7, 32))


def test_a_second_thread_waits_for_the_first_and_both_get_their_images(sd_pipe):
    """One patched pipeline serves two threads as the stock one does: the second call waits for the first to
    return (a lock around the pipeline's call), and each gets the image it would get alone."""
    started, release, out = threading.Event(), threading.Event(), {}

    def pause(pipe, i, t, kwargs):  # the first thread holds its generation open here
        if i == 1:
            started.set()
            release.wait(60)
        return kwargs

    with apply_attention_reuse(sd_pipe, Schedule("110100")) as handle:
        alone = [run(sd_pipe, seed=0), run(sd_pipe, seed=1)]
        first = threading.Thread(target=lambda: out.setdefault(0, run(sd_pipe, seed=0, callback_on_step_end=pause)))
        second = threading.Thread(target=lambda: out.setdefault(1, run(sd_pipe, seed=1)))
        first.start()
        started.wait(60)
        second.start()
        second.join(1)
        assert second.is_alive() and 1 not in out  # waiting, not refused, and the first not broken
        release.set()
        first.join(60)
        second.join(60)
        assert handle.stats()["cache_bytes"] == 0 and handle.stats()["generations"] == 4
    for seed in (0, 1):  # another thread's intra-op pool may order a reduction differently
        np.testing.assert_allclose(out[seed], alone[seed], rtol=0, atol=1e-5)
    assert type(sd_pipe).__mro__[1].__name__ == "DiffusionPipeline"  # the pipeline's own class again


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
