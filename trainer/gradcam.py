"""Grad-CAM heatmaps for any registry model, and a gallery of a run's worst mistakes."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import CLASS_NAMES, load_config
from .evaluate import predict_probs
from .registry import MODELS

# The layers the registry's models pool their last feature map with (models.build_model names them so).
FEATURE_LAYERS = frozenset(spec.feature_layer for spec in MODELS.values())


@dataclass
class Mistake:
    index: int            # position in holdout.npz
    image: np.ndarray     # (96, 96, 3) uint8
    heatmap: np.ndarray   # (96, 96) float in [0, 1], for the predicted class
    true: int
    predicted: int
    confidence: float     # probability of the (wrong) predicted class
    grid: tuple = ()      # (h, w) of the feature map the heatmap was upsampled from

    @property
    def true_name(self) -> str:
        return CLASS_NAMES[self.true]

    @property
    def predicted_name(self) -> str:
        return CLASS_NAMES[self.predicted]


# ---- heatmaps ----------------------------------------------------------------------------------------

def classifiers(model) -> list:
    """The models to explain: the model itself, or the members of an ensemble (which has no pooling of its own)."""
    import keras
    if any(layer.name in FEATURE_LAYERS for layer in model.layers):
        return [model]
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not members:
        raise ValueError(f"{model.name}: no pooling layer named {sorted(FEATURE_LAYERS)} and no nested models; "
                         "Grad-CAM explains the models trainer.models builds")
    return members


def gradient_model(model):
    """(model giving the last conv feature map and the input of the last Dense, that Dense layer).

    The feature map is the input of the registry's feature_layer, the pooling that takes the spatial axes away:
    the ReLU of vanilla_cnn's last block or the output of a nested keras.applications backbone. The class logits
    are the last Dense layer applied without its softmax.
    """
    import keras
    pool = next(layer for layer in model.layers if layer.name in FEATURE_LAYERS)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
    if len(pool.input.shape) != 4:
        raise ValueError(f"{model.name}: {pool.name} gets a {len(pool.input.shape)}-D input, not a feature map")
    return keras.Model(model.inputs, [pool.input, dense.input]), dense


def feature_grid(model) -> tuple[int, int]:
    """(h, w) of the last conv feature map: the heatmaps' true resolution before upsampling."""
    features = gradient_model(classifiers(model)[0])[0].outputs[0]
    return int(features.shape[1]), int(features.shape[2])


def _heatmaps_one(grad_model, dense, x, classes) -> np.ndarray:
    """Grad-CAM of one classifier: ReLU of the feature maps weighted by the mean gradient of the class logit."""
    import tensorflow as tf
    with tf.GradientTape() as tape:
        features, head_in = grad_model(x, training=False)
        features = tf.cast(features, tf.float32)
        # Logits, not probabilities: the softmax saturates and flattens the gradients of confident predictions.
        logits = tf.matmul(tf.cast(head_in, tf.float32), tf.cast(dense.kernel, tf.float32))
        if dense.use_bias:
            logits += tf.cast(dense.bias, tf.float32)
        score = tf.gather(logits, classes, batch_dims=1)
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    return cam.numpy()


def heatmaps(model, images: np.ndarray, classes=None, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] at the images' size, for `classes` (default: the predicted ones)."""
    import tensorflow as tf
    x_all = images.astype(np.float32)
    if classes is None:
        classes = np.asarray(model.predict(x_all, batch_size=batch_size, verbose=0)).argmax(1)
    classes = np.asarray(classes, np.int32)
    explainers = [gradient_model(m) for m in classifiers(model)]
    out = []
    for start in range(0, len(x_all), batch_size):
        x = tf.constant(x_all[start:start + batch_size])
        c = tf.constant(classes[start:start + batch_size])
        members = [_heatmaps_one(grad_model, dense, x, c) for grad_model, dense in explainers]
        cams = [tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()
                for cam in members]
        # each member counts alike (an ensemble's are the K fold models), then the mean peaks at 1 again
        out.append(normalise(np.mean([normalise(cam) for cam in cams], axis=0)))
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), np.float32)


def normalise(cams: np.ndarray) -> np.ndarray:
    """Each map scaled from its own minimum to its maximum, into [0, 1]; a flat map becomes all zeros.

    Min-max rather than divide-by-max (as pytorch-grad-cam does): a weak model's maps are often high everywhere,
    and only their contrast says where it looked.
    """
    flat = cams.reshape(len(cams), -1)
    low = flat.min(1).reshape(-1, 1, 1)
    span = flat.max(1).reshape(-1, 1, 1) - low
    scaled = np.divide(cams - low, span, out=np.zeros_like(cams), where=span > 1e-12)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


# ---- a run's model and mistakes ----------------------------------------------------------------------

def load_run_model(run_dir: str):
    """model.keras, or for a run that stopped early the config's model with its best saved weights; else None."""
    import keras

    from . import models
    path = os.path.join(run_dir, "model.keras")
    if os.path.exists(path):
        return keras.models.load_model(path)
    best = [os.path.join(run_dir, phase, "best.weights.h5") for phase in ("phase_finetune", "phase_train")]
    best = [p for p in best if os.path.exists(p)]
    config = os.path.join(run_dir, "config.json")
    if not best or not os.path.exists(config):
        return None
    cfg = load_config(config)
    cfg.weights = "none"  # the saved weights replace them: no download
    model = models.build_model(cfg)
    model.load_weights(best[0])
    return model


def worst_mistakes(model, images: np.ndarray, labels: np.ndarray, n: int) -> list[Mistake]:
    """The n wrong predictions made with the highest confidence, with the Grad-CAM of the predicted class."""
    probs = predict_probs(model, images)
    predicted = probs.argmax(1)
    confidence = probs.max(1)
    wrong = np.flatnonzero(predicted != labels)
    chosen = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]
    maps = heatmaps(model, images[chosen], predicted[chosen]) if len(chosen) else []
    grid = feature_grid(model)
    return [Mistake(int(i), images[i], maps[k], int(labels[i]), int(predicted[i]), float(confidence[i]), grid)
            for k, i in enumerate(chosen)]


def run_mistakes(run_dir: str, n: int = 32, model=None) -> list[Mistake]:
    """The worst mistakes on a run's holdout images (the test split, or val when it has none)."""
    holdout = os.path.join(run_dir, "holdout.npz")
    if not os.path.exists(holdout):
        raise FileNotFoundError(f"{holdout} not found: the run stopped before its split was saved")
    model = model if model is not None else load_run_model(run_dir)
    if model is None:
        raise FileNotFoundError(f"no model.keras nor best weights in {run_dir}: the run stopped before an epoch ended")
    with np.load(holdout) as held:
        images, labels = held["images"], held["labels"].astype(np.int64)
    return worst_mistakes(model, images, labels, n)


def holdout_split(run_dir: str) -> str:
    """Which split holdout.npz holds: val for a run without a test split."""
    path = os.path.join(run_dir, "config.json")
    no_test = os.path.exists(path) and json.load(open(path)).get("no_test_split", False)
    return "val" if no_test else "test"


# ---- pictures ----------------------------------------------------------------------------------------

def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


