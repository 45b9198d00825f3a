"""Data sets, file loaders, validation, splits, binarization and standardization.

Everything here works on numpy arrays: ``X`` of shape (n, p) float32, with images
flattened row-major and their (height, width) kept in ``Dataset.image_shape``.
Errors are `DataError`s that name the file, row, column or key at fault.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import DataConfig, Transform
from .errors import DataError

BUILTIN = ("digits", "mnist", "fashion-mnist")

# Published MD5s: of the canonical .gz files, and (MNIST) of their uncompressed content.
# A file on disk passes when either matches, so re-compressed copies are accepted too.
_IDX = {
    "mnist": {
        "mirrors": (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        "files": {
            "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
            "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
            "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
            "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
        },
    },
    "fashion-mnist": {
        "mirrors": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        "files": {
            "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", None),
            "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", None),
            "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", None),
            "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", None),
        },
    },
}
DOWNLOAD_TIMEOUT_S = 10.0
# The digits set has no official test split; these many samples, chosen by a fixed seed, are held out as one.
DIGITS_TEST_SIZE = 297
_DIGITS_TEST_SEED = 20240101


@dataclass
class Dataset:
    """Samples as a float32 matrix, with optional labels and image shape.

    Attributes
    ----------
    X : ndarray of shape (n, p), float32
    y : ndarray of shape (n,) or None
        Integer labels: the labels themselves (built-in sets, arrays), or, where `label_values`
        is set (labels read from a file), indices into it.
    image_shape : (height, width) or None
        Set for image data; ``X`` holds the images flattened row-major.
    name : str
        Built-in name, or the file it came from.
    feature_names : list of str or None
        Header names of a table's feature columns.
    feature_columns : list of str or None
        How a table's features are found again (names, or 0-based indices without a header).
    label_values : list or None
        The label vocabulary in the labels' own type (int, float or str; None for the class of
        missing labels): ``label_values[y[i]]`` is sample i's label as written in the file.
    label_names : list of str or None
        The legend of each code: ``str`` of `label_values`.
    label_kind : "int", "float", "str" or None
    notes : list of str
        What reading the data decided that a user should hear (columns left out, rows dropped).
    """

    X: np.ndarray
    y: Optional[np.ndarray] = None
    image_shape: Optional[tuple] = None
    name: str = ""
    feature_names: Optional[list] = None
    label_names: Optional[list] = None
    notes: list = field(default_factory=list)
    feature_columns: Optional[list] = None
    label_values: Optional[list] = None
    label_kind: Optional[str] = None

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def p(self) -> int:
        return int(self.X.shape[1])

    def subset(self, idx: np.ndarray) -> "Dataset":
        return dataclasses.replace(self, X=self.X[idx], y=None if self.y is None else self.y[idx],
                                   notes=list(self.notes))

    def labels(self) -> Optional[np.ndarray]:
        """The labels as written (int64, float64 with NaN where missing, or str), or None."""
        if self.y is None or self.label_values is None:
            return self.y
        from .tables import labels_array

        return labels_array([self.label_values[int(c)] for c in self.y])

    def label_of(self, i: int) -> str:
        """Sample i's label for a legend or caption."""
        return str(self.y[i]) if self.label_names is None else self.label_names[int(self.y[i])]


# --- entry point ------------------------------------------------------------------------------

