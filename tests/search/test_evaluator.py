"""The paper's utility evaluated with shared prefixes: exactly what full pipeline runs give; resumable."""

import math

import numpy as np
import pytest
import torch

from attnreuse import Schedule, apply_attention_reuse
from attnreuse.pipelines.sampling import GenerationSetup
from attnreuse.search import Evaluator, bit_flips

PROMPTS, SEEDS = ["a red circle", "a blue square", "a green triangle"], [0, 1, 2]


def _pipeline_images(pipe, schedule=None, steps=6, guidance=7.5):
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np")
    if schedule is None:
        return pipe(PROMPTS, **kwargs).images
    with apply_attention_reuse(pipe, schedule):
        return pipe(PROMPTS, **kwargs).images


def _psnr(images, references):  # the paper's utility, written out: mean per-image PSNR
    return float(np.mean([10 * math.log10(1 / np.mean((a.astype(np.float64) - b) ** 2))
                          for a, b in zip(images, references)]))


def test_prefix_shared_evaluation_equals_full_pipeline_runs(sd_pipe):
    """The evaluator's references are the pipeline's images, and each utility is exactly the PSNR of what the
    pipeline with that schedule generates, although candidates resume from shared states."""
    evaluator = Evaluator(GenerationSetup(sd_pipe, PROMPTS, SEEDS, 6, 7.5))
    np.testing.assert_array_equal(evaluator.references, _pipeline_images(sd_pipe))
    candidates = bit_flips(Schedule.hurry(6, 2).bits)
    utilities = evaluator(candidates)
    assert evaluator.calls < evaluator.naive_calls == 6 * len(candidates)
    for schedule, utility in zip(candidates[:3], utilities[:3]):
        assert utility == _psnr(_pipeline_images(sd_pipe, Schedule(schedule)), evaluator.references)
    alone = Evaluator(GenerationSetup(sd_pipe, PROMPTS, SEEDS, 6, 7.5))  # one at a time, reversed: other branch points
    assert [alone([c])[0] for c in reversed(candidates)] == utilities[::-1]


def test_a_pixart_pipelines_references_are_its_own_images():
    """The evaluator steps a PixArt pipeline's loop itself (one timestep per image, the noise half of its
    learned-sigma output): its references are exactly the pipeline's images."""
    from attnreuse.pipelines.tiny import build_pipeline, example_call

    pipe = build_pipeline("tiny-pixart")
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    images = pipe(PROMPTS, guidance_scale=4.5, generator=generators, output_type="np",
                  **example_call("tiny-pixart", 6)).images
    evaluator = Evaluator(GenerationSetup(pipe, PROMPTS, SEEDS, 6, 4.5))
    np.testing.assert_array_equal(evaluator.references, images)


def test_search_resumes_from_its_state_file(sd_pipe, tmp_path):
    state = tmp_path / "state.json"
    first = Evaluator(GenerationSetup(sd_pipe, PROMPTS, SEEDS, 5, 7.5), state_file=state)
    done = first(bit_flips(Schedule.hurry(5, 2).bits)[:3])
    again = Evaluator(GenerationSetup(sd_pipe, PROMPTS, SEEDS, 5, 7.5), state_file=state)
    assert again(bit_flips(Schedule.hurry(5, 2).bits)[:3]) == done and again.calls == first.calls
    with pytest.raises(ValueError, match="another search setup"):
        Evaluator(GenerationSetup(sd_pipe, PROMPTS, SEEDS, 5, 3.0), state_file=state)
    with pytest.raises(ValueError, match="has 4 entries; this search runs 5 steps"):
        again([Schedule("1100")])
