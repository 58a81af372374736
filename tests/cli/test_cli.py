"""The command line: help, speed, generate, search, compare, and the README's example."""

import json
import subprocess
import sys

import pytest

from attnreuse import Schedule
from attnreuse.cli import main


@pytest.mark.slow
def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "attnreuse", "--help"], capture_output=True, text=True, check=True)
    assert "speed" in out.stdout and "attention maps" in out.stdout


def test_speed_comparison_on_a_local_pipeline(tmp_path, capsys):
    path = tmp_path / "speed.json"
    rc = main(["speed", "--model", "tiny-sd", "--steps", "4", "--reuse", "2", "--repeats", "2", "--quiet",
               "--device", "cpu", "--json", str(path)])
    assert rc == 0
    result = json.loads(path.read_text())
    assert result["schedule"] == "1100" and result["steps"] == 4
    assert len(result["full_times_s"]) == len(result["reuse_times_s"]) == 2
    assert result["speedup"] == result["full_s"] / result["reuse_s"] > 0
    assert result["peak_cache_mib"] > 0 and result["psnr_db"] > 20
    assert result["device"].startswith("CPU")
    assert "speed-up" in capsys.readouterr().out


def test_bad_schedule_on_the_command_line_is_a_clear_error(capsys):
    assert main(["speed", "--model", "tiny-sd", "--steps", "4", "--schedule", "0110", "--quiet"]) == 2
    assert "first step of a schedule must compute" in capsys.readouterr().err
    assert main(["speed", "--model", "tiny-sd", "--steps", "4", "--schedule", "110", "--quiet"]) == 2
    assert "expected a schedule of length 4" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_on_the_default_model_writes_both_images(tmp_path, capsys):
    out = tmp_path / "circle.png"
    assert main(["generate", "a red circle left of a blue square", "--steps", "10", "--schedule", "hurry:4",
                 "--device", "cpu", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no reuse" in printed and "reuse" in printed and "faithfulness check" in printed
    assert "schedule 1111110000 (4 reuse)" in printed
    from PIL import Image

    assert Image.open(out).size == Image.open(tmp_path / "circle.full.png").size == (64, 64)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])  # Flux keeps its own flow-matching scheduler
def test_generate_plans_a_model_without_a_shipped_plan_at_first_use(tmp_path, capsys, monkeypatch, model):
    """--budget on a model that ships no plan: the warm-up round calibrates, the timed rounds read the plan back
    from the cache."""
    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "a red circle", "--model", model, "--steps", "8", "--budget", "0.9", "--repeats",
                 "1", "--device", "cpu", "-o", str(tmp_path / "out.png")]) == 0
    printed = capsys.readouterr().out
    assert "plan for a budget of 0.9 made at first use: call " in printed
    assert f"cache: {tmp_path / 'cache'}" in printed
    assert (tmp_path / "out.png").exists() and (tmp_path / "out.full.png").exists()


def test_a_flow_matching_model_refuses_a_discrete_sampler(capsys):
    assert main(["generate", "a red circle", "--model", "tiny-flux", "--sampler", "dpm++", "--device", "cpu"]) == 2
    assert "samples by flow matching (FlowMatchEulerDiscreteScheduler); leave --sampler out" in _one_error_line(capsys)