def load(cfg: DataConfig, split: str = "train") -> Dataset:
    """Load the data set a `DataConfig` names.

    Parameters
    ----------
    cfg : DataConfig
    split : {"train", "test"}
        The data set's own split. Files have only "train" (the whole file).
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.name == "digits":
        ds = load_digits(split)
    elif cfg.name in _IDX:
        ds = load_idx_dataset(cfg.name, split, cfg.data_dir)
    elif cfg.name == "file":
        if split == "test":
            raise DataError(f"{cfg.path}: a data file has no test split of its own; pass the test file as --data")
        ds = load_file(cfg.path, key=cfg.key, **read_options(cfg))
    else:
        raise DataError(f"unknown data set {cfg.name!r}: use one of {', '.join(BUILTIN)} or a file path")
    if cfg.limit is not None and split == "train" and ds.n > cfg.limit:
        ds = ds.subset(np.arange(cfg.limit))
    return ds


# --- built-in sets ----------------------------------------------------------------------------

def load_digits(split: str = "train") -> Dataset:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1]; a fixed 297-sample test split."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(_DIGITS_TEST_SEED).permutation(len(X))
    idx = np.sort(perm[:DIGITS_TEST_SIZE]) if split == "test" else np.sort(perm[DIGITS_TEST_SIZE:])
    return Dataset(X=X[idx], y=y[idx], image_shape=(8, 8), name="digits")


def default_data_dir() -> Path:
    """``$VAELENS_DATA_DIR``, else a per-user cache folder."""
    env = os.environ.get("VAELENS_DATA_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vaelens"


def load_idx_dataset(name: str, split: str, data_dir: Optional[str] = None) -> Dataset:
    """MNIST or Fashion-MNIST from the four IDX files (raw or .gz), checked against published MD5s.

    The files are looked for in `data_dir` itself and in its subfolder named after the set.
    Missing files are downloaded into that subfolder unless ``VAELENS_OFFLINE=1``.
    """
    spec = _IDX[name]
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    prefix = "train" if split == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = [_find_or_fetch(name, spec, root, stem) for stem in stems]
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{paths[0]}: expected images (n, h, w) and {paths[1]}: n labels; got {images.shape}, {labels.shape}")
    n, h, w = images.shape
    X = images.reshape(n, h * w).astype(np.float32) / 255.0
    return Dataset(X=X, y=labels.astype(np.int64), image_shape=(h, w), name=name)


def _find_or_fetch(name: str, spec: dict, root: Path, stem: str) -> Path:
    candidates = []
    for folder in (root, root / name):
        for fname in (stem, stem + ".gz"):
            candidates.append(folder / fname)
    for path in candidates:
        if path.is_file():
            verify_md5(path, *spec["files"][stem])
            return path
    if os.environ.get("VAELENS_OFFLINE", "") not in ("", "0"):
        reason = "downloads are off (VAELENS_OFFLINE is set)"
    else:
        target = root / name / (stem + ".gz")
        reason = _download(spec["mirrors"], stem + ".gz", target)
        if reason is None:
            verify_md5(target, *spec["files"][stem])
            return target
    raise DataError(
        f"{name}: file {stem}(.gz) not found in {root} or {root / name}, and {reason}. "
        f"Put the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, raw or .gz) in one folder and pass it with --data-dir or VAELENS_DATA_DIR."
    )


def _download(mirrors: Sequence[str], fname: str, target: Path) -> Optional[str]:
    """Try each mirror with a short timeout; return None on success, else why it failed."""
    errors = []
    for base in mirrors:
        tmp = target.with_name(target.name + ".part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(base + fname, timeout=DOWNLOAD_TIMEOUT_S) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            os.replace(tmp, target)
            return None
        except Exception as e:  # offline, DNS, HTTP errors: all mean "try the next mirror"
            errors.append(f"{base}: {e}")
            tmp.unlink(missing_ok=True)
    return "the download failed (" + "; ".join(errors) + ")"


def verify_md5(path: Path, gz_md5: Optional[str], raw_md5: Optional[str]) -> None:
    """Accept `path` when its bytes match the published .gz MD5, or its content the raw MD5."""
    data = Path(path).read_bytes()
    if gz_md5 and hashlib.md5(data).hexdigest() == gz_md5:
        return
    if raw_md5:
        try:
            content = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e}); delete it and fetch it again") from None
        if hashlib.md5(content).hexdigest() == raw_md5:
            return
    raise DataError(f"{path}: checksum does not match the published file (corrupt, truncated or a different data set)")


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a numpy array."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header truncated")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX body has {len(raw) - header} bytes, header says {expected} (truncated?)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


# --- files ------------------------------------------------------------------------------------

def read_options(cfg: DataConfig) -> dict:
    """`load_file`'s reading options from a DataConfig, with the run's saved features and labels."""
    delimiter = "\t" if cfg.delimiter in ("\\t", "tab") else cfg.delimiter  # what a shell makes of a tab
    return dict(columns=cfg.columns, label_column=cfg.label_column, delimiter=delimiter, missing=cfg.missing,
                missing_label=cfg.missing_label, keep_id_columns=cfg.keep_id_columns,
                feature_columns=cfg.feature_columns, vocabulary=saved_vocabulary(cfg), label_kind=cfg.label_kind)


def saved_vocabulary(cfg: DataConfig) -> Optional[list]:
    """The run's label vocabulary in the labels' own type ("" in config.json: the missing class)."""
    if cfg.labels is None:
        return None
    as_kind = {"int": int, "float": float}.get(cfg.label_kind or "str", str)
    return [None if v == "" else as_kind(v) for v in cfg.labels]


def with_saved_columns(cfg: DataConfig, ds: Dataset) -> DataConfig:
    """`cfg` with the features and label vocabulary `ds` was read with, where it has none yet.

    Saved in the run, they make every later file be read by the same column names and coded
    against the same labels.
    """
    upd = {}
    if cfg.feature_columns is None and ds.feature_columns is not None:
        upd["feature_columns"] = tuple(ds.feature_columns)
    if cfg.labels is None and ds.label_values is not None:
        upd["labels"] = tuple("" if v is None else str(v) for v in ds.label_values)
        upd["label_kind"] = ds.label_kind
    return dataclasses.replace(cfg, **upd) if upd else cfg


def load_file(path, key: Optional[str] = None, columns: Optional[Sequence[str]] = None,
              label_column: Optional[str] = None, **read) -> Dataset:
    """Load a .npy, .npz, .csv or .parquet file (or IDX, by its name) as a `Dataset`.

    Parameters
    ----------
    path : str or Path
    key : str, optional
        Array inside an .npz (default: the only array, or ``X``/``x``/``data``).
    columns : sequence of str, optional
        Feature columns of a table (names, or 0-based indices as strings).
    label_column : str, optional
        Column (table) or key (.npz) holding labels; kept out of the features.
    **read
        The other fields of `vaelens.tables.ReadOptions`: delimiter, missing, missing_label,
        keep_id_columns, and a run's feature_columns, vocabulary and label_kind.
    """
    from .tables import ReadOptions

    opt = ReadOptions(columns=columns, label_column=label_column, **read)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; for MNIST folders use --data mnist --data-dir {path}")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    suffix = suffix.lower()
    if suffix == ".npy":
        return from_array(_load_npy(path), str(path))
    if suffix == ".npz":
        return _load_npz(path, key, opt)
    if suffix in (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz"):
        return _read_table(path, opt, parquet=False)
    if suffix in (".parquet", ".pq"):
        return _read_table(path, opt, parquet=True)
    if "idx" in path.name:
        return from_array(read_idx(path), str(path))
    raise DataError(f"{path}: unknown file type {suffix or '(none)'}; use .npy, .npz, .csv or .parquet")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError ... for damaged files
        raise DataError(f"{path}: {_load_problem(e, '.npy')}") from None


def _load_problem(e: Exception, kind: str) -> str:
    """One line on why numpy could not load a file; pickled (object) arrays are refused, never unpickled."""
    msg = " ".join(str(e).split()) or type(e).__name__
    if "allow_pickle" in msg or "pickle" in msg.lower():
        return ("holds a pickled (object) array, which cannot be read without unpickling; vaelens refuses "
                "because unpickling can run code. Save plain numbers (e.g. X.astype('float32'))")
    return f"not a readable {kind} file ({msg})"


def _load_npz(path: Path, key: Optional[str], opt) -> Dataset:
    label_key = opt.label_column
    try:
        z = np.load(path, allow_pickle=False)
        keys = list(z.keys())
    except Exception as e:
        raise DataError(f"{path}: {_load_problem(e, '.npz')}") from None
    if label_key is None and key != "y" and "y" in keys:
        label_key = "y"  # the usual name for labels beside the features
    if key is None:
        rest = [k for k in keys if k != label_key]
        preferred = [k for k in ("X", "x", "data") if k in rest]
        if len(rest) == 1:
            key = rest[0]
        elif preferred:
            key = preferred[0]
        else:
            raise DataError(f"{path}: holds arrays {', '.join(keys) or '(none)'}; choose one with --key")
    if key not in keys:
        raise DataError(f"{path}: no array named {key!r}; it holds {', '.join(keys) or '(none)'}")
    try:
        arr = z[key]
    except Exception as e:
        raise DataError(f"{path}[{key}]: {_load_problem(e, '.npz member')}") from None
    ds = from_array(arr, f"{path}[{key}]")
    if label_key is not None:
        if label_key not in keys:
            raise DataError(f"{path}: no label array named {label_key!r}; it holds {', '.join(keys)}")
        try:
            y = np.asarray(z[label_key]).reshape(-1)
        except Exception as e:
            raise DataError(f"{path}[{label_key}]: {_load_problem(e, '.npz member')}") from None
        if len(y) != ds.n:
            raise DataError(f"{path}: labels {label_key!r} have {len(y)} entries for {ds.n} samples")
        from . import tables

        labels = tables.typed_labels(tables.array_labels(y), opt.label_kind)
        notes: list = []
        keep = tables.missing_labels(path, labels, label_key, list(range(len(y))), "row", opt.missing_label, notes)
        if not keep.all():
            ds = ds.subset(np.nonzero(keep)[0])
            labels = [v for v, k in zip(labels, keep) if k]
        ds.notes += notes
        _set_labels(ds, labels, opt, f"{path}[{label_key}]")
    return ds


def from_array(arr: np.ndarray, where: str) -> Dataset:
    """A `Dataset` from a loaded array: (n, p) tables, or images (n, h, w) / (n, 1, h, w) flattened."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{where}: expected numbers, got dtype {arr.dtype}")
    if arr.size == 0:
        raise DataError(f"{where}: no data (shape {arr.shape})")
    image_shape = None
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 3:
        image_shape = (int(arr.shape[1]), int(arr.shape[2]))
        arr = arr.reshape(arr.shape[0], -1)
    elif arr.ndim == 1:
        raise DataError(f"{where}: expected a 2-D array (samples, features) or images (n, h, w); got 1-D shape {arr.shape}")
    elif arr.ndim != 2:
        raise DataError(f"{where}: expected a 2-D array (samples, features) or images (n, h, w); got shape {arr.shape}")
    notes = []
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
        notes.append("uint8 values scaled to [0, 1]")
    check_finite(arr, where)
    with np.errstate(over="ignore"):
        X = arr.astype(np.float32)
    check_finite(X, where, what="values too large for float32 (|x| > 3.4e38)")
    return Dataset(X=X, image_shape=image_shape, name=where, notes=notes)


