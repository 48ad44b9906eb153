"""Score a model on the MedMNIST-C bloodmnist corruptions: a predict function (runs) or an exported model."""
from __future__ import annotations

import os
import time

import numpy as np

from . import medmnist_c
from .config import CLASS_NAMES
from .evaluate import models_by_views
from .runs import read_json

SEVERITIES = (1, 2, 3, 4, 5)


def severities_for(n: int, kind_index: int) -> np.ndarray:
    """The severity each of n images gets under the kind at kind_index: 1 to 5 in turn, started one further for
    each kind, so a kind sees every severity on a fifth of the images and an image meets every severity across the
    kinds.

    Why one severity per image and kind rather than all five: for the same number of predictions, five times as
    many different images per corruption. An image's five severities mostly share its fate (a hard cell is wrong
    at all of them), so the all-pairs design buys far less than 5x the certainty per prediction.
    """
    return (np.arange(n) + kind_index) % len(SEVERITIES) + 1


def corrupted(images: np.ndarray, seed: int, inks: dict | None = None):
    """Yield (kind, corrupted copy, severity per image) for each MedMNIST-C kind, or (kind, None, why) for a kind
    that cannot run here (stain deposit without the package's inks). Seeded per kind and severity, so a kind's copy
    does not depend on which kinds ran before it."""
    images = medmnist_c.check_images(images)
    why = None
    if inks is None:
        try:
            inks = medmnist_c.load_inks()
        except (FileNotFoundError, ValueError) as err:
            why = f"skipped: {err}"
    for k, kind in enumerate(medmnist_c.KINDS):
        if kind == "stain_deposit" and why:
            yield kind, None, why
            continue
        severities = severities_for(len(images), k)
        out = np.empty_like(images)
        for severity in SEVERITIES:
            rows = np.flatnonzero(severities == severity)
            rng = np.random.default_rng([seed, k, severity])
            out[rows] = medmnist_c.apply(images[rows], kind, severity, rng, inks)
        yield kind, out, severities


def turned_into(labels: np.ndarray, clean_predicted: np.ndarray, predicted: np.ndarray, top: int = 3) -> list:
    """What a corruption turns cells into: among the images the model got right clean and wrong corrupted, the
    commonest (true class, predicted class) pairs with their counts, most first (ties in class order).

    A kind's accuracy says how much it costs; this says which look it imitates (ink blots on a platelet's empty
    field read as a lymphocyte's nucleus, say), which is what an augmentation aimed at it has to teach."""
    new = (clean_predicted == labels) & (predicted != labels)
    pairs, counts = np.unique(np.stack([labels[new], predicted[new]], 1), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    return [{"from": CLASS_NAMES[int(pairs[i, 0])], "to": CLASS_NAMES[int(pairs[i, 1])], "images": int(counts[i])}
            for i in order]


def run_split(model_dir: str) -> tuple[dict, str]:
    """The seen/unseen split for the model in model_dir and where it comes from: the run's own (its config.json,
    medmnist_c.split_for) in a run folder, the kit's (medmnist_c.SPLIT) in a submission folder, which has none."""
    settings = read_json(os.path.join(model_dir, "config.json"))  # {} when missing or unreadable
    if not settings:
        return dict(medmnist_c.SPLIT), "the kit's (no readable config.json beside the model)"
    return medmnist_c.split_for(settings), "the run's training (config.json)"


def summarise(predicted: dict, labels: np.ndarray, clean_predicted: np.ndarray, skipped: dict, seed: int,
              split: dict | None = None) -> dict:
    """The figures from {kind: (predicted class per image, severity per image)}: each kind's accuracy per severity
    and its mean over them, and what it turned right cells into (turned_into); per severity, the mean over kinds;
    overall, over seen and over unseen kinds, each the mean of the kinds' figures. split: {kind: "seen" or
    "unseen"} for the model's training (medmnist_c.split_for), the kit's SPLIT when None."""
    split = split or medmnist_c.SPLIT
    per_corruption = {}
    for kind, (classes, severities) in predicted.items():
        right = classes == labels
        cells = {str(s): float(right[severities == s].mean()) for s in SEVERITIES if (severities == s).any()}
        per_corruption[kind] = {"split": split[kind], "accuracy": float(np.mean(list(cells.values()))),
                                "severities": cells, "turned_into": turned_into(labels, clean_predicted, classes)}

    def mean_of(kinds):
        values = [per_corruption[k]["accuracy"] for k in kinds if k in per_corruption]
        return float(np.mean(values)) if values else None
    per_severity = {}
    for s in map(str, SEVERITIES):
        values = [row["severities"][s] for row in per_corruption.values() if s in row["severities"]]
        if values:
            per_severity[s] = float(np.mean(values))
    unseen = [k for k in medmnist_c.KINDS if split[k] == "unseen"]
    return {"overall": mean_of(medmnist_c.KINDS), "unseen": mean_of(unseen),
            "seen": mean_of([k for k in medmnist_c.KINDS if k not in unseen]),
            "clean": float((clean_predicted == labels).mean()) if len(labels) else None, "images": int(len(labels)),
            "seed": seed, "per_severity": per_severity, "per_corruption": per_corruption, "skipped": skipped}


def _pick(n: int, seed: int, max_images: int | None) -> np.ndarray:
    """Up to max_images indices, drawn with the seed as heldout_eval.score draws its images: the same cells."""
    if max_images is None or max_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))


