"""The tiny transformer (DiT) and ControlNet pipelines of attnreuse.pipelines.tiny, its model-only denoisers, and the
benchmark builders of the published transformer configs at reduced size. All local, random weights, CPU."""

import json
from importlib import resources

import numpy as np
import pytest
import torch

from attnreuse.bench.models import TRANSFORMERS, build_transformer, build_unet, resolution
from attnreuse.pipelines.tiny import (
    ARCHS,
    MODEL_ONLY,
    arch_spec,
    build_denoiser,
    build_pipeline,
    control_image,
    example_call,
)

# diffusers' own FluxControlNetModel still imports FluxPosEmbed from its old place
pytestmark = pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")

PIPELINES = ["tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-sd-controlnet", "tiny-flux-controlnet"]
CLASSES = {"tiny-pixart": "PixArtSigmaPipeline", "tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline",
           "tiny-sd-controlnet": "StableDiffusionControlNetPipeline", "tiny-flux-controlnet": "FluxControlNetPipeline"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread: on a busy 2-core machine two threads wait on each other 10-100x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(pipe, arch, seed, prompt="a red circle"):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **example_call(arch)).images


@pytest.mark.parametrize("arch", PIPELINES)
def test_each_tiny_pipeline_generates_a_finite_image_of_its_size_the_same_for_a_seed(arch):
    pipe = build_pipeline(arch, seed=0)
    assert CLASSES[arch] in {cls.__name__ for cls in type(pipe).__mro__}
    first, again, other = _generate(pipe, arch, 0), _generate(pipe, arch, 0), _generate(pipe, arch, 1)
    size = ARCHS[arch]["size"]
    assert first.shape == (1, size, size, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3  # not a saturated constant image: the seed matters


def test_every_arch_names_its_family_and_size():
    assert {arch: ARCHS[arch]["family"] for arch in PIPELINES} == {
        "tiny-pixart": "pixart", "tiny-sd3": "sd3", "tiny-flux": "flux", "tiny-sd-controlnet": "unet",
        "tiny-flux-controlnet": "flux"}
    for arch in ("tiny-sd", "tiny-sdxl", "sd15", "small-sd"):
        assert ARCHS[arch]["family"] == "unet"
    for arch, spec in {**ARCHS, **MODEL_ONLY}.items():
        assert isinstance(spec["size"], int) and spec["size"] > 0, arch
        assert arch_spec(arch) is spec
    with pytest.raises(ValueError, match="Unknown architecture"):
        arch_spec("tiny-nothing")
    with pytest.raises(ValueError, match="build_denoiser"):
        build_pipeline("tiny-wan")


def test_the_tiny_transformers_cover_joint_dual_and_single_stream_attention():
    sd3 = build_pipeline("tiny-sd3").transformer
    assert sd3.config.qk_norm == "rms_norm" and sd3.config.dual_attention_layers == (0,)
    assert sd3.transformer_blocks[0].attn2 is not None  # SD3.5's second, image-only attention
    flux = build_pipeline("tiny-flux").transformer
    assert len(flux.transformer_blocks) >= 1 and len(flux.single_transformer_blocks) >= 1
    assert sum(flux.config.axes_dims_rope) == flux.config.attention_head_dim


@pytest.mark.parametrize("arch", ["tiny-sd-controlnet", "tiny-flux-controlnet"])
def test_a_tiny_controlnet_changes_the_image_with_its_control_image(arch):
    pipe = build_pipeline(arch)
    key = "control_image" if ARCHS[arch]["family"] == "flux" else "image"
    first = _generate(pipe, arch, 0)
    turned = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np",
                  **dict(example_call(arch), **{key: control_image(ARCHS[arch]["size"]).rotate(45)})).images
    assert not np.array_equal(first, turned)


