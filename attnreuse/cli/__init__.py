"""The `attnreuse` command line: one module per command group, each with `register(subparsers)`."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # for the "total" that `generate` prints (interpreter start-up not included)

import argparse  # noqa: E402
import sys  # noqa: E402

from . import analyze, bench, default_model, evaluate, generate, search  # noqa: E402

__all__ = ["main", "build_parser"]

_GROUPS = (generate, search, evaluate, analyze, bench, default_model)


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
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"attnreuse: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
