"""Leave one family out: what training on each corruption family buys on that family's corruptions it never saw."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from . import corrupt, files, heldout, heldout_eval
from .config import Config, off_values
from .evaluate import batch_size_for, predict_probs
from .report import write_report
from .train import run_dir_for, train

FULL = "full"  # the run with the base recipe whole


def family_ops(cfg: Config) -> dict[str, list[str]]:
    """{family: the augmentation settings and corruption-stage ops of cfg that produce it}, by the declaration in
    trainer/heldout.py; a family nothing in cfg produces is left out."""
    from .augment import corruption_ops, op_name  # TensorFlow: imported only when runs are about to train
    off = off_values()
    found: dict[str, list[str]] = {}

    def add(kinds, label):
        for family in sorted(heldout.families_of(kinds)):
            found.setdefault(family, []).append(label)
    for name, kinds in heldout.STAGE_FLAGS.items():
        if getattr(cfg, name) != off[name]:
            add(kinds, "--" + name.replace("_", "-"))
    if cfg.randaugment:
        for layer, kinds in heldout.RANDAUGMENT_LAYERS.items():
            add(kinds, f"RandAugment {layer}")
    if cfg.corrupt > 0:
        for op in corruption_ops(dataclasses.replace(cfg, drop_family="")):
            add(heldout.TRAINING_OPS[op_name(op)][0], f"corruption stage {op_name(op).lstrip('_')}")
    return found


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def heldout_of_family(metrics: dict, family: str) -> float | None:
    """Mean accuracy over the family's held-out corruptions, each alone at severities 1, 3 and 5."""
    per = (metrics.get("heldout") or {}).get("per_corruption") or {}
    return _mean(acc for name in heldout.FAMILIES[family] for acc in per.get(name, {}).values())


def in_distribution_of_family(metrics: dict, family: str) -> float | None:
    """Mean accuracy over severities 1-5 of the suite's corruptions of the family (None: the suite has none)."""
    per = (metrics.get("robustness") or {}).get("per_family") or {}
    return _mean(per[family][1:]) if family in per else None  # index 0 is the clean accuracy


def clean_of(metrics: dict) -> float | None:
    """Clean accuracy on the images the corrupted figures were scored on (the test split, or up to
    robustness_images of it): the baseline a family's figure is compared with."""
    per_family = (metrics.get("robustness") or {}).get("per_family") or {}
    if per_family:
        return next(iter(per_family.values()))[0]
    return (metrics.get("test") or metrics.get("val") or {}).get("accuracy")


def score_family(out_dir: str, metrics: dict, family: str, seed: int, max_images: int) -> dict:
    """metrics with the family's figures added as a run scores itself (trainer/train.py): on the same up to
    max_images test images, the family's held-out corruptions alone at severities 1, 3, 5 and the suite's per
    severity 1-5, plus both corrupted copies. A dropped run is scored on its own family only: on a busy 2-core
    machine this small CNN predicts about 50 images a second, and all 18 + 6 would take minutes a run."""
    import keras

    from . import models  # noqa: F401  registers the custom layers that model.keras uses
    model = keras.models.load_model(os.path.join(out_dir, "model.keras"))
    with np.load(os.path.join(out_dir, "holdout.npz")) as held:
        images, labels = held["images"], held["labels"]
    batch = batch_size_for(model)

    def predict_labels(x):
        return predict_probs(model, x, batch).argmax(1)

    def accuracy(x, y):
        return float((predict_labels(x) == y).mean())
    # The images and seeds of heldout_eval.score and evaluate.robustness, so the figures pair with a full run's.
    pick = np.sort(np.random.default_rng(seed).choice(len(images), min(max_images, len(images)), replace=False))
    x, y = images[pick], labels[pick]
    per = heldout_eval.per_corruption(predict_labels, x, y, seed=seed, names=heldout.FAMILIES[family])
    out = {**metrics, "heldout": {"corrupted": {"accuracy": accuracy(heldout.corrupt_mix(images, seed)[0], labels)},
                                  "per_corruption": per, "per_corruption_images": int(len(pick)), "seed": seed}}
    if family in corrupt.FAMILIES:
        clean = accuracy(x, y)
        out["robustness"] = {"corrupted": {"accuracy": accuracy(corrupt.corrupt_mix(images, seed)[0], labels)},
                             "per_family": {family: [clean] + [accuracy(corrupt.apply_family(x, family, s, seed + s), y)
                                                               for s in corrupt.SEVERITIES]}}
    files.write_json(os.path.join(out_dir, "lofo_scores.json"), {k: out[k] for k in ("heldout", "robustness")
                                                                 if k in out})
    return out


