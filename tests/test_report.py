"""vaelens.report and `vaelens report` / `train --report`: a self-contained HTML page that parses,
embeds decodable PNGs, has every section, points at nothing on the network, and renders in a browser."""

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _helpers import cli
from vaelens import VAE
from vaelens.errors import DataError, VaelensError
from vaelens.report import build_report

IMAGE_SECTIONS = ["run", "reconstructions", "latent-map", "point-cloud", "true-posterior", "aggregate",
                  "compare"]
TABLE_SECTIONS = ["run", "features", "latent-map", "point-cloud", "true-posterior", "aggregate",
                  "compare"]


class _Page(HTMLParser):
    """Collects sections, img sources, links, scripts and styles of a report."""

    def __init__(self):
        super().__init__()
        self.sections, self.imgs, self.refs, self.scripts, self.styles = [], [], [], [], []
        self.skipped = []
        self._in_style = False
        self._in_skip = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "script":
            self.scripts.append(a)
        if tag == "style":
            self._in_style = True
        if tag == "p" and a.get("class") == "skipped":
            self._in_skip = True
        for k in ("src", "href", "action", "data"):
            if k in a:
                self.refs.append(a[k])

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False
        if tag == "p":
            self._in_skip = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)
        if self._in_skip:
            self.skipped.append((self.sections[-1], data))


def _parse(path: Path) -> _Page:
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert text.lstrip().startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    return page


def _check_self_contained(page: _Page, text: str) -> None:
    assert not page.scripts, "the report needs no script"
    for ref in page.refs:
        assert ref.startswith(("data:image/png;base64,", "#")), ref
    assert "@import" not in "".join(page.styles)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", "".join(page.styles))
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", text, re.I)


def _check_images(page: _Page, report) -> None:
    assert len(page.imgs) == len(report.figures) > 0
    saved = {p.read_bytes() for p in report.figures.values()}
    for src in page.imgs:
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG"
        img.load()
        w, h = img.size
        assert 150 <= w <= 2500 and 60 <= h <= 2500, (w, h)
        assert data in saved  # the same figure is on disk under RUN/figures/


@pytest.fixture
def digits_copy(digits_run, tmp_path):
    """A private copy of the session's digits run, so figures/ and report.html land in this test's folder."""
    run = tmp_path / "digits"
    shutil.copytree(digits_run, run)
    return run


@pytest.fixture
def table_run(table_data, tmp_path):
    """A gaussian run on standardized tabular data, saved through the Python API."""
    run = tmp_path / "table"
    VAE(latent_dim=3, hidden=(32,), likelihood="gaussian", standardize=True, batch_size=64).fit(
        table_data, epochs=4, seed=0).save(run)
    return run


