"""`vaelens serve` in a real browser: Playwright driving Debian's chromium.

Skipped where playwright or /usr/bin/chromium is missing (`.ci/run` installs both; never
`playwright install`, which downloads browsers). Set VAELENS_SCREENSHOT=docs/img/serve.png
to regenerate the README's screenshot; the test always saves one under its tmp_path.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

CHROMIUM = os.environ.get("VAELENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install playwright; "
                                                      ".ci/run installs it)"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no chromium at {CHROMIUM} (apt-get install chromium; "
                                                           f"or set VAELENS_CHROMIUM)"),
]

from vaelens import VAE  # noqa: E402
from vaelens.data import Dataset, load_digits  # noqa: E402
from _server import serving  # noqa: E402
from vaelens.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def url():
    ds = load_digits()
    # Twenty epochs on 1500 8x8 digits: seconds, and enough for visible clusters.
    vae = VAE(latent_dim=4, hidden=(64,)).fit(ds.X, epochs=20, seed=0)
    with serving(create_app(vae, ds, allowed_hosts=["127.0.0.1", "localhost"])) as u:
        yield u + "/"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open(browser, url, errors, height=1040):
    page = browser.new_page(viewport={"width": 1240, "height": height})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=30000)
    return page


def _canvas_png(page, canvas_id):
    return page.evaluate(f"document.getElementById('{canvas_id}').toDataURL()")


def _column(page, cls):
    return page.eval_on_selector_all(f"#stats td.{cls}", "tds => tds.map(t => t.textContent)")


def test_page_explores_the_latent_space(browser, url, tmp_path):
    errors = []
    page = _open(browser, url, errors)
    try:
        assert page.locator("#aggregate canvas").count() == 4
        first = page.evaluate("window.vaelens.state.sel.index")
        input_before = _canvas_png(page, "img-input")

        # select another sample by clicking its dot on the map
        box = page.locator("#map").bounding_box()
        k = page.evaluate("""() => {
            const S = window.vaelens.state;
            const m = S.map.mu, first = S.sel.index;
            // a dot well away from the first sample's, so the click cannot pick that one
            let best = -1, bestD = -1;
            for (let i = 0; i < m.length; i++) {
                const d = Math.hypot(m[i][0] - S.sel.mu[0], m[i][1] - S.sel.mu[1]);
                if (d > bestD && Math.abs(m[i][0]) < 2.5 && Math.abs(m[i][1]) < 2.5) { bestD = d; best = i; }
            }
            return best;
        }""")
        px, py = page.evaluate(f"window.vaelens.pointOnCanvas({k})")
        page.mouse.click(box["x"] + px, box["y"] + py)
        page.wait_for_function(f"() => window.vaelens.state.sel && window.vaelens.state.sel.index !== {first}",
                               timeout=15000)
        assert _canvas_png(page, "img-input") != input_before
        assert page.locator("#sample-label").inner_text().startswith("label ")

        # draw z twice: the running mean and std appear, then change
        page.click("#draw")
        page.wait_for_function("() => document.getElementById('draw-count').textContent === '10 draws'")
        mean1, std1 = _column(page, "mean"), _column(page, "std")
        assert all(v.strip() for v in mean1 + std1)
        page.select_option("#batch", "200")
        page.click("#draw")
        page.wait_for_function("() => document.getElementById('draw-count').textContent === '210 draws'")
        mean2, std2 = _column(page, "mean"), _column(page, "std")
        assert mean2 != mean1 and std2 != std1
        assert page.evaluate("window.vaelens.state.draws.length") == 210

        # the true-posterior panel: the weighted cloud for the selected sample, with ESS and Pareto k
        tp_before = _canvas_png(page, "tp")
        sel = page.evaluate("window.vaelens.state.sel.index")
        page.select_option("#tp-k", "500")
        page.click("#tp-run")
        page.wait_for_function(f"() => document.body.dataset.tp === '{sel}'", timeout=30000)
        assert _canvas_png(page, "tp") != tp_before
        text = page.locator("#tp-text").inner_text()
        assert "ESS" in text and "of 500" in text and "Pareto k" in text
        assert len(page.evaluate("window.vaelens.state.tp.weights")) == 500

        # drag across the map: the decoded image follows the pointer
        decodes = int(page.evaluate("Number(document.body.dataset.decodes || 0)"))
        ax, ay = page.evaluate("window.vaelens.latentOnCanvas(-2, -2)")
        bx, by = page.evaluate("window.vaelens.latentOnCanvas(2, 2)")
        page.mouse.move(box["x"] + ax, box["y"] + ay)
        page.mouse.down()
        page.wait_for_function(f"() => Number(document.body.dataset.decodes || 0) > {decodes}")
        page.wait_for_timeout(200)
        decoded_a = _canvas_png(page, "img-decoded")
        z_a = page.evaluate("window.vaelens.state.pointerZ")
        page.mouse.move(box["x"] + bx, box["y"] + by, steps=12)
        page.mouse.up()
        page.wait_for_function(
            "() => (() => { const z = window.vaelens.state.pointerZ; return z && z[0] > 1.5 && z[1] > 1.5; })()")
        page.wait_for_function(f"() => Number(document.body.dataset.decodes) > {decodes + 2}")
        page.wait_for_timeout(300)  # let the last in-flight decode land
        decoded_b = _canvas_png(page, "img-decoded")
        z_b = page.evaluate("window.vaelens.state.pointerZ")
        assert decoded_b != decoded_a
        assert np.allclose(z_a[:2], [-2, -2], atol=0.1) and np.allclose(z_b[:2], [2, 2], atol=0.1)
        # other dimensions are held at the selected sample's mu
        sel_mu = page.evaluate("window.vaelens.state.sel.mu")
        np.testing.assert_allclose(z_b[2:], sel_mu[2:], atol=1e-6)

        hx, hy = page.evaluate("""() => {  // hover another dot: its sigma ellipses show
            const S = window.vaelens.state, m = S.map.mu;
            let best = 0;
            for (let i = 0; i < m.length; i++)
                if (Math.hypot(m[i][0] + 1.2, m[i][1]) < Math.hypot(m[best][0] + 1.2, m[best][1])) best = i;
            return window.vaelens.pointOnCanvas(best);
        }""")
        page.mouse.move(box["x"] + hx, box["y"] + hy)
        page.wait_for_timeout(200)
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot))
    finally:
        page.close()
    assert shot.stat().st_size > 10000
    assert errors == []
    target = os.environ.get("VAELENS_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        try:  # a 256-colour palette keeps the README's picture small
            from PIL import Image

            img = Image.open(shot).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
            img.save(target, optimize=True)
        except ImportError:
            shutil.copyfile(shot, target)


def test_tables_show_decoded_feature_values(browser):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(200, 4)) * [1, 10, 100, 0.1]).astype(np.float32)
    ds = Dataset(X=X, name="table", feature_names=["alpha", "beta", "gamma", "delta"])
    vae = VAE(latent_dim=2, hidden=(8,), likelihood="gaussian", standardize=True).fit(X, epochs=2, seed=0)
    errors = []
    with serving(create_app(vae, ds)) as u:
        page = _open(browser, u + "/", errors)
        try:
            assert not page.locator("#images").is_visible()
            names = page.eval_on_selector_all("#features tbody td:first-child", "t => t.map(x => x.textContent)")
            assert names == ["alpha", "beta", "gamma", "delta"]
            box = page.locator("#map").bounding_box()
            values = []
            for u_, v_ in [(-1.5, 1.0), (1.5, -1.0)]:
                x, y = page.evaluate(f"window.vaelens.latentOnCanvas({u_}, {v_})")
                page.mouse.click(box["x"] + x, box["y"] + y)
                page.wait_for_function(
                    f"() => (() => {{ const z = window.vaelens.state.pointerZ; "
                    f"return z && Math.abs(z[0] - {u_}) < 0.1; }})()")
                page.wait_for_function("() => window.vaelens.state.decoded && "
                                       "document.querySelector('#features td.decoded').textContent !== ''")
                page.wait_for_timeout(200)
                values.append(page.eval_on_selector_all("#features td.decoded", "t => t.map(x => x.textContent)"))
            assert values[0] != values[1] and all(v.strip() for v in values[1])
        finally:
            page.close()
    assert errors == []


def test_full_covariance_vamp_page(browser, tmp_path):
    """A full-covariance + VampPrior run: the page names both, fetches the shown pair's covariance
    blocks and the prior's density, and draws each ellipse so that its outline lies at Mahalanobis
    distance k from mu under the 2x2 block (checked here in numpy from the page's own view)."""
    ds = load_digits()
    ds = ds.subset(np.arange(600))
    vae = VAE(latent_dim=3, hidden=(32,), posterior="full", prior="vamp", prior_components=8).fit(
        ds.X, epochs=10, seed=0)
    errors = []
    with serving(create_app(vae, ds)) as u:
        page = _open(browser, u + "/", errors)
        try:
            page.wait_for_function("() => document.body.dataset.pair", timeout=15000)
            S = "window.vaelens.state"
            x, y = page.evaluate(f"[{S}.dimX, {S}.dimY]")
            assert page.evaluate(f"{S}.prior.name") == "VampPrior, K=8"
            assert page.evaluate(f"[{S}.prior.x, {S}.prior.y, {S}.cov2.x, {S}.cov2.y]") == [x, y, x, y]
            assert "VampPrior, K=8" in page.locator("#prior-note").inner_text()
            assert "full q(z|x)" in page.locator("#model-info").inner_text()
            assert "full covariance" in page.locator("#ellipse-note").inner_text()
            # the selected sample carries its covariance; its ellipses come from the 2x2 block
            C = np.asarray(page.evaluate(f"{S}.sel.cov"))
            mu = np.asarray(page.evaluate(f"{S}.sel.mu"))
            c = [float(C[x, x]), float(C[x, y]), float(C[y, y])]
            view = page.evaluate(f"{S}.view")
            B = np.array([[c[0], c[1]], [c[1], c[2]]])
            for k in (1, 2):
                e = page.evaluate(f"window.vaelens.ellipseOnCanvas({float(mu[x])}, {float(mu[y])}, {c}, {k})")
                t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
                # canvas ellipse: rotation `angle` clockwise on screen (y down)
                px = e["x"] + e["rx"] * np.cos(t) * np.cos(e["angle"]) - e["ry"] * np.sin(t) * np.sin(e["angle"])
                py = e["y"] + e["rx"] * np.cos(t) * np.sin(e["angle"]) + e["ry"] * np.sin(t) * np.cos(e["angle"])
                zu = view["x"][0] + px / view["w"] * (view["x"][1] - view["x"][0])
                zv = view["y"][0] + (1 - py / view["h"]) * (view["y"][1] - view["y"][0])
                diff = np.stack([zu - mu[x], zv - mu[y]], 1)
                np.testing.assert_allclose(np.einsum("ni,ij,nj->n", diff, np.linalg.inv(B), diff), k ** 2, rtol=1e-6)
            # draws: the running covariance arrives with the statistics
            page.click("#draw")
            page.wait_for_function("() => document.getElementById('draw-count').textContent === '10 draws'")
            assert np.shape(page.evaluate(f"{S}.drawStats.cov")) == (3, 3)
            # another pair of dimensions: fetched again
            page.select_option("#dim-x", "2")
            page.wait_for_function(f"() => document.body.dataset.pair === '2,{y}'", timeout=15000)
            page.click("#tp-run")
            page.wait_for_function("() => document.body.dataset.tp", timeout=30000)
            page.screenshot(path=str(tmp_path / "full_vamp.png"))
        finally:
            page.close()
    assert errors == []
