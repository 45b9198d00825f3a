"""What several commands share: help formatting, argument types, the data and output options,
loading a run with its data, and the one function that turns a command's data into model input."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Optional

import numpy as np

from .. import config
from .. import data as data_mod
from ..errors import DataError, VaelensError
from ..io import atomic_write, check_writable


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    # Most flags default to None so that the config (or the data set's own default, named in the
    # help text) fills them; "(default: None)" after those would be noise, and wrong.
    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_parser(subparsers, name: str, **kw) -> argparse.ArgumentParser:
    """A command's parser with the house formatter."""
    return subparsers.add_parser(name, formatter_class=Formatter, **kw)


# --- argument types -----------------------------------------------------------------------------

def int_list(text: str):
    """Layer sizes: "256,128"; "", "none" or "linear" for none."""
    text = text.strip()
    if text.lower() in ("", "none", "linear"):
        return ()
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return vals


def seed_list(text: str):
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals) or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"seeds must be distinct integers >= 0, got {text!r}")
    return vals


def index_list(text: str):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated row numbers, got {text!r}") from None


def str_list(text: str):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def dim_pair(text: str):
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated latent dimensions, got {text!r}") from None
    if len(dims) != 2 or min(dims) < 0:
        raise argparse.ArgumentTypeError(f"expected two latent dimensions >= 0 such as 0,1; got {text!r}")
    return dims


# --- options generated from the config ---------------------------------------------------------

def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default_text(opt: config.Option) -> str:
    """" (default: 8)", with the data sets' own defaults beside it; "" for an option unset by default."""
    per_set = [f"{name} {_shown(over[opt.key])}" for name, over in config.DATASET_DEFAULTS.items()
               if opt.key in over]
    if opt.default is None or opt.default is False:
        return f" (default: {', '.join(per_set)})" if per_set else ""
    return f" (default: {_shown(opt.default)}{'; ' + ', '.join(per_set) if per_set else ''})"


def add_option(group, opt: config.Option) -> None:
    """One config field as a flag: type, choices and help from the field; default None, so that
    only what the user typed overrides the config (see `given_options`)."""
    typ = opt.type
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    kw = dict(default=None, help=opt.help + _default_text(opt), dest=opt.name)
    if typ is bool:
        group.add_argument(opt.flag, action="store_true", **kw)
        return
    if typing.get_origin(typ) is tuple:
        kw["type"] = str_list if typing.get_args(typ)[0] is str else int_list
    else:
        kw["type"] = typ
    group.add_argument(opt.flag, choices=opt.choices, metavar=opt.metavar, **kw)


def add_options(p: argparse.ArgumentParser, role: str = "option", groups: Optional[dict] = None) -> dict:
    """Flags for every config field of `role` that has one, in argument groups by the field's group."""
    groups = {} if groups is None else groups
    for opt in config.options(role=role):
        if opt.flag is None:
            continue
        name = opt.group or "data"
        if name not in groups:
            groups[name] = p.add_argument_group(name)
        add_option(groups[name], opt)
    return groups


def given_options(args, role: str = "option") -> dict:
    """{section: {field: value}} of the config options given on the command line."""
    out: dict = {"data": {}, "model": {}, "train": {}}
    for opt in config.options(role=role):
        value = getattr(args, opt.name, None) if opt.flag is not None else None
        if value is not None:
            out[opt.section][opt.name] = value
    return out


# --- data and runs ----------------------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="built-in set (digits, mnist, fashion-mnist) or a .npy/.npz/.csv/.parquet file")
    for opt in config.options("data", role="source"):
        if opt.flag is not None:
            add_option(g, opt)


def add_run_args(p: argparse.ArgumentParser, split: Optional[str] = "train",
                 split_help: str = "the data set's own split") -> None:
    """RUN, the data options and --split: what every command that reads a run and its data takes."""
    p.add_argument("run", type=Path, help="run directory")
    add_data_args(p)
    p.add_argument("--split", choices=("train", "test"), default=split, help=split_help)


def add_json_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing JSON file")


def data_config(args, base: Optional[config.DataConfig] = None) -> config.DataConfig:
    """The DataConfig the data flags name; with `base` (a run's), the flags override it."""
    spec = args.data
    if spec is None:
        fields = ({k: getattr(base, k) for k in ("name", "path", "key", "columns", "label_column", "data_dir")}
                  if base is not None else {"name": "digits"})
    elif spec in data_mod.BUILTIN:
        fields = {"name": spec}
    else:
        fields = {"name": "file", "path": spec}
    fields.update(given_options(args, role="source")["data"])
    if fields.get("name") in data_mod.BUILTIN and fields.get("data_dir") is None:
        fields["data_dir"] = None
    return config.DataConfig(**fields) if base is None else dataclasses.replace(base, **fields)


def load_run_and_data(args, device: str = "cpu"):
    """The run in args.run and the data the flags name (default: the run's own), --split of it."""
    from ..api import VAE  # torch: commands import it when they run, not when the CLI builds its parser
    vae = VAE.load(args.run, device=device)
    ds = data_mod.load(data_config(args, base=vae.config_.data), getattr(args, "split", "train"))
    show_notes(ds)
    return vae, ds


def show_notes(ds) -> None:
    """What reading the data decided (columns left out, rows dropped, unseen labels), on stderr."""
    for note in ds.notes:
        print(f"note: {note}", file=sys.stderr, flush=True)


def check_limit(limit: Optional[int], minimum: int = 2) -> None:
    """--limit's range; checked before anything is loaded."""
    if limit is not None and limit < minimum:
        raise VaelensError(f"--limit must be >= {minimum}, got {limit}")


def first_rows(X: np.ndarray, limit: Optional[int]) -> np.ndarray:
    """The first --limit rows of X (all without --limit)."""
    return X if limit is None else X[:limit]


def check_output(path: Optional[Path], force: bool, what: str = "output file") -> Optional[Path]:
    """`io.check_writable` for an optional output, before any expensive work."""
    return None if path is None else check_writable(path, force=force, what=what)


# --- table files --------------------------------------------------------------------------------

def require_pyarrow():
    """(pyarrow, pyarrow.parquet), or a one-line error naming the install; pyarrow is optional."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError("writing .parquet needs pyarrow: pip install 'vaelens[parquet]'") from None
    return pyarrow, pyarrow.parquet


def write_table(path: Path, table: dict) -> None:
    """Columns {name: 1-D array} to a .parquet or .csv file (floats written exactly, as repr)."""
    if path.suffix.lower() == ".parquet":
        pa, pq = require_pyarrow()
        t = pa.table({k: np.asarray(v) for k, v in table.items()})
        atomic_write(path, lambda f: pq.write_table(t, f))
    else:
        atomic_write(path, lambda f: _write_csv(f, table))


def _write_csv(f, table: dict, chunk: int = 4096) -> None:
    names = list(table)
    cols = [np.asarray(table[k]) for k in names]
    f.write((",".join(names) + "\n").encode())
    cell = [(lambda v: repr(v.item())) if c.dtype.kind == "f" else str for c in cols]
    for start in range(0, len(cols[0]), chunk):
        rows = (",".join(fmt(c[i]) for fmt, c in zip(cell, cols)) + "\n"
                for i in range(start, min(start + chunk, len(cols[0]))))
        f.write("".join(rows).encode())
