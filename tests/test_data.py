import gzip
import struct

import numpy as np
import pytest

from vaelens import data
from vaelens.config import DataConfig
from vaelens.errors import DataError


def test_digits_scaled_and_split():
    tr, te = data.load_digits("train"), data.load_digits("test")
    assert tr.X.shape == (1500, 64) and te.X.shape == (297, 64)
    assert tr.X.dtype == np.float32 and tr.X.min() == 0 and tr.X.max() == 1
    assert tr.image_shape == (8, 8) and tr.y is not None
    # the test split is disjoint from training: no identical rows shared
    shared = {r.tobytes() for r in tr.X} & {r.tobytes() for r in te.X}
    assert len(shared) < 5  # digits contains a handful of exact duplicate images, nothing more


def test_mnist_from_idx_folder(mnist_dir):
    ds = data.load(DataConfig(name="mnist", data_dir=str(mnist_dir)), "test")
    assert ds.X.shape == (10000, 784) and ds.image_shape == (28, 28)
    assert ds.y[:3].tolist() == [7, 2, 1]


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_mnist_wrong_checksum_and_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELENS_OFFLINE", "1")
    with pytest.raises(DataError, match="not found in .* downloads are off.*--data-dir"):
        data.load(DataConfig(name="mnist", data_dir=str(tmp_path)), "train")
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: checksum does not match"):
        data.load(DataConfig(name="mnist", data_dir=str(tmp_path)), "train")


def test_download_fails_fast_offline(tmp_path, monkeypatch):
    # the mirrors are unreachable here: the loader must give up with a message, not hang
    monkeypatch.delenv("VAELENS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 2.0)
    monkeypatch.setattr(data, "_IDX", {"mnist": dict(data._IDX["mnist"], mirrors=("http://127.0.0.1:9/",))})
    with pytest.raises(DataError, match="the download failed"):
        data.load(DataConfig(name="mnist", data_dir=str(tmp_path)), "train")


def test_read_idx_truncated(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 2, 2) + b"\x00" * 5)
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(p)


def test_npy_npz_loading(tmp_path):
    X = np.random.default_rng(0).random((10, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", X)
    assert np.array_equal(data.load_file(tmp_path / "a.npy").X, X)
    np.savez(tmp_path / "b.npz", feats=X, y=np.arange(10))
    ds = data.load_file(tmp_path / "b.npz")
    assert ds.X.shape == (10, 4) and ds.y.tolist() == list(range(10))
    np.savez(tmp_path / "c.npz", a=X, b=X)
    with pytest.raises(DataError, match="holds arrays a, b; choose one with --key"):
        data.load_file(tmp_path / "c.npz")
    assert data.load_file(tmp_path / "c.npz", key="b").X.shape == (10, 4)
    with pytest.raises(DataError, match="no array named 'q'"):
        data.load_file(tmp_path / "c.npz", key="q")
    imgs = (np.random.default_rng(1).random((5, 6, 6)) * 255).astype(np.uint8)
    np.save(tmp_path / "imgs.npy", imgs)
    ds = data.load_file(tmp_path / "imgs.npy")
    assert ds.image_shape == (6, 6) and ds.X.shape == (5, 36) and ds.X.max() <= 1


def test_npy_object_array_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="without unpickling"):
        data.load_file(tmp_path / "o.npy")


def test_csv_header_columns_labels(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b,kind,c\n1,2,x,3\n4,5,y,6\n7,8,x,9\n")
    with pytest.raises(DataError, match=r"non-numeric values in column\(s\) 'kind' \(line 2: 'x'\)"):
        data.load_file(p)
    ds = data.load_file(p, label_column="kind")
    assert ds.X.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert ds.feature_names == ["a", "b", "c"] and ds.y.tolist() == [0, 1, 0] and ds.label_names == ["x", "y"]
    ds = data.load_file(p, columns=("c", "a"))
    assert ds.X[:, 0].tolist() == [3, 6, 9]
    with pytest.raises(DataError, match="no column 'zz'"):
        data.load_file(p, columns=("zz",))


def test_csv_without_header(tmp_path):
    p = tmp_path / "n.csv"
    p.write_text("1,2\n3,4\n")
    assert data.load_file(p).X.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("text, fragment", [
    ("a,b\n1,2\n3\n", "line 3 has 1 fields, expected 2"),
    ("a,b\n1,nan\n3,4\n", "missing values (empty, NA, NaN or ?) at line 2, column 'b'; pass --missing drop"),
    ("a,b\n1,2\n3,inf\n", "line 3, column 'b'"),
    ("", "empty file"),
    ("a,b\n", "has a header but no data rows"),
    ("a,b\n1,1e300\n", "too large for float32"),
    ("a,b\n1,\n", "missing values (empty, NA, NaN or ?) at line 2, column 'b'"),
])
def test_csv_errors_name_the_place(tmp_path, text, fragment):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        data.load_file(p)
    assert str(p) in str(e.value) and fragment in str(e.value)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1.0, 2.0], "y": [3, 4], "s": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"non-numeric column\(s\) 's'"):
        data.load_file(tmp_path / "t.parquet")
    ds = data.load_file(tmp_path / "t.parquet", label_column="s")
    assert ds.X.tolist() == [[1, 3], [2, 4]] and ds.y.tolist() == [0, 1]


def test_parquet_missing_pyarrow_names_extra(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"vaelens\[parquet\]"):
        data.load_file(tmp_path / "t.parquet")


def test_validate_messages():
    X = np.ones((3, 2), np.float32)
    with pytest.raises(DataError, match="has 2 features, the model expects 5"):
        data.validate(X, "gaussian", "new", 5)
    with pytest.raises(DataError, match=r"bernoulli likelihood needs values in \[0, 1\], found 0..2 \(first at row 0, column 1\)"):
        data.validate(X * np.array([0, 2], np.float32), "bernoulli")
    with pytest.raises(DataError, match="no samples"):
        data.validate(np.ones((0, 2), np.float32), "gaussian")
    with pytest.raises(DataError, match="expected a 2-D array"):
        data.validate(np.ones(3, np.float32), "gaussian")
    bad = X.copy()
    bad[1, 0] = np.nan
    with pytest.raises(DataError, match="row 1, column '0'"):
        data.validate(bad, "gaussian")


def test_split_deterministic_and_disjoint():
    a = data.train_val_split(100, 0.2, seed=3)
    b = data.train_val_split(100, 0.2, seed=3)
    c = data.train_val_split(100, 0.2, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == 20 and not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 100


def test_binarize_and_transform():
    X = np.full((2000, 3), 0.3, np.float32)
    B = data.binarize_static(X, 0)
    assert set(np.unique(B)) <= {0.0, 1.0}
    # 6000 Bernoulli(0.3) draws: std of the mean is 0.0059, so 0.03 is five standard errors
    assert abs(B.mean() - 0.3) < 0.03
    t = data.fit_transform(np.array([[1, 2], [3, 2]], np.float32))
    Z = data.apply_transform(np.array([[1, 2], [3, 2]], np.float32), t)
    assert np.allclose(Z, [[-1, 0], [1, 0]])
    assert np.allclose(data.invert_transform(Z, t), [[1, 2], [3, 2]])
