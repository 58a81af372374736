"""SSIM and PSNR on known values, and the opt-in CLIP score, LPIPS and FID from local weights only."""

import numpy as np
import pytest
import torch

from attnreuse.cli import main
from attnreuse.eval.metrics import HUB_WEIGHTS, extra_scores, image_metrics, load_extra_metrics


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
    import attnreuse.cli.evaluate as evaluate

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(evaluate, "pipeline", lambda args: pytest.fail("the model was loaded"))
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
