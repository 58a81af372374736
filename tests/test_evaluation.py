"""The method comparison: metrics, matched latency, peers that restore the pipeline, phast:R's cached search, the
opt-in metrics, the `eval` command."""

import json

import numpy as np
import pytest
import torch

from attnreuse.cli import main
from attnreuse.default_model import load_default_pipeline
from attnreuse.evaluation import matched_latency
from attnreuse.metrics import HUB_WEIGHTS, extra_scores, image_metrics, load_extra_metrics
from attnreuse.peers import PeerUnavailable, family, method
from attnreuse.schedule import Schedule


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
    assert family("hurry:10") == family("110100") == family("phast:10") == "reuse" and family("steps:13") == "steps"
    assert family("taylorseer:5") == "taylorseer"


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


def _full(pipe, steps=4):
    with method(pipe, "full", steps, 4.5) as run:
        return run(["a red circle on the left"], [torch.Generator().manual_seed(0)])


@pytest.mark.parametrize("spec", ["deepcache:2", "tgate:2", "tome:0.5", "pab:2", "taylorseer:2", "hurry:2", "steps:3"])
def test_every_method_changes_the_images_and_leaves_the_pipeline_as_it_was(pipe, spec):
    before = _full(pipe)
    with method(pipe, spec, 4, 4.5) as run:
        images = run(["a red circle on the left"], [torch.Generator().manual_seed(0)])
    assert images.shape == before.shape and not np.array_equal(images, before)
    np.testing.assert_array_equal(_full(pipe), before)


def test_peers_one_after_another_leave_the_pipeline_as_it_was(pipe):
    """diffusers' hooks, removed, leave an instance `forward` on the modules they hooked: T-GATE after them must
    still undo only its own patches (as in an eval's second round, where tgate follows taylorseer and pab)."""
    before = _full(pipe)
    for spec in ["taylorseer:2", "pab:2", "tgate:2", "tome:0.5"]:
        with method(pipe, spec, 4, 4.5) as run:
            run(["a red circle on the left"], [torch.Generator().manual_seed(0)])
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


