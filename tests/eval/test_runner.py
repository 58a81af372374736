"""Running methods side by side: matched latency, the `eval` command end to end, data-parallel runs."""

import json

import pytest

from attnreuse import Schedule
from attnreuse.cli import main
from attnreuse.eval.methods import family
from attnreuse.eval.runner import matched_latency


def test_matched_latency_picks_the_nearest_step_reduced_baseline():
    rows = [{"method": "full", "family": "full", "latency_ratio": 1.0, "psnr_db": 100.0},
            {"method": "steps:10", "family": "steps", "latency_ratio": 0.52, "psnr_db": 20.0},
            {"method": "steps:13", "family": "steps", "latency_ratio": 0.66, "psnr_db": 22.0},
            {"method": "hurry:10", "family": "reuse", "latency_ratio": 0.70, "psnr_db": 30.0},
            {"method": "deepcache:3", "family": "deepcache", "latency_ratio": 0.55, "psnr_db": 21.0},
            {"method": "tome:0.5", "family": "tome", "error": "not installed"}]
    pairs = {p["method"]: p for p in matched_latency(rows)}
    assert set(pairs) == {"hurry:10", "deepcache:3"}
    assert pairs["hurry:10"]["baseline"] == "steps:13" and pairs["hurry:10"]["psnr_gain_db"] == pytest.approx(8.0)
    assert pairs["deepcache:3"]["baseline"] == "steps:10" and pairs["deepcache:3"]["psnr_gain_db"] == pytest.approx(1.0)
    assert pairs["deepcache:3"]["matched"] and pairs["hurry:10"]["matched"]  # 0.03 and 0.04 apart
    rows[3]["latency_ratio"] = 0.80  # 0.14 from the nearest baseline: reported, but not as matched
    assert not {p["method"]: p for p in matched_latency(rows)}["hurry:10"]["matched"]
    assert family("hurry:10") == family("110100") == family("phast:10") == "reuse" and family("steps:13") == "steps"
    assert family("taylorseer:5") == "taylorseer"


@pytest.mark.slow
def test_eval_command_end_to_end_on_the_default_model(tmp_path, capsys, clip_model, monkeypatch):
    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    assert main(["eval", "--steps", "4", "--count", "2", "--repeats", "1", "--methods",
                 "full,steps:3,hurry:2,phast:2,fbc:0.05", "--calibration", "2", "--clip-model", str(clip_model),
                 "--device", "cpu", "--out", str(out)]) == 1  # written whole, but one method could not run
    report = json.loads((out / "eval.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["full"]["latency_ratio"] == 1.0 and rows["full"]["psnr_db"] == 100.0
    assert rows["full"]["ssim"] == pytest.approx(1.0)
    assert rows["hurry:2"]["psnr_db"] > rows["steps:3"]["psnr_db"] and 0 < rows["hurry:2"]["ssim"] <= 1
    assert all(len(r["times_s"]) == 1 and r["peak_memory_mib"] >= 0 and 0 <= r["faithfulness"] <= 1
               for r in report["rows"] if "error" not in r)
    assert "does not run on UNet2DConditionModel" in rows["fbc:0.05"]["error"]  # reported with its reason
    assert report["matched"][0]["method"] == "hurry:2" and report["matched"][0]["baseline"] == "steps:3"
    assert report["environment"]["device"].startswith("CPU") and report["environment"]["diffusers"]
    for name in ("eval.md", "pareto.png", "grid.png"):
        assert (out / name).stat().st_size > 0
    markdown = (out / "eval.md").read_text()
    printed = capsys.readouterr()
    assert "| fbc:0.05 | not run" in markdown and "Matched latency" in printed.out
    assert "attnreuse: error: 1 method(s) could not run, the report says why: fbc:0.05: " in printed.err
    # phast:2 searched on captions that are not evaluated, and the report says which schedule it ran
    searched = Schedule.from_json(rows["phast:2"]["schedule_file"])
    assert rows["phast:2"]["schedule"] == "".join(map(str, searched.bits)) and rows["hurry:2"]["schedule"] == "1100"
    assert searched.meta["prompts"] == report["settings"]["calibration_prompts"] and len(searched.meta["prompts"]) == 2
    assert not set(searched.meta["prompts"]) & set(report["prompts"])
    assert f"phast:2 `{rows['phast:2']['schedule']}`" in markdown
    assert all(r["clip_score"] >= 0 for r in report["rows"] if "error" not in r) and "CLIP score |" in markdown


@pytest.mark.slow
def test_two_process_data_parallel_eval_merges_into_one_report(tmp_path):
    """Prompts split across two processes (accelerate's PartialState under torchrun, gloo on CPU) give one report
    with the single-process figures."""
    import os
    import subprocess
    import sys

    args = ["-m", "attnreuse", "eval", "--device", "cpu", "--steps", "4", "--count", "3", "--repeats", "1",
            "--methods", "full,steps:3,hurry:2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert one["settings"]["processes"] == 1 and two["settings"]["processes"] == 2
    assert [r["method"] for r in two["rows"]] == ["full", "steps:3", "hurry:2"]
    for a, b in zip(one["rows"], two["rows"]):
        assert b["psnr_db"] == pytest.approx(a["psnr_db"], abs=0.01) and b["ssim"] == pytest.approx(a["ssim"], abs=1e-4)
        assert b["faithfulness"] == a["faithfulness"] and len(b["times_s"]) == 2  # one timed round per process
