"""vaelens: variational autoencoders you can inspect, one sample's posterior at a time."""

from .api import VAE, Posterior
from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .errors import VaelensError

__all__ = ["VAE", "Posterior", "RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "VaelensError"]
__version__ = "0.1.0"
