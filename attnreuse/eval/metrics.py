"""Image-fidelity metrics against the no-reuse output of the same prompt and seed (the paper's utility), and the
opt-in ones that need weights on disk: CLIP score, LPIPS, FID."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..search.utility import psnr

__all__ = ["image_metrics", "load_extra_metrics", "extra_scores", "HUB_WEIGHTS"]

# The weights torchvision (LPIPS's AlexNet) and torch-fidelity (FID's InceptionV3) download into the torch hub cache
# on first use, by file name, with the packages each metric imports.
HUB_WEIGHTS = {"lpips": (("torchvision",), "alexnet-owt-7be5be79.pth"),
               "fid": (("torchvision", "torch_fidelity"), "weights-inception-2015-12-05-6726825d.pth")}


def image_metrics(images, references) -> dict:
    """Per-image PSNR (dB, `psnr`: inf when identical) and SSIM (torchmetrics) of (N, H, W, 3) images in
    [0, 1] against their references, as lists."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = _nchw(images), _nchw(references)
    if x.shape != y.shape:
        raise ValueError(f"Image metrics need images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    return {"psnr_db": [psnr(a, b) for a, b in zip(images, references)], "ssim": ssim.tolist()}


def _nchw(images):
    import torch

    return torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)


def load_extra_metrics(clip_model: str | Path | None = None, lpips: bool = False, fid: bool = False) -> dict:
    """The opt-in metrics as torchmetrics objects, from local files only: CLIP score with the transformers CLIP
    folder `clip_model`, LPIPS (AlexNet) and FID (InceptionV3) with the weights in the torch hub cache. Everything
    is checked before anything is loaded, and before an evaluation generates anything, so that a missing package or
    file stops it at once with what is missing and where it was looked for, not with a download attempt or a
    traceback from inside torchmetrics after the generation."""
    import importlib.util

    import torch

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    missing = []
    for name in [n for n, wanted in (("lpips", lpips), ("fid", fid)) if wanted]:
        packages, weights = HUB_WEIGHTS[name]
        missing += [f"{name}: the package {p} (pip install 'attnreuse[metrics]', with a torchvision built for "
                    f"your torch)" for p in packages if importlib.util.find_spec(p) is None]
        if not (hub / weights).exists():
            missing.append(f"{name}: the weights file {hub / weights} (torch hub cache, TORCH_HOME; nothing is "
                           "downloaded here: copy it there from a machine where the metric ran once)")
    if clip_model is not None and not (Path(clip_model) / "config.json").exists():
        missing.append(f"clip score: a transformers CLIP folder (config.json, weights, tokenizer and image "
                       f"processor files) at {Path(clip_model).resolve()}")
    if missing:
        raise FileNotFoundError("extra metrics need what is not here:\n  " + "\n  ".join(missing))
    metrics = {}
    try:
        if clip_model is not None:
            from torchmetrics.multimodal import CLIPScore
            from transformers import CLIPModel, CLIPProcessor

            model = _tensor_features(CLIPModel.from_pretrained(clip_model, local_files_only=True))
            processor = CLIPProcessor.from_pretrained(clip_model, local_files_only=True)
            metrics["clip_score"] = CLIPScore(model_name_or_path=lambda: (model, processor))
        if lpips:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            metrics["lpips"] = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
        if fid:
            from torchmetrics.image.fid import FrechetInceptionDistance

            metrics["fid"] = FrechetInceptionDistance(normalize=True)
    except Exception as err:  # noqa: BLE001 - e.g. a torchvision built for another torch: say so, not a traceback
        raise ValueError(f"could not load the extra metrics: {type(err).__name__}: {err}") from err
    return metrics


def _tensor_features(model):
    """transformers 5's CLIPModel.get_image_features / get_text_features return a model output, which torchmetrics
    1.9's CLIPScore takes for the projected embeddings and fails on (torchmetrics issue 3407, fixed after 1.9.0):
    hand it the output's `pooler_output`, which is that embedding."""
    import torch

    for name in ("get_image_features", "get_text_features"):
        def features(*args, _method=getattr(model, name), **kwargs):
            out = _method(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        setattr(model, name, features)
    return model


def extra_scores(metrics: dict, images, references, prompts: list[str]) -> dict:
    """The loaded extra metrics for (N, H, W, 3) images in [0, 1]: CLIP score against their prompts (mean of
    100 x cosine), LPIPS against their references (mean), FID of the set against the reference set (with a few
    images it is noisy; compare it between methods of one run only)."""
    import torch

    x, y = _nchw(images), _nchw(references)
    scores = {}
    for name, metric in metrics.items():
        metric.reset()
        if name == "clip_score":
            metric.update((x * 255).round().to(torch.uint8), list(prompts))
        elif name == "lpips":
            metric.update(x, y)
        else:
            metric.update(y, real=True)
            metric.update(x, real=False)
        scores[name] = float(metric.compute())
    return scores
