"""One self-contained HTML report of a run: what the model learned, sample by sample.

`build_report` loads a run directory, encodes (a seeded subsample of) its data and writes
``report.html`` with every figure embedded as a base64 PNG and all CSS inline, so the file
opens from disk with no network; the figures are also saved as PNG files beside it: in
``RUN/figures/`` for the default ``RUN/report.html``, else in ``<stem>_figures/`` next to the
chosen file, so that two reports never write each other's figures. Sections that cannot be
computed (too few latent dimensions, no runs to compare) are kept with the reason they were skipped.

Everything goes through the `VAE` estimator: for a binarized run the samples shown are one
binarization with the report's seed, exactly what ``vaelens evaluate --seed`` feeds the model.
"""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from . import checkpoint as ck
from . import data as data_mod
from . import io
from .api import VAE, as_dataset
from .data import Dataset
from .errors import DataError, OutputError, VaelensError
from .evaluate import ACTIVE_THRESHOLD, active_units
from .gap import MIN_ESS, PARETO_K_MAX
from .latentview import family_text, prior_mixture, prior_name, prior_overlay
from .plots import (aggregate_posterior_figure, feature_reconstruction_figure, heatmap_figure,
                    images_figure, interpolation_figure, latent_map_figure, point_cloud_figure,
                    reconstructions_figure, scatter_matrix_figure, training_curves_figure, traversal_figure,
                    true_posterior_figure, variance_split_figure)
from .posterior import aggregate_posterior
from .report_page import Page, flatten, table
from .uniqueness import compare

FIGURES = "figures"
DEFAULT_NAME = "report.html"
# Every figure a report can write (the PNG file stems): only these are ever removed from a
# figure folder as stale, so a user's own files there are never touched.
FIGURE_NAMES = ("training_curves", "reconstructions", "prior_samples", "traversals", "interpolation",
                "feature_reconstruction", "scatter_matrix", "latent_map", "point_cloud", "true_posterior",
                "variance_split",
                "aggregate_posterior", "compare_runs", "compare_matched")
# Evaluation (IWAE) is the slowest part; a small K on a subset keeps the report under a minute.
EVAL_POINTS = 500
EVAL_IW_SAMPLES = 50
# The true-posterior section: importance sampling and q* on the point-cloud section's first few
# samples; k and steps small enough for seconds on CPU, large enough for an ESS in the hundreds.
GAP_SAMPLES = 4
GAP_K = 1000
GAP_STEPS = 150


@dataclass
class Report:
    """What `build_report` wrote.

    Attributes
    ----------
    path : the HTML file
    figures : figure name -> PNG path under `figure_dir`
    sections : section id -> None when built, else why it was skipped
    notes : facts the page states (subsampling, data used)
    numbers : the figures computed for the page (JSON-ready)
    seconds : time to build
    """

    path: Path
    figures: Dict[str, Path]
    sections: Dict[str, Optional[str]]
    notes: List[str]
    numbers: dict
    seconds: float
    figure_dir: Optional[Path] = None  # where the PNGs went: RUN/figures or <stem>_figures beside the HTML

    def to_dict(self) -> dict:
        return io.jsonable({"path": self.path, "figure_dir": self.figure_dir, "figures": self.figures,
                            "sections": self.sections, "notes": self.notes, "numbers": self.numbers,
                            "seconds": round(self.seconds, 3)})

    def write_json(self, path: Union[str, Path]) -> Path:
        """Write `to_dict()` as JSON through the one atomic writer (``report --json``)."""
        return io.write_json(path, self.to_dict())


def figure_dir_for(out_path: Union[str, Path], run_dir: Union[str, Path]) -> Path:
    """Where a report's PNGs go: RUN/figures for the default RUN/report.html, else <stem>_figures beside it."""
    out_path, run_dir = Path(out_path), Path(run_dir)
    if out_path.resolve() == (run_dir / DEFAULT_NAME).resolve():
        return run_dir / FIGURES
    return out_path.with_name(out_path.stem + "_" + FIGURES)


# --- entry point ------------------------------------------------------------------------------

