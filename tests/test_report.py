"""Tests for the run report page, Grad-CAM, the runs table and zipping a chosen run, on two real smoke runs."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile

import matplotlib.pyplot as plt
import numpy as np
import pytest

from trainer import files, gradcam, runs
from trainer.config import make_config
from trainer.report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = {"rows": [{"format": "onnx fp32", "mb": 0.31, "accuracy": 0.4321, "img_per_s": 812.5,
                       "vs_template": 1.0, "projected_s": 61.5}],
             "verdict": "PASS", "projected_s": 61.5, "limit_s": 6000, "margin": 0.5}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, data_path):
    """Two real smoke runs: 'alpha' (test split, then benchmarked) and 'beta' (adam, no test split, oversampled)."""
    from trainer.config import make_config
    from trainer.train import train
    folder = tmp_path_factory.mktemp("runs")
    # Smaller than the smoke profile (fewer images, one epoch for beta) to keep the file fast on 2 cores.
    common = dict(data=data_path, runs_dir=str(folder), submission_dir="", verbose=0, limit=480)
    train(make_config("smoke", name="alpha", robustness_images=16, **common))
    files.write_json(str(folder / "alpha" / "benchmark.json"), BENCHMARK)  # as `make benchmark` would
    train(make_config("smoke", name="beta", optimizer="adam", no_test_split=True, balance="oversample", epochs=1,
                      robustness_images=0, **common))
    for name in ("alpha", "beta"):
        assert write_report(str(folder / name), n_mistakes=8)
    return folder


def parse_page(path) -> ET.Element:
    """The page parsed as XML: a strict check that every tag is closed and nested right."""
    text = open(path, encoding="utf-8").read()
    assert text.startswith("<!DOCTYPE html>")
    return ET.fromstring(text[len("<!DOCTYPE html>"):])


def section_ids(root) -> set[str]:
    return {s.get("id") for s in root.iter("section")}


# ---- the page of one run -----------------------------------------------------------------------------

def test_page_is_valid_html_with_embedded_images(runs_dir):
    root = parse_page(runs_dir / "alpha" / "report.html")
    images = list(root.iter("img"))
    # removed, augmented, curves, 2 confusion matrices, robustness, and image + overlay per mistake
    assert len(images) >= 6 + 2 * 8
    for img in images:
        src = img.get("src")
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    links = [el.get(attr) for el in root.iter() for attr in ("src", "href") if el.get(attr)]
    assert not [link for link in links if not link.startswith(("data:", "#"))], "the page must need no network"
    assert not list(root.iter("script")) and not list(root.iter("link"))


def test_page_names_every_section_that_applies(runs_dir):
    alpha = parse_page(runs_dir / "alpha" / "report.html")
    expected = {"config", "cleaning", "augmentation", "curves", "confusion", "per-class", "robustness",
                "benchmark", "gradcam"}
    assert expected <= section_ids(alpha)
    text = "".join(alpha.itertext())
    metrics = json.load(open(runs_dir / "alpha" / "metrics.json"))
    assert f"{100 * metrics['test']['accuracy']:.2f}%" in text
    assert f"{100 * metrics['robustness']['corrupted']['accuracy']:.2f}%" in text
    assert f"{100 * metrics['heldout']['corrupted']['accuracy']:.2f}%" in text
    assert f"{100 * metrics['medmnist_c']['overall']:.2f}%" in text
    assert f"{metrics['medmnist_c']['per_corruption']['defocus_blur']['accuracy']:.3f}" in text
    for name in ("Basophil", "Immature granulocytes", "Platelet", "severity 5", "PASS", "812.5", "onnx fp32",
                 "held-out corrupted accuracy", "in-distribution corrupted accuracy", "stain_precipitate",
                 "MedMNIST-C: accuracy per corruption and severity", "MedMNIST-C accuracy", "unseen kinds"):
        assert name in text
    # The held-out figure leads: its card comes before the in-distribution one.
    assert text.index("held-out corrupted accuracy") < text.index("in-distribution corrupted accuracy")
    # beta has not been benchmarked, and has no test split: its figures are on val
    beta = parse_page(runs_dir / "beta" / "report.html")
    assert "benchmark" not in section_ids(beta)
    assert "No test split" in "".join(beta.itertext())


def test_robustness_shows_every_scored_corruption_on_one_cell_with_its_accuracy(runs_dir):
    from trainer import heldout, medmnist_c
    gallery = runs_dir / "alpha" / "corruption_gallery.png"
    assert gallery.exists(), "alpha has held-out and MedMNIST-C figures, so its report draws the gallery"
    alpha = parse_page(runs_dir / "alpha" / "report.html")
    assert "What the model is scored on" in "".join(alpha.itertext())
    # one row per corruption at three severities (clean cell first), two corruptions a line
    drawn = len(heldout.HELD_OUT) + len(medmnist_c.KINDS) - (medmnist_c.inks_path() is None)
    height, width = plt.imread(str(gallery)).shape[:2]
    assert width > height / (-(-drawn // 2)) * 3, "a line holds 7 pictures side by side"
    assert not (runs_dir / "beta" / "corruption_gallery.png").exists(), "beta scored no corruption"


def test_stopped_run_gets_a_page_with_what_it_has(runs_dir, tmp_path):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for name in ("config.json", "cleaning.json", "removed.png", "augmented.png", "split.npz", "holdout.npz"):
        shutil.copy(runs_dir / "alpha" / name, stopped / name)
    shutil.copytree(runs_dir / "alpha" / "phase_train", stopped / "phase_train")
    (stopped / "metrics.json").write_text('{"run": "half-writ')  # a torn file must not cost the page
    assert write_report(str(stopped), n_mistakes=4) == str(stopped / "report.html")
    root = parse_page(stopped / "report.html")
    ids = section_ids(root)
    assert {"config", "cleaning", "augmentation", "curves", "gradcam"} <= ids
    assert not ids & {"confusion", "per-class", "robustness", "benchmark"}
    assert "stopped early" in "".join(root.itertext())
    assert not [f for f in os.listdir(stopped) if f.endswith(".tmp")], "a temporary file was left behind"


def test_report_never_raises(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert write_report(str(blocker)) == "", "a page that cannot be written is reported, not raised"


# ---- Grad-CAM ----------------------------------------------------------------------------------------

def check_heatmaps(maps: np.ndarray, n: int) -> None:
    assert maps.shape == (n, 96, 96)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert np.allclose(maps.reshape(n, -1).max(1), 1.0), "each map is normalised to a peak of 1"
    assert np.abs(maps[0] - maps[1]).mean() > 0.01, "two different images gave the same heatmap"


def test_gradcam_of_a_flat_model(runs_dir):
    model = gradcam.load_run_model(str(runs_dir / "alpha"))
    with np.load(runs_dir / "alpha" / "holdout.npz") as held:
        images = held["images"][:2]
    check_heatmaps(gradcam.heatmaps(model, images), 2)


def test_gradcam_of_a_nested_backbone(runs_dir):
    import keras

    from trainer.config import make_config
    from trainer.models import backbone_of, build_model
    model = build_model(make_config("smoke", model="efficientnet_v2_b0", weights="none"))
    grad_model, dense = gradcam.gradient_model(model)
    backbone = backbone_of(model)
    assert grad_model.outputs[0].shape[1:] == backbone.output.shape[1:], "the feature map is the backbone's output"
    assert isinstance(dense, keras.layers.Dense) and dense.units == 8
    with np.load(runs_dir / "alpha" / "holdout.npz") as held:
        images, labels = held["images"], held["labels"]
    pick = [0, int(np.flatnonzero(labels != labels[0])[0])]  # two cells of different classes
    check_heatmaps(gradcam.heatmaps(model, images[pick]), 2)


def test_gradcam_of_a_kfold_ensemble(runs_dir):
    from trainer.config import make_config
    from trainer.models import build_model, ensemble
    members = [build_model(make_config("smoke", width=4, dense_units=16, seed=seed)) for seed in (1, 2)]
    with np.load(runs_dir / "alpha" / "holdout.npz") as held:
        images = held["images"][:2]
    check_heatmaps(gradcam.heatmaps(ensemble(members), images), 2)


def test_gradcam_command_refreshes_the_gallery(runs_dir):
    from trainer.__main__ import main
    run = runs_dir / "beta"
    assert main(["gradcam", "--run", str(run), "--n", "4"]) == 0
    assert open(run / "gradcam.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    cards = [d for d in parse_page(run / "report.html").iter("div") if d.get("class") == "mistake"]
    assert len(cards) == 4
    assert all("predicted" in "".join(c.itertext()) for c in cards)


# ---- across runs -------------------------------------------------------------------------------------

def make(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -o: never rebuild the virtualenv from inside a test
    return subprocess.run(["make", "-s", "-o", ".venv/.installed", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})


def test_make_runs_lists_both_runs_with_their_figures(runs_dir):
    result = make("runs", f"ARGS=--runs-dir {runs_dir}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["name", "date"]
    body = [line for line in lines[2:] if line.strip()]
    assert [line.split()[0] for line in body] == ["beta", "alpha"], "newest first"
    alpha, beta = body[1], body[0]
    a, b = (json.load(open(runs_dir / n / "metrics.json")) for n in ("alpha", "beta"))
    assert lines[0].split()[7:15] == ["clean", "zip_clean", "heldout", "zip_heldout", "leaderboard", "mmc",
                                      "zip_mmc", "in_dist"]
    for figure in (f"{a['test']['accuracy']:.4f}", f"{a['robustness']['corrupted']['accuracy']:.4f}",
                   f"{a['submission']['clean']:.4f}", f"{a['submission']['heldout']:.4f}",
                   f"{a['submission']['medmnist_c']['overall']:.4f}",
                   f"{a['heldout']['corrupted']['accuracy']:.4f}", f"{a['medmnist_c']['overall']:.4f}",
                   f"{a['test']['macro_f1']:.4f}", f"{a['export']['bytes'] / 1e6:.1f}", "PASS", "62s",
                   runs.duration(a["train_seconds"]), "nadam"):
        assert figure in alpha, (figure, alpha)
    for figure in (f"{b['val']['accuracy']:.4f}", "adam", "no-test-split", "balance oversample"):
        assert figure in beta, (figure, beta)


def test_runs_sort_and_markdown(runs_dir):
    rows = runs.collect(str(runs_dir))
    by_epochs = [r["name"] for r in runs.sort_rows(rows, "epochs")]
    assert by_epochs == ["alpha", "beta"]  # 2 epochs before 1
    assert [r["name"] for r in runs.sort_rows(rows, "epochs", reverse=True)] == ["beta", "alpha"]
    assert [r["name"] for r in runs.sort_rows(rows, "verdict")] == ["alpha", "beta"], "missing values go last"
    assert runs.sort_rows(rows, "corrupted") == runs.sort_rows(rows, "in_dist")  # the column's old name still sorts
    with pytest.raises(ValueError, match="sort by one of"):
        runs.sort_rows(rows, "colour")
    table = runs.runs_table(str(runs_dir), sort="name", markdown=True).splitlines()
    assert table[0].startswith("| name | date |") and set(table[1]) <= set("|-:")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["alpha", "beta"]


def test_notes_give_the_flags_that_set_a_run_apart_from_its_profile():
    def notes(**overrides):
        return runs.notes(dataclasses.asdict(make_config("cpu", **overrides)), {"test": {}})
    assert notes(seed=7, epochs=30, time_budget_min=0.0) == "erase 1", "how long a run trains is not named"
    assert notes(weight_decay=0.05, label_smoothing=0.0).split(", ") == ["erase 1", "--weight-decay 0.05",
                                                                       "--label-smoothing 0"]
    text = notes(corrupt_blur=2.0, corrupt_jpeg=False, erase_fill="random", erase=0.3, blur_pool=True, width=48)
    assert text.split(", ") == ["erase 0.3", "--erase-fill random", "--corrupt-jpeg false", "--corrupt-blur 2",
                                "--width 48", "--blur-pool true"]
    assert notes(model="resnet50", weights="imagenet") == "erase 1", "the model column names these"
    assert notes(schedule="cosine", swa=0.25) == "erase 1, swa 0.25 at 0.1x lr"
    # A profile that no longer exists has nothing to differ from.
    retired = {**dataclasses.asdict(make_config("cpu", corrupt_blur=2.0)), "profile": "retired"}
    assert runs.profile_changes(retired) == [] and runs.notes(retired, {"test": {}}) == "erase 1"


def test_runs_table_piped_into_head_ends_quietly(tmp_path):
    """`python -m trainer runs | head`: the reader leaves after a few lines; no BrokenPipeError traceback."""
    for i in range(1500):  # a table far larger than a pipe's buffer, so the writer meets the closed pipe
        files.write_json(str(tmp_path / f"run-{i:04d}" / "config.json"), {"model": "vanilla_cnn", "optimizer": "nadam"})
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "runs", "--runs-dir", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout.readline().split()[:2] == [b"name", b"date"]
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_make_zip_packs_the_chosen_run(runs_dir, tmp_path):
    if not os.path.exists(os.path.join(ROOT, "benchmark", "pack.py")):
        pytest.skip("benchmark/pack.py (make zip) is not written yet")
    chosen, other = runs_dir / "beta", runs_dir / "alpha"
    want = hashlib.sha256(open(chosen / "model.onnx", "rb").read()).hexdigest()
    assert want != hashlib.sha256(open(other / "model.onnx", "rb").read()).hexdigest()
    # The command `make zip` runs, sent to a temporary zip: the test must not replace the team's dist/submission.zip.
    planned = make("-n", "zip", f"RUN={chosen}", "SKIP_BENCHMARK=1")
    assert planned.returncode == 0, planned.stderr
    command = shlex.split(planned.stdout.replace("\\\n", " "))  # one recipe, continued over lines
    assert command[command.index("--run") + 1] == str(chosen)
    out = tmp_path / "submission.zip"
    result = subprocess.run(command + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(out) as packed:
        assert "model.onnx" in packed.namelist(), packed.namelist()
        assert hashlib.sha256(packed.read("model.onnx")).hexdigest() == want
        assert json.loads(packed.read("settings.json"))["run"] == "beta"
