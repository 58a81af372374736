"""The method comparison: metrics, matched latency, peers that restore the pipeline, the `eval` command."""

import json

import numpy as np
import pytest
import torch

from attnreuse.cli import main
from attnreuse.default_model import load_default_pipeline
from attnreuse.evaluation import matched_latency
from attnreuse.metrics import image_metrics
from attnreuse.peers import PeerUnavailable, family, method


def test_image_metrics_on_known_values():
    reference = np.full((2, 16, 16, 3), 0.5, np.float32)
    shifted = reference + np.float32(0.1)  # MSE 0.01 -> PSNR exactly 20 dB
    scores = image_metrics(shifted, reference)
    assert scores["psnr_db"] == pytest.approx([20.0, 20.0], abs=1e-4)
    same = image_metrics(reference, reference)
    assert same["ssim"] == pytest.approx([1.0, 1.0]) and same["psnr_db"] == [float("inf")] * 2
    rng = np.random.default_rng(0)
    noisy = np.clip(reference + rng.normal(0, 0.2, reference.shape), 0, 1).astype(np.float32)
    assert 0 < image_metrics(noisy, reference)["ssim"][0] < 0.5
    with pytest.raises(ValueError, match="one shape"):
        image_metrics(reference[:, :8], reference)


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
    assert family("hurry:10") == family("110100") == "reuse" and family("steps:13") == "steps"


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


def _full(pipe, steps=4):
    with method(pipe, "full", steps, 4.5) as run:
        return run(["a red circle on the left"], [torch.Generator().manual_seed(0)])


@pytest.mark.parametrize("spec", ["deepcache:2", "tgate:2", "tome:0.5", "pab:2", "hurry:2", "steps:3"])
def test_every_method_changes_the_images_and_leaves_the_pipeline_as_it_was(pipe, spec):
    before = _full(pipe)
    with method(pipe, spec, 4, 4.5) as run:
        images = run(["a red circle on the left"], [torch.Generator().manual_seed(0)])
    assert images.shape == before.shape and not np.array_equal(images, before)
    np.testing.assert_array_equal(_full(pipe), before)


def test_a_peer_that_is_not_installed_says_why(pipe, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "DeepCache", None)  # as if the package were missing
    with pytest.raises(PeerUnavailable, match="DeepCache is not installed"):
        with method(pipe, "deepcache:2", 4, 4.5):
            pass


@pytest.mark.parametrize("spec", ["fbc:0.05", "fastercache"])
def test_diffusers_caches_for_transformers_are_reported_on_a_unet_and_removed(pipe, spec):
    before = _full(pipe)
    with pytest.raises(PeerUnavailable, match="does not run on UNet2DConditionModel"):
        with method(pipe, spec, 4, 4.5) as run:
            run(["a red circle on the left"], [torch.Generator().manual_seed(0)])
    np.testing.assert_array_equal(_full(pipe), before)


def test_eval_command_end_to_end_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--steps", "4", "--count", "2", "--repeats", "1", "--methods",
                 "full,steps:3,hurry:2,tome:x", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["full"]["latency_ratio"] == 1.0 and rows["full"]["psnr_db"] == 100.0
    assert rows["full"]["ssim"] == pytest.approx(1.0)
    assert rows["hurry:2"]["psnr_db"] > rows["steps:3"]["psnr_db"] and 0 < rows["hurry:2"]["ssim"] <= 1
    assert all(len(r["times_s"]) == 1 and r["peak_memory_mib"] >= 0 and 0 <= r["faithfulness"] <= 1
               for r in report["rows"] if "error" not in r)
    assert "could not convert" in rows["tome:x"]["error"]  # reported with its reason, not dropped
    assert report["matched"][0]["method"] == "hurry:2" and report["matched"][0]["baseline"] == "steps:3"
    assert report["environment"]["device"].startswith("CPU") and report["environment"]["diffusers"]
    for name in ("eval.md", "pareto.png", "grid.png"):
        assert (out / name).stat().st_size > 0
    assert "| tome:x | not run" in (out / "eval.md").read_text()
    assert "Matched latency" in capsys.readouterr().out


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
