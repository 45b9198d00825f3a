"""`vaelens serve`: the JSON API over a real loopback server, and the command itself."""

import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from vaelens import VAE  # noqa: E402
from vaelens.data import Dataset, load_digits  # noqa: E402
from vaelens.errors import VaelensError  # noqa: E402
from _server import serving  # noqa: E402
from vaelens.serve import CLOUD_STEPS, MAX_BATCH, MAX_CLOUD_K, MAX_DRAWS, Explorer, create_app, require_deps  # noqa: E402

N = 600
D = 3


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    return ds.subset(np.arange(N))


@pytest.fixture(scope="module")
def vae(digits):
    return VAE(latent_dim=D, hidden=(32,)).fit(digits.X, epochs=3, seed=0)


@pytest.fixture(scope="module")
def client(vae, digits):
    with serving(create_app(vae, digits)) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


# --- answers ---------------------------------------------------------------------------------

def test_info_describes_model_and_data(client, digits):
    info = client.get("/api/info").json()
    assert info["n"] == N and info["p"] == 64 and info["image_shape"] == [8, 8]
    assert info["latent_dim"] == D and info["likelihood"] == "bernoulli"
    assert info["labels"] == sorted(set(digits.y.tolist()))
    assert info["map_points"] == N


def test_map_holds_every_samples_posterior(client, vae, digits):
    m = client.get("/api/map").json()
    post = vae.encode(digits.X)
    assert m["index"] == list(range(N))
    assert m["label"] == digits.y.tolist()
    # JSON carries 5 decimals
    np.testing.assert_allclose(m["mu"], post.mu, atol=1e-5)
    np.testing.assert_allclose(m["sigma"], post.sigma, atol=1e-5)


def test_large_sets_are_mapped_as_a_seeded_subsample(vae, digits):
    a = Explorer(vae, digits, max_points=100, seed=3).latent_map()
    b = Explorer(vae, digits, max_points=100, seed=3).latent_map()
    c = Explorer(vae, digits, max_points=100, seed=4).latent_map()
    idx = np.asarray(a["index"])
    assert len(idx) == 100 and len(set(idx.tolist())) == 100 and np.all(np.diff(idx) > 0)
    assert a["index"] == b["index"] and a["index"] != c["index"]
    np.testing.assert_allclose(a["mu"], vae.encode(digits.X[idx]).mu, atol=1e-5)
    assert a["label"] == digits.y[idx].tolist()


def test_sample_shows_input_reconstruction_and_posterior(client, vae, digits):
    i = 17
    s = client.get(f"/api/sample/{i}").json()
    post = vae.encode(digits.X[i:i + 1])
    assert s["index"] == i and s["label"] == int(digits.y[i])
    np.testing.assert_allclose(s["x"], digits.X[i], atol=1e-5)
    np.testing.assert_allclose(s["reconstruction"], vae.reconstruct(digits.X[i:i + 1])[0], atol=1e-5)
    np.testing.assert_allclose(s["mu"], post.mu[0], atol=1e-5)
    np.testing.assert_allclose(s["sigma"], post.sigma[0], atol=1e-5)


def test_draws_walk_a_reproducible_stream_with_running_statistics(client):
    first = client.post("/api/draw", json={"index": 4, "n": 30}).json()
    again = client.post("/api/draw", json={"index": 4, "n": 30, "offset": 0}).json()
    second = client.post("/api/draw", json={"index": 4, "n": 50, "offset": 30}).json()
    other_seed = client.post("/api/draw", json={"index": 4, "n": 30, "seed": 1}).json()
    assert first["z"] == again["z"]
    assert np.shape(first["z"]) == (30, D) and np.shape(second["z"]) == (50, D)
    assert first["count"] == 30 and second["count"] == 80
    assert first["z"] != other_seed["z"]
    z = np.concatenate([first["z"], second["z"]])                       # (80, d)
    assert len(np.unique(z, axis=0)) == 80  # the second batch continues the stream, no repeats
    np.testing.assert_allclose(second["mean"], z.mean(0), atol=1e-4)
    np.testing.assert_allclose(second["std"], z.std(0), atol=1e-4)


