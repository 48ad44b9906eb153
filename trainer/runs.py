"""Read run folders: one row per run for the runs table (text or Markdown, sortable), and phase histories."""
from __future__ import annotations

import calendar
import csv
import json
import os
import re
import time
from dataclasses import fields

from .config import GEOMETRY, MODEL, PROFILES, TRANSFORMS, Config, flag, make_config
from .leaderboard import latest_score
from .registry import MODELS

# (column, kind): kind says how it sorts and prints; numbers and dates sort descending, text ascending.
# heldout: accuracy on corruptions no training setting reaches; leaderboard: the latest score a zip of the run got
# (python -m trainer score), beside the figure that predicted it; mmc: the mean over MedMNIST-C's 11 bloodmnist
# corruptions (an external reference); in_dist: on the suite's, mostly seen in training. Those are the Keras
# model's with 1 view; zip_*: the same images through the exported model as the zip serves it, with its TTA views.
COLUMNS = [("name", "text"), ("date", "date"), ("model", "text"), ("optimizer", "text"), ("notes", "text"),
           ("epochs", "int"), ("time", "duration"), ("clean", "acc"), ("zip_clean", "acc"), ("heldout", "acc"),
           ("zip_heldout", "acc"), ("leaderboard", "acc"), ("mmc", "acc"), ("zip_mmc", "acc"), ("in_dist", "acc"),
           ("f1", "acc"), ("onnx_mb", "mb"), ("projected", "seconds"), ("verdict", "text")]
KINDS = dict(COLUMNS)
ALIASES = {"corrupted": "in_dist"}  # the in-distribution column's name before the held-out one came
STAMP = re.compile(r"(\d{8}-\d{6})$")


def read_json(path: str) -> dict:
    """The JSON object in path, or {} when the file is missing or half-written."""
    try:
        with open(path) as fh:
            value = json.load(fh)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def run_date(run_dir: str) -> float:
    """When the run started: metrics.json's "started", else the timestamp in an automatic name, else config.json's
    modification time (which a checkout resets)."""
    started = read_json(os.path.join(run_dir, "metrics.json")).get("started")
    if isinstance(started, str):
        try:
            return calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            pass
    found = STAMP.search(os.path.basename(os.path.normpath(run_dir)))
    if found:
        return time.mktime(time.strptime(found.group(1), "%Y%m%d-%H%M%S"))
    for name in ("config.json", "metrics.json"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            return os.path.getmtime(path)
    return os.path.getmtime(run_dir)


# Augmentation settings that notes() names by value ("erase 0.5"), so profile_changes leaves them out.
VALUE_LABELS = (("mixup_alpha", "mixup"), ("cutmix_alpha", "cutmix"), ("erase", "erase"))
LABELLED = ("randaugment", "randaugment_magnitude") + tuple(key for key, _ in VALUE_LABELS)


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


# The model column names the architecture; a weights path would swamp the notes.
UNNAMED = LABELLED + ("model", "weights")
# Training settings that change what a run learns; those of how long it trains have the epochs and time columns.
RECIPE = ("learning_rate", "weight_decay", "label_smoothing", "batch_size", "schedule", "consistency",
          "mixed_precision", "low_res_size")


def profile_changes(cfg: dict) -> list[str]:
    """The augmentation, model and recipe settings in which a run differs from its profile as that profile is
    today, as the flags that turn today's profile into the run's ("--corrupt-blur 3", "--weight-decay 0.05"); none
    when the profile no longer exists."""
    if cfg.get("profile") not in PROFILES:
        return []
    today = make_config(cfg["profile"])
    return [f"{flag(f.name)} {_flag_value(cfg[f.name])}" for f in fields(Config)
            if (f.metadata["group"] in (GEOMETRY, TRANSFORMS, MODEL) or f.name in RECIPE) and f.name not in UNNAMED
            and f.name in cfg
            and cfg[f.name] != getattr(today, f.name)]


def notes(cfg: dict, metrics: dict) -> str:
    """The settings that explain a score at a glance: augmentation (with the flags where it differs from its
    profile), split, balance, folds, subset."""
    out = []
    if cfg.get("randaugment"):
        out.append(f"RandAugment {cfg.get('randaugment_magnitude', 0):g}")
    for key, label in VALUE_LABELS:
        if cfg.get(key):
            out.append(f"{label} {cfg[key]:g}")
    if not out:
        geometric = any(cfg.get(k) for k in ("flip", "rot90", "rotation", "zoom", "shift"))
        out.append("geometric aug" if geometric else "no aug")
    out += profile_changes(cfg)
    if cfg.get("no_test_split"):
        out.append("no-test-split")
    if cfg.get("balance", "none") != "none":
        out.append(f"balance {cfg['balance']}")
    if cfg.get("folds", 0) >= 2:
        out.append(f"{cfg['folds']}-fold")
    spec = MODELS.get(cfg.get("model", ""))
    if cfg.get("fine_tune_epochs") and spec is not None and spec.fine_tunable:
        out.append(f"fine-tune {cfg['fine_tune_epochs']}")
    if cfg.get("swa"):
        out.append(f"swa {cfg['swa']:g} at {cfg.get('swa_lr', 0):g}x lr")
    if cfg.get("limit"):
        out.append(f"limit {cfg['limit']}")
    if cfg and not metrics:
        out.append("STOPPED EARLY")
    return ", ".join(out)


def benchmark_of(run_dir: str) -> dict:
    """benchmark.json (make benchmark), else benchmark_quick.json (the check make zip runs); {} when neither."""
    for name in ("benchmark.json", "benchmark_quick.json"):
        found = read_json(os.path.join(run_dir, name))
        if found:
            return found
    return {}


def onnx_mb(run_dir: str, metrics: dict):
    size = (metrics.get("export") or {}).get("bytes")
    path = os.path.join(run_dir, "model.onnx")
    if size is None and os.path.exists(path):
        size = os.path.getsize(path)
    return size / 1e6 if size is not None else None


def run_row(run_dir: str) -> dict:
    """One run's raw values, keyed by column; None where the run does not have it."""
    cfg = read_json(os.path.join(run_dir, "config.json"))
    metrics = read_json(os.path.join(run_dir, "metrics.json"))
    bench = benchmark_of(run_dir)
    scored = metrics.get("test") or metrics.get("val") or {}
    corrupted = (metrics.get("robustness") or {}).get("corrupted") or {}
    held = (metrics.get("heldout") or {}).get("corrupted") or {}
    served = metrics.get("submission") or {}
    return {
        "name": os.path.basename(os.path.normpath(run_dir)),
        "date": run_date(run_dir),
        "model": cfg.get("model") or metrics.get("model"),
        "optimizer": cfg.get("optimizer"),
        "notes": notes(cfg, metrics),
        "epochs": metrics.get("epochs"),
        "time": metrics.get("train_seconds"),
        "clean": scored.get("accuracy"),
        "zip_clean": served.get("clean"),
        "heldout": held.get("accuracy"),
        "zip_heldout": served.get("heldout"),
        "leaderboard": latest_score(run_dir),
        "mmc": (metrics.get("medmnist_c") or {}).get("overall"),
        "zip_mmc": (served.get("medmnist_c") or {}).get("overall"),
        "in_dist": corrupted.get("accuracy"),
        "f1": scored.get("macro_f1"),
        "onnx_mb": onnx_mb(run_dir, metrics),
        "projected": bench.get("projected_s"),
        "verdict": bench.get("verdict"),
    }


def read_history(path: str) -> dict:
    """History of a phase from its CSV log (survives a resume), one list per metric."""
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in (rows[0] if rows else {})
            if k != "epoch"}


