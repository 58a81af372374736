"""Training the default model: deterministic from a seed, and an interrupted run resumes to the same weights."""

import pytest
import torch
from safetensors.torch import load_file

import attnreuse.train as train

TINY = dict(seed=3, vae_steps=3, unet_steps=3, vae_batch=2, unet_batch=2, checkpoint_every=1, vae_target_psnr=None,
            psnr_images=2)


def _weights(model_dir):
    return {name: load_file(model_dir / name / "diffusion_pytorch_model.safetensors") for name in ("vae", "unet")}


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

    a, b = _weights(straight), _weights(resumed)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=0)
    log = (tmp_path / "resumed" / "checkpoints" / "log.json").read_text()
    assert '"stage": "unet"' in log and '"psnr_held_out"' in log
