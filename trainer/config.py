"""One typed config for every run, with named profiles and command-line overrides."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields

CLASS_NAMES = ("Basophil", "Eosinophil", "Erythroblast", "Immature granulocytes",
               "Lymphocyte", "Monocyte", "Neutrophil", "Platelet")


@dataclass
class Config:
    # run
    name: str = ""                       # run folder name; empty = "<profile>-<timestamp>"
    profile: str = "cpu"
    data: str = "data/training_set.npz"
    runs_dir: str = "runs"
    submission_dir: str = "submission"   # where the final model.onnx and settings.json go; "" = don't copy
    seed: int = 42
    verbose: int = -1                    # Keras verbosity; -1 = bars on a terminal, one line per epoch otherwise

    # data: loading and cleaning
    resize: bool = False                 # resize images that are not 96x96 instead of refusing them
    max_copies: int = 3                  # an image repeated more often than this is junk, whatever its label
    rare_colour_threshold: float = 0.25  # share of an image's pixels in colours rare for smears above which it is junk
    limit: int = 0                       # use only this many cleaned images (stratified); 0 = all

    # data: split and balance
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    no_test_split: bool = False          # final submission: train on train+test, keep val for early stopping
    folds: int = 0                       # K-fold cross-validation over train+val; 0/1 = off
    balance: str = "none"                # none | class_weights | oversample

    # augmentation: stage 1, fixed geometry
    flip: bool = True                    # left-right mirror
    rot90: bool = True                   # 90-degree turns; with flip, all 8 symmetries of the square
    rotation: float = 0.5                # max free rotation, fraction of a full turn (0.5 = +-180 deg)
    zoom: float = 0.1                    # max zoom in or out: scale from 1/(1+zoom) to 1+zoom
    shift: float = 0.1                   # max shift, fraction of the side
    shear: float = 0.0                   # max shear factor
    black_fill: float = 0.0              # share of batches whose warp fills with black instead of mirroring
    # augmentation: stage 2, random transforms
    randaugment: bool = True             # keras-cv RandAugment
    randaugment_magnitude: float = 0.3   # 0..1
    randaugment_layers: int = 2          # transforms per image
    randaugment_rate: float = 0.7        # chance each transform is applied
    contrast: float = 0.2                # max contrast change, fraction
    brightness: float = 0.15             # max brightness change, fraction of 255
    saturation: float = 0.3              # max colour degeneration (0 = off, 1 = may go fully grey)
    hue: float = 0.0                     # max hue shift, fraction of the circle
    noise_std: float = 5.0               # max std of Gaussian noise, in 0-255 units
    blur: float = 0.0                    # Gaussian blur sigma (px) that half the images get a random share of; 0 = off
    erase: float = 0.0                   # chance of a random-erasing patch
    corrupt: float = 0.0                 # chance an image gets the corruption stage (noise, colour, grid...); 0 = off
    corrupt_ops: int = 2                 # a corrupted image gets 1 to this many corruptions
    corrupt_strength: float = 1.0        # 1 = up to the suite's severity 5 (see trainer/corrupt.py)
    corrupt_jpeg: bool = False           # JPEG artefacts in the corruption stage too; off, JPEG is a held-out test
    corrupt_zoom: float = 0.0            # a strong zoom in the corruption stage too: up to 1 + this in or out; 0 = off
    corrupt_blur: float = 0.0            # a strong Gaussian blur in the corruption stage too: sigma up to this; 0 = off
    mixup_alpha: float = 0.0             # 0 = off
    cutmix_alpha: float = 0.0            # 0 = off

    # model
    model: str = "vanilla_cnn"
    weights: str = "imagenet"            # imagenet | none | path to a local weights file
    input_size: int = 96                 # upscale the 96x96 input to this inside the model
    dense_units: int = 256
    dropout: float = 0.3
    l2: float = 0.0
    freeze_backbone: bool = True         # pretrained backbones start frozen
    width: int = 32                      # vanilla_cnn: filters of the first block
    first_block_convs: int = 2           # vanilla_cnn: convolutions at 48x48 (1 or 2); 1 = about 1.2x faster epochs

    # training
    optimizer: str = "nadam"             # nadam | adamw | adam | sgd | rmsprop | lion
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    batch_size: int = 64
    epochs: int = 30
    steps_per_epoch: int = 0             # 0 = one pass over the training set
    patience: int = 8                    # early stopping on val accuracy
    lr_patience: int = 3                 # ReduceLROnPlateau on val loss
    lr_factor: float = 0.5
    schedule: str = "plateau"            # plateau: ReduceLROnPlateau + early stopping | cosine: decay to ~0 by the
                                         # last epoch or the time budget, whichever comes first
    fine_tune_epochs: int = 0            # second phase with the backbone unfrozen
    fine_tune_layers: int = 0            # unfreeze the last N backbone layers; 0 = all
    fine_tune_lr: float = 1e-5
    mixed_precision: bool = False        # float16 on a GPU, bfloat16 on a CPU with AMX/AVX512-BF16, else off
    xla: bool = False                    # GPU only
    time_budget_min: float = 0.0         # stop training (keeping the best weights) after this many minutes; 0 = none
    low_res_size: int = 0                # vanilla_cnn: train on images downscaled to this size first, then at 96; 0 = off
    low_res_share: float = 0.5           # share of the time budget (of the epochs, without one) spent at low_res_size

    # evaluation
    robustness_images: int = 500         # images per family and severity in the robustness table; 0 = skip it

    # export and submission settings
    export: bool = True
    opset: int = 17
    fuse_onnx: bool = True               # rewrite LayerNorm/GELU subgraphs into fused ONNX ops
    time_limit_s: float = 6000.0
    safety_margin: float = 0.5           # share of the time limit kept in reserve
    expected_test_size: int = 10000
    max_views: int = 8

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


PROFILES: dict[str, dict] = {
    # Seconds end to end: for tests and for checking the pipeline.
    "smoke": dict(model="vanilla_cnn", width=8, dense_units=32, limit=800, epochs=2, batch_size=32,
                  randaugment=False, patience=2, weights="none", robustness_images=64),
    # The best this 2-core CPU trains within an hour, from scratch: as many epochs as fit in 56 minutes
    # (56.7 to 57.9 end to end here), on a cosine schedule that ends when the time does. One convolution fewer at
    # 48x48: in an equal-time pair the epochs it saves were worth more than the convolution (README).
    # No RandAugment: without it (cpu-v20) the hour scored higher clean and on all three corrupted copies, and
    # the augmentation step costs 0.70x as much. On a fast day (66 epochs, cpu-v21): 0.9722 clean, 0.9021 corrupted.
    "cpu": dict(model="vanilla_cnn", width=32, dense_units=256, epochs=80, batch_size=64,
                learning_rate=2e-3, label_smoothing=0.1, weights="none", time_budget_min=56.0,
                schedule="cosine", erase=0.5, blur=1.5, corrupt=0.5, corrupt_ops=3, black_fill=0.3,
                corrupt_jpeg=True, corrupt_zoom=0.6, first_block_convs=1, randaugment=False),
    # The seed write-up's best: ConvNeXtBase, ImageNet weights, NAdam, wide augmentation + RandAugment,
    # original class distribution, no test split; plus what the pseudo-private test showed on the cpu profile:
    # blur, erasing, the corruption stage (up to 3 ops, with JPEG and strong zoom) and black-border warps.
    "gpu": dict(model="convnext_base", weights="imagenet", input_size=224, batch_size=64, epochs=60,
                learning_rate=1e-4, fine_tune_epochs=30, fine_tune_lr=1e-5, freeze_backbone=False,
                no_test_split=True, label_smoothing=0.1, dense_units=512, mixed_precision=True,
                randaugment_magnitude=0.5, patience=10, erase=0.5, blur=1.5, corrupt=0.5, corrupt_ops=3,
                black_fill=0.3, corrupt_jpeg=True, corrupt_zoom=0.6),
}


def make_config(profile: str = "cpu", **overrides) -> Config:
    """Config of a named profile, then the overrides on top."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    values = {**PROFILES[profile], **overrides, "profile": profile}
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; see trainer/config.py for the list")
    return Config(**values)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per config field, e.g. --batch-size 32, --no-test-split true."""
    for f in fields(Config):
        if f.name == "profile":  # chosen by the command, with its own choices and default
            continue
        kind = {"bool": _parse_bool, "int": int, "float": float}.get(str(f.type), str)
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=str(f.type).upper(),
                            nargs="?" if kind is _parse_bool else None,
                            const=True if kind is _parse_bool else None)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {f.name: getattr(args, f.name) for f in fields(Config)
                 if getattr(args, f.name, None) is not None and f.name != "profile"}
    return make_config(args.profile or "cpu", **overrides)


def load_config(path: str) -> Config:
    with open(path) as fh:
        values = json.load(fh)
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in names})
