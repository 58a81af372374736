"""Checks of command-line arguments, run before any model loads: a user error is a `UsageError`, which the CLI prints
in one line and exits 2 on; anything else is an internal error and keeps its traceback."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ..default_model import DEFAULT_MODELS
from ..pipelines.sampling import SAMPLERS
from ..pipelines.tiny import ARCHS
from ..plan import Schedule, as_schedule

__all__ = ["UsageError", "at_least", "finite", "device", "model", "readable_file", "prompt_lines", "writable_file",
           "writable_dir", "image_size", "schedule", "plan", "shipped_model", "sampler_calls", "IMAGE_SUFFIXES"]

_SECOND_ORDER = ("heun", "dpm2")  # samplers that call the model twice per step but the last
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class UsageError(Exception):
    """A user error on the command line: printed in one line, exit status 2."""


def at_least(value, name: str, minimum) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}.")


def finite(value, name: str, minimum: float | None = None, above: float | None = None) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}.")
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be at least {minimum:g}, got {value:g}.")
    if above is not None and value <= above:
        raise UsageError(f"{name} must be above {above:g}, got {value:g}.")


def device(text: str) -> None:
    """A device this machine has."""
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {text!r} is not a device: {err}") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {text}: this machine has no CUDA device; use --device cpu.")
        if chosen.index is not None and chosen.index >= count:
            raise UsageError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
    elif chosen.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {text}: MPS is not available here; use --device cpu.")
    elif chosen.type != "cpu":
        raise UsageError(f"--device {text}: choose cpu, cuda, cuda:N or mps.")


def model(value: str | None, name: str = "--model") -> None:
    """None (the shipped model), a local architecture, a diffusers pipeline folder, or a hub id like org/name."""
    if value is None or value in ARCHS:
        return
    if value == "dit":
        shipped_model(value, name)
        return
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{name} {value}: the folder has no model_index.json, so it is not a diffusers pipeline.")
        return
    if value.startswith((".", "~", "/")) or value.count("/") > 1 or "\\" in value:
        raise UsageError(f"{name} {value}: no such folder.")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value):
        raise UsageError(f"{name} {value!r}: not a folder, a hub id (org/name) or a local architecture "
                         f"({', '.join(ARCHS)}).")


def shipped_model(value: str, name: str = "--model") -> None:
    """A shipped default model by name ("unet", "dit") whose folder holds a trained pipeline."""
    if not (DEFAULT_MODELS[value] / "model_index.json").is_file():
        raise UsageError(f"{name} {value}: the {'DiT' if value == 'dit' else 'UNet'} default model is not trained "
                         f"yet; train it with `attnreuse train-default --arch {value}` and copy its model/ folder to "
                         f"{DEFAULT_MODELS[value]}.")


def readable_file(path, name: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{name} {path}: no such file.")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{name} {path}: the file cannot be read (permissions).")
    return path


def prompt_lines(path, needed: int, name: str = "--prompts") -> list[str]:
    """The non-empty lines of a prompt file, which must hold at least `needed`."""
    path = readable_file(path, name)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise UsageError(f"{name} {path}: not a UTF-8 text file ({err.reason}).") from None
    if len(lines) < needed:
        raise UsageError(f"{name} {path}: {len(lines)} prompt(s), but {needed} are needed (one per line).")
    return lines


def _nearest_folder(path: Path) -> Path:
    folder = path
    while not folder.exists():
        folder = folder.parent
    return folder


def writable_dir(path, name: str) -> None:
    """A folder that exists and can be written, or that can be made (it is made only when work starts)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{name} {path}: a file is in the way of the output folder.")
    folder = _nearest_folder(path)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{name} {path}: {folder} cannot be written.")


def writable_file(path, name: str, suffixes=None) -> None:
    path = Path(path).expanduser()
    if suffixes and path.suffix.lower() not in suffixes:
        raise UsageError(f"{name} {path}: the file name must end in one of {', '.join(suffixes)}.")
    if path.is_dir():
        raise UsageError(f"{name} {path}: a folder, not a file name.")
    writable_dir(path.parent, name)


def image_size(value, name: str = "--size") -> None:
    if value is not None and (value <= 0 or value % 8):
        raise UsageError(f"{name} must be a positive multiple of 8 (the VAE's downsampling), got {value}.")


def sampler_calls(sampler: str, steps: int) -> tuple[int, int]:
    """(denoiser calls, calls per step) of `steps` steps of the named sampler."""
    order = 2 if sampler in _SECOND_ORDER else 1
    return order * (steps - 1) + 1, order


def plan(path: str, steps: int, sampler: str = "ddim", name: str = "--plan"):
    """A plan file that fits `steps` steps of `sampler` (or records timesteps, so that it can be moved there)."""
    from ..plan import Plan

    readable_file(path, name)
    try:
        parsed = Plan.from_json(Path(path))
        if parsed.timesteps is None:
            parsed.expand(*sampler_calls(sampler, steps))
    except (ValueError, TypeError) as err:
        raise UsageError(f"{name} {path}: {err}") from None
    return parsed


def schedule(text: str, steps: int, sampler: str = "ddim", name: str = "--schedule") -> Schedule:
    """A schedule that fits `steps` steps of `sampler` (or records timesteps, so that it can be moved there)."""
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: choose from {sorted(SAMPLERS)}.")
    if text.endswith(".json"):
        readable_file(text, name)
    try:
        parsed = as_schedule(text, num_steps=steps)
        if parsed.timesteps is None:
            parsed.expand(*sampler_calls(sampler, steps))
    except (ValueError, TypeError) as err:
        raise UsageError(f"{name} {text}: {err}") from None
    return parsed
