"""Command line: python -m trainer {train,augment,export,evaluate,tune,corrupt,report,gradcam,runs,score,config,
options}."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import corrupt, data, files, gradcam, heldout, heldout_eval, leaderboard, lofo, medmnist_c_eval, runs
from .config import (
    PROFILES,
    add_config_arguments,
    config_from_args,
    given_fields,
    load_config,
    options_markdown,
    resume_config,
    validate,
)
from .data import DataError
from .evaluate import batch_size_for, corruption_table, errors_table, evaluate_exported
from .report import write_report
from .staging import SubmissionError, UsageError
from .train import export_run, run_dir_for, train
from .tune import CANDIDATES, table, tune, tune_config

# TensorFlow, Keras and matplotlib load inside the commands that need them, so `runs`, `report`, `config` and
# --help answer at once.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def default_profile() -> str:
    """gpu when TensorFlow sees a GPU, cpu otherwise."""
    import tensorflow as tf
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def resolve_config(args):
    """The config a command runs: a profile with the flags on top, or a resumed run's own with the few that may
    change; validated, with a warning for each flag the model ignores."""
    given = given_fields(args)
    if getattr(args, "resume", None):
        path = os.path.join(args.resume, "config.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} not found; --resume takes a run folder such as runs/cpu-20261127-101500")
        cfg = resume_config(load_config(path), given, args.profile)
        # The folder given is the run, wherever it now lies.
        cfg.runs_dir, cfg.name = os.path.dirname(os.path.abspath(args.resume)), os.path.basename(
            os.path.normpath(args.resume))
    else:
        if not args.profile:
            args.profile = default_profile()
        cfg = config_from_args(args)
    for warning in validate(cfg, given):
        print(warning, file=sys.stderr, flush=True)
    return cfg


def cmd_train(args) -> int:
    cfg = resolve_config(args)
    # Validate the data before the run folder exists (train() loads it first); once the folder exists, the run
    # gets its page even when it stops with an error.
    out_dir = run_dir_for(cfg)
    try:
        metrics = train(cfg)
    finally:
        if os.path.isdir(out_dir):
            write_report(out_dir)
    test = metrics.get("test") or metrics["val"]
    print(f"accuracy {test['accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} "
          f"({'test' if 'test' in metrics else 'val'} split); run folder {os.path.join(cfg.runs_dir, cfg.name)}")
    return 0


def cmd_augment(args) -> int:
    from . import plots
    from .augment import augmented_samples
    cfg = resolve_config(args)
    images, labels = data.load_npz(cfg.data, resize=cfg.resize)
    keep, _ = data.clean(images, labels, cfg.max_copies, cfg.rare_colour_threshold)
    pick = np.random.default_rng(cfg.seed).choice(keep, args.n, replace=False)
    plots.augmentation_grid(images[pick], augmented_samples(images[pick], cfg, args.n), args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    import keras

    from . import models  # noqa: F401  registers the custom layers
    cfg = load_config(os.path.join(args.run, "config.json"))
    if args.submission_dir is not None:
        cfg.submission_dir = args.submission_dir
    model = keras.models.load_model(os.path.join(args.run, "model.keras"))
    with np.load(os.path.join(args.run, "holdout.npz")) as held:
        check = held["images"][:64]
    export_run(cfg, model, check, args.run, batch_size_for(model, cfg.inference_memory_mb))
    return 0


def cmd_evaluate(args) -> int:
    images, labels = data.load_npz_images(args.data)
    name = os.path.basename(args.data)
    recipes = None
    if args.corrupt and args.heldout:
        raise ValueError("--corrupt scores the in-distribution suite and --heldout the held-out corruptions; "
                         "pick one")
    if args.heldout and labels is None:
        raise ValueError(f"--heldout scores accuracy, so it needs labels, and {args.data} has none")
    if args.max_images is not None and not args.medmnist_c:
        raise ValueError("--max-images sets how many images --medmnist-c scores; add --medmnist-c or drop it")
    if args.medmnist_c:
        return evaluate_medmnist_c(args, images, labels, name)
    if args.corrupt:
        images, recipes = corrupt.corrupt_mix(images, seed=args.seed)
        name += f" (corrupted, seed {args.seed})"
    views = [int(v) for v in args.views.split(",")]
    severities = [int(v) for v in args.severities.split(",")] if args.per_corruption else []
    if severities and args.corrupt:
        raise ValueError("--per-corruption applies one corruption at a time to the clean images; drop --corrupt")
    if severities and labels is None:
        raise ValueError(f"--per-corruption needs labels, and {args.data} has none")
    if any(s not in range(1, 6) for s in severities):
        raise ValueError(f"--severities takes numbers 1-5, like 1,3,5; got {args.severities}")
    if args.heldout:
        rows = heldout_eval.evaluate_exported(args.model, images, labels, views, args.seed, severities)
        name += f" (held-out corrupted copy, seed {args.seed}: corruptions no training setting reaches)"
    else:
        rows = evaluate_exported(args.model, images, labels, views, severities, args.seed, recipes)
    family_of = heldout.FAMILY_OF if args.heldout else corrupt.FAMILY_OF
    suite = "held-out corruption" if args.heldout else "corruption"
    print(f"{args.model} on {name}: {len(images)} images")
    print(f"{'views':>5}  {'accuracy':>8}  {'macro F1':>8}  {'img/s':>8}")
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        f1 = f"{r['macro_f1']:.4f}" if "macro_f1" in r else "-"
        print(f"{r['views']:>5}  {acc:>8}  {f1:>8}  {r['img_per_s']:>8.1f}")
    for r in rows:
        if "per_corruption" in r:
            print(f"\naccuracy per {suite}, {r['views']} view(s):\n{corruption_table(r['per_corruption'], family_of)}")
        if "errors_by_corruption" in r:
            print(f"\nerrors on the {'held-out ' if args.heldout else ''}corrupted copy by the corruptions each image "
                  f"got, {r['views']} view(s):\n{errors_table(r['errors_by_corruption'], family_of)}")
    if args.out:
        files.write_json(args.out, {"model": args.model, "data": args.data, "corrupted": args.corrupt,
                                    "heldout": args.heldout, "seed": args.seed, "rows": rows})
    return 0


def evaluate_medmnist_c(args, images, labels, name) -> int:
    """evaluate --medmnist-c: the MedMNIST-C table of an exported model, once per number of views."""
    if args.corrupt or args.heldout or args.per_corruption:
        raise ValueError("--medmnist-c makes its own corrupted copies and scores each corruption already; drop "
                         "--corrupt, --heldout and --per-corruption")
    if labels is None:
        raise ValueError(f"--medmnist-c scores accuracy, so it needs labels, and {args.data} has none")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images takes a number of images, 1 or more; got {args.max_images}")
    views = [int(v) for v in args.views.split(",")]
    rows = medmnist_c_eval.evaluate_exported(args.model, images, labels, views, args.seed, args.max_images)
    print(f"{args.model} on {name}: the MedMNIST-C bloodmnist corruptions (seed {args.seed}), {rows[0]['images']} "
          "images, each under all 11 at severities 1-5 in turn")
    for r in rows:
        print(f"\n{r['views']} view(s), {r['img_per_s']:.1f} img/s:\n{medmnist_c_eval.table(r)}")
    if args.out:
        files.write_json(args.out, {"model": args.model, "data": args.data, "medmnist_c": True, "seed": args.seed,
                                    "rows": rows})
    return 0


def cmd_tune(args) -> int:
    given = given_fields(args)
    base = tune_config(args.profile or default_profile(), **given)
    for warning in validate(base, given):
        print(warning, file=sys.stderr, flush=True)
    if args.leave_one_out:
        if args.candidates:
            raise ValueError("--leave-one-out trains the base recipe with one family dropped at a time, not the "
                             "candidates; leave out --candidates (or --leave-one-out)")
        families = args.families.split(",") if args.families else None
        unknown = [f for f in families or [] if f not in heldout.FAMILIES]
        if unknown:
            raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown} in --families; choose "
                             f"from {','.join(heldout.FAMILIES)}")
        lofo.leave_one_out(base, args.budget_min, families)
        return 0
    if args.families:
        raise ValueError("--families goes with --leave-one-out; to pick candidates use --candidates")
    names = args.candidates.split(",") if args.candidates else None
    unknown = [n for n in names or [] if n not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown candidate(s) {unknown}; choose from {list(CANDIDATES)}")
    rows = tune(base, args.budget_min, names)
    print(table(rows))
    return 0


def cmd_report(args) -> int:
    return 0 if write_report(args.run, args.n) else 1


def cmd_gradcam(args) -> int:
    from . import plots
    mistakes = gradcam.run_mistakes(args.run, args.n)
    sheet = os.path.join(args.run, "gradcam.png")
    plots.gradcam_sheet(mistakes, sheet)
    for m in mistakes:
        print(f"#{m.index:5d}  true {m.true_name:22s} predicted {m.predicted_name:22s} {m.confidence:6.1%}")
    print(f"wrote {sheet} ({len(mistakes)} worst mistakes)")
    return 0 if write_report(args.run, args.n, mistakes) else 1


def cmd_runs(args) -> int:
    print(runs.runs_table(args.runs_dir, args.sort, args.markdown, args.reverse))
    return 0


def cmd_score(args) -> int:
    run, entry = leaderboard.record_score(args.zip, args.score, args.note, args.runs_dir, args.run)
    row = runs.run_row(run)
    held, served = row["heldout"], row["zip_heldout"]
    print(f"recorded leaderboard score {entry['score']:.4f} for {args.zip} (sha256 {entry['zip_sha256'][:12]}...) "
          f"in {os.path.join(run, leaderboard.LEADERBOARD)} (run found: {entry['found_by']}); the run's held-out "
          f"figure: {'-' if held is None else f'{held:.4f}'} with 1 view"
          + ("" if served is None else f", {served:.4f} as the zip serves it"))
    return 0


def cmd_config(args) -> int:
    print(resolve_config(args).to_json())
    return 0


def cmd_options(args) -> int:
    print(options_markdown())
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "corrupt":
        # corrupt.py cannot import heldout.py (which builds on it), so the held-out copy and preview branch here.
        return (heldout.main if "--heldout" in argv else corrupt.main)(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="clean, split, augment, train, evaluate and export one run")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="named settings (default: gpu if a GPU is visible, else cpu)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="resume an interrupted run with its saved config; only the options marked resumable in "
                        "docs/options.md may change")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config", help="print the config a train command would run, as JSON (nothing runs)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="named settings (default: gpu if a GPU is visible, else cpu)")
    p.add_argument("--resume", metavar="RUN_DIR", help="the config a resume of this run would use")
    add_config_arguments(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("options", help="print every training option as the Markdown table of docs/options.md")
    p.set_defaults(func=cmd_options)

    p = sub.add_parser("augment", help="save a PNG grid of augmented training samples")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None)
    p.add_argument("--resume", help=argparse.SUPPRESS)
    p.add_argument("--out", default="augmented.png")
    p.add_argument("--n", type=int, default=32)
    add_config_arguments(p)
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("export", help="export a run's model.keras to ONNX (and into submission/)")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/cpu-20261127-101500")
    p.add_argument("--submission-dir", default=None, help="where to copy model.onnx and settings.json")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="score an exported model (ONNX through submission/model.py) on any .npz")
    p.add_argument("--model", required=True, help="a run folder or a submission folder holding model.onnx")
    p.add_argument("--data", required=True, help=".npz with images (and labels, for accuracy)")
    p.add_argument("--views", default="1,8", help="TTA views to try, comma-separated (default 1,8)")
    p.add_argument("--corrupt", action="store_true",
                   help="score a corrupted copy made with the suite (in-distribution: training reaches most of it)")
    p.add_argument("--heldout", action="store_true",
                   help="score a held-out corrupted copy: 1-3 of the 18 corruptions no training setting reaches "
                        "(docs/robustness.md); needs labels")
    p.add_argument("--medmnist-c", action="store_true",
                   help="score the MedMNIST-C bloodmnist corruptions instead: each image under all 11 (published "
                        "by others; seen or unseen as the run's config.json says, else the kit's split), severities "
                        "1-5 in turn (docs/robustness.md); needs labels")
    p.add_argument("--max-images", type=int, default=None,
                   help="with --medmnist-c: up to this many images, drawn with --seed as a run draws its "
                        "--robustness-images (default: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the corrupted copy (a run uses its config seed)")
    p.add_argument("--per-corruption", action="store_true",
                   help="also score each of the 21 corruptions alone (with --heldout: the 18 held-out ones), at "
                        "each of --severities")
    p.add_argument("--severities", default="1,3,5", help="severities for --per-corruption (default 1,3,5)")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tune", help="short runs of augmentation candidates, scored clean and corrupted")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None)
    p.add_argument("--resume", help=argparse.SUPPRESS)
    p.add_argument("--budget-min", type=float, default=60.0, help="start no candidate that would end past this")
    p.add_argument("--candidates", help="comma-separated names from trainer/tune.py (default: all, in order)")
    p.add_argument("--leave-one-out", action="store_true",
                   help="instead of the candidates: the base recipe whole, then once without each corruption "
                        "family's augmentation (--drop-family), each scored on that family's held-out and "
                        "in-distribution corruptions; writes lofo.json and lofo.md (docs/robustness.md)")
    p.add_argument("--families", help="with --leave-one-out: comma-separated families to drop (default: all "
                                      "seven)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="write (or refresh) a run's report.html")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/cpu-20261127-101500")
    p.add_argument("--n", type=int, default=32, help="mistakes in the Grad-CAM gallery")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("gradcam", help="Grad-CAM of a run's worst mistakes: gradcam.png and the report's gallery")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/cpu-20261127-101500")
    p.add_argument("--n", type=int, default=32, help="how many of the most confident mistakes")
    p.set_defaults(func=cmd_gradcam)

    p = sub.add_parser("runs", help="table of all runs, newest first")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--sort", default="date", help="column to sort by: name, date, model, optimizer, notes, epochs, "
                   "time, clean, heldout (held-out corrupted), leaderboard (latest recorded score), mmc (MedMNIST-C), "
                   "in_dist (in-distribution corrupted; also: corrupted), f1, onnx_mb, projected, verdict")
    p.add_argument("--reverse", action="store_true", help="flip the order (numbers and dates sort largest first)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("score", help="record the leaderboard score a submitted zip got, in the run it came from")
    p.add_argument("zip", help="the zip you uploaded, e.g. dist/submission.zip")
    p.add_argument("score", type=float, help="the score the leaderboard showed, as a fraction: 0.9312")
    p.add_argument("--note", default="", help="a word about the submission, e.g. the phase or what changed")
    p.add_argument("--run", help="the run folder, when the zip is in no zips.json and its model in no run")
    p.add_argument("--runs-dir", default="runs", help="where to look for the run (default runs)")
    p.set_defaults(func=cmd_score)

    sub.add_parser("corrupt", help="write a corrupted copy of an .npz: corrupt IN.npz OUT.npz [--seed S]; with "
                   "--heldout, a copy with the held-out corruptions, or --preview out.png to draw them")

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    # RuntimeError: no internet for ImageNet weights, an export that fails its parity check; each says what to do.
    except (DataError, FileNotFoundError, ValueError, RuntimeError, SubmissionError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left early (`python -m trainer runs | head`): stop quietly, as `head` expects.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
