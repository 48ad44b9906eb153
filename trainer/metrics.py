"""Classification metrics from true and predicted labels: numpy only, for the trainer and the benchmark alike."""
from __future__ import annotations

import numpy as np

from .config import CLASS_NAMES
from .data import NUM_CLASSES


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
