"""`vaelens serve`: a local web page that explores a trained model's latent space.

Two layers. `Explorer` computes everything the page shows with the `VAE` estimator
(numpy in, numpy out, no web code): every sample's posterior, one sample's input and
reconstruction, reparameterized draws with their running statistics, decoding any z, and
the aggregate posterior against the prior. `create_app` wraps it in a FastAPI app with a
small JSON API and the page's three static files. Starting and stopping the server (and
printing the address) is the CLI's job.

fastapi and uvicorn are optional (``pip install 'vaelens[serve]'``), so they are imported
inside `create_app`; this module imports without them.

JSON API (every error is a 4xx with ``{"error": "<one line>"}``)::

    GET  /api/info              model and data description
    GET  /api/map               mu, sigma and label of every sample (a seeded subsample of large sets)
    GET  /api/map_cov?x=i&y=j   the map's samples' 2x2 covariance blocks for dims (i, j) (full covariance)
    GET  /api/prior?x=i&y=j     the prior's 2-d marginal density over dims (i, j) on a grid, with contour levels
    GET  /api/sample/{index}    one sample: input, reconstruction, mu, sigma (and cov for a full run)
    POST /api/draw              {"index", "n", "offset", "seed"}: n reparameterized z, running mean/std (/cov)
    POST /api/decode            {"z": [d numbers]}: the decoder's mean for z, in data units
    POST /api/true_posterior    {"index", "k", "seed"}: p(z|x)'s importance-weighted draws beside q and q*
    GET  /api/aggregate         per dimension: aggregate posterior vs the prior's marginal
"""

import functools
from importlib import resources
from typing import Any, Optional

import numpy as np
import torch
from torch.distributions import Normal, kl_divergence

from .api import VAE
from .data import Dataset
from .errors import DataError, VaelensError
from .evaluate import active_units
from .latentview import blocks, prior_density_1d, prior_marginal_moments, prior_name, prior_overlay
from .posterior import aggregate_posterior
from .webguard import Guard

# Large data sets are shown as a seeded subsample: a browser draws 5000 points smoothly.
MAX_MAP_POINTS = 5000
# Each (sample, seed) has one fixed stream of this many reparameterized draws; `offset`
# walks along it, so batches never repeat and the running statistics are reproducible.
MAX_DRAWS = 10000
MAX_BATCH = 1000
# Latent coordinates beyond this are far outside any trained posterior or the prior N(0, 1);
# the bound keeps decoder outputs finite.
Z_LIMIT = 1e4
# Points of the density grid for the aggregate-posterior plot, and samples in the mixture.
DENSITY_GRID = 121
DENSITY_SAMPLES = 2000
# The prior's 2-d density over the shown pair (mixture priors): a grid fine enough for smooth contours
# at a screen's size, small enough for a ~100 kB answer.
PRIOR_GRID = 101
# The true-posterior panel: k importance draws from q* after CLOUD_STEPS Adam steps, for one sample.
# Bounded so that one request is well under a second on CPU for the models vaelens trains.
MAX_CLOUD_K = 2000
CLOUD_K = 1000
CLOUD_STEPS = 100
DIGITS = 5  # decimals in JSON: plenty for a screen, and 3x smaller responses

STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


