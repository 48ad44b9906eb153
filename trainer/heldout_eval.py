"""Score a model on the held-out corruptions: the held-out copy, each corruption alone, an exported model."""
from __future__ import annotations

import time

import numpy as np

from . import heldout
from .evaluate import errors_by_corruption, models_by_views
from .metrics import classification_metrics

SEVERITIES = (1, 3, 5)


def per_corruption(predict_labels, images: np.ndarray, labels: np.ndarray, severities=SEVERITIES,
                   seed: int = 0, names=heldout.HELD_OUT) -> dict:
    """Accuracy under each held-out corruption alone (all, or `names`) at each severity: {name: {"1": acc, ...}}."""
    table = {}
    for name in names:
        table[name] = {}
        for severity in severities:
            altered = heldout.apply(images, name, severity, np.random.default_rng(seed + severity))
            table[name][str(severity)] = float((predict_labels(altered) == labels).mean())
    return table


def score(predict_labels, images: np.ndarray, labels: np.ndarray, seed: int, max_images: int = 500,
          severities=SEVERITIES) -> dict:
    """The held-out figure of a model: accuracy on a held-out corrupted copy of every image (1-3 held-out
    corruptions each), its errors by corruption, and each corruption alone on up to max_images of them.

    predict_labels maps a uint8 batch to class indices. The copy is heldout.corrupt_mix's with this seed, so
    `python -m trainer evaluate --heldout --seed S` on the same images scores the same copy.
    """
    mixed, recipes = heldout.corrupt_mix(images, seed=seed)
    predicted = predict_labels(mixed)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(images), min(max_images, len(images)), replace=False))
    return {"corrupted": classification_metrics(labels, predicted),
            "errors_by_corruption": errors_by_corruption(recipes, predicted != labels, heldout.FAMILY_OF),
            "per_corruption": per_corruption(predict_labels, images[pick], labels[pick], severities, seed),
            "per_corruption_images": int(len(pick)), "seed": seed}


def evaluate_exported(model_dir: str, images: np.ndarray, labels: np.ndarray, views_list=(1,), seed: int = 42,
                      severities=()) -> list[dict]:
    """An exported model (run or submission folder) on the held-out copy of images, once per number of TTA views:
    accuracy, macro F1, speed and errors by corruption; with severities, each held-out corruption alone too.

    The views are fixed, not what the clock allows, as in evaluate.evaluate_exported.
    """
    mixed, recipes = heldout.corrupt_mix(images, seed=seed)
    rows = []
    for views, model in models_by_views(model_dir, views_list, "heldout_model"):
        started = time.perf_counter()
        predicted = model.predict(mixed)
        seconds = time.perf_counter() - started
        m = classification_metrics(labels, predicted)
        row = {"views": views, "seconds": seconds, "img_per_s": len(mixed) / seconds if seconds else 0.0,
               "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
               "errors_by_corruption": errors_by_corruption(recipes, predicted != labels, heldout.FAMILY_OF)}
        if severities:
            row["per_corruption"] = per_corruption(model.predict, images, labels, severities, seed)
        rows.append(row)
    return rows