def test_tiny_sd_controlnet_keeps_tiny_sd_weights():
    plain, controlled = build_pipeline("tiny-sd", seed=3), build_pipeline("tiny-sd-controlnet", seed=3)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(plain, name).state_dict(), getattr(controlled, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _family(arch):
    return TRANSFORMERS[arch]["family"] if arch in TRANSFORMERS else arch_spec(arch)["family"]


def _expected_shape(arch, inputs):
    """What a denoiser returns: its latents' shape, with PixArt's learned variance doubling the channels."""
    shape = tuple(inputs["hidden_states"].shape)
    return (shape[0], 2 * shape[1], *shape[2:]) if _family(arch) == "pixart" else shape


def _published(arch):
    return json.loads(resources.files("attnreuse.bench").joinpath(f"configs/{arch}_transformer.json").read_text())


@pytest.mark.parametrize("arch,shape", [("tiny-pixart", (2, 4, 16, 16)), ("tiny-sd3", (2, 16, 16, 16)),
                                        ("tiny-flux", (2, 64, 64)), ("tiny-wan", (2, 16, 3, 16, 16))])
def test_build_denoiser_gives_a_model_and_the_inputs_of_one_call(arch, shape):
    model, inputs = build_denoiser(arch, batch=2, text_tokens=8)
    assert tuple(inputs["hidden_states"].shape) == shape
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert tuple(out.shape) == _expected_shape(arch, inputs)
    assert torch.isfinite(out).all()


def test_build_denoiser_has_the_pipelines_weights_and_its_options():
    model, inputs = build_denoiser("tiny-flux")
    pipe = build_pipeline("tiny-flux")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pipe.transformer.state_dict().values()))
    assert inputs["encoder_hidden_states"].shape[1] == 512 and inputs["txt_ids"].shape == (512, 3)
    assert inputs["img_ids"].shape == (64, 3) and "guidance" in inputs
    model, inputs = build_denoiser("tiny-sd3", layers=1, size=64, dtype=torch.bfloat16)
    assert len(model.transformer_blocks) == 1 and model.config.dual_attention_layers == (0,)
    assert inputs["hidden_states"].shape == (1, 16, 32, 32) and inputs["hidden_states"].dtype == torch.bfloat16
    assert inputs["encoder_hidden_states"].shape[1] == 333  # 77 CLIP + 256 T5 tokens, as the pipeline sends
    model, inputs = build_denoiser("tiny-pixart")
    assert inputs["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    with pytest.raises(ValueError, match="block count"):
        build_denoiser("tiny-sd", layers=1)


@pytest.mark.parametrize("arch,key,value", [("pixart-sigma", "num_layers", 28), ("sd3-medium", "num_layers", 24),
                                            ("flux-dev", "num_single_layers", 38)])
def test_the_published_transformer_configs_are_kept_with_their_source(arch, key, value):
    config = _published(arch)
    assert config["_comment"] and config[key] == value
    assert resolution(arch) == 1024


@pytest.mark.parametrize("arch", ["pixart-sigma", "sd3-medium",
                                  pytest.param("flux-dev", marks=pytest.mark.slow)])  # 1+1 blocks: 550M params
def test_build_transformer_runs_a_published_config_at_reduced_size(arch):
    model, inputs = build_transformer(arch, "cpu", torch.float32, 1, size=128, layers=1, text_tokens=16)
    published = _published(arch)
    for key in ("num_attention_heads", "attention_head_dim", "in_channels"):  # widths as published
        assert model.config[key] == published[key], key
    blocks = [m for name, m in model.named_children() if "transformer_blocks" in name]
    assert blocks and all(len(b) == 1 for b in blocks)
    assert inputs["encoder_hidden_states"].shape[1] == 16
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert tuple(out.shape) == _expected_shape(arch, inputs)
    assert torch.isfinite(out).all()


def test_build_transformer_builds_tiny_ones_and_build_unet_refuses_transformers():
    model, inputs = build_transformer("tiny-sd3", "cpu", torch.float32, 2, layers=1)
    assert inputs["hidden_states"].shape[0] == 2 and len(model.transformer_blocks) == 1
    with pytest.raises(ValueError, match="build_transformer"):
        build_unet("tiny-flux", "cpu", torch.float32, 2)
    with pytest.raises(ValueError, match="Unknown transformer"):
        build_transformer("tiny-sd", "cpu", torch.float32, 2)