def build_report(run_dir: Union[str, Path], data: Union[Dataset, np.ndarray, None] = None,
                 out_path: Union[str, Path, None] = None, compare_runs: Optional[Sequence[Union[str, Path]]] = None,
                 seed: int = 0, max_points: int = 2000, dims: Optional[Sequence[int]] = None,
                 n_ellipses: int = 15, n_cloud: int = 4, cloud_samples: int = 500, evaluate: bool = True, gap: bool = True,
                 log: Optional[Callable[[str], None]] = None, overwrite: bool = False,
                 vae: Optional[VAE] = None) -> Report:
    """Write the HTML report of a run and its figures.

    Parameters
    ----------
    run_dir : a run directory written by ``vaelens train`` or `VAE.save`
    data : Dataset or ndarray of shape (n, p), optional
        The samples to show, in data units; default the run's own training data.
    out_path : default ``RUN/report.html``; an existing file is replaced
    compare_runs : run directories trained on the same data (other seeds) for the agreement heatmap
    seed : seeds the subsample, the binarization of a binarized run's data (`VAE.model_input`),
        the samples chosen for ellipses and point clouds, and every draw
    max_points : data sets larger than this are subsampled (seeded) for every figure
    dims : the two latent dimensions of the latent map (default the two most active)
    n_ellipses : samples of the latent map that get their 1- and 2-sigma ellipses
    n_cloud, cloud_samples : samples in the point-cloud check and z draws for each
    evaluate : compute the evaluation metrics (IWAE with a small K on a subset)
    gap : the true-posterior section (importance-sampled p(z|x), q* and the gaps for a few samples)
    log : called with a line per step (progress for the CLI)
    vae : the run already loaded (`VAE.load(run_dir)`), so a caller that read it does not read it twice
    overwrite : also remove figures of an earlier report from the figure folder that this report
        does not write (``report --force``); without it they are kept, and a note says so

    Returns
    -------
    Report
    """
    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    run_dir = Path(run_dir)
    vae = VAE.load(run_dir) if vae is None else vae
    d = vae.latent_dim_
    if dims is not None and (len(dims) != 2 or not all(0 <= j < d for j in dims) or dims[0] == dims[1]):
        raise VaelensError(f"latent map dims must be two different dimensions in 0..{d - 1}, got {tuple(dims)}")
    out_path = Path(out_path) if out_path is not None else run_dir / DEFAULT_NAME
    fig_dir = figure_dir_for(out_path, run_dir)
    # before any work: an unwritable page or figure folder is one line, not a traceback at the end
    io.check_writable(out_path, force=True, what="report")
    io.check_writable(fig_dir, folder=True, what="figure folder")
    ds, raw_X, notes = _shown_data(vae, data, seed, max_points)
    _make_folder(fig_dir)
    say(f"encoding {ds.n} samples")
    post = vae.encode(ds.X, seed=seed)
    mu, sigma = post.mu, post.sigma                                          # (n, d)
    n_active, activity = active_units(mu)                                    # activity (d,) = Var_x mu
    order = np.argsort(-activity, kind="stable")
    numbers: dict = {"n_points": ds.n, "latent_dim": d, "activity": activity, "active_units": n_active,
                     "active_threshold": ACTIVE_THRESHOLD, "seed": seed, "binarized": vae.binarized_}
    if ds.y is not None:  # the legend's labels, as written in the file (5, 8, 11, 14 stay numbers)
        numbers["labels"] = ds.label_values if ds.label_values is not None else np.unique(ds.y).tolist()
    page = Page(fig_dir, FIGURE_NAMES)
    rng = np.random.default_rng(seed)

    _section_run(page, run_dir, vae, ds, evaluate, seed, numbers, say)
    if ds.image_shape is not None:
        _section_images(page, vae, ds, mu, activity, order, rng, seed, numbers, say)
    else:
        _sectiontable(page, vae, ds, seed, say)
    _section_latent_map(page, vae, ds, post, activity, order, dims, n_ellipses, rng, numbers, say)
    cloud_idx = _section_point_cloud(page, vae, ds, mu, order, n_cloud, cloud_samples, rng, seed, numbers, say)
    _section_true_posterior(page, vae, ds, order, cloud_idx[:GAP_SAMPLES], gap, seed, numbers, say)
    _section_aggregate(page, vae, mu, sigma, numbers, say)
    _section_compare(page, run_dir, (mu, sigma), raw_X, compare_runs, seed, numbers, say)
    notes += _tidy_figures(fig_dir, page.figures, overwrite)

    header = [f'<p class="muted">run <code>{html.escape(str(run_dir))}</code> · data '
              f'{html.escape(ds.name or "(array)")} · {ds.n} samples shown · '
              f'written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>']
    header += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    _make_folder(out_path.parent)
    io.atomic_write(out_path, page.render(f"vaelens report: {run_dir.name}", header))
    return Report(path=out_path, figures=dict(page.figures), sections={s.id: s.skipped for s in page.sections},
                  notes=notes, numbers=io.jsonable(numbers), seconds=time.perf_counter() - t0, figure_dir=fig_dir)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the folder ({e.strerror or e})") from None


