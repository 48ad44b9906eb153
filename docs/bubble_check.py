"""Where MedMNIST-C's bubbles mislead a model: over the centred cell, or over the background around it?

Not part of the kit: a probe behind a note in docs/experiments.md. It scores a run's exported model (1 view,
served by submission/model.py as the zip serves it) on the run's test cells under bubbles drawn as
trainer/medmnist_c.py draws them (the package's sizes and counts at severities 1, 3 and 5, white at the same
opacities), placed three ways: anywhere in the image as the package places them, with every disc's centre within
20 px of the image's centre (over the cell, which the crops centre), or every centre at least 34 px from it (the
background and corners). For each it counts the cells right when clean and wrong under bubbles, and the two
commonest pairs of true and predicted class among them:

    PYTHONPATH=. .venv/bin/python docs/bubble_check.py runs/<name> [--images 1042]
"""
from __future__ import annotations

import argparse

import numpy as np

from trainer import medmnist_c
from trainer.evaluate import models_by_views
from trainer.medmnist_c_eval import turned_into

PLACES = {"anywhere": lambda d: True, "over the cell": lambda d: d <= 20, "background": lambda d: d >= 34}


def discs(n: int, side: int, severity: int, near, rng: np.random.Generator) -> list:
    """For each of n images, the package's number and sizes of bubbles [(x, y, radius)] at this severity, each
    drawn again until near(distance of its centre from the image's centre) holds."""
    largest, most = medmnist_c.BUBBLE[severity - 1]
    out = []
    for _ in range(n):
        drawn = []
        for _ in range(int(rng.integers(7, most, endpoint=True))):
            while True:
                r = int(rng.integers(medmnist_c.BUBBLE_SMALLEST_RADIUS, largest, endpoint=True))
                x, y = (int(v) for v in rng.integers(r, side - r, size=2, endpoint=True))
                if near(np.hypot(x - side / 2, y - side / 2)):
                    break
            drawn.append((x, y, r))
        out.append(drawn)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder with model.onnx and holdout.npz")
    parser.add_argument("--images", type=int, default=1042, help="test cells scored (the first N of holdout.npz)")
    args = parser.parse_args()
    split = np.load(f"{args.run}/holdout.npz")
    images, labels = split["images"][:args.images], split["labels"].ravel()[:args.images]
    (_, model), = models_by_views(args.run, (1,), "bubble_check_model")  # served as the zip serves it, 1 view
    clean = model.predict(images)
    print(f"{args.run}: clean {np.mean(clean == labels):.3f} on {len(images)} cells")
    for severity in (1, 3, 5):
        for place, near in PLACES.items():
            bubbled = medmnist_c._bubble(images, discs(len(images), images.shape[1], severity, near,
                                                       np.random.default_rng(severity)))
            predicted = model.predict(bubbled)
            newly_wrong = int(((clean == labels) & (predicted != labels)).sum())
            top = ", ".join(f"{pair['from']} -> {pair['to']} {pair['images']}"
                            for pair in turned_into(labels, clean, predicted, top=2))
            print(f"  severity {severity}  {place:14s} accuracy {np.mean(predicted == labels):.3f}  "
                  f"newly wrong {newly_wrong:4d}  ({top})")


if __name__ == "__main__":
    main()
