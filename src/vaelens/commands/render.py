"""How a command's result reaches the user: its text on stdout and, with --json, its JSON file.

Every command returns a `Result`; `emit` is the one place that prints one and writes its JSON
(through `vaelens.io`, so the file is atomic and gets the umask's permissions).
"""

from __future__ import annotations

import abc
import math
import sys
from pathlib import Path
from typing import Iterable, Optional

from ..io import prepare_output, write_json


class Result(abc.ABC):
    """What a command produced.

    Subclasses give `to_dict` (the JSON form, also what --json writes) and `lines` (the text
    shown). `exit_code` is 0, or the command's verdict (1 for a failed check) or interruption
    (130, 143). `json_path` is where --json asked the result to go, if anywhere.
    """

    exit_code: int = 0
    json_path: Optional[Path] = None

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """The result as JSON-ready data."""

    def lines(self) -> Iterable[str]:
        return ()


def emit(result: Result, stream=None) -> None:
    """Print the result's lines and write its JSON file when one was asked for."""
    out = stream or sys.stdout
    for line in result.lines():
        print(line, file=out)
    if result.json_path is not None:
        # checked before the work (commands._common.check_output); this creates its folder
        write_json(prepare_output(result.json_path, force=True), result.to_dict())
        print(f"wrote {result.json_path}", file=out)


def se_cell(se: Optional[float], width: int = 8) -> str:
    """A standard error in a table column, blank when there is none."""
    return ("" if se is None or math.isnan(se) else f"{se:{width}.4f}").rjust(width)