def _read_table(path: Path, opt, parquet: bool) -> Dataset:
    from . import tables  # the readers live there; tables needs nothing from here

    t = tables.read_parquet(path, opt) if parquet else tables.read_csv(path, opt)
    # rows may have been dropped (--missing drop): each kept row is named by its own line
    where = dict(feature_names=t.feature_columns, row_numbers=t.rows, row_word="row" if parquet else "line")
    check_finite(t.X, str(path), **where)
    with np.errstate(over="ignore"):
        X32 = t.X.astype(np.float32)
    check_finite(X32, str(path), what="values too large for float32", **where)
    ds = Dataset(X=X32, name=str(path), feature_names=t.feature_names, feature_columns=t.feature_columns,
                 notes=list(t.notes or []))
    if t.labels is not None:
        _set_labels(ds, t.labels, opt, str(path))
    return ds


def _set_labels(ds: Dataset, labels: list, opt, where: str) -> None:
    """Code `labels` (as written) against the run's vocabulary (or their own) into ds.y and friends."""
    from . import tables

    codes, vocab, note = tables.code_labels(labels, opt.vocabulary, where)
    ds.y, ds.label_values = codes, vocab
    ds.label_names = [tables.label_name(v) for v in vocab]
    present = [v for v in vocab if v is not None]
    ds.label_kind = opt.label_kind or tables.typed_kind(present)
    if note:
        ds.notes.append(note)


