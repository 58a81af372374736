"""The paper's two analyses of attention across denoising steps (Hunter, Dudziak et al., arXiv 2401.01008).

`redundancy` (Fig. 2, paper notes §1.5): how far each layer's attention map moves from one denoiser call to
the next; small distances are why reuse works at all.
`sensitivity` (Fig. 3, §2.2): how much a perturbation of the pre-softmax attention at one call changes the
final image, with the fit d(s) = k1 exp(-k2 s); k2 > 0 (early errors grow) is why HURRY reuses late steps.

Both swap every attention layer's processor for `_ProbeProcessor`, which computes the map explicitly as a store
call does (the same functions of `attention.math` and the same `attention.families`), and restore the original
processors afterwards. A "step" s here is a denoiser call, counted from 1 (one per sampler step for DDIM).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..attention import family_of
from ..attention.math import attention_map, flat
from ..files import write_json
from ..layers import attention_layers
from ..pipelines.sampling import generate
from .plots import pyplot, save_figure

logger = logging.getLogger(__name__)

__all__ = ["redundancy", "sensitivity", "map_distance", "fit_exponential"]

_GUIDANCE = 7.5  # guidance_scale=None: diffusers' SD default (the paper does not state its value)


def map_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised L1 distance between two attention maps of shape (batch*heads, queries, keys).

    The mean over query rows (and batch*heads) of 0.5 * sum_j |a[row, j] - b[row, j]|: the total-variation
    distance between the two rows' probability distributions, so it lies in [0, 1] (0: equal, 1: disjoint).
    """
    return (0.5 * (a - b).abs().sum(-1, dtype=torch.float32).mean()).item()


def fit_exponential(steps, distances) -> dict:
    """Least-squares fit of log d = log k1 - k2 s, i.e. d(s) = k1 exp(-k2 s), as the paper's Fig. 3.

    Returns {"k1", "k2", "correlation", "steps"}; correlation is Pearson's r between the fitted curve and the
    data. Distances that are not all positive (e.g. no perturbation) have no log, so k1, k2 and r are NaN.
    """
    s, d = np.asarray(steps, dtype=np.float64), np.asarray(distances, dtype=np.float64)
    if s.size < 2 or s.shape != d.shape:
        raise ValueError(f"fit_exponential needs at least 2 (step, distance) pairs, got {s.size} and {d.size}.")
    fit = {"k1": math.nan, "k2": math.nan, "correlation": math.nan, "steps": [int(x) for x in s]}
    if not np.all(np.isfinite(d) & (d > 0)):
        logger.warning("attnreuse: distances not all positive, no exponential fit: %s", d.tolist())
        return fit
    slope, intercept = np.polyfit(s, np.log(d), 1)
    curve = np.exp(intercept + slope * s)
    fit.update(k1=float(np.exp(intercept)), k2=float(-slope))
    if np.std(d) > 0 and np.std(curve) > 0:
        fit["correlation"] = float(np.corrcoef(curve, d)[0, 1])
    return fit


class _ProbeProcessor:
    """softmax(Q K^T * scale) V with the map made by `probe`: a store call's math, no cache."""

    def __init__(self, name: str, attn, original, probe):
        family = family_of(attn, original)
        if isinstance(family, str):
            raise ValueError(f"Layer {name!r} {family}.")
        self.name, self.probe, self.family = name, probe, family

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, temb=None,
                 image_rotary_emb=None, rotary_emb=None, **kwargs):
        frame = self.family.call_frame(attn, hidden_states, encoder_hidden_states, args, temb, image_rotary_emb,
                                       rotary_emb)
        query, key, value = self.family.qkv_of(attn, frame)
        mask = self.family.mask(attn, attention_mask, query, key, heads=False)
        attn_map = self.probe(self.name, attn, flat(query), flat(key), mask, self.family.scale(attn, query))
        out = torch.bmm(attn_map.to(value.dtype), flat(value)).view(*query.shape[:-1], value.shape[-1])
        out = out.transpose(1, 2).flatten(2)
        return self.family.leave(attn, self.family.project(attn, out, frame), frame)


class _Recorder:
    """Computes maps with `attention_map` and records each layer's distance to its map of the previous call.

    Only the previous map of each layer is kept, so memory is one map per layer whatever the step count.
    """

    def __init__(self):
        self.call, self.previous, self.per_layer = 0, {}, {}

    def __call__(self, name, attn, query, key, mask, scale):
        attn_map = attention_map(attn, query, key, mask, scale)
        previous = self.previous.get(name)
        if previous is not None:
            self.per_layer.setdefault(name, []).append(map_distance(attn_map, previous))
        self.previous[name] = attn_map
        return attn_map