def _shown_data(vae, data, seed: int, max_points: int):
    """The samples the page shows (a seeded subsample of large sets), binarized once for a binarized run.

    Returns (dataset, the same rows before binarization, notes for the page).
    """
    ds = _dataset(data, vae.config_)
    notes: List[str] = []
    if ds.n > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(ds.n, max_points, replace=False))
        notes.append(f"The data set has {ds.n} samples; every figure uses a random subsample of {max_points} "
                     f"(seed {seed}).")
        ds = ds.subset(idx)
    raw_X = ds.X
    if vae.binarized_:
        # One binarization for the whole page: every later call gets these bits back unchanged.
        ds = dataclasses.replace(ds, X=vae.binarize_input(ds.X, seed))
        notes.append(f"This run was trained on binarized images: the samples shown and every number are one "
                     f"binarization of them with seed {seed}, as vaelens evaluate --seed {seed} uses.")
    return ds, raw_X, notes


def _tidy_figures(fig_dir: Path, written: Dict[str, Path], overwrite: bool) -> List[str]:
    """Remove (with `overwrite`) or report the figures of an earlier report that this one did not write."""
    stale = [fig_dir / f"{n}.png" for n in FIGURE_NAMES if n not in written and (fig_dir / f"{n}.png").exists()]
    if not stale:
        return []
    if not overwrite:
        return [f"{fig_dir} also holds {len(stale)} figure(s) of an earlier report "
                f"({', '.join(p.name for p in stale)}); write with --force (overwrite=True) to remove them."]
    for p in stale:
        try:
            p.unlink()
        except OSError as e:
            raise OutputError(f"{p}: cannot remove this figure of an earlier report ({e.strerror or e})") from None
    return []


def _dataset(data, cfg) -> Dataset:
    if isinstance(data, Dataset):
        ds = data
    elif data is not None:
        ds = as_dataset(data, "report data")
        ds.name = "array"
    elif cfg.data.name == "array":
        raise DataError("this run was trained on an in-memory array, so its data cannot be reloaded; "
                        "pass the data (report --data FILE, or build_report(run, data=X))")
    else:
        ds = data_mod.load(cfg.data, "train")
    shape = cfg.model.image_shape
    if ds.image_shape is None and shape is not None and ds.p == shape[0] * shape[1]:
        # flattened images from a file: the model knows their shape
        ds = dataclasses.replace(ds, image_shape=tuple(shape))
    return ds


# --- sections ---------------------------------------------------------------------------------

