"""What users of caches ask for, with plans, on UNet and transformer pipelines: LoRA loaded before or after apply,
ControlNet pipelines, batches of different prompts, and torch.compile(fullgraph=True)."""

import numpy as np
import pytest
import torch
from PIL import ImageOps

from attnreuse import Plan, Unit, apply_reuse
from attnreuse.layers import denoiser
from attnreuse.pipelines.tiny import build_pipeline, control_image, example_call

STEPS = 6
pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")  # diffusers' own ControlNet


def plan_for(pipe) -> Plan:
    """Attention-map reuse with the structural unit of the denoiser: the UNet's branch, or transformer blocks."""
    units = {"attention": Unit("attention", "110101")}
    if hasattr(pipe, "unet"):
        units["branch"] = Unit("branch", "100100", depths=[1] * STEPS)
    else:
        units["blocks"] = Unit("blocks", "100100", layers=[_last_block(pipe)])
    return Plan(units)


def _last_block(pipe) -> str:
    from attnreuse.units import transformer_blocks

    return transformer_blocks(denoiser(pipe))[-1]


def run(arch, pipe, prompts="a red circle", seeds=(0,), **overrides):
    generator = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs = dict(example_call(arch, STEPS), **overrides)
    return pipe(prompts, generator=generator, output_type="np", **kwargs).images


def _lora_file(arch, directory) -> str:
    """A LoRA with random weights on the attention projections of `arch`'s denoiser, saved as diffusers saves one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build_pipeline(arch)
    model = denoiser(pipe)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = get_peft_model_state_dict(model)
    key = "unet_lora_layers" if hasattr(pipe, "unet") else "transformer_lora_layers"
    type(pipe).save_lora_weights(str(directory), **{key: layers})
    return str(directory)


@pytest.mark.parametrize("arch", ["tiny-sd", "tiny-flux"])
def test_lora_loaded_before_or_after_apply_gives_the_same_images(arch, tmp_path):
    """A LoRA changes the images under a plan as it does without one, whether it is loaded before apply or after;
    an all-compute plan on the LoRA pipeline is bit-identical to it; remove() leaves the LoRA in place."""
    lora = _lora_file(arch, tmp_path)
    before, after = build_pipeline(arch), build_pipeline(arch)
    plan, full = plan_for(before), Plan({"attention": Unit("attention", "1" * STEPS)})
    without_lora = run(arch, before)
    with apply_reuse(before, plan):
        planned_without_lora = run(arch, before)
    before.load_lora_weights(lora)
    with_lora = run(arch, before)
    with apply_reuse(before, full):
        np.testing.assert_array_equal(run(arch, before), with_lora)
    with apply_reuse(before, plan):
        planned_before = run(arch, before)
    handle = apply_reuse(after, plan)
    after.load_lora_weights(lora)
    planned_after = run(arch, after)
    handle.remove()
    np.testing.assert_array_equal(planned_after, planned_before)
    np.testing.assert_array_equal(run(arch, after), with_lora)  # removed: the LoRA pipeline as it was
    assert np.abs(with_lora - without_lora).max() > 1e-3  # the LoRA changes the image...
    assert np.abs(planned_before - planned_without_lora).max() > 1e-3  # ...and still does under the plan


@pytest.mark.parametrize("arch", ["tiny-sd-controlnet", "tiny-flux-controlnet"])
def test_controlnet_pipelines_take_plans(arch):
    """The control image still steers a planned generation; all-compute is bit-identical; two runs agree. (The
    ControlNet model itself is not patched: a plan reuses the denoiser's work.)"""
    pipe = build_pipeline(arch)
    plain = run(arch, pipe)
    key = "control_image" if "flux" in arch else "image"
    other = ImageOps.invert(control_image(example_call(arch)["height"]))
    with apply_reuse(pipe, Plan({"attention": Unit("attention", "1" * STEPS)})):
        np.testing.assert_array_equal(run(arch, pipe), plain)
    with apply_reuse(pipe, plan_for(pipe)):
        planned, again = run(arch, pipe), run(arch, pipe)
        steered = run(arch, pipe, **{key: other})
    np.testing.assert_array_equal(planned, again)
    assert np.abs(planned - plain).max() > 1e-6
    assert np.abs(steered - planned).max() > 1e-5  # a different control image, a different planned image


@pytest.mark.parametrize("arch", ["tiny-sd", "tiny-pixart", "tiny-sd3", "tiny-flux"])
def test_each_image_of_a_batch_equals_what_it_gets_alone(arch):
    """A batch of different prompts under a plan: image i equals prompt i run alone with the same seed, as well as
    batching itself allows (the tolerance is what the plain pipeline's batched and single runs differ by)."""
    pipe, prompts = build_pipeline(arch), ["a red circle", "a blue square below a green triangle"]
    plain_batch = run(arch, pipe, prompts, (0, 1))
    plain_alone = [run(arch, pipe, p, (s,))[0] for s, p in enumerate(prompts)]
    rounding = max(np.abs(plain_batch[i] - plain_alone[i]).max() for i in range(2))
    with apply_reuse(pipe, plan_for(pipe)):
        batch = run(arch, pipe, prompts, (0, 1))
        alone = [run(arch, pipe, p, (s,))[0] for s, p in enumerate(prompts)]
    for i in range(2):
        np.testing.assert_allclose(batch[i], alone[i], rtol=0, atol=max(rounding * 4, 1e-5))
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # the prompts did not contaminate each other into one


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-sd", "tiny-flux"])
def test_fullgraph_compile_of_a_static_plan_has_one_graph_per_kind_of_call(arch):
    """Compiled with fullgraph=True (no graph break allowed), then the plan applied: the images of eager mode, one
    graph per kind of call, no recompilation in a second generation."""
    from torch._dynamo.utils import counters

    pipe = build_pipeline(arch)
    plan, name = plan_for(pipe), "unet" if hasattr(pipe, "unet") else "transformer"
    with apply_reuse(pipe, plan) as handle:
        eager = run(arch, pipe)
        kinds = len(set(handle.tracker.resolve(handle.plan)[0]))
    model = getattr(pipe, name)
    torch._dynamo.reset()
    counters.clear()
    setattr(pipe, name, torch.compile(model, fullgraph=True, backend="eager"))
    try:
        with apply_reuse(pipe, plan):
            first = run(arch, pipe)
            graphs = counters["stats"]["unique_graphs"]
            second = run(arch, pipe)
    finally:
        setattr(pipe, name, model)
        torch._dynamo.reset()
    np.testing.assert_allclose(first, eager, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(second, first)
    assert graphs == counters["stats"]["unique_graphs"] == kinds
