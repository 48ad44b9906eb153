"""Leave one family out: what training on each corruption family buys on that family's corruptions it never saw."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from . import corrupt, files, heldout
from .config import Config
from .report import write_report
from .train import run_dir_for, train

FULL = "full"  # the run with the base recipe whole


def family_ops(cfg: Config) -> dict[str, list[str]]:
    """{family: the augmentation settings and corruption-stage ops of cfg that produce it}, by the declaration in
    trainer/heldout.py; a family nothing in cfg produces is left out."""
    from .augment import corruption_ops, op_name  # TensorFlow: imported only when runs are about to train
    off = {f.name: f.metadata["off"] for f in dataclasses.fields(Config)}
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
               "heldout_full": None, "heldout_dropped": None, "drop": None,
               "in_distribution_full": None, "in_distribution_dropped": None}
        if full is not None:
            row.update(heldout_full=heldout_of_family(full, family),
                       in_distribution_full=in_distribution_of_family(full, family))
        if dropped is not None:
            row.update(heldout_dropped=heldout_of_family(dropped, family),
                       in_distribution_dropped=in_distribution_of_family(dropped, family))
        if row["heldout_full"] is not None and row["heldout_dropped"] is not None:
            row["drop"] = row["heldout_full"] - row["heldout_dropped"]
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
    positive drop is what training on the family bought), then one line per run."""
    lines = ["| family | held-out acc, full recipe | held-out acc, family dropped | drop | in-distribution acc of "
             "the family's suite corruptions, full / dropped | what the drop switched off |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if not r["trained_by"]:
            lines.append(f"| {r['family']} | {_cell(r['heldout_full'])} | = full (nothing trains on it) | - | "
                         f"{_cell(r['in_distribution_full'])} / = full | nothing: no run trained |")
            continue
        lines.append(f"| {r['family']} | {_cell(r['heldout_full'])} | {_cell(r['heldout_dropped'])} | "
                     f"{_cell(r['drop'], signed=True)} | {_cell(r['in_distribution_full'])} / "
                     f"{_cell(r['in_distribution_dropped'])} | {', '.join(r['trained_by'])} |")
    lines += ["", "| run | clean | held-out | in-distribution | epochs | minutes |", "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | {_cell(r['clean'])} | {_cell(r['heldout'])} | {_cell(r['in_distribution'])} | "
                     f"{r['epochs'] if r['epochs'] is not None else '-'} | {r['minutes']:.1f} |")
    return "\n".join(lines)


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
    for family in plan:
        name = FULL if family == FULL else f"drop-{family}"
        spent = (time.time() - started) / 60
        if runs and spent + runs[-1]["minutes"] > budget_min:
            print(f"time budget: {spent:.1f} of {budget_min} min spent; skipping {name} and the rest", flush=True)
            break
        cfg = Config(**{**base.to_dict(), "drop_family": "" if family == FULL else family, "name": name,
                        "runs_dir": folder, "export": False, "submission_dir": ""})
        t0 = time.time()
        out_dir = run_dir_for(cfg)
        try:
            results[name] = train(cfg)
        finally:  # every run gets its page, also one that stopped with an error
            if os.path.isdir(out_dir):
                write_report(out_dir)
        runs.append(run_row(name, results[name], (time.time() - t0) / 60))
        rows = summarise(results, families, trained)
        files.write_json(os.path.join(folder, "lofo.json"), {
            "families": rows, "runs": runs, "seed": base.seed, "profile": base.profile,
            "short_settings": {k: getattr(base, k) for k in ("limit", "epochs", "robustness_images",
                                                             "time_budget_min")}})
        text = markdown(rows, runs)
        files.write_bytes(os.path.join(folder, "lofo.md"), (text + "\n").encode())
        print(text, flush=True)
    return rows
