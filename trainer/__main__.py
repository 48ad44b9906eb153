"""Command line: python -m trainer {train,augment,export,corrupt} ..."""
from __future__ import annotations

import argparse
import os
import sys

from .config import PROFILES, add_config_arguments, config_from_args, load_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def default_profile() -> str:
    """gpu when TensorFlow sees a GPU, cpu otherwise."""
    import tensorflow as tf
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def resolve_config(args):
    if getattr(args, "resume", None):
        path = os.path.join(args.resume, "config.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} not found; --resume takes a run folder such as runs/cpu-20261127-101500")
        return load_config(path)
    if not args.profile:
        args.profile = default_profile()
    return config_from_args(args)


def cmd_train(args) -> int:
    from .train import train
    cfg = resolve_config(args)
    metrics = train(cfg)
    test = metrics.get("test") or metrics["val"]
    print(f"accuracy {test['accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} "
          f"({'test' if 'test' in metrics else 'val'} split); run folder {os.path.join(cfg.runs_dir, cfg.name)}")
    return 0


def cmd_augment(args) -> int:
    import numpy as np
    from . import data
    from .augment import augmented_samples, save_grid
    cfg = resolve_config(args)
    images, labels = data.load_npz(cfg.data, resize=cfg.resize)
    keep, _ = data.clean(images, labels, cfg.max_copies, cfg.rare_colour_threshold)
    pick = np.random.default_rng(cfg.seed).choice(keep, args.n, replace=False)
    save_grid(images[pick], augmented_samples(images[pick], cfg, args.n), args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    import keras
    import numpy as np
    from . import models  # noqa: F401  registers the custom layers
    from .train import export_run
    cfg = load_config(os.path.join(args.run, "config.json"))
    if args.submission_dir is not None:
        cfg.submission_dir = args.submission_dir
    model = keras.models.load_model(os.path.join(args.run, "model.keras"))
    with np.load(os.path.join(args.run, "holdout.npz")) as held:
        check = held["images"][:64]
    export_run(cfg, model, check, args.run)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "corrupt":
        from . import corrupt
        return corrupt.main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="clean, split, augment, train, evaluate and export one run")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="named settings (default: gpu if a GPU is visible, else cpu)")
    p.add_argument("--resume", metavar="RUN_DIR", help="resume an interrupted run with its saved config")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

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

    sub.add_parser("corrupt", help="write a corrupted copy of an .npz: corrupt IN.npz OUT.npz [--seed S]")

    args = parser.parse_args(argv)
    from .data import DataError
    try:
        return args.func(args)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
