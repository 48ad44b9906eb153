"""Test-time options measured on a run's model: BatchNorm statistics taken from the test set, and zoomed views.

`python -m benchmark.test_time --run runs/<name>` scores the run's model.keras on its test split (holdout.npz), the
split's held-out corrupted copy and its 11 MedMNIST-C copies, with 1 view, the 8 symmetries of the square, and the
8 again at a zoom in and out; then with the BatchNorm layers' statistics re-estimated on all those images pooled,
as the grader's single `predict` call on a test set of mixed damage would allow, and (an oracle) on each set
alone. Prints one line a setting; docs/experiments.md has the figures of a short run.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from trainer import heldout, medmnist_c_eval

ZOOMS = {"8 + zoom in": 1.15, "8 + zoom out": 0.87}  # 1.15: a central crop of 83 px; 0.87: a 14 px mirrored border


def dihedral(x: np.ndarray, view: int) -> np.ndarray:
    """View 0-7 of a batch: view // 4 mirrors left-right, view % 4 quarter turns."""
    if view >= 4:
        x = x[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(x, view % 4, axes=(1, 2)))


def zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom about the centre, same size out: above 1 a central crop, below 1 a mirrored border, both resized."""
    import tensorflow as tf
    side = x.shape[1]
    if factor == 1:
        return x.astype(np.float32)
    if factor > 1:
        crop = int(round(side / factor))
        top = (side - crop) // 2
        return tf.image.resize(x[:, top:top + crop, top:top + crop].astype(np.float32), (side, side)).numpy()
    pad = int(round(side / factor)) - side
    padded = np.pad(x.astype(np.float32), ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2), (0, 0)),
                    mode="reflect")
    return tf.image.resize(padded, (side, side)).numpy()


class BatchNormStats:
    """The model's BatchNormalization statistics: re-estimated from images (adapt) or back to training's (restore)."""

    def __init__(self, model):
        import keras
        self.model = model
        self.layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        self.trained = [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
                        for layer in self.layers]

    def restore(self) -> None:
        for layer, (mean, var) in zip(self.layers, self.trained):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)

    def adapt(self, images: np.ndarray, prior: float = 0.0, batch: int = 256) -> None:
        """Layer by layer (each sees its input through the layers adapted before it), set the statistics to those
        of these images, weighted 1 against prior for training's (prior 0: the images' alone)."""
        import keras
        self.restore()
        keep = prior / (prior + 1.0)
        for layer, (mean, var) in zip(self.layers, self.trained):
            upto = keras.Model(self.model.inputs, layer.input)
            s1 = s2 = 0.0
            count = 0
            for lo in range(0, len(images), batch):
                a = upto.predict(images[lo:lo + batch].astype(np.float32), verbose=0).astype(np.float64)
                a = a.reshape(-1, a.shape[-1])
                s1, s2, count = s1 + a.sum(0), s2 + np.square(a).sum(0), count + len(a)
            new_mean = s1 / count
            new_var = s2 / count - np.square(new_mean)
            layer.moving_mean.assign((keep * mean + (1 - keep) * new_mean).astype(np.float32))
            layer.moving_variance.assign((keep * var + (1 - keep) * new_var
                                          + keep * (1 - keep) * np.square(mean - new_mean)).astype(np.float32))


def scores(model, sets: dict, labels: np.ndarray, views: list, cache: dict | None = None) -> dict:
    """Accuracy on each set with the softmax averaged over views, each a (zoom, dihedral view) pair. A cache
    (set, zoom, view) -> softmax lets settings that share views predict each once; only while the model is unchanged."""
    cache = {} if cache is None else cache
    out = {}
    for name, images in sets.items():
        total = 0.0
        for factor, view in views:
            if (name, factor, view) not in cache:
                cache[name, factor, view] = model.predict(dihedral(zoom(images, factor), view), batch_size=256,
                                                          verbose=0)
            total = total + cache[name, factor, view]
        out[name] = float(np.mean(np.argmax(total, axis=1) == labels))
    return out


def line(tag: str, acc: dict) -> str:
    mmc = {k: v for k, v in acc.items() if k not in ("clean", "heldout")}
    return (f"{tag:22s} clean {acc['clean']:.4f}  held-out {acc['heldout']:.4f}  MedMNIST-C "
            f"{np.mean(list(mmc.values())):.4f}  " + " ".join(f"{k}={v:.3f}" for k, v in mmc.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.test_time", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder with model.keras and holdout.npz")
    parser.add_argument("--seed", type=int, default=42, help="seed of the corrupted copies")
    parser.add_argument("--n", type=int, default=500, help="test images used, at most")
    args = parser.parse_args(argv)
    for name in ("model.keras", "holdout.npz"):
        if not os.path.exists(os.path.join(args.run, name)):
            parser.error(f"{args.run} has no {name}: give the folder of a finished `make train` run")
    import keras

    from trainer import models  # noqa: F401  (registers the custom layers that model.keras names)
    model = keras.models.load_model(os.path.join(args.run, "model.keras"))
    with np.load(os.path.join(args.run, "holdout.npz")) as npz:
        images, labels = npz["images"][:args.n], npz["labels"][:args.n]
    sets = {"clean": images, "heldout": heldout.corrupt_mix(images, seed=args.seed)[0]}
    sets.update({kind: copy for kind, copy, _ in medmnist_c_eval.corrupted(images, args.seed) if copy is not None})
    eight = [(1, v) for v in range(8)]
    print(f"{len(images)} test images of {args.run}; every figure is accuracy")
    trained = {}  # the trained model's predictions, shared by the view settings
    print(line("1 view", scores(model, sets, labels, [(1, 0)], trained)), flush=True)
    print(line("8 symmetries", scores(model, sets, labels, eight, trained)), flush=True)
    for tag, factor in ZOOMS.items():
        print(line(tag, scores(model, sets, labels, eight + [(factor, v) for v in range(8)], trained)), flush=True)
    stats = BatchNormStats(model)
    pooled = np.concatenate(list(sets.values()))
    for prior in (0.0, 1.0):
        stats.adapt(pooled, prior)
        print(line(f"BN from test, prior {prior:g}", scores(model, sets, labels, [(1, 0)])), flush=True)
    # The oracle: each set adapted on itself, as if the grader said which images share a damage.
    oracle = {}
    for name, copy in sets.items():
        stats.adapt(copy)
        oracle.update(scores(model, {name: copy}, labels, [(1, 0)]))
    print(line("BN from each set alone", oracle), flush=True)
    stats.restore()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