def summarise(results: dict, families: list[str], trained: dict) -> list[dict]:
    """One row per family from the runs' metrics: {run name: metrics}; a family nothing trains on takes the full
    run as its dropped run."""
    full = results.get(FULL)
    rows = []
    for family in families:
        run = f"drop-{family}" if family in trained else FULL
        dropped = results.get(run)
        row = {"family": family, "trained_by": trained.get(family, []), "dropped_run": run,
               "heldout_corruptions": list(heldout.FAMILIES[family]),
               "in_distribution_corruptions": list(corrupt.FAMILIES.get(family, ())),
               "heldout_full": None, "heldout_dropped": None, "drop": None, "drop_vs_clean": None,
               "in_distribution_full": None, "in_distribution_dropped": None}
        if full is not None:
            row.update(heldout_full=heldout_of_family(full, family),
                       in_distribution_full=in_distribution_of_family(full, family))
        if dropped is not None:
            row.update(heldout_dropped=heldout_of_family(dropped, family),
                       in_distribution_dropped=in_distribution_of_family(dropped, family))
        if row["heldout_full"] is not None and row["heldout_dropped"] is not None:
            row["drop"] = row["heldout_full"] - row["heldout_dropped"]
            # Short runs differ in clean accuracy by several points; this compares each run's loss from clean.
            row["clean_full"], row["clean_dropped"] = clean_of(full), clean_of(dropped)
            row["drop_vs_clean"] = row["drop"] - (row["clean_full"] - row["clean_dropped"])
        rows.append(row)
    return rows


def run_row(name: str, metrics: dict, minutes: float) -> dict:
    scored = metrics.get("test") or metrics.get("val") or {}
    return {"run": name, "clean": scored.get("accuracy"),
            "heldout": ((metrics.get("heldout") or {}).get("corrupted") or {}).get("accuracy"),
            "in_distribution": ((metrics.get("robustness") or {}).get("corrupted") or {}).get("accuracy"),
            "epochs": metrics.get("epochs"), "minutes": minutes}


def _cell(value, signed: bool = False) -> str:
    return "-" if value is None else f"{value:+.4f}" if signed else f"{value:.4f}"


