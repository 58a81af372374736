"""The planner: its latency model, its space of candidates, the dynamic program, and a whole search."""

import itertools

import numpy as np
import pytest

from attnreuse import apply_reuse
from attnreuse.pipelines.sampling import GenerationSetup
from attnreuse.pipelines.tiny import build_pipeline
from attnreuse.refresh import refresh_program, refresh_sources
from attnreuse.search import Candidate, LatencyModel, Levels, search_plan
from attnreuse.search.latency import kind_plan, profile
from attnreuse.search.space import fit, neighbours, seeds
from attnreuse.state import REUSE, STORE

TOP = 5  # tiny-sd: 4 up layers, so levels 0 (compute), 1-4 (the branch), 5 (the whole call)
MODEL = LatencyModel(TOP + 1, {0: {"compute": 1.0, "store": 1.1, "reuse": 0.8}, 1: {"compute": 0.9, "reuse": 0.7},
                               2: {"compute": 0.8, "reuse": 0.6}, 3: {"compute": 0.6, "reuse": 0.5},
                               4: {"compute": 0.3, "reuse": 0.25}, 5: {"compute": 0.0}}, fixed=1.0)
ALLOWED = list(range(TOP + 1))
STRUCTURE = Levels(TOP)


@pytest.mark.parametrize("level", range(TOP + 1))
@pytest.mark.parametrize("attention", ["compute", "store", "reuse"])
def test_each_kind_plan_makes_call_one_the_kind_it_names(sd_pipe, level, attention):
    if level == TOP and attention != "compute":
        return
    plan = kind_plan(level, STRUCTURE, attention, "output")
    with apply_reuse(sd_pipe, plan) as handle:
        call = handle.tracker.resolve(plan)[0][1]
        layers, modules = len(handle.cache.layers), handle.layout.modules
    if level == TOP:
        assert call[-1] == REUSE
    elif level > 0:
        assert {a.run for a in call[layers:-1]} == {"compute", "skip"} and len(modules) > 0
    fresh = [a for a in call[:layers] if a != "skip"]
    expected = {"compute": {"compute"}, "store": {STORE}, "reuse": {REUSE}}[attention]
    assert level == TOP or set(fresh) == expected


def test_predictions_order_plans_by_what_they_skip():
    n = 10
    full = Candidate((0,) * n, (1,) * n, structure=STRUCTURE)
    assert full.cost(MODEL) == pytest.approx(1.0)
    deeper = [Candidate((0,) + (lv,) * (n - 1), (1,) * n, structure=STRUCTURE).cost(MODEL) for lv in range(1, TOP + 1)]
    assert deeper == sorted(deeper, reverse=True) and deeper[-1] == pytest.approx(2 / (n + 1))  # fixed + call 0
    reused = Candidate((0,) * n, (1,) * 5 + (0,) * 5, structure=STRUCTURE)
    assert reused.attention_actions()[4] == "store" and reused.cost(MODEL) < 1.0


def test_a_candidate_is_a_plan_of_its_levels(sd_pipe):
    candidate = Candidate((0, 2, 5, 0, 4, 5), (1, 1, 0, 0, 1, 1), "map", STRUCTURE)
    assert candidate.attention == (1, 1, 1, 0, 1, 1)  # attention bits do not matter at whole-call reuse
    plan = candidate.plan()
    assert plan.units["branch"].bits == (1, 0, 1, 1, 0, 1) and plan.units["branch"].depths[1] == TOP - 2
    assert plan.units["call"].bits == (1, 1, 0, 1, 1, 0) and plan.units["attention"].mode == "map"
    lean = Candidate((0, 5, 0, 5), (1, 1, 1, 1), structure=STRUCTURE).plan(complete=False)
    assert set(lean.units) == {"call"}  # no wrapper where a unit reuses nothing
    with apply_reuse(sd_pipe, plan):
        pass


def test_seeds_fit_the_budget_and_moves_stay_within_it():
    budget = 0.5
    found = seeds(12, STRUCTURE, ALLOWED, MODEL, budget)
    assert found and all(c.cost(MODEL) <= budget for c in found)
    assert any(set(c.levels) == {0, TOP} for c in found)  # step-reduction-like whole-call reuse
    assert any(set(c.levels) == {0, 4} for c in found)  # DeepCache at the deepest branch
    start = max(found, key=lambda c: sum(lv == 0 for lv in c.levels))
    moves = neighbours(start, MODEL, budget, ALLOWED, limit=50, seed=1)
    assert 0 < len(moves) <= 50 and all(m.cost(MODEL) <= budget and m.key() != start.key() for m in moves)
    assert fit(Candidate((0,) * 12, (1,) * 12, structure=STRUCTURE), MODEL, budget, ALLOWED).cost(MODEL) <= budget
    assert fit(Candidate((0,) * 12, (1,) * 12, structure=STRUCTURE), MODEL, 0.01, ALLOWED) is None


