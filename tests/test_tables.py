"""Tables as users have them (issue #17): labels kept as written and saved in the run, id columns,
missing values, delimiters, `evaluate --data FILE`, the space of every figure, the explorer's first pair.

Runs are tiny (2-3 latents, 16 hidden units, 3 epochs) and trained once per module.
"""

import contextlib
import csv
import io
import json

import numpy as np
import pytest

from vaelens import data, tables
from vaelens.api import VAE
from vaelens.cli import main
from vaelens.config import DataConfig, ModelConfig, RunConfig
from vaelens.errors import DataError

CLASSES = [5, 8, 11, 14]
TRAIN = ("--likelihood", "gaussian", "--standardize", "--epochs", "3", "--latent-dim", "3", "--hidden", "16",
         "--batch-size", "64", "--no-progress")


def write_table(path, n, start=0, seed=0, labels=CLASSES, sep=","):
    """A table as users have one: an id column, four continuous features in raw units, a class column."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    X = z @ np.array([[1, .5, -1, 2], [.3, -1, 1, .5]]) * 3 + 10 + 0.1 * rng.normal(size=(n, 4))
    y = [labels[(i * 7 + seed) % len(labels)] for i in range(n)]
    lines = [sep.join(["id", "a", "b", "c", "d", "class"])]
    lines += [sep.join([str(start + i), *(f"{v:.4f}" for v in X[i]), str(y[i])]) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return np.round(X, 4).astype(np.float32), y


def cli(*args):
    """`vaelens ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _train(folder, labels):
    X, y = write_table(folder / "train.csv", 120, labels=labels)
    Xt, yt = write_table(folder / "test.csv", 40, start=120, seed=1, labels=labels, sep=";")
    rc, out, err = cli("train", "--data", folder / "train.csv", "--label-column", "class", *TRAIN,
                       "--out", folder / "run")
    assert rc == 0, out + err
    return dict(dir=folder, run=folder / "run", y=y, Xt=Xt, yt=yt, stdout=out, stderr=err)


@pytest.fixture(scope="module")
def numeric_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("numeric"), CLASSES)


@pytest.fixture(scope="module")
def string_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("strings"), ["emu", "cat", "dog"])


# --- labels -----------------------------------------------------------------------------------

def test_numeric_labels_and_features_are_saved_in_the_run(numeric_run):
    cfg = json.loads((numeric_run["run"] / "config.json").read_text())["data"]
    assert cfg["labels"] == ["5", "8", "11", "14"] and cfg["label_kind"] == "int"
    # the id column was left out, with a note naming it and both flags
    assert cfg["feature_columns"] == ["a", "b", "c", "d"]
    note = ("column 'id' looks like a row identifier (named 'id'); left out of the features. Pass "
            "--keep-id-columns to use it, or choose the features with --columns")
    assert note in numeric_run["stderr"]
    assert "4 features" in numeric_run["stdout"]


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet"])
def test_encode_writes_labels_as_written(numeric_run, suffix, tmp_path):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"post{suffix}"
    # test.csv: semicolons, its own id column (120..159), read by the run's feature names
    rc, _, err = cli("encode", numeric_run["run"], "--data", numeric_run["dir"] / "test.csv", "--out", out)
    assert rc == 0, err
    if suffix == ".npz":
        label = np.load(out)["label"]
        assert label.dtype == np.int64 and label.tolist() == numeric_run["yt"]
    elif suffix == ".csv":
        rows = list(csv.DictReader(out.open()))
        assert [int(r["label"]) for r in rows] == numeric_run["yt"] and rows[0]["label"] == str(numeric_run["yt"][0])
    else:
        import pyarrow.parquet as pq

        col = pq.read_table(out).column("label")
        assert str(col.type) == "int64" and col.to_pylist() == numeric_run["yt"]


def test_report_and_explorer_legends_show_the_labels(numeric_run, tmp_path):
    from vaelens.report import build_report
    from vaelens.serve import Explorer

    vae = VAE.load(numeric_run["run"])
    ds = data.load(_file_config(vae, numeric_run["dir"] / "test.csv"))
    rep = build_report(numeric_run["run"], ds, out_path=tmp_path / "r.html", evaluate=False, n_cloud=1,
                       cloud_samples=50)
    assert rep.numbers["labels"] == CLASSES
    info = Explorer(vae, ds).info()
    assert info["label_names"] == ["5", "8", "11", "14"]
    assert [info["label_names"][c] for c in Explorer(vae, ds).latent_map()["label"]] == [str(v) for v in
                                                                                         numeric_run["yt"]]


def test_string_labels_vocabulary_is_reused(string_run, tmp_path):
    cfg = json.loads((string_run["run"] / "config.json").read_text())["data"]
    assert cfg["labels"] == ["cat", "dog", "emu"] and cfg["label_kind"] == "str"
    vae = VAE.load(string_run["run"])
    # a later file with only two of the classes, and one the run never saw
    p = tmp_path / "later.csv"
    p.write_text("a,b,c,d,class\n1,2,3,4,dog\n1,2,3,4,fox\n1,2,3,4,emu\n1,2,3,4,dog\n")
    ds = data.load(_file_config(vae, p))
    assert ds.label_names == ["cat", "dog", "emu", "fox"] and ds.y.tolist() == [1, 3, 2, 1]
    assert ds.labels().tolist() == ["dog", "fox", "emu", "dog"]
    assert f"{p}: label(s) fox are not among the run's labels (cat, dog, emu); kept as written" in ds.notes
    out = tmp_path / "post.npz"
    rc, _, err = cli("encode", string_run["run"], "--data", p, "--out", out)
    assert rc == 0 and "label(s) fox are not among" in err
    assert np.load(out)["label"].tolist() == ["dog", "fox", "emu", "dog"]


def _file_config(vae, path):
    return DataConfig(**{**vae.config_.data.__dict__, "name": "file", "path": str(path)})


def test_labels_typed_sorted_and_coded():
    assert tables.typed_labels(["14", "5", "11"]) == [14, 5, 11]
    assert tables.typed_labels(["1.5", "2"]) == [1.5, 2.0]
    assert tables.typed_labels(["5", "x"]) == ["5", "x"]
    codes, vocab, note = tables.code_labels([14, 5, 11, 8, 5], None, "f")
    assert vocab == [5, 8, 11, 14] and codes.tolist() == [3, 0, 2, 1, 0] and note is None
    # a run's int vocabulary: "17" parses as the number 17, unseen, appended and noted
    codes, vocab, note = tables.code_labels(tables.typed_labels(["8", "17"], "int"), [5, 8], "t.csv")
    assert vocab == [5, 8, 17] and codes.tolist() == [1, 2] and "label(s) 17 are not among" in note


def test_missing_label_names_line_and_policies(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b,class\n1,2,5\n3,4,8\n5,6,\n7,8,NA\n")
    with pytest.raises(DataError, match=r"t.csv: line 4, column 'class': missing label \(and 1 more rows\); pass "
                                        r"--missing-label drop to leave such rows out, or --missing-label keep"):
        data.load_file(p, label_column="class")
    ds = data.load_file(p, label_column="class", missing_label="drop")
    assert ds.n == 2 and ds.labels().tolist() == [5, 8]
    assert f"{p}: dropped 2 of 4 rows with a missing label (--missing-label drop)" in ds.notes
    ds = data.load_file(p, label_column="class", missing_label="keep")
    assert ds.label_names == ["5", "8", "(missing)"] and ds.y.tolist() == [0, 1, 2, 2]
    assert np.isnan(ds.labels()[2:]).all() and ds.labels()[:2].tolist() == [5, 8]
    rc, _, err = cli("train", "--data", p, "--label-column", "class", "--likelihood", "gaussian", "--epochs", "1",
                     "--out", tmp_path / "r")
    assert rc == 2 and "line 4, column 'class': missing label" in err and "Traceback" not in err


# --- feature columns --------------------------------------------------------------------------

def test_id_columns_left_out_with_a_note(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("ID,n,count,even,x\n" + "".join(f"{100 + i},{i + 1},{(i * 7) % 5},{2 * i},{i * 0.5}\n"
                                                 for i in range(6)))
    ds = data.load_file(p)
    # named ID; n counts 1..6; count repeats; even has gaps: features, not row numbers
    assert ds.feature_names == ["count", "even", "x"]
    assert any("column 'ID' looks like a row identifier (named 'ID')" in n for n in ds.notes)
    assert any("column 'n' looks like a row identifier (consecutive integers 1..6)" in n for n in ds.notes)
    assert data.load_file(p, keep_id_columns=True).feature_names == ["ID", "n", "count", "even", "x"]
    assert data.load_file(p, columns=("n", "x")).feature_names == ["n", "x"]
    # without a header: the first column 0..5 is left out, the rest found again by index
    q = tmp_path / "n.csv"
    q.write_text("".join(f"{i},{i * i},{(i * 3) % 4}\n" for i in range(6)))
    ds = data.load_file(q)
    assert ds.feature_columns == ["1", "2"] and ds.X[:, 0].tolist() == [0, 1, 4, 9, 16, 25]


def test_later_file_is_read_by_the_run_feature_names(tmp_path):
    p = tmp_path / "test.csv"
    p.write_text("d,id,a,extra,b\n4,7,1,0,2\n8,8,5,0,6\n")
    ds = data.load_file(p, feature_columns=("a", "b", "d"))
    assert ds.X.tolist() == [[1, 2, 4], [5, 6, 8]] and ds.notes == []
    with pytest.raises(DataError, match=r"test.csv: no column 'c', which the run was trained on \(its features are "
                                        r"a, b, c\)"):
        data.load_file(p, feature_columns=("a", "b", "c"))


def test_parquet_id_column_and_labels(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"row": [0, 1, 2], "k": [3, 1, 2], "x": [0.5, 1.5, 2.5], "cls": [11, 5, 11]}),
                   tmp_path / "t.parquet")
    ds = data.load_file(tmp_path / "t.parquet", label_column="cls")
    assert ds.feature_names == ["k", "x"] and ds.labels().tolist() == [11, 5, 11] and ds.label_kind == "int"


def test_missing_values_named_and_dropped(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b\n1,2\n3,NA\n?,4\n5,6\n")
    with pytest.raises(DataError) as e:
        data.load_file(p)
    assert str(e.value) == (f"{p}: missing values (empty, NA, NaN or ?) at line 3, column 'b'; line 4, column 'a'; "
                            f"pass --missing drop to leave those rows out (nothing is filled in)")
    ds = data.load_file(p, missing="drop")
    assert ds.X.tolist() == [[1, 2], [5, 6]]
    assert ds.notes == [f"{p}: dropped 2 of 4 rows with missing values (--missing drop; lines 3, 4)"]
    # a bad cell after dropped rows is still named by its own line
    p.write_text("a,b\n1,\n3,inf\n")
    with pytest.raises(DataError, match="NaN or infinite values at line 3, column 'b'"):
        data.load_file(p, missing="drop")


def test_missing_drop_from_the_command_line(numeric_run, tmp_path):
    p = tmp_path / "holes.csv"
    text = (numeric_run["dir"] / "train.csv").read_text().splitlines()
    text[3] = text[3].replace(text[3].split(",")[2], "")  # line 4, column b
    p.write_text("\n".join(text) + "\n")
    rc, _, err = cli("evaluate", numeric_run["run"], "--data", p, "--iw-samples", "0")
    assert rc == 2 and "missing values (empty, NA, NaN or ?) at line 4, column 'b'" in err
    rc, out, err = cli("evaluate", numeric_run["run"], "--data", p, "--iw-samples", "0", "--missing", "drop")
    assert rc == 0 and "dropped 1 of 120 rows with missing values (--missing drop; lines 4)" in err
    assert "(all 119 samples" in out


# --- delimiters -------------------------------------------------------------------------------

def test_semicolon_and_tab_files_are_sniffed(tmp_path):
    p = tmp_path / "semi.csv"
    p.write_text("a;b;c\n1,5;2;3\n4;5;6\n")  # decimal commas: ';' is the only even split
    with pytest.raises(DataError, match=r"non-numeric values in column\(s\) 'a' \(line 2: '1,5'\)"):
        data.load_file(p)
    p.write_text("a;b;c\n1.5;2;3\n4;5;6\n")
    assert data.load_file(p).X.tolist() == [[1.5, 2, 3], [4, 5, 6]]
    q = tmp_path / "t.txt"
    q.write_text("a\tb\n1\t2\n")
    assert data.load_file(q).feature_names == ["a", "b"]


def test_delimiter_named_in_the_error(tmp_path):
    p = tmp_path / "semi.csv"
    p.write_text("a;b;c\n1,5;2;3\n")
    with pytest.raises(DataError) as e:
        data.load_file(p, delimiter=",")
    assert str(e.value) == (f"{p}: line 2 has 2 fields, expected 1 (as in line 1): is the file separated by ';'? "
                            f"pass --delimiter ';'")
    p.write_text("a;b;c\n1;2;3\n4;5\n6;7;8\n")
    with pytest.raises(DataError) as e:
        data.load_file(p)
    assert str(e.value) == (f"{p}: line 3 has 2 fields, expected 3 (as in line 1), reading it as separated by ';' "
                            f"(guessed from the first lines); fix that line, or name the separator with --delimiter")
    p.write_text("a;b\n1;2\n")
    with pytest.raises(DataError, match="reads as one column: is it separated by ';'"):
        data.load_file(p, delimiter="|")
    assert data.load_file(p, delimiter=";").X.tolist() == [[1, 2]]


# --- evaluate --data, the space of the figures, the explorer ----------------------------------

def test_evaluate_data_file_matches_the_api(numeric_run, tmp_path):
    out = tmp_path / "e.json"
    test_csv = numeric_run["dir"] / "test.csv"
    rc, stdout, err = cli("evaluate", numeric_run["run"], "--data", test_csv, "--label-column", "class",
                          "--iw-samples", "20", "--json", out)
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["data"] == str(test_csv) and r["split"] is None and r["n"] == 40
    assert r["space"] == "standardized units (the run's mean and std)"
    assert f"on {test_csv} (all 40 samples" in stdout
    assert "densities in nats of the model's input: standardized units (the run's mean and std)" in stdout
    assert "log p(x) [standardized], IWAE k=20" in stdout and "log p(x) [data units]" in stdout
    vae = VAE.load(numeric_run["run"])
    np.testing.assert_array_equal(data.load(_file_config(vae, test_csv)).X, numeric_run["Xt"])
    ev = vae.evaluate(numeric_run["Xt"], iw_samples=20, seed=0).to_dict()
    for key in ("elbo", "log_likelihood", "kl", "rec"):
        assert r[key] == pytest.approx(ev[key], rel=1e-6, abs=1e-6)
    shift = -np.log(np.asarray(vae.config_.transform.std)).sum()
    assert r["log_likelihood_data_units"] == pytest.approx(ev["log_likelihood"] + shift)
    # log p(x) in data units is that of the raw rows: check against the density change of variables
    assert r["log_jacobian"] == pytest.approx(shift)


def test_evaluate_split_applies_to_built_in_sets_only(numeric_run):
    test_csv = numeric_run["dir"] / "test.csv"
    rc, out, err = cli("evaluate", numeric_run["run"], "--data", test_csv, "--split", "train", "--iw-samples", "0")
    assert rc == 0 and f"note: --split applies to the built-in data sets only; {test_csv} is evaluated whole" in err
    assert f"on {test_csv} (all " in out and "train" not in out.splitlines()[0].replace(str(test_csv), "")
    rc, _, err = cli("evaluate", numeric_run["run"])
    assert rc == 2 and "which has no test split of its own; pass the test file with --data FILE" in err


def test_figure_space_of_each_kind_of_run():
    def space(likelihood="bernoulli", **data_kw):
        return data.figure_space(RunConfig(data=DataConfig(**data_kw), model=ModelConfig(
            likelihood=likelihood, image_shape=(8, 8))))
    assert space(binarize="dynamic") == "binarized pixels (0/1)"
    assert space() == "grey levels in [0, 1]" and space("cbernoulli") == "grey levels in [0, 1]"
    assert space("gaussian", standardize=True) == "standardized units (the run's mean and std)"
    assert space("gaussian") == "data units"


def test_explorer_opens_on_the_two_most_active_latents(numeric_run):
    import torch

    from vaelens.evaluate import active_units
    from vaelens.serve import Explorer

    vae = VAE.load(numeric_run["run"])
    with torch.no_grad():  # make z0 inactive and z2 the most active, so the pair is not (0, 1) by chance
        head = vae.module_.encoder.mu_head
        head.weight[0] = 0
        head.bias[0] = 0
        head.weight[2] *= 20
    X = numeric_run["Xt"]
    ex = Explorer(vae, data.Dataset(X=X))
    order = np.argsort(-active_units(vae.encode(X).mu)[1], kind="stable")
    assert ex.info()["initial_dims"] == [2, 1] == order[:2].tolist()
