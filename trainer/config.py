"""One typed config for every run: each field with its help, group and range; named profiles; one validate()."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields

from .registry import MODELS, spec_of

CLASS_NAMES = ("Basophil", "Eosinophil", "Erythroblast", "Immature granulocytes",
               "Lymphocyte", "Monocyte", "Neutrophil", "Platelet")

RUN, LOADING, SPLIT = "run", "data: loading and cleaning", "data: split and balance"
GEOMETRY, TRANSFORMS = "augmentation: stage 1, fixed geometry", "augmentation: stage 2, random transforms"
MODEL, TRAINING, EVALUATION, EXPORT = "model", "training", "evaluation", "export and submission settings"
GROUPS = (RUN, LOADING, SPLIT, GEOMETRY, TRANSFORMS, MODEL, TRAINING, EVALUATION, EXPORT)
# The corruption families of both suites: trainer/corrupt.py's six, and microscopy, which only trainer/heldout.py
# has. heldout.FAMILIES follows this order; --drop-family takes one of them.
CORRUPTION_FAMILIES = ("noise", "blur", "colour", "geometry", "compression", "occlusion", "microscopy")
# The families the corruption stage has ops of (trainer/augment.py's OP_FAMILY; a test keeps the two alike).
STAGE_FAMILIES = ("noise", "blur", "colour", "geometry", "compression", "occlusion")


def option(default, help: str, group: str, *, choices=None, low=None, high=None, resume: bool = False,
           off=None, needs=None):
    """A Config field with its metadata: help line, group, choices or range (inclusive), whether a resumed run may
    change it, (augmentation fields) the value that turns it off, and the field it refines: needs = "erase" (it acts
    only while erase is on: above 0, true) or ("schedule", "plateau") (only while schedule is plateau)."""
    return field(default=default, metadata=dict(help=help, group=group, choices=choices, low=low, high=high,
                                                resume=resume, off=off, needs=needs))


@dataclass
class Config:
    # run
    name: str = option("", "run folder name under runs_dir; empty = <profile>-<timestamp>", RUN)
    profile: str = option("cpu", "named settings the run started from", RUN)
    data: str = option("data/training_set.npz", "the course's .npz file: images (N,96,96,3), labels (N,1)", RUN)
    runs_dir: str = option("runs", "folder that holds one folder per run", RUN)
    submission_dir: str = option("submission", "where the final model.onnx and settings.json go; empty = no copy",
                                 RUN, resume=True)
    seed: int = option(42, "seed of the split, the starting weights, the shuffle and every augmented batch; two "
                       "runs of one seed end apart unless --one-op-thread is on and the epochs are fixed (a time "
                       "budget ends them where the clock says)",
                       RUN, low=0)
    verbose: int = option(-1, "Keras verbosity: 0 silent, 1 bars, 2 a line an epoch; -1 = bars on a terminal",
                          RUN, low=-1, high=2, resume=True)

    # data: loading and cleaning
    resize: bool = option(False, "resize images that are not 96x96 instead of refusing them", LOADING)
    max_copies: int = option(3, "an image repeated more often than this is junk, whatever its label", LOADING, low=1)
    rare_colour_threshold: float = option(0.25, "share of an image's pixels in colours rare for smears above which "
                                          "it is junk", LOADING, low=0.0, high=1.0)
    limit: int = option(0, "use only this many cleaned images (stratified); 0 = all", LOADING, low=0)

    # data: split and balance
    val_fraction: float = option(0.1, "share of the images for validation (early stopping, checkpoints)", SPLIT,
                                 low=0.01, high=0.5)
    test_fraction: float = option(0.1, "share of the images held out for the test split", SPLIT, low=0.0, high=0.5)
    no_test_split: bool = option(False, "final submission: the test share joins training; val stays", SPLIT)
    folds: int = option(0, "K-fold cross-validation over train+val, averaged in one model; 0 or 1 = off", SPLIT,
                        low=0, high=20)
    balance: str = option("none", "class balance: none, class_weights or oversample", SPLIT,
                          choices=("none", "class_weights", "oversample"))

    # augmentation: stage 1, fixed geometry
    flip: bool = option(True, "left-right mirror", GEOMETRY, off=False)
    rot90: bool = option(True, "90-degree turns; with flip, all 8 symmetries of the square", GEOMETRY, off=False)
    rotation: float = option(0.5, "max free rotation, fraction of a full turn (0.5 = +-180 deg)", GEOMETRY,
                             low=0.0, high=0.5, off=0.0)
    zoom: float = option(0.1, "max zoom in or out: scale from 1/(1+zoom) to 1+zoom", GEOMETRY, low=0.0, high=2.0,
                         off=0.0)
    shift: float = option(0.1, "max shift, fraction of the side", GEOMETRY, low=0.0, high=0.5, off=0.0)
    shear: float = option(0.0, "max shear factor", GEOMETRY, low=0.0, high=1.0, off=0.0)
    black_fill: float = option(0.0, "share of batches whose warp fills with black instead of mirroring", GEOMETRY,
                               low=0.0, high=1.0, off=0.0)
    # augmentation: stage 2, random transforms
    randaugment: bool = option(True, "keras-cv RandAugment", TRANSFORMS, off=False)
    randaugment_magnitude: float = option(0.3, "RandAugment strength, 0 to 1", TRANSFORMS, low=0.0, high=1.0,
                                          off=0.0, needs="randaugment")
    randaugment_layers: int = option(2, "RandAugment transforms per image", TRANSFORMS, low=0, high=10, off=0,
                                     needs="randaugment")
    randaugment_rate: float = option(0.7, "chance each RandAugment transform is applied", TRANSFORMS, low=0.0,
                                     high=1.0, off=0.0, needs="randaugment")
    contrast: float = option(0.2, "max contrast change, fraction", TRANSFORMS, low=0.0, high=1.0, off=0.0)
    brightness: float = option(0.15, "max brightness change, fraction of 255", TRANSFORMS, low=0.0, high=1.0,
                               off=0.0)
    saturation: float = option(0.3, "max colour degeneration (0 = off, 1 = may go fully grey)", TRANSFORMS,
                               low=0.0, high=1.0, off=0.0)
    hue: float = option(0.0, "max hue shift, fraction of the circle", TRANSFORMS, low=0.0, high=0.5, off=0.0)
    noise_std: float = option(5.0, "max std of Gaussian noise, in 0-255 units", TRANSFORMS, low=0.0, high=100.0,
                              off=0.0)
    blur: float = option(0.0, "Gaussian blur sigma (px) that half the images get a random share of; 0 = off",
                         TRANSFORMS, low=0.0, high=5.0, off=0.0)
    erase: float = option(0.0, "chance of a random-erasing patch", TRANSFORMS, low=0.0, high=1.0, off=0.0)
    erase_fill: str = option("random", "what a random-erasing patch holds when it is a flat colour (half the "
                             "time; else noise): random = any colour; extremes = black a third of the time, white a "
                             "third, any colour the rest (a blot of ink, a glare)", TRANSFORMS,
                             choices=("random", "extremes"), off="random", needs="erase")
    erase_shape: str = option("rectangle", "outline of a random-erasing patch: rectangle, or blot = a ragged blob "
                              "inside the same box (smoothed random noise cut by a threshold)", TRANSFORMS,
                              choices=("rectangle", "blot"), off="rectangle", needs="erase")
    erase_opacity: float = option(1.0, "least opacity of a random-erasing patch, drawn up to 1 per patch: below 1 "
                                  "some patches are translucent veils the cell shows through; 1 = opaque", TRANSFORMS,
                                  low=0.0, high=1.0, off=1.0, needs="erase")
    corrupt: float = option(0.0, "chance an image gets the corruption stage (noise, colour, grid...); 0 = off",
                            TRANSFORMS, low=0.0, high=1.0, off=0.0)
    corrupt_ops: int = option(2, "a corrupted image gets 1 to this many corruptions", TRANSFORMS, low=1, high=6,
                              off=1, needs="corrupt")
    corrupt_strength: float = option(1.0, "1 = up to the suite's severity 5 (see trainer/corrupt.py)", TRANSFORMS,
                                     low=0.0, high=2.0, off=0.0, needs="corrupt")
    corrupt_jpeg: bool = option(False, "JPEG artefacts in the corruption stage too", TRANSFORMS, off=False,
                                needs="corrupt")
    corrupt_jpeg_weight: float = option(1.0, "how often the corruption stage's draw picks JPEG against any other "
                                        "op: 3 = about three times as often; 1 = as often", TRANSFORMS, low=0.1,
                                        high=10.0, off=1.0, needs="corrupt_jpeg")
    corrupt_zoom: float = option(0.0, "a strong zoom in the corruption stage: up to 1 + this in or out; 0 = off",
                                 TRANSFORMS, low=0.0, high=2.0, off=0.0, needs="corrupt")
    corrupt_blur: float = option(0.0, "a strong Gaussian blur in the corruption stage: sigma up to this; 0 = off",
                                 TRANSFORMS, low=0.0, high=5.0, off=0.0, needs="corrupt")
    corrupt_blur_weight: float = option(1.0, "how often the corruption stage's draw picks the strong blur against "
                                        "any other op: 3 = about three times as often; 1 = as often", TRANSFORMS,
                                        low=0.1, high=10.0, off=1.0, needs="corrupt_blur")
    soft_corrupt: float = option(0.0, "confidence the label of a fully damaged image loses: the true class keeps 1 - "
                                 "this x damage squared, the other classes share the rest, damage = 1 - the product "
                                 "of (1 - strength) over the image's corruption-stage ops (Soft Augmentation, Liu et "
                                 "al., CVPR 2023); 0 = hard labels", TRANSFORMS, low=0.0, high=0.875, off=0.0,
                                 needs="corrupt")
    soft_spare: str = option("", "a corruption family whose corruption-stage ops leave the label hard: their strength "
                             "counts as no damage, so a cell blurred by the strong blur (blur) still teaches its "
                             "class at full confidence; empty = every op softens", TRANSFORMS,
                             choices=("",) + STAGE_FAMILIES, off="", needs="soft_corrupt")
    pixmix: float = option(0.0, "chance an image is blended with a random structured picture, added or multiplied "
                           "in (after PixMix, Hendrycks et al., CVPR 2022; our pictures are 1/f textures with no "
                           "ramp across the crop, not their fractals); 0 = off", TRANSFORMS, low=0.0, high=1.0,
                           off=0.0)
    pixmix_weight: float = option(0.5, "most weight a PixMix picture gets in the blend (drawn uniformly up to "
                                  "this)", TRANSFORMS, low=0.0, high=1.0, off=0.0, needs="pixmix")
    randconv: float = option(0.0, "chance an image is mixed with itself seen through a random convolution (after "
                             "RandConv, Xu et al., ICLR 2021): a 1, 3, 5 or 7 px kernel with Gaussian weights, new "
                             "each batch, brightness and contrast kept, the original's weight uniform in [0, 1]; "
                             "0 = off", TRANSFORMS, low=0.0, high=1.0, off=0.0)
    augmix: float = option(0.0, "chance an image is replaced by AugMix's mixing (Hendrycks et al., ICLR 2020): "
                           "three chains of 1-3 ops (auto-contrast, equalise, solarise, rotation, shear, translation "
                           "at AugMix's default severity) mixed with Dirichlet weights, then blended with the image; "
                           "0 = off", TRANSFORMS, low=0.0, high=1.0, off=0.0)
    apr: float = option(0.0, "chance an image takes the Fourier amplitude of another image in its batch and keeps "
                        "its own phase and mean colour (after APR-P, Chen et al., ICCV 2021): outline and layout "
                        "stay, contrast, sharpness and texture come from another cell; 0 = off", TRANSFORMS,
                        low=0.0, high=1.0, off=0.0)
    patch_gaussian: float = option(0.0, "max std (0-255 units) of Gaussian noise that every image gets inside one "
                                   "square patch, its side up to 3/4 of the image's and its std uniform up to this "
                                   "(Patch Gaussian, Lopes et al., 2019); 0 = off", TRANSFORMS, low=0.0, high=255.0,
                                   off=0.0)
    veil: float = option(0.0, "chance an image gets a patchy translucent veil: soft or sharp blobs over a tenth "
                         "to three fifths of it where the image is blended toward a light grey, contrast down and "
                         "brightness up there only (a film of medium, glare); 0 = off", TRANSFORMS, low=0.0,
                         high=1.0, off=0.0)
    veil_opacity: float = option(0.6, "most opacity of a veil, drawn uniformly from 0 up to this", TRANSFORMS,
                                 low=0.0, high=1.0, off=0.0, needs="veil")
    mixup_alpha: float = option(0.0, "mixup Beta(alpha, alpha) mixing; 0 = off", TRANSFORMS, low=0.0, high=10.0,
                                off=0.0)
    cutmix_alpha: float = option(0.0, "CutMix Beta(alpha, alpha) patch mixing; 0 = off", TRANSFORMS, low=0.0,
                                 high=10.0, off=0.0)
    drop_family: str = option("", "leave-one-family-out: switch off every augmentation that produces this corruption "
                              "family's kinds (the corruption stage skips its ops, the other ops are drawn as "
                              "often); empty = keep all. See python -m trainer tune --leave-one-out", TRANSFORMS,
                              choices=("",) + CORRUPTION_FAMILIES)

    # model
    model: str = option("vanilla_cnn", "classifier from the registry (trainer/registry.py)", MODEL,
                        choices=tuple(MODELS))
    weights: str = option("imagenet", "pretrained backbones: imagenet, none, or the path of a local weights file",
                          MODEL)
    input_size: int = option(96, "upscale the 96x96 input to this inside the model", MODEL, low=32, high=1024)
    dense_units: int = option(256, "units of the Dense layer of the head", MODEL, low=1)
    dropout: float = option(0.3, "dropout before the last Dense layer", MODEL, low=0.0, high=0.95)
    l2: float = option(0.0, "L2 weight penalty of the convolutions and the head; 0 = off", MODEL, low=0.0)
    freeze_backbone: bool = option(True, "pretrained backbones start frozen", MODEL)
    width: int = option(32, "vanilla_cnn: filters of the first block (doubling per block)", MODEL, low=4, high=256)
    input_norm: str = option("none", "normalise each image's colours inside the model (also in model.onnx): none; "
                             "channel = each colour channel of each image to a fixed mean and spread, so a "
                             "colour cast, a brightness or a contrast change cannot reach the layers after it; "
                             "robust = the same with near-black and near-white pixels (ink, bubbles) left out of "
                             "the statistics", MODEL, choices=("none", "channel", "robust"))
    first_block_convs: int = option(2, "vanilla_cnn: convolutions at 48x48 (1 or 2); 1 = about 1.2x faster epochs",
                                    MODEL, choices=(1, 2))
    stem_kernel: int = option(3, "vanilla_cnn: side of the stride-2 stem convolution's kernel (3, 5 or 7); larger = "
                              "each first feature sums a wider patch of the cell, as larger kernels and stems "
                              "did for out-of-distribution robustness in Wang et al., ICLR 2023; 7 = about 1.05x "
                              "the step time", MODEL, choices=(3, 5, 7))
    blur_pool: bool = option(False, "vanilla_cnn: anti-aliased max pooling (Zhang, ICML 2019): the max of each "
                             "2x2 window at every position, then a 3x3 binomial blur before one pixel in four is "
                             "kept; about 5% slower steps on 2 cores", MODEL)
    squeeze_excite: int = option(0, "vanilla_cnn: squeeze-and-excitation (Hu et al., CVPR 2018) at the end of "
                                 "each of the four blocks: each image's channel means, through two small dense "
                                 "layers, scale its channels (in model.onnx too), so a block can damp the "
                                 "channels an artefact excites; the value is the reduction ratio (8 = a block "
                                 "of 64 channels squeezes to 8); 0 = off", MODEL, low=0, high=64)
    residual: bool = option(False, "vanilla_cnn: each of the four blocks adds its input to its output before the "
                            "last ReLU (He et al., CVPR 2016), through a 1x1 convolution and BatchNorm where the "
                            "block doubles the channels; about 3 percent more multiply-adds", MODEL)
    feature_jitter: float = option(0.0, "vanilla_cnn, training only: share of the images whose per-channel "
                                   "feature means and spreads move at random, after the stem and the first "
                                   "three blocks (DSU, Li et al., ICLR 2022); 0 = off", MODEL, low=0.0, high=1.0)
    local_contrast: float = option(0.0, "vanilla_cnn: sigma in pixels of a Gaussian window; each pixel's "
                                   "difference from the window's mean over the window's spread goes into the "
                                   "stem beside the image (also in model.onnx), so texture dimmed by a veil, a "
                                   "blur or a local exposure change comes back at its usual contrast; 0 = off "
                                   "(at most 8, so the window fits a 32-pixel --low-res-size image)",
                                   MODEL, low=0.0, high=8.0)
    local_contrast_floor: float = option(0.03, "vanilla_cnn with local_contrast: the least spread a window is "
                                         "divided by, on the 0-1 pixel scale (a cell's median is about 0.08); "
                                         "higher = less noise lifted from flat patches, less of a veil's dimming "
                                         "undone", MODEL, low=0.001, high=1.0, needs="local_contrast")
    instance_norm: bool = option(False, "vanilla_cnn: half the channels (--instance-norm-share) of each "
                                 "convolution in the stem and the first three blocks normalised per image instead "
                                 "of per batch, in model.onnx too (IBN-a, Pan et al., ECCV 2018), so a change to a "
                                 "feature map's overall strength divides out there", MODEL)
    instance_norm_stem: bool = option(True, "vanilla_cnn with instance_norm: the stem's convolution too; false = "
                                      "the first three blocks only, the stem on BatchNorm alone", MODEL,
                                      needs="instance_norm")
    instance_norm_share: float = option(0.5, "vanilla_cnn with instance_norm: share of the channels of each such "
                                        "convolution normalised per image (IBN-a's half); the rest per batch, none "
                                        "at 1", MODEL, low=0.1, high=1.0, needs="instance_norm")

    # training
    optimizer: str = option("nadam", "nadam, adamw, adam, sgd, rmsprop or lion", TRAINING,
                            choices=("nadam", "adamw", "adam", "sgd", "rmsprop", "lion"))
    learning_rate: float = option(1e-3, "learning rate of the first phase", TRAINING, low=0.0, high=1.0)
    weight_decay: float = option(1e-4, "decoupled weight decay (optimizers that take it; Keras shrinks each "
                                 "weight by learning rate x this a step, so 1e-4 at lr 2e-3 is about 2e-7 a step, "
                                 "next to nothing; AdamW recipes use 0.01-0.05); 0 = off", TRAINING,
                                 low=0.0, high=1.0)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", TRAINING, low=0.0, high=0.5)
    batch_size: int = option(64, "images a training step", TRAINING, low=1, high=4096)
    epochs: int = option(30, "epochs of the first phase (fewer if the time budget ends first)", TRAINING, low=1,
                         resume=True)
    steps_per_epoch: int = option(0, "steps an epoch; 0 = one pass over the training set", TRAINING, low=0)
    patience: int = option(8, "plateau schedule: early stopping after this many epochs without better val "
                           "accuracy", TRAINING, low=1, needs=("schedule", "plateau"))
    lr_patience: int = option(3, "plateau schedule: halve-style LR drop after this many epochs without better val "
                              "loss", TRAINING, low=1, needs=("schedule", "plateau"))
    lr_factor: float = option(0.5, "plateau schedule: factor of each learning-rate drop", TRAINING, low=0.01,
                              high=0.99, needs=("schedule", "plateau"))
    schedule: str = option("plateau", "plateau: ReduceLROnPlateau + early stopping; cosine: decay to ~0 by the last "
                           "epoch or the end of the time budget, whichever comes first", TRAINING,
                           choices=("plateau", "cosine"))
    fine_tune_epochs: int = option(0, "pretrained backbones: a second phase with the backbone unfrozen", TRAINING,
                                   low=0, resume=True)
    fine_tune_layers: int = option(0, "unfreeze the last N backbone layers in the second phase; 0 = all", TRAINING,
                                   low=0, needs="fine_tune_epochs")
    fine_tune_lr: float = option(1e-5, "learning rate of the second phase", TRAINING, low=0.0, high=1.0,
                                 needs="fine_tune_epochs")
    consistency: float = option(0.0, "weight of a Jensen-Shannon consistency loss between two augmented views of "
                                "each image (Hendrycks et al., AugMix, ICLR 2020); a batch then holds batch_size/2 "
                                "images twice, so an epoch costs about twice the time; 0 = off", TRAINING,
                                low=0.0, high=50.0)
    swa: float = option(0.0, "stochastic weight averaging (Izmailov et al., UAI 2018), every step as in SWAD "
                        "(Cha et al., NeurIPS 2021): for this last share of the cosine schedule the learning rate "
                        "holds at --swa-lr and the model kept is the mean of the weights after each step there, "
                        "instead of the best epoch's; 0 = off", TRAINING, low=0.0, high=0.9)
    swa_lr: float = option(0.1, "the learning rate held while --swa averages the weights, as a share of the "
                           "phase's learning rate; the cosine before it decays to this", TRAINING, low=0.0, high=1.0,
                           needs="swa")
    mixed_precision: bool = option(False, "float16 on a GPU, bfloat16 on a CPU with AMX/AVX512-BF16, else off",
                                   TRAINING)
    xla: bool = option(False, "XLA-compile the training step (GPU only)", TRAINING)
    one_op_thread: bool = option(False, "run TensorFlow's ops one at a time (one inter-op thread; each op still "
                                 "uses every core): on a CPU a seed then repeats a run of a fixed number of epochs bit "
                                 "for bit (with several ops at once, gradients differ in their last bits between "
                                 "runs); takes effect when TensorFlow starts, so for every run of a process from "
                                 "its first", TRAINING, resume=True)
    time_budget_min: float = option(0.0, "stop training (keeping the best weights) after this many minutes, resumes "
                                    "counted; 0 = none", TRAINING, low=0.0, resume=True)
    low_res_size: int = option(0, "vanilla_cnn: train on images downscaled to this size first, then at 96; 0 = off",
                               TRAINING, low=0, high=95)
    low_res_share: float = option(0.5, "share of the time budget (of the epochs, without one) spent at "
                                  "low_res_size", TRAINING, low=0.0, high=1.0, needs="low_res_size")

    # evaluation
    robustness_images: int = option(500, "images per family and severity in the robustness table, per held-out "
                                    "corruption and severity, and per MedMNIST-C corruption (a fifth at each "
                                    "severity); 0 = skip the corrupted scores", EVALUATION, low=0, resume=True)
    inference_memory_mb: int = option(1024, "memory for the activations of one batch after training (evaluation, "
                                      "BatchNorm check, robustness, the export's parity check); sets their batch "
                                      "size from the model's largest layer output, at most 128", EVALUATION,
                                      low=16, resume=True)

    # export and submission settings
    export: bool = option(True, "export model.onnx and settings.json at the end of the run", EXPORT, resume=True)
    opset: int = option(17, "ONNX opset of the export", EXPORT, low=13, high=21)
    fuse_onnx: bool = option(True, "rewrite LayerNorm/GELU subgraphs into fused ONNX ops", EXPORT)
    onnx_weights: str = option("float32", "dtype of the weight matrices and kernels stored in model.onnx; float16 "
                               "halves the file, with Cast nodes back to float32 so inference stays float32",
                               EXPORT, choices=("float32", "float16"), resume=True)
    time_limit_s: float = option(6000.0, "the grader's time limit that model.py plans its TTA views for", EXPORT,
                                 low=1.0)
    safety_margin: float = option(0.5, "share of the time limit model.py keeps in reserve", EXPORT, low=0.0,
                                  high=0.95)
    expected_test_size: int = option(10000, "test images model.py plans its time for", EXPORT, low=1)
    max_views: int = option(8, "most TTA views model.py may use (1 = no TTA)", EXPORT, low=1, high=8)
    score_submission: bool = option(True, "after the export, score model.onnx as the zip serves it (model.py with "
                                    "--max-views views) on the test split clean, its held-out copy and MedMNIST-C: "
                                    "metrics.json's submission; off in the gpu profile, whose model would take "
                                    "hours on a CPU runtime", EXPORT, resume=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


PROFILES: dict[str, dict] = {
    # Seconds end to end: for tests and for checking that the pipeline runs. Its accuracy means nothing.
    "smoke": dict(model="vanilla_cnn", width=8, dense_units=32, limit=800, epochs=2, batch_size=32,
                  randaugment=False, patience=2, weights="none", robustness_images=64),
    # The best this kit trains from scratch on a 2-core CPU within an hour: a small CNN, as many epochs as fit in
    # 53 minutes on a cosine schedule that ends when the time does (training ends up to a minute past it, and
    # evaluation, export and scoring take about 4 more: the run ends within the hour), the augmentation the
    # corrupted copies rewarded, softer labels for the images it damaged, and instance norm in the early layers.
    # Veils, ragged black-or-white blots, the strong blur and JPEG drawn three times as readily aim at MedMNIST-C's
    # weakest kinds: they lift that suite on both seeds and leave the held-out copy level, though they make bubble
    # and stain deposit seen kinds. The decisions behind each setting: docs/experiments.md.
    "cpu": dict(model="vanilla_cnn", width=32, dense_units=256, epochs=80, batch_size=64,
                learning_rate=2e-3, label_smoothing=0.1, weights="none", time_budget_min=53.0,
                schedule="cosine", erase=1.0, blur=1.5, corrupt=0.5, corrupt_ops=3, black_fill=0.3,
                corrupt_jpeg=True, corrupt_zoom=0.6, soft_corrupt=0.5, first_block_convs=1, randaugment=False,
                instance_norm=True, veil=0.2, corrupt_blur=3.0, erase_shape="blot", erase_fill="extremes",
                corrupt_jpeg_weight=3.0),
    # For a GPU (Colab, Kaggle): ConvNeXtBase from ImageNet weights at 224x224, fine-tuned end to end, with the cpu
    # profile's augmentation as it was before the veils, blots, strong blur and JPEG weight (none of them measured
    # on this model yet) plus RandAugment, and no test split (every image trains the submission). Its ONNX
    # stores float16 weights: 177 MB instead of 353, the same labels on 1,000 images (docs/memory.md).
    "gpu": dict(model="convnext_base", weights="imagenet", input_size=224, batch_size=64, epochs=60,
                learning_rate=1e-4, fine_tune_epochs=30, fine_tune_lr=1e-5, freeze_backbone=False,
                no_test_split=True, label_smoothing=0.1, dense_units=512, mixed_precision=True,
                randaugment_magnitude=0.5, patience=10, erase=0.5, blur=1.5, corrupt=0.5, corrupt_ops=3,
                black_fill=0.3, corrupt_jpeg=True, corrupt_zoom=0.6, soft_corrupt=0.5, onnx_weights="float16",
                score_submission=False),
}


def off_values(groups: tuple = (GEOMETRY, TRANSFORMS)) -> dict:
    """Each setting of these groups that has an "off" value (augmentation switched off), with that value."""
    return {f.name: f.metadata["off"] for f in dataclasses.fields(Config)
            if f.metadata["group"] in groups and f.metadata["off"] is not None}


def make_config(profile: str = "cpu", **overrides) -> Config:
    """Config of a named profile, then the overrides on top (not validated: validate() does that)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    values = {**PROFILES[profile], **overrides, "profile": profile}
    names = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; python -m trainer train --help lists them")
    return Config(**values)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: Config, given=()) -> list[str]:
    """Check every range, choice and combination in one place; raise ValueError naming the fix.

    Returns warnings: one line for each field in `given` (the flags a user set) that cfg.model ignores, or that
    another setting switches off (--erase-opacity while --erase is 0).
    """
    for f in fields(Config):
        meta, value = f.metadata, getattr(cfg, f.name)
        if meta.get("choices") is not None and value not in meta["choices"]:
            choices = ", ".join(map(str, meta["choices"]))
            if f.name == "model":
                raise ValueError(f"unknown model {value!r}; choose one of {choices}")
            if f.name == "optimizer":
                raise ValueError(f"unknown optimizer {value!r}; choose one of {choices}")
            if f.name == "schedule":
                raise ValueError(f"unknown schedule {value!r}; choose plateau or cosine")
            if f.name == "drop_family":
                raise ValueError(f"--drop-family is {value!r}; choose one of {', '.join(CORRUPTION_FAMILIES)}, or "
                                 "leave it empty to train on every family")
            if f.name == "soft_spare":
                raise ValueError(f"--soft-spare is {value!r}; choose one of {', '.join(STAGE_FAMILIES)}, or "
                                 "leave it empty to soften the labels after every corruption-stage op")
            if f.name == "first_block_convs":
                raise ValueError(f"first_block_convs is {value}; use 2 (the full block) or 1 (one convolution "
                                 "less at 48x48, about 1.2x faster epochs: the cpu profile's choice)")
            raise ValueError(f"{flag(f.name)} is {value!r}; choose one of {choices}")
        low, high = meta.get("low"), meta.get("high")
        if f.name == "low_res_size":
            continue  # its range depends on the model: below
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"from {low} to {high}" if low is not None and high is not None else \
                f"at least {low}" if low is not None else f"at most {high}"
            raise ValueError(f"{flag(f.name)} is {value}; use a value {span} ({meta['help']})")
    spec = spec_of(cfg.model)
    if cfg.input_size < spec.min_size:
        raise ValueError(f"{cfg.model} needs input_size >= {spec.min_size}, got {cfg.input_size}")
    if cfg.val_fraction + cfg.test_fraction >= 0.9:
        raise ValueError(f"val_fraction + test_fraction is {cfg.val_fraction + cfg.test_fraction:g}; leave at least "
                         "10% of the images for training")
    if cfg.consistency > 0:
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            raise ValueError("--consistency compares two views of the same image, which mixup and CutMix blend with "
                             "other images; use --mixup-alpha 0 --cutmix-alpha 0 with it, or --consistency 0")
        if cfg.batch_size < 4 or cfg.batch_size % 2:
            raise ValueError(f"--consistency needs an even batch_size of at least 4 (two views of batch_size/2 "
                             f"images), got {cfg.batch_size}")
    if cfg.swa and cfg.schedule != "cosine":
        raise ValueError(f"--swa averages the weights of the cosine schedule's tail; use --schedule cosine with it, "
                         f"or --swa 0 (the {cfg.schedule} schedule has no tail to average)")
    if cfg.low_res_size:
        if not 32 <= cfg.low_res_size < 96:
            raise ValueError(f"low_res_size is {cfg.low_res_size}; use a size from 32 to 95 (64 is 1.9x cheaper "
                             "an image than 96), or 0 to train at 96 throughout")
        if not 0 < cfg.low_res_share < 1:
            raise ValueError(f"low_res_share is {cfg.low_res_share}; use a share between 0 and 1, e.g. 0.5")
        if not spec.any_size or cfg.input_size != 96:
            raise ValueError("training at a low resolution first (--low-res-size) works with vanilla_cnn at "
                             f"input_size 96, not {cfg.model} at {cfg.input_size}; use --low-res-size 0")
        if cfg.folds >= 2 and cfg.time_budget_min:
            # The folds share one budget, so a switch by the budget's share would leave the later folds no low epochs.
            raise ValueError("--low-res-size with --folds switches by epochs, not by a shared time budget; use "
                             "--time-budget-min 0 (and --epochs) with --folds, or drop --folds")
    warnings = []
    for name in given:
        meta = Config.__dataclass_fields__[name].metadata
        if spec.ignores(name):
            warnings.append(f"warning: {flag(name)} does not apply to {cfg.model}; it is ignored")
        elif not _acts(cfg, meta):
            parent, value = _needs(meta)
            warnings.append(f"warning: {flag(name)} acts only with {flag(parent)} {_on_text(parent, value)}, and "
                            f"{flag(parent)} is {_shown(getattr(cfg, parent))}; it is ignored")
    return warnings


