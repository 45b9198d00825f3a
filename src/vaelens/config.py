"""Run configuration: frozen dataclasses with a strict JSON round trip.

Standard library only, so that a run directory's `config.json` can be read and
validated before torch is imported. Unknown keys, wrong types and out-of-range
values are rejected with the key's full dotted name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from .errors import ConfigError

CONFIG_VERSION = 1

LIKELIHOODS = ("bernoulli", "cbernoulli", "gaussian")
GAUSSIAN_SCALES = ("fixed", "shared", "per_feature")
ARCHS = ("mlp", "conv")
ACTIVATIONS = ("relu", "tanh", "elu", "gelu", "silu", "softplus", "leaky_relu")
OBJECTIVES = ("elbo", "iwae")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "exponential", "plateau")
BINARIZE = ("none", "static", "dynamic")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is prepared.

    `name` is a built-in set (``digits``, ``mnist``, ``fashion-mnist``) or ``file``
    with `path` naming a .npy/.npz/.csv/.parquet file.
    """

    name: str = "digits"
    path: Optional[str] = None
    data_dir: Optional[str] = None
    key: Optional[str] = None  # array inside an .npz
    columns: Optional[Tuple[str, ...]] = None  # feature columns of a table
    label_column: Optional[str] = None
    binarize: str = "none"
    standardize: bool = False
    val_fraction: float = 0.1
    limit: Optional[int] = None  # use only the first `limit` training samples

    def validate(self, prefix: str = "data") -> None:
        _choice(f"{prefix}.binarize", self.binarize, BINARIZE)
        if self.name == "file" and not self.path:
            raise ConfigError(f"{prefix}.path: data name 'file' needs a path")
        if not (0.0 <= self.val_fraction < 1.0):
            raise ConfigError(f"{prefix}.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"{prefix}.limit must be at least 2, got {self.limit}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and likelihood. `input_dim` and `image_shape` are filled from the data."""

    latent_dim: int = 8
    hidden: Tuple[int, ...] = (256, 128)
    activation: str = "relu"
    arch: str = "mlp"
    likelihood: str = "bernoulli"
    gaussian_scale: str = "per_feature"
    fixed_scale: float = 1.0
    sigma_floor: float = 1e-4
    conv_channels: Tuple[int, ...] = (32, 64)
    input_dim: Optional[int] = None
    image_shape: Optional[Tuple[int, int]] = None

    def validate(self, prefix: str = "model") -> None:
        _positive_int(f"{prefix}.latent_dim", self.latent_dim)
        for i, h in enumerate(self.hidden):
            _positive_int(f"{prefix}.hidden[{i}]", h)
        for i, c in enumerate(self.conv_channels):
            _positive_int(f"{prefix}.conv_channels[{i}]", c)
        _choice(f"{prefix}.activation", self.activation, ACTIVATIONS)
        _choice(f"{prefix}.arch", self.arch, ARCHS)
        _choice(f"{prefix}.likelihood", self.likelihood, LIKELIHOODS)
        _choice(f"{prefix}.gaussian_scale", self.gaussian_scale, GAUSSIAN_SCALES)
        if not self.fixed_scale > 0:
            raise ConfigError(f"{prefix}.fixed_scale must be > 0, got {self.fixed_scale}")
        if not self.sigma_floor >= 0:
            raise ConfigError(f"{prefix}.sigma_floor must be >= 0, got {self.sigma_floor}")
        if self.input_dim is not None:
            _positive_int(f"{prefix}.input_dim", self.input_dim)
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


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, objective and stopping."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    lr_gamma: float = 0.98  # per-epoch decay for 'exponential'; factor for 'plateau'
    grad_clip: Optional[float] = None
    objective: str = "elbo"
    iw_samples: int = 1  # K for the IWAE objective
    dreg: bool = False  # doubly reparameterized encoder gradient for IWAE (Tucker et al. 2018)
    beta: float = 1.0
    warmup_epochs: int = 0  # linear KL warm-up from 0 to beta
    free_bits: float = 0.0  # nats per latent dimension
    patience: Optional[int] = None  # early stopping on validation loss
    seed: int = 0
    device: str = "auto"
    bf16: bool = False

    def validate(self, prefix: str = "train") -> None:
        _positive_int(f"{prefix}.epochs", self.epochs)
        _positive_int(f"{prefix}.batch_size", self.batch_size)
        _positive_int(f"{prefix}.iw_samples", self.iw_samples)
        if not self.lr > 0:
            raise ConfigError(f"{prefix}.lr must be > 0, got {self.lr}")
        _choice(f"{prefix}.optimizer", self.optimizer, OPTIMIZERS)
        _choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
        _choice(f"{prefix}.objective", self.objective, OBJECTIVES)
        _choice(f"{prefix}.device", self.device, DEVICES)
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
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
        return cls.from_dict(d, source)


# --- helpers -------------------------------------------------------------------------------

def _choice(key: str, value: Any, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "transform": Transform}


def _from_dict(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(fields)}")
    kwargs = {}
    for name, value in d.items():
        key = f"{where}.{name}" if where != "config" else name
        if name in _SECTIONS and cls is RunConfig:
            kwargs[name] = None if value is None and name == "transform" else _from_dict(_SECTIONS[name], value, key)
            continue
        kwargs[name] = _coerce(key, fields[name], value)
    return cls(**kwargs)


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Check a JSON value against the field's annotation; lists become tuples."""
    ann = str(f.type)
    optional = ann.startswith("Optional[")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    base = ann[len("Optional["):-1] if optional else ann
    if base.startswith("Tuple["):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        elem = "str" if "str" in base else ("float" if "float" in base else "int")
        return tuple(_scalar(f"{key}[{i}]", elem, v) for i, v in enumerate(value))
    return _scalar(key, base, value)


def _scalar(key: str, typ: str, value: Any) -> Any:
    if typ == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {typ}")  # a bug in this module, not user input