class ApiError(VaelensError):
    """A request the API refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def require_deps() -> None:
    """Raise a `VaelensError` naming the install command when fastapi or uvicorn is missing."""
    missing = []
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise VaelensError(f"vaelens serve needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
                           f" not installed: pip install 'vaelens[serve]'")


def _js(a) -> Any:
    """A numpy array or scalar as JSON-ready lists of rounded Python floats."""
    return np.round(np.asarray(a, dtype=np.float64), DIGITS).tolist()


class Explorer:
    """The numbers behind the page, for one model and one data set.

    Everything that does not depend on a request (the posterior of every sample, the map
    subsample, the aggregate posterior) is computed once here, so each request is a few
    small tensor operations on a model that stays loaded.

    Parameters
    ----------
    vae : VAE
        A fitted or loaded estimator.
    dataset : Dataset
        Data in the run's own units, X of shape (n, p).
    max_points : int
        Sets larger than this are shown on the map as a seeded subsample of this size.
    seed : int
        Seed of that subsample and, for a binarized run, of the one binarization of the data that
        every answer uses (`VAE.binarize_input`): the page shows the bits the model encodes, and a
        sample's draws come from the same bits as its mu and sigma.
    """

    def __init__(self, vae: VAE, dataset: Dataset, max_points: int = MAX_MAP_POINTS, seed: int = 0):
        if max_points < 1:
            raise VaelensError(f"max_points must be >= 1, got {max_points}")
        self.vae = vae
        self.dataset = dataset
        self.d = vae.latent_dim_
        # the data as the model sees them, once: binarized runs get the same bits in every answer
        self.X = vae.binarize_input(dataset.X, seed)                            # (n, p), data units
        post = vae.encode(self.X)
        self.mu, self.sigma = post.mu, post.sigma                               # (n, d) each
        self.full = post.scale_tril is not None
        n = dataset.n
        if n > max_points:
            self.map_index = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
        else:
            self.map_index = np.arange(n)
        # a full run's Cholesky factors of the mapped samples only (m, d, d): all n could be gigabytes
        self.map_tril = post.scale_tril[self.map_index] if self.full else None
        self.value_range = (float(np.min(dataset.X)), float(np.max(dataset.X)))
        # Tables scale each feature's bar by its own range; images share one grey scale.
        self.feature_range = (dataset.X.min(0), dataset.X.max(0))                # (p,) each
        self._aggregate = self._compute_aggregate(seed)
        # the page opens on the two most active latents (Var_x mu), the pair report's latent map shows
        order = np.argsort(-active_units(self.mu)[1], kind="stable")
        self.initial_dims = [int(order[0]), int(order[1 if self.d > 1 else 0])]

    # --- validation ----------------------------------------------------------------------
    def check_index(self, index: int) -> int:
        n = self.dataset.n
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise ApiError(f"index {index!r} is out of range: the data set has samples 0..{n - 1}", status=404)
        return int(index)

    def check_z(self, z) -> np.ndarray:
        try:
            z = np.asarray(z, dtype=np.float64)
        except (TypeError, ValueError):
            raise ApiError(f"z: expected {self.d} numbers (one per latent dimension)") from None
        if z.shape != (self.d,):
            raise ApiError(f"z: expected {self.d} numbers (one per latent dimension), got shape {z.shape}")
        if not np.isfinite(z).all():
            raise ApiError("z: contains NaN or infinite values")
        if np.abs(z).max() > Z_LIMIT:
            raise ApiError(f"z: coordinates must lie within ±{Z_LIMIT:g}")
        return z

    def check_pair(self, x: int, y: int) -> tuple:
        for name, j in (("x", x), ("y", y)):
            if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not 0 <= j < self.d:
                raise ApiError(f"{name} must be a latent dimension in 0..{self.d - 1}, got {j!r}")
        if x == y:
            raise ApiError(f"x and y must be two different latent dimensions, got {x} twice")
        return int(x), int(y)

    def _cov(self, index: int) -> Optional[list]:
        """Sample `index`'s full covariance L L^T (d, d) for a full run, else None (it is diag(sigma^2))."""
        return _js(self.vae.encode(self.X[index:index + 1]).cov[0]) if self.full else None

    # --- answers -------------------------------------------------------------------------
    def info(self) -> dict:
        cfg, ds = self.vae.config_, self.dataset
        labels = None if ds.y is None else np.unique(ds.y)
        names = None
        if labels is not None:
            names = [ds.label_names[int(v)] if ds.label_names and 0 <= int(v) < len(ds.label_names) else str(int(v))
                     for v in labels]
        return {
            "data": ds.name,
            "n": ds.n,
            "p": ds.p,
            "image_shape": list(ds.image_shape) if ds.image_shape else None,
            "feature_names": list(ds.feature_names) if ds.feature_names else [f"x{j}" for j in range(ds.p)],
            "labels": None if labels is None else [int(v) for v in labels],
            "label_names": names,
            "latent_dim": self.d,
            "initial_dims": self.initial_dims,
            "likelihood": cfg.model.likelihood,
            "posterior": cfg.model.posterior,
            "prior": cfg.model.prior,
            "prior_components": cfg.model.components,
            "prior_name": prior_name(cfg.model),
            "binarized": self.vae.binarized_,
            "arch": cfg.model.arch,
            "hidden": list(cfg.model.hidden),
            "value_range": list(self.value_range),
            "feature_min": None if ds.image_shape else _js(self.feature_range[0]),
            "feature_max": None if ds.image_shape else _js(self.feature_range[1]),
            "map_points": int(len(self.map_index)),
            "limits": {"max_batch": MAX_BATCH, "max_draws": MAX_DRAWS, "z_limit": Z_LIMIT,
                       "max_cloud_k": MAX_CLOUD_K, "cloud_k": CLOUD_K},
        }

    def latent_map(self) -> dict:
        """mu and sigma (m, d) of the map's samples, their dataset indices (m,) and labels (m,)."""
        idx = self.map_index
        y = self.dataset.y
        return {
            "index": idx.tolist(),
            "mu": _js(self.mu[idx]),
            "sigma": _js(self.sigma[idx]),
            "label": None if y is None else [int(v) for v in y[idx]],
        }

    @functools.lru_cache(maxsize=64)
    def map_cov(self, x: int, y: int) -> dict:
        """The map's samples' 2x2 covariance blocks for dims (x, y) as rows [var_x, cov_xy, var_y] (m, 3):
        from L L^T for a full run, (sigma_x^2, 0, sigma_y^2) for a diagonal one."""
        x, y = self.check_pair(x, y)
        if self.full:
            B = blocks(self.map_tril @ np.swapaxes(self.map_tril, -1, -2), (x, y))  # (m, 2, 2)
            rows = np.stack([B[:, 0, 0], B[:, 0, 1], B[:, 1, 1]], 1)
        else:
            s = self.sigma[self.map_index].astype(np.float64)
            rows = np.stack([s[:, x] ** 2, np.zeros(len(s)), s[:, y] ** 2], 1)
        return {"x": x, "y": y, "cov": _js(rows)}

    @functools.lru_cache(maxsize=64)
    def prior(self, x: int, y: int) -> dict:
        """The prior's marginal density p(z_x, z_y) on a grid u (G,) x v (G,) (rows: v), and the densities
        whose contours enclose 39% and 86% of its mass (a Gaussian's 1- and 2-sigma ellipses)."""
        x, y = self.check_pair(x, y)
        o = prior_overlay(self.vae, (x, y), self.mu[self.map_index], grid=PRIOR_GRID)
        return {"x": x, "y": y, "name": o["name"], "u": _js(o["u"]), "v": _js(o["v"]),
                "density": np.asarray(o["density"]).round(8).tolist(),  # small densities must not round to 0
                "levels": [float(v) for v in o["levels"]], "masses": [0.393, 0.865]}

    def sample(self, index: int) -> dict:
        """One sample: input x (p,), reconstruction at z = mu (p,), mu and sigma (d,)."""
        i = self.check_index(index)
        ds = self.dataset
        recon = self.vae.decode(self.mu[i:i + 1])[0]                           # (p,)
        return {
            "index": i,
            "label": None if ds.y is None else int(ds.y[i]),
            "x": _js(self.X[i]),
            "reconstruction": _js(recon),
            "mu": _js(self.mu[i]),
            "sigma": _js(self.sigma[i]),
            "cov": self._cov(i),
        }

    def draw(self, index: int, n: int, offset: int = 0, seed: int = 0) -> dict:
        """Draws ``offset .. offset+n`` of sample `index`'s z stream, and the running statistics.

        Returns z of shape (n, d) and the empirical mean and std (ddof=0) over all
        ``offset + n`` draws so far, which converge to mu(x) and sigma(x).
        """
        i = self.check_index(index)
        if not 1 <= n <= MAX_BATCH:
            raise ApiError(f"n must be between 1 and {MAX_BATCH}, got {n}")
        if offset < 0 or offset + n > MAX_DRAWS:
            raise ApiError(f"offset + n must be at most {MAX_DRAWS} draws per sample, got {offset} + {n}; "
                           f"reset the draws or pick another seed")
        z = self._stream(i, seed)                                               # (MAX_DRAWS, d)
        seen = z[:offset + n]
        return {
            "index": i,
            "offset": offset,
            "count": offset + n,
            "z": _js(z[offset:offset + n]),
            "mean": _js(seen.mean(0)),
            "std": _js(seen.std(0)),
            # a full run's draws are correlated: their running covariance (d, d), ddof=0 as std
            "cov": _js(np.cov(seen, rowvar=False, ddof=0).reshape(self.d, self.d)) if self.full else None,
        }

    @functools.lru_cache(maxsize=16)
    def _stream(self, index: int, seed: int) -> np.ndarray:
        # One seed per (seed, sample), so different samples do not share their noise.
        s = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        x = self.X[index:index + 1]
        return self.vae.sample_latent(x, MAX_DRAWS, seed=s)[:, 0, :].astype(np.float64)  # (MAX_DRAWS, d)

    def true_posterior(self, index: int, k: int = CLOUD_K, seed: int = 0) -> dict:
        """Sample `index`'s true posterior p(z|x): k draws (k, d) from q* (CLOUD_STEPS Adam steps from the
        encoder) with their normalized importance weights (k,), E_p[z] and Std_p[z], ESS and Pareto k,
        beside the encoder's mu, sigma and q*'s (d,) each: `VAE.posterior_cloud` and `VAE.true_posterior`
        on this one row with the same k, seed and steps.
        """
        i = self.check_index(index)
        if not 2 <= k <= MAX_CLOUD_K:
            raise ApiError(f"k must be between 2 and {MAX_CLOUD_K}, got {k}")
        x = self.X[i:i + 1]
        c = self.vae.posterior_cloud(x, k, seed=seed, refine=CLOUD_STEPS)
        tp = self.vae.true_posterior(x, k, seed=seed, refine=CLOUD_STEPS)
        return {
            "index": i, "k": k, "seed": seed, "steps": CLOUD_STEPS,
            "z": _js(c.z[0]), "weights": np.round(c.weights[0], 8).tolist(),   # tiny weights must not round to 0
            "mean": _js(tp.mean[0]), "std": _js(tp.std[0]), "ess": float(tp.ess[0]),
            "pareto_k": None if np.isnan(tp.pareto_k[0]) else float(tp.pareto_k[0]),
            "reliable": bool(tp.reliable[0]),
            "mu": _js(c.mu[0]), "sigma": _js(c.sigma[0]), "mu_opt": _js(c.loc[0]), "sigma_opt": _js(c.scale[0]),
            "cov": self._cov(i),  # the encoder's full covariance (d, d) for a full run
        }

    def decode(self, z) -> dict:
        """The decoder's mean for one latent point z (d,), in data units (p,)."""
        zz = self.check_z(z)
        out = self.vae.decode(zz[None].astype(np.float32))[0]                  # (p,)
        if not np.isfinite(out).all():
            raise ApiError("the decoder's output is not finite at this z; choose a point nearer the data")
        return {"z": _js(zz), "x": _js(out)}

    def aggregate(self) -> dict:
        return self._aggregate

    def _compute_aggregate(self, seed: int) -> dict:
        """Per dimension: q(z_j) = mean_i N(mu_ij, sigma_ij^2) against the prior's marginal p(z_j).

        Its variance splits into between = Var_i mu_ij (what the code carries about x) and
        within = E_i sigma_ij^2 (the noise the encoder adds); N(0, I) asks for a total of 1, a
        mixture prior for its own marginal variance (`prior_var`).
        """
        mu, sigma = self.mu.astype(np.float64), self.sigma.astype(np.float64)
        agg = aggregate_posterior(mu, sigma)
        prior = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        mixture = self.vae.config_.model.prior != "normal"
        if mixture:
            # KL(q(z_j|x) || p(z_j)) of the marginals has no closed form against a mixture: the ELBO's
            # own per-dimension view (`VAE.elbo_terms`, Monte Carlo with its seeded draw), averaged
            kl = self.vae.elbo_terms(self.X, seed=seed)["kl_dim"].mean(0)     # (d,)
        else:
            kl = kl_divergence(Normal(torch.as_tensor(mu), torch.as_tensor(sigma)), prior).mean(0).numpy()  # (d,)
        # The mixture density on a grid, from a seeded subsample: 2000 components draw the
        # curve to well within a line's width.
        rows = np.arange(len(mu))
        if len(rows) > DENSITY_SAMPLES:
            rows = np.random.default_rng(seed).choice(len(mu), DENSITY_SAMPLES, replace=False)
        lo = np.minimum(-4.0, np.quantile(mu - 3 * sigma, 0.005, axis=0))      # (d,)
        hi = np.maximum(4.0, np.quantile(mu + 3 * sigma, 0.995, axis=0))
        if mixture:  # and the prior's own mass
            p_mean, p_sd = prior_marginal_moments(self.vae)
            lo, hi = np.minimum(lo, p_mean - 4 * p_sd), np.maximum(hi, p_mean + 4 * p_sd)
        grid = torch.as_tensor(np.linspace(lo, hi, DENSITY_GRID))              # (G, d)
        components = Normal(torch.as_tensor(mu[rows]), torch.as_tensor(sigma[rows]))  # batch (m, d)
        dens = torch.stack([components.log_prob(g).exp().mean(0) for g in grid])  # (G, d), one grid row at a time
        grid, dens = grid.numpy(), dens.numpy()
        # the prior's marginal p(z_j): N(0, 1), or the mixture of a mixture prior's components' marginals
        prior_dens = prior_density_1d(self.vae, grid) if mixture else prior.log_prob(torch.as_tensor(grid)).exp().numpy()
        return {
            "prior_name": prior_name(self.vae.config_.model),
            "prior_var": _js(np.diag(self.vae.prior_moments()[1])),
            "mean": _js(agg.mean),
            "between": _js(agg.between),
            "within": _js(agg.within),
            "total": _js(agg.total),
            "share_between": _js(agg.share_between),
            "active": [bool(v) for v in agg.active],
            "kl": _js(kl),
            "grid": _js(grid.T),
            "density": _js(dens.T),
            "prior": _js(prior_dens.T),
        }


