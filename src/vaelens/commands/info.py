"""`vaelens info`: a run's configuration and results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..io import to_json
from . import _common as common
from .render import Result

NAME = "info"


def prior_text(m) -> str:
    """The prior of a ModelConfig in words: the one description `info`, `posterior` and `evaluate` print."""
    if m.prior == "mog":
        return f"a mixture of {m.components} Gaussians (mog, learned weights, means and scales)"
    if m.prior == "vamp":
        return f"the VampPrior ({m.components} learned pseudo-inputs)"
    return "N(0, I)"


def family_text(m) -> str:
    """The posterior family and the prior of a ModelConfig in words."""
    family = "full-covariance Gaussian (Cholesky factor)" if m.posterior == "full" else "diagonal Gaussian"
    return f"q(z|x) {family}, p(z) {prior_text(m)}"


def add_parser(subparsers):
    p = common.add_parser(subparsers, NAME, help="show a run's configuration and results",
                          epilog="example:\n  vaelens info runs/digits-...\n")
    p.add_argument("run", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


@dataclass
class InfoResult(Result):
    run: Path
    config: RunConfig
    summary: dict
    metrics: list
    as_json: bool = False

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "summary": self.summary, "epochs_logged": len(self.metrics)}

    def lines(self):
        if self.as_json:
            return [to_json(self.to_dict()).rstrip("\n")]
        m, t, d = self.config.model, self.config.train, self.config.data
        out = [f"run {self.run}",
               f"  data     {d.path if d.name == 'file' else d.name}  binarize={d.binarize} "
               f"standardize={d.standardize}",
               f"  model    {m.arch} {m.input_dim}-{'-'.join(map(str, m.hidden)) or '(linear)'}-{m.latent_dim}  "
               f"likelihood={m.likelihood}{'/' + m.gaussian_scale if m.likelihood == 'gaussian' else ''}  "
               f"activation={m.activation}",
               f"  latent   d={m.latent_dim}: {family_text(m)}",
               f"  training {t.objective}{'(K=%d)' % t.iw_samples if t.objective == 'iwae' else ''}"
               f"{' DReG' if t.dreg else ''} {t.optimizer} "
               f"lr={t.lr:g} batch={t.batch_size} epochs={t.epochs} beta={t.beta:g} seed={t.seed}"]
        if self.metrics:
            last = self.metrics[-1]
            out.append(f"  logged   {len(self.metrics)} epochs; last train -ELBO {last['train_loss']:.3f}"
                       + (f", validation -ELBO {last['val_loss']:.3f}" if "val_loss" in last else ""))
        key = "best_val_loss" if "best_val_loss" in self.summary else "best_train_loss"
        if key in self.summary:
            out.append(f"  best     epoch {self.summary.get('best_epoch')}: {self.summary[key]:.3f} nats")
        return out


def run(args) -> InfoResult:
    from .. import checkpoint as ck

    cfg, _ = ck.load_model(args.run)  # reads every file the run needs, so a damaged one is reported here
    return InfoResult(args.run, cfg, ck.read_summary(args.run) or {}, ck.read_metrics(args.run), args.json)