def test_generate_rejects_a_bad_schedule(capsys):
    assert main(["generate", "a red circle", "--steps", "10", "--schedule", "hurry:10", "--device", "cpu"]) == 2
    assert "HURRY needs 0 <= reuse_steps < num_steps" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_example_runs():
    """The README's Python example is code a user will paste: it must run as written."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "README.md").read_text()
    assert len(text.splitlines()) <= 150  # a front door, like tomesd's and DeepCache's; the rest is in docs/
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    offline = [b for b in blocks if "needs the Hugging Face Hub" not in b]
    assert offline and len(offline) < len(blocks)
    for block in offline:
        exec(compile(block, "README.md", "exec"), {})
    for block in set(blocks) - set(offline):  # a real model: the names it imports exist
        exec("\n".join(line for line in block.splitlines() if line.startswith(("import ", "from "))), {})


@pytest.mark.slow
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
    assert meta["history"][-1]["schedule"] == str(schedule)
    assert "fewer" in capsys.readouterr().out
    state = json.loads(out.with_suffix(".state.json").read_text())
    assert len(state["utilities"]) == meta["evaluations"]
    assert main(["generate", "a red circle", "--steps", "6", "--schedule", str(out), "--device", "cpu",
                 "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_generate_prints_the_schedule_that_ran(tmp_path, capsys):
    """A schedule recorded at 4 steps and run at 8 is moved by timestep; the command says what ran."""
    path = tmp_path / "four.json"
    Schedule("1100", timesteps=[901, 601, 301, 1]).to_json(path)
    assert main(["generate", "a red circle", "--steps", "8", "--schedule", str(path), "--device", "cpu",
                 "-o", str(tmp_path / "c.png")]) == 0
    printed = capsys.readouterr().out
    assert "schedule 11110000 (4 reuse, moved from 1100)" in printed  # nearest of DDIM's 876, 751, ..., 1


def _one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("attnreuse")]
    assert len(errors) == 1, errors
    return errors[0]


PLAN = ["plan", "--steps", "4", "--device", "cpu", "--no-measure", "--calibration", "1"]  # the default model


def test_plan_refuses_a_budget_below_every_plan_in_one_line(tmp_path, capsys):
    assert main(PLAN + ["--budget", "0.01", "--out", str(tmp_path / "p.json")]) == 2
    assert "a budget of 0.01 is below the cheapest plan's predicted latency" in _one_error_line(capsys)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("state, message", [
    ('{"latency": ', "is damaged; use another --state file or delete"),
    ('{"setup": {"model": "another", "num_inference_steps": 4}, "latency": {}}',
     "was written for another search setup (model 'another' there, "),
])
def test_plan_refuses_a_damaged_or_foreign_state_file_in_one_line(tmp_path, capsys, state, message):
    (tmp_path / "s.json").write_text(state)
    assert main(PLAN + ["--budget", "0.9", "--effort", "full", "--sweeps", "0", "--state", str(tmp_path / "s.json"),
                        "--out", str(tmp_path / "p.json")]) == 2
    line = _one_error_line(capsys)
    assert message in line and str(tmp_path / "s.json") in line
    assert (tmp_path / "s.json").read_text() == state  # left for the user to look at


def test_plan_refuses_a_profile_timed_for_another_setup(tmp_path, capsys):
    profile = tmp_path / "quick.json"
    assert main(PLAN + ["--budget", "0.9", "--out", str(profile)]) == 0
    capsys.readouterr()
    assert main(PLAN[:-1] + ["2", "--budget", "0.9", "--profile", str(profile), "--out",
                             str(tmp_path / "p.json")]) == 2
    assert "was timed for another setup (batch 2 there, 4 here)" in _one_error_line(capsys)
    data = json.loads(profile.read_text())
    data["meta"]["model"] = "another-model"
    profile.write_text(json.dumps(data))
    assert main(PLAN + ["--budget", "0.9", "--profile", str(profile), "--out", str(tmp_path / "p.json")]) == 2
    assert "was timed for another setup (model 'another-model' there, " in _one_error_line(capsys)


@pytest.mark.parametrize("plan, message", [
    ({"units": {"attention": {"kind": "attention", "bits": "1" * 19 + "0", "layers": ["no.such.layer"]}}},
     "no.such.layer"),
    ({"units": {"call": {"kind": "call", "bits": "1" * 19 + "0"}}, "meta": {"weights": "0" * 40}},
     "was made for other weights than this model's"),
])
def test_generate_checks_a_plan_against_the_model_before_generating(tmp_path, capsys, monkeypatch, plan, message):
    import attnreuse.cli.generate as generate

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "attnreuse-plan", "version": 1, **plan}))
    monkeypatch.setattr(generate, "timed", lambda *a: pytest.fail("generated before the plan was checked"))
    assert main(["generate", "a red circle", "--plan", str(path), "--device", "cpu", "-o",
                 str(tmp_path / "o.png")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"attnreuse: error: --plan {path}") and message in line
    assert not list(tmp_path.glob("*.png"))


def test_generate_prints_the_plan_it_applied_when_it_was_moved(tmp_path, capsys):
    """The shipped plan for 20 steps, run at 4: what ran is printed, and that it was moved."""
    assert main(["generate", "a red circle", "--steps", "4", "--repeats", "1", "--device", "cpu", "-o",
                 str(tmp_path / "o.png")]) == 0
    printed = capsys.readouterr().out
    assert "plan for a budget of 0.5: call " in printed and ", moved from call " in printed