def test_draws_follow_the_samples_posterior(client):
    s = client.get("/api/sample/9").json()
    r = client.post("/api/draw", json={"index": 9, "n": MAX_BATCH}).json()
    mu, sigma = np.asarray(s["mu"]), np.asarray(s["sigma"])
    # Seeded, 1000 draws: the mean's standard error is sigma/sqrt(1000) ~ 0.032 sigma, so 5 SE
    # is 0.16 sigma; the std's relative standard error is ~1/sqrt(2000) ~ 0.022, so 0.12 is > 5 SE.
    assert np.all(np.abs(np.asarray(r["mean"]) - mu) < 0.16 * sigma)
    assert np.all(np.abs(np.asarray(r["std"]) / sigma - 1) < 0.12)


def test_true_posterior_cloud_is_the_estimators_for_that_row(client, vae, digits):
    r = client.post("/api/true_posterior", json={"index": 7, "k": 600, "seed": 3}).json()
    z, w = np.asarray(r["z"]), np.asarray(r["weights"])
    d = vae.latent_dim_
    assert z.shape == (600, d) and w.shape == (600,) and abs(w.sum() - 1) < 1e-5 and r["steps"] == CLOUD_STEPS
    # the weighted draws give VAE.true_posterior's E_p[z] for this row, seed, k and q* steps
    x = vae.binarize_input(digits.X, 0)[7:8]
    tp = vae.true_posterior(x, k=600, seed=3, refine=CLOUD_STEPS)
    np.testing.assert_allclose(w @ z, tp.mean[0], atol=1e-4)
    np.testing.assert_allclose(r["mean"], tp.mean[0], atol=1e-5)
    assert r["ess"] == pytest.approx(tp.ess[0], rel=1e-6) and r["reliable"] == bool(tp.reliable[0])
    np.testing.assert_allclose(r["mu"], vae.encode(x).mu[0], atol=1e-5)
    np.testing.assert_allclose(r["mu_opt"], vae.encode(x, refine=CLOUD_STEPS, seed=3).mu[0], atol=1e-5)


def test_decode_matches_the_estimator(client, vae):
    z = [0.5, -1.25, 2.0]
    r = client.post("/api/decode", json={"z": z}).json()
    np.testing.assert_allclose(r["x"], vae.decode(np.asarray([z], np.float32))[0], atol=1e-5)
    other = client.post("/api/decode", json={"z": [-2, 1, 0]}).json()  # integers are numbers too
    assert np.abs(np.asarray(other["x"]) - np.asarray(r["x"])).max() > 1e-3


