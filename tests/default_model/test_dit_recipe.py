"""The DiT default model's recipe (`train-default --arch dit`): a tiny run makes a plain `PixArtAlphaPipeline` folder
that draws 64x64 images, an interrupted run resumes to the same weights, and it is loaded, evaluated and carded like
the UNet model."""

import json

import pytest
import torch
from diffusers import PixArtAlphaPipeline
from helpers import assert_same_weights
from safetensors.torch import load_file

import attnreuse.default_model as default_model
import attnreuse.default_model.train as train
from attnreuse.cli import main
from attnreuse.default_model import DEFAULT_MODEL_DIR, load_default_pipeline
from attnreuse.default_model.config import MAX_TOKENS

TINY = dict(arch="dit", seed=3, unet_steps=3, unet_batch=2, checkpoint_every=1)
NO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train.train_default(tmp_path_factory.mktemp("dit") / "straight", **TINY)


TRAINED = ["transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]


@pytest.mark.slow
def test_a_tiny_run_writes_a_plain_pixart_folder_that_draws_64px_images(trained):
    pipe = PixArtAlphaPipeline.from_pretrained(trained)
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel"
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn1.is_cross_attention is False and block.attn2.is_cross_attention is True
    # diffusers bins PixArt resolutions for 256-1024 px models only, so a plain pipeline needs binning off
    image = pipe("a red circle", num_inference_steps=2, use_resolution_binning=False, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    shipped = load_file(DEFAULT_MODEL_DIR / "vae" / "diffusion_pytorch_model.safetensors")
    copied = load_file(trained / "vae" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == copied.keys() and all(torch.equal(shipped[k], copied[k]) for k in shipped)
    assert sum(f.stat().st_size for f in trained.rglob("*.safetensors")) <= 30 * 2**20
    record = json.loads((trained / "training.json").read_text())
    assert record["arch"] == "dit" and record["unet_steps"] == 3 and "vae_steps" not in record


@pytest.mark.slow
def test_the_loader_returns_it_with_call_defaults_that_work(trained, tmp_path):
    pipe = load_default_pipeline(trained)
    assert isinstance(pipe, PixArtAlphaPipeline)
    assert pipe("a red circle").images[0].size == (64, 64)  # every default: 20 steps, binning and cleaning off
    pipe.save_pretrained(tmp_path / "again")  # still a plain folder when saved from the loader's pipeline
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"


@pytest.mark.slow
def test_interrupted_training_resumes_to_identical_weights(trained, tmp_path, monkeypatch):
    real_batch, calls = train.batch, {"n": 0}

    def interrupting_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after two checkpointed steps
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(train, "batch", interrupting_batch)
    with pytest.raises(KeyboardInterrupt):
        train.train_default(tmp_path / "resumed", **TINY)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "dit.pt", weights_only=True)
    assert state["step"] == 2 and state["setup"]["arch"] == "dit" and not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(train, "batch", real_batch)
    resumed = train.train_default(tmp_path / "resumed", **TINY)
    assert_same_weights(trained, resumed, TRAINED)
    log = json.loads((tmp_path / "resumed" / "checkpoints" / "log.json").read_text())
    assert [e["step"] for e in log if e["stage"] == "dit"] == [1, 2, 3]


@pytest.mark.slow
def test_captions_padded_for_training_encode_as_the_pipeline_pads_them(trained):
    """Training pads captions to MAX_TOKENS, the pipeline to 120: the mask makes them the same."""
    pipe = PixArtAlphaPipeline.from_pretrained(trained)
    torch.manual_seed(0)
    for block in pipe.transformer.transformer_blocks:  # zero at initialisation: make the text matter
        torch.nn.init.normal_(block.attn2.to_out[0].weight, std=0.2)
    captions = ["a small orange triangle left of a large purple circle", "a red circle", ""]
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([999, 500, 20])
    outs = []
    with torch.no_grad():
        for length in (MAX_TOKENS, 120):
            tokens = pipe.tokenizer(captions, padding="max_length", max_length=length, return_tensors="pt")
            assert tokens.attention_mask.sum(1).max() < MAX_TOKENS  # nothing truncated
            text = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
            outs.append(pipe.transformer(x, encoder_hidden_states=text, encoder_attention_mask=tokens.attention_mask,
                                         timestep=t, added_cond_kwargs=NO_CONDITIONS).sample)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0][0], outs[0][2], atol=1e-3)  # the caption changes the prediction


