"""Figures from arrays (matplotlib, Agg). Nothing here imports model or training code.

Every ``*_figure`` function takes numpy arrays (and plain lists of metric records) and
returns a `matplotlib.figure.Figure`; the caller saves or embeds it and then closes it
(`save_figure`, `figure_png`). Shapes follow the rest of vaelens: mu, sigma (n, d);
z samples (S, n, d); images flattened row-major (n, h*w) with their (h, w) given.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 100
# Categorical colours up to 10 labels; more labels fall back to a continuous map.
_TAB10 = plt.get_cmap("tab10")


def image_grid(images: np.ndarray, image_shape: Sequence[int], ncol: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Tile flattened images (n, h*w) into one 2-D array with `pad` pixels between them."""
    n = len(images)
    h, w = image_shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(np.asarray(images).reshape(n, h, w)):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def save_image_grid(path, images: np.ndarray, image_shape: Sequence[int], ncol: Optional[int] = None,
                    scale: int = 4) -> None:
    """Write a PNG of tiled images, values clipped to [0, 1], each pixel `scale` x `scale`."""
    grid = np.clip(image_grid(images, image_shape, ncol), 0, 1)
    grid = np.kron(grid, np.ones((scale, scale), dtype=np.float32))
    plt.imsave(path, grid, cmap="gray", vmin=0, vmax=1)


# --- saving -----------------------------------------------------------------------------------

def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes; closes it, so pyplot does not keep every figure alive."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig: Figure, path) -> bytes:
    """Write the figure to `path` as PNG and return the bytes; closes it."""
    data = figure_png(fig)
    with open(path, "wb") as f:
        f.write(data)
    return data


def mixture_density(t: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
                    weights: Optional[np.ndarray] = None) -> np.ndarray:
    """The one-dimensional mixture sum_i w_i N(t; mu_i, sigma_i^2) at the points t (G,): shape (G,).

    The package's one numpy normal density, for figures (tensors use torch.distributions): mu,
    sigma (n,) are one latent's posteriors, the aggregate posterior q(z_j) with equal weights 1/n
    (`weights` None); the prior N(0, 1) is the mixture of one, a mixture prior's marginal the
    mixture of its components' marginals with their weights (n,). Memory (G, n).
    """
    u = (np.asarray(t, dtype=np.float64)[:, None] - mu) / sigma             # (G, n)
    dens = np.exp(-0.5 * u ** 2) / (sigma * math.sqrt(2 * math.pi))         # (G, n)
    return dens.mean(1) if weights is None else dens @ np.asarray(weights, dtype=np.float64)


def ellipse_axes(cov: np.ndarray):
    """The 1-sigma ellipse of N(., cov) for 2x2 covariances (..., 2, 2): full width along the major axis,
    full height along the minor one, the major axis's angle in degrees from the first coordinate, each
    (...). The k-sigma ellipse {z : (z - m)^T cov^-1 (z - m) = k^2} is k times as wide and high."""
    lam, vec = np.linalg.eigh(np.asarray(cov, dtype=np.float64))          # ascending eigenvalues
    lam = np.clip(lam, 0.0, None)  # a rounding-level negative eigenvalue is a flat ellipse, not NaN
    angle = np.degrees(np.arctan2(vec[..., 1, 1], vec[..., 0, 1]))          # the major eigenvector's direction
    return 2 * np.sqrt(lam[..., 1]), 2 * np.sqrt(lam[..., 0]), angle


def _ellipses(ax, centre, dims, sd=None, cov=None, styles=((1, "-"), (2, ":")), **kw) -> None:
    """A posterior's m-sigma ellipses in the dimensions dims = (i, j): axis-aligned from the
    marginal stds sd (d,), or rotated from the covariance cov (d, d) (its 2x2 block) when given."""
    i, j = dims
    for m, ls in styles:
        if cov is None:
            ax.add_patch(Ellipse(centre, 2 * m * sd[i], 2 * m * sd[j], fill=False, ls=ls, **kw))
        else:
            w, h, a = ellipse_axes(np.asarray(cov)[[i, j]][:, [i, j]])
            ax.add_patch(Ellipse(centre, m * w, m * h, angle=a, fill=False, ls=ls, **kw))


