"""Training the default model: deterministic from a seed, and an interrupted run resumes to the same weights."""

import pytest
import torch
from helpers import assert_same_weights

import attnreuse.default_model.train as train

pytestmark = pytest.mark.slow

TINY = dict(seed=3, vae_steps=3, unet_steps=3, vae_batch=2, unet_batch=2, checkpoint_every=1, vae_target_psnr=None,
            psnr_images=2)


UNET, VAE = "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"


def test_interrupted_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    straight = train.train_default(tmp_path / "straight", **TINY)

    real_batch, calls = train.batch, {"n": 0}

    def interrupting_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # somewhere in the UNet stage
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(train, "batch", interrupting_batch)
    with pytest.raises(KeyboardInterrupt):
        train.train_default(tmp_path / "resumed", **TINY)
    assert (tmp_path / "resumed" / "checkpoints" / "unet.pt").exists()
    assert not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(train, "batch", real_batch)
    resumed = train.train_default(tmp_path / "resumed", **TINY)

    assert_same_weights(straight, resumed, [VAE, UNET])
    log = (tmp_path / "resumed" / "checkpoints" / "log.json").read_text()
    assert '"stage": "unet"' in log and '"psnr_held_out"' in log


def test_time_budget_picks_a_step_count_that_reproduces_the_run(tmp_path, monkeypatch):
    """A budgeted run fixes its step count during the warm-up; asking for that count gives the same weights."""
    import json

    budgeted = train.train_default(tmp_path / "budget", **{**TINY, "unet_steps": 10_000, "warmup": 12},
                                   unet_budget_s=1.5)
    record = json.loads((budgeted / "training.json").read_text())
    count = record["unet_steps"]
    assert 12 <= count < 10_000 and record["unet_runs"] == [{"unet_steps": count, "from_step": 0}]
    fixed = train.train_default(tmp_path / "fixed", **{**TINY, "unet_steps": count, "warmup": 12})
    assert_same_weights(budgeted, fixed, [UNET])


def test_worker_processes_build_the_same_batches(tmp_path):
    """On CUDA the batches come from worker processes: each depends only on its step."""
    import functools

    from attnreuse.default_model.config import build_components

    tokenizer = build_components(0, tokenizer_dir=tmp_path)["tokenizer"]
    make = functools.partial(train._denoiser_item, seed=0, batch_size=3, tokenizer=tokenizer, drop_caption=0.5,
                             latent_shape=(4, 16, 16), num_train_timesteps=1000)
    loader = torch.utils.data.DataLoader(train._Steps(make, 5, 11), batch_size=None, num_workers=2)
    for step, got in zip(range(5, 11), loader):
        for a, b in zip(got, make(step)):
            assert torch.equal(a, b)


class _Payload:
    """What a planted checkpoint could carry: code that runs when the file is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_a_planted_or_foreign_checkpoint_is_refused_without_running_its_code(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "model": _Payload(str(marker))}, ckpt / "vae.pt")
    with pytest.raises(ValueError, match=r"vae.pt cannot be read .* delete it"):
        train.train_default(tmp_path / "run", **TINY)
    assert not marker.exists()
    torch.save({"step": 1, "setup": {"seed": 99}}, ckpt / "vae.pt")  # loadable, but from another setup
    with pytest.raises(ValueError, match="written for another setup"):
        train.train_default(tmp_path / "run", **TINY)


@pytest.mark.parametrize("bad", [dict(vae_steps=0), dict(unet_batch=-1), dict(unet_lr=float("nan")),
                                 dict(unet_steps=2.5)])
def test_a_bad_recipe_is_refused_before_any_folder_is_made(tmp_path, bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive"):
        train.train_default(tmp_path / "run", **{**TINY, **bad})
    assert not (tmp_path / "run").exists()
