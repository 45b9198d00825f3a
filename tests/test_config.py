import json

import pytest

from vaelens.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelens.errors import ConfigError


def test_round_trip_preserves_every_field():
    cfg = RunConfig(data=DataConfig(name="file", path="x.csv", columns=("a", "b")),
                    model=ModelConfig(latent_dim=3, hidden=(5,), input_dim=7),
                    train=TrainConfig(epochs=2, grad_clip=1.5, patience=3))
    back = RunConfig.from_json(cfg.to_json())
    assert back == cfg
    assert isinstance(back.model.hidden, tuple)


@pytest.mark.parametrize("patch, fragment", [
    ({"model": {"latnt_dim": 3}}, "model: unknown key(s) latnt_dim"),
    ({"model": {"latent_dim": "8"}}, "model.latent_dim"),
    ({"model": {"latent_dim": 0}}, "model.latent_dim must be a positive integer"),
    ({"train": {"lr": -1}}, "train.lr must be > 0"),
    ({"model": {"likelihood": "poisson"}}, "model.likelihood: 'poisson' is not one of"),
    ({"version": 99}, "version"),
    ({"train": {"objective": "elbo", "iw_samples": 5}}, "needs objective 'iwae'"),
    ({"model": {"hidden": "256"}}, "model.hidden: expected a list"),
])
def test_invalid_values_name_the_key(patch, fragment):
    d = RunConfig().to_dict()
    for sec, val in patch.items():
        if isinstance(val, dict):
            d[sec].update(val)
        else:
            d[sec] = val
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(d)
    assert fragment in str(e.value)


def test_bad_json_names_line_and_column():
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(line 1"):
        RunConfig.from_json("{bad")


def test_conv_requires_divisible_image():
    with pytest.raises(ConfigError, match="divisible by 4"):
        ModelConfig(arch="conv", image_shape=(10, 10), input_dim=100).validate()
    with pytest.raises(ConfigError, match="needs image data"):
        ModelConfig(arch="conv", input_dim=100).validate()


def test_config_is_frozen():
    with pytest.raises(Exception):
        RunConfig().train.epochs = 3  # type: ignore[misc]
    assert json.loads(RunConfig().to_json())["version"] == 1
