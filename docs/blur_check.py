"""Are blurred basophils lost to blur itself, or to too little blur in training? Two probes on a finished run.

Not part of the kit: the probes behind a note in docs/experiments.md.

`classes` scores a run's model (1 view) on its test cells clean, under the training stage's own Gaussian blur at
sigma 1-4, and under MedMNIST-C's defocus and motion blur at severities 1-5, per class: if Gaussian-blurred
basophils are lost as often as defocused ones, the kernel's shape is not the problem.

`tune` trains a finished run's model 400 more steps (Adam at 1e-4, fresh) on its own training cells through its
own augmentation pipeline, with a share of each batch then blurred by a Gaussian of sigma uniform in 1 to
--max-sigma (the kit's corruption-stage blur; labels as the pipeline made them). --blur-share 0 is the control:
the same steps without the extra blur. It writes model.keras, model.onnx, config.json and settings.json to OUT,
ready for `python -m trainer evaluate --model OUT --data runs/<name>/holdout.npz --medmnist-c ...`:

    PYTHONPATH=. .venv/bin/python docs/blur_check.py classes runs/<name> [--model OTHER.keras]
    PYTHONPATH=. .venv/bin/python docs/blur_check.py tune runs/<name> OUT [--blur-share 0.5] [--data ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil

import numpy as np

from trainer import medmnist_c, models  # noqa: F401  (models registers the layers the Keras file names)
from trainer.config import CLASS_NAMES
from trainer.evaluate import predict_probs

WATCHED = (0, 3, 4, 2)  # Basophil, Immature granulocytes, Lymphocyte, Erythroblast: where blur moves cells
DEFAULT_DATA = "../shared/data/training_set.npz"


def gaussian(images: np.ndarray, sigma: float) -> np.ndarray:
    """The training stage's Gaussian blur (mirrored borders) at one sigma, rounded back to uint8."""
    from trainer.augment import reflect_blur_matrix
    rows = reflect_blur_matrix(images.shape[1], sigma).numpy()
    cols = reflect_blur_matrix(images.shape[2], sigma).numpy()
    out = np.einsum("ij,bjkc->bikc", rows, images.astype(np.float32))
    out = np.einsum("kl,bilc->bikc", cols, out)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def classes(args) -> None:
    import keras
    held = np.load(os.path.join(args.run, "holdout.npz"))
    images, labels = held["images"], held["labels"]
    model = keras.models.load_model(args.model or os.path.join(args.run, "model.keras"), compile=False)
    rng = np.random.default_rng(0)
    copies = [("clean", images)] + [(f"gaussian {s:g}", gaussian(images, s)) for s in (1.0, 2.0, 3.0, 4.0)]
    copies += [(f"defocus {v}", medmnist_c.defocus_blur(images, v, rng)) for v in range(1, 6)]
    copies += [(f"motion {v}", medmnist_c.motion_blur(images, v, rng)) for v in range(1, 6)]
    counts = {c: int(np.sum(labels == c)) for c in WATCHED}
    print(f"{args.run}: {len(labels)} test cells, 1 view; per class: share kept ("
          + ", ".join(f"{CLASS_NAMES[c]} {counts[c]}" for c in WATCHED) + ")")
    print(f"{'copy':<12} {'all':>6} " + " ".join(f"{CLASS_NAMES[c][:12]:>12}" for c in WATCHED) + "  Baso->IG")
    for name, copy in copies:
        predicted = predict_probs(model, copy).argmax(1)
        kept = " ".join(f"{np.mean(predicted[labels == c] == c):>12.3f}" for c in WATCHED)
        print(f"{name:<12} {np.mean(predicted == labels):>6.3f} {kept}  {np.sum(predicted[labels == 0] == 3):>8}")


