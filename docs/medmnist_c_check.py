"""Check trainer/medmnist_c.py against the medmnistc package's own bloodmnist corruptions, on real cells at 96x96.

Not part of the kit: it imports the package's code, which the kit never does, so run it in a throwaway
environment (docs/robustness.md, "MedMNIST-C", says how it was made):

    python3 -m venv /tmp/mmc && /tmp/mmc/bin/pip install medmnistc==0.1.0 pillow==<the kit's pin>
    apt-get install -y libmagickwand-dev          # ImageMagick, for the package's motion blur (Wand)
    PYTHONPATH=. /tmp/mmc/bin/python docs/medmnist_c_check.py --data data/training_set.npz --png check.png

Deterministic corruptions are compared pixel for pixel. The random ones are compared twice: pixel for pixel with
the package's own random draws handed to our renderers (so the drawing is checked exactly), and by statistics of
each side drawing its own (mean absolute change from the clean cell, PSNR), with a side-by-side sheet to look at.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import types

import numpy as np
from PIL import Image, ImageDraw

from trainer import medmnist_c as ours

DETERMINISTIC = ("pixelate", "jpeg_compression", "defocus_blur", "brightness_up", "brightness_down", "contrast_up",
                 "contrast_down", "saturate")
RANDOM = ("motion_blur", "stain_deposit", "bubble")


def package_registry():
    """The package's bloodmnist corruptions. Its modules import torchvision for two corruptions bloodmnist does not
    use (Gaussian blur, gamma); where torchvision cannot load, a stand-in that fails if called takes its place.
    numpy 2 removed the binary np.fromstring that its motion blur calls; frombuffer is the same read."""
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # noqa: BLE001  a CPU torch without a matching torchvision raises RuntimeError
        def unused(*args, **kwargs):
            raise RuntimeError("torchvision stand-in called: a bloodmnist corruption needs torchvision after all")
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.gaussian_blur = functional.adjust_gamma = unused
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = functional
        torchvision = types.ModuleType("torchvision")
        torchvision.transforms = transforms
        for name in list(sys.modules):
            if name.startswith("torchvision"):
                del sys.modules[name]
        sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": functional})
    np.fromstring = lambda data, dtype=float: np.frombuffer(data, dtype)  # this process only
    from medmnistc.corruptions.registry import CORRUPTIONS_DS
    return CORRUPTIONS_DS["bloodmnist"]


def run_package(corruptor, images, severity):
    return np.stack([corruptor.apply(Image.fromarray(image), severity - 1) for image in images])


def difference(a, b) -> dict:
    d = np.abs(a.astype(np.int16) - b)
    return {"max": int(d.max()), "mean": float(d.mean()), "share_differing": float((d > 0).mean())}


def psnr(images, clean) -> np.ndarray:
    mse = ((images.astype(np.float64) - clean) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def statistics(images, clean) -> dict:
    change = np.abs(images.astype(np.float64) - clean).mean(axis=(1, 2, 3))
    p = psnr(images, clean)
    return {"mean_abs_change": float(change.mean()), "psnr_mean": float(p.mean()),
            "psnr_p10": float(np.percentile(p, 10)), "psnr_p50": float(np.percentile(p, 50)),
            "psnr_p90": float(np.percentile(p, 90))}


def package_draws(kind, images, severity, seed):
    """The package's own random draws for each image, replayed from its random generators with the same seed, in
    the order its apply() makes them; to hand to our renderers."""
    n, h, w, _ = images.shape
    if kind == "motion_blur":
        np.random.seed(seed)
        return [float(np.random.uniform(-45, 45)) for _ in range(n)]
    random.seed(seed)
    if kind == "stain_deposit":
        most, side = ours.STAIN_MARKS[severity - 1], {"3": 24, "4": 32}[ours.STAIN_INK_SET[severity - 1]]
        marks = np.full((n, most, 3), -1)
        for i in range(n):
            for m in range(random.randint(1, most) if most > 1 else most):
                ink = random.randint(0, 9)
                left, top = random.randint(10, w - side - 10), random.randint(10, h - side - 10)
                marks[i, m] = ink, top, left
        return marks
    largest, most = ours.BUBBLE[severity - 1]
    bubbles = []
    for _ in range(n):
        drawn = []
        for _ in range(random.randint(7, most)):
            r = random.randint(3, largest)
            drawn.append((random.randint(r, w - r), random.randint(r, h - r), r))
        bubbles.append(drawn)
    return bubbles


def replay_package(corruptor, kind, images, severity, seed):
    """The package's output with the generators seeded as package_draws seeds them."""
    np.random.seed(seed)
    random.seed(seed)
    return run_package(corruptor, images, severity)


