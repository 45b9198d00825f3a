"""Run configuration: frozen dataclasses with a strict JSON round trip.

Standard library only, so that a run directory's `config.json` can be read and
validated before torch is imported. Unknown keys, wrong types and out-of-range
values are rejected with the key's full dotted name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from .errors import ConfigError
from .safeio import parse_json

CONFIG_VERSION = 1

LIKELIHOODS = ("bernoulli", "cbernoulli", "gaussian")
GAUSSIAN_SCALES = ("fixed", "shared", "per_feature")
ARCHS = ("mlp", "conv")
ACTIVATIONS = ("relu", "tanh", "elu", "gelu", "silu", "softplus", "leaky_relu")
OBJECTIVES = ("elbo", "iwae")
POSTERIORS = ("diagonal", "full")
PRIORS = ("normal", "mog", "vamp")
# Components when --prior-components is not given: a mixture of 10 Gaussians; a VampPrior of 100
# pseudo-inputs (Tomczak & Welling 2018 use 500 on MNIST; 100 keeps the prior's encoder pass cheap
# on small tables). Stated in --help and docs/posterior.md.
DEFAULT_COMPONENTS = {"mog": 10, "vamp": 100}
MAX_COMPONENTS = 100_000
MAX_FULL_LATENT = 4096       # a full covariance has d(d+1)/2 entries per sample
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "exponential", "plateau")
BINARIZE = ("none", "static", "dynamic")
DEVICES = ("auto", "cpu", "cuda")
STREAM = ("auto", "on", "off")
MAX_BLOCK_ROWS = 10 ** 7
MISSING = ("error", "drop")
MISSING_LABEL = ("error", "drop", "keep")
LABEL_KINDS = ("int", "float", "str")
# Defaults of the inspection commands' options. They live here, with every other option, so that the
# CLI builds its parsers without importing torch (`vaelens --help` stays instant).
GAP_K = 1000              # importance samples per x for E_p[z], Std_p[z] and log p(x)
GAP_REFINE_STEPS = 300    # Adam steps for q*
GAP_REFINE_LR = 1e-2      # Adam's initial learning rate for q*'s mean and log-std
GAP_REFINE_LR_END = 0.1   # the rate falls linearly to this fraction of GAP_REFINE_LR: small final steps, small jitter
# A symmetry map whose mean ELBO change is within max(3 s.e., SYMMETRY_ATOL) nats per sample counts as
# free. 3 s.e.: the change is a mean of n paired per-sample differences, so a free map exceeds it by
# Monte Carlo noise alone with probability about 0.3%. The floor: an exact symmetry changes the
# float64 ELBO by rounding (~1e-15), while the smallest real costs measured (a MoG prior's nearly
# isotropic components under rotation, a diagonal posterior whose sigmas differ by a few percent)
# are a few thousandths of a nat; 0.001 nats per sample (1 nat per 1000 samples) keeps those
# apart and still forgives the residue of a well-converged model whose optimum is degenerate.
SYMMETRY_ATOL = 1e-3
# Bounds on a model's shape, far beyond any VAE that fits one machine and far below what a hostile
# config.json could claim (100,000 layers, a 10^12 width): checked before anything is built. The
# total parameter count is bounded where a run is loaded (`checkpoint.MAX_PARAMETERS`).
MAX_LAYERS = 100
MAX_CONV_LAYERS = 8
MAX_WIDTH = 10 ** 6          # latent_dim, each hidden size, each conv channel count
MAX_INPUT_DIM = 10 ** 8      # features per sample (a 10,000 x 10,000 image)


def _opt(default: Any = None, help: str = "", *, choices: Optional[Tuple[str, ...]] = None, group: str = "",
         flag: Optional[str] = "", role: str = "option", api: bool = True, metavar: Optional[str] = None) -> Any:
    """A config field with what the CLI and the API need to offer it (see `options`).

    `help` is one line without the default (the CLI adds it from `default`). `flag` "" derives
    ``--field-name`` from the field's name; None keeps the field out of the command line
    (config.json and the API only). `role` is "option" (a setting the user chooses), "source"
    (where the data comes from) or "derived" (filled from the data; never user-set). `api` False
    keeps an option out of the estimator's parameters; `group` and `metavar` shape `--help`.
    """
    meta = {"help": help, "choices": choices, "group": group, "flag": flag, "role": role, "api": api,
            "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is prepared.

    `name` is a built-in set (``digits``, ``mnist``, ``fashion-mnist``) or ``file``
    with `path` naming a .npy/.npz/.csv/.parquet file.
    """

    name: str = _opt("digits", "built-in set, or 'file' with a path", flag=None, role="source")
    path: Optional[str] = _opt(None, "the data file when name is 'file'", flag=None, role="source")
    data_dir: Optional[str] = _opt(None, "folder with the MNIST/Fashion-MNIST IDX files (default $VAELENS_DATA_DIR "
                                         "or ~/.cache/vaelens)", role="source")
    key: Optional[str] = _opt(None, "array name inside an .npz file", role="source")
    columns: Optional[Tuple[str, ...]] = _opt(None, "comma-separated feature columns of a table", role="source")
    label_column: Optional[str] = _opt(None, "table column (or .npz key) with labels; kept out of the features",
                                       role="source")
    delimiter: Optional[str] = _opt(None, "the separator of a .csv/.txt table (default: sniffed among , ; tab |)",
                                    role="source", metavar="CHAR")
    missing: str = _opt("error", "missing feature values (empty, NA, NaN, ?): error names line and column; drop "
                                 "leaves those rows out (counted); nothing is filled in", choices=MISSING,
                        role="source")
    missing_label: str = _opt("error", "missing labels: error names the line; drop leaves those rows out; keep "
                                       "makes them a class of their own", choices=MISSING_LABEL, role="source")
    keep_id_columns: bool = _opt(False, "use columns that look like row identifiers (named id/index/..., or "
                                        "consecutive integers) as features; by default they are left out with a "
                                        "note", role="source")
    # Filled from the training data and saved in the run, so that later files are read by the same
    # column names and coded against the same labels (written as strings; label_kind gives their type).
    feature_columns: Optional[Tuple[str, ...]] = _opt(None, "the table columns the run was trained on (from the "
                                                            "data)", flag=None, role="derived")
    labels: Optional[Tuple[str, ...]] = _opt(None, "the label vocabulary, sorted, as written ('' for the class of "
                                                   "missing labels; from the data)", flag=None, role="derived")
    label_kind: Optional[str] = _opt(None, "int, float or str: the type of the labels (from the data)", flag=None,
                                     role="derived")
    binarize: str = _opt("none", "image binarization", choices=BINARIZE, group="preprocessing")
    standardize: bool = _opt(False, "standardize features (mean 0, std 1; saved in the run) for continuous data",
                             group="preprocessing")
    val_fraction: float = _opt(0.1, "share of the training data held out for validation", group="preprocessing")
    limit: Optional[int] = _opt(None, "use only the first N training samples", group="preprocessing", api=False,
                                metavar="N")

    def validate(self, prefix: str = "data") -> None:
        _check_choices(self, prefix)
        if self.name == "file" and not self.path:
            raise ConfigError(f"{prefix}.path: data name 'file' needs a path")
        if not (0.0 <= self.val_fraction < 1.0):
            raise ConfigError(f"{prefix}.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"{prefix}.limit must be at least 2, got {self.limit}")
        if self.delimiter is not None and len(self.delimiter) != 1 and self.delimiter not in ("\\t", "tab"):
            raise ConfigError(f"{prefix}.delimiter must be one character, got {self.delimiter!r}")
        if (self.labels is None) != (self.label_kind is None):
            raise ConfigError(f"{prefix}.labels and {prefix}.label_kind go together")
        if self.label_kind is not None:
            _choice(f"{prefix}.label_kind", self.label_kind, LABEL_KINDS)
            as_kind = {"int": int, "float": float, "str": str}[self.label_kind]
            for i, v in enumerate(self.labels):
                try:
                    as_kind(v) if v != "" else None
                except ValueError:
                    raise ConfigError(f"{prefix}.labels[{i}]: {v!r} is not a{'n' if self.label_kind == 'int' else ''} "
                                      f"{self.label_kind}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and likelihood. `input_dim` and `image_shape` are filled from the data."""

    latent_dim: int = _opt(8, "latent dimensions d", group="model", metavar="D")
    hidden: Tuple[int, ...] = _opt((256, 128), "hidden sizes, e.g. 256,128; 'none' for a linear model",
                                   group="model", metavar="SIZES")
    activation: str = _opt("relu", "hidden-layer activation", choices=ACTIVATIONS, group="model")
    arch: str = _opt("mlp", "mlp, or conv for images", choices=ARCHS, group="model")
    likelihood: str = _opt("bernoulli", "decoder distribution", choices=LIKELIHOODS, group="model")
    gaussian_scale: str = _opt("per_feature", "gaussian decoder scale", choices=GAUSSIAN_SCALES, group="model")
    fixed_scale: float = _opt(1.0, "gaussian scale when --gaussian-scale fixed", group="model")
    sigma_floor: float = _opt(1e-4, "smallest encoder sigma", group="model")
    posterior: str = _opt("diagonal", "family of q(z|x): diagonal Gaussian, or full covariance (a Cholesky factor "
                                      "per sample)", choices=POSTERIORS, group="model")
    prior: str = _opt("normal", "p(z): standard normal, a learned mixture of Gaussians (mog), or the VampPrior "
                                "(vamp: a mixture of the encoder's posteriors at learned pseudo-inputs)",
                      choices=PRIORS, group="model")
    prior_components: Optional[int] = _opt(None, "mixture components of --prior mog|vamp (default 10 for mog, "
                                                 "100 for vamp)", group="model", metavar="K")
    # config.json and the API only: the channel count also fixes how often the image is halved
    conv_channels: Tuple[int, ...] = _opt((32, 64), "channels of the conv encoder's layers", group="model",
                                          flag=None)
    input_dim: Optional[int] = _opt(None, "features per sample (from the data)", flag=None, role="derived")
    image_shape: Optional[Tuple[int, int]] = _opt(None, "height and width of image data (from the data)",
                                                  flag=None, role="derived")

    def validate(self, prefix: str = "model") -> None:
        if len(self.hidden) > MAX_LAYERS:
            raise ConfigError(f"{prefix}.hidden: {len(self.hidden)} layers; at most {MAX_LAYERS} are allowed")
        if len(self.conv_channels) > MAX_CONV_LAYERS:
            raise ConfigError(f"{prefix}.conv_channels: {len(self.conv_channels)} layers; at most "
                              f"{MAX_CONV_LAYERS} are allowed")
        _positive_int(f"{prefix}.latent_dim", self.latent_dim, MAX_WIDTH)
        for i, h in enumerate(self.hidden):
            _positive_int(f"{prefix}.hidden[{i}]", h, MAX_WIDTH)
        for i, c in enumerate(self.conv_channels):
            _positive_int(f"{prefix}.conv_channels[{i}]", c, MAX_WIDTH)
        _check_choices(self, prefix)
        if not self.fixed_scale > 0:
            raise ConfigError(f"{prefix}.fixed_scale must be > 0, got {self.fixed_scale}")
        if not self.sigma_floor >= 0:
            raise ConfigError(f"{prefix}.sigma_floor must be >= 0, got {self.sigma_floor}")
        if self.prior_components is not None:
            if self.prior == "normal":
                raise ConfigError(f"{prefix}.prior_components (--prior-components) needs --prior mog or vamp")
            _positive_int(f"{prefix}.prior_components (--prior-components)", self.prior_components, MAX_COMPONENTS)
        if self.posterior == "full" and self.latent_dim > MAX_FULL_LATENT:
            raise ConfigError(f"{prefix}.latent_dim: {self.latent_dim} with --posterior full; at most "
                              f"{MAX_FULL_LATENT} are allowed")
        if self.input_dim is not None:
            _positive_int(f"{prefix}.input_dim", self.input_dim, MAX_INPUT_DIM)
        if self.image_shape is not None:
            for i, v in enumerate(self.image_shape):
                _positive_int(f"{prefix}.image_shape[{i}]", v, MAX_INPUT_DIM)
        if self.arch == "conv":
            if self.image_shape is None:
                raise ConfigError(f"{prefix}.arch 'conv' needs image data (an image_shape); use --arch mlp for tables")
            h, w = self.image_shape
            k = 2 ** len(self.conv_channels)
            if h % k or w % k:
                raise ConfigError(
                    f"{prefix}.arch 'conv' halves the image {len(self.conv_channels)} times, so height and width "
                    f"must be divisible by {k}; got {h}x{w}"
                )
            if self.input_dim is not None and h * w != self.input_dim:
                raise ConfigError(f"{prefix}.image_shape {h}x{w} does not hold input_dim {self.input_dim} features")

    @property
    def components(self) -> int:
        """The prior's mixture components: 1 for the normal prior, else the given or default K."""
        if self.prior == "normal":
            return 1
        return self.prior_components if self.prior_components is not None else DEFAULT_COMPONENTS[self.prior]

    @property
    def factorized(self) -> bool:
        """Whether KL(q(z|x) || p(z)) splits into a sum over latent dimensions (diagonal q, N(0, I) prior)."""
        return self.posterior == "diagonal" and self.prior == "normal"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, objective and stopping."""

    epochs: int = _opt(50, "epochs", group="training")
    batch_size: int = _opt(128, "global batch size", group="training")
    lr: float = _opt(1e-3, "learning rate", group="training")
    optimizer: str = _opt("adam", "optimizer", choices=OPTIMIZERS, group="training")
    weight_decay: float = _opt(0.0, "weight decay", group="training")
    schedule: str = _opt("constant", "learning-rate schedule", choices=SCHEDULES, group="training")
    lr_gamma: float = _opt(0.98, "decay factor for the exponential (per epoch) and plateau schedules",
                           group="training")
    grad_clip: Optional[float] = _opt(None, "clip the gradient norm to this value", group="training")
    objective: str = _opt("elbo", "elbo, or iwae with --iw-samples K", choices=OBJECTIVES, group="training")
    iw_samples: int = _opt(1, "K for the IWAE objective", group="training", metavar="K")
    dreg: bool = _opt(False, "IWAE: doubly reparameterized encoder gradient (Tucker et al. 2018); same bound, "
                             "lower-variance encoder updates", group="training")
    beta: float = _opt(1.0, "KL weight", group="training")
    warmup_epochs: int = _opt(0, "linear KL warm-up from 0 to beta over this many epochs", group="training")
    free_bits: float = _opt(0.0, "free bits per latent dimension, in nats", group="training")
    patience: Optional[int] = _opt(None, "early stopping after this many epochs without improvement",
                                   group="training")
    seed: int = _opt(0, "random seed", group="training")
    device: str = _opt("auto", "auto picks cuda when available", choices=DEVICES, group="training")
    bf16: bool = _opt(False, "bf16 autocast for training (CUDA, or a CPU with native bf16)", group="training")
    # How a table larger than memory is read (vaelens.stream, docs/streaming.md); the order of the rows,
    # and so the weights, depend on them, which is why they are training options saved with the run.
    stream: str = _opt("auto", "read the training data in blocks instead of loading it: auto does so for a "
                               ".npy/.parquet file, folder or glob of shards over 512 MiB as float32",
                       choices=STREAM, group="streaming")
    block_rows: int = _opt(1024, "rows per block of streamed data (the unit of shuffling, sharing among "
                                 "processes and held-out validation)", group="streaming", metavar="N")
    shuffle_window: int = _opt(32, "streamed rows are shuffled within windows of this many blocks (memory: two "
                                   "windows)", group="streaming", metavar="BLOCKS")

    def validate(self, prefix: str = "train") -> None:
        # inf and nan pass the range checks below (inf > 0; nan < 0 is False) and make training diverge
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = "--" + f.name.replace("_", "-")
                raise ConfigError(f"{prefix}.{f.name} ({flag}) must be a finite number, got {value}")
        _positive_int(f"{prefix}.epochs", self.epochs)
        _positive_int(f"{prefix}.batch_size", self.batch_size)
        _positive_int(f"{prefix}.iw_samples", self.iw_samples)
        _positive_int(f"{prefix}.block_rows", self.block_rows, MAX_BLOCK_ROWS)
        _positive_int(f"{prefix}.shuffle_window", self.shuffle_window, MAX_BLOCK_ROWS)
        if not self.lr > 0:
            raise ConfigError(f"{prefix}.lr must be > 0, got {self.lr}")
        _check_choices(self, prefix)
        if self.beta < 0:
            raise ConfigError(f"{prefix}.beta must be >= 0, got {self.beta}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"{prefix}.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.free_bits < 0:
            raise ConfigError(f"{prefix}.free_bits must be >= 0, got {self.free_bits}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"{prefix}.grad_clip must be > 0, got {self.grad_clip}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"{prefix}.patience must be >= 1, got {self.patience}")
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 < self.lr_gamma <= 1):
            raise ConfigError(f"{prefix}.lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.objective == "elbo" and self.iw_samples != 1:
            raise ConfigError(f"{prefix}.iw_samples > 1 needs objective 'iwae'")
        if self.dreg and self.objective != "iwae":
            raise ConfigError(f"{prefix}.dreg needs objective 'iwae'")


@dataclass(frozen=True)
class Transform:
    """Per-feature standardization fitted on the training data: x' = (x - mean) / std."""

    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()

    def validate(self, prefix: str = "transform") -> None:
        if len(self.mean) != len(self.std):
            raise ConfigError(f"{prefix}: mean has {len(self.mean)} entries, std {len(self.std)}")
        if any(not s > 0 for s in self.std):
            raise ConfigError(f"{prefix}.std must be > 0 everywhere")


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rebuild a model and its data pipeline."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transform: Optional[Transform] = None
    version: int = CONFIG_VERSION

    def validate(self) -> "RunConfig":
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"version: this vaelens reads config version {CONFIG_VERSION}, got {self.version}")
        self.data.validate()
        self.model.validate()
        self.train.validate()
        if self.transform is not None:
            self.transform.validate()
        if self.train.free_bits > 0 and not self.model.factorized:
            # free bits floor each dimension's KL; with a full covariance or a mixture prior the KL
            # does not split over dimensions, so there is no per-dimension KL to floor
            raise ConfigError(f"train.free_bits (--free-bits) needs a KL that splits over latent dimensions "
                              f"(--posterior diagonal with --prior normal); this run has --posterior "
                              f"{self.model.posterior} and --prior {self.model.prior}: use --warmup-epochs instead")
        return self

    def replace(self, **sections: Any) -> "RunConfig":
        """Return a copy with whole sections or section fields replaced.

        ``cfg.replace(train={"epochs": 3})`` updates one field of a section.
        """
        kwargs = {}
        for name, value in sections.items():
            if isinstance(value, dict):
                value = dataclasses.replace(getattr(self, name), **value)
            kwargs[name] = value
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        return _to_jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> "RunConfig":
        cfg = _from_dict(cls, d, source)
        return cfg.validate()

    @classmethod
    def from_json(cls, text: str, source: str = "config.json") -> "RunConfig":
        # strict: no NaN or Infinity, no duplicate keys; deep nesting and huge integers are one ConfigError
        return cls.from_dict(parse_json(text, source, ConfigError), source)


# --- options: what a user can set, for the command line and the API ----------------------------

# Defaults that depend on the built-in data set, applied where neither a flag nor a --config gave
# the value. Keys are "section.field"; the help of each flag lists them beside the plain default.
# "file" is any data file (a user's table): small tables overfit the built-in sets' defaults within tens
# of epochs, so a file trains until its validation loss stops improving (benchmarks/tables.py measures
# these against factor analysis; docs/benchmarks.md).
DATASET_DEFAULTS = {
    "file": {"train.epochs": 3000, "train.patience": 100, "train.batch_size": 32, "train.optimizer": "adamw",
             "train.weight_decay": 0.01, "model.hidden": (128,), "model.latent_dim": 32},
    "digits": {"train.epochs": 200},
    "mnist": {"train.epochs": 50, "data.binarize": "dynamic"},
    "fashion-mnist": {"train.epochs": 50},
}


@dataclass(frozen=True)
class Option:
    """One field of a config section, as `options` describes it.

    section : "data", "model" or "train" (the `RunConfig` attribute)
    name : the field's name (and the keyword of `dataclasses.replace` / `RunConfig.replace`)
    type : the resolved annotation, e.g. ``int``, ``Optional[float]``, ``Tuple[int, ...]``
    default : the dataclass default (data-set defaults: `dataset_defaults`)
    help : one line for a flag's help or a docstring's parameter list, without the default
    choices : the allowed strings, or None
    flag : the `vaelens train` flag, e.g. ``--latent-dim``; None: config.json and the API only
    role : "option" (a setting), "source" (where the data comes from), "derived" (filled from the data)
    api : whether the estimator should offer it as a parameter (False for data.limit: an estimator is
        given its rows)
    """

    section: str
    name: str
    type: Any
    default: Any
    help: str
    choices: Optional[Tuple[str, ...]]
    flag: Optional[str]
    role: str
    api: bool
    group: str = ""
    metavar: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def options(section: Optional[str] = None, role: Optional[str] = "option") -> Tuple[Option, ...]:
    """The user-settable fields of the run configuration, in declaration order: the one source of
    every option's type, default, help, choices and flag.

    ``options()`` lists the settings (role "option") of the data, model and train sections;
    ``options("model")`` one section; ``role=None`` every field, data source and derived ones too.
    The `vaelens train` parser is generated from it, and the estimator's parameters can be:
    ``{o.name: o.default for o in options() if o.api}``.
    """
    sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
    if section is not None and section not in sections:
        raise ValueError(f"no config section {section!r}; sections are {', '.join(sections)}")
    found = []
    for sec, cls in sections.items():
        if section is not None and sec != section:
            continue
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            if role is not None and m.get("role") != role:
                continue
            flag = m.get("flag")
            found.append(Option(section=sec, name=f.name, type=hints[f.name], default=f.default,
                                help=m.get("help", ""), choices=m.get("choices"),
                                flag="--" + f.name.replace("_", "-") if flag == "" else flag,
                                role=m.get("role", "option"), api=m.get("api", True), group=m.get("group", ""),
                                metavar=m.get("metavar")))
    return tuple(found)


def dataset_defaults(name: Optional[str]) -> dict:
    """{section: {field: value}} of the data set's own defaults (`DATASET_DEFAULTS`; "file" for data files)."""
    out: dict = {"data": {}, "model": {}, "train": {}}
    for key, value in DATASET_DEFAULTS.get(name or "", {}).items():
        sec, fname = key.split(".")
        out[sec][fname] = value
    return out


# --- helpers -------------------------------------------------------------------------------

def _check_choices(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        if f.metadata.get("choices"):
            _choice(f"{prefix}.{f.name}", getattr(obj, f.name), f.metadata["choices"])


def _choice(key: str, value: Any, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _positive_int(key: str, value: Any, most: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {_short(value)}")
    if most is not None and value > most:
        raise ConfigError(f"{key} must be at most {most:,}, got {_short(value)}")


def _short(value: Any) -> str:
    """repr of a value, cut to one readable line (a hostile file may hold a 4,000-digit integer)."""
    if isinstance(value, int) and abs(value) >= 10 ** 30:
        return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "transform": Transform}


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    # the annotations are strings (`from __future__ import annotations`); this resolves them
    return typing.get_type_hints(cls)


def _from_dict(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in d.items():
        key = f"{where}.{name}" if where != "config" else name
        if name in _SECTIONS and cls is RunConfig:
            kwargs[name] = None if value is None and name == "transform" else _from_dict(_SECTIONS[name], value, key)
            continue
        kwargs[name] = _coerce(key, hints[name], value)
    return cls(**kwargs)


def _coerce(key: str, typ: Any, value: Any) -> Any:
    """Check a JSON value against a resolved annotation; lists become tuples.

    Handles ``X``, ``Optional[X]`` / ``X | None``, ``Tuple[X, ...]`` and fixed ``Tuple[X, Y]`` for
    the scalar types bool, int, float and str.
    """
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or origin is types.UnionType:
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        if len(inner) != 1:
            raise ConfigError(f"{key}: unsupported field type {typ}")  # a bug in this module, not user input
        return _coerce(key, inner[0], value)
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            elems = [args[0]] * len(value)
        else:
            elems = list(args)
            if len(value) != len(elems):
                raise ConfigError(f"{key}: expected a list of {len(elems)}, got {len(value)} entries")
        return tuple(_coerce(f"{key}[{i}]", t, v) for i, (t, v) in enumerate(zip(elems, value)))
    return _scalar(key, typ, value)


def _scalar(key: str, typ: Any, value: Any) -> Any:
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_short(value)}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"{key}: {_short(value)} is out of range") from None
        if not math.isfinite(value):  # 1e999 parses as inf
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        return value
    raise ConfigError(f"{key}: unsupported field type {typ}")  # a bug in this module, not user input
