"""Training the default model from a seed: the VAE first, then the UNet and text encoder together.

Deterministic given the seed (data item i and the noise of step s depend only on them), with a progress bar,
periodic checkpoints and resume after an interruption (run the same command again), on CPU or CUDA.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .default_model import build_components
from .shapes import batch

__all__ = ["train_default", "vae_psnr", "HELD_OUT_OFFSET"]

HELD_OUT_OFFSET = 1_000_003  # held-out items use seed + this; training items use the seed itself


WARMUP = 100


def _lr(step, total, base):
    """Linear warm-up, then cosine decay to a tenth."""
    warmup = WARMUP
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(path: Path, log: list, **state):
    """A checkpoint and the training log beside it, each written atomically (an interruption never leaves a
    half-written file)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    log_tmp = path.parent / "log.json.tmp"
    log_tmp.write_text(json.dumps(log, indent=1))
    log_tmp.replace(path.parent / "log.json")


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


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
    drawn on the CPU); on CPU inline, where workers would only take cores from the model. Each batch depends only
    on its step, so workers, resumes and interruptions never change what a step sees."""
    workers = min(8, (os.cpu_count() or 2) - 1) if torch.device(device).type == "cuda" else 0
    loader = torch.utils.data.DataLoader(_Steps(make, first, last), batch_size=None, num_workers=workers,
                                         pin_memory=workers > 0, prefetch_factor=4 if workers else None)
    return iter(loader)


def _vae_item(step, seed, batch_size):
    return torch.from_numpy(batch(seed, step * batch_size, batch_size)[0])


def _unet_item(step, seed, batch_size, tokenizer, drop_caption, latent_shape, num_train_timesteps):
    """Step `step`'s images, token ids (captions dropped to "" at random, for classifier-free guidance), noise and
    timesteps, drawn from a generator seeded by (seed, step)."""
    images, captions, _ = batch(seed, step * batch_size, batch_size)
    generator = torch.Generator("cpu").manual_seed(seed * 104729 + step)
    drop = torch.rand(batch_size, generator=generator) < drop_caption
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    eps = torch.randn((batch_size, *latent_shape), generator=generator)
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    return torch.from_numpy(images), ids, eps, t


def _budgeted_steps(steps, step, started_at, rate_from, budget_s):
    """The step count that fits `budget_s` seconds of this stage, measured over the warm-up (the learning rate of
    the warm-up does not depend on the total, so fixing the total then is the same as having asked for it)."""
    rate = (step - rate_from[0]) / (time.perf_counter() - rate_from[1])
    return max(step + 1, min(steps, int(step + rate * (budget_s - (time.perf_counter() - started_at)))))


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


def _train_vae(vae, ckpt: Path, seed, steps, batch_size, lr, device, every, target_psnr, log, psnr_images):
    state = _load(ckpt)
    vae.to(device)  # before loading the optimizer's state, which then follows the parameters' device
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=_cuda(device))
    step, elapsed = 0, 0.0
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        if state.get("done"):
            return elapsed
    vae.train()
    bar = tqdm(total=steps, initial=step, desc="VAE", dynamic_ncols=True)
    start = time.perf_counter() - elapsed
    done = False
    data = _batches(functools.partial(_vae_item, seed=seed, batch_size=batch_size), step, steps, device)
    while step < steps and not done:
        x = next(data).to(device, non_blocking=True)
        generator = torch.Generator(device).manual_seed(seed * 7919 + step)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=device)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.5f}")
        if step % every == 0 or step == steps:
            psnr = vae_psnr(vae, seed, count=psnr_images, device=device)
            log.append({"stage": "vae", "step": step, "loss": loss.item(), "psnr_held_out": psnr,
                        "elapsed_s": time.perf_counter() - start})
            bar.write(f"VAE step {step}: held-out PSNR ({psnr_images} images) {psnr:.2f} dB")
            done = target_psnr is not None and psnr >= target_psnr
            _save(ckpt, log, model=vae.state_dict(), optimizer=optimizer.state_dict(), step=step,
                  elapsed=time.perf_counter() - start, done=done or step == steps)
    bar.close()
    return time.perf_counter() - start


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _train_unet(parts, ckpt: Path, seed, steps, batch_size, lr, device, every, log, ema_decay=0.999,
                drop_caption=0.1, min_snr=5.0, budget_s=None):
    from diffusers import DDPMScheduler

    unet, text_encoder, tokenizer, vae = parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"]
    noise = DDPMScheduler.from_config(parts["scheduler"].config)
    alphas = noise.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=_cuda(device))
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False), "text": copy.deepcopy(text_encoder).requires_grad_(False)}
    for m in (unet, text_encoder, ema["unet"], ema["text"]):
        m.to(device)  # before loading the optimizer's state, which then follows the parameters' device
    step, elapsed, runs = 0, 0.0, []
    state = _load(ckpt)
    if state is not None:
        runs = state.get("runs", [{"unet_steps": state["step"], "from_step": 0}])
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text"])
        ema["unet"].load_state_dict(state["ema_unet"])
        ema["text"].load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        if budget_s is not None and step >= WARMUP:  # the interrupted run already turned its budget into steps
            steps, budget_s = runs[-1]["unet_steps"], None
    if not runs or runs[-1]["unet_steps"] != steps:  # a longer schedule resumed from a finished one: record it
        runs.append({"unet_steps": steps, "from_step": step})
    unet.train()
    text_encoder.train()
    vae.to(device).eval()
    scaling = vae.config.scaling_factor
    pairs = [(list(ema["unet"].parameters()) + list(ema["text"].parameters())), params]
    make = functools.partial(_unet_item, seed=seed, batch_size=batch_size, tokenizer=tokenizer,
                             drop_caption=drop_caption, latent_shape=(unet.config.in_channels, *([unet.config.sample_size] * 2)),
                             num_train_timesteps=noise.config.num_train_timesteps)
    data = _batches(make, step, steps, device)
    bar = tqdm(total=steps, initial=step, desc="UNet + text encoder", dynamic_ncols=True)
    start = time.perf_counter() - elapsed
    timed_from = (step + 5, None)  # the rate is measured from the 5th step of this process on (after warm-up)
    while step < steps:
        if budget_s is not None:
            if step == timed_from[0]:
                timed_from = (step, time.perf_counter())
            elif timed_from[1] is not None and step >= max(WARMUP, timed_from[0] + 5) - 1:
                steps = _budgeted_steps(steps, step, start, timed_from, budget_s)
                runs[-1]["unet_steps"], bar.total, budget_s = steps, steps, None
                bar.write(f"time budget: training {steps} UNet steps")
        images, ids, eps, t = (x.to(device, non_blocking=True) for x in next(data))
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mode() * scaling
        noisy = noise.add_noise(latents, eps, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=min_snr) / snr  # min-SNR weighting (Hang et al. 2023): faster convergence
        loss = (weight * (pred - eps).pow(2).flatten(1).mean(1)).mean()
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(pairs[0], pairs[1], 1 - decay)
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % every == 0 or step == steps:
            log.append({"stage": "unet", "step": step, "loss": loss.item(), "elapsed_s": time.perf_counter() - start})
            _save(ckpt, log, unet=unet.state_dict(), text=text_encoder.state_dict(), ema_unet=ema["unet"].state_dict(),
                  ema_text=ema["text"].state_dict(), optimizer=optimizer.state_dict(), step=step,
                  elapsed=time.perf_counter() - start, runs=runs)
    bar.close()
    return ema, time.perf_counter() - start, runs


def train_default(out: str | Path, seed: int = 0, vae_steps: int = 1500, unet_steps: int = 3000,
                  vae_batch: int = 16, unet_batch: int = 32, vae_lr: float = 1e-3, unet_lr: float = 5e-4,
                  device: str = "cpu", checkpoint_every: int = 100, vae_target_psnr: float | None = 32.0,
                  psnr_images: int = 100, unet_budget_s: float | None = None):
    """Train the default model into `out` (a `StableDiffusionPipeline` folder); resumes from `out/checkpoints`.

    The VAE stops early once 100 held-out images reconstruct above `vae_target_psnr` dB. `unet_budget_s`: train
    the UNet for as many steps (at most `unet_steps`) as fit this many seconds, fixed from the warm-up's speed;
    the count is recorded, so `--unet-steps COUNT` reproduces the run on any machine.
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if _cuda(device):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matrix products: the usual precision for training
    parts = build_components(seed, tokenizer_dir=out / "tokenizer")
    log_path = ckpt / "log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else []
    vae_time = _train_vae(parts["vae"], ckpt / "vae.pt", seed, vae_steps, vae_batch, vae_lr, device,
                          checkpoint_every, vae_target_psnr, log, psnr_images)
    with torch.no_grad():  # scale latents to unit variance, as Stable Diffusion's 0.18215 does
        images, _, _ = batch(seed, 0, 256)
        latents = parts["vae"].to(device).eval().encode(torch.from_numpy(images).to(device)).latent_dist.mode()
        parts["vae"].register_to_config(scaling_factor=float(1.0 / latents.std()))
    ema, unet_time, unet_runs = _train_unet(parts, ckpt / "unet.pt", seed, unet_steps, unet_batch, unet_lr, device,
                                            checkpoint_every, log, budget_s=unet_budget_s)
    pipe = StableDiffusionPipeline(vae=parts["vae"].cpu(), text_encoder=ema["text"].cpu(), tokenizer=parts["tokenizer"],
                                   unet=ema["unet"].cpu(), scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "model", safe_serialization=True)
    from .sampling import device_name

    info = {"hardware": device_name(device), "seed": seed, "vae_steps": vae_steps, "unet_steps": unet_runs[-1]["unet_steps"], "vae_batch": vae_batch,
            "unet_batch": unet_batch, "vae_lr": vae_lr, "unet_lr": unet_lr, "device": device,
            "vae_train_s": vae_time, "unet_train_s": unet_time,
            "vae_stopped_at": _load(ckpt / "vae.pt")["step"], "unet_runs": unet_runs,
            "vae_held_out_psnr_log": [(e["step"], round(e["psnr_held_out"], 2)) for e in log if e["stage"] == "vae"]}
    (out / "model" / "training.json").write_text(json.dumps(info, indent=1))
    return out / "model"