@pytest.mark.slow
def test_evaluation_writes_a_dit_card(trained, tmp_path):
    import shutil

    from attnreuse.default_model.evaluate import evaluate_default

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    metrics = evaluate_default(model, count=2, steps=2, out=tmp_path / "eval", card=True)
    assert metrics["vae_psnr_db"] > 30 and metrics["one_shape"]["n"] == 2
    assert 0 <= metrics["one_shape_hurry1"]["pass_rate"] <= 1  # attention reuse runs on the transformer
    card = (model / "README.md").read_text()
    assert "(DiT)" in card and "`PixArtAlphaPipeline`" in card and "use_resolution_binning=False" in card
    assert "`attnreuse train-default --arch dit --seed 3 --steps 3 --batch 2` on CPU" in card
    assert "| transformer (`PixArtTransformer2DModel`) | 8 blocks" in card and "T5EncoderModel" in card


def test_worker_processes_build_the_same_batches(tmp_path):
    """On CUDA the batches come from worker processes, with the T5 tokenizer pickled to them."""
    import functools

    from attnreuse.default_model.shapes import VOCABULARY
    from attnreuse.pipelines.tokenizers import write_t5_tokenizer

    tokenizer = write_t5_tokenizer(tmp_path, VOCABULARY)
    make = functools.partial(train._denoiser_item, seed=0, batch_size=3, tokenizer=tokenizer, drop_caption=0.5,
                             latent_shape=(4, 16, 16), num_train_timesteps=1000, max_length=MAX_TOKENS)
    assert make(0)[1].shape == make(0)[2].shape == (3, MAX_TOKENS)
    loader = torch.utils.data.DataLoader(train._Steps(make, 5, 9), batch_size=None, num_workers=2)
    for step, got in zip(range(5, 9), loader):
        for a, b in zip(got, make(step)):
            assert torch.equal(a, b)


def test_a_work_folder_of_the_other_family_is_refused(tmp_path):
    (tmp_path / "unet" / "checkpoints").mkdir(parents=True)
    (tmp_path / "unet" / "checkpoints" / "unet.pt").touch()
    with pytest.raises(ValueError, match="holds a training run of the unet model; use another --out"):
        train.train_default(tmp_path / "unet", **TINY)
    (tmp_path / "dit" / "checkpoints").mkdir(parents=True)
    (tmp_path / "dit" / "checkpoints" / "dit.pt").touch()
    with pytest.raises(ValueError, match="holds a training run of the dit model"):
        train.train_default(tmp_path / "dit", seed=3)
    with pytest.raises(ValueError, match="arch must be one of"):
        train.train_default(tmp_path / "other", arch="vit")
    assert not (tmp_path / "other").exists()


def test_a_missing_dit_model_names_the_command_that_trains_it(tmp_path, monkeypatch):
    monkeypatch.setitem(default_model.DEFAULT_MODELS, "dit", tmp_path / "weights_dit")
    with pytest.raises(FileNotFoundError, match=r"train one with `attnreuse train-default --arch dit"):
        load_default_pipeline("dit")


def test_the_cli_maps_arch_and_the_denoiser_aliases(tmp_path, monkeypatch):
    seen = {}

    def fake_train(out, **recipe):
        seen.update(recipe, out=out)
        return tmp_path / "model"

    monkeypatch.setattr(train, "train_default", fake_train)
    monkeypatch.chdir(tmp_path)
    assert main(["train-default", "--arch", "dit", "--steps", "7", "--batch", "4", "--lr", "0.001",
                 "--minutes", "2", "--device", "cpu"]) == 0
    assert seen["out"] == "runs/default-dit" and seen["arch"] == "dit"
    assert (seen["unet_steps"], seen["unet_batch"], seen["unet_lr"], seen["unet_budget_s"]) == (7, 4, 1e-3, 120)
    assert main(["train-default", "--unet-steps", "5", "--device", "cpu"]) == 0
    assert seen["out"] == "runs/default" and seen["arch"] == "unet" and seen["unet_steps"] == 5


@pytest.mark.slow
def test_the_shipped_dit_is_a_plain_pixart_folder_under_30_mb_with_its_card(tmp_path):
    folder = default_model.DEFAULT_MODELS["dit"]
    assert sum(f.stat().st_size for f in folder.rglob("*.safetensors")) <= 30 * 2**20
    assert "Faithfulness checker" in (folder / "README.md").read_text()
    pipe = load_default_pipeline("dit")
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    images = pipe("a red circle", num_inference_steps=4, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    out = tmp_path / "dit.png"
    assert main(["generate", "a red circle", "--model", "dit", "--steps", "6", "--repeats", "1", "-o", str(out)]) == 0
    assert out.stat().st_size > 0 and out.with_name("dit.full.png").stat().st_size > 0