def test_aggregate_posterior_against_the_prior(client, vae, digits):
    a = client.get("/api/aggregate").json()
    post = vae.encode(digits.X)
    np.testing.assert_allclose(a["mean"], post.mu.mean(0), atol=1e-4)
    np.testing.assert_allclose(a["between"], post.mu.var(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(a["within"], (post.sigma ** 2).mean(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(a["total"], np.add(a["between"], a["within"]), atol=2e-5)
    np.testing.assert_allclose(a["share_between"], np.divide(a["between"], a["total"]), atol=1e-4)
    assert len(a["active"]) == D and all(isinstance(v, bool) for v in a["active"])
    kl = (0.5 * (post.mu ** 2 + post.sigma ** 2 - 1) - np.log(post.sigma)).mean(0)
    np.testing.assert_allclose(a["kl"], kl, rtol=1e-3, atol=1e-4)
    grid, dens, prior = (np.asarray(a[k]) for k in ("grid", "density", "prior"))
    assert grid.shape == dens.shape == prior.shape and grid.shape[0] == D
    for j in range(D):
        # The grid covers at least +-4 and the data's mu +- 3 sigma, so both densities keep
        # all but a fraction of a percent of their mass; 3% also allows the trapezoid rule's error.
        assert np.trapezoid(prior[j], grid[j]) == pytest.approx(1, abs=0.03)
        assert np.trapezoid(dens[j], grid[j]) == pytest.approx(1, abs=0.03)


def test_binarized_run_shows_and_encodes_one_binarization(digits):
    """A binarized run's page shows the bits the model encodes, and a sample's draws come from those bits."""
    from vaelens.data import binarize_static

    vae = VAE(latent_dim=2, hidden=(16,), binarize="dynamic", epochs=1).fit(digits.X[:200])
    ds = digits.subset(np.arange(40))
    ex = Explorer(vae, ds, seed=5)
    bits = binarize_static(ds.X, 5)
    assert ex.info()["binarized"] is True
    s = ex.sample(3)
    assert np.array_equal(s["x"], bits[3])
    np.testing.assert_allclose(s["mu"], vae.encode(bits[3:4]).mu[0], atol=1e-5)
    z = np.asarray(ex.draw(3, MAX_BATCH)["z"])
    # 1000 draws: their mean is within 5 standard errors of the mu of the bits shown
    assert (np.abs(z.mean(0) - vae.encode(bits).mu[3]) < 5 * vae.encode(bits).sigma[3] / np.sqrt(MAX_BATCH)).all()


def test_aggregate_densities_are_the_normal_mixture(vae, digits):
    """The density curves equal mean_i N(grid; mu_i, sigma_i) and N(grid; 0, 1), written out here in numpy."""
    ex = Explorer(vae, digits)
    a = ex.aggregate()
    grid, dens, prior = (np.asarray(a[k]) for k in ("grid", "density", "prior"))
    mu, sigma = ex.mu.astype(np.float64), ex.sigma.astype(np.float64)
    for j in range(D):
        u = (grid[j][:, None] - mu[:, j]) / sigma[:, j]
        expected = (np.exp(-0.5 * u ** 2) / (sigma[:, j] * np.sqrt(2 * np.pi))).mean(1)
        np.testing.assert_allclose(dens[j], expected, atol=2e-5)
        np.testing.assert_allclose(prior[j], np.exp(-0.5 * grid[j] ** 2) / np.sqrt(2 * np.pi), atol=2e-5)


def test_table_data_decodes_feature_values_in_data_units():
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(300, 5)) * [1, 10, 100, 0.1, 1] + [0, 50, -200, 3, 1]).astype(np.float32)
    ds = Dataset(X=X, name="table", feature_names=["a", "b", "c", "d", "e"])
    vae = VAE(latent_dim=2, hidden=(16,), likelihood="gaussian", standardize=True).fit(X, epochs=2, seed=0)
    with serving(create_app(vae, ds)) as url, httpx.Client(base_url=url, timeout=30) as c:
        info = c.get("/api/info").json()
        assert info["image_shape"] is None and info["feature_names"] == ["a", "b", "c", "d", "e"]
        assert info["labels"] is None and c.get("/api/map").json()["label"] is None
        r = c.post("/api/decode", json={"z": [0.3, -0.7]}).json()
        np.testing.assert_allclose(r["x"], vae.decode([[0.3, -0.7]])[0], rtol=1e-5, atol=1e-4)
        assert r["x"][2] < -100  # in data units, not standardized ones
        s = c.get("/api/sample/0").json()
        np.testing.assert_allclose(s["x"], X[0], rtol=1e-5, atol=1e-4)


# --- refusals --------------------------------------------------------------------------------

BAD = [
    ("get", f"/api/sample/{N}", None, 404, "out of range"),
    ("get", "/api/sample/-1", None, 404, "out of range"),
    ("get", "/api/sample/one", None, 422, "index"),
    ("post", "/api/draw", {"index": N + 5, "n": 5}, 404, "out of range"),
    ("post", "/api/draw", {"index": 0, "n": MAX_BATCH + 1}, 422, f"between 1 and {MAX_BATCH}"),
    ("post", "/api/draw", {"index": 0, "n": 0}, 422, f"between 1 and {MAX_BATCH}"),
    ("post", "/api/draw", {"index": 0, "n": 10, "offset": MAX_DRAWS - 5}, 422, f"at most {MAX_DRAWS}"),
    ("post", "/api/draw", {"index": 0, "n": 10, "offset": -1}, 422, "offset"),
    ("post", "/api/draw", {"index": 0, "n": "10"}, 422, "n: "),
    ("post", "/api/draw", {"index": 0, "n": 2.5}, 422, "n: "),
    ("post", "/api/draw", {"index": 0, "n": 10, "path": "/etc/passwd"}, 422, "path: unknown field"),
    ("post", "/api/draw", {"n": 10}, 422, "index: Field required"),
    ("post", "/api/draw", [1, 2], 422, "body"),
    ("post", "/api/true_posterior", {"index": 0, "k": MAX_CLOUD_K + 1}, 422, f"k: Input should be less than or "
                                                                            f"equal to {MAX_CLOUD_K}"),
    ("post", "/api/true_posterior", {"index": 0, "k": 1}, 422, "k: "),
    ("post", "/api/true_posterior", {"index": N}, 422, f"index: Input should be less than {N}"),
    ("post", "/api/true_posterior", {"index": -1}, 422, "index: "),
    ("post", "/api/true_posterior", {"index": 0, "k": "100"}, 422, "k: "),
    ("post", "/api/true_posterior", {"index": 0, "steps": 10 ** 6}, 422, "steps: unknown field"),
    ("post", "/api/decode", {"z": [0.0, 1.0]}, 422, f"at least {D}"),
    ("post", "/api/decode", {"z": [0.0] * (D + 1)}, 422, f"at most {D}"),
    ("post", "/api/decode", {"z": [0.0, "1", 0.0]}, 422, "z.1"),
    ("post", "/api/decode", {"z": [0.0, 1e300, 0.0]}, 422, "within"),
    ("post", "/api/decode", {"z": [0.0, 0.0, 0.0], "index": 3}, 422, "index: unknown field"),
    ("post", "/api/decode", {}, 422, "z: Field required"),
    ("get", "/api/prior?x=1&y=1", None, 422, "two different latent dimensions"),
    ("get", "/api/map_cov?x=0&y=7", None, 422, "y must be a latent dimension in 0..2"),
    ("get", "/api/prior?x=a&y=1", None, 422, "x:"),
    ("get", "/api/map_cov?x=0", None, 422, "y: Field required"),
    ("get", "/static/serve.py", None, 404, "no such file"),
    ("get", "/static/..%2F..%2Fpyproject.toml", None, 404, ""),
    ("get", "/api/nothing", None, 404, ""),
]


@pytest.mark.parametrize("method,path,body,status,fragment", BAD, ids=[f"{m} {p} {b}" for m, p, b, *_ in BAD])
def test_bad_requests_get_a_4xx_with_a_clear_message(client, method, path, body, status, fragment):
    r = client.request(method.upper(), path, json=body) if body is not None else client.request(method.upper(), path)
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert isinstance(msg, str) and msg and "\n" not in msg
    assert fragment in msg


@pytest.mark.parametrize("payload,fragment", [
    (b'{"z": [NaN, 0, 0]}', "NaN"),
    (b'{"z": [0, Infinity, 0]}', "NaN or infinite"),
    (b'{"z": [0, 0', "not valid JSON"),
])
def test_non_finite_or_broken_json_is_refused(client, payload, fragment):
    r = client.post("/api/decode", content=payload, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and fragment in r.json()["error"]


def test_page_and_assets_come_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/static/app.js" in page.text
    assert "http" not in re.sub(r'href="data:,"', "", page.text).split("<body>")[0]  # no CDN
    for name, kind in [("app.js", "javascript"), ("app.css", "css")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 100


def test_foreign_host_headers_are_refused_on_loopback(vae, digits):
    app = create_app(vae, digits, allowed_hosts=["127.0.0.1", "localhost"])
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/api/info").status_code == 200
        assert c.get("/api/info", headers={"Host": "attacker.example"}).status_code == 400


def test_missing_dependencies_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` fail
    with pytest.raises(VaelensError, match=re.escape("pip install 'vaelens[serve]'")):
        require_deps()


# --- the command -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(vae, tmp_path_factory):
    return vae.save(tmp_path_factory.mktemp("serve") / "run")


def _env():
    return dict(os.environ, VAELENS_OFFLINE="1", PYTHONUNBUFFERED="1")


def test_serve_command_prints_the_address_and_stops_on_ctrl_c(run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "vaelens", "serve", str(run_dir), "--data", "digits",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m:
                url = m.group(0)
                break
        assert url, proc.stderr.read()
        info = httpx.get(url + "api/info", timeout=30).json()
        assert info["latent_dim"] == D and info["data"] == "digits"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err


def test_serve_command_refuses_a_busy_port(run_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "vaelens", "serve", str(run_dir), "--data", "digits",
                            "--port", str(port)], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --- posterior families and priors (issue 19) ---------------------------------------------------

@pytest.fixture(scope="module")
def full_vamp(digits):
    return VAE(latent_dim=D, hidden=(32,), posterior="full", prior="vamp", prior_components=8).fit(
        digits.X, epochs=10, seed=0)


@pytest.fixture(scope="module")
def diag_mog(digits):
    return VAE(latent_dim=D, hidden=(32,), prior="mog", prior_components=5).fit(digits.X, epochs=5, seed=0)


def _components(vae):
    """The prior's weights (K,), means (K, d) and covariances (K, d, d) read from the module by hand."""
    import torch

    mod, cfg = vae.module_.eval(), vae.config_.model
    with torch.no_grad():
        if cfg.prior == "mog":
            s = torch.nn.functional.softplus(mod.prior_raw_scales) + cfg.sigma_floor
            return (torch.softmax(mod.prior_logits, 0).double().numpy(), mod.prior_means.double().numpy(),
                    np.einsum("ki,ij->kij", (s ** 2).double().numpy(), np.eye(D)))
        q = mod.encoder(mod.pseudo_inputs)
        L = q.scale_tril.double().numpy()
        return np.full(len(L), 1 / len(L)), q.mean.double().numpy(), L @ np.swapaxes(L, 1, 2)


def _marginal_1d(vae, grid):
    """p(z_j) on grid (d, G): sum_k w_k N(z_j; m_kj, C_kjj), written out."""
    w, m, C = _components(vae)
    sd = np.sqrt(np.einsum("kjj->kj", C))
    return np.stack([sum(w[k] * np.exp(-0.5 * ((grid[j] - m[k, j]) / sd[k, j]) ** 2) / (sd[k, j] * np.sqrt(2 * np.pi))
                         for k in range(len(w))) for j in range(D)])


def _marginal_2d(vae, dims, u, v):
    """p(z_i, z_j) on the grid u x v, (Gv, Gu): the mixture of the components' 2-d Gaussians, written out."""
    w, m, C = _components(vae)
    i, j = dims
    U, V = np.meshgrid(u, v)
    out = np.zeros_like(U)
    for k in range(len(w)):
        B = C[k][np.ix_([i, j], [i, j])]
        du, dv = U - m[k, i], V - m[k, j]
        P = np.linalg.inv(B)
        q = P[0, 0] * du ** 2 + 2 * P[0, 1] * du * dv + P[1, 1] * dv ** 2
        out += w[k] * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(B)))
    return out


def test_full_covariance_vamp_run(full_vamp, digits):
    """A full-covariance + VampPrior run over HTTP: the covariance of every answer that carries sigma,
    the VampPrior's 2-d and 1-d marginal densities, and the page."""
    with serving(create_app(full_vamp, digits)) as url, httpx.Client(base_url=url, timeout=30) as c:
        info = c.get("/api/info").json()
        assert (info["posterior"], info["prior"], info["prior_components"], info["prior_name"]) == \
            ("full", "vamp", 8, "VampPrior, K=8")
        post = full_vamp.encode(digits.X)
        cov = post.scale_tril.astype(np.float64) @ np.swapaxes(post.scale_tril, 1, 2)     # (n, d, d)
        mc = np.asarray(c.get("/api/map_cov", params={"x": 2, "y": 0}).json()["cov"])        # (n, 3)
        np.testing.assert_allclose(mc, np.stack([cov[:, 2, 2], cov[:, 2, 0], cov[:, 0, 0]], 1), atol=2e-5)
        assert np.abs(mc[:, 1]).max() > 1e-3  # the encoder's posteriors are correlated: the test sees rotation
        s = c.get("/api/sample/9").json()
        np.testing.assert_allclose(s["cov"], cov[9], atol=2e-5)
        r = c.post("/api/draw", json={"index": 9, "n": MAX_BATCH}).json()
        # The running covariance of 1000 draws: each entry's standard error is
        # sqrt((C_ii C_jj + C_ij^2) / n); 5 of them bound it (a false failure of 9 entries < 1e-5).
        C = cov[9]
        se = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C ** 2) / MAX_BATCH)
        assert (np.abs(np.asarray(r["cov"]) - C) < 5 * se).all()
        tp = c.post("/api/true_posterior", json={"index": 7, "k": 200, "seed": 0}).json()
        np.testing.assert_allclose(tp["cov"], cov[7], atol=2e-5)
        p = c.get("/api/prior", params={"x": 0, "y": 1}).json()
        u, v, dens = np.asarray(p["u"]), np.asarray(p["v"]), np.asarray(p["density"])
        assert p["name"] == "VampPrior, K=8" and dens.shape == (len(v), len(u))
        np.testing.assert_allclose(dens, _marginal_2d(full_vamp, (0, 1), u, v), rtol=1e-4, atol=1e-8)
        cell = (u[1] - u[0]) * (v[1] - v[0])
        for level, mass in zip(p["levels"], p["masses"]):
            # a Riemann sum on the 101 x 101 grid: the enclosed mass within 1.5% of the target
            assert dens[dens >= level].sum() * cell == pytest.approx(mass, abs=0.015)
        a = c.get("/api/aggregate").json()
        grid, prior = np.asarray(a["grid"]), np.asarray(a["prior"])
        np.testing.assert_allclose(prior, _marginal_1d(full_vamp, grid), atol=6e-6)  # JSON's 5 decimals
        assert a["prior_name"] == "VampPrior, K=8" and np.isfinite(a["kl"]).all()
        assert c.get("/").status_code == 200


def test_diagonal_mog_run(diag_mog, digits):
    """A diagonal + MoG run: no covariance where sigma says it all, the map's blocks diagonal, and the
    MoG's marginal densities."""
    ex = Explorer(diag_mog, digits)
    assert ex.info()["prior_name"] == "MoG, K=5" and ex.info()["posterior"] == "diagonal"
    assert ex.sample(3)["cov"] is None and ex.draw(3, 10)["cov"] is None
    assert ex.true_posterior(3, k=50)["cov"] is None
    mc = np.asarray(ex.map_cov(1, 2)["cov"])
    np.testing.assert_allclose(mc, np.stack([ex.sigma[:, 1] ** 2, 0 * ex.sigma[:, 1], ex.sigma[:, 2] ** 2], 1),
                               atol=2e-5)
    p = ex.prior(2, 1)
    np.testing.assert_allclose(p["density"], _marginal_2d(diag_mog, (2, 1), np.asarray(p["u"]), np.asarray(p["v"])),
                               rtol=1e-4, atol=1e-8)
    a = ex.aggregate()
    grid, prior = np.asarray(a["grid"]), np.asarray(a["prior"])
    np.testing.assert_allclose(prior, _marginal_1d(diag_mog, grid), atol=6e-6)  # JSON's 5 decimals
    for j in range(D):  # the grid covers the prior's mean ± 4 marginal sds: all but a trace of its mass
        assert np.trapezoid(prior[j], grid[j]) == pytest.approx(1, abs=0.01)