def replay_ours(kind, images, severity, draws, inks):
    if kind == "motion_blur":
        return ours._motion_blur(images, *ours.MOTION[severity - 1], np.array(draws))
    if kind == "stain_deposit":
        return ours._stain(images, inks[ours.STAIN_INK_SET[severity - 1]], draws)
    return ours._bubble(images, draws)


def sheet(rows, path):
    """A PNG: one row per (label, [images]), cells at 2x."""
    cell, label_width = 192, 260
    width = label_width + cell * max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (width, cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST),
                         (label_width + c * cell, r * cell))
    canvas.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/training_set.npz")
    parser.add_argument("--n", type=int, default=300, help="cells compared per corruption and severity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inks", help="the package's inks.npz (default: found as trainer/medmnist_c.py finds it)")
    parser.add_argument("--png", default="medmnist_c_check.png", help="the side-by-side sheet")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    with np.load(args.data) as data:
        pool = data["images"][:-1800]  # the last 1,800 rows of the course's file are junk, not cells
    images = pool[np.sort(np.random.default_rng(args.seed).choice(len(pool), args.n, replace=False))]
    package = package_registry()
    inks = ours.load_inks(args.inks)
    report = {"cells": args.n, "deterministic": {}, "replayed": {}, "statistics": {}}
    for kind in DETERMINISTIC:
        for severity in range(1, 6):
            theirs = run_package(package[kind], images, severity)
            mine = ours.apply(images, kind, severity, np.random.default_rng(args.seed))
            report["deterministic"][f"{kind} {severity}"] = difference(mine, theirs)
    sheet_rows = []
    for kind in RANDOM:
        for severity in range(1, 6):
            seed = args.seed * 100 + severity
            theirs = replay_package(package[kind], kind, images, severity, seed)
            draws = package_draws(kind, images, severity, seed)
            report["replayed"][f"{kind} {severity}"] = difference(replay_ours(kind, images, severity, draws, inks),
                                                                 theirs)
            np.random.seed(seed + 50)
            random.seed(seed + 50)
            own_theirs = run_package(package[kind], images, severity)
            own_mine = ours.apply(images, kind, severity, np.random.default_rng(seed + 50), inks)
            report["statistics"][f"{kind} {severity}"] = {"package": statistics(own_theirs, images),
                                                         "ours": statistics(own_mine, images)}
            for cell in (0, 1):
                sheet_rows.append((f"{kind} {severity} cell {cell}: clean, package, ours",
                                   [images[cell], own_theirs[cell], own_mine[cell]]))
    sheet(sheet_rows, args.png)
    print(f"{args.n} cells; pixel differences, ours against the package (max, mean, share of values differing)")
    for section in ("deterministic", "replayed"):
        for name, d in report[section].items():
            print(f"  {section:<13} {name:<20} max {d['max']:>3}  mean {d['mean']:.5f}  differing "
                  f"{d['share_differing']:.5f}")
    print("each drawing its own: mean |change| from clean and PSNR dB (mean, p10, p50, p90), package / ours")
    for name, both in report["statistics"].items():
        p, o = both["package"], both["ours"]
        print(f"  {name:<18} change {p['mean_abs_change']:6.2f} / {o['mean_abs_change']:6.2f}   PSNR "
              f"{p['psnr_mean']:5.2f} {p['psnr_p10']:5.2f} {p['psnr_p50']:5.2f} {p['psnr_p90']:5.2f} / "
              f"{o['psnr_mean']:5.2f} {o['psnr_p10']:5.2f} {o['psnr_p50']:5.2f} {o['psnr_p90']:5.2f}")
    print(f"wrote {args.png}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