def _section_run(page, run_dir, vae, ds, evaluate, seed, numbers, say):
    s = page.section("run", "The run")
    cfg = vae.config_
    numbers.update(posterior=cfg.model.posterior, prior=cfg.model.prior, prior_components=cfg.model.components,
                   prior_name=prior_name(cfg.model))
    history, summary = ck.read_metrics(run_dir), ck.read_summary(run_dir)
    m, t = cfg.model, cfg.train
    rows = [("data", f"{ds.name or '(array)'}: {ds.n} samples shown, {ds.p} features"
             + (f", images {ds.image_shape[0]}x{ds.image_shape[1]}" if ds.image_shape else "")
             + (f", {len(np.unique(ds.y))} labels" if ds.y is not None else "")),
            ("model", f"{m.arch} {m.input_dim}-{'-'.join(map(str, m.hidden)) or '(linear)'}-{m.latent_dim}, "
                      f"likelihood {m.likelihood}{'/' + m.gaussian_scale if m.likelihood == 'gaussian' else ''}, "
                      f"activation {m.activation}"),
            ("latent families", family_text(m)),
            ("training", f"{t.objective}{' K=%d' % t.iw_samples if t.objective == 'iwae' else ''}{' DReG' if t.dreg else ''}, "
                         f"{t.optimizer} "
                         f"lr {t.lr:g}, batch {t.batch_size}, epochs {t.epochs}, beta {t.beta:g}, seed {t.seed}"),
            ("preprocessing", f"binarize {cfg.data.binarize}, standardize {cfg.data.standardize}")]
    if summary:
        key = "best_val_loss" if "best_val_loss" in summary else "best_train_loss"
        if key in summary:
            rows.append(("result", f"{summary.get('epochs_run')} epochs, best epoch {summary.get('best_epoch')}: "
                                   f"{'validation' if key == 'best_val_loss' else 'training'} -ELBO "
                                   f"{summary[key]:.3f} nats"))
    s.body.append(table(rows))
    s.body.append("<details><summary>full configuration</summary>"
                  + table(list(flatten(cfg.to_dict())), ("key", "value")) + "</details>")
    s.body.append("<h3>Training curves</h3>")
    if history:
        page.figure(s, "training_curves", training_curves_figure(history),
                    "per-epoch means over the training set (and the validation set where one was held out)")
    else:
        s.body.append('<p class="muted">no metrics.jsonl in the run: no training curves</p>')
    s.body.append("<h3>Evaluation</h3>")
    if not evaluate:
        s.body.append('<p class="muted">not computed (evaluation turned off)</p>')
        return
    say("evaluating")
    n_eval = min(ds.n, EVAL_POINTS)
    idx = np.random.default_rng(seed).choice(ds.n, n_eval, replace=False) if ds.n > n_eval else np.arange(ds.n)
    # the same call as `vaelens evaluate --seed`: for the same rows and seed, the same numbers
    res = vae.evaluate(ds.X[np.sort(idx)], iw_samples=EVAL_IW_SAMPLES, seed=seed).to_dict()
    res["space"] = data_mod.figure_space(cfg)  # what the nats are densities of
    numbers["evaluation"] = res
    s.body.append(f'<p class="muted">on {n_eval} of the samples shown, IWAE with K = {EVAL_IW_SAMPLES}, '
                  f'densities in nats of {html.escape(res["space"])} '
                  f'(run <code>vaelens evaluate --seed {seed}</code> for the full figures)</p>')
    s.body.append(table(list(flatten(res)), ("metric", "value")))


def _section_images(page, vae, ds, mu, activity, order, rng, seed, numbers, say):
    say("images")
    s = page.section("reconstructions", "Reconstructions, samples, traversals, interpolation")
    shape = ds.image_shape
    k = min(24, ds.n)
    idx = np.sort(rng.choice(ds.n, k, replace=False))
    s.body.append('<div class="flex">')
    page.figure(s, "reconstructions", reconstructions_figure(ds.X[idx], vae.decode(mu[idx]), shape),
                f"{k} random samples (seed {seed}){', binarized' if numbers['binarized'] else ''}; "
                f"reconstructions are decoder means, not draws")
    pname = prior_name(vae.config_.model)
    page.figure(s, "prior_samples", images_figure(vae.generate(64, seed=seed), shape, f"decoded z ~ {pname}", 8),
                f"decoder means of 64 draws from the prior {pname}")
    s.body.append("</div>")
    threshold = numbers["active_threshold"]
    dims = [int(j) for j in order[:8] if activity[j] > threshold] or [int(order[0])]
    values = np.linspace(-3, 3, 9)
    # Start from the prior mean so each row shows what one dimension alone controls; steps in the
    # prior's marginal stds (N(0, I): the values themselves).
    p_mean, p_cov = vae.prior_moments()
    p_sd = np.sqrt(np.diag(p_cov))
    z = np.tile(p_mean.astype(np.float32), (len(dims), len(values), 1))
    for r, j in enumerate(dims):
        z[r, :, j] = p_mean[j] + values * p_sd[j]
    imgs = vae.decode(z.reshape(-1, mu.shape[1])).reshape(len(dims), len(values), -1)
    moves = ("from -3 to 3, the others held at 0" if vae.config_.model.prior == "normal" else
             f"from -3 to 3 marginal standard deviations of the prior {pname} around its mean, the others at its mean")
    page.figure(s, "traversals", traversal_figure(imgs, shape, dims, values),
                f"each row moves one active latent dimension {moves} "
                f"({len(dims)} of {int((activity > threshold).sum())} active dimensions shown)")
    a, b = _two_samples(ds, rng)
    w = np.linspace(0, 1, 10)[:, None]
    path = (1 - w) * mu[a] + w * mu[b]                                       # (10, d)
    page.figure(s, "interpolation", interpolation_figure(vae.decode(path), shape, ds.X[[a, b]]),
                f"decoded points on the straight line from mu(x_{a}) to mu(x_{b})")