def _prior_overlay(ax, prior: Optional[dict], dims) -> str:
    """The prior where the latent space is shown; returns the title's words for it.

    Without `prior` (N(0, I)): its 1- and 2-sigma circles. With it, a dict of ``u`` (Gu,), ``v``
    (Gv,), ``density`` (Gv, Gu) (the prior's marginal over the shown pair on that grid), ``levels``
    (the densities enclosing 39% and 86% of its mass, like a Gaussian's 1- and 2-sigma ellipses)
    and ``name``: the density shaded, with dashed contours at those levels.
    """
    if prior is None:
        for m in (1, 2):
            ax.add_patch(Ellipse((0, 0), 2 * m, 2 * m, fill=False, ec="0.5", lw=0.8, ls="--"))
        return "grey dashed: prior N(0, I) 1σ, 2σ"
    u, v, p = prior["u"], prior["v"], np.asarray(prior["density"])
    # The view holds what is already drawn and the prior's 86% region, not the whole density grid.
    inside = p >= min(prior["levels"])                                      # (Gv, Gu)
    cols, rows = np.nonzero(inside.any(0))[0], np.nonzero(inside.any(1))[0]
    if len(cols):
        ax.update_datalim([(u[cols[0]], v[rows[0]]), (u[cols[-1]], v[rows[-1]])])
    view = ax.dataLim.frozen()
    ax.contourf(u, v, p, levels=np.linspace(0, float(p.max()), 9)[1:], cmap="Greys", alpha=0.35, zorder=0,
                extend="max")
    ax.contour(u, v, p, levels=sorted(prior["levels"]), colors="0.35", linewidths=0.9, linestyles="--", zorder=1)
    ax.dataLim.set(view)  # the contours' grid does not widen the view
    return f"grey: prior {prior['name']}, p(z{dims[0]}, z{dims[1]}); dashed: 39%, 86% of its mass"


def _new(nrows: int = 1, ncols: int = 1, w: float = 4.0, h: float = 3.2, **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, **kw)
    return fig, axes


def _panels(k: int, w: float, h: float, ncol_max: int = 4):
    """A grid for k panels, at most `ncol_max` across; returns (fig, the k axes in order), the rest hidden."""
    ncol = min(k, ncol_max)
    fig, axes = _new(int(math.ceil(k / ncol)), ncol, w=w, h=h)
    flat = list(axes.ravel())
    for ax in flat[k:]:
        ax.set_axis_off()
    return fig, flat[:k]


def _label_colours(labels: Optional[np.ndarray]):
    """(colour per point, legend entries [(name, colour)]) for integer labels."""
    if labels is None:
        return "tab:blue", []
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) <= 10:
        lut = {c: _TAB10(i % 10) for i, c in enumerate(classes)}
        return [lut[v] for v in labels], [(c, lut[c]) for c in classes]
    cmap = plt.get_cmap("viridis")
    lo, hi = float(labels.min()), float(labels.max())
    return [cmap((v - lo) / (hi - lo or 1)) for v in labels], []


# --- training -----------------------------------------------------------------------------------

