"""What about MedMNIST-C's stain deposit misleads a model: the ink's colour, or the blot's ragged outline?

Not part of the kit: a probe behind a note in docs/experiments.md. It scores a run's exported model (1 view,
served by submission/model.py as the zip serves it) on the run's test cells under stain deposit at severities
1-5 as trainer/medmnist_c.py draws it, then on the same marks at the same places painted another colour, and on
squares of each blot's area centred where the blot is:

    PYTHONPATH=. .venv/bin/python docs/ink_check.py runs/<name> [--images 500]

The inks are read from the installed medmnistc package or $MEDMNIST_C_INKS, as `evaluate --medmnist-c` reads them.
"""
from __future__ import annotations

import argparse

import numpy as np

from trainer import medmnist_c
from trainer.evaluate import models_by_views
from trainer.medmnist_c_eval import SEVERITIES


def squares_like(masks: np.ndarray) -> np.ndarray:
    """For each (side, side) ink mask, a filled square of about its area centred on the ink's centroid."""
    out = np.zeros_like(masks)
    side = masks.shape[1]
    for k, mask in enumerate(masks):
        rows, cols = np.nonzero(mask)
        edge = int(round(np.sqrt(mask.sum())))
        top = int(np.clip(rows.mean() - edge // 2, 0, side - edge))
        left = int(np.clip(cols.mean() - edge // 2, 0, side - edge))
        out[k, top:top + edge, left:left + edge] = True
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder with model.onnx and holdout.npz")
    parser.add_argument("--images", type=int, default=500, help="test cells scored (the first N of holdout.npz)")
    args = parser.parse_args()
    split = np.load(f"{args.run}/holdout.npz")
    images, labels = split["images"][:args.images], split["labels"].ravel()[:args.images]
    (_, model), = models_by_views(args.run, (1,), "ink_check_model")  # served as the zip serves it, 1 view

    def accuracy(x: np.ndarray) -> float:
        return float((model.predict(x) == labels).mean())

    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    nucleus = np.median(images[luma <= np.percentile(luma, 3)], axis=0).astype(np.uint8)  # darkest 3% of pixels
    inks = medmnist_c.load_inks()
    shapes = {"ink blot": inks, "square of its area": {key: squares_like(m) for key, m in inks.items()}}
    paints = {"black": None, f"nucleus {tuple(int(v) for v in nucleus)}": nucleus, "grey 128": 128, "white": 255}
    print(f"{args.run}: clean {accuracy(images):.3f} on {len(images)} cells; stain deposit by severity 1-5")
    for shape, masks in shapes.items():
        for paint, colour in paints.items():
            if shape != "ink blot" and paint not in ("black", "white"):
                continue
            scores = []
            for severity in SEVERITIES:
                stained = medmnist_c.stain_deposit(images, severity, np.random.default_rng(severity), inks=masks)
                if colour is not None:  # the ink is pure black; a cell's own pixels never are
                    inked = np.all(stained == 0, axis=-1) & ~np.all(images == 0, axis=-1)
                    stained[inked] = colour
                scores.append(accuracy(stained))
            print(f"  {shape:18s} {paint:22s} mean {np.mean(scores):.3f}  " + " / ".join(f"{s:.3f}" for s in scores))


if __name__ == "__main__":
    main()
