"""A default model's card (README.md of its folder): data, components, training and measured figures, filled
into `card_template.md` from `training.json` and what `evaluate_default` measured; one template for the UNet
model and the DiT model, which differ in their components, their training command and how they load."""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_write, read_json
from . import load_default_pipeline
from .config import MAX_TOKENS, TEXT, UNET, VAE
from .shapes import VOCABULARY

__all__ = ["write_model_card"]

_TEMPLATE = Path(__file__).with_name("card_template.md")


_SCHEDULER_ROW = "| scheduler | DDIM, SD 1.x betas (scaled_linear 0.00085-0.012), epsilon | | |"
_UNET_LOADING = ("A plain diffusers `StableDiffusionPipeline` folder:\n`StableDiffusionPipeline.from_pretrained(path)` "
                 "loads it with no custom code (`safety_checker=None`).")
_DIT_LOADING = (
    "A plain diffusers `PixArtAlphaPipeline` folder:\n"
    "`PixArtAlphaPipeline.from_pretrained(path)` loads it with no custom code. Call it with\n"
    "`use_resolution_binning=False`: diffusers bins PixArt resolutions only for 256 to 1024 px models and raises\n"
    "\"Invalid sample size\" for this 64x64 one. `attnreuse.default_model.load_default_pipeline(\"dit\")` returns it "
    "with\nthat default (and `clean_caption=False`: the captions were trained on as they are), so "
    "`pipe(\"a red circle\")`\nworks there with no extra argument.")


def _sizes_and_params(model_dir: Path, names) -> tuple[dict, dict, object]:
    """The weights' bytes and the parameter count of each named part of the pipeline, and the pipeline."""
    sizes = {name: sum(f.stat().st_size for f in (model_dir / name).glob("*.safetensors")) for name in names}
    pipe = load_default_pipeline(model_dir)
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in names}
    return sizes, params, pipe


def _is_dit(model_dir: Path) -> bool:
    return (model_dir / "transformer").is_dir()


def _dit_components(model_dir: Path) -> tuple[list[str], float]:
    """The DiT's table rows of the parts (from the loaded configs), and the total weights in MiB."""
    sizes, params, pipe = _sizes_and_params(model_dir, ("vae", "text_encoder", "transformer"))
    text, dit = pipe.text_encoder.config, pipe.transformer.config
    tokens = (dit.sample_size // dit.patch_size) ** 2
    rows = [
        f"| VAE (`AutoencoderKL`) | the UNet model's, frozen: 3 levels {tuple(pipe.vae.config.block_out_channels)}, "
        f"4 latent channels, 64x64 -> 16x16 | {params['vae']:,} | {sizes['vae'] / 2**20:.1f} MiB |",
        f"| text encoder (`T5EncoderModel`, from scratch) | {text.num_layers} layers, width {text.d_model}, "
        f"{text.num_heads} heads, relative positions; word-level tokenizer with T5's special tokens "
        f"({len(pipe.tokenizer)} tokens), prompts padded to {pipe.tokenizer.model_max_length} and masked | "
        f"{params['text_encoder']:,} | {sizes['text_encoder'] / 2**20:.1f} MiB |",
        f"| transformer (`PixArtTransformer2DModel`) | {dit.num_layers} blocks, width "
        f"{dit.num_attention_heads * dit.attention_head_dim}, {dit.num_attention_heads} heads, patch {dit.patch_size} "
        f"({tokens} tokens of the {dit.sample_size}x{dit.sample_size} latent), self- and cross-attention in every "
        f"block, adaLN-single timestep | {params['transformer']:,} | {sizes['transformer'] / 2**20:.1f} MiB |",
        _SCHEDULER_ROW,
    ]
    return rows, sum(sizes.values()) / 2**20


def _components(model_dir: Path) -> tuple[list[str], float]:
    """The table rows of the parts, and the total weights in MiB."""
    if _is_dit(model_dir):
        return _dit_components(model_dir)
    sizes, params, pipe = _sizes_and_params(model_dir, ("vae", "text_encoder", "unet"))
    rows = [
        f"| VAE (`AutoencoderKL`) | 3 levels {VAE['block_out_channels']}, 4 latent channels, 64x64 -> 16x16 | "
        f"{params['vae']:,} | {sizes['vae'] / 2**20:.1f} MiB |",
        f"| text encoder (`CLIPTextModel`, from scratch) | {TEXT['num_hidden_layers']} layers, width "
        f"{TEXT['hidden_size']}, `CLIPTokenizer` with merges that make each of the {len(VOCABULARY)} words one token "
        f"({len(pipe.tokenizer)} tokens), {MAX_TOKENS} positions | {params['text_encoder']:,} | "
        f"{sizes['text_encoder'] / 2**20:.1f} MiB |",
        f"| UNet (`UNet2DConditionModel`) | channels {UNET['block_out_channels']}, self- and cross-attention at 16x16 "
        f"and 8x8 | {params['unet']:,} | {sizes['unet'] / 2**20:.1f} MiB |",
        _SCHEDULER_ROW,
    ]
    return rows, sum(sizes.values()) / 2**20


def _training_command(training: dict) -> str:
    """The command (or, for a run resumed with a longer schedule, the commands) that reproduce the weights."""
    runs = training.get("unet_runs") or [{"unet_steps": training.get("unet_steps")}]
    dit = training.get("arch", "unet") == "dit"
    flag = {"unet_batch": "batch", "unet_lr": "lr"} if dit else {}
    defaults = (("unet_batch", 32), ("unet_lr", 5e-4), ("device", "cpu"))
    options = "".join(f" --{flag.get(name, name.replace('_', '-'))} {training[name]}" for name, default in defaults
                      if training.get(name, default) != default)
    head = (f"--arch dit --seed {training.get('seed', 0)} --steps" if dit else
            f"--seed {training.get('seed', 0)} --vae-steps {training.get('vae_steps')} --unet-steps")
    commands = [f"`attnreuse train-default {head} {run['unet_steps']}{options}`" for run in runs]
    if len(commands) == 1:
        return commands[0]
    return " then ".join(commands) + " (same --out: each resumes the previous with a longer cosine schedule)"


def _training(training: dict, device: str) -> str:
    if training.get("arch", "unet") == "dit":
        vae = "- VAE: the UNet model's (`weights/vae`), copied and frozen; not trained here."
    else:
        vae = (f"- VAE: MSE + 1e-6 KL, batch {training.get('vae_batch')}, AdamW lr {training.get('vae_lr')}, stopped "
               f"at step {training.get('vae_stopped_at')} (early stop at 32 dB on 100 held-out images), "
               f"{training.get('vae_train_s', 0) / 60:.1f} min.")
    denoiser = "Transformer" if training.get("arch", "unet") == "dit" else "UNet"
    return "\n".join([
        _training_command(training) + f" on {training.get('hardware', device)}.",
        vae,
        f"- {denoiser} + text encoder jointly: epsilon loss with min-SNR-{training.get('min_snr', 5.0):g} weighting, "
        f"{100 * training.get('drop_caption', 0.1):.0f}% empty captions (for CFG), batch "
        f"{training.get('unet_batch')}, AdamW lr {training.get('unet_lr')} cosine, EMA "
        f"{training.get('ema_decay', 0.999):g} (shipped), {training.get('unet_steps')} steps, "
        f"{training.get('unet_train_s', 0) / 60:.1f} min.",
        *([f"- {training['notes']}"] if training.get("notes") else []),
    ])


def _parts(result: dict) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["parts"].items())


