"""Plans: the format, and every unit against semantics written out here (DeepCache's own code for the branch)."""

import json

import numpy as np
import pytest
import torch
from helpers import CallCounter, attention_modules, run

from attnreuse import Plan, Schedule, Unit, apply_reuse

PROMPTS = ["a red circle", "a blue square"]


def _images(pipe, steps=6, **kwargs):
    return run(pipe, PROMPTS, steps=steps, **kwargs)


def test_a_plan_round_trips_through_json_and_moves_between_samplers(tmp_path):
    plan = Plan({"attention": Unit("attention", "110100", "qk", ["up_blocks.*"]),
                 "branch": Unit("branch", "101010", depths=[1, 2, 3, 1, 2, 3]),
                 "call": Unit("call", "111110", "residual")}, meta={"strategy": "test"})
    plan = plan.at_timesteps([900, 750, 600, 450, 300, 150])
    path = tmp_path / "plan.json"
    plan.to_json(path)
    back = Plan.from_json(path)
    assert back == plan and json.loads(path.read_text())["format"] == "attnreuse-plan"
    moved = plan.for_timesteps([900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
    assert len(moved) == 10 and all(u.bits[0] == 1 for u in moved.units.values())
    assert moved.units["branch"].depths[:3] == (1, 2, 2) and moved.meta["moved_from"] == 6
    assert plan.expand(11, order=2).units["call"].bits == (1,) * 10 + (0,)


@pytest.mark.parametrize("data, message", [
    ({"format": "attnreuse-plan", "version": 2, "units": {}}, "plan version 2"),
    ({"format": "something else"}, "not a plan"),
    ({"format": "attnreuse-plan", "version": 1, "units": {}}, "at least one unit"),
    ({"format": "attnreuse-plan", "version": 1, "units": {"a": {"kind": "tree", "bits": "10"}}}, "kind must be"),
    ({"format": "attnreuse-plan", "version": 1, "units": {"a": {"kind": "call", "bits": "01"}}}, "must compute"),
    ({"format": "attnreuse-plan", "version": 1, "units": {"a": {"kind": "call", "bits": "10", "colour": 1}}},
     "unknown field"),
    ({"format": "attnreuse-plan", "version": 1, "units": {"b": {"kind": "branch", "bits": "10"}}}, "one depth per"),
    ({"format": "attnreuse-plan", "version": 1, "units": {"a": {"kind": "call", "bits": "10"},
                                                           "b": {"kind": "attention", "bits": "100"}}}, "one bit per"),
    ({"format": "attnreuse-plan", "version": 1, "units": {"a": {"kind": "call", "bits": "10", "mode": "map"}}},
     "mode must be one of"),
    ({"format": "attnreuse-plan", "version": 1, "units": {"a": {"kind": "attention", "bits": "10", "layers": []}}},
     r"unit 'a': a unit's layers \[\] select no layer"),
])
def test_a_bad_plan_file_names_the_file_and_the_field(tmp_path, data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises((ValueError, TypeError), match=message) as err:
        Plan.from_json(path)
    assert str(path) in str(err.value)


def test_moving_a_plan_to_no_timesteps_is_a_named_error():
    plan = Plan.hurry(4, 2).at_timesteps([900, 600, 300, 0])
    with pytest.raises(ValueError, match="for_timesteps needs at least one timestep"):
        plan.for_timesteps([])
    assert plan.for_timesteps([950, 10]).units["attention"].bits == (1, 0)


def test_an_all_compute_plan_of_every_unit_is_bit_identical(sd_pipe):
    reference = _images(sd_pipe)
    plan = Plan({"attention": Unit("attention", "111111"), "blocks": Unit("blocks", "111111"),
                 "branch": Unit("branch", "111111", depths=[1] * 6), "call": Unit("call", "111111")})
    with apply_reuse(sd_pipe, plan):
        np.testing.assert_array_equal(_images(sd_pipe), reference)


def test_a_schedule_and_its_plan_give_the_same_images(sd_pipe):
    """Every way of writing the paper's schedule is one plan: bits, a Schedule, Plan.attention and Plan.hurry."""
    with apply_reuse(sd_pipe, Schedule("111100")):
        expected = _images(sd_pipe)
    for same in ("111100", [1, 1, 1, 1, 0, 0], "hurry:6:2", Plan.attention("111100"), Plan.hurry(6, 2)):
        with apply_reuse(sd_pipe, same) as handle:
            np.testing.assert_array_equal(_images(sd_pipe), expected)
            assert handle.plan.units["attention"].bits == (1, 1, 1, 1, 0, 0)
    with apply_reuse(sd_pipe, "111100", mode="qk"):
        qk = _images(sd_pipe)
    with apply_reuse(sd_pipe, Plan.hurry(6, 2, mode="qk")):
        np.testing.assert_array_equal(_images(sd_pipe), qk)


def test_options_for_a_schedule_are_refused_with_a_plan(sd_pipe):
    """A Plan says its mode and layers in its units; apply's schedule options are refused, not ignored."""
    for option in ({"mode": "qk"}, {"layers": ["nothing.*"]}, {"attention": "self"}):
        name = next(iter(option))
        with pytest.raises(ValueError, match=f"{name}=.* applies to a schedule .* but this is a Plan"):
            apply_reuse(sd_pipe, Plan.hurry(6, 2), **option)
    assert not hasattr(sd_pipe.unet, "_attnreuse_handle")


@pytest.mark.parametrize("interval", [2, 3])
def test_the_branch_at_depth_one_is_deepcache(sd_pipe, interval):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    expected = _images(sd_pipe, steps=7)
    helper.disable()
    with apply_reuse(sd_pipe, Plan.deepcache(7, interval, depth=1)):
        np.testing.assert_array_equal(_images(sd_pipe, steps=7), expected)


def _recorded(pipe, module, plan, steps=4):
    """(inputs, outputs) of `module` at every call of one generation under `plan`."""
    seen = []
    hook = module.register_forward_hook(lambda m, a, k, out: seen.append(
        (a[0] if a else k["hidden_states"], out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
    with apply_reuse(pipe, plan):
        _images(pipe, steps=steps)
    hook.remove()
    return seen


@pytest.mark.parametrize("mode", ["output", "residual"])
def test_the_call_unit_reuses_the_output_or_the_residual(sd_pipe, mode):
    calls = []
    hook = sd_pipe.unet.register_forward_hook(lambda m, a, k, out: calls.append(
        (a[0] if a else k["sample"], out[0])), with_kwargs=True)
    q = CallCounter([(n, m.to_q) for n, m in attention_modules(sd_pipe)])
    with apply_reuse(sd_pipe, Plan({"call": Unit("call", "1001", mode)})):
        _images(sd_pipe, steps=4)
    hook.remove()
    (x0, out0), (x1, out1), (x2, out2), _ = calls
    for x, out in ((x1, out1), (x2, out2)):
        expected = out0 if mode == "output" else x + (out0 - x0)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert q.values() == {2}  # nothing inside the model ran at the reuse calls


def test_the_blocks_unit_adds_the_kept_residual_to_the_fresh_input(sd_pipe):
    name = "up_blocks.1.attentions.0"
    module = sd_pipe.unet.get_submodule(name)
    seen = _recorded(sd_pipe, module, Plan({"blocks": Unit("blocks", "1001", layers=[name])}))
    (x0, out0), (x1, out1), (x2, out2), (x3, out3) = seen
    for x, out in ((x1, out1), (x2, out2)):
        torch.testing.assert_close(out, x + (out0 - x0), rtol=0, atol=1e-6)
    other = _recorded(sd_pipe, module, Plan.all_compute(4))
    assert not torch.allclose(out1, other[1][1], atol=1e-4)  # the reuse did not recompute


def test_units_nest_and_attention_stores_for_its_next_active_call(sd_pipe):
    """The branch skips the deep attention layers at call 1; their lookahead looks past it: stored at call 2, reused
    at call 3. The shallow layers run at call 1 and reuse there the map of call 0."""
    plan = Plan({"branch": Unit("branch", "1011", depths=[1, 1, 1, 1]),
                 "attention": Unit("attention", "1010", "map")})
    with apply_reuse(sd_pipe, plan) as handle:
        _images(sd_pipe, steps=4)
        counts = handle.stats()["layers"]
    deep = [n for n in counts if n.startswith("down_blocks")]
    shallow = [n for n in counts if n.startswith("up_blocks.1.attentions.1")]
    assert deep and shallow
    assert all(counts[n]["skipped"] == 1 and counts[n]["reused"] == 1 and counts[n]["stored"] == 1 for n in deep)
    assert all(counts[n]["skipped"] == 0 and counts[n]["reused"] == 2 and counts[n]["stored"] == 2 for n in shallow)


def test_remove_restores_every_forward_and_processor_exactly(sd_pipe):
    unet = sd_pipe.unet
    before = {n: dict(vars(m)).get("forward") for n, m in unet.named_modules()}
    processors = dict(unet.attn_processors)
    reference = _images(sd_pipe)
    plan = Plan({"attention": Unit("attention", "110100"), "blocks": Unit("blocks", "101101"),
                 "branch": Unit("branch", "101011", depths=[2] * 6), "call": Unit("call", "111110")})
    with apply_reuse(sd_pipe, plan):
        changed = _images(sd_pipe)
    assert not np.array_equal(changed, reference)
    assert {n: dict(vars(m)).get("forward") for n, m in unet.named_modules()} == before
    after = unet.attn_processors
    assert all(after[k] is processors[k] for k in processors)
    np.testing.assert_array_equal(_images(sd_pipe), reference)


@pytest.mark.slow
def test_a_compiled_plan_compiles_one_graph_per_kind_of_call(sd_pipe):
    from torch._dynamo.utils import counters

    plan = Plan({"branch": Unit("branch", "100100", depths=[1] * 6), "attention": Unit("attention", "110111")})
    with apply_reuse(sd_pipe, plan) as handle:
        eager = _images(sd_pipe)
        kinds = len(set(handle.tracker.resolve(handle.plan)[0]))
    torch._dynamo.reset()
    counters.clear()
    unet = sd_pipe.unet
    handle = apply_reuse(sd_pipe, plan)
    sd_pipe.unet = torch.compile(unet, backend="eager")
    try:
        for _ in range(2):
            np.testing.assert_allclose(_images(sd_pipe), eager, atol=1e-5)
    finally:
        handle.remove()
        sd_pipe.unet = unet
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == kinds == 4


@pytest.mark.parametrize("plan, message", [
    (Plan({"branch": Unit("branch", "1010", depths=[9] * 4)}), "a branch depth runs 1 to 4 up layers"),
    (Plan({"attention": Unit("attention", "1010", layers=["nowhere.*"])}), "matches no attention layer"),
    (Plan({"a": Unit("attention", "1010", layers=["up_blocks.*"]), "b": Unit("attention", "1100")}),
     "belongs to 2 attention units"),
])
def test_a_plan_that_cannot_run_on_the_model_is_refused_at_apply(sd_pipe, plan, message):
    with pytest.raises(ValueError, match=message):
        apply_reuse(sd_pipe, plan)
    assert not hasattr(sd_pipe.unet, "_attnreuse_handle")


def test_a_branch_needs_a_unet(sd_pipe):
    from helpers import OneLayer

    with pytest.raises(ValueError, match="not a UNet whose branch can be reused"):
        apply_reuse(OneLayer(query_dim=8, heads=2, dim_head=4), Plan.deepcache(4, 2))


def test_a_plan_moves_between_the_flow_matching_and_the_discrete_timestep_scales():
    """A plan recorded on a flow-matching scheduler's 0-1 timesteps lands on 0-1000 ones where the same plan
    recorded at 1000x would, and the other way round; timesteps that do not overlap at all are refused."""
    bits = "1101001000"
    flow = Plan.attention(bits, timesteps=[1 - i / 10 for i in range(10)])
    discrete = Plan.attention(bits, timesteps=[1000 - 100 * i for i in range(10)])
    run = [999 - 111 * i for i in range(9)]
    assert flow.for_timesteps(run).units == discrete.for_timesteps(run).units
    assert discrete.for_timesteps([t / 1000 for t in run]).units == discrete.for_timesteps(run).units
    moved = flow.for_timesteps(run).units["attention"].bits
    assert 0 in moved  # before, every new timestep went to the nearest end: the first entry, computing throughout
    with pytest.raises(ValueError, match=r"do not overlap, so the plan cannot be placed"):
        discrete.for_timesteps([5000, 4000])
