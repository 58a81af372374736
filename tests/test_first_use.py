"""Planning at first use (`apply_reuse(pipe, budget=...)`): the stock image while calibrating, a plan after, the
plan cache across processes, damaged or foreign entries refused, and the replay the plan is made from."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import run

from attnreuse import Plan, apply_reuse
from attnreuse.first_use import Recording
from attnreuse.pipelines.sampling import use_sampler
from attnreuse.plan_cache import FORMAT

STEPS = 10


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Calls:
    """Counts the denoiser's forward calls (a reused whole call runs none)."""

    def __init__(self, pipe):
        self.count = 0
        self.hook = pipe.unet.conv_in.register_forward_hook(lambda *a: self._one())

    def _one(self):
        self.count += 1


def test_first_generation_is_stock_then_planned_then_cached(sd_pipe, cache):
    stock = run(sd_pipe, steps=STEPS)
    calls = Calls(sd_pipe)
    with apply_reuse(sd_pipe, budget=0.9) as handle:
        first = run(sd_pipe, steps=STEPS)
        assert handle.stats()["plan_source"].startswith("calibrating")
        assert calls.count == STEPS
        second = run(sd_pipe, steps=STEPS)
        stats = handle.stats()
    np.testing.assert_array_equal(first, stock)  # bit for bit: the calibration runs the stock sampler
    assert stats["plan_source"] == "planned here at first use"
    assert stats["predicted_latency"] <= 0.9
    planned = Plan.from_json(json.loads(open(stats["plan_file"]).read())["plan"])
    assert str(planned) == stats["plan"] and 0 < sum(planned.units["call"].bits) < STEPS
    assert calls.count == STEPS + sum(planned.units["call"].bits)  # the reused calls ran no model
    assert not np.array_equal(second, stock)
    assert "step" not in vars(sd_pipe.scheduler) and "check_inputs" not in vars(sd_pipe)


def test_a_second_process_starts_planned_from_the_cache(sd_pipe, cache):
    with apply_reuse(sd_pipe, budget=0.9) as handle:
        run(sd_pipe, steps=STEPS)
        planned = run(sd_pipe, steps=STEPS)
        plan = handle.stats()["plan"]
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from attnreuse import apply_reuse
        from attnreuse.pipelines.tiny import build_pipeline
        pipe = build_pipeline("tiny-sd", seed=0)
        with apply_reuse(pipe, budget=0.9) as handle:
            images = pipe("a red circle left of a blue square", num_inference_steps={STEPS}, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images
            stats = handle.stats()
        np.save({str(cache / "images.npy")!r}, np.asarray(images))
        print(stats["plan_source"].split(":")[0], stats["plan"], sep="|")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(cache))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"cache|{plan}"
    np.testing.assert_array_equal(np.load(cache / "images.npy"), planned)  # planned from its first generation


