"""Would a balanced decision help on MedMNIST-C's blurs? A run's probabilities divided by its classes' shares.

Not part of the kit: a probe behind a note in docs/experiments.md. Under defocus and motion blur most new errors
are basophils read as immature granulocytes, the rarer class lost to a commoner one; if the model's prior is what
tips a blurred cell, dividing each class's probability by its share of the cells (raised to tau: 0 = the model's
own decision, 1 = fully balanced) should win those cells back. It scores the run's Keras model (1 view) on its
test cells clean and on MedMNIST-C's copies of its robustness_images of them (500 in the cpu profile: the cells
and seed the run's own figure used):

    PYTHONPATH=. .venv/bin/python docs/prior_check.py runs/<name> [--taus 0,0.5,1]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from trainer import medmnist_c_eval, models  # noqa: F401  (models registers the layers the Keras file names)
from trainer.data import NUM_CLASSES
from trainer.evaluate import predict_probs

BLURS = ("defocus_blur", "motion_blur")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder: model.keras, holdout.npz, config.json")
    parser.add_argument("--taus", default="0,0.5,1", help="powers of the class shares to divide by, comma-separated")
    args = parser.parse_args()
    import keras

    config = json.load(open(os.path.join(args.run, "config.json")))
    seed = config["seed"]
    held = np.load(os.path.join(args.run, "holdout.npz"))
    images, labels = held["images"], held["labels"]
    model = keras.models.load_model(os.path.join(args.run, "model.keras"), compile=False)
    share = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)  # the split is stratified: training's shares
    pick = medmnist_c_eval._pick(len(images), seed, config["robustness_images"])
    cells, truth = images[pick], labels[pick]
    copies = [(kind, copy, severities) for kind, copy, severities in medmnist_c_eval.corrupted(cells, seed)
              if copy is not None]
    clean = predict_probs(model, images)
    probs = {kind: (predict_probs(model, copy), severities) for kind, copy, severities in copies}
    basophils = truth == 0
    print(f"{args.run}: {len(labels)} test cells clean, {len(cells)} under each MedMNIST-C kind (seed {seed}), 1 view")
    print(f"{'tau':>5} {'clean':>7} {'MMC':>7} {'defocus':>8} {'motion':>7} {'blurs':>7} {'others':>7}"
          f" {'basophils kept under defocus':>29}")
    for tau in (float(t) for t in args.taus.split(",")):
        def decide(p, tau=tau):
            return (p / share ** tau).argmax(1)
        # The kit's own summary, so each kind's figure is the mean over severities that the run's figure is.
        result = medmnist_c_eval.summarise({kind: (decide(p), sev) for kind, (p, sev) in probs.items()}, truth,
                                           decide(clean[pick]), {}, seed)
        acc = {kind: row["accuracy"] for kind, row in result["per_corruption"].items()}
        blurs = np.mean([acc[k] for k in BLURS])
        others = np.mean([v for k, v in acc.items() if k not in BLURS])
        kept = np.mean(decide(probs["defocus_blur"][0])[basophils] == 0)
        print(f"{tau:>5.2f} {np.mean(decide(clean) == labels):>7.4f} {result['overall']:>7.4f}"
              f" {acc['defocus_blur']:>8.3f} {acc['motion_blur']:>7.3f} {blurs:>7.3f} {others:>7.3f}"
              f" {kept:>20.2f} of {basophils.sum()}")


if __name__ == "__main__":
    main()
