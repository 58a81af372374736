"""Plans kept on disk, keyed by what makes a plan valid, so that the next process starts planned.

A first-use plan (`first_use`) holds for one model's weights, one pipeline and sampler configuration, one number
of calls, guidance scale, batch, dtype, device kind and goal, at any resolution (`FirstUse._key` says why). The
key says them all; the file name is its hash, and the file holds the key again: an entry whose key differs (a
foreign or edited file) or that cannot be read is refused, and planned again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .files import write_json
from .plan import Plan

logger = logging.getLogger(__name__)

__all__ = ["cache_root", "weights_fingerprint", "entry_path", "read_entry", "write_entry", "FORMAT"]

FORMAT = "attnreuse first-use plan"
SAMPLED = 8  # values of each parameter in the fingerprint: enough to tell fine-tunes apart, cheap on any model


def cache_root() -> Path:
    """Where plans, searches and profiles are kept: `$ATTNREUSE_CACHE`, default ~/.cache/attnreuse."""
    return Path(os.environ.get("ATTNREUSE_CACHE") or Path.home() / ".cache" / "attnreuse")


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape and dtype and of its first values: other weights (a fine-tune, a
    LoRA fused in) give another fingerprint without reading every weight of a large model."""
    digest = hashlib.sha1()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode() + _head(tensor))
    return digest.hexdigest()


def _head(tensor: torch.Tensor) -> bytes:
    """The first values' bytes; none for a tensor whose values are not here (offloaded to the meta device)."""
    if tensor.is_meta:
        return b""
    return tensor.detach().reshape(-1)[:SAMPLED].to("cpu", torch.float64).numpy().tobytes()


def entry_path(key: dict) -> Path:
    """The file that holds the plan for `key`: `<cache>/plans/first-use/<pipeline>-<hash>.json`."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "plans" / "first-use" / f"{key.get('pipeline', 'model')}-{digest}.json"


def read_entry(path: Path, key: dict) -> Plan | None:
    """The plan kept at `path` for `key`; None (with one warning line) when there is none, it cannot be read, or it
    was made for another key."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if json.loads(json.dumps(data.get("key"), default=str)) != json.loads(json.dumps(key, default=str)):
            raise ValueError("it was made for another setup (its key differs)")
        return Plan.from_json(data["plan"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        logger.warning("attnreuse: the cached plan %s cannot be used: %s; planning again.", path,
                       str(err).rstrip("."))
        return None


def write_entry(path: Path, key: dict, plan: Plan) -> Path:
    """Keep `plan` for `key` at `path` (written whole, or not at all)."""
    key = json.loads(json.dumps(key, default=str))  # a scheduler's config may hold values JSON does not
    return write_json(path, {"format": FORMAT, "version": 1, "key": key, "plan": plan.to_dict()})
