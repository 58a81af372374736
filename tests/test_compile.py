"""torch.compile: one graph per kind of call, and no recompilation per generation under a budget."""

import numpy as np
import pytest
import torch
from helpers import run

from attnreuse import Schedule, apply_attention_reuse

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("order", ["compile after apply", "apply after compile"])
def test_compiled_unet_matches_eager_with_one_graph_per_kind_of_call(sd_pipe, order):
    from torch._dynamo.utils import counters

    schedule = Schedule("110100")
    with apply_attention_reuse(sd_pipe, schedule):
        eager = run(sd_pipe)
    torch._dynamo.reset()
    counters.clear()
    unet = sd_pipe.unet
    if order == "compile after apply":
        handle = apply_attention_reuse(sd_pipe, schedule)
        sd_pipe.unet = torch.compile(unet, backend="aot_eager")
    else:  # dynamo's own backend: traced and guarded the same way, faster to build
        sd_pipe.unet = torch.compile(unet, backend="eager")
        handle = apply_attention_reuse(sd_pipe, schedule)
    try:
        images = [run(sd_pipe) for _ in range(2)]
        assert handle.stats()["generations"] == 2
    finally:
        handle.remove()
        sd_pipe.unet = unet
        torch._dynamo.reset()
    for image in images:
        np.testing.assert_allclose(image, eager, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3  # compute, store, reuse: a store after a reuse run is no other


def test_compiled_unet_under_a_budget_does_not_recompile_per_generation(sd_pipe):
    """The layers' choices under max_cache_bytes are read inside the compiled graph: the first store (which makes
    the choices) and the later ones (which find them) are two graphs, and no later generation compiles again."""
    from torch._dynamo.utils import counters

    schedule = Schedule("110100")
    with apply_attention_reuse(sd_pipe, schedule) as handle:
        run(sd_pipe)
        budget = handle.stats()["peak_cache_bytes"] * 2 // 3
    with apply_attention_reuse(sd_pipe, schedule, max_cache_bytes=budget):
        eager = run(sd_pipe)
    torch._dynamo.reset()
    counters.clear()
    unet = sd_pipe.unet
    handle = apply_attention_reuse(sd_pipe, schedule, max_cache_bytes=budget)
    sd_pipe.unet = torch.compile(unet, backend="eager")
    graphs = []
    try:
        for _ in range(4):
            np.testing.assert_allclose(run(sd_pipe), eager, atol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
        assert handle.stats()["peak_cache_bytes"] <= budget
    finally:
        handle.remove()
        sd_pipe.unet = unet
        torch._dynamo.reset()
    assert graphs == [4, 4, 4, 4]  # compute, reuse, a store that chooses and a store that keeps the choices
