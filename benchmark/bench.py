"""Benchmark a submission as the grader runs it: timings, memory, accuracy, formats side by side, PASS or FAIL."""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

from trainer import corrupt, heldout
from trainer.files import write_json
from trainer.metrics import classification_metrics
from trainer.registry import MODELS
from trainer.staging import SubmissionError, UsageError, prepare_submission, read_json, variant

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
FIRST_CALL = 16        # images in the grader run's first predict call, which pays the one-off costs
MAX_IMAGES = 1000      # test images the grader run times and scores (a big model on a big holdout takes long)
TABLE_IMAGES = 256     # images each format row is timed on
CHUNK = 32             # images per call in the TensorFlow rows (model.predict's default batch)
ROW_SECONDS = 15.0     # a slow row stops after about this long: the stock ConvNeXt runs ~4 images/s here
CORRUPT_SEED = 0       # seed of both corrupted copies of the test images
# The corrupted copies the grader run also scores, after its timed part, in the order they are printed: the
# held-out one leads, being the estimate of unseen damage (docs/robustness.md).
COPIES = (("heldout", "held-out corrupted", "corruptions no training setting reaches", heldout.corrupt_mix),
          ("in_distribution", "in-distribution corrupted", "the suite that training partly trains on",
           corrupt.corrupt_mix))


STARTED = time.time()


def log(msg: str = "") -> None:
    print(msg, flush=True)


def seconds(x: float) -> str:
    """Seconds as people read them: 1234, 56, 7.8, 0.12."""
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def stage(msg: str) -> None:
    """One progress line per stage, stamped with the seconds since the benchmark started."""
    log(f"[{time.time() - STARTED:5.1f} s] {msg}")


# ---- what to benchmark -------------------------------------------------------------------------------

def newest_run(runs_dir: str) -> str | None:
    found = glob.glob(os.path.join(runs_dir, "*", "model.onnx"))
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


def resolve(args) -> tuple[str | None, str, bool]:
    """(run folder or None, submission source, whether model.onnx and settings.json come from the run)."""
    source = args.submission or "submission"
    if args.submission and not os.path.exists(source):
        raise UsageError(f"submission not found: {source} (a folder with model.py, or the zip)")
    if args.run:
        if not os.path.isdir(args.run):
            raise UsageError(f"run folder not found: {args.run}")
        return args.run, source, not args.submission
    if args.submission or os.path.isfile(os.path.join(source, "model.onnx")):
        named = submission_settings(source).get("run", "")
        run = os.path.join(args.runs_dir, named) if named else None
        # Another run's holdout or model.keras would describe a different model than the one submitted.
        return (run if run and os.path.isdir(run) else None), source, False
    run = newest_run(args.runs_dir)
    if run is None:
        raise UsageError(f"no model to benchmark: {source}/ has no model.onnx and no run under {args.runs_dir}/ "
                         f"has one; run make train first, or pass --run or --submission")
    return run, source, True


