"""Training a default model from a seed: the VAE first, then the denoiser and text encoder together.

One recipe for both denoiser families (`Recipe.arch`): "unet" trains the VAE, then the UNet with its CLIP text
encoder; "dit" reuses the shipped UNet model's VAE (frozen) and trains a PixArt transformer with a T5 text encoder,
with the same data, loss (epsilon, min-SNR weighting), caption dropout, optimizer, schedule, EMA and checkpoints.
The `unet_*` fields set the denoiser stage of either family.

Deterministic given the seed (data item i and the noise of step s depend only on them), with a progress bar,
periodic checkpoints and resume after an interruption (run the same command again), on CPU or CUDA.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import atomic_write, read_json, write_json
from ..pipelines.timing import device_name
from .config import ARCHS, MAX_TOKENS, build_components
from .shapes import batch
from .splits import HELD_OUT_OFFSET

__all__ = ["Recipe", "FAMILIES", "train_default", "vae_psnr"]


@dataclass(frozen=True)
class Recipe:
    """What a training run depends on; the step counts and the time budget may grow when a run is resumed."""

    seed: int = 0
    vae_steps: int = 1500
    unet_steps: int = 3000
    vae_batch: int = 16
    unet_batch: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    device: str = "cpu"
    checkpoint_every: int = 100
    vae_target_psnr: float | None = 32.0  # stop the VAE early once held-out images reconstruct this well
    psnr_images: int = 100
    unet_budget_s: float | None = None
    warmup: int = 100  # learning-rate warm-up steps
    ema_decay: float = 0.999
    drop_caption: float = 0.1  # share of empty captions, for classifier-free guidance
    min_snr: float = 5.0
    arch: str = "unet"  # the denoiser family: "unet", or "dit" (the shipped VAE, frozen; no VAE stage)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}.")
        for name in ("vae_steps", "unet_steps", "vae_batch", "unet_batch", "checkpoint_every", "psnr_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}.")
        for name in ("vae_lr", "unet_lr", "unet_budget_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")

    @property
    def setup(self) -> dict:
        """What a checkpoint must agree on to be resumed (a UNet run's as before `arch` existed, so that its
        checkpoints still resume)."""
        keys = ("seed", "unet_batch", "unet_lr", "ema_decay", "drop_caption", "min_snr", "warmup")
        if self.arch == "unet":
            return {k: v for k, v in asdict(self).items() if k in keys + ("vae_batch", "vae_lr")}
        return {**{k: v for k, v in asdict(self).items() if k in keys}, "arch": self.arch}

    @property
    def recorded(self) -> dict:
        """The fields that training.json records: those this family uses, less the time budget (the step count
        it fixed is recorded instead)."""
        unused = ("unet_budget_s",) if self.arch == "unet" else ("unet_budget_s", "vae_steps", "vae_batch", "vae_lr",
                                                                 "vae_target_psnr", "psnr_images")
        return {k: v for k, v in asdict(self).items() if k not in unused}


@dataclass(frozen=True)
class _Family:
    """What differs between the denoiser families in training: the pipeline attribute of the denoiser (also its
    key in checkpoints), the checkpoint file, the progress bar's label and the token ids per training caption
    (None: the tokenizer's length; the T5 encoder is masked, so its captions need only fit)."""

    denoiser: str
    checkpoint: str
    label: str
    max_length: int | None = None


FAMILIES = {"unet": _Family("unet", "unet.pt", "UNet + text encoder"),
            "dit": _Family("transformer", "dit.pt", "transformer + text encoder", MAX_TOKENS)}


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(path: Path, log: list, **state) -> None:
    """A checkpoint and the training log beside it, each written atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    write_json(path.parent / "log.json", log)


def _load(path: Path, recipe: Recipe):
    """A checkpoint written for this recipe's setup, or None; a damaged or foreign one is a clear error."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: say which and how to start over
        raise ValueError(f"The checkpoint {path} cannot be read ({type(err).__name__}: damaged, or holding more than "
                         "tensors and numbers); delete it (or the whole --out folder) to start over.") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"The checkpoint {path} is not a training checkpoint; delete it to start over.")
    if state.get("setup", recipe.setup) != recipe.setup:
        raise ValueError(f"The checkpoint {path} was written for another setup ({state['setup']}, here "
                         f"{recipe.setup}); use another --out or delete {path.parent} to start over.")
    return state


class _Steps(torch.utils.data.Dataset):
    """`make(step)` for the steps first..last-1 (a map-style data set, so worker processes can build them)."""

    def __init__(self, make, first, last):
        self.make, self.first, self.last = make, first, last

    def __len__(self):
        return max(0, self.last - self.first)

    def __getitem__(self, i):
        return self.make(self.first + i)