def _two_samples(ds, rng):
    """Two samples to interpolate between: of different labels where there are labels."""
    a = int(rng.integers(ds.n))
    if ds.y is not None:
        other = np.nonzero(ds.y != ds.y[a])[0]
        if len(other):
            return a, int(rng.choice(other))
    b = int(rng.integers(ds.n - 1))
    return a, b + (b >= a)


def _sectiontable(page, vae, ds, seed, say):
    say("feature plots")
    s = page.section("features", "Reconstructions and samples, feature by feature")
    names = ds.feature_names or [f"x{j}" for j in range(ds.p)]
    rec = vae.reconstruct(ds.X, seed=seed)
    page.figure(s, "feature_reconstruction", feature_reconstruction_figure(ds.X, rec, names),
                "true against reconstructed value (decoder mean at z = mu(x)), in data units"
                + (f"; first 12 of {ds.p} features" if ds.p > 12 else ""))
    gen = vae.generate(min(ds.n, 1000), seed=seed)
    page.figure(s, "scatter_matrix", scatter_matrix_figure(ds.X, names, gen),
                "data against decoder means of draws from the prior"
                + (f"; first 4 of {ds.p} features" if ds.p > 4 else ""))
    cols = list(range(min(ds.p, 8)))
    rows = []
    for i in range(min(ds.n, 5)):
        rows.append([f"{i} input"] + [float(ds.X[i, j]) for j in cols])
        rows.append([f"{i} recon."] + [float(rec[i, j]) for j in cols])
    s.body.append("<h3>First samples and their reconstructions</h3>" + table(rows, ["sample"] + [names[j] for j in cols]))


def _section_latent_map(page, vae, ds, post, activity, order, dims, n_ellipses, rng, numbers, say):
    s = page.section("latent-map", "The latent map")
    mu, sigma = post.mu, post.sigma                                          # (n, d)
    d = mu.shape[1]
    if dims is None:
        if d < 2:
            s.skipped = "the model has a single latent dimension"
            return
        dims = (int(order[0]), int(order[1]))
    dims = tuple(int(j) for j in dims)
    say("latent map")
    k = min(n_ellipses, ds.n)
    idx = np.sort(rng.choice(ds.n, k, replace=False))
    numbers["latent_map_dims"] = list(dims)
    # full covariance: the ellipses of the 2x2 blocks of L L^T (n, d, d); a mixture prior: its density
    cov = post.cov if post.scale_tril is not None else None
    prior = prior_overlay(vae, dims, mu) if vae.config_.model.prior != "normal" else None
    page.figure(s, "latent_map", latent_map_figure(mu, sigma, dims, ds.y, idx, ds.label_names,
                                                   note=f"{k} samples with ellipses", cov=cov, prior=prior),
                f"every sample's posterior mean in z{dims[0]}, z{dims[1]} (activity Var mu "
                f"{activity[dims[0]]:.3g} and {activity[dims[1]]:.3g})"
                + ("; coloured by label" if ds.y is not None else "")
                + ("; ellipses from the full covariance of q(z|x)" if cov is not None else "")
                + (f"; shaded: the prior {prior['name']}'s density of (z{dims[0]}, z{dims[1]}), the mixture of its "
                   f"components' 2-d marginals, dashed where it encloses 39% and 86% of the prior's mass (as "
                   f"a Gaussian's 1σ and 2σ ellipses)" if prior is not None else ""))


