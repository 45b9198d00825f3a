"""vaelens: variational autoencoders you can inspect, one sample's posterior at a time."""

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import VaelensError

__all__ = ["VAE", "Posterior", "RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "VaelensError"]
__version__ = "0.1.0"


def __getattr__(name):
    # The estimator pulls in torch and scikit-learn (seconds); importing it on first use keeps
    # `vaelens --help` and the CLI's argument errors instant (PEP 562).
    if name in ("VAE", "Posterior"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'vaelens' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"VAE", "Posterior"})  # tab completion lists the lazy names too