def _measured(metrics: dict) -> str:
    lines = []
    if "guidance_sweep_validation" in metrics:
        rates = ", ".join(f"{g}: {100 * r['one_shape']:.0f}% / {100 * r['two_shapes']:.0f}%"
                          for g, r in metrics["guidance_sweep_validation"].items())
        lines.append(f"- Guidance scale {metrics['guidance']} was chosen on the validation split: {rates} "
                     "(one / two shapes).")
    one, two = metrics["one_shape"], metrics["two_shapes"]
    lines += [f"- VAE reconstruction PSNR on 500 held-out images: **{metrics['vae_psnr_db']:.2f} dB**.",
              f"- Faithfulness checker, {metrics['steps']}-step DDIM, guidance {metrics['guidance']}, evaluation "
              f"captions, seeds 0..{one['n'] - 1}:",
              f"  - one shape: **{100 * one['pass_rate']:.1f}%** of {one['n']}; parts {_parts(one)}",
              f"  - two shapes: **{100 * two['pass_rate']:.1f}%** of {two['n']}; parts {_parts(two)}"]
    reuse_key = next((k for k in metrics if k.startswith("one_shape_hurry")), None)
    if reuse_key:
        two_key, r = reuse_key.replace("one_shape", "two_shapes"), reuse_key.split("hurry")[1]
        lines.append(f"  - with HURRY reuse ({r} of {metrics['steps']} steps reused): one shape "
                     f"{100 * metrics[reuse_key]['pass_rate']:.1f}%, two shapes "
                     f"{100 * metrics[two_key]['pass_rate']:.1f}%; PSNR against the no-reuse images "
                     f"{metrics[reuse_key]['psnr_vs_full_db']:.1f} / {metrics[two_key]['psnr_vs_full_db']:.1f} dB")
    if "generate_s" in metrics:
        lines.append(f"- `attnreuse generate` (20 steps, with and without reuse, fresh process): "
                     f"{metrics['generate_s']:.1f} s.")
    return "\n".join(lines)


def _limitations(metrics: dict) -> str:
    """The parts of the captions the model follows less than 80% of the time, if any."""
    weak = [f"{part} {100 * rate:.0f}% ({kind.replace('_', ' ')})" for kind in ("one_shape", "two_shapes")
            for part, rate in metrics[kind]["parts"].items() if rate < 0.8]
    if not weak:
        return ""
    return ("\n## Limitations\nParts of the captions the model follows less than 80% of the time: "
            f"{', '.join(weak)} (chance: position about 1/3, relation about 1/4). A part near chance is not learnt "
            "yet; the image then follows the initial noise. More training is the expected remedy (not verified "
            "here).")


def write_model_card(model_dir: str | Path, metrics: dict) -> Path:
    """README.md of the model folder from `training.json` there and the measured `metrics`."""
    model_dir = Path(model_dir)
    training = read_json(model_dir / "training.json") if (model_dir / "training.json").exists() else {}
    rows, total = _components(model_dir)
    dit = _is_dit(model_dir)
    text = _TEMPLATE.read_text().format(title=" (DiT)" if dit else "", loading=_DIT_LOADING if dit else _UNET_LOADING,
                                        components="\n".join(rows), total_mib=total,
                                        training=_training(training, metrics.get("device")),
                                        device=metrics.get("device"), measured=_measured(metrics),
                                        evaluate_command="attnreuse evaluate-default"
                                                         + (" --model dit" if dit else "") + " --card",
                                        limitations=_limitations(metrics))
    return atomic_write(model_dir / "README.md", lambda tmp: tmp.write_text(text))
