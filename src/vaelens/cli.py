"""The `vaelens` command line: registers the commands (`vaelens.commands`) and maps what they
raise to exit codes.

User errors (`VaelensError`) print one line and exit with status 2; `--debug` shows the
traceback. Existing outputs are never overwritten without `--force`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__
from .commands import COMMANDS
from .commands._common import Formatter
from .commands.render import emit
from .errors import VaelensError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vaelens", formatter_class=Formatter,
                     description="Train variational autoencoders and inspect every sample's posterior.",
                     epilog="examples:\n  vaelens train\n  vaelens encode runs/digits-... --out post.npz\n"
                            "  vaelens <command> --help")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"vaelens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True
    for module in COMMANDS.values():
        p = module.add_parser(sub)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from . import dist  # torch: imported once the arguments parse, so --help and usage errors are instant
    command = COMMANDS[args.command]
    info = dist.env_info()
    if not getattr(command, "DISTRIBUTED", False) and not info.is_main:
        # started by torchrun: rank 0 does the work and writes the output once
        return 0
    try:
        result = command.run(args)
        if info.is_main:
            emit(result)
        # Under torchrun, ranks finish at different times (rank 0 alone writes and prints); one that
        # destroys the gloo group while another is still working can abort at exit (seen: SIGABRT,
        # "terminate called without an active exception"), so all meet here first.
        dist.barrier()
        return result.exit_code
    except VaelensError as e:
        if args.debug:
            raise
        print(f"vaelens {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("vaelens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        dist.teardown()


if __name__ == "__main__":
    raise SystemExit(main())
