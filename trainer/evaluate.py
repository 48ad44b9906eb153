"""Score a model: Keras probabilities, the BatchNorm check, robustness tables, an exported model via model.py."""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time

import numpy as np

from . import corrupt
from .data import NUM_CLASSES
from .metrics import classification_metrics
from .staging import prepare_submission, variant

# Memory of a graph-mode forward pass per image, in units of the model's largest layer output: ConvNeXtBase at 224
# (6.4 MB an image) peaked at 3.0 GB resident predicting batches of 64, from 1.5 GB at rest: 3.6 units, tracing
# included.
ACTIVATION_UNITS = 4
MOST_IMAGES = 128  # the batch of predict_probs before batches were sized: small models keep it


def largest_activation_bytes(model) -> int:
    """Bytes of the largest layer output of one image (float32), over every layer, nested backbones included."""
    largest = 0
    for layer in model._flatten_layers(include_self=False):
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # a layer never called, or called more than once
            continue
        if len(shape) > 1 and all(d is not None for d in shape[1:]):
            largest = max(largest, int(np.prod(shape[1:])))
    return 4 * largest


def batch_size_for(model, memory_mb: int = 1024) -> int:
    """Images a batch so that one forward pass takes about memory_mb of activations; 1 to 128.

    The cpu profile's vanilla_cnn gets 128 (the batch of old); ConvNeXtBase at 224x224 gets 41.
    """
    per_image = ACTIVATION_UNITS * max(1, largest_activation_bytes(model))
    return int(min(MOST_IMAGES, max(1, memory_mb * 2 ** 20 // per_image)))


def predict_probs(model, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Keras probabilities in inference mode, in batches (sized for the model when batch_size is None)."""
    if len(images) == 0:
        return np.zeros((0, NUM_CLASSES), np.float32)
    batch_size = batch_size or batch_size_for(model)
    # predict_on_batch reuses the traced function; model.predict builds a tf.data pipeline on every call, which
    # costs 0.1 s or more a call, paid a hundred times over by the per-corruption scoring's small sets.
    return np.concatenate([np.asarray(model.predict_on_batch(images[i:i + batch_size].astype(np.float32)))
                           for i in range(0, len(images), batch_size)])


def batchnorm_layers(model) -> list:
    import keras
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]


def no_batchnorm_reason(model) -> str:
    return (f"{model.name} has no BatchNormalization layers, so training and inference mode normalise alike "
            "(ConvNeXt uses LayerNorm)")


def train_vs_inference_mode(model, images: np.ndarray, labels: np.ndarray, batch_size: int | None = None) -> dict:
    """Accuracy on the same images in training mode (batch statistics) and in inference mode (moving statistics).

    A large gap means BatchNormalization's moving statistics do not describe the data the model sees: the
    model looks fine while it trains and fails when it predicts. Dropout is switched off for the comparison,
    so the two differ in their BatchNorm statistics alone. No weights or statistics change.
    A model without BatchNorm has nothing to compare: {"skipped": why}.
    """
    import keras
    import tensorflow as tf
    bns = batchnorm_layers(model)
    if not bns:
        return {"skipped": no_batchnorm_reason(model)}
    batch_size = batch_size or batch_size_for(model)
    x = images.astype(np.float32)
    from .models import FeatureJitter
    # FeatureJitter moves features at random in training mode, as Dropout does; both rest at rate 0.
    dropouts = [layer for layer in model._flatten_layers()
                if isinstance(layer, (keras.layers.Dropout, FeatureJitter))]
    rates = [d.rate for d in dropouts]
    moments = [bn.momentum for bn in bns]
    train_pred, infer_pred = [], []
    try:
        for d in dropouts:
            d.rate = 0.0
        for bn in bns:
            bn.momentum = 1.0  # training mode would otherwise update the moving statistics
        # A graph, traced after the two changes above: an eager call holds every layer's output of the batch to
        # the end. ConvNeXtBase at 224, 16 images in training mode: 5.4 GB peak resident eagerly, 1.7 GB as a
        # graph (1.5 GB at rest); eager batches of 64 were killed at 24 GB.
        spec = tf.TensorSpec((None, *x.shape[1:]), tf.float32)
        both = tf.function(lambda b: (model(b, training=True), model(b, training=False)), input_signature=[spec])
        for start in range(0, len(x), batch_size):
            trained, inferred = both(tf.constant(x[start:start + batch_size]))
            train_pred.append(np.asarray(trained).argmax(1))
            infer_pred.append(np.asarray(inferred).argmax(1))
    finally:
        for d, r in zip(dropouts, rates):
            d.rate = r
        for bn, m in zip(bns, moments):
            bn.momentum = m
    train_acc = float((np.concatenate(train_pred) == labels).mean())
    infer_acc = float((np.concatenate(infer_pred) == labels).mean())
    return {"training_mode_accuracy": train_acc, "inference_mode_accuracy": infer_acc,
            "gap": train_acc - infer_acc, "images": int(len(x)), "batch_size": batch_size}


def robustness(predict, images: np.ndarray, labels: np.ndarray, seed: int, max_images: int = 500) -> dict:
    """Accuracy on a corrupted copy (1-3 random corruptions per image) and per family and severity."""
    mixed, _ = corrupt.corrupt_mix(images, seed=seed)
    result = {"corrupted": classification_metrics(labels, predict(mixed).argmax(1)), "per_family": {}}
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(images), min(max_images, len(images)), replace=False))
    x, y = images[pick], labels[pick]
    clean_acc = float((predict(x).argmax(1) == y).mean()) if len(x) else 0.0
    for family in corrupt.FAMILIES:
        scores = [clean_acc]
        for severity in corrupt.SEVERITIES:
            altered = corrupt.apply_family(x, family, severity, seed=seed + severity)
            scores.append(float((predict(altered).argmax(1) == y).mean()) if len(x) else 0.0)
        result["per_family"][family] = scores  # index = severity, 0 = clean
    result["per_family_images"] = int(len(x))
    return result


def per_corruption(predict_labels, images: np.ndarray, labels: np.ndarray, severities=(1, 3, 5),
                   seed: int = 0) -> dict:
    """Accuracy under each single corruption at each severity: finds the one a family's average hides."""
    table = {}
    for name in corrupt.CORRUPTIONS:
        table[name] = {}
        for severity in severities:
            altered = corrupt.apply(images, name, severity, np.random.default_rng(seed + severity))
            table[name][str(severity)] = float((predict_labels(altered) == labels).mean())
    return table


def errors_by_corruption(recipes: list, wrong: np.ndarray, family_of: dict = corrupt.FAMILY_OF) -> dict:
    """Per corruption of a corrupt_mix copy: how many images got it and how many of those the model got wrong,
    in all and at severity 4-5, worst first.

    An image with two corruptions counts for both, so the rows say which corruptions the errors come with; they
    do not split the errors between them. family_of names the suite's corruptions (heldout.FAMILY_OF for the
    held-out copy).
    """
    table = {name: {"images": 0, "wrong": 0, "images_sev45": 0, "wrong_sev45": 0} for name in family_of}
    for recipe, bad in zip(recipes, wrong):
        for name, severity in recipe:
            row = table[name]
            row["images"] += 1
            row["wrong"] += int(bad)
            if severity >= 4:
                row["images_sev45"] += 1
                row["wrong_sev45"] += int(bad)
    return dict(sorted(table.items(), key=lambda item: -item[1]["wrong"]))


def errors_table(table: dict, family_of: dict = corrupt.FAMILY_OF) -> str:
    """errors_by_corruption's result as aligned text, one row per corruption."""
    header = (("images", 7), ("wrong", 7), ("rate", 7), ("sev 4-5", 9), ("wrong", 7), ("rate", 7))
    lines = [f"{'corruption':<18}{'family':<13}" + "".join(f"{text:>{width}}" for text, width in header)]
    for name, r in table.items():
        rate = r["wrong"] / r["images"] if r["images"] else 0.0
        rate45 = r["wrong_sev45"] / r["images_sev45"] if r["images_sev45"] else 0.0
        lines.append(f"{name:<18}{family_of[name]:<13}{r['images']:>7}{r['wrong']:>7}{rate:>7.3f}"
                     f"{r['images_sev45']:>9}{r['wrong_sev45']:>7}{rate45:>7.3f}")
    return "\n".join(lines)


def corruption_table(table: dict, family_of: dict = corrupt.FAMILY_OF) -> str:
    """per_corruption's result as aligned text: one row per corruption, one column per severity."""
    severities = list(next(iter(table.values())))
    lines = [f"{'corruption':<18}{'family':<13}" + "".join(f"{'sev ' + s:>8}" for s in severities)]
    for name, row in table.items():
        lines.append(f"{name:<18}{family_of[name]:<13}" + "".join(f"{row[s]:>8.3f}" for s in severities))
    return "\n".join(lines)


# ---- scoring an exported model through submission/model.py -------------------------------------------

def load_submission(folder: str, name: str):
    """Model() of the submission in folder, imported under its own module name so several can coexist."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model()


def models_by_views(model_dir: str, views_list, name: str):
    """(views, Model()) for each number of TTA views, the views fixed rather than what the clock allows.

    model_dir is a submission folder (with model.py), or a run folder whose model goes under submission/model.py.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from_run = not os.path.exists(os.path.join(model_dir, "model.py"))
    source = os.path.join(root, "submission") if from_run else model_dir
    with tempfile.TemporaryDirectory() as workdir:
        staged = prepare_submission(source, model_dir, from_run, os.path.join(workdir, "staged"))
        for views in views_list:
            # A budget nobody can exceed, so the views are the ones asked for and not what the clock allows.
            folder = variant(staged, os.path.join(workdir, f"views{views}"), max_views=views, tta=views > 1,
                             budget_per_image_s=1e9)
            yield views, load_submission(folder, f"{name}_views{views}")


def evaluate_exported(model_dir: str, images: np.ndarray, labels: np.ndarray | None,
                      views_list=(1, 2, 4, 8), corruption_severities=(), seed: int = 0,
                      recipes: list | None = None) -> list[dict]:
    """Accuracy and speed of an exported model on images, once per number of TTA views.

    With corruption_severities (and labels), each row also holds per_corruption's table for that many views.
    With recipes (corrupt_mix's, for a corrupted copy) and labels, each row holds errors_by_corruption's table.

    model_dir is a submission folder (with model.py), or a run folder whose model goes under submission/model.py.
    """
    rows = []
    for views, model in models_by_views(model_dir, views_list, "submission_model"):
        started = time.perf_counter()
        pred = model.predict(images)
        seconds = time.perf_counter() - started
        row = {"views": views, "seconds": seconds, "img_per_s": len(images) / seconds if seconds else 0.0}
        if labels is not None:
            m = classification_metrics(labels, pred)
            row.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"])
            if recipes is not None:
                row["errors_by_corruption"] = errors_by_corruption(recipes, pred != labels)
            if corruption_severities:
                row["per_corruption"] = per_corruption(model.predict, images, labels, corruption_severities,
                                                       seed)
        rows.append(row)
    return rows