# --- validation -------------------------------------------------------------------------------

def check_finite(X: np.ndarray, where: str, feature_names: Optional[list] = None, row_offset: int = 0,
                 row_word: str = "line", what: str = "NaN or infinite values", original=None,
                 row_numbers: Optional[Sequence[int]] = None) -> None:
    """Raise a `DataError` listing the first rows and columns that hold NaN or inf.

    Rows are named ``row r`` (0-based), ``<row_word> r + row_offset``, or by `row_numbers` (each
    row's own line or row number, for tables whose rows were dropped)."""
    if X.size == 0:
        raise DataError(f"{where}: no data (shape {X.shape})")
    finite = np.isfinite(X)
    if finite.all():
        return
    rows, cols = np.nonzero(~finite)
    cells = []
    for r, c in list(zip(rows, cols))[:5]:
        cname = feature_names[c] if feature_names else str(c)
        if row_numbers is not None:
            label = f"{row_word} {row_numbers[r]}"
        else:
            label = f"{row_word} {r + row_offset}" if row_offset else f"row {r}"
        cells.append(f"{label}, column {cname!r}")
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise DataError(f"{where}: {what} at {'; '.join(cells)}{more}")


def validate(X: np.ndarray, likelihood: str, where: str = "data", expected_features: Optional[int] = None) -> None:
    """Check that `X` suits a model: 2-D, non-empty, finite, right width, inside the likelihood's support."""
    if X.ndim != 2:
        raise DataError(f"{where}: expected a 2-D array (samples, features), got shape {X.shape}")
    if X.shape[0] == 0:
        raise DataError(f"{where}: no samples")
    if X.shape[1] == 0:
        raise DataError(f"{where}: no features")
    if expected_features is not None and X.shape[1] != expected_features:
        raise DataError(f"{where}: has {X.shape[1]} features, the model expects {expected_features}")
    check_finite(X, where)
    if likelihood in ("bernoulli", "cbernoulli"):
        lo, hi = float(X.min()), float(X.max())
        if lo < 0 or hi > 1:
            bad = np.nonzero((X < 0) | (X > 1))
            raise DataError(
                f"{where}: the {likelihood} likelihood needs values in [0, 1], found {lo:g}..{hi:g} "
                f"(first at row {bad[0][0]}, column {bad[1][0]}); use --likelihood gaussian --standardize for "
                f"continuous data, or rescale it"
            )