def _needs(meta) -> tuple[str, object]:
    """The field that a field (its metadata) refines and the value it needs there (None = any value that is on)."""
    needs = meta["needs"]
    return (needs, None) if isinstance(needs, str) else needs


def _acts(cfg: Config, meta) -> bool:
    """False when the field that a field (its metadata) refines switches it off in cfg (--erase-opacity while
    --erase is 0)."""
    if meta["needs"] is None:
        return True
    parent, value = _needs(meta)
    return getattr(cfg, parent) == value if value is not None else bool(getattr(cfg, parent))


def _shown(value) -> str:
    """A setting as a user types it on the command line: false, cosine, 0.0."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _needs_text(meta) -> str:
    """" Acts only with --erase above 0." for a field that refines another; "" for the rest."""
    if meta["needs"] is None:
        return ""
    parent, value = _needs(meta)
    return f" Acts only with {flag(parent)} {_on_text(parent, value)}."


def _on_text(parent: str, value) -> str:
    """How a user switches the parent field on: "plateau", "true", "above 0"."""
    if value is not None:
        return str(value)
    return "true" if Config.__dataclass_fields__[parent].type == "bool" else "above 0"


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _span(meta) -> str:
    """A field's choices ("1, 2") or inclusive range ("0.0 .. 0.95", "1 .. "), or "" when it has neither."""
    if meta["choices"] is not None:  # an empty choice shows as '' (drop_family: none)
        return ", ".join("''" if choice == "" else str(choice) for choice in meta["choices"])
    if meta["low"] is None and meta["high"] is None:
        return ""
    return f"{'' if meta['low'] is None else meta['low']} .. {'' if meta['high'] is None else meta['high']}"


