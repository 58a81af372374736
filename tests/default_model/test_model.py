"""The shipped default model: a plain StableDiffusionPipeline folder that follows its captions."""

import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from attnreuse import Schedule, apply_attention_reuse
from attnreuse.default_model import DEFAULT_GUIDANCE, DEFAULT_MODEL_DIR, load_default_pipeline
from attnreuse.default_model.faithfulness import pass_rates
from attnreuse.default_model.splits import held_out_captions
from attnreuse.pipelines.sampling import generate

CAPTIONS = ["a red circle on the left", "a large blue square in the center", "a green triangle at the top",
            "a yellow circle left of a purple square", "a small orange square above a large blue circle"]


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


def test_loads_as_a_plain_stable_diffusion_pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR, safety_checker=None)
    assert pipe.unet.config.sample_size >= 16 and pipe.vae.config.latent_channels == 4
    kinds = {type(m).__name__ for m in pipe.unet.down_blocks[0].modules()}
    assert "Attention" in kinds  # self- and cross-attention at the highest latent resolution
    first = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert first.attn1.is_cross_attention is False and first.attn2.is_cross_attention is True
    total = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*.safetensors"))
    assert total <= 30 * 2**20
    card = (DEFAULT_MODEL_DIR / "README.md").read_text()
    assert "VAE reconstruction PSNR" in card and "two shapes" in card
    assert json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())["seed"] == 0


def test_fixed_seed_gives_the_same_image(pipe):
    a = generate(pipe, CAPTIONS[:2], [5, 6], num_inference_steps=10, guidance_scale=DEFAULT_GUIDANCE)
    b = generate(pipe, CAPTIONS[:2], [5, 6], num_inference_steps=10, guidance_scale=DEFAULT_GUIDANCE)
    assert a.shape == (2, 64, 64, 3) and np.array_equal(a, b)
    c = generate(pipe, CAPTIONS[:2], [7, 8], num_inference_steps=10, guidance_scale=DEFAULT_GUIDANCE)
    assert not np.array_equal(a, c)


@pytest.mark.slow
def test_end_to_end_with_and_without_reuse_follows_the_captions(pipe):
    """The model draws the named colors, shapes and positions of one-shape captions (94% pass on the held-out
    set, see the model card), and reuse keeps that."""
    prompts = CAPTIONS[:3] + held_out_captions(13, False)
    seeds = list(range(len(prompts)))
    kwargs = dict(num_inference_steps=20, guidance_scale=DEFAULT_GUIDANCE)
    full = generate(pipe, prompts, seeds, **kwargs)
    with apply_attention_reuse(pipe, Schedule.hurry(20, 6)) as handle:
        reused = generate(pipe, prompts, seeds, **kwargs)
        assert all(c["reused"] > 0 for c in handle.stats()["layers"].values())
    assert not np.array_equal(full, reused)  # reuse changed the images...
    for images in (full, reused):  # ...yet they still follow the captions as well as the full sampler does
        result = pass_rates(images, prompts)
        assert result["pass_rate"] >= 0.75, result
        assert min(result["parts"][p] for p in ("color", "shape", "position")) >= 0.8, result["parts"]
    assert abs(pass_rates(full, prompts)["pass_rate"] - pass_rates(reused, prompts)["pass_rate"]) <= 0.2


@pytest.mark.slow
def test_evaluation_writes_metrics_grid_and_model_card(tmp_path):
    import shutil

    from attnreuse.default_model.evaluate import evaluate_default

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    (model / "README.md").unlink()
    metrics = evaluate_default(model, count=4, steps=6, sweep=(2.0, 3.0), out=tmp_path / "eval", card=True)
    assert metrics["vae_psnr_db"] > 30
    assert metrics["one_shape"]["n"] == metrics["two_shapes"]["n"] == 4
    assert set(metrics["guidance_sweep_validation"]) == {"2.0", "3.0"}
    assert 0 <= metrics["one_shape_hurry3"]["pass_rate"] <= 1 and metrics["one_shape_hurry3"]["psnr_vs_full_db"] > 0
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["vae_psnr_db"] == metrics["vae_psnr_db"]
    assert (tmp_path / "eval" / "grid.png").stat().st_size > 0
    card = (model / "README.md").read_text()
    assert f"{metrics['vae_psnr_db']:.2f} dB" in card and "of 4;" in card
