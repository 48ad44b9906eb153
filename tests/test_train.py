"""End to end: a smoke run cleans, splits, trains, evaluates and exports; a killed run resumes."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import onnxruntime as ort
import pytest

from trainer import heldout, medmnist_c, models  # noqa: F401  models registers the custom layers for load_model
from trainer.augment import augmented_samples
from trainer.config import load_config
from trainer.evaluate import train_vs_inference_mode
from trainer.train import precise_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def trainer_cmd(*args):
    return [sys.executable, "-m", "trainer", "train", *args]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_path):
    base = tmp_path_factory.mktemp("smoke")
    sub = base / "submission"
    # --veil is MedMNIST-C bubble's nearest option: this run's figures count bubble as seen, as the kit's do.
    proc = subprocess.run(trainer_cmd("--profile", "smoke", "--data", data_path, "--name", "smoke", "--veil", "0.3",
                                      "--runs-dir", str(base / "runs"), "--submission-dir", str(sub)),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base / "runs" / "smoke", sub, proc.stdout


def test_smoke_run_writes_every_artifact(smoke_run):
    run, sub, out = smoke_run
    for name in ("config.json", "cleaning.json", "removed.png", "augmented.png", "split.npz", "holdout.npz",
                 "history.json", "curves.png", "model.keras", "metrics.json", "confusion_val.png",
                 "confusion_test.png", "robustness.png", "model.onnx", "settings.json"):
        assert (run / name).exists(), name
    assert (sub / "model.onnx").read_bytes() == (run / "model.onnx").read_bytes()
    assert json.loads((sub / "settings.json").read_text())["run"] == "smoke"
    config = json.loads((run / "config.json").read_text())
    assert config["profile"] == "smoke" and config["model"] == "vanilla_cnn"
    cleaning = json.loads((run / "cleaning.json").read_text())
    assert cleaning["removed_repeated"] == 1800
    assert "cleaning: kept" in out and "exported" in out


def test_metrics_hold_every_figure(smoke_run):
    metrics = json.loads((smoke_run[0] / "metrics.json").read_text())
    for split in ("val", "test"):
        m = metrics[split]
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
        assert len(m["per_class"]) == 8 and np.array(m["confusion_matrix"]).shape == (8, 8)
        assert np.array(m["confusion_matrix"]).sum() == m["n"]
    assert metrics["test"]["accuracy"] > 0.2  # above chance (0.125) after two short epochs
    rob = metrics["robustness"]
    assert 0.0 <= rob["corrupted"]["accuracy"] <= 1.0 and len(rob["per_family"]) == 6
    held = metrics["heldout"]
    assert held["corrupted"]["n"] == metrics["test"]["n"] and 0.0 <= held["corrupted"]["accuracy"] <= 1.0
    assert list(held["per_corruption"]) == list(heldout.HELD_OUT) and held["per_corruption_images"] == 64
    assert all(list(row) == ["1", "3", "5"] for row in held["per_corruption"].values())
    mmc = metrics["medmnist_c"]
    assert mmc["images"] == 64 and list(mmc["per_severity"]) == ["1", "2", "3", "4", "5"]
    assert set(mmc["per_corruption"]) | set(mmc["skipped"]) == set(medmnist_c.KINDS)
    assert all(0.0 <= mmc[k] <= 1.0 for k in ("overall", "unseen", "seen", "clean"))
    assert mmc["per_corruption"]["bubble"]["split"] == "seen" == medmnist_c.SPLIT["bubble"]
    unseen = [row["accuracy"] for row in mmc["per_corruption"].values() if row["split"] == "unseen"]
    assert len(unseen) == 2 and mmc["unseen"] == pytest.approx(np.mean(unseen))
    assert metrics["export"]["parity"]["ok"]


def test_onnx_agrees_with_keras_on_holdout(smoke_run):
    run = smoke_run[0]
    model = keras.models.load_model(run / "model.keras")
    with np.load(run / "holdout.npz") as held:
        x = held["images"][:48].astype(np.float32)
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"pixels": x})[0]
    np.testing.assert_allclose(ours, model.predict(x, verbose=0), atol=1e-4)


def test_inference_mode_matches_training_mode(smoke_run):
    """The trap: BatchNorm moving statistics that lag make inference-mode accuracy collapse."""
    run = smoke_run[0]
    check = json.loads((run / "metrics.json").read_text())["batchnorm_check"]
    assert check["gap"] <= 0.05, check
    model = keras.models.load_model(run / "model.keras")
    with np.load(run / "holdout.npz") as held:
        images, y = held["images"][:64], held["labels"][:64]
    x = augmented_samples(images, load_config(str(run / "config.json")), len(images))  # as the check sees them
    healthy = train_vs_inference_mode(model, x, y)
    assert healthy["gap"] <= 0.05
    for layer in model._flatten_layers():  # stale statistics, as after too few steps at momentum 0.99
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(layer.moving_variance * 400.0)
            layer.moving_mean.assign(layer.moving_mean * 0.0 + 5.0)
    stale = train_vs_inference_mode(model, x, y)
    assert stale["gap"] > 0.15, stale  # the check catches it
    assert stale["training_mode_accuracy"] == pytest.approx(healthy["training_mode_accuracy"], abs=1e-9)
    assert precise_batchnorm(model, [x[:32], x[32:]]) > 0
    assert train_vs_inference_mode(model, x, y)["gap"] <= 0.05  # and precise BN repairs it


def test_settings_carry_the_sha256_of_the_model_file(smoke_run):
    import hashlib
    run, sub, _ = smoke_run
    digest = hashlib.sha256((run / "model.onnx").read_bytes()).hexdigest()
    for folder in (run, sub):
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["model_sha256"] == digest, folder
        assert hashlib.sha256((folder / settings["model_file"]).read_bytes()).hexdigest() == digest
    assert json.loads((run / "metrics.json").read_text())["export"]["sha256"] == digest
    for key in ("model_file", "input_name", "time_limit_s", "safety_margin", "expected_test_size", "max_views",
                "class_names", "run"):  # what model.py and make zip read
        assert key in settings, key


def test_every_step_after_training_is_measured(smoke_run):
    rows = json.loads((smoke_run[0] / "metrics.json").read_text())["memory"]
    assert [r["step"] for r in rows] == ["training", "evaluation", "batchnorm check", "robustness",
                                         "export: convert", "export: parity check", "scoring the submission"]
    assert all(r["seconds"] >= 0 and (r["peak_rss_gb"] is None or r["peak_rss_gb"] > 0.1) for r in rows), rows
    assert rows[1]["batch_size"] == 128  # vanilla_cnn at 96: the batch it always had


def test_batchnorm_check_skips_a_model_without_batchnorm(real_slice):
    inputs = keras.Input((96, 96, 3))
    x = keras.layers.LayerNormalization()(keras.layers.Conv2D(4, 8, strides=8)(inputs))
    no_bn = keras.Model(inputs, keras.layers.Dense(8, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)),
                        name="layernorm_only")
    check = train_vs_inference_mode(no_bn, real_slice[0][:8], real_slice[1][:8])
    assert check == {"skipped": "layernorm_only has no BatchNormalization layers, so training and inference mode "
                                "normalise alike (ConvNeXt uses LayerNorm)"}


def test_killed_run_resumes_where_it_stopped(tmp_path, data_path):
    runs = tmp_path / "runs"
    args = ("--profile", "smoke", "--data", data_path, "--name", "r", "--runs-dir", str(runs), "--epochs", "3",
            "--limit", "400", "--patience", "10", "--robustness-images", "0", "--export", "false",
            "--submission-dir", "", "--verbose", "2")
    proc = subprocess.Popen(trainer_cmd(*args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # kill it as soon as epoch 2 begins: epoch 1 is saved, epoch 2 is lost
        seen.append(line)
        if line.startswith("Epoch 2/3"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    spent_before_kill = json.loads((runs / "r" / "run_time.json").read_text())["seconds"]
    assert spent_before_kill > 0
    resumed = subprocess.run([sys.executable, "-m", "trainer", "train", "--resume", str(runs / "r")], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Epoch 1/3" not in resumed.stdout and "Epoch 2/3" in resumed.stdout
    assert "resuming: " in resumed.stdout
    with open(runs / "r" / "phase_train" / "history.csv") as fh:
        epochs = [int(row["epoch"]) for row in csv.DictReader(fh)]
    assert epochs == [0, 1, 2]
    metrics = json.loads((runs / "r" / "metrics.json").read_text())
    assert metrics["train_seconds"] > spent_before_kill  # both processes' time, not only the last one's


def test_resumed_run_gets_only_what_is_left_of_its_budget(tmp_path):
    import time

    from trainer.train import RunTime
    fresh = RunTime(str(tmp_path))
    assert fresh.before == 0.0 and fresh.deadline(0) == 0.0
    assert fresh.deadline(10) == pytest.approx(time.time() + 600, abs=5)
    (tmp_path / "run_time.json").write_text(json.dumps({"seconds": 540.0}))  # 9 minutes spent before a crash
    resumed = RunTime(str(tmp_path))
    assert resumed.seconds() >= 540.0
    assert resumed.deadline(10) == pytest.approx(time.time() + 60, abs=5)  # one minute of ten left
    resumed.save()
    assert json.loads((tmp_path / "run_time.json").read_text())["seconds"] >= 540.0


def test_a_run_keeps_the_time_it_first_started_across_resumes(tmp_path):
    import time

    from trainer.runs import run_date
    from trainer.train import RunTime
    first = RunTime(str(tmp_path))
    first.first_started = first.started = time.time() - 3600  # an hour ago
    first.save()
    resumed = RunTime(str(tmp_path))
    assert resumed.first_started == pytest.approx(first.first_started)
    assert resumed.started_utc() == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(first.first_started))
    # The runs table dates a run by it, not by file times (a checkout resets those).
    (tmp_path / "metrics.json").write_text(json.dumps({"started": resumed.started_utc()}))
    assert run_date(str(tmp_path)) == pytest.approx(first.first_started, abs=1)


def test_spent_budget_keeps_the_best_weights_without_training(tmp_path, real_slice, capsys):
    import time

    from trainer.config import make_config
    from trainer.models import build_model
    from trainer.train import fit
    cfg = make_config("smoke", epochs=2, steps_per_epoch=1, batch_size=8, randaugment=False, verbose=0)
    images, labels = real_slice
    train_idx, val_idx = np.arange(32), np.arange(32, 48)
    fit(cfg, str(tmp_path), images, labels, train_idx, val_idx, deadline=0.0)
    os.remove(tmp_path / "phase_train" / "done.json")  # as if the process died before finishing the phase
    rows_before = (tmp_path / "phase_train" / "history.csv").read_text().count("\n")
    best = build_model(cfg)
    best.load_weights(str(tmp_path / "phase_train" / "best.weights.h5"))
    capsys.readouterr()
    model, _ = fit(cfg, str(tmp_path), images, labels, train_idx, val_idx, deadline=time.time() - 1.0)
    assert "time budget is already spent" in capsys.readouterr().out
    assert (tmp_path / "phase_train" / "history.csv").read_text().count("\n") == rows_before  # no new epoch
    assert (tmp_path / "phase_train" / "done.json").exists()
    for got, want in zip(model.trainable_weights, best.trainable_weights):  # precise BN moves only the statistics
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_budget_that_ends_early_says_how_many_epochs_fit(tmp_path, real_slice, capsys):
    import time

    from trainer.config import make_config
    from trainer.train import fit
    cfg = make_config("smoke", epochs=3, steps_per_epoch=1, batch_size=8, randaugment=False, verbose=0)
    images, labels = real_slice
    _, history = fit(cfg, str(tmp_path), images, labels, np.arange(32), np.arange(32, 48),
                     deadline=time.time() - 1.0)  # spent already, but with no weights yet one epoch still runs
    assert len(history["accuracy"]) == 1
    out = capsys.readouterr().out
    assert "no room for another epoch after epoch 1 of 3 (epochs of " in out and "--time-budget-min" in out


def test_low_resolution_first_then_full_size(tmp_path, real_slice, capsys):
    """--low-res-size: the first epochs train on shrunk images, the rest at 96; the model that comes out takes
    96x96 and holds the trained weights, also when a finished run is run again."""
    from trainer.config import make_config
    from trainer.models import build_model
    from trainer.train import fit
    cfg = make_config("smoke", epochs=4, steps_per_epoch=2, batch_size=8, randaugment=False, verbose=0,
                      schedule="cosine", low_res_size=48, low_res_share=0.5)
    images, labels = real_slice
    train_idx, val_idx = np.arange(64), np.arange(64, 80)
    model, history = fit(cfg, str(tmp_path), images, labels, train_idx, val_idx, deadline=0.0)
    out = capsys.readouterr().out
    assert "resolution: 48x48 from epoch 1" in out and "resolution: 96x96 from epoch 3" in out
    assert "at 48x48 for the first 50% of the epochs, then at 96x96" in out
    assert len(history["accuracy"]) == 4
    assert model.input_shape == (None, 96, 96, 3)
    best = build_model(cfg)
    best.load_weights(str(tmp_path / "phase_train" / "best.weights.h5"))
    for got, want in zip(model.trainable_weights, best.trainable_weights):  # precise BN moves only the statistics
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    again, _ = fit(cfg, str(tmp_path), images, labels, train_idx, val_idx, deadline=0.0)  # phase done: no training
    assert "already done" in capsys.readouterr().out and again.input_shape == (None, 96, 96, 3)
    for got, want in zip(again.trainable_weights, best.trainable_weights):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_low_resolution_by_time_budget_sets_size_and_cosine_by_time(tmp_path):
    """With a time budget, the switch to 96 and the cosine follow the share of the budget spent, not epochs:
    low-resolution epochs are cheaper, so an epoch count would put the switch and the horizon in the wrong place."""
    import time

    import tensorflow as tf

    from trainer.callbacks import CosineDecay, EpochClock, Progress, Resolution, budget_spent
    from trainer.config import make_config
    cfg = make_config("smoke", schedule="cosine", time_budget_min=1.0, low_res_size=64, low_res_share=0.5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    for left_s, spent, want_size in ((45.0, 0.25, 64), (30.0, 0.5, 96), (6.0, 0.9, 96)):
        deadline = time.time() + left_s
        assert budget_spent(deadline, 1.0) == pytest.approx(spent, abs=0.01)
        size = tf.Variable(0, dtype=tf.int32)
        progress = Progress(deadline, cfg.time_budget_min, 80)
        cosine = CosineDecay(0.1, 80, EpochClock(deadline), progress)
        resolution = Resolution(size, cfg.low_res_size, cfg.low_res_share, progress)
        for callback in (cosine, resolution):
            callback.set_model(model)
            callback.on_epoch_begin(3)
        assert int(size.numpy()) == want_size
        rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        assert rate == pytest.approx(0.05 * (1 + np.cos(np.pi * spent)), rel=0.02)


def test_low_resolution_settings_that_cannot_work_are_refused():
    from trainer.config import make_config
    from trainer.config import validate as check_low_res
    check_low_res(make_config("cpu", low_res_size=64))
    with pytest.raises(ValueError, match="low_res_size is 96; use a size from 32 to 95"):
        check_low_res(make_config("cpu", low_res_size=96))
    with pytest.raises(ValueError, match="low_res_share is 1.0; use a share between 0 and 1"):
        check_low_res(make_config("cpu", low_res_size=64, low_res_share=1.0))
    with pytest.raises(ValueError, match="vanilla_cnn at input_size 96, not resnet50 at 96; use --low-res-size 0"):
        check_low_res(make_config("cpu", low_res_size=64, model="resnet50"))
    with pytest.raises(ValueError, match="with --folds switches by epochs.*--time-budget-min 0"):
        check_low_res(make_config("cpu", low_res_size=64, folds=5))
    check_low_res(make_config("cpu", low_res_size=64, folds=5, time_budget_min=0))
    with pytest.raises(ValueError, match="vanilla_cnn only, not resnet50"):
        models.build_model(make_config("cpu", model="resnet50", weights="none"), any_size=True)


def test_budget_forecast_after_the_first_epoch():
    import time

    from trainer.callbacks import EpochClock, budget_forecast
    clock = EpochClock(time.time() + 250)
    clock.durations.append(100.0)  # room for two more 100 s epochs
    line = budget_forecast(clock, 1, 80)
    assert line is not None and "at 100 s an epoch, training will stop near epoch 3 of 80" in line
    assert "--time-budget-min" in line
    assert budget_forecast(clock, 1, 3) is None  # all three fit
    assert budget_forecast(EpochClock(0.0), 1, 80) is None  # no budget
    spent = EpochClock(time.time() - 1)
    spent.durations.append(100.0)
    assert budget_forecast(spent, 1, 80) is None  # the stop line covers it


def test_evaluate_command_reproduces_metrics(smoke_run, tmp_path):
    """ONNX through submission/model.py, identity view, scores the holdout as metrics.json says (clean, corrupted)."""
    run = smoke_run[0]
    metrics = json.loads((run / "metrics.json").read_text())
    seed = json.loads((run / "config.json").read_text())["seed"]
    for extra, expected in (([], metrics["test"]["accuracy"]),
                            (["--corrupt", "--seed", str(seed)], metrics["robustness"]["corrupted"]["accuracy"])):
        out = tmp_path / "eval.json"
        proc = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--model", str(run), "--data",
                               str(run / "holdout.npz"), "--views", "1,8", "--out", str(out), *extra],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = json.loads(out.read_text())["rows"]
        n = metrics["test"]["n"]
        assert [r["views"] for r in rows] == [1, 8]
        assert abs(rows[0]["accuracy"] - expected) <= 1.0 / n + 1e-9, (rows[0], expected)
        assert "views" in proc.stdout and "accuracy" in proc.stdout
    # The corrupted pass also counts its errors by corruption: recount them from the ONNX model on the same copy.
    from trainer import corrupt
    holdout = np.load(run / "holdout.npz")
    copy, recipes = corrupt.corrupt_mix(holdout["images"], seed=seed)
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    wrong = session.run(None, {"pixels": copy.astype("float32")})[0].argmax(1) != holdout["labels"].ravel()
    table = rows[0]["errors_by_corruption"]
    assert sorted(table) == sorted(corrupt.CORRUPTIONS)
    assert [r["wrong"] for r in table.values()] == sorted((r["wrong"] for r in table.values()), reverse=True)
    for name in ("zoom", "jpeg", "channel_swap"):
        got = [i for i, recipe in enumerate(recipes) if any(step[0] == name for step in recipe)]
        hard = [i for i, recipe in enumerate(recipes) if (name, 4) in recipe or (name, 5) in recipe]
        assert table[name]["images"] == len(got) and table[name]["images_sev45"] == len(hard)
        assert abs(table[name]["wrong"] - int(wrong[got].sum())) <= 1, (name, table[name])  # ONNX vs model.py
        assert abs(table[name]["wrong_sev45"] - int(wrong[hard].sum())) <= 1, (name, table[name])
    assert "errors on the corrupted copy by the corruptions each image got, 1 view(s)" in proc.stdout


def test_evaluate_scores_each_corruption_alone(smoke_run, tmp_path):
    """--per-corruption: every corruption at each severity asked for, and a cell the ONNX model reproduces."""
    from trainer import corrupt
    run = smoke_run[0]
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--model", str(run), "--data",
                           str(run / "holdout.npz"), "--views", "1", "--per-corruption", "--severities", "2,5",
                           "--seed", "7", "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())["rows"][0]["per_corruption"]
    assert list(table) == list(corrupt.CORRUPTIONS)
    assert all(list(row) == ["2", "5"] and all(0 <= v <= 1 for v in row.values()) for row in table.values())
    assert "accuracy per corruption, 1 view(s)" in proc.stdout and "grid_mask" in proc.stdout
    holdout = np.load(run / "holdout.npz")
    rotated = corrupt.apply(holdout["images"], "rotate", 5, np.random.default_rng(7 + 5))
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    direct = (session.run(None, {"pixels": rotated.astype("float32")})[0].argmax(1) == holdout["labels"]).mean()
    assert abs(table["rotate"]["5"] - direct) <= 1.0 / len(rotated) + 1e-9

    refused = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--model", str(run), "--data",
                              str(run / "holdout.npz"), "--per-corruption", "--severities", "0,6"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--severities takes numbers 1-5" in refused.stderr


def test_evaluate_heldout_reproduces_metrics(smoke_run, tmp_path):
    """--heldout through submission/model.py scores the held-out copy the run scored, counts its errors by
    held-out corruption, and scores each held-out corruption alone as the ONNX model does."""
    run = smoke_run[0]
    metrics = json.loads((run / "metrics.json").read_text())
    seed = json.loads((run / "config.json").read_text())["seed"]
    out = tmp_path / "heldout.json"
    proc = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--model", str(run), "--data",
                           str(run / "holdout.npz"), "--views", "1", "--heldout", "--seed", str(seed),
                           "--per-corruption", "--severities", "3", "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["heldout"] is True and not result["corrupted"]
    row, n = result["rows"][0], metrics["test"]["n"]
    assert abs(row["accuracy"] - metrics["heldout"]["corrupted"]["accuracy"]) <= 1.0 / n + 1e-9
    assert sorted(row["errors_by_corruption"]) == sorted(heldout.HELD_OUT)
    assert list(row["per_corruption"]) == list(heldout.HELD_OUT)
    holdout = np.load(run / "holdout.npz")
    bubbled = heldout.apply(holdout["images"], "bubble", 3, np.random.default_rng(seed + 3))
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    direct = (session.run(None, {"pixels": bubbled.astype("float32")})[0].argmax(1) == holdout["labels"]).mean()
    assert abs(row["per_corruption"]["bubble"]["3"] - direct) <= 1.0 / len(bubbled) + 1e-9
    assert "held-out corrupted copy" in proc.stdout and "accuracy per held-out corruption" in proc.stdout
    refused = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--model", str(run), "--data",
                              str(run / "holdout.npz"), "--heldout", "--corrupt"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "pick one" in refused.stderr


def test_submission_figures_are_the_zips(smoke_run, tmp_path):
    """metrics.json's "submission" block is what `evaluate` gets from the exported model through model.py with
    the same views: clean and held-out exactly, MedMNIST-C on the same cells."""
    run = smoke_run[0]
    metrics = json.loads((run / "metrics.json").read_text())
    served, config = metrics["submission"], json.loads((run / "config.json").read_text())
    assert served["views"] == config["max_views"] == 8 and served["images"] == metrics["test"]["n"]
    assert served["medmnist_c"]["images"] == metrics["medmnist_c"]["images"]
    assert set(served["medmnist_c"]["per_corruption"]) == set(metrics["medmnist_c"]["per_corruption"])
    for flags, figure in (((), served["clean"]), (("--heldout",), served["heldout"]),
                          (("--medmnist-c", "--max-images", str(config["robustness_images"])),
                           served["medmnist_c"]["overall"])):
        out = tmp_path / "figure.json"
        proc = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--model", str(run), "--data",
                               str(run / "holdout.npz"), "--views", "8", "--seed", str(config["seed"]), *flags,
                               "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = json.loads(out.read_text())["rows"][0]
        assert row["views"] == 8
        assert abs(row["overall" if "--medmnist-c" in flags else "accuracy"] - figure) < 1e-9, (flags, row)
    # evaluate reads the run's config.json for seen and unseen, as the run did: the --veil run's bubble is seen
    assert row["per_corruption"]["bubble"]["split"] == "seen"
    assert abs(row["unseen"] - served["medmnist_c"]["unseen"]) < 1e-9
    assert "as its zip serves it (8 views)" in smoke_run[2]


def test_evaluate_medmnist_c_reproduces_metrics(smoke_run, tmp_path):
    """--medmnist-c through submission/model.py, on the run's test split with its seed and image count, scores
    the MedMNIST-C copies the run scored: the same figures, but for the few labels ONNX and Keras may differ on."""
    run = smoke_run[0]
    metrics = json.loads((run / "metrics.json").read_text())["medmnist_c"]
    config = json.loads((run / "config.json").read_text())
    out = tmp_path / "mmc.json"
    proc = subprocess.run([sys.executable, "-m", "trainer", "evaluate", "--model", str(run), "--data",
                           str(run / "holdout.npz"), "--views", "1", "--medmnist-c", "--seed", str(config["seed"]),
                           "--max-images", str(config["robustness_images"]), "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["images"] == metrics["images"] and row["skipped"] == metrics["skipped"]
    assert abs(row["overall"] - metrics["overall"]) <= 2.0 / metrics["images"]
    assert "unseen kinds" in proc.stdout and "bubble" in proc.stdout


def test_tune_reports_the_trade_off_within_its_budget(tmp_path, data_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", "tune", "--profile", "smoke", "--data", data_path,
                           "--runs-dir", str(tmp_path), "--name", "t", "--limit", "300", "--epochs", "1",
                           "--robustness-images", "16", "--candidates", "none,geometry", "--budget-min", "0.01"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert [r["candidate"] for r in rows] == ["none"]  # the budget left no room for the second
    assert "skipping geometry" in proc.stdout
    row = rows[0]
    assert row["corrupted_minus_clean"] == pytest.approx(row["corrupted"] - row["clean"])
    assert row["heldout_minus_clean"] == pytest.approx(row["heldout"] - row["clean"])
    assert "| candidate | clean | held-out | held-out - clean | in-distribution | MedMNIST-C |" in proc.stdout
    assert 0.0 <= row["medmnist_c"] <= 1.0 and 0.0 <= row["medmnist_c_unseen"] <= 1.0


def test_cosine_schedule_decays_to_the_last_epoch_that_fits(tmp_path):
    """The callback sets a cosine learning rate that reaches ~0 at the last epoch, or earlier when a deadline
    leaves room for fewer epochs."""
    import time

    from trainer.callbacks import CosineDecay, EpochClock
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")

    def rates(clock, epochs=10):
        cosine = CosineDecay(0.1, epochs, clock)
        cosine.set_model(model)
        out = []
        for epoch in range(epochs):
            cosine.on_epoch_begin(epoch)
            out.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
            if clock.durations:
                clock.deadline -= clock.durations[-1]  # an epoch's time passes, without waiting for it
        return out

    unlimited = rates(EpochClock(0.0))
    assert unlimited[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(unlimited, unlimited[1:]))
    assert unlimited[5] == pytest.approx(0.05, rel=1e-3)  # half way down at half the epochs
    assert unlimited[-1] < 0.003

    squeezed_clock = EpochClock(time.time() + 100.0)
    squeezed_clock.durations = [25.0]  # 4 more epochs of 25 s fit in 100 s
    squeezed = rates(squeezed_clock)
    assert squeezed[1] < unlimited[1]
    assert squeezed[4] == pytest.approx(1e-4)  # past the last epoch that fits: the floor


def test_cosine_schedule_logs_its_learning_rate_in_the_history(tmp_path):
    from trainer.callbacks import callbacks_for, cosine_rate
    from trainer.config import make_config
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse", metrics=["accuracy"])
    x, y = np.ones((8, 4), "float32"), np.ones((8, 2), "float32")
    callbacks = callbacks_for(make_config("smoke", schedule="cosine"), str(tmp_path), 0.0, 0.1, 3)
    model.fit(x, y, validation_data=(x, y), epochs=3, callbacks=callbacks, verbose=0)
    with open(tmp_path / "history.csv") as fh:
        logged = [float(row["learning_rate"]) for row in csv.DictReader(fh)]
    assert logged == pytest.approx([cosine_rate(0.1, epoch, 3) for epoch in range(3)])


def test_epoch_clock_counts_the_epochs_that_fit():
    import time

    from trainer.callbacks import EpochClock
    assert EpochClock(0.0).epochs_left() > 10 ** 6  # no deadline
    clock = EpochClock(time.time() + 100.0)
    clock.durations = [10.0, 30.0, 20.0]  # the slowest recent epoch sets the pace
    assert clock.epochs_left() == 3
    assert EpochClock(time.time() - 1.0).epochs_left() == 0


def test_unknown_schedule_is_refused(tmp_path):
    from trainer.config import make_config, validate
    with pytest.raises(ValueError, match="schedule 'linear'.*plateau or cosine"):
        validate(make_config("smoke", schedule="linear"))


def test_mixed_precision_model_becomes_float32_with_the_same_weights():
    """After bfloat16 training the model is rebuilt in float32, so calibration, evaluation and ONNX see float32."""
    from trainer.config import make_config
    from trainer.train import for_inference, precision_policy
    cfg = make_config("smoke", mixed_precision=True)
    assert precision_policy(cfg, n_gpus=1) == "mixed_float16"
    assert precision_policy(make_config("smoke"), n_gpus=0) == "float32"
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = models.build_model(cfg)
        assert mixed.layers[2].compute_dtype == "bfloat16"
        plain = for_inference(mixed, cfg)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(layer.compute_dtype == "float32" for layer in plain.layers)
    for a, b in zip(mixed.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype(np.float32)
    np.testing.assert_allclose(plain.predict(x, verbose=0), mixed.predict(x, verbose=0), atol=0.05)


def test_swa_schedule_decays_to_its_rate_then_holds_it_while_averaging():
    from trainer.callbacks import CosineDecay, EpochClock
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    cosine = CosineDecay(0.1, 8, EpochClock(0.0), tail=0.25, tail_lr=0.2)
    cosine.set_model(model)
    rates, averaging = [], []
    for epoch in range(8):
        cosine.on_epoch_begin(epoch)
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        averaging.append(cosine.averaging)
    assert averaging == [False] * 6 + [True] * 2  # the last quarter of 8 epochs
    assert rates[0] == pytest.approx(0.1)
    assert all(a > b > 0.02 for a, b in zip(rates[:5], rates[1:6]))  # decays towards 0.2 x 0.1 ...
    assert rates[6:] == pytest.approx([0.02, 0.02])  # ... and holds it in the tail
    assert rates[3] == pytest.approx(0.02 + 0.08 * 0.5 * (1 + np.cos(np.pi * 3 / 6)))


class _Killed(Exception):
    pass


def test_weight_average_is_the_mean_of_every_tail_step_across_a_resume(tmp_path):
    """--swa: the saved mean is that of the weights after each step of the tail, also when the process dies in
    the tail and a new one resumes from the backup."""
    from trainer.callbacks import AVERAGE_FILE, CosineDecay, WeightAverage, callbacks_for, load_average
    from trainer.config import make_config
    cfg = make_config("smoke", schedule="cosine", swa=0.5, swa_lr=0.5)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 4)).astype("float32"), rng.normal(size=(24, 2)).astype("float32")
    seen = []  # weights after every step that the tail averages, in both processes

    class Record(keras.callbacks.Callback):
        def __init__(self, cosine, kill_at=None):
            super().__init__()
            self.cosine, self.kill_at = cosine, kill_at

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == self.kill_at:
                raise _Killed

        def on_train_batch_end(self, batch, logs=None):
            if self.cosine.averaging:
                seen.append([w.copy() for w in self.model.get_weights()])

    def train(kill_at=None):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                  keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["accuracy"])
        callbacks = callbacks_for(cfg, str(tmp_path), 0.0, 0.01, 6)
        cosine = next(c for c in callbacks if isinstance(c, CosineDecay))
        assert any(isinstance(c, WeightAverage) for c in callbacks)
        model.fit(x, y, batch_size=8, validation_data=(x, y), epochs=6, verbose=0,
                  callbacks=callbacks + [Record(cosine, kill_at)])

    with pytest.raises(_Killed):
        train(kill_at=4)  # the tail is epochs 4-6 (1-based); it dies as epoch 5 begins
    assert load_average(str(tmp_path / AVERAGE_FILE))[1:] == (3, [4])
    train()
    mean, steps, epochs = load_average(str(tmp_path / AVERAGE_FILE))
    assert (steps, epochs) == (9, [4, 5, 6]) and len(seen) == 9  # 3 epochs of 3 steps, none counted twice
    for got, *after_each_step in zip(mean, *seen):
        np.testing.assert_allclose(got, np.mean(after_each_step, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(seen[0][0], seen[-1][0])  # the weights moved: the mean is not any one step's


def test_swa_run_keeps_the_averaged_weights(tmp_path, real_slice, capsys):
    from trainer.callbacks import AVERAGE_FILE, load_average
    from trainer.config import make_config
    from trainer.train import fit
    cfg = make_config("smoke", epochs=4, steps_per_epoch=2, batch_size=8, verbose=0, schedule="cosine", swa=0.5)
    images, labels = real_slice
    model, _ = fit(cfg, str(tmp_path), images, labels, np.arange(32), np.arange(32, 48), deadline=0.0)
    mean, steps, epochs = load_average(str(tmp_path / "phase_train" / AVERAGE_FILE))
    assert (steps, epochs) == (4, [3, 4])
    assert "the mean of the weights after 4 steps (epochs 3-4)" in capsys.readouterr().out
    done = json.loads((tmp_path / "phase_train" / "done.json").read_text())
    assert done["averaged_steps"] == 4 and done["averaged_epochs"] == [3, 4]
    trainable = [(v, m) for v, m in zip(model.weights, mean) if v.trainable]
    assert len(trainable) == len(model.trainable_weights)
    for variable, want in trainable:  # precise BN moves only the statistics
        np.testing.assert_allclose(np.asarray(variable), want, rtol=1e-6)


def test_swa_needs_the_cosine_schedule():
    from trainer.config import make_config, validate
    with pytest.raises(ValueError, match="--swa .*--schedule cosine"):
        validate(make_config("smoke", schedule="plateau", swa=0.25))
    validate(make_config("smoke", schedule="cosine", swa=0.25))