def _env(cache):
    import os

    return {**os.environ, "ATTNREUSE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def _entry(pipe):
    with apply_reuse(pipe, budget=0.9) as handle:
        run(pipe, steps=STEPS)
        return handle.stats()["plan_file"]


@pytest.mark.parametrize("damage", ["truncated", "foreign", "not a plan"])
def test_a_damaged_or_foreign_entry_is_refused_and_planned_again(sd_pipe, damage, caplog):
    path = _entry(sd_pipe)
    data = json.loads(open(path).read())
    if damage == "truncated":
        text = json.dumps(data)[:40]
    elif damage == "foreign":
        data["key"]["weights"] = "0" * 40  # a plan made for other weights, under this setup's name
        text = json.dumps(data)
    else:
        data["plan"] = {"units": {"call": {"kind": "call", "bits": "012"}}}
        text = json.dumps(data)
    open(path, "w").write(text)
    stock = run(sd_pipe, steps=STEPS)
    with apply_reuse(sd_pipe, budget=0.9) as handle:
        first = run(sd_pipe, steps=STEPS)
        assert handle.stats()["plan_source"].startswith("calibrating")
    np.testing.assert_array_equal(first, stock)
    assert any("planning again" in r.getMessage() and path in r.getMessage() for r in caplog.records)
    assert json.loads(open(path).read())["format"] == FORMAT  # written anew, whole


def test_other_weights_get_another_entry(sd_pipe):
    path = _entry(sd_pipe)
    with torch.no_grad():
        sd_pipe.unet.conv_in.weight.view(-1)[0] += 1  # a fine-tune, as far as the fingerprint can tell
    assert _entry(sd_pipe) != path


def test_calibration_counts_generations_and_a_target_psnr_picks_the_fewest_refreshes(sd_pipe):
    stock = run(sd_pipe, steps=STEPS)
    with apply_reuse(sd_pipe, target_psnr=30, calibration=2) as handle:
        assert np.array_equal(run(sd_pipe, steps=STEPS), stock)
        assert np.array_equal(run(sd_pipe, steps=STEPS), stock)
        run(sd_pipe, steps=STEPS)
        low = Plan.from_json(json.loads(open(handle.stats()["plan_file"]).read())["plan"])
    with apply_reuse(sd_pipe, target_psnr=60, calibration=2) as handle:
        run(sd_pipe, steps=STEPS)
        run(sd_pipe, steps=STEPS)
        high = Plan.from_json(json.loads(open(handle.stats()["plan_file"]).read())["plan"])
    assert low.meta["predicted_latent_psnr_db"] >= 30 and high.meta["predicted_latent_psnr_db"] >= 60
    assert sum(low.units["call"].bits) < sum(high.units["call"].bits)
    assert low.meta["calibration_generations"] == 2


def _recorded(pipe, sampler="ddim"):
    """A generation of the full sampler, recorded as first use records it."""
    use_sampler(pipe, sampler)
    recording = Recording(pipe.scheduler)
    pipe.scheduler.step = recording.step
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: recording.denoised(args[0], 0.0))
    try:
        run(pipe, steps=STEPS, output_type="latent")
    finally:
        del pipe.scheduler.step
        hook.remove()
    return recording


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "euler"])
def test_replaying_a_tail_of_reuse_equals_the_real_generation(sd_pipe, sampler):
    """Reusing call i's output at every call after it changes nothing before it, so the replay of that segment is
    the real generation's final latents exactly (any sampler, a multistep one's history included)."""
    recording = _recorded(sd_pipe, sampler)
    i = 6
    assert torch.equal(recording.rollout(list(range(STEPS)), 0), recording.final)  # nothing reused: the recording
    replayed = recording.rollout([c if c <= i else i for c in range(STEPS)], i + 1)
    bits = (1,) * (i + 1) + (0,) * (STEPS - i - 1)
    with apply_reuse(sd_pipe, Plan({"call": {"kind": "call", "bits": bits, "mode": "output"}})):
        real = sd_pipe("a red circle left of a blue square", num_inference_steps=STEPS, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(replayed, real, rtol=0, atol=1e-6)
    errors = recording.errors(residual=False)
    assert errors[i][STEPS] == pytest.approx(float(torch.mean((real - recording.final) ** 2)), rel=1e-5)


def test_residual_replay_equals_the_real_generation(sd_pipe):
    recording = _recorded(sd_pipe, "ddim")
    assert recording.residual_ok  # DDIM gives the denoiser the latents themselves
    i = 5
    replayed = recording.rollout([c if c <= i else i for c in range(STEPS)], i + 1, residual=True)
    bits = (1,) * (i + 1) + (0,) * (STEPS - i - 1)
    with apply_reuse(sd_pipe, Plan({"call": {"kind": "call", "bits": bits, "mode": "residual"}})):
        real = sd_pipe("a red circle left of a blue square", num_inference_steps=STEPS, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(replayed, real, rtol=0, atol=1e-5)


def test_an_interrupted_calibration_is_dropped_and_the_scheduler_given_back(sd_pipe, caplog):
    def stop(pipe, i, t, kwargs):
        if i == 3:
            raise KeyboardInterrupt
        return kwargs

    stock = run(sd_pipe, steps=STEPS)
    with apply_reuse(sd_pipe, budget=0.9) as handle:
        with pytest.raises(KeyboardInterrupt):
            run(sd_pipe, steps=STEPS, callback_on_step_end=stop)
        assert np.array_equal(run(sd_pipe, steps=STEPS), stock)  # calibrates again, from the start
        assert any("recording is dropped" in r.getMessage() for r in caplog.records)
        run(sd_pipe, steps=STEPS)
        assert handle.stats()["plan_source"] == "planned here at first use"
    assert "step" not in vars(sd_pipe.scheduler)


def test_a_stochastic_sampler_calibrates_without_drawing_from_the_users_generator(sd_pipe):
    from diffusers import EulerAncestralDiscreteScheduler

    sd_pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(sd_pipe.scheduler.config)

    def state_after(patched: bool):
        generator = torch.Generator().manual_seed(0)
        if patched:
            with apply_reuse(sd_pipe, budget=0.7):
                sd_pipe("a red circle", num_inference_steps=STEPS, generator=generator, output_type="latent")
        else:
            sd_pipe("a red circle", num_inference_steps=STEPS, generator=generator, output_type="latent")
        return generator.get_state()

    assert torch.equal(state_after(True), state_after(False))


@pytest.mark.parametrize("call, message", [
    (lambda p: apply_reuse(p, "hurry:6:2", budget=0.9), "not both"),
    (lambda p: apply_reuse(p, budget=1.5), "more than the full sampler"),
    (lambda p: apply_reuse(p, budget=0.9, target_psnr=40), "one goal"),
    (lambda p: apply_reuse(p, calibration=2), "one goal"),
    (lambda p: apply_reuse(p, budget=0.9, calibration=0), "calibration must be"),
    (lambda p: apply_reuse(p, target_psnr=float("nan")), "target_psnr must be a positive number"),
    (lambda p: apply_reuse(p.unet, budget=0.9), "needs a diffusers pipeline"),
])
def test_a_goal_that_cannot_be_planned_is_refused_in_one_line(sd_pipe, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(sd_pipe)
    assert not hasattr(sd_pipe.unet, "_attnreuse_handle") or sd_pipe.unet._attnreuse_handle is None


def test_a_budget_no_plan_meets_keeps_the_full_sampler_and_says_why(sd_pipe, caplog):
    stock = run(sd_pipe, steps=STEPS)
    with apply_reuse(sd_pipe, budget=0.01) as handle:  # one computed call of ten costs more than 1% of the full one
        run(sd_pipe, steps=STEPS)
        assert np.array_equal(run(sd_pipe, steps=STEPS), stock)
        assert handle.stats()["plan_source"].startswith("none: budget=0.01 is below the cheapest plan")
    assert sum("keeps the full sampler" in r.getMessage() for r in caplog.records) == 1


def test_a_second_order_sampler_is_planned_per_call(sd_pipe):
    """Heun calls the model twice a step and steps the scheduler after each call: one recorded step per call."""
    use_sampler(sd_pipe, "heun")
    stock = run(sd_pipe, steps=4)
    with apply_reuse(sd_pipe, target_psnr=20) as handle:
        assert np.array_equal(run(sd_pipe, steps=4), stock)
        run(sd_pipe, steps=4)
        stats = handle.stats()
    assert stats["plan_source"] == "planned here at first use" and len(stats["plan"].split()[-1]) == 7


def test_the_cache_follows_how_far_a_plan_carries(sd_pipe):
    """Another resolution reuses the plan (it carried within 1 dB, RESULTS.md §9); another step count does not."""
    with apply_reuse(sd_pipe, budget=0.9) as handle:
        run(sd_pipe, steps=STEPS)
        calls = Calls(sd_pipe)
        run(sd_pipe, steps=STEPS, height=128, width=128)
        assert handle.stats()["plan_source"] == "planned here at first use" and calls.count < STEPS
        run(sd_pipe, steps=STEPS + 2)
        assert handle.stats()["plan_source"].startswith("calibrating")


@pytest.mark.parametrize("arch", ["tiny-flux", "tiny-sd3"])
def test_first_use_plans_flow_matching_transformers(arch):
    """Recording at the scheduler needs nothing of the model's family: Flux (packed latents) and SD3 calibrate on
    their stock image and are planned after."""
    from attnreuse.pipelines.tiny import build_pipeline

    pipe = build_pipeline(arch, seed=0)
    stock = run(pipe, steps=STEPS)
    with apply_reuse(pipe, target_psnr=30) as handle:
        assert np.array_equal(run(pipe, steps=STEPS), stock)
        run(pipe, steps=STEPS)
        stats = handle.stats()
    assert stats["plan_source"] == "planned here at first use" and stats["predicted_latent_psnr_db"] >= 30
