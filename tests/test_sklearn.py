"""The scikit-learn contract of `VAE`: parameters, clone, fit/transform/score, Pipelines and grid search."""

import dataclasses
import inspect

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from vaelens import VAE, data
from vaelens.config import DataConfig, ModelConfig, TrainConfig
from vaelens.errors import ConfigError

TINY = dict(hidden=(8,), epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def X():
    return data.load_digits().X[:200]


def test_parameters_are_the_config_fields_with_their_defaults():
    params = VAE().get_params()
    expected = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name not in ("input_dim", "image_shape")}
    expected.update({f.name: f.default for f in dataclasses.fields(TrainConfig)})
    expected.update({f.name: f.default for f in dataclasses.fields(DataConfig)
                     if f.name in ("binarize", "standardize", "val_fraction")})
    expected["score_k"] = 100
    assert params == expected
    sig = inspect.signature(VAE)
    assert all(p.kind is p.KEYWORD_ONLY for p in sig.parameters.values())
    with pytest.raises(ConfigError, match="unknown parameter.*latnt"):
        VAE(latnt=3)


def test_init_only_stores_and_clone_get_set_params():
    hidden = [32, 16]
    v = VAE(latent_dim=3, hidden=hidden, lr=0.01)
    assert v.hidden is hidden and not hasattr(v, "params")  # stored as given, validated in fit
    c = clone(v)
    assert c is not v and c.get_params() == v.get_params()
    assert clone(VAE(latent_dim=3)).latent_dim == 3
    assert c.set_params(latent_dim=5, binarize="static") is c and c.latent_dim == 5 and c.binarize == "static"
    with pytest.raises(ValueError, match="Invalid parameter"):
        c.set_params(latnt=2)
    assert repr(VAE(latent_dim=3, lr=0.01)) == "VAE(latent_dim=3, lr=0.01)"
    assert repr(VAE()) == "VAE()"


def test_fit_returns_self_and_overrides_leave_params_alone(X):
    v = VAE(latent_dim=2, **TINY)
    y = np.zeros(len(X))
    assert v.fit(X, y) is v  # y is accepted and ignored
    assert v.config_.train.epochs == 2 and v.latent_dim_ == 2
    v.fit(X, epochs=1, seed=5)
    assert v.config_.train.epochs == 1 and v.config_.train.seed == 5
    assert v.get_params()["epochs"] == 2 and v.get_params()["seed"] == 0
    with pytest.raises(ConfigError, match="X_val="):
        v.fit(X, X[:20])  # the second argument is y, not validation data
    with pytest.raises(ConfigError, match="latent_dim"):
        VAE(latent_dim=0, **TINY).fit(X)  # invalid values are found by fit


def test_numpy_scalar_and_list_params(X):
    v = VAE(latent_dim=np.int64(2), hidden=[8], epochs=np.int64(1)).fit(X)
    assert v.config_.model.latent_dim == 2 and v.config_.model.hidden == (8,)


def test_transform_fit_transform_score(X):
    v = VAE(latent_dim=2, **TINY)
    Z = v.fit_transform(X)
    assert Z.shape == (len(X), 2) and np.array_equal(Z, v.transform(X))
    assert np.array_equal(v.transform(X), v.encode(X).mu)
    s = v.score_samples(X[:30])
    assert s.shape == (30,) and np.isfinite(s).all() and (s < 0).all()
    assert np.array_equal(s, v.log_likelihood(X[:30], k=v.score_k, seed=0))
    assert np.array_equal(s, v.score_samples(X[:30]))  # seeded: the same figure again
    assert v.score(X[:30]) == pytest.approx(float(s.mean()))


def test_loaded_run_has_the_runs_params_and_clones_unfitted(X, tmp_path):
    VAE(latent_dim=2, lr=0.002, **TINY).fit(X).save(tmp_path / "run")
    back = VAE.load(tmp_path / "run")
    assert back.get_params()["lr"] == 0.002 and back.get_params()["latent_dim"] == 2
    fresh = clone(back)
    assert fresh.get_params() == back.get_params() and not hasattr(fresh, "module_")


def test_pipeline_with_a_scaler(table_data):
    pipe = Pipeline([("scale", StandardScaler()), ("vae", VAE(latent_dim=2, likelihood="gaussian", **TINY))])
    pipe.fit(table_data[:300])
    Z = pipe.transform(table_data[300:350])
    assert Z.shape == (50, 2) and np.isfinite(Z).all()
    assert np.isfinite(pipe.score(table_data[300:350]))
    assert clone(pipe).get_params()["vae__latent_dim"] == 2


def test_grid_search_over_latent_dim(X):
    search = GridSearchCV(VAE(**TINY), {"latent_dim": [2, 4]}, cv=2)
    search.fit(X)
    assert search.best_params_["latent_dim"] in (2, 4)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.latent_dim_ == search.best_params_["latent_dim"]