def training_curves_figure(history: Sequence[dict]) -> Figure:
    """Loss, reconstruction, KL and KL per latent dimension over epochs.

    Parameters
    ----------
    history : list of dict
        The run's metrics records (``metrics.jsonl``): ``epoch``, ``train_loss``, ``train_rec``,
        ``train_kl``, ``kl_per_dim`` and, with validation data, ``val_loss``, ``val_rec``, ``val_kl``.
    """
    fig, axes = _new(1, 4, w=3.6, h=3.0)
    ax = axes[0]
    if not history:
        for a in ax:
            a.set_axis_off()
        ax[0].text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=ax[0].transAxes)
        return fig
    ep = np.array([r["epoch"] for r in history])

    def series(key, sign=1.0):
        return np.array([sign * r[key] if key in r else np.nan for r in history], dtype=float)

    panels = [("-ELBO (nats)", "train_loss", "val_loss", 1.0),
              ("reconstruction -E[log p(x|z)]", "train_rec", "val_rec", -1.0),
              ("KL(q(z|x) || p(z))", "train_kl", "val_kl", 1.0)]
    for a, (title, tr, va, sign) in zip(ax, panels):
        a.plot(ep, series(tr, sign), label="train", color="tab:blue")
        v = series(va, sign)
        if np.isfinite(v).any():
            a.plot(ep, v, label="validation", color="tab:orange")
        a.set_title(title, fontsize=10)
        a.set_xlabel("epoch")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    kd = [r.get("kl_per_dim") for r in history]
    a = ax[3]
    if all(k is not None for k in kd):
        kd = np.asarray(kd, dtype=float)                                     # (epochs, d)
        for j in range(kd.shape[1]):
            a.plot(ep, kd[:, j], label=f"z{j}", color=_TAB10(j % 10), lw=1.2)
        if kd.shape[1] <= 10:
            a.legend(fontsize=7, ncol=2)
    a.set_title("KL per latent dimension (train)", fontsize=10)
    a.set_xlabel("epoch")
    a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --- images -----------------------------------------------------------------------------------

def _grid_figure(images, image_shape, ncol, left=0.08, right=0.08, top=0.35, bottom=0.08, min_width=0.0):
    """A figure sized to its image grid (no stretched margins): each image about half an inch."""
    grid = np.clip(image_grid(images, image_shape, ncol), 0, 1)
    per_px = 0.5 / (image_shape[1] + 1)
    gh, gw = grid.shape
    w, h = gw * per_px, gh * per_px
    W = max(w + left + right, min_width)
    H = h + top + bottom
    fig = plt.figure(figsize=(W, H))
    ax = fig.add_axes([(left + (W - w - left - right) / 2) / W, bottom / H, w / W, h / H])
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig, ax


def images_figure(images: np.ndarray, image_shape: Sequence[int], title: str = "", ncol: Optional[int] = None) -> Figure:
    """A grid of flattened images (n, h*w), values in [0, 1]."""
    ncol = ncol or int(math.ceil(math.sqrt(len(images))))
    fig, ax = _grid_figure(images, image_shape, ncol, min_width=2.8)
    ax.set_title(title, fontsize=10)
    return fig