def _batches(make, first: int, last: int, device):
    """The batches of steps first..last-1. On CUDA, worker processes render them ahead of the GPU (the data set is
    drawn on the CPU); on CPU inline, where workers would only take cores from the model."""
    workers = min(8, (os.cpu_count() or 2) - 1) if torch.device(device).type == "cuda" else 0
    loader = torch.utils.data.DataLoader(_Steps(make, first, last), batch_size=None, num_workers=workers,
                                         pin_memory=workers > 0, prefetch_factor=4 if workers else None)
    return iter(loader)


def _vae_item(step, seed, batch_size):
    return torch.from_numpy(batch(seed, step * batch_size, batch_size)[0])


def _denoiser_item(step, seed, batch_size, tokenizer, drop_caption, latent_shape, num_train_timesteps,
                   max_length=None):
    """Step `step`'s images, token ids and their attention mask (captions dropped to "" at random, for
    classifier-free guidance; `max_length` ids each, by default the tokenizer's), noise and timesteps, drawn from a
    generator seeded by (seed, step)."""
    images, captions, _ = batch(seed, step * batch_size, batch_size)
    generator = torch.Generator("cpu").manual_seed(seed * 104729 + step)
    drop = torch.rand(batch_size, generator=generator) < drop_caption
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    tokens = tokenizer(captions, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    eps = torch.randn((batch_size, *latent_shape), generator=generator)
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    return torch.from_numpy(images), tokens.input_ids, tokens.attention_mask, eps, t


@torch.no_grad()
def vae_psnr(vae, seed: int, count: int = 500, batch_size: int = 50, device="cpu") -> float:
    """Mean per-image PSNR (dB, images in [0, 1]) of VAE reconstructions of held-out data set items."""
    vae.eval()
    values = []
    for start in range(0, count, batch_size):
        images, _, _ = batch(seed + HELD_OUT_OFFSET, start, min(batch_size, count - start))
        x = torch.from_numpy(images).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
        values.extend((10 * torch.log10(1 / mse.clamp_min(1e-12))).tolist())
    vae.train()
    return float(np.mean(values))


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _set_lr(optimizer, step: int, total: int, base: float, warmup: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = _lr(step, total, base, warmup)


def _vae_loss(vae, x, generator):
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=x.device)
    return F.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()


def _train_vae(vae, ckpt: Path, recipe: Recipe, log: list) -> float:
    r = recipe
    state = _load(ckpt, r)
    vae.to(r.device)  # before loading the optimizer's state, which then follows the parameters' device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0, fused=_cuda(r.device))
    step, elapsed = 0, 0.0
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        if state.get("done"):
            return elapsed
    vae.train()
    bar = tqdm(total=r.vae_steps, initial=step, desc="VAE", dynamic_ncols=True)
    start, done = time.perf_counter() - elapsed, False
    data = _batches(functools.partial(_vae_item, seed=r.seed, batch_size=r.vae_batch), step, r.vae_steps, r.device)
    while step < r.vae_steps and not done:
        x = next(data).to(r.device, non_blocking=True)
        loss = _vae_loss(vae, x, torch.Generator(r.device).manual_seed(r.seed * 7919 + step))
        _set_lr(optimizer, step, r.vae_steps, r.vae_lr, r.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if step % r.checkpoint_every == 0 or step == r.vae_steps:
            psnr = vae_psnr(vae, r.seed, count=r.psnr_images, device=r.device)
            log.append({"stage": "vae", "step": step, "loss": loss.item(), "psnr_held_out": psnr,
                        "elapsed_s": time.perf_counter() - start})
            bar.write(f"VAE step {step}: held-out PSNR ({r.psnr_images} images) {psnr:.2f} dB")
            done = r.vae_target_psnr is not None and psnr >= r.vae_target_psnr
            _save(ckpt, log, model=vae.state_dict(), optimizer=optimizer.state_dict(), step=step, setup=r.setup,
                  elapsed=time.perf_counter() - start, done=done or step == r.vae_steps)
    bar.close()
    return time.perf_counter() - start


class _DenoiserStage:
    """The denoiser (UNet or transformer) and text encoder, their EMA copies and optimizer, and where training
    stands."""

    def __init__(self, parts: dict, recipe: Recipe):
        from diffusers import DDPMScheduler

        self.parts, self.recipe, self.family = parts, recipe, FAMILIES[recipe.arch]
        self.denoiser, self.text_encoder = parts[self.family.denoiser], parts["text_encoder"]
        self.noise = DDPMScheduler.from_config(parts["scheduler"].config)
        self.alphas = self.noise.alphas_cumprod.to(recipe.device)
        self.params = list(self.denoiser.parameters()) + list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=recipe.unet_lr, weight_decay=1e-2,
                                           fused=_cuda(recipe.device))
        self.ema = {self.family.denoiser: copy.deepcopy(self.denoiser).requires_grad_(False),
                    "text": copy.deepcopy(self.text_encoder).requires_grad_(False)}
        for m in (self.denoiser, self.text_encoder, *self.ema.values()):
            m.to(recipe.device)  # before loading the optimizer's state, which then follows the parameters' device
        self.step, self.elapsed, self.runs, self.steps = 0, 0.0, [], recipe.unet_steps
        self.budget_s = recipe.unet_budget_s

    def _modules(self) -> dict:
        """The checkpoint's keys of what it holds: for the UNet "unet", "text", "ema_unet", "ema_text", "optimizer"
        (for the DiT "transformer" and "ema_transformer" in place of the UNet's)."""
        name = self.family.denoiser
        return {name: self.denoiser, "text": self.text_encoder, f"ema_{name}": self.ema[name],
                "ema_text": self.ema["text"], "optimizer": self.optimizer}

    def resume(self, state) -> None:
        if state is not None:
            self.runs = state.get("runs", [{"unet_steps": state["step"], "from_step": 0}])
            for key, model in self._modules().items():
                model.load_state_dict(state[key])
            self.step, self.elapsed = state["step"], state["elapsed"]
            if self.budget_s is not None and self.step >= self.recipe.warmup:  # the budget already set the steps
                self.steps, self.budget_s = self.runs[-1]["unet_steps"], None
        if not self.runs or self.runs[-1]["unet_steps"] != self.steps:  # a longer schedule resumed: record it
            self.runs.append({"unet_steps": self.steps, "from_step": self.step})

    def predict(self, noisy, t, ids, mask):
        """The denoiser's noise prediction, as its pipeline calls it (the SD pipeline gives CLIP no mask)."""
        if self.family.denoiser == "unet":
            return self.denoiser(noisy, t, encoder_hidden_states=self.text_encoder(ids)[0]).sample
        text = self.text_encoder(ids, attention_mask=mask)[0]
        return self.denoiser(noisy, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    def loss(self, images, ids, mask, eps, t):
        vae = self.parts["vae"]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
        pred = self.predict(self.noise.add_noise(latents, eps, t), t, ids, mask)
        snr = self.alphas[t] / (1 - self.alphas[t])
        weight = torch.clamp(snr, max=self.recipe.min_snr) / snr  # min-SNR weighting (Hang et al. 2023)
        return (weight * (pred - eps).pow(2).flatten(1).mean(1)).mean()

    def update(self, loss) -> None:
        r = self.recipe
        _set_lr(self.optimizer, self.step, self.steps, r.unet_lr, r.warmup)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        decay = min(r.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema[self.family.denoiser].parameters()) +
                                 list(self.ema["text"].parameters()), self.params, 1 - decay)
        self.step += 1

    def checkpoint(self) -> dict:
        return dict(**{key: m.state_dict() for key, m in self._modules().items()}, step=self.step, runs=self.runs,
                    setup=self.recipe.setup)

    def data(self):
        config, r = self.denoiser.config, self.recipe
        make = functools.partial(_denoiser_item, seed=r.seed, batch_size=r.unet_batch,
                                 tokenizer=self.parts["tokenizer"], drop_caption=r.drop_caption,
                                 latent_shape=(config.in_channels, *([config.sample_size] * 2)),
                                 num_train_timesteps=self.noise.config.num_train_timesteps,
                                 max_length=self.family.max_length)
        return _batches(make, self.step, self.steps, r.device)


def _budgeted_steps(steps, step, started_at, rate_from, budget_s):
    """The step count that fits `budget_s` seconds of this stage, measured over the warm-up (the learning rate of
    the warm-up does not depend on the total, so fixing the total then is the same as having asked for it)."""
    rate = (step - rate_from[0]) / (time.perf_counter() - rate_from[1])
    return max(step + 1, min(steps, int(step + rate * (budget_s - (time.perf_counter() - started_at)))))


def _train_denoiser(parts: dict, ckpt: Path, recipe: Recipe, log: list):
    """The denoiser stage of either family: returns the EMA models, the stage's seconds and its runs."""
    stage = _DenoiserStage(parts, recipe)
    stage.resume(_load(ckpt, recipe))
    stage.denoiser.train()
    stage.text_encoder.train()
    parts["vae"].to(recipe.device).eval()
    data = stage.data()
    bar = tqdm(total=stage.steps, initial=stage.step, desc=stage.family.label, dynamic_ncols=True)
    start = time.perf_counter() - stage.elapsed
    timed_from = (stage.step + 5, None)  # the rate is measured from the 5th step of this process on
    while stage.step < stage.steps:
        if stage.budget_s is not None:
            if stage.step == timed_from[0]:
                timed_from = (stage.step, time.perf_counter())
            elif timed_from[1] is not None and stage.step >= max(recipe.warmup, timed_from[0] + 5) - 1:
                stage.steps = _budgeted_steps(stage.steps, stage.step, start, timed_from, stage.budget_s)
                stage.runs[-1]["unet_steps"], bar.total, stage.budget_s = stage.steps, stage.steps, None
                bar.write(f"time budget: training {stage.steps} {recipe.arch} steps")
        loss = stage.loss(*(x.to(recipe.device, non_blocking=True) for x in next(data)))
        stage.update(loss)
        bar.update(1)
        if stage.step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if stage.step % recipe.checkpoint_every == 0 or stage.step == stage.steps:
            log.append({"stage": recipe.arch, "step": stage.step, "loss": loss.item(),
                        "elapsed_s": time.perf_counter() - start})
            _save(ckpt, log, **stage.checkpoint(), elapsed=time.perf_counter() - start)
    bar.close()
    return stage.ema, time.perf_counter() - start, stage.runs


@contextmanager
def _tf32(device):
    """TF32 matrix products on CUDA (the usual precision for training) while training, restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = before or _cuda(device)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _scale_latents(vae, seed: int, device) -> None:
    """Scale latents to unit variance, as Stable Diffusion's 0.18215 does."""
    with torch.no_grad():
        images, _, _ = batch(seed, 0, 256)
        latents = vae.to(device).eval().encode(torch.from_numpy(images).to(device)).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def _pipeline(parts: dict, ema: dict, arch: str):
    """The trained pipeline of `arch`, its models (the EMA copies) on the CPU."""
    from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline

    common = dict(vae=parts["vae"].cpu(), text_encoder=ema["text"].cpu(), tokenizer=parts["tokenizer"],
                  scheduler=parts["scheduler"])
    if arch == "dit":
        return PixArtAlphaPipeline(transformer=ema["transformer"].cpu(), **common)
    return StableDiffusionPipeline(unet=ema["unet"].cpu(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False, **common)


def _write_model(out: Path, pipe) -> Path:
    """The trained pipeline folder, written whole under a temporary name and then renamed into place."""
    import shutil

    model, partial = out / "model", out / ".model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    shutil.rmtree(model, ignore_errors=True)
    partial.rename(model)
    return model


def _check_out(ckpt: Path, arch: str) -> None:
    """Refuse a work folder that holds the other family's run (both write tokenizer/ and model/ there)."""
    for other in ARCHS:
        files = ("vae.pt", "unet.pt") if other == "unet" else (FAMILIES[other].checkpoint,)
        if other != arch and any((ckpt / name).exists() for name in files):
            raise ValueError(f"{ckpt.parent} holds a training run of the {other} model; use another --out for "
                             f"--arch {arch}.")


def _vae_stage(vae, ckpt: Path, r: Recipe, log: list) -> dict:
    """The UNet family's VAE stage (train, then scale the latents), and what training.json records of it; the DiT
    reuses the shipped VAE as it is."""
    if r.arch != "unet":
        return {"vae": "the shipped UNet model's VAE (attnreuse/default_model/weights/vae), frozen"}
    vae_time = _train_vae(vae, ckpt / "vae.pt", r, log)
    _scale_latents(vae, r.seed, r.device)
    return {"vae_train_s": vae_time, "vae_stopped_at": _load(ckpt / "vae.pt", r)["step"],
            "vae_held_out_psnr_log": [(e["step"], round(e["psnr_held_out"], 2)) for e in log if e["stage"] == "vae"]}


def train_default(out: str | Path, **recipe) -> Path:
    """Train a default model into `out/model` (a `StableDiffusionPipeline` folder, or with `arch="dit"` a
    `PixArtAlphaPipeline` one); resumes from `out/checkpoints`. `recipe`: the fields of `Recipe`. `unet_budget_s`
    trains the denoiser for as many steps (at most `unet_steps`) as fit that many seconds, fixed from the warm-up's
    speed; the count is recorded, so `--unet-steps COUNT` reproduces the run on any machine."""
    r = Recipe(**recipe)
    out = Path(out)
    ckpt = out / "checkpoints"
    _check_out(ckpt, r.arch)
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(r.seed)
    log_path = ckpt / "log.json"
    log = read_json(log_path, "training log") if log_path.exists() else []
    with _tf32(r.device):
        parts = build_components(r.seed, tokenizer_dir=out / "tokenizer", arch=r.arch)
        vae_info = _vae_stage(parts["vae"], ckpt, r, log)
        ema, unet_time, unet_runs = _train_denoiser(parts, ckpt / FAMILIES[r.arch].checkpoint, r, log)
    model = _write_model(out, _pipeline(parts, ema, r.arch))
    info = {"hardware": device_name(r.device), **r.recorded, "unet_steps": unet_runs[-1]["unet_steps"],
            "unet_train_s": unet_time, "unet_runs": unet_runs, **vae_info}
    write_json(model / "training.json", info)
    return model