def test_digits_report(digits_copy, digits_run, tmp_path):
    from vaelens import data as data_mod

    # a second "seed": same data, another initialization, for the agreement section
    other = tmp_path / "other"
    X = data_mod.load_digits().X
    # 5 epochs at lr 1e-2: all 4 latents active (Var mu 0.02-0.6), so the MCC below compares something
    VAE(latent_dim=4, hidden=(64,), lr=1e-2).fit(X, epochs=5, seed=1).save(other)
    out = tmp_path / "out" / "r.html"
    rep = build_report(digits_copy, out_path=out, compare_runs=[other], max_points=400, evaluate=True)
    assert rep.path == out
    page = _parse(out)
    text = out.read_text()
    assert page.sections == IMAGE_SECTIONS
    assert all(v is None for v in rep.sections.values()), rep.sections
    assert not page.skipped
    _check_self_contained(page, text)
    _check_images(page, rep)
    assert {"training_curves", "reconstructions", "prior_samples", "traversals", "interpolation", "latent_map",
            "point_cloud", "variance_split", "aggregate_posterior", "compare_runs"} <= set(rep.figures)
    # --out elsewhere: the figures go beside it, not into the run (issue 16)
    assert all(p.parent == rep.figure_dir == out.parent / "r_figures" for p in rep.figures.values())
    # 1500 digits > 400: a seeded subsample, and the page says so
    assert rep.numbers["n_points"] == 400
    assert "random subsample of 400" in text and "seed 0" in text
    # the evaluation table comes from vaelens.evaluate on the samples shown
    assert rep.numbers["evaluation"]["n"] == 400 and "log_likelihood" in text
    # The aggregate and agreement figures against independent computations on the same 400 points
    # (the seeded subsample: sorted default_rng(0).choice(1500, 400), as the page says), from the
    # encoders called directly. Shown to fail: aggregate's `within` as the mean of sigma instead of
    # sigma^2, and `between` with ddof=1; the MCC with the Hungarian matching scored on the fitting half.
    import torch
    from scipy.optimize import linear_sum_assignment

    Xs = data_mod.load_digits().X[np.sort(np.random.default_rng(0).choice(1500, 400, replace=False))]

    def post(run):
        with torch.no_grad():
            q = VAE.load(run).module_.eval().encoder(torch.as_tensor(Xs))
        return q.mean.double().numpy(), q.stddev.double().numpy()

    mu, sigma = post(digits_copy)
    agg = rep.numbers["aggregate"]
    between, within = mu.var(0), (sigma ** 2).mean(0)  # Var_x mu (the mixture's own, ddof 0), E_x sigma^2
    np.testing.assert_allclose(agg["between"], between, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(agg["within"], within, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(agg["total"], between + within, rtol=1e-4, atol=1e-7)
    # MCC: active latents (Var mu > 0.01), matched one-to-one on a seeded half by |Pearson correlation|
    # (Hungarian), the matched pairs' |correlation| averaged on the other half
    mu_b, _ = post(other)
    A, B = mu[:, mu.var(0) > 0.01], mu_b[:, mu_b.var(0) > 0.01]
    assert A.shape[1] and B.shape[1]
    perm = np.random.default_rng(0).permutation(400)
    fit, test = perm[:200], perm[200:]
    corr = lambda a, b: np.corrcoef(a, b, rowvar=False)[:a.shape[1], a.shape[1]:]
    r, c = linear_sum_assignment(-np.abs(corr(A[fit], B[fit])))
    mcc = float(np.abs(corr(A[test], B[test])[r, c]).mean())
    got = np.asarray(rep.numbers["compare"]["mcc"])
    assert got.shape == (2, 2) and got[0, 1] == got[1, 0]
    assert got[0, 1] == pytest.approx(mcc, abs=1e-4)
    # the seed fixes the subsample, the samples checked and every draw: the same numbers again
    again = build_report(digits_copy, out_path=tmp_path / "again.html", max_points=400, evaluate=False)
    assert again.numbers["point_cloud"] == rep.numbers["point_cloud"]
    assert again.numbers["aggregate"] == rep.numbers["aggregate"]
    with pytest.raises(VaelensError, match="two different dimensions"):
        build_report(digits_copy, out_path=tmp_path / "x.html", dims=(1, 1))


def test_table_report(table_run, table_data, tmp_path):
    with pytest.raises(DataError, match="in-memory array"):
        build_report(table_run)  # an API run cannot reload its data by itself
    rep = build_report(table_run, table_data, evaluate=False)
    assert rep.path == table_run / "report.html"
    page = _parse(rep.path)
    assert page.sections == TABLE_SECTIONS
    assert rep.sections["compare"] is not None and all(rep.sections[s] is None for s in TABLE_SECTIONS[:-1])
    _check_self_contained(page, rep.path.read_text())
    _check_images(page, rep)
    assert {"feature_reconstruction", "scatter_matrix"} <= set(rep.figures)
    assert not {"reconstructions", "prior_samples", "traversals", "interpolation"} & set(rep.figures)
    assert "subsample" not in rep.path.read_text()  # 600 samples fit under max_points
    # the true-posterior section: the point-cloud samples' IS moments and q*, as the API gives them
    tp = rep.numbers["true_posterior"]
    assert "true_posterior" in rep.figures and tp["indices"] == rep.numbers["point_cloud"]["indices"][:4]
    ref = VAE.load(table_run).true_posterior(table_data[tp["indices"]], k=tp["k"], seed=0, refine=tp["steps"])
    np.testing.assert_allclose(tp["mean"], ref.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(tp["std"], ref.std, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(tp["ess"], ref.ess, rtol=1e-6)
    assert np.shape(tp["mu_opt"]) == np.shape(tp["mean"]) == (4, 3) and len(tp["amortization_gap"]) == 4
    assert "Pareto k" in rep.path.read_text()


_cli = cli  # in-process; see _helpers.cli


@pytest.fixture(scope="module")
def cli_table_run(tmp_path_factory):
    """`vaelens train --report` on a CSV table: the run directory and the train command's output."""
    rng = np.random.default_rng(0)
    X = np.tanh(rng.normal(size=(300, 2)) @ rng.normal(size=(2, 6))) * 3 + 0.1 * rng.normal(size=(300, 6)) + 5
    tmp = tmp_path_factory.mktemp("cli")
    csv = tmp / "t.csv"
    np.savetxt(csv, X, delimiter=",", header=",".join(f"f{j}" for j in range(6)), comments="")
    run = tmp / "run"
    r = _cli("train", "--data", csv, "--likelihood", "gaussian", "--standardize", "--epochs", "2", "--latent-dim",
             "2", "--hidden", "16", "--out", run, "--no-progress", "--report")
    assert r.returncode == 0, r.stderr
    return run, r.stdout


def test_cli_train_report_and_report(cli_table_run, tmp_path):
    run, stdout = cli_table_run
    assert f"report {run / 'report.html'}" in stdout
    page = _parse(run / "report.html")
    assert page.sections == TABLE_SECTIONS
    assert len(page.imgs) == len(list((run / "figures").glob("*.png"))) > 0
    # an existing report is not overwritten without --force: one line, exit 2
    r = _cli("report", run, "--dims", "0,1")
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "other.html"
    r = _cli("report", run, "--out", out, "--json", tmp_path / "r.json", "--no-eval", "--max-points", "100",
             "--no-gap")
    assert r.returncode == 0, r.stderr
    assert "point-cloud check" in r.stdout and "between" in r.stdout
    js = json.loads((tmp_path / "r.json").read_text())
    assert js["path"] == str(out) and js["numbers"]["n_points"] == 100
    assert set(js["sections"]) == set(TABLE_SECTIONS) and "--no-gap" in js["sections"]["true-posterior"]
    assert "true_posterior" not in js["numbers"] and "true_posterior" not in js["figures"]
    assert "random subsample of 100" in out.read_text()


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Probes the rendered page: counts images that failed to decode, and records script errors.
_PROBE = ("<script>window.__errors=[];window.addEventListener('error',e=>window.__errors.push(String(e.message)));"
          "window.addEventListener('load',()=>{const bad=[...document.images].filter(i=>!i.complete||"
          "i.naturalWidth===0).length;document.body.setAttribute('data-probe','images='+document.images.length+"
          "';broken='+bad+';errors='+window.__errors.length);});</script>")


def test_headless_browser_renders_report(cli_table_run, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium); .ci/run installs it")
    report = cli_table_run[0] / "report.html"
    n_figures = len(list((cli_table_run[0] / "figures").glob("*.png")))
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'data-probe="images=(\d+);broken=(\d+);errors=(\d+)"', r.stdout)
    assert m, r.stdout[:500]
    assert int(m.group(1)) == n_figures and m.group(2) == "0" and m.group(3) == "0"
    for sid in TABLE_SECTIONS:
        assert f'id="{sid}"' in r.stdout
    shot = tmp_path / "shot.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and Image.open(shot).size == (1200, 2000)


# --- where the figures go (issue 16: report --out overwrote RUN/figures) ---------------------------

def test_out_elsewhere_writes_figures_beside_it_not_in_the_run(table_run, table_data, tmp_path):
    first = build_report(table_run, table_data, evaluate=False)  # the default output: RUN/figures
    assert first.figure_dir == table_run / "figures"
    assert all(p.parent == table_run / "figures" for p in first.figures.values())
    before = {p.name: p.read_bytes() for p in (table_run / "figures").iterdir()}
    out = tmp_path / "elsewhere" / "mine.html"
    rep = build_report(table_run, table_data[:100], out_path=out, seed=1, evaluate=False)
    assert rep.figure_dir == tmp_path / "elsewhere" / "mine_figures"
    assert set(rep.figures) and all(p.parent == rep.figure_dir and p.exists() for p in rep.figures.values())
    # the earlier report's figures are untouched
    assert {p.name: p.read_bytes() for p in (table_run / "figures").iterdir()} == before
    _check_images(_parse(out), rep)


def test_report_files_follow_the_umask(table_run, table_data, tmp_path):
    old = __import__("os").umask(0o022)
    try:
        rep = build_report(table_run, table_data, out_path=tmp_path / "r.html", evaluate=False)
        js = rep.write_json(tmp_path / "r.json")
    finally:
        __import__("os").umask(old)
    for p in [rep.path, js, *rep.figures.values()]:
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert json.loads(js.read_text())["figure_dir"] == str(tmp_path / "r_figures")


def test_stale_figures_removed_only_with_overwrite(table_run, table_data, tmp_path):
    other = tmp_path / "other"
    VAE(latent_dim=2, hidden=(8,), likelihood="gaussian", standardize=True, epochs=1).fit(table_data).save(other)
    out = tmp_path / "r.html"
    rep = build_report(table_run, table_data, out_path=out, compare_runs=[other], evaluate=False)
    stale = rep.figure_dir / "compare_runs.png"
    assert stale.exists()
    mine = rep.figure_dir / "my_notes.png"
    mine.write_bytes(b"not a report figure")
    # without overwrite an earlier report's figure stays, and the page says so
    again = build_report(table_run, table_data, out_path=out, evaluate=False)
    assert stale.exists() and any("compare_runs.png" in n for n in again.notes)
    assert "compare_runs.png" in out.read_text()
    # with overwrite (report --force) it goes; a file the report never writes is left alone
    final = build_report(table_run, table_data, out_path=out, evaluate=False, overwrite=True)
    assert not stale.exists() and mine.exists()
    assert not any("earlier report" in n for n in final.notes)
    assert sorted(p.name for p in rep.figure_dir.glob("*.png")) == sorted(
        [f"{n}.png" for n in final.figures] + ["my_notes.png"])


def test_unwritable_figure_folder_fails_before_any_work(table_run, table_data, tmp_path):
    from vaelens.errors import OutputError

    out = tmp_path / "r.html"
    (tmp_path / "r_figures").write_text("a file where the figure folder goes")
    with pytest.raises(OutputError, match="r_figures"):
        build_report(table_run, table_data, out_path=out, evaluate=False)
    assert not out.exists()


def _gauss2(pts, m, C):
    """N(pts; m, C) for 2-d points (..., 2), written out: exp(-q/2) / (2 pi sqrt(det C))."""
    diff = pts - m
    q = np.einsum("...i,ij,...j->...", diff, np.linalg.inv(C), diff)
    return np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(C)))


def _prior_components_by_hand(vae):
    """The prior's weights (K,), means (K, d), covariances (K, d, d), read from the module's parameters."""
    import torch

    mod, cfg = vae.module_.eval(), vae.config_.model
    with torch.no_grad():
        if cfg.prior == "mog":
            s = torch.nn.functional.softplus(mod.prior_raw_scales) + cfg.sigma_floor
            return (torch.softmax(mod.prior_logits, 0).double().numpy(), mod.prior_means.double().numpy(),
                    np.einsum("ki,ij->kij", (s ** 2).double().numpy(), np.eye(cfg.latent_dim)))
        q = mod.encoder(mod.pseudo_inputs)                                   # the VampPrior: q(z|u_k), equal weights
        L = q.scale_tril.double().numpy()
        return np.full(len(L), 1 / len(L)), q.mean.double().numpy(), L @ np.swapaxes(L, 1, 2)


@pytest.mark.parametrize("posterior, prior, k, name", [("full", "vamp", 8, "VampPrior, K=8"),
                                                      ("diagonal", "mog", None, "MoG, K=10")])
def test_report_for_posterior_families_and_priors(posterior, prior, k, name, tmp_path, monkeypatch):
    """Every section of the report for a full-covariance + VampPrior run and a diagonal + MoG run; the
    page names the family and prior; the latent map gets the encoder's full covariance and the prior's
    2-d marginal density, the latter equal to the mixture of the components' 2-d Gaussians written out."""
    from vaelens import report as report_mod
    from vaelens.data import load_digits

    ds = load_digits().subset(np.arange(300))
    vae = VAE(latent_dim=3, hidden=(32,), posterior=posterior, prior=prior, prior_components=k,
              batch_size=100).fit(ds.X, epochs=15, seed=0)
    run = tmp_path / "run"
    vae.save(run)
    seen = {}
    real = report_mod.latent_map_figure

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(report_mod, "latent_map_figure", spy)
    rep = build_report(run, ds, evaluate=False, vae=vae, cloud_samples=200)
    page, text = _parse(rep.path), rep.path.read_text()
    assert page.sections == IMAGE_SECTIONS
    assert all(rep.sections[s] is None for s in IMAGE_SECTIONS[:-1]), rep.sections
    _check_self_contained(page, text)
    _check_images(page, rep)
    assert name in text and ("full-covariance" in text) == (posterior == "full")
    assert (rep.numbers["posterior"], rep.numbers["prior"], rep.numbers["prior_name"]) == (posterior, prior, name)
    assert "prior_var" in rep.numbers["aggregate"] and "KL moment-matched" not in text  # N(0, I)'s figures do not apply
    from vaelens.commands.report import ReportResult

    lines = "\n".join(ReportResult(rep, run).lines())  # what `vaelens report` prints
    assert f"{posterior} q(z|x), prior {name}" in lines and "prior_var" not in lines
    post = vae.encode(ds.X)
    if posterior == "full":
        np.testing.assert_allclose(seen["cov"], post.scale_tril @ np.swapaxes(post.scale_tril, 1, 2), rtol=1e-5, atol=1e-7)
    else:
        assert seen["cov"] is None
    i, j = rep.numbers["latent_map_dims"]
    o = seen["prior"]
    assert o["name"] == name
    w, m, C = _prior_components_by_hand(vae)
    U, V = np.meshgrid(o["u"][::8], o["v"][::8])
    pts = np.stack([U, V], -1)                                              # (Gv, Gu, 2)
    want = sum(w[c] * _gauss2(pts, m[c, [i, j]], C[c][np.ix_([i, j], [i, j])]) for c in range(len(w)))
    np.testing.assert_allclose(o["density"][::8, ::8], want, rtol=1e-5, atol=1e-10)
