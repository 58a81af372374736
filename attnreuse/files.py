"""Files written whole and JSON read with errors that name the file: what the engine's plan files and every tool's
results use."""

from __future__ import annotations

import contextvars
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "written_together", "write_json", "read_json", "parse_json_input"]

_SET: contextvars.ContextVar[dict | None] = contextvars.ContextVar("attnreuse_written_together", default=None)


@contextmanager
def written_together():
    """Files written (by `atomic_write`) inside the block form one set: each goes to a temporary file, and they
    are renamed into place together when the block ends; a fault before or while renaming leaves every earlier file
    of the set as it was (byte for byte) and none of the new ones."""
    pending: dict[Path, Path] = {}
    token = _SET.set(pending)
    try:
        yield
    except BaseException:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _SET.reset(token)
    _commit(pending)


def _commit(pending: dict[Path, Path]) -> None:
    """Rename each temporary file into place, keeping the file it replaces until all are in; on a fault put every
    replaced file back and remove the new ones."""
    kept, placed = {}, []
    try:
        for path, tmp in pending.items():
            if path.exists():
                kept[path] = path.with_name(f".{path.name}.{os.getpid()}.old")
                os.replace(path, kept[path])
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for path in pending:
            if path not in placed:
                pending[path].unlink(missing_ok=True)
            if path in placed and path not in kept:
                path.unlink(missing_ok=True)
            if path in kept:
                os.replace(kept.pop(path), path)
        raise
    for old in kept.values():
        old.unlink(missing_ok=True)


def atomic_write(path, write) -> Path:
    """`write(tmp)` writes a temporary file beside `path`, which is then renamed into place: an interruption or a
    write fault never leaves a half-written file at `path`. The folder is made if needed. Inside
    `written_together()`, the rename waits for the set's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result is as readable as any file the user writes
        write(Path(tmp))
        pending = _SET.get()
        if pending is None:
            os.replace(tmp, path)
        else:
            if path in pending:
                pending[path].unlink(missing_ok=True)
            pending[path] = Path(tmp)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename in (None, tmp):  # name the file the user asked for, not our temporary one
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