# --- what the figures are in ------------------------------------------------------------------

def figure_space(cfg) -> str:
    """The space a run's densities (ELBO, log p(x)) are in: the model's input, as `VAE.model_input` makes it."""
    if cfg.data.binarize != "none":
        return "binarized pixels (0/1)" if cfg.model.image_shape else "binarized values (0/1)"
    if cfg.model.likelihood in ("bernoulli", "cbernoulli"):
        return "grey levels in [0, 1]"
    if cfg.data.standardize:
        return "standardized units (the run's mean and std)"
    return "data units"


def log_jacobian(t: Optional[Transform]) -> float:
    """log p(x) in data units minus log p(x) in standardized units: -sum(log std) of the transform."""
    return 0.0 if t is None or not t.std else -float(np.sum(np.log(np.asarray(t.std, np.float64))))


# --- splits and transforms --------------------------------------------------------------------

def train_val_split(n: int, val_fraction: float, seed: int):
    """Seeded split of ``range(n)`` into sorted (train, validation) index arrays."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if n - n_val < 1:
        raise DataError(f"only {n} samples: too few to keep {n_val} for validation")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def binarize_static(X: np.ndarray, seed: int) -> np.ndarray:
    """One fixed Bernoulli draw per pixel, x ~ Bernoulli(intensity)."""
    rng = np.random.default_rng(seed)
    return (rng.random(X.shape, dtype=np.float32) < X).astype(np.float32)


def fit_transform(X: np.ndarray) -> Transform:
    """Per-feature mean and std of the training data; constant features keep std 1."""
    mean = X.mean(axis=0, dtype=np.float64)
    std = X.std(axis=0, dtype=np.float64)
    std[std < 1e-8] = 1.0
    return Transform(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


def apply_transform(X: np.ndarray, t: Optional[Transform]) -> np.ndarray:
    if t is None or not t.mean:
        return X
    if X.shape[1] != len(t.mean):
        raise DataError(f"data has {X.shape[1]} features, the saved standardization expects {len(t.mean)}")
    return ((X - np.asarray(t.mean, np.float32)) / np.asarray(t.std, np.float32)).astype(np.float32)


def invert_transform(X: np.ndarray, t: Optional[Transform]) -> np.ndarray:
    if t is None or not t.mean:
        return X
    return (X * np.asarray(t.std, np.float32) + np.asarray(t.mean, np.float32)).astype(np.float32)