def score(predict_labels, images: np.ndarray, labels: np.ndarray, seed: int, max_images: int = 500,
          inks: dict | None = None, split: dict | None = None) -> dict:
    """The MedMNIST-C figure of a model: each of up to max_images images under every one of the 11 bloodmnist
    corruptions, at severities 1-5 in turn (severities_for), plus the same images clean.

    predict_labels maps a uint8 batch to class indices; split is summarise()'s. Returns summarise()'s figures and
    the seconds it took.
    """
    started = time.perf_counter()
    pick = _pick(len(images), seed, max_images)
    images, labels = images[pick], labels[pick]
    predicted, skipped = {}, {}
    for kind, copy, severities in corrupted(images, seed, inks):
        if copy is None:
            skipped[kind] = severities
            continue
        predicted[kind] = (np.asarray(predict_labels(copy)), severities)
    result = summarise(predicted, labels, np.asarray(predict_labels(images)), skipped, seed, split)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def evaluate_exported(model_dir: str, images: np.ndarray, labels: np.ndarray, views_list=(1,), seed: int = 42,
                      max_images: int | None = None) -> list[dict]:
    """An exported model (run or submission folder) on the MedMNIST-C copies of up to max_images images (all by
    default), once per number of TTA views: summarise()'s figures, the seconds and images per second.

    The copies are made once and shared by the views; the views are fixed, as in evaluate.evaluate_exported.
    Seen and unseen follow run_split: the run's training in a run folder, the kit's split in a submission folder."""
    split, split_from = run_split(model_dir)
    pick = _pick(len(images), seed, max_images)
    images, labels = images[pick], labels[pick]
    copies = list(corrupted(images, seed))
    rows = []
    for views, model in models_by_views(model_dir, views_list, "medmnist_c_model"):
        started = time.perf_counter()
        predicted = {kind: (model.predict(copy), severities) for kind, copy, severities in copies
                     if copy is not None}
        clean = model.predict(images)
        seconds = time.perf_counter() - started
        skipped = {kind: why for kind, copy, why in copies if copy is None}
        served = len(images) * (len(predicted) + 1)
        rows.append({"views": views, "seconds": seconds, "img_per_s": served / seconds if seconds else 0.0,
                     **summarise(predicted, labels, clean, skipped, seed, split), "split_from": split_from})
    return rows


def table(result: dict) -> str:
    """summarise()'s figures as aligned text: a row per corruption (seen or unseen, each severity, mean, its
    commonest new error), then per severity, and the overall, seen and unseen means."""
    def cell(value):
        return f"{value:>7.3f}" if value is not None else f"{'-':>7}"
    lines = [f"{'corruption':<18}{'split':<8}" + "".join(f"{'sev ' + str(s):>7}" for s in SEVERITIES)
             + f"{'mean':>7}  commonest new error (right clean, wrong here)"]
    for kind, row in result["per_corruption"].items():
        lines.append(f"{kind:<18}{row['split']:<8}" + "".join(cell(row["severities"].get(str(s)))
                                                               for s in SEVERITIES) + cell(row["accuracy"])
                     + f"  {first_turn(row)}")
    lines.append(f"{'all kinds':<26}" + "".join(cell(result["per_severity"].get(str(s))) for s in SEVERITIES)
                 + cell(result["overall"]))
    lines.append(f"overall {_fmt(result['overall'])}, unseen kinds {_fmt(result['unseen'])}, seen kinds "
                 f"{_fmt(result['seen'])}, clean {_fmt(result['clean'])} ({result['images']} images each)")
    if result.get("split_from"):
        lines.append(f"seen and unseen: {result['split_from']}")
    for kind, why in result["skipped"].items():
        lines.append(f"{kind}: {why}")
    return "\n".join(lines)


def first_turn(row: dict) -> str:
    """A kind's commonest new error as 'Platelet -> Lymphocyte (31)', or '-' (none, or figures older than it)."""
    turns = row.get("turned_into") or []
    return f"{turns[0]['from']} -> {turns[0]['to']} ({turns[0]['images']})" if turns else "-"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