class _Perturber:
    """Maps as `attention_map`, with Gaussian noise on the pre-softmax logits at call `step` only.

    The noise is noise * RMS(logits) * N(0, 1), RMS = ||logits||_F / sqrt(numel), taken before the mask is added
    (a -inf mask entry would make the norm infinite). One generator seeded from (noise_seed, step) serves all
    layers in their fixed call order: runs are repeatable.
    """

    def __init__(self, noise: float, noise_seed: int, step: int | None):
        self.call, self.noise, self.noise_seed, self.step, self._generator = 0, noise, noise_seed, step, None

    def __call__(self, name, attn, query, key, mask, scale):
        perturb = self._perturb if self.call == self.step else None
        return attention_map(attn, query, key, mask, scale, perturb=perturb)

    def _perturb(self, scores):
        return scores + self.noise * self._rms(scores) * self._randn(scores)

    @staticmethod
    def _rms(scores):
        return scores.float().norm() / math.sqrt(scores.numel())

    def _randn(self, scores):
        if self._generator is None:
            self._generator = torch.Generator(scores.device).manual_seed(self.noise_seed * 1_000_003 + self.step)
        noise = torch.randn(scores.shape, generator=self._generator, device=scores.device, dtype=torch.float32)
        return noise.to(scores.dtype)


@contextmanager
def _probed(pipe, probe):
    """Every attention layer of `pipe.unet` runs `_ProbeProcessor(probe)`, and `probe.call` counts denoiser
    calls (1 at the first); the original processors and no hook are left on exit, even after an error."""
    unet = pipe.unet
    originals = unet.attn_processors
    probed = {key: _ProbeProcessor(key.removesuffix(".processor"), unet.get_submodule(key.removesuffix(".processor")),
                                   proc, probe) for key, proc in originals.items()}

    def count(module, args):
        probe.call += 1

    unet.set_attn_processor(probed)
    hook = unet.register_forward_pre_hook(count)
    try:
        yield probe
    finally:
        hook.remove()
        unet.set_attn_processor(dict(originals))


def _generate(pipe, prompts, seeds, num_inference_steps, guidance_scale) -> np.ndarray:
    """One batched call, image i from its own generator seeded with seeds[i]; images (B, H, W, 3) in [0, 1]."""
    return generate(pipe, list(prompts), list(seeds), num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale)


def _settings(pipe, prompts, seeds, num_inference_steps, guidance_scale) -> dict:
    return {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "prompts": list(prompts),
            "seeds": [int(s) for s in seeds], "scheduler": type(pipe.scheduler).__name__}


def redundancy(pipe, prompts, seeds, num_inference_steps: int = 20, guidance_scale: float | None = None,
               out=None) -> dict:
    """Distance between each attention layer's maps at consecutive denoiser calls (the paper's Fig. 2).

    For every call s >= 2 and layer, the distance between A(s) and A(s-1) is `map_distance`: the mean over
    query rows (and batch*heads, both CFG branches included) of 0.5 * sum_j |A_s[row, j] - A_{s-1}[row, j]|,
    a total-variation distance in [0, 1]. "self" and "cross" average it over self-attention (attn1) and
    cross-attention (attn2) layers. The maps are computed explicitly in place of the layers' processors, which
    changes the images by float rounding only, and only the previous map per layer is held.

    Args:
        pipe: a diffusers Stable Diffusion pipeline. prompts, seeds: one image per prompt, image i seeded with
            seeds[i]; all in one batched call. guidance_scale: None means 7.5.
        out (*optional*): folder to write ``redundancy.json`` and ``redundancy.png`` into.

    Returns:
        {"steps": [2..N], "self", "cross", "per_layer": {name: [...]}, plus the settings}.
    """
    guidance_scale = _GUIDANCE if guidance_scale is None else guidance_scale
    kinds = attention_layers(pipe)
    with _probed(pipe, _Recorder()) as recorder:
        _generate(pipe, prompts, seeds, num_inference_steps, guidance_scale)
    per_layer = {name: recorder.per_layer.get(name, []) for name in kinds}
    steps = list(range(2, recorder.call + 1))

    def mean_over(kind):
        rows = [per_layer[n] for n, k in kinds.items() if k == kind]
        return np.mean(rows, axis=0).tolist() if rows else []

    result = {"steps": steps, "self": mean_over("self"), "cross": mean_over("cross"), "per_layer": per_layer,
              **_settings(pipe, prompts, seeds, num_inference_steps, guidance_scale)}
    if out is not None:
        write_json(Path(out) / "redundancy.json", result)
        _plot_redundancy(result, Path(out) / "redundancy.png")
    return result


