"""The ``gpfm`` command line.

Each sub-command lives in its own module ``gpfm_core.cli._<name>`` exposing
``add_parser(subparsers)`` and ``run(args) -> int``. Those modules import nothing heavy at
module level (torch, umap ...), so ``gpfm --help`` and ``gpfm info`` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from gpfm_core import __version__
from gpfm_core.errors import GpfmError

# name -> module; order is the order in ``gpfm --help``.
SUBCOMMANDS: dict[str, str] = {
    "info": "gpfm_core.cli._info",
    "tiles": "gpfm_core.cli._tiles",
    "encoders": "gpfm_core.cli._encoders",
    "embed": "gpfm_core.cli._embed",
    "index": "gpfm_core.cli._index",
    "train": "gpfm_core.cli._train",
    "export": "gpfm_core.cli._export",
    "export-anndata": "gpfm_core.cli._export_anndata",
    "make-slide": "gpfm_core.cli._make_slide",
    "eval": "gpfm_core.cli._eval",
    "train-mil": "gpfm_core.cli._train_mil",
}

log = logging.getLogger("gpfm_core")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="gpfm", description="GPFM pathology foundation model: slides, tiles, embeddings."
    )
    parser.add_argument("--version", action="version", version=f"gpfm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:  # a sub-command not built yet
            if exc.name != modname:
                raise
            continue
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 1 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    # a warning is one line naming the command, as errors are; not Python's source lines
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning(args.command)
    try:
        status = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return status
    except GpfmError as exc:
        print(f"gpfm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"gpfm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gpfm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`gpfm info x | head`): nothing more to say, and
        # Python must not print a second traceback when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        warnings.formatwarning = formatwarning


def _one_line_warning(command: str) -> Callable[..., str]:
    def format_warning(message: Warning | str, *_: object, **__: object) -> str:
        text = str(message).strip().splitlines()
        return f"gpfm {command}: warning: {text[0] if text else ''}\n"

    return format_warning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
