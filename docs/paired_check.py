"""Do two runs differ beyond the test cells' noise? Every cell under every corruption at every severity, paired.

Not part of the kit: a probe behind notes in docs/experiments.md. A run's own MedMNIST-C figure gives each of 500
cells one severity per corruption, so a kind's mean rests on 500 predictions and moves by a point or two between
equally good models. This scores two runs' exported models (1 view, served by submission/model.py as the zip
serves it) on every test cell of the first run's holdout.npz under each of MedMNIST-C's 11 corruptions and each of
the 18 held-out ones, at each severity 1-5: the same copies for both models. Each figure is a mean over cells of
a per-cell score, so its difference gets a 95% interval from a paired bootstrap over the cells:

    PYTHONPATH=. .venv/bin/python docs/paired_check.py runs/<a> runs/<b> [--seed 42] [--workers 2]

The interval covers the test cells' sampling only, not training's: two seeds still decide. Both runs must share
a test split (the same --seed). The copies take 145 passes over the cells; on 2 cores the whole check takes about
15 minutes. The inks are read as `evaluate --medmnist-c` reads them.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from trainer import heldout, medmnist_c
from trainer.evaluate import models_by_views
from trainer.medmnist_c_eval import SEVERITIES


def jobs(seed: int) -> list[tuple]:
    """(suite, kind index, kind, severity, seed) for every copy: MedMNIST-C's kinds, then the held-out ones."""
    return ([("mmc", k, kind, s, seed) for k, kind in enumerate(medmnist_c.KINDS) for s in SEVERITIES]
            + [("held", k, kind, s, seed) for k, kind in enumerate(heldout.HELD_OUT) for s in SEVERITIES])


def make_copy(job: tuple, images: np.ndarray) -> np.ndarray:
    """One corrupted copy, seeded by its suite's kind index and severity so it never depends on the others."""
    suite, k, kind, severity, seed = job
    rng = np.random.default_rng([seed, k, severity])
    if suite == "mmc":
        return medmnist_c.apply(images, kind, severity, rng, medmnist_c.load_inks())
    return heldout.apply(images, kind, severity, rng)


def _copy_worker(args):
    job, path, n = args
    with np.load(path) as data:
        return make_copy(job, data["images"][:n])


def right_per_copy(run: str, images: np.ndarray, labels: np.ndarray, copies: dict) -> dict:
    """{(suite, kind, severity) or "clean": whether the run's model got each cell right}."""
    for _, model in models_by_views(run, [1], "paired_check_model"):
        right = {"clean": model.predict(images) == labels}
        right.update({key: model.predict(copy) == labels for key, copy in copies.items()})
    return right


def figures(right: dict) -> dict:
    """Per-cell scores: clean; each kind's mean over its severities; MedMNIST-C overall and its unseen kinds; the
    held-out kinds' mean. A figure's mean over the cells is the usual accuracy."""
    def kinds(suite, names):
        return {kind: np.mean([right[(suite, kind, s)] for s in SEVERITIES], axis=0) for kind in names}
    mmc, held = kinds("mmc", medmnist_c.KINDS), kinds("held", heldout.HELD_OUT)
    out = {"clean": right["clean"].astype(float), "MedMNIST-C": np.mean(list(mmc.values()), axis=0),
           "MedMNIST-C unseen kinds": np.mean([mmc[k] for k in medmnist_c.UNSEEN], axis=0),
           "held-out kinds' mean": np.mean(list(held.values()), axis=0)}
    out.update({f"  {kind}": score for kind, score in mmc.items()})
    out.update({f"  held-out {kind}": score for kind, score in held.items()})
    return out


def compare(a: dict, b: dict, draws: int = 2000, seed: int = 0) -> list[tuple]:
    """(figure, a's mean, b's mean, b - a, low, high) with the paired bootstrap's 95% interval of b - a."""
    n = len(a["clean"])
    picks = np.random.default_rng(seed).integers(0, n, (draws, n))
    rows = []
    for name in a:
        diff = b[name] - a[name]
        low, high = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
        rows.append((name, a[name].mean(), b[name].mean(), diff.mean(), low, high))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="a run folder with model.onnx and holdout.npz (the baseline)")
    parser.add_argument("b", help="a run folder with model.onnx, trained on the same split")
    parser.add_argument("--seed", type=int, default=42, help="seeds the corrupted copies")
    parser.add_argument("--workers", type=int, default=2, help="processes that make the copies")
    parser.add_argument("--images", type=int, default=None, help="only the first N test cells (a quick look)")
    args = parser.parse_args()
    path = f"{args.a}/holdout.npz"
    with np.load(path) as data:
        images, labels = data["images"][:args.images], data["labels"][:args.images]
    with np.load(f"{args.b}/holdout.npz") as other:
        if not np.array_equal(other["labels"][:args.images], labels):
            raise SystemExit(f"{args.a} and {args.b} have different test splits; train both with the same --seed")
    todo = jobs(args.seed)
    with ProcessPoolExecutor(args.workers) as pool:
        made = pool.map(_copy_worker, [(job, path, args.images) for job in todo])
        copies = {(suite, kind, severity): copy for (suite, _, kind, severity, _), copy in zip(todo, made)}
    a = figures(right_per_copy(args.a, images, labels, copies))
    b = figures(right_per_copy(args.b, images, labels, copies))
    print(f"{'figure':<34}{'a':>8}{'b':>8}{'b - a':>8}  95% interval, points ({len(labels)} cells, paired)")
    for name, mean_a, mean_b, diff, low, high in compare(a, b):
        mark = " *" if low > 0 or high < 0 else ""
        print(f"{name:<34}{mean_a:>8.4f}{mean_b:>8.4f}{100 * diff:>+8.1f}  [{100 * low:+.1f}, {100 * high:+.1f}]{mark}")


if __name__ == "__main__":
    main()