def sensitivity(pipe, prompts, seeds, num_inference_steps: int = 20, guidance_scale: float | None = None,
                noise: float = 0.1, noise_seed: int = 0, fit_steps=None, out=None) -> dict:
    """Effect on the final images of perturbing the pre-softmax attention at one call (the paper's Fig. 3).

    For each call s = 1..N the same images are generated with every layer's logits perturbed at call s only
    (noise * RMS(logits) * N(0, 1), see `_Perturber`); the distance is the mean absolute difference to the
    unperturbed images, in [0, 1]. The reference images go through the same explicit attention code with no
    noise, so noise=0 gives distance 0 exactly. d(s) = k1 exp(-k2 s) is fitted over `fit_steps` (default
    1..N-2: the paper left out the last two steps, which break the trend); k2 > 0 supports late reuse.

    Args: as `redundancy`, plus noise (relative to the logits' RMS), noise_seed, fit_steps (list of calls).

    Returns:
        {"steps": [1..N], "distance", "fit": {"k1", "k2", "correlation", "steps"}, plus the settings}.
    """
    from tqdm.auto import tqdm

    guidance_scale = _GUIDANCE if guidance_scale is None else guidance_scale
    args = (pipe, prompts, seeds, num_inference_steps, guidance_scale)
    with tqdm(total=num_inference_steps + 1, desc="sensitivity") as bar:
        with _probed(pipe, _Perturber(noise, noise_seed, None)) as reference:
            clean = _generate(*args)
        bar.update()
        steps = list(range(1, reference.call + 1))  # denoiser calls; N for one-call-per-step samplers
        bar.total = len(steps) + 1
        fit_steps = _check_fit_steps(fit_steps, steps)
        distance = []
        for step in steps:
            with _probed(pipe, _Perturber(noise, noise_seed, step)):
                distance.append(float(np.abs(_generate(*args) - clean).mean()))
            bar.update()
    fit = fit_exponential(fit_steps, [distance[s - 1] for s in fit_steps])
    result = {"steps": steps, "distance": distance, "fit": fit, "noise": noise, "noise_seed": noise_seed,
              **_settings(*args)}
    if out is not None:
        write_json(Path(out) / "sensitivity.json", result)
        _plot_sensitivity(result, Path(out) / "sensitivity.png")
    return result


def _check_fit_steps(fit_steps, steps) -> list[int]:
    fit_steps = list(range(1, max(len(steps) - 1, 1))) if fit_steps is None else [int(s) for s in fit_steps]
    if len(fit_steps) < 2 or not set(fit_steps) <= set(steps):
        raise ValueError(f"fit_steps must be at least 2 of the calls {steps[0]}..{steps[-1]}, got {fit_steps} "
                         "(the default, 1..N-2, needs num_inference_steps >= 4).")
    return fit_steps


def _save_plot(fig, ax, path: Path) -> None:
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _plot_redundancy(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("self", "o"), ("cross", "s")):
        if result[kind]:
            ax.plot(result["steps"], result[kind], marker=marker, label=f"{kind}-attention")
    ax.set(xlabel="denoising step s", ylabel="mean TV distance of A(s) to A(s-1)",
           title=f"Attention map change per step ({result['scheduler']}, {result['num_inference_steps']} steps)")
    _save_plot(fig, ax, path)


def _plot_sensitivity(result: dict, path: Path) -> None:
    plt = pyplot()
    fit = result["fit"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["steps"], result["distance"], "o", label="measured")
    if math.isfinite(fit["k2"]):
        s = np.linspace(fit["steps"][0], fit["steps"][-1], 100)
        ax.plot(s, fit["k1"] * np.exp(-fit["k2"] * s), "-",
                label=f"$k_1 e^{{-k_2 s}}$, k2={fit['k2']:.3f}, r={fit['correlation']:.3f}")
    ax.set(xlabel="perturbed denoising step s", ylabel="mean |image - unperturbed| (0-1)",
           title=f"Sensitivity to attention noise {result['noise']:g} ({result['num_inference_steps']} steps)")
    _save_plot(fig, ax, path)