def reconstructions_figure(inputs: np.ndarray, recons: np.ndarray, image_shape: Sequence[int],
                           ncol: int = 8) -> Figure:
    """Inputs (n, h*w) beside their reconstructions: pairs of rows, input above reconstruction."""
    n = len(inputs)
    rows = []
    for start in range(0, n, ncol):
        block = slice(start, min(start + ncol, n))
        for part in (inputs[block], recons[block]):
            row = np.ones((ncol, part.shape[1]), dtype=np.float32)
            row[:len(part)] = part
            rows.append(row)
    fig, ax = _grid_figure(np.concatenate(rows), image_shape, ncol, left=0.6, right=0.3, top=0.55, min_width=4.6)
    h = image_shape[0] + 1
    ax.set_yticks([h * (i + 0.5) for i in range(len(rows))])
    ax.set_yticklabels(["input", "recon."] * (len(rows) // 2), fontsize=8)
    ax.tick_params(length=0)
    ax.set_title("inputs and reconstructions\n(decoder mean at z = mu(x))", fontsize=10)
    return fig


def traversal_figure(images: np.ndarray, image_shape: Sequence[int], dims: Sequence[int],
                     values: np.ndarray) -> Figure:
    """Latent traversals: one row per latent dimension, decoded while that dimension moves.

    Parameters
    ----------
    images : ndarray of shape (len(dims), steps, h*w)
    dims : the latent dimension of each row
    values : ndarray of shape (steps,), the values the dimension takes
    """
    k, steps = images.shape[:2]
    fig, ax = _grid_figure(images.reshape(k * steps, -1), image_shape, steps, left=0.45, bottom=0.3, min_width=4.0)
    h, w = image_shape[0] + 1, image_shape[1] + 1
    ax.set_yticks([h * (i + 0.5) for i in range(k)])
    ax.set_yticklabels([f"z{j}" for j in dims], fontsize=8)
    ax.set_xticks([w * (i + 0.5) for i in range(steps)])
    ax.set_xticklabels([f"{v:+.1f}" for v in values], fontsize=7)
    ax.tick_params(length=0)
    ax.set_title("latent traversals (most active dimensions first)", fontsize=10)
    return fig


def interpolation_figure(images: np.ndarray, image_shape: Sequence[int], ends: Optional[np.ndarray] = None) -> Figure:
    """Decoded points on the line from mu(a) to mu(b): images (steps, h*w); `ends` (2, h*w) the inputs."""
    row = images if ends is None else np.concatenate([ends[:1], images, ends[1:]])
    fig, ax = _grid_figure(row, image_shape, len(row), min_width=4.6)
    ax.set_title("interpolation between two samples" + (" (inputs at both ends)" if ends is not None else ""),
                 fontsize=10)
    return fig


# --- latent space -----------------------------------------------------------------------------

def latent_map_figure(mu: np.ndarray, sigma: np.ndarray, dims: Sequence[int] = (0, 1),
                      labels: Optional[np.ndarray] = None, ellipse_idx: Optional[np.ndarray] = None,
                      label_names: Optional[Sequence[str]] = None, note: str = "",
                      cov: Optional[np.ndarray] = None, prior: Optional[dict] = None) -> Figure:
    """Each sample's mu in two latent dimensions, for a subset its 1- and 2-sigma ellipses, and the prior.

    Parameters
    ----------
    mu, sigma : ndarray of shape (n, d)
    dims : the two latent dimensions to show
    labels : ndarray of shape (n,), optional; colours the points
    ellipse_idx : indices of the samples that get ellipses
    cov : ndarray of shape (n, d, d), optional
        Full covariances (a full-covariance run): the ellipses are drawn from their 2x2 blocks,
        rotated; without it they are axis-aligned from sigma.
    prior : dict, optional
        The prior's density over the shown pair (see `_prior_overlay`); default N(0, I)'s circles.
    """
    i, j = dims
    colours, legend = _label_colours(labels)
    fig, axes = _new(1, 1, w=6.4, h=5.4)
    ax = axes[0, 0]
    ax.scatter(mu[:, i], mu[:, j], s=6, c=colours, alpha=0.6, linewidths=0)
    if ellipse_idx is not None:
        for k in ellipse_idx:
            col = colours[k] if isinstance(colours, list) else colours
            _ellipses(ax, (mu[k, i], mu[k, j]), dims, sigma[k], None if cov is None else cov[k],
                      ec=col, lw=1.0, alpha=0.9)
            ax.plot(mu[k, i], mu[k, j], "k+", ms=6)
    # Prior contours give the scale: a posterior as wide as these has learned nothing about x.
    prior_words = _prior_overlay(ax, prior, dims)
    if legend:
        names = [label_names[int(c)] if label_names is not None else str(c) for c, _ in legend]
        handles = [plt.Line2D([], [], marker="o", ls="", color=col, ms=5) for _, col in legend]
        ax.legend(handles, names, fontsize=7, loc="upper right", framealpha=0.8, ncol=2 if len(names) > 5 else 1)
    ax.set_xlabel(f"z{i}")
    ax.set_ylabel(f"z{j}")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    what = "ellipses mu ± 1σ (solid), 2σ (dotted)" if cov is None else "ellipses 1σ, 2σ of the full covariance"
    sep = "; " if prior is None else "\n"  # a mixture prior's words take a line of their own
    ax.set_title(f"latent map: mu(x) in z{i}, z{j}; {what}\n"
                 f"{prior_words}{sep + note if note else ''}", fontsize=9)
    fig.tight_layout()
    return fig


def point_cloud_figure(z: np.ndarray, mu: np.ndarray, sigma: np.ndarray, emp_mean: np.ndarray,
                       emp_std: np.ndarray, dims: Sequence[int] = (0, 1), names: Optional[Sequence[str]] = None,
                       passed: Optional[Sequence[bool]] = None, cov: Optional[np.ndarray] = None) -> Figure:
    """The reparameterized z of a few samples around their posterior ellipses.

    Parameters
    ----------
    z : ndarray of shape (S, k, d)
        S draws z = mu + sigma * eps for each of k samples.
    mu, sigma : ndarray of shape (k, d)
        The encoder's q(z|x).
    emp_mean, emp_std : ndarray of shape (k, d)
        Mean and standard deviation of the draws.
    names : a title per sample
    passed : whether each sample's check passed
    cov : ndarray of shape (k, d, d), optional
        The encoder's full covariances (a full-covariance run): its ellipses are drawn from their
        2x2 blocks and the draws' from their empirical covariance, both rotated.
    """
    i, j = dims
    k = z.shape[1]
    sig = "σ" if cov is None else "L"
    fig, panels = _panels(k, w=3.3, h=3.8)
    for s, ax in enumerate(panels):
        ax.scatter(z[:, s, i], z[:, s, j], s=4, alpha=0.35, color="tab:blue", linewidths=0, label="z samples")
        _ellipses(ax, (mu[s, i], mu[s, j]), dims, sigma[s], None if cov is None else cov[s], ec="tab:red", lw=1.4)
        emp_cov = None if cov is None else np.cov(z[:, s, :], rowvar=False, ddof=0)  # (d, d): the draws' own
        _ellipses(ax, (emp_mean[s, i], emp_mean[s, j]), dims, emp_std[s], emp_cov, styles=((1, "--"),),
                  ec="black", lw=1.0)
        ax.plot(mu[s, i], mu[s, j], "+", color="tab:red", ms=10, mew=2)
        ax.plot(emp_mean[s, i], emp_mean[s, j], "x", color="black", ms=7)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=7)
        ax.set_xlabel(f"z{i}", fontsize=8)
        ax.set_ylabel(f"z{j}", fontsize=8)
        title = names[s] if names is not None else f"sample {s}"
        if passed is not None:
            title += "  ✓" if passed[s] else "  ✗"
        ax.set_title(title, fontsize=9)
        ax.text(0.0, -0.2, f"mu   {mu[s, i]:+.2f}, {mu[s, j]:+.2f}  σ {sigma[s, i]:.2f}, {sigma[s, j]:.2f}\n"
                            f"mean {emp_mean[s, i]:+.2f}, {emp_mean[s, j]:+.2f}  sd {emp_std[s, i]:.2f}, "
                            f"{emp_std[s, j]:.2f}",
                transform=ax.transAxes, fontsize=6.5, family="monospace", va="top")
    handles = [plt.Line2D([], [], marker="o", ls="", color="tab:blue", alpha=0.6, label=f"z = mu + {sig}·eps"),
               plt.Line2D([], [], color="tab:red", label="mu ± 1σ, 2σ (encoder)"),
               plt.Line2D([], [], color="black", ls="--",
                          label="empirical mean ± sd" if cov is None else "empirical mean, 1σ of the draws' covariance")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def true_posterior_figure(z: np.ndarray, weights: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
                          mu_opt: np.ndarray, sigma_opt: np.ndarray, mean: np.ndarray, dims: Sequence[int] = (0, 1),
                          names: Optional[Sequence[str]] = None, notes: Optional[Sequence[str]] = None,
                          cov: Optional[np.ndarray] = None) -> Figure:
    """The importance-weighted cloud of p(z|x) beside the encoder's q and q*, for a few samples.

    z (m, k, d) draws with normalized weights (m, k); mu, sigma the encoder's, mu_opt, sigma_opt q*'s
    and mean the importance-sampled E_p[z], each (m, d); notes: a caption line per panel; cov (m, d, d)
    the encoder's full covariances (a full-covariance run), whose ellipses are then rotated.
    """
    i, j = dims
    fig, panels = _panels(len(z), w=3.3, h=3.9)
    for s, ax in enumerate(panels):
        rel = weights[s] / weights[s].max()                                  # (k,) in (0, 1]
        o = np.argsort(rel)                                                  # heavy draws drawn last, on top
        rgba = np.zeros((len(o), 4))
        rgba[:, 2], rgba[:, 3] = 0.6, 0.08 + 0.92 * rel[o]                   # alpha by weight: ESS at a glance
        ax.scatter(z[s, o, i], z[s, o, j], s=2 + 40 * rel[o], c=rgba, linewidths=0)
        _ellipses(ax, (mu[s, i], mu[s, j]), dims, sigma[s], None if cov is None else cov[s], ec="tab:red", lw=1.3)
        _ellipses(ax, (mu_opt[s, i], mu_opt[s, j]), dims, sigma_opt[s], ec="tab:green", lw=1.3)
        ax.plot(mu[s, i], mu[s, j], "+", color="tab:red", ms=10, mew=2)
        ax.plot(mu_opt[s, i], mu_opt[s, j], "+", color="tab:green", ms=9, mew=1.5)
        ax.plot(mean[s, i], mean[s, j], "x", color="black", ms=8, mew=2)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=7)
        ax.set_xlabel(f"z{i}", fontsize=8)
        ax.set_ylabel(f"z{j}", fontsize=8)
        ax.set_title(names[s] if names is not None else f"sample {s}", fontsize=9)
        if notes is not None:
            ax.text(0.0, -0.2, notes[s], transform=ax.transAxes, fontsize=6.5, family="monospace", va="top")
    handles = [plt.Line2D([], [], marker="o", ls="", color="navy", alpha=0.6, label="draws, size/alpha by weight"),
               plt.Line2D([], [], color="tab:red", label="encoder q: mu ± 1σ, 2σ"),
               plt.Line2D([], [], color="tab:green", label="q*: ± 1σ, 2σ"),
               plt.Line2D([], [], marker="x", ls="", color="black", label="E_p[z] (importance-sampled)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def aggregate_posterior_figure(mu: np.ndarray, sigma: np.ndarray, dims: Optional[Sequence[int]] = None,
                               grid: int = 241, prior: Optional[tuple] = None, prior_name: str = "N(0,1)") -> Figure:
    """Per dimension, the aggregate posterior q(z_j) = mean_i N(z_j; mu_ij, sigma_ij²) against the prior's p(z_j).

    Parameters
    ----------
    mu, sigma : ndarray of shape (n, d)
    dims : which dimensions to draw (default all)
    prior : (weights (K,), means (K, d), stds (K, d)), optional
        A mixture prior's components: p(z_j) = sum_k w_k N(z_j; m_kj, s_kj²). Default N(0, 1).
    prior_name : the legend's name of the prior
    """
    d = mu.shape[1]
    dims = list(range(d)) if dims is None else list(dims)
    w, m, sd = prior if prior is not None else (np.ones(1), np.zeros((1, d)), np.ones((1, d)))  # N(0, 1): one
    fig, panels = _panels(len(dims), w=3.0, h=2.4)
    for a, ax in enumerate(panels):
        j = dims[a]
        # the grid holds the posteriors' mu ± 3 sigma and the prior's mean ± 4 sd (N(0, 1): ±4)
        lo = min(float(np.min(m[:, j] - 4 * sd[:, j])), float(np.min(mu[:, j] - 3 * sigma[:, j])))
        hi = max(float(np.max(m[:, j] + 4 * sd[:, j])), float(np.max(mu[:, j] + 3 * sigma[:, j])))
        t = np.linspace(lo, hi, grid)
        # A mixture of n Gaussians on the grid, (grid, n) at a time; n is subsampled by callers.
        q = mixture_density(t, mu[:, j], sigma[:, j])
        p = mixture_density(t, m[:, j], sd[:, j], w)
        ax.fill_between(t, q, color="tab:blue", alpha=0.35, lw=0)
        ax.plot(t, q, color="tab:blue", lw=1.2, label="aggregate q(z)")
        ax.plot(t, p, color="0.3", ls="--", lw=1.0, label=f"prior {prior_name}")
        # Cap the height so one near-deterministic dimension does not flatten the prior curve.
        top = float(max(q.max(), p.max()))  # N(0, 1)'s 0.40 is under 0.45: as before for it
        ax.set_ylim(0, min(top * 1.1, 2.0) if top > 0.45 else 0.48)
        between, within = float(mu[:, j].var()), float((sigma[:, j] ** 2).mean())
        ax.set_title(f"z{j}: Var mu {between:.2f} + E σ² {within:.2f}", fontsize=8.5)
        ax.tick_params(labelsize=7)
        if a == 0:
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def variance_split_figure(between: np.ndarray, within: np.ndarray, prior_var: Optional[np.ndarray] = None) -> Figure:
    """Law of total variance per dimension: Var z_j = Var_x mu_j (between) + E_x sigma_j² (within).

    The prior N(0, I) asks for a total of 1 in each dimension; another prior for its own variances.

    Parameters
    ----------
    between, within : ndarray of shape (d,)
    prior_var : ndarray of shape (d,), optional
        The prior's marginal variances (a mixture prior), drawn as a mark per dimension.
    """
    d = len(between)
    x = np.arange(d)
    fig, axes = _new(1, 1, w=max(5.5, 0.45 * d + 3.0), h=3.4)
    ax = axes[0, 0]
    ax.bar(x, between, color="tab:blue", label="between samples: Var mu")
    ax.bar(x, within, bottom=between, color="tab:orange", label="within a sample: E σ²")
    if prior_var is None:
        ax.axhline(1.0, color="0.3", ls="--", lw=1, label="prior variance 1")
        ax.set_ylim(0, 1.45 * max(1.0, float(np.max(between + within))))
    else:
        ax.hlines(prior_var, x - 0.45, x + 0.45, color="0.3", ls="--", lw=1.2, label="prior variance")
        ax.set_ylim(0, 1.45 * max(1.0, float(np.max(between + within)), float(np.max(prior_var))))
    ax.set_xticks(x)
    ax.set_xticklabels([f"z{j}" for j in range(d)], fontsize=8)
    ax.set_ylabel("variance")
    ax.set_title("aggregate posterior variance per dimension", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper left", ncol=2, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def heatmap_figure(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str = "",
                   vmin: float = 0.0, vmax: float = 1.0, cbar_label: str = "") -> Figure:
    """A labelled heatmap with the values written in the cells (e.g. matched correlations across seeds)."""
    matrix = np.asarray(matrix, dtype=float)
    r, c = matrix.shape
    fig, axes = _new(1, 1, w=max(3.5, 0.55 * c + 2.2), h=max(2.5, 0.45 * r + 1.3))
    ax = axes[0, 0]
    im = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(c))
    ax.set_xticklabels(col_labels, fontsize=8, rotation=45 if c > 8 else 0, ha="right" if c > 8 else "center")
    ax.set_yticks(range(r))
    ax.set_yticklabels(row_labels, fontsize=8)
    if r * c <= 400:
        for a in range(r):
            for b in range(c):
                v = matrix[a, b]
                if np.isfinite(v):
                    ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < vmin + 0.6 * (vmax - vmin) else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.05)
    cb.set_label(cbar_label, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# --- tables -----------------------------------------------------------------------------------

def feature_reconstruction_figure(X: np.ndarray, X_rec: np.ndarray, feature_names: Optional[Sequence[str]] = None,
                                  max_features: int = 12) -> Figure:
    """True against reconstructed value, one panel per feature, with R² in each title.

    Parameters
    ----------
    X, X_rec : ndarray of shape (n, p), in data units
    """
    p = min(X.shape[1], max_features)
    names = list(feature_names) if feature_names is not None else [f"x{j}" for j in range(X.shape[1])]
    fig, panels = _panels(p, w=2.6, h=2.5)
    ncol = min(p, 4)
    nrow = int(math.ceil(p / ncol))
    for j, ax in enumerate(panels):
        t, r = X[:, j], X_rec[:, j]
        ax.scatter(t, r, s=4, alpha=0.4, linewidths=0)
        lo, hi = float(min(t.min(), r.min())), float(max(t.max(), r.max()))
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--")
        var = float(t.var())
        r2 = 1.0 - float(((t - r) ** 2).mean()) / var if var > 0 else float("nan")
        ax.set_title(f"{names[j]}  R² {r2:.2f}", fontsize=8.5)
        ax.tick_params(labelsize=7)
        if j % ncol == 0:
            ax.set_ylabel("reconstructed", fontsize=8)
        if j >= (nrow - 1) * ncol:
            ax.set_xlabel("true", fontsize=8)
    fig.subplots_adjust(left=0.6 / fig.get_figwidth(), right=0.98, bottom=0.5 / fig.get_figheight(),
                        top=1 - 0.3 / fig.get_figheight(), wspace=0.25, hspace=0.4)
    return fig


def scatter_matrix_figure(X: np.ndarray, feature_names: Optional[Sequence[str]] = None,
                          X_other: Optional[np.ndarray] = None, labels: Sequence[str] = ("data", "model samples"),
                          max_features: int = 4) -> Figure:
    """Pairwise scatter plots and histograms of the first `max_features` features.

    With `X_other` (m, p) (e.g. samples decoded from the prior), both are drawn over each other.
    """
    p = min(X.shape[1], max_features)
    names = list(feature_names) if feature_names is not None else [f"x{j}" for j in range(X.shape[1])]
    fig, axes = _new(p, p, w=1.9, h=1.9)
    sets = [(X, "tab:blue", labels[0])] + ([(X_other, "tab:orange", labels[1])] if X_other is not None else [])
    for a in range(p):
        for b in range(p):
            ax = axes[a, b]
            for data, col, _ in sets:
                if a == b:
                    ax.hist(data[:, a], bins=25, color=col, alpha=0.5, density=True)
                else:
                    ax.scatter(data[:, b], data[:, a], s=2, alpha=0.3, color=col, linewidths=0)
            # Ticks only on the outer row and column: tick layout is most of the drawing time.
            ax.tick_params(labelsize=6)
            if b == 0:
                ax.set_ylabel(names[a], fontsize=8)
            if b == 0 and a != b:
                ax.yaxis.set_major_locator(MaxNLocator(3))
            else:
                ax.set_yticks([])  # a histogram's density scale would read as the feature's
            if a == p - 1:
                ax.set_xlabel(names[b], fontsize=8)
                ax.xaxis.set_major_locator(MaxNLocator(3))
            else:
                ax.set_xticks([])
    if X_other is not None:
        handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=n) for _, c, n in sets]
        fig.legend(handles=handles, loc="upper center", ncol=2, fontsize=8, frameon=False)
    # Fixed margins rather than tight_layout: only the outer axes have labels, and layout costs a draw.
    fig.subplots_adjust(left=0.6 / fig.get_figwidth(), right=0.98, bottom=0.5 / fig.get_figheight(),
                        top=1 - 0.35 / fig.get_figheight(), wspace=0.06, hspace=0.06)
    return fig