def _static(name: str) -> bytes:
    return resources.files("vaelens").joinpath("static").joinpath(name).read_bytes()


def create_app(vae: VAE, dataset: Dataset, *, max_points: int = MAX_MAP_POINTS, seed: int = 0,
               allowed_hosts: Optional[list] = None, port: Optional[int] = None):
    """The FastAPI application serving the page and the JSON API.

    Parameters
    ----------
    vae : VAE
    dataset : Dataset
        The data shown on the map, in the run's own units.
    max_points, seed : int
        Size and seed of the map's subsample for large sets; the seed also binarizes a binarized
        run's data, once (``vaelens serve --seed``, as every command).
    allowed_hosts : list of str, optional
        Host names accepted (``localhost``, ``127.0.0.1``, ``[::1]``); others get 400, so that another
        web site cannot reach the API through DNS rebinding. The CLI always passes a list (see
        `vaelens.commands.serve.allowed_hosts`); None accepts any Host.
    port : int, optional
        The bound port; when given, a Host header must carry it.

    Every request also passes `webguard.Guard`: bodies over 64 KiB are refused (413) before they
    are read, and every response carries the security headers (CSP, nosniff, frame denial).

    Returns
    -------
    fastapi.FastAPI
    """
    require_deps()
    from fastapi import FastAPI

    explorer = Explorer(vae, dataset, max_points=max_points, seed=seed)
    app = FastAPI(title="vaelens", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = explorer
    app.add_middleware(Guard, hosts=None if allowed_hosts is None else list(allowed_hosts), port=port)
    _add_error_handlers(app)
    _add_pages(app)
    _add_api(app, explorer)
    return app


def _add_error_handlers(app) -> None:
    """Every refusal answers ``{"error": "<one line>"}`` with its 4xx status."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": _describe(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError):
        return JSONResponse({"error": str(exc)}, status_code=422)


def _add_pages(app) -> None:
    """The page's static files, read once from the package only: no request ever names a file."""
    from fastapi.responses import Response

    pages = {name: (_static(name), ctype) for name, ctype in STATIC_FILES.items()}

    def page(name: str):
        body, ctype = pages[name]
        return Response(body, media_type=ctype, headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    def index():
        return page("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in pages:
            raise ApiError(f"no such file: {name}", status=404)
        return page(name)


def _add_api(app, explorer: Explorer) -> None:
    """The JSON API (see the module docstring)."""
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field

    strict = ConfigDict(extra="forbid", strict=True)
    d = explorer.d

    class DrawRequest(BaseModel):
        model_config = strict
        index: int
        n: int = 20
        offset: int = 0
        seed: int = Field(default=0, ge=0, le=2 ** 32 - 1)

    class CloudRequest(BaseModel):
        model_config = strict
        # bounded here, so a bad value is a 422 before any work: k caps the request's cost
        index: int = Field(ge=0, lt=explorer.dataset.n)
        k: int = Field(default=CLOUD_K, ge=2, le=MAX_CLOUD_K)
        seed: int = Field(default=0, ge=0, le=2 ** 32 - 1)

    class DecodeRequest(BaseModel):
        model_config = strict
        z: list[float] = Field(min_length=d, max_length=d)

    # Answers are built as plain JSON types, so they skip FastAPI's per-value encoder (a few ms
    # for one MNIST image); the answers that never change are rendered once.
    fixed = {name: JSONResponse(fn()).body for name, fn in
             (("info", explorer.info), ("map", explorer.latent_map), ("aggregate", explorer.aggregate))}

    def cached(name: str):
        return Response(fixed[name], media_type="application/json")

    @app.get("/api/info")
    def info():
        return cached("info")

    @app.get("/api/map")
    def latent_map():
        return cached("map")

    @app.get("/api/aggregate")
    def aggregate():
        return cached("aggregate")

    # computed once per pair of dimensions (the Explorer caches them); a 2-d mixture density is
    # a few ms, so the first answer for a pair is quick too
    @app.get("/api/map_cov")
    def map_cov(x: int, y: int):
        return JSONResponse(explorer.map_cov(x, y))

    @app.get("/api/prior")
    def prior(x: int, y: int):
        return JSONResponse(explorer.prior(x, y))

    @app.get("/api/sample/{index}")
    def sample(index: int):
        return JSONResponse(explorer.sample(index))

    @app.post("/api/draw")
    def draw(req: DrawRequest):
        return JSONResponse(explorer.draw(req.index, req.n, req.offset, req.seed))

    # plain def: importance sampling and q*'s Adam steps take a fraction of a second, off the event loop
    @app.post("/api/true_posterior")
    def true_posterior(req: CloudRequest):
        return JSONResponse(explorer.true_posterior(req.index, req.k, req.seed))

    # async: one decode is a millisecond of model time, less than a hop to the thread pool,
    # and the page keeps at most one decode in flight. Its body is parsed on the event loop, which
    # is safe because Guard bounds it to 64 KiB (a few ms of pydantic at most); the other endpoints
    # are plain `def`, which FastAPI runs in its thread pool.
    @app.post("/api/decode")
    async def decode(req: DecodeRequest):
        return JSONResponse(explorer.decode(req.z))


def _describe(errors) -> str:
    """pydantic's validation errors as one line: ``z.3: Input should be a finite number``."""
    parts = []
    for e in list(errors)[:3]:
        loc = [str(v) for v in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path"):  # where in the request, not a field name
            loc = loc[1:]
        where = ".".join(loc) or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif e.get("type") == "json_invalid":
            where, msg = "body", f"not valid JSON (at character {loc[-1] if loc else '?'})"
        parts.append(f"{where}: {msg}")
    more = len(list(errors)) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