def _section_point_cloud(page, vae, ds, mu, order, n_cloud, cloud_samples, rng, seed, numbers, say):
    s = page.section("point-cloud", "Point clouds of a few samples")
    d = mu.shape[1]
    idx = np.sort(rng.choice(ds.n, min(n_cloud, ds.n), replace=False))
    dims = (int(order[0]), int(order[1])) if d >= 2 else (0, 0)
    say("point clouds")
    chk = vae.check(ds.X, indices=idx, n_samples=cloud_samples, seed=seed, level=0.01)
    names = [f"sample {i}" + (f" (label {ds.label_of(i)})" if ds.y is not None else "") for i in idx]
    cov = vae.encode(ds.X[idx], seed=seed).cov if vae.config_.model.posterior == "full" else None  # (k, d, d)
    page.figure(s, "point_cloud", point_cloud_figure(chk.z, chk.mu, chk.sigma, chk.emp_mean, chk.emp_std, dims, names,
                                                     cov=cov),
                f"{chk.n_samples} reparameterized draws z = mu(x) + sigma(x)·eps for each of {len(idx)} samples "
                f"in z{dims[0]}, z{dims[1]}: the encoder's ellipse against the draws' empirical mean and std")
    verdict = "passed" if chk.passed else "FAILED"
    s.body.append(f"<p><b>check {verdict}</b>: the draws follow N(mu(x), sigma(x)²) in all {d} dimensions "
                  f"(p = {chk.p_value:.3g}, level {chk.level:g}; Bonferroni over a KS test of the standardized "
                  f"draws (p = {chk.ks_p:.3g}), a chi-square test of the means (p = {chk.mean_p:.3g}) and of the "
                  f"variances (p = {chk.var_p:.3g})).</p>")
    rows = [[names[r], float(np.abs(chk.mean_z[r]).max()), float(chk.std_ratio[r].min()),
             float(chk.std_ratio[r].max())] for r in range(len(idx))]
    s.body.append(table(rows, ["sample", "max |mean - mu| / (σ/√S)", "min sd/σ", "max sd/σ"]))
    s.body.append(f'<p class="muted">Under the claim the standardized mean errors are N(0, 1) and sd/σ lies '
                  f'within about 1 ± {3 / np.sqrt(2 * chk.n_samples):.2f}. Run <code>vaelens check</code> for more '
                  f'samples and draws.</p>')
    numbers["point_cloud"] = chk.to_dict()
    return idx