def test_phast_searches_on_the_calibration_prompts_once_then_reads_its_cached_schedule(sd_pipe, tmp_path,
                                                                                      monkeypatch):
    import attnreuse.search as search

    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path))
    searches, evaluator = [], search.Evaluator
    monkeypatch.setattr(search, "Evaluator", lambda *a, **k: searches.append(a[1]) or evaluator(*a, **k))
    calibration = ["a blue square", "a green circle"]

    def phast(spec="phast:2", calibration=calibration):
        with method(sd_pipe, spec, 6, 7.5, calibration) as run:
            return run(["a red circle on the left"], [torch.Generator().manual_seed(0)]), run.info

    first, info = phast()
    (path,) = (tmp_path / "schedules").glob("*.json")
    assert searches == [calibration] and info["schedule_file"] == str(path)
    schedule = Schedule.from_json(path)  # the format of `attnreuse search --out`, usable as a schedule file
    assert info["schedule"] == "".join(map(str, schedule.bits)) and schedule.num_reuse == 2
    assert schedule.meta["strategy"] == "phast" and schedule.meta["prompts"] == calibration
    with method(sd_pipe, info["schedule"], 6, 7.5) as run:  # phast:2 ran the schedule it found
        np.testing.assert_array_equal(run(["a red circle on the left"], [torch.Generator().manual_seed(0)]), first)
    written = path.stat().st_mtime_ns
    again, _ = phast()
    assert searches == [calibration] and path.stat().st_mtime_ns == written  # read back, not searched again
    np.testing.assert_array_equal(again, first)
    phast("phast:2", calibration[:1])  # another calibration set is another search and another file
    assert len(searches) == 2 and len(list((tmp_path / "schedules").glob("*.json"))) == 2
    with pytest.raises(ValueError, match="calibration prompts"):
        phast("phast:2", None)


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    """A tiny CLIP folder with random weights, as `from_pretrained` reads a real one (tokenizer written here)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from attnreuse.local import write_clip_tokenizer

    path = tmp_path_factory.mktemp("clip")
    tokenizer = write_clip_tokenizer(path)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_score_and_fid_are_what_clip_and_torchmetrics_give(clip_model):
    """CLIP score: 100 x the cosine of CLIP's own image and text embeddings, averaged (torchmetrics' definition;
    torchmetrics 1.9's CLIPScore itself fails on transformers 5's outputs, which load_extra_metrics works around).
    FID: its branch against torchmetrics' FID run directly (a small feature extractor stands in for InceptionV3)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    images, references = rng.random((2, 16, 48, 48, 3), dtype=np.float32)
    prompts = ["a red circle on the left", "a small blue square above a green triangle"] * 8
    scores = extra_scores(load_extra_metrics(clip_model), images, references, prompts)
    model, processor = CLIPModel.from_pretrained(clip_model), CLIPProcessor.from_pretrained(clip_model)
    pixels = list(torch.as_tensor((images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
    with torch.no_grad():
        out = model(**processor(text=prompts, images=pixels, return_tensors="pt", padding=True))
    expected = float((100 * (out.image_embeds * out.text_embeds).sum(-1)).mean().clamp(min=0))
    assert scores == {"clip_score": pytest.approx(expected, rel=1e-5)}

    features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    direct = FrechetInceptionDistance(feature=features, normalize=True)
    direct.update(torch.as_tensor(references).permute(0, 3, 1, 2), real=True)
    direct.update(torch.as_tensor(images).permute(0, 3, 1, 2), real=False)
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    assert extra_scores({"fid": fid}, images, references, prompts)["fid"] == pytest.approx(float(direct.compute()))


def test_lpips_and_fid_without_their_weights_stop_eval_before_it_loads_or_generates(tmp_path, monkeypatch, capsys):
    import attnreuse.cli as cli

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(cli, "_pipeline", lambda args: pytest.fail("the model was loaded"))
    out = tmp_path / "eval"
    assert main(["eval", "--lpips", "--fid", "--clip-model", str(tmp_path / "no-clip"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert err.startswith("attnreuse: error: extra metrics need what is not here") and "Traceback" not in err
    assert f"lpips: the weights file {hub / HUB_WEIGHTS['lpips'][1]}" in err
    assert f"fid: the weights file {hub / HUB_WEIGHTS['fid'][1]}" in err
    assert f"CLIP folder (config.json, weights, tokenizer and image processor files) at {tmp_path / 'no-clip'}" in err
    assert not out.exists()


def test_lpips_loads_from_the_torch_hub_cache_and_matches_torchmetrics(tmp_path, monkeypatch):
    # torchvision is genuinely not installable next to this project's CPU torch wheel (PyPI's torchvision builds
    # link CUDA libraries that the CPU torch lacks), so this runs only where a matching torchvision is installed.
    torchvision = pytest.importorskip("torchvision")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), hub / HUB_WEIGHTS["lpips"][1])  # stands in for the real
    rng = np.random.default_rng(0)
    images, references = rng.random((2, 4, 64, 64, 3), dtype=np.float32)
    got = extra_scores(load_extra_metrics(lpips=True), images, references, ["x"] * 4)["lpips"]
    direct = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    assert got == pytest.approx(float(direct(*(torch.as_tensor(a).permute(0, 3, 1, 2) for a in (images, references)))))


def test_eval_command_end_to_end_on_the_default_model(tmp_path, capsys, clip_model, monkeypatch):
    monkeypatch.setenv("ATTNREUSE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    assert main(["eval", "--steps", "4", "--count", "2", "--repeats", "1", "--methods",
                 "full,steps:3,hurry:2,phast:2,tome:x", "--calibration", "2", "--clip-model", str(clip_model),
                 "--device", "cpu", "--out", str(out)]) == 0
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
    markdown = (out / "eval.md").read_text()
    assert "| tome:x | not run" in markdown and "Matched latency" in capsys.readouterr().out
    # phast:2 searched on captions that are not evaluated, and the report says which schedule it ran
    searched = Schedule.from_json(rows["phast:2"]["schedule_file"])
    assert rows["phast:2"]["schedule"] == "".join(map(str, searched.bits)) and rows["hurry:2"]["schedule"] == "1100"
    assert searched.meta["prompts"] == report["settings"]["calibration_prompts"] and len(searched.meta["prompts"]) == 2
    assert not set(searched.meta["prompts"]) & set(report["prompts"])
    assert f"phast:2 `{rows['phast:2']['schedule']}`" in markdown
    assert all(r["clip_score"] >= 0 for r in report["rows"] if "error" not in r) and "CLIP score |" in markdown


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