def submission_settings(source: str) -> dict:
    """settings.json of a submission folder or zip; {} when it has none."""
    try:
        if source.endswith(".zip"):
            with zipfile.ZipFile(source) as zf:
                return json.loads(zf.read("settings.json"))
        return read_json(os.path.join(source, "settings.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return {}


def load_test(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (n,96,96,3) and labels (n,) from an .npz; labels are optional (timing needs none)."""
    if not os.path.isfile(path):
        raise UsageError(f"test set not found: {path}; pass --test X.npz (keys images and, for accuracy, labels)")
    with np.load(path) as npz:
        if "images" not in npz.files:
            raise UsageError(f"{path} has no 'images' array (has {npz.files})")
        images = npz["images"]
        labels = npz["labels"].reshape(-1).astype(np.int64) if "labels" in npz.files else None
    if images.ndim != 4 or images.shape[1:] != (96, 96, 3) or len(images) < 2:
        raise UsageError(f"{path}: images must be (n,96,96,3) with n >= 2, got {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise UsageError(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def file_mb(path: str) -> float:
    return os.path.getsize(path) / 1e6 if os.path.isfile(path) else float("nan")


# ---- the grader-style run ----------------------------------------------------------------------------

def grader_run(folder: str, images: np.ndarray, cpus: int, work: str, extras: dict | None = None,
               timeout: float = 3600) -> dict:
    """model.py in a fresh process on `images`; timings, views, peak memory and the predicted labels.

    extras: {key: images} predicted in the same process after the timed part, labels in result[f"{key}_labels"].
    """
    os.makedirs(work)
    extras = extras or {}
    if "images" in extras:
        raise ValueError("an extra array may not be called 'images': that is the timed one")
    np.savez(os.path.join(work, "images.npz"), images=images, **extras)
    env = {**os.environ, "OMP_NUM_THREADS": str(cpus)}
    spawned = time.time()
    # cwd is an empty folder: a model.py that opens files relative to the working directory fails here,
    # as it may on the grader.
    try:
        proc = subprocess.run([sys.executable, "-I", CHILD, os.path.abspath(folder), "images.npz", ".", str(cpus),
                               str(FIRST_CALL)], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SubmissionError(f"model.py did not finish {len(images)} images in {timeout:.0f} s") from None
    ended = time.time()
    result_path = os.path.join(work, "result.json")
    if proc.returncode != 0 or not os.path.isfile(result_path):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise SubmissionError(f"model.py failed in a fresh process (exit code {proc.returncode}):\n{tail}")
    result = read_json(result_path)
    result["python_start_s"] = result["ready"] - spawned
    result["exit_s"] = max(0.0, ended - result["done"])
    result["wall_s"] = ended - spawned
    result["labels"] = np.load(os.path.join(work, "labels.npy"))
    for key in extras:
        result[f"{key}_labels"] = np.load(os.path.join(work, f"{key}_labels.npy"))
    # Steady time per image from the second call, with the views model.py chose in it. Start-up: everything that
    # N does not multiply, including what the first call took beyond its images' share, and the exit.
    result["per_image_s"] = result["rest_s"] / (result["n_images"] - result["first_n"])
    result["views"] = result["report"].get("views")
    result["startup_s"] = (result["python_start_s"] + result["import_s"] + result["load_s"] + result["exit_s"]
                           + max(0.0, result["first_s"] - result["first_n"] * result["per_image_s"]))
    return result


def project(startup_s: float, per_image_s: float, n: int) -> float:
    return startup_s + n * per_image_s


def scores(labels: np.ndarray | None, predicted: np.ndarray) -> dict:
    if labels is None:
        return {}
    metrics = classification_metrics(labels[:len(predicted)], predicted)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "scored_images": metrics["n"]}


# ---- TensorFlow rows ---------------------------------------------------------------------------------

def stock_architecture(model):
    """The model as keras.applications builds it: depthwise convolutions back to grouped Conv2D, same weights.

    The trainer rebuilds ConvNeXt's grouped convolutions as DepthwiseConv2D (trainer.models.depthwise_rebuild);
    this is the inverse, so the template row runs what a team using keras.applications runs.
    """
    import keras
    from keras import layers

    def clone(layer):
        if not isinstance(layer, layers.DepthwiseConv2D):
            return layer.__class__.from_config(layer.get_config())
        cfg = layer.get_config()
        channels = layer.kernel.shape[2]
        return layers.Conv2D(channels, cfg["kernel_size"], strides=cfg["strides"], padding=cfg["padding"],
                             groups=channels, dilation_rate=cfg["dilation_rate"], use_bias=cfg["use_bias"],
                             name=cfg["name"], data_format=cfg["data_format"], dtype=cfg.get("dtype"))

    def leaves(m):
        for layer in m.layers:
            yield from (leaves(layer) if isinstance(layer, keras.Model) else [layer])

    stock = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for old, new in zip(leaves(model), leaves(stock)):
        weights = old.get_weights()
        if isinstance(old, layers.DepthwiseConv2D):
            k = weights[0]
            weights[0] = k.reshape(k.shape[0], k.shape[1], 1, k.shape[2])
        new.set_weights(weights)
    return stock


def time_row(predict, images: np.ndarray) -> dict:
    """A warm-up call (tracing, allocation), then one timed call on as many images as fit ROW_SECONDS."""
    warm = CHUNK + 1  # a full batch and a partial one: Keras traces both shapes, then no more
    t = time.time()
    predict(images[:warm])
    warmup = time.time() - t
    # The warm-up is slower than the steady state, so this errs towards fewer images, never a much longer row.
    fit = int(ROW_SECONDS / warmup * warm) // CHUNK * CHUNK
    k = min(len(images), max(CHUNK, fit))
    t = time.time()
    labels = predict(images[:k]).argmax(1)
    rate = k / (time.time() - t)
    # Start-up counts only what the warm-up took beyond its images' share of the work, as in grader_run.
    return {"warmup_s": warmup, "warmup_excess_s": max(0.0, warmup - warm / rate), "images": k,
            "img_per_s": rate, "labels": labels}


def tensorflow_rows(keras_path: str, model_name: str, images: np.ndarray) -> list[dict]:
    """'keras template' (stock architecture, keras.models.load_model, model.predict) and 'tf.function'."""
    t = time.time()
    import keras
    import tensorflow as tf

    import trainer.models  # noqa: F401  registers the custom layers that model.keras uses
    import_s = time.time() - t
    t = time.time()
    model = keras.models.load_model(keras_path)
    load_s = time.time() - t
    rows = []

    stage(f"keras template: stock architecture, model.predict on up to {len(images)} images ...")
    grouped = model_name in MODELS and MODELS[model_name].grouped_convs
    stock = stock_architecture(model) if grouped else model
    row = time_row(lambda x: stock.predict(x.astype(np.float32), batch_size=CHUNK, verbose=0), images)
    # A team loads the stock model directly, so the rebuild above is not part of the template's start-up.
    rows.append({"format": "keras template (model.predict)", "views": 1, "mb": file_mb(keras_path),
                 "startup_s": import_s + load_s + row["warmup_excess_s"], **row})

    fn = tf.function(lambda x: model(x, training=False), jit_compile=False,
                     input_signature=[tf.TensorSpec((CHUNK, *images.shape[1:]), tf.float32)])

    def fixed_batch(x):  # CHUNK images a call, the last padded: one traced shape, no retracing
        out = []
        for start in range(0, len(x), CHUNK):
            batch = x[start:start + CHUNK]
            padded = np.zeros((CHUNK, *x.shape[1:]), np.float32)
            padded[:len(batch)] = batch
            out.append(fn(tf.constant(padded)).numpy())
        return np.concatenate(out)[:len(x)]

    stage(f"tf.function: fixed batch of {CHUNK} on up to {len(images)} images ...")
    row = time_row(fixed_batch, images)
    rows.append({"format": "tf.function (rebuilt model)", "views": 1, "mb": file_mb(keras_path),
                 "startup_s": import_s + load_s + row["warmup_excess_s"], **row})
    return rows


def onnx_row(name: str, run: dict, model_file: str) -> dict:
    return {"format": name, "views": run["views"], "mb": file_mb(model_file), "images": run["n_images"],
            "img_per_s": 1.0 / run["per_image_s"], "startup_s": run["startup_s"], "labels": run["labels"],
            "peak_rss_mb": run["peak_rss_mb"]}


# ---- output -----------------------------------------------------------------------------------------

def finish_rows(rows: list[dict], labels: np.ndarray | None, n: int) -> list[dict]:
    """Accuracy, agreement and speed against the template, and projected seconds for N images; drop the labels."""
    template = next((r for r in rows if r["format"].startswith("keras template")), None)
    out = []
    for row in rows:
        row = dict(row)
        predicted = row.pop("labels")
        row.update(scores(labels, predicted))
        row["vs_template"] = row["img_per_s"] / template["img_per_s"] if template else None
        # Same weights should give the same answers: a low agreement means the files are not the same model.
        shared = min(len(predicted), len(template["labels"])) if template else 0
        row["agreement"] = float((predicted[:shared] == template["labels"][:shared]).mean()) if shared else None
        row["projected_s"] = row["startup_s"] + n / row["img_per_s"]
        out.append(row)
    return out


def print_table(rows: list[dict], n: int) -> None:
    head = f"{'format':<36} {'MB':>6} {'images':>6} {'accuracy':>8} {'agree':>6} {'img/s':>7} " \
           f"{'x template':>10} {'projected s':>11}"
    log(head + f"  (N={n})")
    log("-" * len(head))
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        agree = f"{r['agreement']:.1%}" if r["agreement"] is not None else "-"
        ratio = f"{r['vs_template']:.2f}" if r["vs_template"] is not None else "-"
        log(f"{r['format']:<36} {r['mb']:>6.1f} {r['images']:>6d} {acc:>8} {agree:>6} {r['img_per_s']:>7.1f} "
            f"{ratio:>10} {r['projected_s']:>11.0f}")
    single = next(r for r in rows if r["format"].endswith("1 view)"))
    if single["agreement"] is not None and single["agreement"] < 0.99 and single["images"] >= 20:
        log(f"WARNING: model.onnx and model.keras give different labels for {1 - single['agreement']:.0%} of the "
            f"images: the ONNX file is not this run's model.keras (re-export: python -m trainer export --run RUN)")


def plain(result: dict) -> dict:
    """A run's figures for benchmark.json, without the label arrays."""
    return {k: v for k, v in result.items() if not k.endswith("labels")}


# ---- the benchmark ----------------------------------------------------------------------------------

def pin_cores(cpus: int) -> None:
    """This process on the first `cpus` cores: the TensorFlow rows run here, and the children inherit them."""
    cores = sorted(os.sched_getaffinity(0))
    if cpus > len(cores):
        log(f"warning: --cpus {cpus}, but this machine gives only {len(cores)}: timing on {len(cores)}")
    os.sched_setaffinity(0, cores[:cpus])
    os.environ["OMP_NUM_THREADS"] = str(min(cpus, len(cores)))


def describe_run(r: dict, labels: np.ndarray | None, copies=()) -> dict:
    """Print the grader run's timings, views and scores; return them for benchmark.json."""
    report = r["report"]
    log(f"  python start {r['python_start_s']:.2f} s, import {r['import_s']:.2f} s, Model() {r['load_s']:.2f} s, "
        f"first call ({r['first_n']} images) {r['first_s']:.2f} s, second call ({r['n_images'] - r['first_n']} "
        f"images) {r['rest_s']:.2f} s = {r['per_image_s'] * 1000:.2f} ms/image; "
        f"exit {r['exit_s']:.2f} s; peak RSS {r['peak_rss_mb']:.0f} MB")
    log(f"  model.py chose {r['views']} view(s) (tta_mode {report.get('tta_mode')}, {report.get('threads')} "
        f"threads, {report.get('provider')}); its own projection {report.get('projected_total_s', float('nan')):.0f} s")
    summary = {**scores(labels, r["labels"]), "views": r["views"], "peak_rss_mb": r["peak_rss_mb"]}
    if labels is not None:
        for key, label, meaning, _ in copies:  # the held-out copy first
            dirty = scores(labels, r[f"{key}_labels"])
            summary.update({f"{key}_accuracy": dirty["accuracy"], f"{key}_macro_f1": dirty["macro_f1"]})
            log(f"  {label}: accuracy {dirty['accuracy']:.4f}, macro F1 {dirty['macro_f1']:.4f} ({meaning}; "
                f"seed {CORRUPT_SEED})")
    if "accuracy" in summary:
        log(f"  clean: accuracy {summary['accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}")
    return summary


def benchmark(args) -> int:
    if not 0 <= args.margin < 1 or args.limit <= 0 or args.cpus < 1:
        raise UsageError("--limit must be > 0, --margin in [0, 1) and --cpus >= 1")
    pin_cores(args.cpus)
    run, source, from_run = resolve(args)
    test_path = args.test or (os.path.join(run, "holdout.npz") if run else None)
    if test_path is None:
        raise UsageError(f"no test set: {source} names no run found under {args.runs_dir}/; pass --test X.npz")
    images, labels = load_test(test_path)
    total = len(images)
    if 0 < args.max_images < total:  # a fixed random subset, in case the file is sorted by class
        keep = np.sort(np.random.default_rng(0).choice(total, args.max_images, replace=False))
        images, labels = images[keep], (labels[keep] if labels is not None else None)
    # A quick check (make zip) must not overwrite the full figures of make benchmark.
    json_path = args.json or (os.path.join(run, "benchmark_quick.json" if args.quick else "benchmark.json")
                              if run else None)
    allowed = args.limit * (1 - args.margin)
    figures = {"verdict": None, "projected_s": None, "limit_s": args.limit, "margin": args.margin,
               "allowed_s": allowed, "cpus": args.cpus, "run": run, "submission": source,
               "model_from_run": from_run, "test": test_path, "test_images": len(images)}

    with tempfile.TemporaryDirectory(prefix="benchmark-") as tmp:
        try:
            folder = prepare_submission(source, run, from_run, os.path.join(tmp, "submission"))
            settings = read_json(os.path.join(folder, "settings.json"))
            n = figures["n"] = args.n or int(settings.get("expected_test_size", 10000))
            log(f"submission: model.py from {source}" + (f", model.onnx and settings.json from {run}" if from_run
                                                         else f"; run {run}" if run else ""))
            log(f"test set: {test_path} ({total} images"
                + (f", timing and scoring {len(images)} of them (--max-images)" if len(images) < total else "")
                + f", {'labelled' if labels is not None else 'no labels'})")
            log(f"grader: {args.cpus} cores, N={n} images, limit {seconds(args.limit)} s, margin {args.margin} "
                f"-> PASS when projected <= {seconds(allowed)} s")
            # model.py decides its TTA views from these numbers, so it must see the grader's.
            graded = variant(folder, os.path.join(tmp, "graded"), time_limit_s=args.limit,
                             safety_margin=args.margin, expected_test_size=n)
            copies = COPIES if not args.quick and labels is not None else ()
            extras = {}
            for key, label, _, mix in copies:
                stage(f"making the {label} copy of the test set ({mix.__module__}.corrupt_mix, seed "
                      f"{CORRUPT_SEED}) ...")
                extras[key], _ = mix(images, seed=CORRUPT_SEED)
            stage(f"grader run: model.py in a fresh process on {len(images)} images, {args.cpus} cores ...")
            # Stop a hung model.py; a run this long fails the grader's limit anyway.
            r = grader_run(graded, images, args.cpus, os.path.join(tmp, "grader"), extras,
                           timeout=max(args.limit, 600))
        except SubmissionError as err:
            log(str(err))
            figures.update(verdict="FAIL", error=str(err))
            write_figures(json_path, figures)
            log(f"FAIL: the submission does not run: {str(err).splitlines()[0].rstrip(':')}")
            return 1

        figures.update(describe_run(r, labels, copies))
        if copies:
            figures["corrupted_seed"] = CORRUPT_SEED
        projected = figures["projected_s"] = project(r["startup_s"], r["per_image_s"], n)
        figures["projection"] = {"startup_s": r["startup_s"], "per_image_s": r["per_image_s"], "views": r["views"],
                                 "n": n, "projected_s": projected}
        figures["grader_run"] = plain(r)
        if not args.quick:
            model_file = os.path.join(graded, settings.get("model_file", "model.onnx"))
            try:
                figures["rows"] = format_table(args, run, graded, tmp, images, labels, r, model_file, n)
            except SubmissionError as err:  # the verdict stands on the grader run; the table is extra
                log(f"format table left out: {err}")

    log(f"projection: {seconds(r['startup_s'])} s start-up + {n} images x {r['per_image_s'] * 1000:.2f} ms "
        f"({r['views']} view(s)) = {seconds(projected)} s; allowed {seconds(allowed)} s = {seconds(args.limit)} s x "
        f"(1 - {args.margin}); benchmark took {time.time() - STARTED:.0f} s")
    figures["verdict"] = "PASS" if projected <= allowed else "FAIL"
    write_figures(json_path, figures)
    log(f"{figures['verdict']}: projected {seconds(projected)} s of {seconds(args.limit)} s (margin {args.margin})")
    return 0 if figures["verdict"] == "PASS" else 1


def format_table(args, run, graded, tmp, images, labels, grader_result, model_file, n) -> list[dict]:
    """The formats side by side on the same images: TensorFlow's ways and ONNX Runtime through model.py."""
    table_images = images[:TABLE_IMAGES]
    rows = []
    keras_path = os.path.join(run, "model.keras") if run else None
    if keras_path and os.path.isfile(keras_path):
        model_name = ""
        if os.path.isfile(os.path.join(run, "config.json")):
            model_name = read_json(os.path.join(run, "config.json")).get("model", "")
        stage(f"loading {keras_path} with keras.models.load_model ...")
        rows += tensorflow_rows(keras_path, model_name, table_images)
    else:
        stage("no model.keras for this submission: the TensorFlow rows are left out")
    stage(f"onnxruntime through model.py, 1 view, in a fresh process on {len(table_images)} images ...")
    one_view = variant(graded, os.path.join(tmp, "one_view"), max_views=1)
    single = grader_run(one_view, table_images, args.cpus, os.path.join(tmp, "one_view_run"))
    rows.append(onnx_row("onnxruntime (model.py, 1 view)", single, model_file))
    tta = grader_result
    if len(table_images) < len(images):  # the table compares the formats on the same images
        stage(f"onnxruntime through model.py, TTA, in a fresh process on {len(table_images)} images ...")
        tta = grader_run(graded, table_images, args.cpus, os.path.join(tmp, "tta_run"))
    views = tta["views"]
    rows.append(onnx_row(f"onnxruntime (model.py, TTA {views} view{'' if views == 1 else 's'})", tta, model_file))
    rows = finish_rows(rows, labels, n)
    log()
    print_table(rows, n)
    return rows


def write_figures(path: str | None, figures: dict) -> None:
    if path is None:
        log("benchmark.json not written: no run folder (pass --run or --json)")
        return
    write_json(path, figures)
    log(f"wrote {path}")


# ---- command line ---------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmark", description=__doc__)
    p.add_argument("--run", help="run folder (default: the run named in submission/settings.json when "
                                 "submission/ has a model.onnx, else the newest run with one)")
    p.add_argument("--submission", help="submission folder or zip (default: submission/; with --run and no "
                                        "--submission: submission/model.py with the run's model.onnx)")
    p.add_argument("--test", help=".npz with images and optional labels (default: RUN/holdout.npz)")
    p.add_argument("--n", type=int, help="images the grader predicts (default: settings' expected_test_size)")
    p.add_argument("--cpus", type=int, default=2, help="cores the grader gives the run (default 2)")
    p.add_argument("--limit", type=float, default=6000.0, help="the grader's time limit in seconds")
    p.add_argument("--margin", type=float, default=0.5,
                   help="share of the limit kept in reserve for a slower grader: PASS when projected "
                        "<= limit * (1 - margin)")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES,
                   help=f"time and score at most this many test images, a fixed random subset "
                        f"(default {MAX_IMAGES}; 0 = all)")
    p.add_argument("--quick", action="store_true", help="only the grader-style run and the verdict")
    p.add_argument("--json", help="where to write the figures (default: RUN/benchmark.json, "
                                  "RUN/benchmark_quick.json with --quick)")
    p.add_argument("--runs-dir", default="runs", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    global STARTED
    STARTED = time.time()
    args = parse_args(argv)
    try:
        return benchmark(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
