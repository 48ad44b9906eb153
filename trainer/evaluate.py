"""Metrics, plots and robustness scores of a trained model."""
from __future__ import annotations

import numpy as np

from .config import CLASS_NAMES
from .data import NUM_CLASSES, save_figure


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, macro precision/recall/F1, per-class figures and the confusion matrix (rows = true)."""
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    present = support > 0
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                             "support": int(support[c])} for c, name in enumerate(CLASS_NAMES)},
        "confusion_matrix": cm.tolist(),
    }


def predict_probs(model, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Keras probabilities in inference mode, in batches."""
    if len(images) == 0:
        return np.zeros((0, NUM_CLASSES), np.float32)
    return np.asarray(model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0))


def train_vs_inference_mode(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> dict:
    """Accuracy on the same images in training mode (batch statistics) and in inference mode (moving statistics).

    A large gap means BatchNormalization's moving statistics do not describe the data the model sees: the
    model looks fine while it trains and fails when it predicts. Dropout is switched off for the comparison,
    so the two differ in their BatchNorm statistics alone. No weights or statistics change.
    """
    import keras
    import tensorflow as tf
    x = images.astype(np.float32)
    dropouts = [l for l in model._flatten_layers() if isinstance(l, keras.layers.Dropout)]
    rates = [d.rate for d in dropouts]
    bns = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    moments = [bn.momentum for bn in bns]
    train_pred, infer_pred = [], []
    try:
        for d in dropouts:
            d.rate = 0.0
        for bn in bns:
            bn.momentum = 1.0  # training mode would otherwise update the moving statistics
        for start in range(0, len(x), batch_size):
            batch = tf.constant(x[start:start + batch_size])
            train_pred.append(np.asarray(model(batch, training=True)).argmax(1))
            infer_pred.append(np.asarray(model(batch, training=False)).argmax(1))
    finally:
        for d, r in zip(dropouts, rates):
            d.rate = r
        for bn, m in zip(bns, moments):
            bn.momentum = m
    train_acc = float((np.concatenate(train_pred) == labels).mean())
    infer_acc = float((np.concatenate(infer_pred) == labels).mean())
    return {"training_mode_accuracy": train_acc, "inference_mode_accuracy": infer_acc,
            "gap": train_acc - infer_acc, "images": int(len(x))}


def robustness(predict, images: np.ndarray, labels: np.ndarray, seed: int, max_images: int = 500) -> dict:
    """Accuracy on a corrupted copy (1-3 random corruptions per image) and per family and severity."""
    from . import corrupt
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
    from . import corrupt
    table = {}
    for name in corrupt.CORRUPTIONS:
        table[name] = {}
        for severity in severities:
            altered = corrupt.apply(images, name, severity, np.random.default_rng(seed + severity))
            table[name][str(severity)] = float((predict_labels(altered) == labels).mean())
    return table


def errors_by_corruption(recipes: list, wrong: np.ndarray) -> dict:
    """Per corruption of a corrupt_mix copy: how many images got it and how many of those the model got wrong,
    in all and at severity 4-5, worst first.

    An image with two corruptions counts for both, so the rows say which corruptions the errors come with; they
    do not split the errors between them.
    """
    from . import corrupt
    table = {name: {"images": 0, "wrong": 0, "images_sev45": 0, "wrong_sev45": 0} for name in corrupt.CORRUPTIONS}
    for recipe, bad in zip(recipes, wrong):
        for name, severity in recipe:
            row = table[name]
            row["images"] += 1
            row["wrong"] += int(bad)
            if severity >= 4:
                row["images_sev45"] += 1
                row["wrong_sev45"] += int(bad)
    return dict(sorted(table.items(), key=lambda item: -item[1]["wrong"]))


def errors_table(table: dict) -> str:
    """errors_by_corruption's result as aligned text, one row per corruption."""
    from . import corrupt
    header = (("images", 7), ("wrong", 7), ("rate", 7), ("sev 4-5", 9), ("wrong", 7), ("rate", 7))
    lines = [f"{'corruption':<16}{'family':<13}" + "".join(f"{text:>{width}}" for text, width in header)]
    for name, r in table.items():
        rate = r["wrong"] / r["images"] if r["images"] else 0.0
        rate45 = r["wrong_sev45"] / r["images_sev45"] if r["images_sev45"] else 0.0
        lines.append(f"{name:<16}{corrupt.FAMILY_OF[name]:<13}{r['images']:>7}{r['wrong']:>7}{rate:>7.3f}"
                     f"{r['images_sev45']:>9}{r['wrong_sev45']:>7}{rate45:>7.3f}")
    return "\n".join(lines)


def corruption_table(table: dict) -> str:
    """per_corruption's result as aligned text: one row per corruption, one column per severity."""
    from . import corrupt
    severities = list(next(iter(table.values())))
    lines = [f"{'corruption':<16}{'family':<13}" + "".join(f"{'sev ' + s:>8}" for s in severities)]
    for name, row in table.items():
        lines.append(f"{name:<16}{corrupt.FAMILY_OF[name]:<13}" + "".join(f"{row[s]:>8.3f}" for s in severities))
    return "\n".join(lines)


def plot_curves(history: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("accuracy", "loss")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key, [])
            if values:
                ax.plot(range(1, len(values) + 1), values, style, marker="o", markersize=3,
                        label=("val " if prefix else "train ") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_confusion(cm: list, path: str, title: str = "Confusion matrix") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > cm.max() / 2 else "black")
    short = [n[:12] for n in CLASS_NAMES]
    ax.set_xticks(range(NUM_CLASSES), short, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(NUM_CLASSES), short, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)


def plot_robustness(per_family: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family, scores in per_family.items():
        ax.plot(range(len(scores)), scores, marker="o", label=family)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy against corruption severity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


# ---- scoring an exported model through submission/model.py -------------------------------------------

def load_submission(folder: str, name: str):
    """Model() of the submission in folder, imported under its own module name so several can coexist."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model()


def evaluate_exported(model_dir: str, images: np.ndarray, labels: np.ndarray | None,
                      views_list=(1, 2, 4, 8), corruption_severities=(), seed: int = 0,
                      recipes: list | None = None) -> list[dict]:
    """Accuracy and speed of an exported model on images, once per number of TTA views.

    With corruption_severities (and labels), each row also holds per_corruption's table for that many views.
    With recipes (corrupt_mix's, for a corrupted copy) and labels, each row holds errors_by_corruption's table.

    model_dir is a submission folder (with model.py), or a run folder whose model goes under submission/model.py.
    """
    import os
    import tempfile
    import time
    from benchmark.bench import prepare_submission, variant
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from_run = not os.path.exists(os.path.join(model_dir, "model.py"))
    source = os.path.join(root, "submission") if from_run else model_dir
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        staged = prepare_submission(source, model_dir, from_run, os.path.join(workdir, "staged"))
        for views in views_list:
            # A budget nobody can exceed, so the views are the ones asked for and not what the clock allows.
            folder = variant(staged, os.path.join(workdir, f"views{views}"), max_views=views, tta=views > 1,
                             budget_per_image_s=1e9)
            model = load_submission(folder, f"submission_model_views{views}")
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
