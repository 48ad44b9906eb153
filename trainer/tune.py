"""Augmentation search: short runs of candidate settings, scored clean, held-out corrupted and in-distribution."""
from __future__ import annotations

import os
import time

from . import files
from .config import Config, make_config, off_values
from .report import write_report
from .train import run_dir_for, train

# Each candidate adds to the one before, so the table reads as an ablation from "no augmentation" upwards.
# Every augmentation field is set in every candidate (its "off" value from the config's metadata unless a step
# turns it on), so the base profile's own recipe never leaks in.
_OFF = off_values()
_STEPS = [
    ("none", {}),
    ("geometry", dict(flip=True, rot90=True, rotation=0.5, zoom=0.1, shift=0.1)),
    ("geometry+colour", dict(contrast=0.2, brightness=0.15, saturation=0.3, noise_std=5.0)),
    ("geometry+colour+randaugment", dict(randaugment=True, randaugment_magnitude=0.3, randaugment_layers=2,
                                         randaugment_rate=0.7)),
    ("+blur+erase", dict(erase=0.5, blur=1.5)),
    ("+corruptions", dict(corrupt=0.5, corrupt_ops=2, corrupt_strength=1.0)),
    ("+JPEG and strong zoom", dict(corrupt_ops=3, corrupt_jpeg=True, corrupt_zoom=0.6)),
    ("+black borders", dict(black_fill=0.3)),
    ("+soft labels for damage", dict(soft_corrupt=0.5)),
    ("+wide geometry", dict(zoom=0.6, shear=0.3)),
    ("+mixup/cutmix", dict(mixup_alpha=0.2, cutmix_alpha=1.0)),
]
CANDIDATES: dict[str, dict] = {}
_so_far = dict(_OFF)
for _name, _step in _STEPS:
    _so_far = {**_so_far, **_step}
    CANDIDATES[_name] = dict(_so_far)


def tune(base: Config, budget_min: float, names: list[str] | None = None) -> list[dict]:
    """Train each candidate with the base config's short settings until the time budget is spent."""
    started = time.time()
    folder = os.path.join(base.runs_dir, base.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = []
    for name in names or list(CANDIDATES):
        spent = (time.time() - started) / 60
        if rows and spent + rows[-1]["minutes"] > budget_min:
            print(f"time budget: {spent:.1f} of {budget_min} min spent; skipping {name} and the rest", flush=True)
            break
        values = {**base.to_dict(), **CANDIDATES[name], "name": _slug(name), "runs_dir": folder,
                  "export": False, "submission_dir": ""}
        cfg = Config(**values)
        t0 = time.time()
        out_dir = run_dir_for(cfg)
        try:
            metrics = train(cfg)
        finally:  # every candidate gets its page, also one that stopped with an error
            if os.path.isdir(out_dir):
                write_report(out_dir)
        scored = metrics.get("test") or metrics["val"]
        corrupted = metrics.get("robustness", {}).get("corrupted", {}).get("accuracy", float("nan"))
        held = metrics.get("heldout", {}).get("corrupted", {}).get("accuracy", float("nan"))
        mmc = metrics.get("medmnist_c", {})
        rows.append({"candidate": name, "clean": scored["accuracy"], "heldout": held, "corrupted": corrupted,
                     "medmnist_c": _number(mmc.get("overall")), "medmnist_c_unseen": _number(mmc.get("unseen")),
                     "heldout_minus_clean": held - scored["accuracy"],
                     "corrupted_minus_clean": corrupted - scored["accuracy"], "minutes": (time.time() - t0) / 60,
                     "epochs": metrics["epochs"]})
        files.write_json(os.path.join(folder, "tune.json"), rows)
        print(table(rows), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """held-out: corruptions no training setting reaches, the figure to choose by; in-distribution: the suite's,
    which the candidates' own corruption stages partly train on; MedMNIST-C: the published bloodmnist corruptions,
    the mean of all 11 and of the kinds the candidate's training never draws (unseen)."""
    lines = ["| candidate | clean | held-out | held-out - clean | in-distribution | MedMNIST-C | MedMNIST-C unseen "
             "| epochs | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['clean']:.4f} | {r['heldout']:.4f} | {r['heldout_minus_clean']:+.4f} | "
                     f"{r['corrupted']:.4f} | {r.get('medmnist_c', float('nan')):.4f} | "
                     f"{r.get('medmnist_c_unseen', float('nan')):.4f} | {r['epochs']} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def _number(value) -> float:
    """A figure for the table, NaN where the run has none (robustness_images 0)."""
    return float("nan") if value is None else value


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def tune_config(profile: str, **overrides) -> Config:
    """The base of a search: the profile, shortened unless the overrides say otherwise."""
    short = dict(limit=4000, epochs=8, robustness_images=200, time_budget_min=0.0)
    return make_config(profile, **{**short, **overrides})