def _section_true_posterior(page, vae, ds, order, idx, gap, seed, numbers, say):
    """p(z|x)'s importance-weighted cloud beside the encoder's q and q* for the point-cloud samples."""
    s = page.section("true-posterior", "The true posterior against the encoder's Gaussian")
    if not gap:
        s.skipped = "turned off (report --no-gap)"
        return
    say("true posterior")
    dims = (int(order[0]), int(order[1])) if len(order) >= 2 else (0, 0)
    X = ds.X[idx]
    # the same rows, k, seed and steps: q* and the weights are the ones the gaps are computed with
    g = vae.inference_gaps(X, k=GAP_K, steps=GAP_STEPS, seed=seed)
    c = vae.posterior_cloud(X, k=GAP_K, seed=seed, refine=GAP_STEPS)
    tp = g.posterior
    names = [f"sample {i}" + (f" (label {ds.label_of(i)})" if ds.y is not None else "") for i in idx]
    notes = [f"ESS {tp.ess[r]:.0f} of {GAP_K}, Pareto k {tp.pareto_k[r]:.2f}{'' if tp.reliable[r] else ' (!)'}\n"
             f"gap approx. {g.approximation_gap[r]:.2f}±{g.approximation_gap_se[r]:.2f}, "
             f"amort. {g.amortization_gap[r]:.2f}±{g.amortization_gap_se[r]:.2f}" for r in range(len(idx))]
    cov = vae.encode(X, seed=seed).cov if vae.config_.model.posterior == "full" else None  # (k, d, d)
    page.figure(s, "true_posterior", true_posterior_figure(c.z, c.weights, c.mu, c.sigma, g.mu_opt, g.sigma_opt,
                                                           tp.mean, dims, names, notes, cov=cov),
                f"{GAP_K} draws from q* ({GAP_STEPS} Adam steps from the encoder) per sample in z{dims[0]}, "
                f"z{dims[1]}, sized and shaded by their self-normalized importance weight p(x, z) / q*(z): "
                f"the model's own posterior p(z|x). Red: the encoder's mu ± 1σ, 2σ; green: q*, the best "
                f"diagonal Gaussian for this x alone; x: E_p[z]. (!) marks an unreliable estimate "
                f"(ESS < {MIN_ESS:g} or Pareto k > {PARETO_K_MAX:g}).")
    rows = [[names[r], float(tp.ess[r]), float(tp.pareto_k[r]), "yes" if tp.reliable[r] else "no",
             float(tp.distance[r].max()), float(tp.std_ratio[r].min()), float(tp.std_ratio[r].max()),
             float(g.approximation_gap[r]), float(g.amortization_gap[r])] for r in range(len(idx))]
    s.body.append(table(rows, ["sample", "ESS", "Pareto k", "reliable", "max |mu - E_p| / Std_p",
                                "min σ / Std_p", "max σ / Std_p", "approx. gap (nats)", "amort. gap (nats)"]))
    s.body.append('<p class="muted">The gaps (Cremer et al. 2018): log p(x) - L[q*] (no diagonal Gaussian is '
                  'p(z|x)) and L[q*] - L[q] (one encoder for every x). Run <code>vaelens gap</code> for more '
                  'samples.</p>')
    numbers["true_posterior"] = {"indices": idx, "dims": list(dims), "k": GAP_K, "steps": GAP_STEPS, "seed": seed,
                                 "mean": tp.mean, "std": tp.std, "ess": tp.ess, "pareto_k": tp.pareto_k,
                                 "reliable": tp.reliable, "mu": tp.mu, "sigma": tp.sigma, "mu_opt": g.mu_opt,
                                 "sigma_opt": g.sigma_opt, "gaps": g.to_dict(),
                                 "approximation_gap": g.approximation_gap, "amortization_gap": g.amortization_gap}


def _section_aggregate(page, vae, mu, sigma, numbers, say):
    s = page.section("aggregate", "The aggregate posterior against the prior")
    say("aggregate posterior")
    agg = aggregate_posterior(mu, sigma)
    numbers["aggregate"] = agg.to_dict()
    if vae.config_.model.prior != "normal":
        return _aggregate_against_mixture(s, page, vae, mu, sigma, agg, numbers)
    page.figure(s, "variance_split", variance_split_figure(agg.between, agg.within),
                "Var z_j = Var_x mu_j(x) (what tells samples apart) + E_x sigma_j(x)² (each sample's own "
                "uncertainty); the prior asks for 1")
    page.figure(s, "aggregate_posterior", aggregate_posterior_figure(mu, sigma),
                "the mixture of every sample's N(mu, sigma²) against N(0, 1), per dimension")
    rows = [[f"z{j}", float(agg.mean[j]), float(agg.between[j]), float(agg.within[j]), float(agg.total[j]),
             float(agg.share_between[j]), float(agg.kl_dim[j]), "yes" if agg.active[j] else "no"]
            for j in range(len(agg.mean))]
    s.body.append(table(rows, ["dim", "mean", "between (Var mu)", "within (E σ²)", "total", "share between",
                                "KL moment-matched", "active"]))
    s.body.append(f'<p class="muted">KL(N(mean, cov) || N(0, I)) = {agg.kl_moment_matched:.4g} nats, a lower bound on '
                  f'KL(q(z) || p(z)); the ELBO\'s KL term averaged over the samples is {agg.mean_kl:.4g} nats.</p>')