def test_the_refresh_program_finds_the_cheapest_refreshes():
    rng = np.random.default_rng(0)
    n = 8
    errors = [[0.0] * (n + 1) for _ in range(n)]
    for i in range(n):
        for j in range(i + 2, n + 1):
            errors[i][j] = float(rng.random() * (j - i) ** 2)
    for keys in (1, 2, 3, 4):
        chosen = refresh_program(errors, keys)

        def total(keep):
            return sum(errors[a][b] for a, b in zip(keep, keep[1:] + (n,)))

        best = min(((0,) + rest for k in range(keys) for rest in itertools.combinations(range(1, n), k)), key=total)
        assert chosen[0] == 0 and len(chosen) <= keys and total(chosen) == pytest.approx(total(best))


@pytest.mark.slow
def test_a_search_fits_its_budget_beats_its_seeds_and_resumes(tmp_path):
    pipe = build_pipeline("tiny-sd", seed=0)
    setup = GenerationSetup(pipe, ["a red circle", "a blue square"], None, 6, 7.5)
    latency = profile(setup, STRUCTURE, repeats=1)
    state = tmp_path / "state.json"
    options = dict(progress=False, time_limit=10_000, sweeps=2, limit=12, measure=False)  # bounded by sweeps, not time
    plan = search_plan(setup, 0.6, state, latency=latency, **options)
    meta = plan.meta
    assert meta["predicted_latency"] <= 0.6
    assert meta["psnr_db"] >= max(meta["best_seed_psnr_db"], meta["best_dp_psnr_db"])
    assert meta["budget"] == 0.6 and meta["prompts"] == setup.prompts and len(plan.timesteps) == 6
    with apply_reuse(pipe, plan):
        setup.generate()
    again = search_plan(setup, 0.6, state, **options)  # resumed: the profile and the utilities are read back
    assert again.units == plan.units and again.meta["latency_model"] == meta["latency_model"]


@pytest.mark.slow
def test_the_plan_command_spread_over_two_processes_finds_the_same_plan(tmp_path):
    """Candidates scored by two processes (torchrun, gloo on CPU), the profile broadcast from the first: the same
    plan as one process with that profile."""
    import os
    import subprocess
    import sys

    from attnreuse import Plan

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    args = ["-m", "attnreuse", "plan", "--model", "tiny-sd", "--prompts", str(tmp_path / "prompts.txt"),
            "--calibration", "2", "--steps", "4", "--budget", "0.6", "--effort", "full", "--sweeps", "1",
            "--no-measure", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.json")], check=True, env=env,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    done = subprocess.run([*torchrun, *args, "--profile", str(tmp_path / "one.json"), "--out",
                           str(tmp_path / "two.json")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = Plan.from_json(tmp_path / "one.json"), Plan.from_json(tmp_path / "two.json")
    assert two.units == one.units and two.meta["psnr_db"] == pytest.approx(one.meta["psnr_db"])


def test_shipped_plans_are_found_for_the_setup_they_were_searched_for():
    """The default model's plans are read, not searched again, by `plan:B` with the 8 calibration captions, in any
    checkout: the model is named by its place in the package."""
    from attnreuse import Plan
    from attnreuse.default_model import DEFAULT_GUIDANCE, load_default_pipeline
    from attnreuse.default_model.splits import CALIBRATION, captions
    from attnreuse.pipelines.sampling import use_sampler
    from attnreuse.search import cached_plan, shipped_plan
    from attnreuse.search.store import SHIPPED

    pipe = load_default_pipeline()
    for path in SHIPPED.glob("*.json"):
        plan = Plan.from_json(path)
        assert plan.meta["model"] == "attnreuse:default_model/weights"
        assert len(plan) == plan.meta["num_inference_steps"] == len(plan.timesteps) == 20
        assert plan.meta["predicted_latency"] <= plan.meta["budget"]
    use_sampler(pipe, "ddim")
    setup = GenerationSetup(pipe, captions(8, CALIBRATION), None, 20, DEFAULT_GUIDANCE)
    assert cached_plan(setup, 0.5) == shipped_plan("ddim", 0.5)


def test_each_call_uses_the_last_refresh_before_it():
    assert refresh_sources(6, (0, 2, 5)) == [0, 0, 2, 2, 2, 5]
    assert refresh_sources(3, (0, 1, 2)) == [0, 1, 2]
