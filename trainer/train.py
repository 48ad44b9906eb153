"""Training driver: clean, split, augment, train (resumable), evaluate and export one run."""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

import numpy as np

from . import data, files, heldout, heldout_eval, medmnist_c, medmnist_c_eval
from . import evaluate as ev
from .config import CLASS_NAMES, Config, validate
from .memory import Steps
from .metrics import classification_metrics
from .registry import spec_of
from .runs import read_history


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- hardware and optimizers -----------------------------------------------------------------

def cpu_has_bfloat16() -> bool:
    """True on CPUs with bfloat16 matrix units (AMX or AVX512-BF16), where oneDNN trains faster in bfloat16."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def precision_policy(cfg: Config, n_gpus: int) -> str:
    """float16 on a GPU, bfloat16 on a CPU that computes it natively, else float32 (emulated bfloat16 is slower)."""
    if not cfg.mixed_precision:
        return "float32"
    if n_gpus:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_bfloat16() else "float32"


def hardware_strategy(cfg: Config):
    """One device, or MirroredStrategy over several GPUs, with the mixed precision the hardware makes pay."""
    import keras
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    keras.mixed_precision.set_global_policy(precision_policy(cfg, len(gpus)))
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    return strategy, len(gpus)


def one_op_thread(cfg: Config) -> None:
    """With cfg.one_op_thread, TensorFlow runs one op at a time; logged when it is too late to change (the process
    ran TensorFlow before this run)."""
    if not cfg.one_op_thread:
        return
    import tensorflow as tf
    if tf.config.threading.get_inter_op_parallelism_threads() == 1:
        return
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        log("one_op_thread: TensorFlow already started in this process with several op threads; this run keeps "
            "them and may not repeat bit for bit (run it as a process of its own)")


def for_inference(model, cfg: Config):
    """The same weights in a float32 96x96 build, for calibration, evaluation and export.

    Training may have run in mixed precision or, with low_res_size, on an input of any size.
    """
    import keras

    from .models import build_model
    if keras.mixed_precision.global_policy().name == "float32" and tuple(model.input_shape[1:3]) == (96, 96):
        return model
    keras.mixed_precision.set_global_policy("float32")
    plain = build_model(cfg)
    plain.set_weights(model.get_weights())
    return plain


def make_optimizer(name: str, learning_rate: float, weight_decay: float):
    import keras
    opt = keras.optimizers
    wd = weight_decay or None
    table = {
        "nadam": lambda: opt.Nadam(learning_rate, weight_decay=wd),
        "adamw": lambda: opt.AdamW(learning_rate, weight_decay=weight_decay),
        "adam": lambda: opt.Adam(learning_rate),
        "sgd": lambda: opt.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=wd),
        "rmsprop": lambda: opt.RMSprop(learning_rate),
        "lion": lambda: opt.Lion(learning_rate, weight_decay=wd),
    }
    return table[name]()  # validate() has checked the name


class RunTime:
    """Wall time of one run across resumes: earlier processes' seconds are kept in the run's run_time.json.

    A resumed run then gets what is left of its time budget, not a fresh one, and reports its whole training time.
    """

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, "run_time.json")
        self.before = 0.0
        self.started = time.time()
        self.first_started = self.started  # when the run began, in its first process
        if os.path.exists(self.path):
            with open(self.path) as fh:
                saved = json.load(fh)
            self.before = float(saved["seconds"])
            self.first_started = float(saved.get("first_started", self.started - self.before))

    def seconds(self) -> float:
        return self.before + time.time() - self.started

    def deadline(self, budget_min: float) -> float:
        """The wall-clock time at which the budget ends (0 = no budget)."""
        return self.started - self.before + budget_min * 60 if budget_min else 0.0

    def save(self) -> None:
        files.write_json(self.path, {"seconds": round(self.seconds(), 1), "first_started": self.first_started})

    def started_utc(self) -> str:
        """When the run began, for metrics.json: a checkout resets file times, so `runs` reads this instead."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.first_started))