def markdown(rows: list[dict], runs: list[dict]) -> str:
    """The family table (held-out: that family's corruptions no setting trains on; drop = full - dropped, so a
    positive drop is what training on the family bought; drop vs clean: the same less the runs' difference in clean
    accuracy), then one line per run."""
    lines = ["| family | held-out acc, full recipe | held-out acc, family dropped | drop | drop vs clean | "
             "in-distribution acc of the family's suite corruptions, full / dropped | what the drop switched off |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["trained_by"]:
            lines.append(f"| {r['family']} | {_cell(r['heldout_full'])} | = full (nothing trains on it) | - | - | "
                         f"{_cell(r['in_distribution_full'])} / = full | nothing: no run trained |")
            continue
        lines.append(f"| {r['family']} | {_cell(r['heldout_full'])} | {_cell(r['heldout_dropped'])} | "
                     f"{_cell(r['drop'], signed=True)} | {_cell(r['drop_vs_clean'], signed=True)} | "
                     f"{_cell(r['in_distribution_full'])} / {_cell(r['in_distribution_dropped'])} | "
                     f"{', '.join(r['trained_by'])} |")
    lines += ["", "| run | clean | held-out | in-distribution | epochs | minutes |", "|---|---|---|---|---|---|"]
    for r in runs:
        minutes = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"  # None: reused, its time unknown
        lines.append(f"| {r['run']} | {_cell(r['clean'])} | {_cell(r['heldout'])} | {_cell(r['in_distribution'])} | "
                     f"{r['epochs'] if r['epochs'] is not None else '-'} | {minutes} |")
    return "\n".join(lines)


def _read_json(path: str) -> dict:
    """A JSON object from a file, {} when there is none."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def finished(out_dir: str, cfg: Config) -> dict | None:
    """The metrics of a run this command already finished with this config (a re-run with the same --name goes
    on where it stopped); None when there is none."""
    try:
        with open(os.path.join(out_dir, "config.json")) as fh:
            same = json.load(fh) == cfg.to_dict()
    except (OSError, ValueError):
        return None
    return (_read_json(os.path.join(out_dir, "metrics.json")) or None) if same else None


def leave_one_out(base: Config, budget_min: float, families: list[str] | None = None) -> list[dict]:
    """Train the base recipe whole, then once per family with that family's augmentation dropped
    (Config.drop_family), with the base's short settings; write lofo.json and lofo.md after each run.

    A family that nothing in the base trains on (microscopy always) gets no run of its own: its dropped run would
    be the full run again."""
    started = time.time()
    folder = os.path.join(base.runs_dir, base.name or f"lofo-{time.strftime('%Y%m%d-%H%M%S')}")
    families = families or list(heldout.FAMILIES)
    trained = family_ops(base)
    plan = [FULL] + [family for family in families if family in trained]
    print(f"leave one family out: {len(plan)} runs in {folder} (full recipe, then without "
          f"{', '.join(plan[1:]) or 'no family'}); "
          f"{', '.join(f for f in families if f not in trained) or 'no family'} trained by nothing: "
          f"scored on the full run", flush=True)
    results, runs, rows = {}, [], []
    before = {r["run"]: r.get("minutes") for r in _read_json(os.path.join(folder, "lofo.json")).get("runs", [])}
    for family in plan:
        name = FULL if family == FULL else f"drop-{family}"
        spent = (time.time() - started) / 60
        if runs and spent + (runs[-1]["minutes"] or 0) > budget_min:
            print(f"time budget: {spent:.1f} of {budget_min} min spent; skipping {name} and the rest", flush=True)
            break
        # The full run scores itself on every family; a dropped run only on its own family, below.
        cfg = Config(**{**base.to_dict(), "drop_family": "" if family == FULL else family, "name": name,
                        "runs_dir": folder, "export": False, "submission_dir": "",
                        "robustness_images": base.robustness_images if family == FULL else 0})
        t0 = time.time()
        out_dir = run_dir_for(cfg)
        done = finished(out_dir, cfg)
        if done:
            print(f"{name}: reusing the finished run in {out_dir}", flush=True)
            results[name] = {**done, **_read_json(os.path.join(out_dir, "lofo_scores.json"))}
        else:
            try:
                results[name] = train(cfg)
            finally:  # every run gets its page, also one that stopped with an error
                if os.path.isdir(out_dir):
                    write_report(out_dir)
        if family != FULL and "heldout" not in results[name]:
            results[name] = score_family(out_dir, results[name], family, base.seed, base.robustness_images)
        runs.append(run_row(name, results[name], before.get(name) if done else (time.time() - t0) / 60))
        rows = summarise(results, families, trained)
        files.write_json(os.path.join(folder, "lofo.json"), {
            "families": rows, "runs": runs, "seed": base.seed, "profile": base.profile,
            "short_settings": {k: getattr(base, k) for k in ("limit", "epochs", "robustness_images",
                                                             "time_budget_min")}})
        text = markdown(rows, runs)
        files.write_bytes(os.path.join(folder, "lofo.md"), (text + "\n").encode())
        print(text, flush=True)
    return rows