def collect(runs_dir: str = "runs") -> list[dict]:
    """A row for every folder in runs_dir that holds a config.json or a metrics.json."""
    if not os.path.isdir(runs_dir):
        return []
    folders = [os.path.join(runs_dir, name) for name in sorted(os.listdir(runs_dir))]
    return [run_row(f) for f in folders
            if os.path.exists(os.path.join(f, "config.json")) or os.path.exists(os.path.join(f, "metrics.json"))]


def sort_rows(rows: list[dict], column: str = "date", reverse: bool = False) -> list[dict]:
    """Numbers and dates largest first, text A to Z (reverse flips both); missing values always last."""
    column = ALIASES.get(column, column)
    if column not in KINDS:
        raise ValueError(f"unknown column {column!r}; sort by one of {', '.join(KINDS)}")
    present = [r for r in rows if r[column] is not None]
    missing = [r for r in rows if r[column] is None]
    descending = KINDS[column] != "text"
    key = (lambda r: str(r[column]).lower()) if KINDS[column] == "text" else (lambda r: r[column])
    return sorted(present, key=key, reverse=descending != reverse) + missing


def cell(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "date":
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "mb":
        return f"{value:.1f}"
    if kind == "duration":
        return duration(value)
    if kind == "seconds":  # the grading-time projection, in the unit of its limit
        return f"{value:.0f}s"
    return str(value)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Aligned plain text (numbers right-aligned), or a Markdown table."""
    names = [c for c, _ in COLUMNS]
    cells = [[cell(r[c], KINDS[c]) for c in names] for r in rows]
    right = [KINDS[c] != "text" and KINDS[c] != "date" for c in names]
    if markdown:
        lines = ["| " + " | ".join(names) + " |",
                 "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(v) for v in col) for col in zip(names, *cells)]

    def line(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()
    return "\n".join([line(names), line(["-" * w for w in widths])] + [line(row) for row in cells])


def runs_table(runs_dir: str = "runs", sort: str = "date", markdown: bool = False, reverse: bool = False) -> str:
    rows = collect(runs_dir)
    if not rows:
        return f"no runs in {runs_dir}/ yet: make train"
    return format_table(sort_rows(rows, sort, reverse), markdown)
