"""Files written whole and JSON read with errors that name the file: what the engine's plan files and every tool's
results use."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "write_json", "read_json", "parse_json_input"]


def atomic_write(path, write) -> Path:
    """`write(tmp)` writes a temporary file beside `path`, which is then renamed into place: an interruption or a
    write fault never leaves a half-written file at `path`. The folder is made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _finite(x):
    """JSON has no NaN or infinity: non-finite floats become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_json(path, data, indent: int | None = 1) -> Path:
    """`data` as JSON at `path`, written atomically, non-finite floats as null."""
    text = json.dumps(_finite(data), indent=indent, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path, what: str = "JSON file"):
    """The JSON at `path`; a missing, unreadable or malformed file is a ValueError that names it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None


def parse_json_input(data, what: str, parse, inline: tuple[str, ...] = ("{",)):
    """`parse` applied to a JSON string, dict or file (a string not starting with one of `inline` is a path); its
    TypeError or ValueError, and a malformed JSON, name the file or say "`what` JSON"."""
    where = f"{what} JSON"
    if isinstance(data, Path) or (isinstance(data, str) and not data.lstrip().startswith(inline)):
        where, data = f"{what} file {data}", read_json(data, f"{what} file")
    elif isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from None
    try:
        return parse(data)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None
