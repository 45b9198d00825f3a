"""The `vaelens` commands, one module each.

Every module has ``NAME``, ``add_parser(subparsers)`` (returns its parser) and ``run(args)``
(returns a `render.Result`: its text, its JSON form and its exit code). ``DISTRIBUTED = True``
marks the commands whose work torchrun's ranks share; the others run on rank 0 alone.
A command imports what needs torch (the estimator, checkpoints, plots) inside ``run``, not at the
top of its module: the CLI then builds every parser without torch, so ``--help`` and usage errors
answer at once (tests/test_layout.py). The CLI
(`vaelens.cli`) registers them in this order, which is the order `vaelens --help` lists them in.
"""

from . import (check, compare, encode, evaluate, export, gap, info, posterior, report, sample, score, serve,
               symmetry,
               train)

COMMANDS = {m.NAME: m for m in (train, encode, sample, info, report, evaluate, serve, check, posterior,
                                symmetry, compare, gap, score, export)}

__all__ = ["COMMANDS"]