def precise_batchnorm(model, batches) -> int:
    """Recompute BatchNorm moving statistics as the exact average over these batches ("precise BN").

    The moving averages lag behind weights that changed fast, so inference mode can score far below training
    mode on the very same images. A running average over batches, taken once at the end, removes that lag.
    Feed it augmented training batches: the weights were trained against the statistics of augmented data, and
    statistics of clean images instead cost 1.6 points of val accuracy in the cpu profile.
    Returns how many BatchNorm layers were recalibrated (layers frozen inside a pretrained backbone are not).
    """
    import keras
    import tensorflow as tf
    bns = [layer for layer in model._flatten_layers()
           if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not bns:
        return 0
    saved = [bn.momentum for bn in bns]
    try:
        for i, batch in enumerate(batches):
            for bn in bns:
                bn.momentum = i / (i + 1)  # moving = mean of all batches seen so far
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(tf.convert_to_tensor(x, tf.float32), training=True)
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
    return len(bns)


# ---- one model ---------------------------------------------------------------------------------------

def consistency_loss(cfg: Config):
    """Cross-entropy plus cfg.consistency times the Jensen-Shannon divergence between the two views of each image.

    train_dataset puts the second view of image i at i + batch/2. Per sample, so Keras's sample weights still apply;
    each pair's divergence is counted once in each half.
    """
    import keras
    from keras import ops

    cross_entropy = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing, reduction=None)
    # Validation batches are not pairs: the callback turns the divergence off around them, so val_loss stays the
    # plain cross-entropy that the plateau schedule and the logs compare.
    weight = keras.Variable(cfg.consistency, trainable=False, name="consistency_weight")

    class PairsOnlyInTraining(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            weight.assign(0.0)

        def on_test_end(self, logs=None):
            weight.assign(cfg.consistency)

    def loss(y_true, y_pred):
        p = ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0)
        first, second = ops.split(p, 2, axis=0)
        middle = (first + second) / 2

        def kl(a):
            return ops.sum(a * (ops.log(a) - ops.log(middle)), axis=-1)

        divergence = (kl(first) + kl(second)) / 2
        return cross_entropy(y_true, y_pred) + weight * ops.concatenate([divergence, divergence], axis=0)

    loss.__name__ = "cross_entropy_plus_consistency"
    return loss, PairsOnlyInTraining()


