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
    """A submission folder as make train leaves it: model.py, model.onnx (tiny model), settings.json."""
    from trainer import files
    from trainer.config import make_config
    from trainer.export import export_onnx
    from trainer.train import settings_for
    out = tmp_path_factory.mktemp("submission")
    shutil.copy(os.path.join(ROOT, "submission", "model.py"), out / "model.py")
    info = export_onnx(tiny_keras_model, str(out / "model.onnx"), real_slice[0][:32])
    files.write_json(str(out / "settings.json"), settings_for(make_config("smoke", name="fixture"), info["sha256"]))
    return out

