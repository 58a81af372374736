"""The `attnreuse` command line: one module per command group, each with `register(subparsers)`."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # for the "total" that `generate` prints (interpreter start-up not included)

import argparse  # noqa: E402
import errno  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

# the hub's download bars are not the command's output (notices are left out where they arise: pipelines.sampling)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from . import analyze, bench, default_model, evaluate, generate, plan, search  # noqa: E402
from .checks import UsageError  # noqa: E402

__all__ = ["main", "build_parser"]

_GROUPS = (generate, search, plan, evaluate, analyze, bench, default_model)
_EXTRAS = ("torchmetrics", "matplotlib", "psutil", "accelerate")  # what the tools need beyond the engine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnreuse", description="Faster diffusion sampling by reusing attention maps across denoising steps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.started = STARTED
    _quiet_loading()
    try:
        return args.func(args)
    except UsageError as err:  # checked before any work: one line; anything else keeps its traceback
        print(f"attnreuse: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        if err.name not in _EXTRAS:
            raise
        print(f"attnreuse: error: `attnreuse {args.command}` needs {err.name}: pip install 'attnreuse[eval]'",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnreuse: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        print(f"attnreuse: error: no room left to write {err.filename or 'a result'} ({err.strerror}); nothing "
              "half-written was left and earlier results are as they were.", file=sys.stderr)
        return 1


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # every write is atomic (files.atomic_write): a fault leaves no part


def _quiet_loading() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
