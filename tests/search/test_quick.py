"""The quick planner: its replay is the sampler's own arithmetic, its table programs plans that fit the budget, and
a whole quick plan costs a few runs of the calibration set."""

import pytest
import torch

from attnreuse import Plan, Unit, apply_reuse
from attnreuse.pipelines.sampling import GenerationSetup, use_sampler
from attnreuse.search import Evaluator, LatencyModel, quick_plan
from attnreuse.search.quick import error_table, predicted_psnr, refresh_count, replay

STEPS = 6
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(params=["ddim", "dpm++"])
def evaluator(sd_pipe, request):
    use_sampler(sd_pipe, request.param)
    yield Evaluator(GenerationSetup(sd_pipe, PROMPTS, [0, 1], STEPS, 7.5), record=True)
    use_sampler(sd_pipe, "ddim")


def test_replaying_the_recorded_outputs_gives_the_reference_exactly(evaluator):
    final = evaluator.reference.states[-1][0]
    assert len(evaluator.reference.outputs) == STEPS
    assert torch.equal(replay(evaluator, -1, 0, 0), final)
    assert torch.equal(replay(evaluator, 2, 2, 3), final)  # an empty segment changes nothing


@pytest.mark.parametrize("mode", ["output", "residual"])
def test_a_replayed_tail_is_the_real_plan_that_reuses_the_whole_call(evaluator, mode):
    """Reusing call i's output (or residual) at every later call is what the engine's call unit does; there the
    replay's frozen outputs are exact, so it must equal the real run."""
    for i in (1, 3):
        bits = [1] * (i + 1) + [0] * (STEPS - i - 1)
        real = evaluator.trajectory(Plan({"call": Unit("call", bits, mode)}))[-1]
        torch.testing.assert_close(replay(evaluator, i, i, STEPS, residual=mode == "residual"), real,
                                   rtol=1e-5, atol=1e-6)


def test_a_plans_predicted_psnr_is_its_replay(evaluator):
    """Every call computed: the reference itself; a plan reusing one tail: the PSNR of that tail's replay."""
    assert predicted_psnr(evaluator, tuple(range(STEPS)), False) == float("inf")
    final = evaluator.reference.states[-1][0]
    tail = replay(evaluator, 2, 2, STEPS)
    expected = 10 * torch.log10((final.max() - final.min()) ** 2 / torch.mean((tail - final) ** 2)).item()
    assert predicted_psnr(evaluator, (0, 1, 2), False) == pytest.approx(expected, rel=1e-5)


def test_the_error_table_grows_with_the_segment(evaluator):
    errors = error_table(evaluator)
    assert all(errors[i][i + 1] == 0.0 for i in range(STEPS - 1))
    assert all(errors[i][STEPS] > 0 for i in range(STEPS - 1))
    assert errors[0][STEPS] >= errors[0][3]


def test_the_refresh_count_is_the_most_that_fits():
    latency = LatencyModel(2, {0: {"compute": 1.0}, 1: {"compute": 0.0}}, fixed=2.0)
    assert refresh_count(latency, 10, 0.5, 1) == 4  # (2 + 4) / 12 = 0.5; five would be 7 / 12
    with pytest.raises(ValueError, match="below the cheapest plan's predicted latency"):
        refresh_count(latency, 10, 0.1, 1)


def test_a_quick_plan_fits_its_budget_for_a_few_runs(sd_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path))
    setup = GenerationSetup(sd_pipe, PROMPTS, [0, 1], STEPS, 7.5)
    plan = quick_plan(setup, 0.6, progress=False, measure=False)
    meta = plan.meta
    assert set(plan.units) == {"call"} and 0 < sum(plan.units["call"].bits) < STEPS
    assert meta["predicted_latency"] <= 0.6 and meta["strategy"] == "quick planner"
    assert meta["full_runs"] == meta["denoiser_calls"] / STEPS <= 4  # a tiny run: the profile weighs more here
    assert meta["psnr_db"] == max(meta["candidate_psnr_db"])
    with apply_reuse(sd_pipe, plan) as handle:
        setup.generate()
        assert handle.stats()["generations"] == 1


def test_the_profile_is_timed_once_per_model_device_and_batch(sd_pipe, tmp_path, monkeypatch):
    """A second budget reads the reused call's timing from the cache; a damaged entry is timed anew."""
    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path))
    setup = GenerationSetup(sd_pipe, PROMPTS, [0, 1], STEPS, 7.5)
    first = quick_plan(setup, 0.6, progress=False, measure=False).meta
    second = quick_plan(setup, 0.8, progress=False, measure=False).meta
    assert not first["profile_cached"] and second["profile_cached"]
    assert second["denoiser_calls"] < first["denoiser_calls"] + 2  # no profile calls the second time
    (entry,) = (tmp_path / "profiles").glob("*.json")
    entry.write_text("{ damaged")
    assert not quick_plan(setup, 0.6, progress=False, measure=False).meta["profile_cached"]
    assert "latency" in entry.read_text()


def test_a_target_psnr_gets_the_fewest_refreshes_that_reach_it(sd_pipe, tmp_path, monkeypatch):
    from attnreuse.search.levels import Levels
    from attnreuse.search.quick import QuickSearch

    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path))
    setup = GenerationSetup(sd_pipe, PROMPTS, [0, 1], STEPS, 7.5)
    plan = quick_plan(setup, target_psnr=50.0, progress=False, measure=False)
    refreshes = plan.meta["refreshes"]
    assert refreshes > 1 and plan.meta["psnr_db"] >= 50.0 and sum(plan.units["call"].bits) == refreshes
    search = QuickSearch(setup, Evaluator(setup, record=True), Levels.of(sd_pipe.unet), LatencyModel.from_dict(
        plan.meta["latency_model"]))
    assert max(search.verified(refreshes - 1)[1]) < 50.0  # one refresh fewer does not reach it
    with pytest.raises(ValueError, match="a latency budget or a target PSNR"):
        quick_plan(setup, 0.5, target_psnr=30.0)
