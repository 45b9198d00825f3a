"""vaelens.plots: figures from arrays, decodable PNGs, no model imports."""

import ast
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaelens import plots


def _png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.size


@pytest.fixture
def posterior():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(120, 3))
    sigma = rng.uniform(0.1, 0.6, size=(120, 3))
    labels = rng.integers(0, 4, size=120)
    return mu, sigma, labels


def test_plots_imports_no_model_or_training_code():
    tree = ast.parse(Path(plots.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    assert names <= {"__future__", "io", "math", "typing", "matplotlib", "numpy"}, names


def test_image_grid_places_images_row_major():
    imgs = np.stack([np.full(6, v, np.float32) for v in (0.1, 0.2, 0.3)])  # three 2x3 images
    g = plots.image_grid(imgs, (2, 3), ncol=2, pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 4 + 1)
    assert g[1, 1] == pytest.approx(0.1) and g[1, 5] == pytest.approx(0.2) and g[4, 1] == pytest.approx(0.3)
    assert g[4, 5] == 1.0  # the empty slot stays white


def test_training_curves_from_metrics_records():
    hist = [{"epoch": e, "train_loss": 10.0 / e, "train_rec": -9.0 / e, "train_kl": 1.0, "kl_per_dim": [0.5, 0.5],
             "val_loss": 11.0 / e, "val_rec": -10.0 / e, "val_kl": 1.0} for e in range(1, 6)]
    fig = plots.training_curves_figure(hist)
    axes = fig.axes
    assert len(axes) == 4
    assert [len(a.lines) for a in axes] == [2, 2, 2, 2]
    # reconstruction is drawn as -E[log p(x|z)], i.e. positive
    assert np.allclose(axes[1].lines[0].get_ydata(), [9.0 / e for e in range(1, 6)])
    w, h = _png_size(plots.figure_png(fig))
    assert w > 600 and h > 200


def test_training_curves_without_validation_or_history():
    hist = [{"epoch": 1, "train_loss": 3.0, "train_rec": -2.0, "train_kl": 1.0, "kl_per_dim": [1.0]}]
    fig = plots.training_curves_figure(hist)
    assert len(fig.axes[0].lines) == 1
    plots.figure_png(fig)
    plots.figure_png(plots.training_curves_figure([]))


def test_image_figures_are_sized_to_their_grid():
    rng = np.random.default_rng(1)
    x = rng.random((12, 64)).astype(np.float32)
    for fig in (plots.images_figure(x, (8, 8), "t", ncol=4), plots.reconstructions_figure(x, x[::-1], (8, 8), ncol=6),
                plots.traversal_figure(x.reshape(3, 4, 64), (8, 8), [2, 0, 1], np.linspace(-3, 3, 4)),
                plots.interpolation_figure(x[:8], (8, 8), x[8:10])):
        w, h = _png_size(plots.figure_png(fig))
        assert 150 < w < 2000 and 60 < h < 2000


def test_latent_map_draws_points_and_ellipses(posterior):
    mu, sigma, labels = posterior
    fig = plots.latent_map_figure(mu, sigma, (2, 0), labels, np.arange(5), note="x")
    ax = fig.axes[0]
    # 5 samples x 2 ellipses + the prior's 1- and 2-sigma circles
    assert len(ax.patches) == 12
    offsets = ax.collections[0].get_offsets()
    assert np.allclose(offsets[:, 0], mu[:, 2]) and np.allclose(offsets[:, 1], mu[:, 0])
    first = ax.patches[0]
    assert first.width == pytest.approx(2 * sigma[0, 2]) and first.height == pytest.approx(2 * sigma[0, 0])
    assert ax.get_legend() is not None
    plots.figure_png(fig)


def test_point_cloud_figure_one_panel_per_sample():
    rng = np.random.default_rng(2)
    mu = rng.normal(size=(3, 2))
    sigma = np.full((3, 2), 0.3)
    z = mu + sigma * rng.normal(size=(200, 3, 2))
    fig = plots.point_cloud_figure(z, mu, sigma, z.mean(0), z.std(0, ddof=1), (0, 1), ["a", "b", "c"])
    visible = [a for a in fig.axes if a.axison]
    assert len(visible) == 3
    assert [a.get_title() for a in visible] == ["a", "b", "c"]
    # per panel: 1- and 2-sigma ellipses of the encoder, and the empirical one
    assert all(len(a.patches) == 3 for a in visible)
    plots.figure_png(fig)


def test_aggregate_posterior_density_integrates_to_one(posterior):
    mu, sigma, _ = posterior
    fig = plots.aggregate_posterior_figure(mu, sigma)
    for ax in fig.axes[:3]:
        q, p = ax.lines[0], ax.lines[1]
        t = q.get_xdata()
        # a mixture of Normals on a grid covering mu ± 3 sigma (and ±4): mass within 1% of 1
        assert np.trapezoid(q.get_ydata(), t) == pytest.approx(1.0, abs=0.01)
        assert np.trapezoid(p.get_ydata(), t) == pytest.approx(1.0, abs=0.01)
    plots.figure_png(fig)


def test_variance_split_stacks_between_and_within():
    fig = plots.variance_split_figure(np.array([0.8, 0.0]), np.array([0.2, 1.0]))
    bars = fig.axes[0].patches
    heights = [b.get_height() for b in bars]
    bottoms = [b.get_y() for b in bars]
    assert heights == pytest.approx([0.8, 0.0, 0.2, 1.0])
    assert bottoms == pytest.approx([0.0, 0.0, 0.8, 0.0])
    plots.figure_png(fig)


def test_heatmap_writes_values_and_skips_nan():
    m = np.array([[1.0, 0.5], [0.25, np.nan]])
    fig = plots.heatmap_figure(m, ["a", "b"], ["x", "y"], "t")
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["0.25", "0.50", "1.00"]
    plots.figure_png(fig)


def test_table_figures(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, 7))
    X -= X.mean(0)
    fig = plots.feature_reconstruction_figure(X, X * 0.5, [f"f{j}" for j in range(7)], max_features=6)
    titles = [a.get_title() for a in fig.axes if a.axison]
    assert len(titles) == 6
    # centred x reconstructed as 0.5 x: R^2 = 1 - 0.25 E[x^2] / Var x = 0.75 exactly
    assert all(t.endswith("R² 0.75") for t in titles)
    fig = plots.scatter_matrix_figure(X, None, X + 1, max_features=3)
    assert len(fig.axes) == 9
    data = plots.save_figure(fig, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes() == data


def test_mixture_density_is_the_normal_mixture():
    from scipy import stats
    t = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(plots.mixture_density(t, np.zeros(1), np.ones(1)), stats.norm.pdf(t))
    both = plots.mixture_density(t, np.array([-1.0, 2.0]), np.array([0.5, 1.5]))
    np.testing.assert_allclose(both, 0.5 * (stats.norm.pdf(t, -1, 0.5) + stats.norm.pdf(t, 2, 1.5)))


def _spd(rng, n, d):
    """n random covariance matrices (n, d, d) with strong correlations."""
    A = rng.normal(size=(n, d, d))
    return A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(d)


def _mahalanobis_on_boundary(patch, centre, cov2):
    """(z - m)^T C^-1 (z - m) at points on an ellipse patch's drawn outline, in data coordinates."""
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    # the patch transform maps the unit circle onto the drawn ellipse
    pts = patch.get_patch_transform().transform(np.stack([np.cos(t), np.sin(t)], 1))  # (24, 2), data units
    diff = pts - np.asarray(centre)
    return np.einsum("vi,ij,vj->v", diff, np.linalg.inv(cov2), diff)


def test_ellipses_are_the_eigen_decomposition_of_the_covariance_block():
    """A full run's ellipses: the axes and angle of each 2x2 block, from the closed-form eigenvalues
    of a symmetric 2x2 matrix (not numpy's eigh), and every outline point at Mahalanobis distance m."""
    rng = np.random.default_rng(4)
    mu, cov = rng.normal(size=(6, 3)), _spd(rng, 6, 3)
    sigma = np.sqrt(np.einsum("nii->ni", cov))
    dims = (2, 0)
    fig = plots.latent_map_figure(mu, sigma, dims, None, np.arange(6), cov=cov)
    ax = fig.axes[0]
    assert len(ax.patches) == 6 * 2 + 2 and "full covariance" in ax.get_title()
    for k in range(6):
        a, b, c = cov[k, 2, 2], cov[k, 2, 0], cov[k, 0, 0]                       # var z2, cov, var z0
        half = np.sqrt(((a - c) / 2) ** 2 + b ** 2)
        major, minor = np.sqrt((a + c) / 2 + half), np.sqrt((a + c) / 2 - half)
        theta = np.degrees(0.5 * np.arctan2(2 * b, a - c))
        for m, patch in zip((1, 2), ax.patches[2 * k:2 * k + 2]):
            assert patch.width == pytest.approx(2 * m * major) and patch.height == pytest.approx(2 * m * minor)
            assert (patch.angle - theta) % 180 == pytest.approx(0, abs=1e-6) or \
                (patch.angle - theta) % 180 == pytest.approx(180, abs=1e-6)
            block = np.array([[a, b], [b, c]])
            np.testing.assert_allclose(_mahalanobis_on_boundary(patch, mu[k, [2, 0]], block), m ** 2, rtol=1e-6)
    plots.figure_png(fig)


def test_diagonal_ellipses_stay_axis_aligned(posterior):
    mu, sigma, labels = posterior
    fig = plots.latent_map_figure(mu, sigma, (0, 1), labels, np.arange(3))
    assert all(p.angle == 0 for p in fig.axes[0].patches)
    assert "N(0, I)" in fig.axes[0].get_title()


def test_point_cloud_and_true_posterior_rotate_with_the_covariance():
    rng = np.random.default_rng(5)
    mu, cov = rng.normal(size=(2, 3)), _spd(rng, 2, 3)
    sigma = np.sqrt(np.einsum("nii->ni", cov))
    L = np.linalg.cholesky(cov)
    z = mu + np.einsum("nij,snj->sni", L, rng.normal(size=(4000, 2, 3)))     # (S, k, d) draws of N(mu, cov)
    fig = plots.point_cloud_figure(z, mu, sigma, z.mean(0), z.std(0), (0, 1), cov=cov)
    for s, ax in enumerate(a for a in fig.axes if a.axison):
        enc1, enc2, emp = ax.patches
        np.testing.assert_allclose(_mahalanobis_on_boundary(enc2, mu[s, :2], cov[s, :2, :2]), 4, rtol=1e-6)
        # the draws' own covariance: 4000 draws put its 1-sigma outline within a few % of the encoder's
        np.testing.assert_allclose(_mahalanobis_on_boundary(emp, z.mean(0)[s, :2], cov[s, :2, :2]), 1, rtol=0.1)
    fig2 = plots.true_posterior_figure(z.transpose(1, 0, 2), np.full((2, 4000), 1 / 4000), mu, sigma, mu, sigma,
                                       mu, (1, 2), cov=cov)
    for s, ax in enumerate(a for a in fig2.axes if a.axison):
        red = [p for p in ax.patches if p.get_edgecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=1e-2)]
        assert len(red) == 2 and all(p.angle != 0 for p in red)
        np.testing.assert_allclose(_mahalanobis_on_boundary(red[0], mu[s, 1:], cov[s, 1:, 1:]), 1, rtol=1e-6)
    plots.figure_png(fig)
    plots.figure_png(fig2)


def test_mixture_prior_overlay_and_marginals():
    u = v = np.linspace(-4, 4, 81)
    U, V = np.meshgrid(u, v)
    dens = np.exp(-0.5 * ((U - 1) ** 2 + V ** 2)) / (2 * np.pi)
    prior = {"u": u, "v": v, "density": dens, "levels": [0.06, 0.02], "name": "MoG, K=2"}
    mu, sigma = np.zeros((5, 2)), np.full((5, 2), 0.5)
    fig = plots.latent_map_figure(mu, sigma, (0, 1), None, np.arange(2), prior=prior)
    ax = fig.axes[0]
    assert "MoG, K=2" in ax.get_title()
    assert len(ax.patches) == 4                           # the samples' ellipses; no N(0, I) circles
    assert len(ax.collections) >= 3                       # points, shading, contours
    # the view holds the prior's 86% region (about x in [-1, 3]), not the whole grid
    lo, hi = ax.get_xlim()
    assert lo <= -0.8 and hi >= 2.8 and (lo > -4 or hi < 4)
    plots.figure_png(fig)
    w, m, s = np.array([0.25, 0.75]), np.array([[-2.0, 0.0], [1.0, 0.5]]), np.array([[0.5, 1.0], [1.0, 2.0]])
    fig = plots.aggregate_posterior_figure(mu, sigma, prior=(w, m, s), prior_name="MoG, K=2")
    for j, ax in enumerate(fig.axes[:2]):
        t, p = ax.lines[1].get_xdata(), ax.lines[1].get_ydata()
        want = sum(w[k] * np.exp(-0.5 * ((t - m[k, j]) / s[k, j]) ** 2) / (s[k, j] * np.sqrt(2 * np.pi)) for k in range(2))
        np.testing.assert_allclose(p, want, rtol=1e-12)
        assert ax.lines[1].get_label() == "prior MoG, K=2"
    fig = plots.variance_split_figure(np.array([0.5, 0.1]), np.array([0.2, 0.1]), prior_var=np.array([2.0, 3.0]))
    assert fig.axes[0].get_ylim()[1] >= 3.0
