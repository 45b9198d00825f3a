"""The package's shape, as issue #16 set it: no function over 80 lines, no module over 600.

Long functions and modules are where several concerns end up interleaved; this keeps each one
small enough to read in one sitting. Shown to fail by adding a blank-padded 81-line function.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vaelens"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def _sizes():
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        yield path, len(text.splitlines()), ast.parse(text)


def test_no_module_over_600_lines():
    long = [f"{p.relative_to(SRC)}: {n}" for p, n, _ in _sizes() if n > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_80_lines():
    long = []
    for path, _, tree in _sizes():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {n}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_cli_builds_its_parsers_without_torch():
    """`vaelens --help` and argument errors answer at once: the parsers (and their defaults, from
    config.py) are built without importing torch, scikit-learn, scipy or matplotlib (seconds of
    start-up); commands import those when they run. Shown to fail by a module-level `from ..api import
    VAE` in a command module."""
    import subprocess
    import sys

    code = ("import sys; from vaelens.cli import build_parser; build_parser(); "
            "print([m for m in ('torch', 'sklearn', 'scipy', 'matplotlib', 'pandas', 'safetensors') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"modules imported while building the CLI's parsers: {out.strip()}"