def run_split(run: str, data_path: str):
    """The run's training cells and labels, rebuilt from the data file, cleaning.json and split.npz."""
    from trainer.data import load_npz
    config = json.load(open(os.path.join(run, "config.json")))
    if config.get("limit"):
        raise SystemExit(f"{run} trained on a --limit subset; this probe rebuilds full splits only")
    images, labels = load_npz(data_path)
    gone = np.zeros(len(images), bool)
    for removed in json.load(open(os.path.join(run, "cleaning.json")))["removed_indices"].values():
        gone[np.asarray(removed, int)] = True
    images, labels = images[~gone], labels[~gone]
    split = np.load(os.path.join(run, "split.npz"))
    if not np.array_equal(images[split["test"]], np.load(os.path.join(run, "holdout.npz"))["images"]):
        raise SystemExit(f"{data_path} rebuilt with {run}'s cleaning does not give its test cells; pass the data "
                         "file the run trained on with --data")
    return images[split["train"]], labels[split["train"]]


def tune(args) -> None:
    import keras
    import tensorflow as tf

    from trainer import augment
    from trainer.config import load_config
    from trainer.export import export_onnx
    cfg = load_config(os.path.join(args.run, "config.json"))
    images, labels = run_split(args.run, args.data)
    ds = augment.train_dataset(images, labels, cfg)
    draw = tf.random.Generator.from_seed(cfg.seed + 1)

    def more_blur(x, y):
        n = tf.shape(x)[0]
        strength = draw.uniform([n, 1, 1, 1], 1.0 / args.max_sigma, 1.0)  # sigma = strength * max_sigma
        picked = draw.uniform([n, 1, 1, 1]) < args.blur_share
        blurred = tf.clip_by_value(augment._blur(x, strength, max_sigma=args.max_sigma), 0.0, 255.0)
        return tf.where(picked, blurred, x), y
    if args.blur_share > 0:
        ds = ds.map(more_blur)
    model = keras.models.load_model(os.path.join(args.run, "model.keras"))
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=keras.losses.CategoricalCrossentropy())
    model.fit(ds, steps_per_epoch=args.steps, epochs=1, verbose=2)
    os.makedirs(args.out, exist_ok=True)
    model.save(os.path.join(args.out, "model.keras"))
    check = np.load(os.path.join(args.run, "holdout.npz"))["images"][:32]
    export_onnx(model, os.path.join(args.out, "model.onnx"), check)
    shutil.copy(os.path.join(args.run, "config.json"), args.out)  # evaluate reads seen / unseen kinds from it
    settings = json.load(open(os.path.join(args.run, "settings.json")))
    settings["model_sha256"] = hashlib.sha256(open(os.path.join(args.out, "model.onnx"), "rb").read()).hexdigest()
    json.dump(settings, open(os.path.join(args.out, "settings.json"), "w"), indent=1)
    print(f"wrote {args.out}: {args.steps} steps, blur share {args.blur_share}, sigma 1-{args.max_sigma:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    one = verbs.add_parser("classes", help="per-class accuracy under Gaussian, defocus and motion blur")
    one.add_argument("run", help="a run folder: model.keras, holdout.npz")
    one.add_argument("--model", help="score this Keras file on the run's test cells instead of the run's model")
    two = verbs.add_parser("tune", help="400 more steps on the run's pipeline, with extra Gaussian blur")
    two.add_argument("run", help="a run folder: model.keras, config.json, cleaning.json, split.npz, holdout.npz")
    two.add_argument("out", help="folder for the tuned model.keras, model.onnx, config.json, settings.json")
    two.add_argument("--blur-share", type=float, default=0.5, help="share of each batch blurred; 0 = control")
    two.add_argument("--max-sigma", type=float, default=4.0, help="largest sigma of the extra blur, px")
    two.add_argument("--steps", type=int, default=400, help="training steps")
    two.add_argument("--data", default=os.environ.get("DATA", DEFAULT_DATA), help="the run's training_set.npz")
    args = parser.parse_args()
    classes(args) if args.verb == "classes" else tune(args)


if __name__ == "__main__":
    main()
