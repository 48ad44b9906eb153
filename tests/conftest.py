"""Shared fixtures: the real data file (or a skip), a tiny exported model and a submission folder."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def find_data() -> str | None:
    """$DATA, then data/training_set.npz, then ../shared/data/training_set.npz (relative to the repo)."""
    for path in (os.environ.get("DATA"), os.path.join(ROOT, "data", "training_set.npz"),
                 os.path.join(ROOT, "..", "shared", "data", "training_set.npz")):
        if path and os.path.exists(path):
            return path
    return None


def need_data() -> str:
    path = find_data()
    if path is None:
        pytest.skip("no real data: set $DATA or put training_set.npz in data/ (or ../shared/data/)")
    return path


@pytest.fixture(scope="session")
def data_path() -> str:
    return need_data()


@pytest.fixture(scope="session")
def real_slice(data_path):
    """The first 2,000 images and labels of the real file: cells only (the junk sits at the end)."""
    with np.load(data_path) as npz:
        return npz["images"][:2000].copy(), npz["labels"][:2000, 0].astype(np.int64)


@pytest.fixture(scope="session")
def tiny_keras_model():
    """An untrained but deterministic small vanilla_cnn (random weights, fixed seed)."""
    from trainer.config import make_config
    from trainer.models import build_model
    return build_model(make_config("smoke", width=4, dense_units=16, seed=1))


@pytest.fixture(scope="session")
def submission_dir(tmp_path_factory, tiny_keras_model, real_slice):
    """A submission folder as make train leaves it: model.py, interpreter.py, model.onnx (tiny model), settings.json."""
    from trainer import files
    from trainer.config import make_config
    from trainer.export import export_onnx
    from trainer.train import settings_for
    out = tmp_path_factory.mktemp("submission")
    for name in ("model.py", "interpreter.py"):
        shutil.copy(os.path.join(ROOT, "submission", name), out / name)
    info = export_onnx(tiny_keras_model, str(out / "model.onnx"), real_slice[0][:32])
    files.write_json(str(out / "settings.json"), settings_for(make_config("smoke", name="fixture"), info["sha256"]))
    return out


@pytest.fixture(scope="session")
def gpu_run(tmp_path_factory, data_path):
    """A toy run of the gpu profile end to end through trainer.train.train: ConvNeXtBase at 224 from a local weights
    file standing in for ImageNet, two training steps on 48 real images, evaluation, the BatchNorm check (skipped),
    robustness on 4 images, float16 export. Returns (run folder, submission folder, metrics). Minutes on 2 cores:
    for tests marked heavy."""
    import gc

    import keras

    from trainer.config import make_config
    from trainer.train import train
    base = tmp_path_factory.mktemp("gpu_run")
    weights = str(base / "imagenet_stand_in.weights.h5")
    # The stock architecture, as --weights imagenet would load it (the kit rebuilds it depthwise after loading).
    keras.applications.ConvNeXtBase(include_top=False, weights=None, input_shape=(224, 224, 3)).save_weights(weights)
    gc.collect()
    cfg = make_config("gpu", data=data_path, weights=weights, name="gpu-toy", runs_dir=str(base / "runs"),
                      submission_dir=str(base / "submission"), limit=48, batch_size=2, epochs=1, steps_per_epoch=2,
                      fine_tune_epochs=0, robustness_images=4, verbose=0)
    metrics = train(cfg)
    return base / "runs" / "gpu-toy", base / "submission", metrics