def _aggregate_against_mixture(s, page, vae, mu, sigma, agg, numbers):
    """The aggregate posterior's moments and marginals against a mixture prior's (MoG, VampPrior).

    The N(0, I) figures of `aggregate_posterior` (its moment-matched KL, the ELBO's KL against N(0, I))
    do not apply, so they are not shown; the prior's mean and marginal variance are.
    """
    name = prior_name(vae.config_.model)
    p_mean, p_cov = vae.prior_moments()
    p_var = np.diag(p_cov)
    w, m, C = prior_mixture(vae)                                             # (K,), (K, d), (K, d, d)
    comps = (w, m, np.sqrt(np.diagonal(C, axis1=1, axis2=2)))                # each component's marginal stds (K, d)
    page.figure(s, "variance_split", variance_split_figure(agg.between, agg.within, prior_var=p_var),
                f"Var z_j = Var_x mu_j(x) (what tells samples apart) + E_x sigma_j(x)² (each sample's own "
                f"uncertainty); dashed: the prior {name}'s marginal variance")
    page.figure(s, "aggregate_posterior", aggregate_posterior_figure(mu, sigma, prior=comps, prior_name=name),
                f"the mixture of every sample's N(mu, sigma²) against the prior {name}'s marginal p(z_j) (the "
                f"mixture of its components' marginals), per dimension")
    rows = [[f"z{j}", float(agg.mean[j]), float(p_mean[j]), float(agg.between[j]), float(agg.within[j]),
             float(agg.total[j]), float(p_var[j]), float(agg.share_between[j]), "yes" if agg.active[j] else "no"]
            for j in range(len(agg.mean))]
    s.body.append(table(rows, ["dim", "mean", "prior mean", "between (Var mu)", "within (E σ²)", "total",
                                "prior variance", "share between", "active"]))
    s.body.append(f'<p class="muted">The prior is {html.escape(name)}: the aggregate posterior q(z) should match its '
                  f'moments (VAE.prior_moments) and marginals. Run <code>vaelens posterior</code> for '
                  f'KL(q(z) || p(z)).</p>')
    numbers["aggregate"].update(prior_mean=p_mean, prior_var=p_var)


def _section_compare(page, run_dir, posterior, raw_X, compare_runs, seed, numbers, say):
    """Agreement of this run's mu with other runs' on the same rows; `posterior` is this run's (mu, sigma)."""
    s = page.section("compare", "Agreement across seeds")
    if not compare_runs:
        s.skipped = "no other runs given (vaelens report RUN --compare RUN2 RUN3 ...)"
        return
    say("comparing runs")
    runs = [Path(run_dir)] + [Path(r) for r in compare_runs]
    # each run sees the rows through its own data path with the report's seed: binarized runs get the same bits
    others = [VAE.load(r).encode(raw_X, seed=seed) for r in runs[1:]]
    posts = [tuple(posterior)] + [(p.mu, p.sigma) for p in others]
    names = [r.name if r.name not in ("", ".") else str(r) for r in runs]
    k = len(runs)
    mcc = np.eye(k)
    pairs = []
    for a in range(k):
        for b in range(a + 1, k):
            c = compare(posts[a][0], posts[b][0], posts[a][1], posts[b][1], seed=seed)
            mcc[a, b] = mcc[b, a] = c.mcc_pearson
            pairs.append((f"{names[a]} vs {names[b]}", c))
    page.figure(s, "compare_runs", heatmap_figure(mcc, names, names, "mean matched |correlation| (MCC) of mu",
                                                  cbar_label="MCC"),
                "active latent dimensions of two runs matched one-to-one (Hungarian method on half the samples, "
                "scored on the other half), |correlation| averaged")
    width = max((len(c.corr) for _, c in pairs), default=0)
    if width:
        M = np.full((len(pairs), width), np.nan)
        for r, (_, c) in enumerate(pairs):
            M[r, :len(c.corr)] = np.sort(np.abs(c.corr))[::-1]
        page.figure(s, "compare_matched", heatmap_figure(M, [n for n, _ in pairs], [f"#{i + 1}" for i in range(width)],
                                                         "matched |correlation| per latent pair (best first)",
                                                         cbar_label="|corr|"),
                    "one row per pair of runs; blank cells: fewer active dimensions in that pair")
    rows = [[n, c.mcc_pearson, c.mcc_spearman, c.cka, min(c.r2_ab, c.r2_ba), c.verdict()] for n, c in pairs]
    s.body.append(table(rows, ["runs", "MCC (Pearson)", "MCC (Spearman)", "linear CKA", "linear R² (min)",
                                "verdict"]))
    numbers["compare"] = {"runs": [str(r) for r in runs], "mcc": mcc,
                          "pairs": {n: c.to_dict() for n, c in pairs}}
