"""Transformer denoisers (PixArt, SD3, Flux pipelines; Wan as a model): schedules and plans on whole pipelines, and
block and call reuse against semantics written out here."""

import inspect

import numpy as np
import pytest
import torch

from attnreuse import Plan, Schedule, Unit, apply_reuse
from attnreuse.pipelines.tiny import build_denoiser, build_pipeline, example_call
from attnreuse.units import transformer_blocks

PIPELINES = ["tiny-pixart", "tiny-sd3", "tiny-flux"]
MODELS = PIPELINES + ["tiny-wan"]
STEPS = 6


@pytest.fixture(scope="module", params=PIPELINES)
def dit_pipe(request):
    return request.param, build_pipeline(request.param)


def run(arch, pipe, prompt="a red circle", seed=0):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np",
                **example_call(arch, STEPS)).images


def _processors(model):
    return {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}


def test_all_compute_is_bit_identical_and_remove_restores_the_model(dit_pipe):
    arch, pipe = dit_pipe
    model = pipe.transformer
    processors, forwards = _processors(model), {n: m.forward for n, m in model.named_modules()}
    plain = run(arch, pipe)
    everything = Plan({"attention": Unit("attention", "1" * STEPS), "blocks": Unit("blocks", "1" * STEPS),
                       "call": Unit("call", "1" * STEPS)})
    for schedule in (Schedule("1" * STEPS), everything):
        with apply_reuse(pipe, schedule):
            np.testing.assert_array_equal(run(arch, pipe), plain)
    assert all(_processors(model)[n] is p for n, p in processors.items())
    assert all(m.forward == forwards[n] and "forward" not in vars(m) for n, m in model.named_modules())


@pytest.mark.parametrize("mode", ["map", "qk", "output"])
def test_each_mode_reuses_and_two_generations_agree(dit_pipe, mode):
    arch, pipe = dit_pipe
    plain = run(arch, pipe)
    with apply_reuse(pipe, Schedule("110100"), mode=mode) as handle:
        first, second = run(arch, pipe), run(arch, pipe)
        stats = handle.stats()
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - plain).max() > 1e-6  # reuse changed the image
    assert stats["generations"] == 2 and all(layer["reused"] > 0 for layer in stats["layers"].values())


def _streams(block) -> tuple:
    """The inputs a block's outputs are the residuals of, written out per block class."""
    joint = type(block).__name__ in ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
    return ("encoder_hidden_states", "hidden_states") if joint else ("hidden_states",)


def _inputs_of(block, args, kwargs) -> tuple:
    bound = inspect.signature(type(block).forward).bind(block, *args, **kwargs).arguments
    return tuple(bound[name] for name in _streams(block))


def _outputs(block, out) -> tuple:
    return out if len(_streams(block)) > 1 else (out,)


def block_residuals(model, inputs, names) -> dict:
    """Each named block's output minus its input, per stream, in one plain call."""
    kept, hooks = {}, []
    for name in names:
        block = model.get_submodule(name)

        def hook(module, args, kwargs, out, name=name):
            kept[name] = tuple(None if o is None else o - i
                               for o, i in zip(_outputs(module, out), _inputs_of(module, args, kwargs)))
        hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return kept


def with_residuals(model, inputs, residuals: dict):
    """One call in which each block of `residuals` returns its fresh input plus the given residual."""
    for name, residual in residuals.items():
        block = model.get_submodule(name)

        def forward(*args, block=block, residual=residual, **kwargs):
            added = tuple(None if r is None else r + i for r, i in zip(residual, _inputs_of(block, args, kwargs)))
            return added if len(added) > 1 else added[0]
        block.forward = forward
    try:
        with torch.no_grad():
            return model(**inputs)[0]
    finally:
        for name in residuals:
            del model.get_submodule(name).forward


@pytest.mark.parametrize("arch", MODELS)
def test_block_reuse_adds_each_blocks_kept_residual_to_its_fresh_input(arch):
    """A blocks unit's reuse call: every reused block returns its input plus the residual (output minus input, per
    stream for SD3 and Flux blocks) of its last compute call; the other blocks compute."""
    model, inputs = build_denoiser(arch, batch=2)
    blocks = transformer_blocks(model)
    reused = blocks[len(blocks) // 2:]
    later = {k: v + 0.05 * torch.randn_like(v) if k in ("hidden_states", "sample") else v for k, v in inputs.items()}
    plan = Plan({"blocks": Unit("blocks", "10", layers=reused)})
    with torch.no_grad(), apply_reuse(model, plan) as handle, handle.generation():
        model(**inputs)
        patched = model(**later)[0]
    expected = with_residuals(model, later, block_residuals(model, inputs, reused))
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (patched - model(**later)[0]).abs().max() > 1e-4  # not a fresh computation


def test_call_residual_reuse_adds_the_kept_residual_and_needs_matching_shapes():
    """mode="residual": a reused call returns its fresh input plus the last computed call's output minus input;
    a model whose output is not shaped as its input (PixArt's learned variance) is told to use mode "output"."""
    model, inputs = build_denoiser("tiny-flux", batch=2)
    later = dict(inputs, hidden_states=inputs["hidden_states"] + 0.05)
    plan = Plan({"call": Unit("call", "10", mode="residual")})
    with torch.no_grad():
        first = model(**inputs)[0]
        with apply_reuse(model, plan) as handle, handle.generation():
            model(**inputs)
            reused = model(**later)[0]
    torch.testing.assert_close(reused, first - inputs["hidden_states"] + later["hidden_states"])
    pixart, pixart_inputs = build_denoiser("tiny-pixart", batch=2)
    with pytest.raises(ValueError, match="no residual to reuse; give the plan's call unit mode 'output'"):
        with torch.no_grad(), apply_reuse(pixart, plan) as handle, handle.generation():
            pixart(**pixart_inputs)


@pytest.mark.parametrize("arch", ["tiny-wan"])
def test_a_video_transformer_takes_every_mode(arch):
    """Wan: self-attention with rotary embeddings and cross-attention to the text, at model level."""
    model, inputs = build_denoiser(arch, batch=2)
    with torch.no_grad():
        plain = [model(**inputs)[0] for _ in range(3)]
        for mode in ("map", "qk", "output"):
            with apply_reuse(model, Schedule("100"), mode=mode) as handle, handle.generation():
                out = [model(**dict(inputs, timestep=inputs["timestep"] * (1 - c / 4)))[0] for c in range(3)]
                kinds = handle.layout.attention
            torch.testing.assert_close(out[0], plain[0], rtol=1e-4, atol=1e-5)
            assert set(kinds.values()) == {"self", "cross"}