def _help_of(f: dataclasses.Field) -> str:
    span = "" if f.name == "model" else _span(f.metadata)  # the models: python -m trainer train --help is long
    return f"{f.metadata['help']}{f' [{span}]' if span else ''} (default {f.default!r}){_needs_text(f.metadata)}"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per config field, e.g. --batch-size 32, --no-test-split true; grouped as in Config."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(Config):
        if f.name == "profile":  # chosen by the command, with its own choices and default
            continue
        kind = {"bool": _parse_bool, "int": int, "float": float}.get(str(f.type), str)
        groups[f.metadata["group"]].add_argument(
            flag(f.name), dest=f.name, type=kind, default=None, metavar=str(f.type).upper(), help=_help_of(f),
            nargs="?" if kind is _parse_bool else None, const=True if kind is _parse_bool else None)


def given_fields(args: argparse.Namespace) -> dict:
    """The config fields set on the command line: {name: value}."""
    return {f.name: getattr(args, f.name) for f in fields(Config)
            if getattr(args, f.name, None) is not None and f.name != "profile"}


def config_from_args(args: argparse.Namespace) -> Config:
    return make_config(args.profile or "cpu", **given_fields(args))


def resume_config(saved: Config, given: dict, profile: str | None = None) -> Config:
    """The saved config of a run with the flags that may change on resume applied; refuses any other flag."""
    may = [f.name for f in fields(Config) if f.metadata["resume"]]
    refused = [flag(name) for name, value in given.items() if name not in may and value != getattr(saved, name)]
    if profile is not None and profile != saved.profile:
        refused.insert(0, "--profile")
    if refused:
        raise ValueError(f"--resume continues a run with its own settings, so {', '.join(refused)} cannot change; "
                         f"on resume only {', '.join(flag(n) for n in may)} may. Start a new run (another --name) "
                         "to change the others")
    return dataclasses.replace(saved, **{k: v for k, v in given.items() if k in may})


