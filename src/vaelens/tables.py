"""Tables as users have them: .csv/.tsv/.txt (optionally gzipped) and .parquet.

What a table reader decides, and says:

* the delimiter: ``--delimiter``, else sniffed from the first lines among , ; tab | (a
  wrong-width line names the delimiter that would fit);
* the features: ``--columns``; else a run's saved feature columns (later files are read by
  name, so their own id columns drop out); else every column but the label and likely row
  identifiers, which are left out with a note (``--keep-id-columns`` keeps them);
* missing values (empty, NA, N/A, NaN, null, ?): an error naming line and column, or with
  ``--missing drop`` the rows are dropped and counted; nothing is imputed;
* labels: kept as written (numbers stay numbers), coded against a vocabulary: the run's saved
  one for later files (unseen labels are appended and noted), else the sorted distinct labels.
  A missing label is an error unless ``--missing-label drop`` or ``keep``.

Standard library and numpy only (pyarrow for .parquet, imported when needed).
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError

MISSING_CELLS = frozenset({"", "na", "n/a", "nan", "null", "?"})  # compared lower-cased, stripped
ID_NAMES = frozenset({"id", "index", "idx", "row", "rowid", "row_id", "row_number", "unnamed: 0", "#"})
DELIMITERS = (",", ";", "\t", "|")
SNIFF_LINES = 50
MISSING_LABEL_NAME = "(missing)"  # the legend of the class `--missing-label keep` makes
LABEL_KINDS = ("int", "float", "str")


@dataclass(frozen=True)
class ReadOptions:
    """How to read one table; `vaelens.data.load` fills it from a `DataConfig`.

    feature_columns and vocabulary / label_kind come from a run (its saved features and labels).
    vocabulary holds the labels in their own type, None for the class of missing labels.
    """

    columns: Optional[Sequence[str]] = None
    label_column: Optional[str] = None
    delimiter: Optional[str] = None
    missing: str = "error"
    missing_label: str = "error"
    keep_id_columns: bool = False
    feature_columns: Optional[Sequence[str]] = None
    vocabulary: Optional[Sequence] = None
    label_kind: Optional[str] = None


@dataclass
class Table:
    """What a reader found: features (n, p) float64, names, labels as written, notes to print."""

    X: np.ndarray
    feature_names: Optional[List[str]]  # header names; None for a file without header
    feature_columns: List[str]          # how to find the features again: names, or 0-based indices
    labels: Optional[list] = None       # (n,) values as written, None where missing (kept)
    notes: Optional[List[str]] = None
    rows: Optional[List[int]] = None    # file line (csv) or 0-based row (parquet) of each row kept


# --- csv --------------------------------------------------------------------------------------

def read_csv(path: Path, opt: ReadOptions) -> Table:
    text = _read_text(path)
    raw = io.StringIO(text, newline="").readlines()  # lines as csv counts them (\r, \n, \r\n only)
    sample = [ln.rstrip("\r\n") for ln in raw if ln.strip()][:SNIFF_LINES]
    if not sample:
        raise DataError(f"{path}: empty file")
    default = "\t" if path.suffix.lower() == ".tsv" or path.name.lower().endswith(".tsv.gz") else ","
    delim, guessed = (opt.delimiter, False) if opt.delimiter else (sniff_delimiter(sample, default), True)
    lines = _parse(path, raw, delim)
    if not lines:
        raise DataError(f"{path}: empty file")
    first = lines[0][1]
    named_label = opt.label_column is not None and not str(opt.label_column).isdigit()
    # A first line with any non-numeric, non-missing cell is a header; so is any file whose label column is named.
    has_header = named_label or any(not _is_number(c) and not _is_missing(c) for c in first)
    header = [c.strip() for c in first] if has_header else [str(i) for i in range(len(first))]
    body = lines[1:] if has_header else lines
    if not body:
        raise DataError(f"{path}: has a header but no data rows")
    _check_widths(path, raw, lines, body, len(header), delim, guessed)
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate column name(s) {', '.join(dupes)}")
    label_idx = column_index(path, header, opt.label_column) if opt.label_column is not None else None
    cells = lambda j: [r[j].strip() for _, r in body]  # noqa: E731  (a column's cells, read on demand)
    feat_idx, notes = choose_features(path, header, has_header, label_idx, opt, cells, _consecutive_cells)
    X, missing, bad = _parse_features(body, feat_idx)
    if bad:
        detail = "; ".join(f"{header[j]!r} (line {ln}: {val!r})" for j, (ln, val) in list(bad.items())[:10])
        hint = _single_column_hint(sample, delim) if len(header) == 1 else ""
        raise DataError(f"{path}: non-numeric values in column(s) {detail}. Choose numeric feature columns with "
                        f"--columns or name the label column with --label-column{hint}")
    linenos = [ln for ln, _ in body]
    keep = missing_rows(path, missing, [header[j] for j in feat_idx], linenos, "line", opt.missing, notes)
    labels = None
    if label_idx is not None:
        vals = [None if _is_missing(c) else c for c in cells(label_idx)]
        labels = typed_labels(vals, opt.label_kind)
        keep &= missing_labels(path, labels, header[label_idx], linenos, "line", opt.missing_label, notes)
    return _table(X, keep, [header[j] for j in feat_idx] if has_header else None,
                  [header[j] for j in feat_idx], labels, notes, linenos)


def _read_text(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would make a header of line 1
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # a damaged .csv.gz
        raise DataError(f"{path}: cannot be read ({' '.join(str(e).split()) or type(e).__name__})") from None


def _parse(path: Path, raw: List[str], delim: str) -> List[Tuple[int, List[str]]]:
    """(file line number, cells) of every non-blank record."""
    try:
        reader = csv.reader(raw, delimiter=delim)
        out = []
        for r in reader:
            if any(c.strip() for c in r):
                out.append((reader.line_num, r))
        return out
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({' '.join(str(e).split())})") from None


def _fields(line: str, delim: str) -> int:
    try:
        return len(next(csv.reader([line], delimiter=delim), []))
    except csv.Error:
        return 0


def sniff_delimiter(lines: Sequence[str], default: str = ",") -> str:
    """The delimiter among , ; tab | that splits the first lines into equal numbers (> 1) of fields.

    Several such: csv.Sniffer chooses among them. None: the one most lines agree on, so that the
    ragged line is the one named in the error. A one-column file keeps `default`.
    """
    counts = {d: [_fields(ln, d) for ln in lines] for d in DELIMITERS}
    even = [d for d, c in counts.items() if len(set(c)) == 1 and c[0] > 1]
    if len(even) == 1:
        return even[0]
    if even:
        try:
            found = csv.Sniffer().sniff("\n".join(lines), delimiters="".join(even)).delimiter
        except csv.Error:
            found = None
        return found if found in even else (default if default in even else even[0])
    best, agree = default, 0
    for d, c in counts.items():
        mode = max(set(c), key=c.count)
        if mode > 1 and c.count(mode) > agree:
            best, agree = d, c.count(mode)
    return best


def _check_widths(path, raw, lines, body, width, delim, guessed) -> None:
    for lineno, r in body:
        if len(r) == width:
            continue
        head_line, bad_line = raw[lines[0][0] - 1], raw[lineno - 1]
        other = [d for d in DELIMITERS if d != delim and _fields(head_line, d) == _fields(bad_line, d) > 1]
        where = f"{path}: line {lineno} has {len(r)} fields, expected {width} (as in line {lines[0][0]})"
        if other:
            raise DataError(f"{where}: is the file separated by {other[0]!r}? pass --delimiter {other[0]!r}")
        how = "guessed from the first lines" if guessed else "as given"
        raise DataError(f"{where}, reading it as separated by {delim!r} ({how}); fix that line, or name the "
                        f"separator with --delimiter")


def _single_column_hint(sample: Sequence[str], delim: str) -> str:
    found = [d for d in DELIMITERS if d != delim and _fields(sample[0], d) > 1]
    return f"; the file reads as one column: is it separated by {found[0]!r}? pass --delimiter {found[0]!r}" \
        if found else ""


def _parse_features(body, feat_idx):
    """X (n, p) float64 with NaN where missing; missing cells [(row, j)]; first non-numeric per column."""
    X = np.empty((len(body), len(feat_idx)), dtype=np.float64)
    missing, bad = [], {}
    for j, ci in enumerate(feat_idx):
        for i, (lineno, r) in enumerate(body):
            cell = r[ci].strip()
            if cell.lower() in MISSING_CELLS:
                X[i, j] = np.nan
                missing.append((i, j))
                continue
            try:
                X[i, j] = float(cell)
            except ValueError:
                bad.setdefault(ci, (lineno, cell))
                X[i, j] = np.nan
    missing.sort()
    return X, missing, bad


def _consecutive_cells(cells: List[str]) -> Optional[str]:
    try:
        v = np.array([int(c) for c in cells], dtype=np.int64)
    except (ValueError, OverflowError):
        return None
    return _consecutive(v)


def _consecutive(v: np.ndarray) -> Optional[str]:
    # unique integers counting up by one: a row number, not a measurement
    if len(v) >= 3 and np.all(np.diff(v) == 1):
        return f"consecutive integers {v[0]}..{v[-1]}"
    return None


# --- shared by csv and parquet ----------------------------------------------------------------

def column_index(path, header: list, col: str) -> int:
    if col in header:
        return header.index(col)
    if str(col).isdigit() and int(col) < len(header):
        return int(col)
    raise DataError(f"{path}: no column {col!r}; columns are {', '.join(header[:20])}{' ...' if len(header) > 20 else ''}")


def choose_features(path, header, has_header, label_idx, opt: ReadOptions, cells, consecutive):
    """Indices of the feature columns and the notes on what was left out.

    `cells(j)` gives column j's values, `consecutive(values)` says why they look like row numbers.
    """
    if opt.columns:
        return [column_index(path, header, c) for c in opt.columns], []
    if opt.feature_columns:
        missing = [c for c in opt.feature_columns if c not in header
                   and not (not has_header and str(c).isdigit() and int(c) < len(header))]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r}, which the run was trained on (its features are "
                            f"{', '.join(opt.feature_columns)}); columns here are {', '.join(header[:20])}")
        return [column_index(path, header, c) for c in opt.feature_columns], []
    idx = [j for j in range(len(header)) if j != label_idx]
    if opt.keep_id_columns:
        return idx, []
    notes, kept, left = [], [], []
    for j in idx:
        name = header[j]
        named = has_header and (name.lower() in ID_NAMES or name.lower().endswith("_id"))
        why = f"named {name!r}" if named else consecutive(cells(j))
        if why is None:
            kept.append(j)
            continue
        left.append(repr(name))
        notes.append(f"{path}: column {name!r} looks like a row identifier ({why}); left out of the features. "
                     f"Pass --keep-id-columns to use it, or choose the features with --columns")
    if not kept:
        raise DataError(f"{path}: no feature columns left once the likely row identifier(s) {', '.join(left)} "
                        f"are left out; pass --keep-id-columns, or choose the features with --columns"
                        if left else f"{path}: no feature columns")
    return kept, notes


def missing_rows(path, missing, names, where: list, word: str, policy: str, notes: list) -> np.ndarray:
    """Rows to keep given the missing feature cells [(row, j)]: all, or an error, or (drop) the others."""
    keep = np.ones(len(where), dtype=bool)
    if not missing:
        return keep
    if policy != "drop":
        cells = "; ".join(f"{word} {where[i]}, column {names[j]!r}" for i, j in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{path}: missing values (empty, NA, NaN or ?) at {cells}{more}; pass --missing drop to "
                        f"leave those rows out (nothing is filled in)")
    rows = sorted({i for i, _ in missing})
    keep[rows] = False
    first = ", ".join(str(where[i]) for i in rows[:5]) + (" ..." if len(rows) > 5 else "")
    notes.append(f"{path}: dropped {len(rows)} of {len(where)} rows with missing values (--missing drop; "
                 f"{word}s {first})")
    return keep


def missing_labels(path, labels: list, column: str, where: list, word: str, policy: str, notes: list) -> np.ndarray:
    keep = np.ones(len(labels), dtype=bool)
    rows = [i for i, v in enumerate(labels) if v is None]
    if not rows or policy == "keep":
        if rows:
            notes.append(f"{path}: {len(rows)} rows with a missing label kept as the class {MISSING_LABEL_NAME} "
                         f"(--missing-label keep)")
        return keep
    if policy != "drop":
        more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
        raise DataError(f"{path}: {word} {where[rows[0]]}, column {column!r}: missing label{more}; pass "
                        f"--missing-label drop to leave such rows out, or --missing-label keep to make them a "
                        f"class of their own")
    keep[rows] = False
    notes.append(f"{path}: dropped {len(rows)} of {len(labels)} rows with a missing label (--missing-label drop)")
    return keep


def _table(X, keep, feature_names, feature_columns, labels, notes, rows) -> Table:
    if not keep.all():
        X = X[keep]
        labels = None if labels is None else [v for v, k in zip(labels, keep) if k]
        rows = [r for r, k in zip(rows, keep) if k]
        if len(X) == 0:
            raise DataError(f"{notes[-1].split(': ')[0]}: no rows left once those are dropped")
    return Table(X=X, feature_names=feature_names, feature_columns=list(feature_columns), labels=labels,
                 notes=notes, rows=list(rows))


# --- labels -----------------------------------------------------------------------------------

def typed_labels(values: Sequence, kind: Optional[str] = None) -> list:
    """Labels in their own type: with `kind` (a run's) as that type where they parse, else as written.

    Without `kind`: ints if every present value is an integer, floats if every one is a number,
    else strings. None (missing) stays None.
    """
    present = [v for v in values if v is not None]
    if kind is None:
        kind = "int" if all(_as(v, "int") is not None for v in present) else \
            "float" if all(_as(v, "float") is not None for v in present) else "str"
    out = []
    for v in values:
        t = None if v is None else _as(v, kind)
        out.append(t if t is not None or v is None else (v if isinstance(v, str) else str(v)))
    return out


def typed_kind(values: Sequence) -> str:
    """"int", "float" or "str": the kind of a vocabulary's present labels."""
    if values and all(isinstance(v, int) for v in values):
        return "int"
    return "float" if values and all(isinstance(v, (int, float)) for v in values) else "str"


def _as(v, kind: str):
    """v as `kind`, or None where it is not one."""
    if kind == "str":
        return v if isinstance(v, str) else str(v)
    if isinstance(v, (bool, np.bool_)):
        return None
    if kind == "int":
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                return None
        return int(v) if isinstance(v, (float, np.floating)) and float(v).is_integer() else None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def vocabulary_order(values) -> list:
    """Distinct labels sorted: numbers by value, then strings, then the missing class (None)."""
    def key(v):
        if v is None:
            return (2, 0, "")
        return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
    return sorted(set(values), key=key)


def code_labels(labels: list, vocabulary: Optional[Sequence], where: str):
    """(codes (n,) int64, vocabulary, note or None): codes index the vocabulary.

    With a run's vocabulary, labels it lacks are appended (kept as written) and named in the note.
    """
    if vocabulary is None:
        vocab, note = vocabulary_order(labels), None
    else:
        known = set(vocabulary)
        unseen = vocabulary_order(v for v in labels if v not in known)
        vocab = list(vocabulary) + unseen
        note = None
        if unseen:
            note = (f"{where}: label(s) {', '.join(label_name(v) for v in unseen[:10])} are not among the run's "
                    f"labels ({', '.join(label_name(v) for v in list(vocabulary)[:20])}); kept as written")
    index = {v: i for i, v in enumerate(vocab)}
    return np.array([index[v] for v in labels], dtype=np.int64), list(vocab), note


def label_name(v) -> str:
    return MISSING_LABEL_NAME if v is None else str(v)


def labels_array(values: Sequence) -> np.ndarray:
    """Labels as written, for an output column: int64, float64 (NaN where missing) or str ("" where missing)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) for v in present) and len(present) == len(values):
        return np.array(values, dtype=np.int64)
    if present and all(isinstance(v, (int, float)) for v in present):
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


# --- parquet ----------------------------------------------------------------------------------

def read_parquet(path: Path, opt: ReadOptions) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow; install it with: pip install 'vaelens[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types for damaged files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: empty table")
    header = list(table.column_names)
    label_idx = column_index(path, header, opt.label_column) if opt.label_column is not None else None
    col = lambda j: table.column(header[j]).to_numpy(zero_copy_only=False)  # noqa: E731
    feat_idx, notes = choose_features(path, header, True, label_idx, opt, col, _consecutive_array)
    bad, cols = [], []
    for j in feat_idx:
        c = col(j)
        if c.dtype.kind not in "biuf":
            bad.append(f"{header[j]!r} ({table.schema.field(header[j]).type})")
        else:
            cols.append(c.astype(np.float64))
    if bad:
        raise DataError(f"{path}: non-numeric column(s) {', '.join(bad)}; choose numeric columns with --columns")
    X = np.stack(cols, axis=1)
    rows = list(range(len(X)))
    missing = sorted((int(i), int(j)) for i, j in zip(*np.nonzero(np.isnan(X))))  # nulls arrive as NaN
    keep = missing_rows(path, missing, [header[j] for j in feat_idx], rows, "row", opt.missing, notes)
    labels = None
    if label_idx is not None:
        labels = typed_labels(array_labels(col(label_idx)), opt.label_kind)
        keep &= missing_labels(path, labels, header[label_idx], rows, "row", opt.missing_label, notes)
    names = [header[j] for j in feat_idx]
    return _table(X, keep, names, names, labels, notes, rows)


def _consecutive_array(c: np.ndarray) -> Optional[str]:
    return _consecutive(c.astype(np.int64)) if c.dtype.kind in "iu" else None


def array_labels(a: np.ndarray) -> list:
    """A label array's values as Python objects, None where missing (NaN, None, empty or NA strings)."""
    a = np.asarray(a).reshape(-1)
    if a.dtype.kind == "f":
        return [None if np.isnan(v) else float(v) for v in a]
    if a.dtype.kind in "iu":
        return [int(v) for v in a]
    if a.dtype.kind == "b":
        return [str(bool(v)) for v in a]
    out = []
    for v in a:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
        else:
            s = v.decode() if isinstance(v, bytes) else str(v)
            out.append(None if _is_missing(s) else s)
    return out


def _is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING_CELLS


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
