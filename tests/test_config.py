import dataclasses
import json
from typing import Optional, Tuple

import pytest

from vaelens import config
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


def test_options_list_every_user_setting_once():
    opts = config.options()
    keys = [o.key for o in opts]
    assert len(keys) == len(set(keys))
    assert {"model.latent_dim", "model.hidden", "train.epochs", "train.seed", "data.binarize"} <= set(keys)
    assert not {"model.input_dim", "model.image_shape", "data.name", "data.path"} & set(keys)  # not settings
    latent = next(o for o in opts if o.key == "model.latent_dim")
    assert (latent.type, latent.default, latent.flag, latent.api) == (int, 8, "--latent-dim", True)
    hidden = next(o for o in opts if o.key == "model.hidden")
    assert hidden.type == Tuple[int, ...] and hidden.default == (256, 128)
    assert next(o for o in opts if o.key == "model.likelihood").choices == config.LIKELIHOODS
    assert not next(o for o in opts if o.key == "data.limit").api
    # defaults are the dataclasses', and the sections' fields match
    for o in opts:
        assert getattr({"data": DataConfig, "model": ModelConfig, "train": TrainConfig}[o.section](), o.name) \
            == o.default
    assert [o.name for o in config.options("model", role=None)] == [f.name for f in dataclasses.fields(ModelConfig)]
    with pytest.raises(ValueError):
        config.options("nope")


def test_dataset_defaults_come_from_one_table():
    assert config.dataset_defaults("digits")["train"] == {"epochs": 200}
    assert config.dataset_defaults("mnist")["data"] == {"binarize": "dynamic"}
    # a data file's own defaults (early stopping) are in the same table (issue 17 item 6)
    assert config.dataset_defaults("file")["train"]["patience"] == config.DATASET_DEFAULTS["file"]["train.patience"]
    assert config.dataset_defaults("array") == {"data": {}, "model": {}, "train": {}}


@dataclasses.dataclass(frozen=True)
class _Spelled:
    a: Optional[int] = None
    b: "int | None" = None
    c: Tuple[int, ...] = ()
    d: Optional[Tuple[str, ...]] = None
    e: Tuple[int, int] = (1, 2)
    f: float = 0.0


@pytest.mark.parametrize("name, value, expected", [
    ("a", None, None), ("a", 3, 3), ("b", None, None), ("b", 4, 4), ("c", [1, 2, 3], (1, 2, 3)),
    ("d", ["x"], ("x",)), ("d", None, None), ("e", [3, 4], (3, 4)), ("f", 2, 2.0),
])
def test_coercion_reads_the_type_hints(name, value, expected):
    got = config._coerce(f"s.{name}", config._hints(_Spelled)[name], value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("name, value, fragment", [
    ("a", "3", "s.a: expected an integer"), ("b", 1.5, "s.b: expected an integer"),
    ("c", [1, "x"], "s.c[1]: expected an integer"), ("e", [1, 2, 3], "s.e: expected a list of 2"),
    ("f", None, "s.f: must not be null"), ("c", 3, "s.c: expected a list"),
])
def test_coercion_errors_name_the_dotted_key(name, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        config._coerce(f"s.{name}", config._hints(_Spelled)[name], value)


def test_an_existing_config_file_still_loads():
    # a config.json as vaelens wrote it before the fields carried metadata
    text = json.dumps({"data": {"binarize": "dynamic", "columns": None, "data_dir": None, "key": None,
                                "label_column": None, "limit": None, "name": "mnist", "path": None,
                                "standardize": False, "val_fraction": 0.1},
                       "model": {"activation": "relu", "arch": "mlp", "conv_channels": [32, 64],
                                 "fixed_scale": 1.0, "gaussian_scale": "per_feature", "hidden": [256, 128],
                                 "image_shape": [28, 28], "input_dim": 784, "latent_dim": 8,
                                 "likelihood": "bernoulli", "sigma_floor": 0.0001},
                       "train": dict(RunConfig().to_dict()["train"], epochs=50),
                       "transform": None, "version": 1})
    cfg = RunConfig.from_json(text)
    assert cfg.model.image_shape == (28, 28) and cfg.data.binarize == "dynamic" and cfg.train.epochs == 50
