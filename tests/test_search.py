"""Schedule search: PHAST and exhaustive search, prefix-shared evaluation, resume, JSON, the `search` command."""

import json
import math

import numpy as np
import pytest
import torch

from attnreuse import Schedule, apply_attention_reuse
from attnreuse.cli import main
from attnreuse.search import Evaluator, bit_flips, exhaustive, named_schedules, phast

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


def test_bit_flips_keep_the_reuse_count_and_the_first_step():
    flips = bit_flips((1, 1, 1, 0, 0))
    assert len(flips) == 2 * 2 and len(set(flips)) == 4
    assert all(f[0] == 1 and sum(f) == 3 for f in flips)


def test_phast_reaches_the_known_optimum_of_a_synthetic_utility():
    target = (1, 1, 0, 1, 0, 0, 1, 0, 1, 0)
    calls = []

    def utility(schedules):  # higher when closer to the target: the hill-climb must get there
        calls.append(len(schedules))
        return [-sum(a != b for a, b in zip(Schedule(s).bits, target)) for s in schedules]

    best, history = phast(utility, 10, 5)
    assert best == target and best.meta["strategy"] == "phast"
    assert history[0]["schedule"] == "1111100000" and history[-1]["utility"] == 0
    assert [h["utility"] for h in history] == sorted(h["utility"] for h in history)  # never worse
    assert calls[0] == 1 and all(c == 4 * 5 for c in calls[1:])  # one batch of (N - r) * r swaps per sweep
    # epsilon: a swap must gain more than it; with epsilon = 2 nothing is ever kept
    assert phast(utility, 10, 5, epsilon=2)[0] == Schedule.hurry(10, 5)


def test_exhaustive_ranks_every_schedule():
    target = (1, 0, 1, 1, 0, 1, 0)
    ranked = exhaustive(lambda ss: [-sum(a != b for a, b in zip(s, target)) for s in ss], 7, 3)
    assert len(ranked) == math.comb(6, 3) and ranked[0][0] == target and ranked[0][1] == 0
    assert [u for _, u in ranked] == sorted((u for _, u in ranked), reverse=True)
    with pytest.raises(ValueError, match="small N"):
        exhaustive(lambda ss: [0] * len(ss), 20, 10)


def test_prefix_shared_evaluation_equals_full_pipeline_runs(sd_pipe):
    """The evaluator's references are the pipeline's images, and each utility is exactly the PSNR of what the
    pipeline with that schedule generates, although candidates resume from shared states."""
    evaluator = Evaluator(sd_pipe, PROMPTS, SEEDS, 6, 7.5)
    np.testing.assert_array_equal(evaluator.references, _pipeline_images(sd_pipe))
    candidates = bit_flips(Schedule.hurry(6, 2).bits)
    utilities = evaluator(candidates)
    assert evaluator.calls < evaluator.naive_calls == 6 * len(candidates)
    for schedule, utility in zip(candidates[:3], utilities[:3]):
        assert utility == _psnr(_pipeline_images(sd_pipe, Schedule(schedule)), evaluator.references)
    alone = Evaluator(sd_pipe, PROMPTS, SEEDS, 6, 7.5)  # one at a time, reversed: other branch points
    assert [alone([c])[0] for c in reversed(candidates)] == utilities[::-1]


def test_search_resumes_from_its_state_file(sd_pipe, tmp_path):
    state = tmp_path / "state.json"
    first = Evaluator(sd_pipe, PROMPTS, SEEDS, 5, 7.5, state_file=state)
    done = first(bit_flips(Schedule.hurry(5, 2).bits)[:3])
    again = Evaluator(sd_pipe, PROMPTS, SEEDS, 5, 7.5, state_file=state)
    assert again(bit_flips(Schedule.hurry(5, 2).bits)[:3]) == done and again.calls == first.calls
    with pytest.raises(ValueError, match="another search setup"):
        Evaluator(sd_pipe, PROMPTS, SEEDS, 5, 3.0, state_file=state)
    with pytest.raises(ValueError, match="has 4 entries; this search runs 5 steps"):
        again([Schedule("1100")])


def test_named_schedules_and_moving_a_searched_schedule(tmp_path):
    named = dict(named_schedules(["hurry", "early", "random:2", "110100"], 6, 2))
    assert named["hurry"] == (1, 1, 1, 1, 0, 0) and named["early"] == (1, 0, 0, 1, 1, 1)
    assert named["random 1"].num_reuse == named["random 2"].num_reuse == 2 and named["110100"] == (1, 1, 0, 1, 0, 0)
    path = tmp_path / "s.json"
    Schedule("1111010000", timesteps=[900, 800, 700, 600, 500, 400, 300, 200, 100, 0], meta={"strategy": "phast"}
             ).to_json(path)
    (name, moved), = named_schedules([str(path)], 5, 2, timesteps=[900, 700, 500, 300, 100])
    assert name == "s (phast)" and moved == (1, 1, 0, 0, 0) and moved.meta["moved_from"] == 10


def test_search_command_end_to_end_on_the_default_model(tmp_path, capsys):
    """A tiny PHAST search on the shipped model; its JSON is accepted by Schedule.from_json and generate."""
    out = tmp_path / "phast.json"
    assert main(["search", "--steps", "6", "--reuse", "2", "--calibration", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    schedule = Schedule.from_json(out)
    meta = schedule.meta
    assert len(schedule) == 6 and schedule.num_reuse == 2 and len(schedule.timesteps) == 6
    assert meta["strategy"] == "phast" and meta["psnr_db"] >= meta["hurry_psnr_db"]
    assert meta["num_inference_steps"] == 6 and meta["sampler"] == "ddim" and len(meta["prompts"]) == 2
    assert meta["model_calls"] < meta["naive_model_calls"]
    assert meta["history"][-1]["schedule"] == "".join(map(str, schedule.bits))
    assert "fewer" in capsys.readouterr().out
    state = json.loads(out.with_suffix(".state.json").read_text())
    assert len(state["utilities"]) == meta["evaluations"]
    assert main(["generate", "a red circle", "--steps", "6", "--schedule", str(out), "--device", "cpu",
                 "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists()


def test_compare_command_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--steps", "5", "--reuse", "2", "--count", "2", "--schedules", "hurry,early,11010",
                 "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in result["rows"]] == ["hurry", "early", "11010"]
    assert [r["schedule"] for r in result["rows"]] == ["11100", "10011", "11010"]
    assert all(r["reuse_steps"] == 2 and 10 < r["psnr_db"] <= 100 for r in result["rows"])
    table = (out / "compare.md").read_text()
    assert table.count("\n") == 5 and "| hurry | `11100` | 2 |" in table
    assert "held-out prompts" in capsys.readouterr().out
    assert main(["compare", "--model", "tiny-sd", "--steps", "5", "--out", str(out)]) == 2  # no prompt file
    assert "needs --prompts FILE" in capsys.readouterr().err