def fit(cfg: Config, out_dir: str, images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
        val_idx: np.ndarray, deadline: float, on_epoch_end=None):
    """Train one model on train_idx with early stopping on val_idx; resumes phases already on disk.

    on_epoch_end, if given, is called after every epoch (the run records its time with it)."""
    import keras
    import tensorflow as tf

    from .augment import eval_dataset, images_per_step, train_dataset
    from .callbacks import AVERAGE_FILE, EpochClock, callbacks_for, load_average
    from .models import build_model, unfreeze

    strategy, n_gpus = hardware_strategy(cfg)
    jit = bool(cfg.xla and n_gpus)
    loss, extra_callbacks = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing), []
    if cfg.consistency > 0:
        loss, pairs_only = consistency_loss(cfg)
        extra_callbacks.append(pairs_only)
    with strategy.scope():
        model = build_model(cfg, any_size=bool(cfg.low_res_size))
    size = tf.Variable(cfg.low_res_size, trainable=False, dtype=tf.int32) if cfg.low_res_size else None

    fit_idx = data.oversample(train_idx, labels, cfg.seed) if cfg.balance == "oversample" else train_idx
    weights = data.class_weights(labels[train_idx]) if cfg.balance == "class_weights" else None
    train_ds = train_dataset(images[fit_idx], labels[fit_idx], cfg, size=size)
    val_ds = eval_dataset(images[val_idx], labels[val_idx], cfg.batch_size)
    steps = cfg.steps_per_epoch or math.ceil(len(fit_idx) / images_per_step(cfg))  # one pass over the images
    verbose = cfg.verbose if cfg.verbose >= 0 else (1 if sys.stdout.isatty() else 2)

    phases = [("train", cfg.epochs, cfg.learning_rate)]
    if cfg.fine_tune_epochs > 0 and spec_of(cfg.model).fine_tunable:
        phases.append(("finetune", cfg.fine_tune_epochs, cfg.fine_tune_lr))
    history: dict[str, list] = {}
    for phase, epochs, lr in phases:
        phase_dir = os.path.join(out_dir, f"phase_{phase}")
        os.makedirs(phase_dir, exist_ok=True)
        done = os.path.join(phase_dir, "done.json")
        if phase == "finetune":
            unfreeze(model, cfg.fine_tune_layers)
        with strategy.scope():
            model.compile(optimizer=make_optimizer(cfg.optimizer, lr, cfg.weight_decay), loss=loss,
                          metrics=["accuracy"], jit_compile=jit)
        best, average = os.path.join(phase_dir, "best.weights.h5"), os.path.join(phase_dir, AVERAGE_FILE)
        if os.path.exists(done):
            kept = "averaged" if cfg.swa and os.path.exists(average) else "best"
            log(f"phase {phase}: already done, loading its {kept} weights")
        elif EpochClock(deadline).epochs_left() < 1 and os.path.exists(best):
            log(f"phase {phase}: the time budget is already spent; keeping the best weights so far")
        else:
            log(f"phase {phase}: {epochs} epochs of {steps} steps, lr {lr:g}, {len(fit_idx)} training images"
                + (f"; at {cfg.low_res_size}x{cfg.low_res_size} for the first {cfg.low_res_share:.0%} of the "
                   f"{'time budget' if deadline else 'epochs'}, then at 96x96" if size is not None else ""))
            # shuffle=False: train_dataset shuffles; Keras cannot shuffle a tf.data.Dataset and warns if asked to.
            model.fit(train_ds, shuffle=False, epochs=epochs, steps_per_epoch=steps, validation_data=val_ds,
                      callbacks=callbacks_for(cfg, phase_dir, deadline, lr, epochs, on_epoch_end, size)
                      + extra_callbacks,
                      class_weight=weights, verbose=verbose)
        averaged = {}
        if cfg.swa and os.path.exists(average):
            mean, steps_averaged, epochs_averaged = load_average(average)
            model.set_weights(mean)
            averaged = {"averaged_steps": steps_averaged, "averaged_epochs": epochs_averaged}
            log(f"weight averaging: the mean of the weights after {steps_averaged} steps (epochs "
                f"{epochs_averaged[0]}-{epochs_averaged[-1]}) replaces the best epoch's")
        elif os.path.exists(best):
            if cfg.swa:
                log(f"weight averaging: training stopped before the last {cfg.swa:.0%} of its schedule, so nothing "
                    "was averaged; keeping the best epoch's weights")
            with warnings.catch_warnings():
                # The file holds the optimizer's state too; only the model's weights are wanted, so a fresh
                # optimizer that has not built its variables yet is expected to skip it.
                warnings.filterwarnings("ignore", "Skipping variable loading for optimizer", UserWarning)
                model.load_weights(best)
        if not os.path.exists(done):
            state = {}
            if os.path.exists(best):
                with open(os.path.join(phase_dir, "best.json")) as fh:
                    state = json.load(fh)
            files.write_json(done, {**state, **averaged})
        for k, v in read_history(os.path.join(phase_dir, "history.csv")).items():
            history.setdefault(k, []).extend(v)
    if size is not None:
        size.assign(96)  # precise BatchNorm below calibrates on full-size batches
    model = for_inference(model, cfg)
    n_batches = max(1, min(steps, 4096 // cfg.batch_size))
    recalibrated = precise_batchnorm(model, train_ds.take(n_batches))
    if recalibrated:
        log(f"precise BatchNorm: recalibrated {recalibrated} layers on {n_batches} augmented training batches")
    return model, history


# ---- the whole run -----------------------------------------------------------------------------------

def run_dir_for(cfg: Config) -> str:
    name = cfg.name or f"{cfg.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.name = name
    return os.path.join(cfg.runs_dir, name)


def prepare_data(cfg: Config, out_dir: str, images: np.ndarray, labels: np.ndarray):
    """Clean (with report and contact sheet) and optionally subsample loaded images; returns images, labels."""
    from . import plots
    keep, report = data.clean(images, labels, cfg.max_copies, cfg.rare_colour_threshold)
    log(report.summary())
    files.write_json(os.path.join(out_dir, "cleaning.json"), report.to_dict())
    plots.removed_sheet(images, labels, report, os.path.join(out_dir, "removed.png"))
    images, labels = images[keep], labels[keep]
    if cfg.limit:
        subset = data.stratified_subset(labels, cfg.limit, cfg.seed)
        images, labels = images[subset], labels[subset]
        log(f"limit: using {len(images)} of the cleaned images")
    return images, labels


def evaluate_split(model, images, labels, name: str, out_dir: str, batch_size: int | None = None) -> dict:
    from . import plots
    metrics = classification_metrics(labels, ev.predict_probs(model, images, batch_size).argmax(1))
    plots.confusion(metrics["confusion_matrix"], os.path.join(out_dir, f"confusion_{name}.png"),
                    f"Confusion matrix ({name}, accuracy {metrics['accuracy']:.4f})")
    log(f"{name}: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f} on {metrics['n']} images")
    return metrics


def settings_for(cfg: Config, model_sha256: str) -> dict:
    """The JSON that submission/model.py reads next to itself; model_sha256 is the hex sha256 of model.onnx."""
    return {"model_file": "model.onnx", "model_sha256": model_sha256, "input_name": "pixels",
            "time_limit_s": cfg.time_limit_s, "safety_margin": cfg.safety_margin,
            "expected_test_size": cfg.expected_test_size, "max_views": cfg.max_views,
            "class_names": list(CLASS_NAMES), "run": cfg.name}


def train(cfg: Config) -> dict:
    """Run everything for one config; return the metrics. Re-running the same name resumes.

    The caller writes the run's report page (report.write_report), also when this raises: see __main__ and tune.
    """
    import keras

    from . import plots
    from .augment import augmented_samples
    from .models import ensemble

    started = time.time()
    validate(cfg)
    one_op_thread(cfg)  # first: TensorFlow reads it when it starts
    # Load and check the data before the run folder exists: a bad file must not leave a run behind.
    images, labels = data.load_npz(cfg.data, resize=cfg.resize)
    out_dir = run_dir_for(cfg)
    os.makedirs(out_dir, exist_ok=True)
    run_time = RunTime(out_dir)
    files.write_json(os.path.join(out_dir, "config.json"), cfg.to_dict())
    log(f"run {cfg.name}: {out_dir}  (profile {cfg.profile}, model {cfg.model})")
    keras.utils.set_random_seed(cfg.seed)

    images, labels = prepare_data(cfg, out_dir, images, labels)
    train_idx, val_idx, test_idx = data.train_val_test(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed,
                                                       cfg.no_test_split)
    files.save_npz(os.path.join(out_dir, "split.npz"), train=train_idx, val=val_idx, test=test_idx)
    holdout = test_idx if len(test_idx) else val_idx  # what the benchmark scores
    files.save_npz(os.path.join(out_dir, "holdout.npz"), images=images[holdout], labels=labels[holdout])
    log(f"split: train {len(train_idx)}, val {len(val_idx)}, test {len(test_idx)}"
        + (" (no test split: test joined train)" if cfg.no_test_split else ""))
    plots.augmentation_grid(images[train_idx[:16]], augmented_samples(images[train_idx[:16]], cfg, 16),
              os.path.join(out_dir, "augmented.png"))

    deadline = run_time.deadline(cfg.time_budget_min)
    if run_time.before:
        log(f"resuming: {run_time.before / 60:.1f} min of training time already spent"
            + (f" of the {cfg.time_budget_min:g}-minute budget" if cfg.time_budget_min else ""))
    steps = Steps(log)
    with steps.step("training", cfg.batch_size):
        if cfg.folds >= 2:
            pool = np.sort(np.concatenate([train_idx, val_idx]))
            models, fold_scores, history = [], [], {}
            for k, (tr, va) in enumerate(data.kfold(labels[pool], cfg.folds, cfg.seed)):
                log(f"fold {k + 1}/{cfg.folds}")
                m, h = fit(cfg, os.path.join(out_dir, f"fold{k}"), images, labels, pool[tr], pool[va], deadline,
                           run_time.save)
                probs = ev.predict_probs(m, images[pool[va]], ev.batch_size_for(m, cfg.inference_memory_mb))
                fold_scores.append(float((probs.argmax(1) == labels[pool[va]]).mean()))
                models.append(m)
                history = history or h
            model = ensemble(models)
            cv = {"fold_val_accuracy": fold_scores, "mean": float(np.mean(fold_scores)),
                  "std": float(np.std(fold_scores))}
            log(f"cross-validation: {cv['mean']:.4f} +- {cv['std']:.4f} over {cfg.folds} folds")
        else:
            model, history = fit(cfg, out_dir, images, labels, train_idx, val_idx, deadline, run_time.save)
            cv = None
        run_time.save()
    train_seconds = run_time.seconds()

    files.write_json(os.path.join(out_dir, "history.json"), history)
    plots.curves(history, os.path.join(out_dir, "curves.png"))
    tmp = os.path.join(out_dir, ".model.tmp.keras")
    model.save(tmp)
    os.replace(tmp, os.path.join(out_dir, "model.keras"))

    # Every step from here works in batches sized for the model and its input, each measured (docs/memory.md).
    batch = ev.batch_size_for(model, cfg.inference_memory_mb)
    log(f"after training: batches of {batch} images (largest layer output "
        f"{ev.largest_activation_bytes(model) / 1e6:.1f} MB an image, {cfg.inference_memory_mb} MB for a batch)")
    metrics = {"run": cfg.name, "profile": cfg.profile, "model": cfg.model, "started": run_time.started_utc(),
               "train_seconds": round(train_seconds, 1),
               "epochs": len(history.get("accuracy", [])), "train_images": int(len(train_idx))}
    with steps.step("evaluation", batch):
        metrics["val"] = evaluate_split(model, images[val_idx], labels[val_idx], "val", out_dir, batch)
        if len(test_idx):
            metrics["test"] = evaluate_split(model, images[test_idx], labels[test_idx], "test", out_dir, batch)
    if cv:
        metrics["cross_validation"] = cv
    with steps.step("batchnorm check", batch):
        metrics["batchnorm_check"] = batchnorm_check(cfg, model, images, labels, train_idx, batch)
    if cfg.robustness_images:
        with steps.step("robustness", batch):
            probs = lambda x: ev.predict_probs(model, x, batch)  # noqa: E731
            scored = holdout if len(holdout) else val_idx
            # The held-out figure leads: its corruptions are ones no training setting reaches, so it is the
            # estimate of a test altered in unpublished ways. The suite's figure stays, as the in-distribution one.
            held = heldout_eval.score(lambda x: probs(x).argmax(1), images[scored], labels[scored], cfg.seed,
                                      cfg.robustness_images)
            metrics["heldout"] = held
            # MedMNIST-C's bloodmnist corruptions: published, and written by others, so a reference the kit's own
            # choices cannot flatter; its unseen kinds are ones this run's training never drew (split_for).
            mmc = medmnist_c_eval.score(lambda x: probs(x).argmax(1), images[scored], labels[scored], cfg.seed,
                                        cfg.robustness_images, split=medmnist_c.split_for(cfg.to_dict()))
            metrics["medmnist_c"] = mmc
            rob = ev.robustness(probs, images[scored], labels[scored], cfg.seed, cfg.robustness_images)
            metrics["robustness"] = rob
            plots.robustness(rob["per_family"], os.path.join(out_dir, "robustness.png"))
            log(f"corrupted {'test' if len(test_idx) else 'val'}: held-out accuracy "
                f"{held['corrupted']['accuracy']:.4f}, in-distribution {rob['corrupted']['accuracy']:.4f}, "
                f"MedMNIST-C {mmc['overall']:.4f} (unseen kinds {mmc['unseen']:.4f}, {mmc['seconds']:.0f} s)"
                + "".join(f"; {kind} {why}" for kind, why in mmc["skipped"].items()))
    metrics["memory"] = steps.rows  # the export's steps join this list below
    files.write_json(os.path.join(out_dir, "metrics.json"), metrics)

    if cfg.export:
        metrics["export"] = export_run(cfg, model, images[holdout[:64]], out_dir, batch, steps.step)
        files.write_json(os.path.join(out_dir, "metrics.json"), metrics)
        if cfg.score_submission and cfg.robustness_images and len(holdout):
            with steps.step("scoring the submission", batch):
                metrics["submission"] = score_submission(cfg, out_dir, images[holdout], labels[holdout])
            files.write_json(os.path.join(out_dir, "metrics.json"), metrics)
    log(f"done in {time.time() - started:.0f} s: {out_dir}")
    return metrics


def score_submission(cfg: Config, out_dir: str, images: np.ndarray, labels: np.ndarray) -> dict:
    """The run's model.onnx as its zip serves it: submission/model.py with cfg.max_views TTA views (fixed, not
    timed), on the clean images, the held-out copy and MedMNIST-C, with the same seed and images as the 1-view
    figures above, so the two differ only by the views and the runtime."""
    started, views = time.perf_counter(), cfg.max_views
    for _, model in ev.models_by_views(out_dir, [views], "run_submission"):
        clean = float((model.predict(images) == labels).mean())
        mixed, _ = heldout.corrupt_mix(images, seed=cfg.seed)
        held = float((model.predict(mixed) == labels).mean())
        mmc = medmnist_c_eval.score(model.predict, images, labels, cfg.seed, cfg.robustness_images,
                                    split=medmnist_c.split_for(cfg.to_dict()))
    result = {"views": views, "images": int(len(images)), "clean": clean, "heldout": held,
              "medmnist_c": {key: mmc[key] for key in ("overall", "unseen", "seen", "images", "skipped")}
              | {"per_corruption": {kind: row["accuracy"] for kind, row in mmc["per_corruption"].items()}},
              "seconds": round(time.perf_counter() - started, 1)}
    log(f"the submission as its zip serves it ({views} views): clean {clean:.4f}, held-out {held:.4f}, MedMNIST-C "
        f"{mmc['overall']:.4f} (unseen kinds {mmc['unseen']:.4f}), {result['seconds']:.0f} s")
    return result


def batchnorm_check(cfg: Config, model, images: np.ndarray, labels: np.ndarray, train_idx: np.ndarray,
                    batch_size: int) -> dict:
    """evaluate.train_vs_inference_mode on augmented training images, logged; skipped without BatchNorm."""
    from .augment import augmented_samples
    if not ev.batchnorm_layers(model):
        reason = ev.no_batchnorm_reason(model)
        log(f"BatchNorm check skipped: {reason}")
        return {"skipped": reason}
    sample = train_idx[:512]
    # Compare the modes on training images as the model saw them: augmented, like the batches behind the
    # moving statistics. On clean images the gap would also hold the augmentation's own shift.
    seen = augmented_samples(images[sample], cfg, len(sample))
    check = ev.train_vs_inference_mode(model, seen, labels[sample], batch_size)
    log(f"augmented train images: training-mode accuracy {check['training_mode_accuracy']:.4f}, "
        f"inference-mode {check['inference_mode_accuracy']:.4f}"
        + ("  WARNING: inference mode is worse: BatchNorm statistics are off" if check["gap"] > 0.05 else ""))
    return check


def export_run(cfg: Config, model, check_images: np.ndarray, out_dir: str, batch_size: int = 64,
               step=None) -> dict:
    """ONNX and settings (with the model's sha256) into the run folder, then copied into the submission folder.

    step: memory.Steps.step, to measure the conversion and the parity check."""
    from .export import export_onnx
    onnx_path = os.path.join(out_dir, "model.onnx")
    info = export_onnx(model, onnx_path, check_images, cfg.opset, cfg.fuse_onnx, weights=cfg.onnx_weights,
                       batch_size=batch_size, step=step)
    files.write_json(os.path.join(out_dir, "settings.json"), settings_for(cfg, info["sha256"]))
    check = info["parity"]
    log(f"exported {onnx_path} ({info['bytes'] / 1e6:.1f} MB, {cfg.onnx_weights} weights; parity on "
        f"{check['images']} images: max diff {check['max_abs_diff']:.1e}, {check['labels_differ']} labels differ"
        + (f", smallest Keras margin among them {check['smallest_margin_differing']:.1e}"
           if check["labels_differ"] else "") + ")")
    if cfg.submission_dir:
        copied = os.path.join(cfg.submission_dir, "model.onnx")
        files.copy(onnx_path, copied)
        if files.sha256(copied) != info["sha256"]:  # settings.json names these bytes; a bad copy must not pass
            raise OSError(f"{copied} differs from {onnx_path} after copying; copy it again")
        files.copy(os.path.join(out_dir, "settings.json"), os.path.join(cfg.submission_dir, "settings.json"))
        log(f"submission ready in {cfg.submission_dir}/ (model.onnx, settings.json)")
    return info