def load_config(path: str) -> Config:
    with open(path) as fh:
        values = json.load(fh)
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in names})


def options_markdown() -> str:
    """The options table of docs/options.md, generated from the fields so it cannot drift from the code."""
    lines = ["# Training options", "",
             "Generated from `trainer/config.py` by `make options` (`python -m trainer options`); every option is a "
             "`python -m trainer train` flag (`--batch-size 32`; booleans take `true`/`false`) and a field of "
             "`config.json`. Resumable: may change on `--resume`.", ""]
    for group in GROUPS:
        lines += [f"## {group[0].upper()}{group[1:]}", "", "| flag | type | default | range or choices | resumable "
                  "| what it does |", "|---|---|---|---|---|---|"]
        for f in fields(Config):
            meta = f.metadata
            if meta["group"] != group or f.name == "profile":
                continue
            text = meta["help"].replace("|", "/").replace("<", "&lt;")
            if meta["needs"] is not None:  # the help is a phrase; end it before the sentence that follows
                text = text.rstrip(".") + "."
            lines.append(f"| `{flag(f.name)}` | {f.type} | `{f.default!r}` | {_span(meta)} | "
                         f"{'yes' if meta['resume'] else ''} | {text}{_needs_text(meta)} |")
        lines.append("")
    return "\n".join(lines)
