"""python -m trainer score: a leaderboard score recorded in the run its zip came from, shown by the runs table."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmark.pack import write_zip
from trainer import files, leaderboard, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)


def make_run(submission_dir, folder, heldout_accuracy=0.8125, onnx_bytes=None):
    """A run folder as make train leaves it, as far as scoring reads it: config, metrics with a held-out figure,
    model.onnx and the settings.json written for it."""
    os.makedirs(folder)
    files.write_json(str(folder / "config.json"), {"model": "vanilla_cnn", "optimizer": "nadam"})
    files.write_json(str(folder / "metrics.json"), {"test": {"accuracy": 0.9, "macro_f1": 0.88},
                                                    "heldout": {"corrupted": {"accuracy": heldout_accuracy}},
                                                    "submission": {"heldout": heldout_accuracy + 0.0625}})
    settings = json.loads((submission_dir / "settings.json").read_text())
    if onnx_bytes is None:
        shutil.copy(submission_dir / "model.onnx", folder / "model.onnx")
    else:
        (folder / "model.onnx").write_bytes(onnx_bytes)
    settings["model_sha256"] = files.sha256(str(folder / "model.onnx"))
    settings["run"] = folder.name
    files.write_json(str(folder / "settings.json"), settings)
    return folder


def zip_of(run, path):
    """The zip make zip would write from the run (lean, no wheels)."""
    write_zip(str(path), {"model.py": os.path.join(ROOT, "submission", "model.py"),
                          "model.onnx": str(run / "model.onnx"), "settings.json": str(run / "settings.json")})
    return path


def test_score_finds_the_run_by_its_model_and_the_runs_table_shows_it(submission_dir, tmp_path):
    runs_dir = tmp_path / "runs"
    run = make_run(submission_dir, runs_dir / "alpha")
    make_run(submission_dir, runs_dir / "other", onnx_bytes=b"another model")
    archive = zip_of(run, tmp_path / "submission.zip")
    done = trainer("score", archive, "0.9312", "--note", "phase 1", "--runs-dir", runs_dir)
    assert done.returncode == 0, done.stderr
    assert "0.9312" in done.stdout and "held-out figure: 0.8125 with 1 view, 0.8750 as the zip serves it" in \
        done.stdout
    scores = json.load(open(run / "leaderboard.json"))["scores"]
    assert len(scores) == 1 and not (runs_dir / "other" / "leaderboard.json").exists()
    assert scores[0]["zip_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert scores[0]["score"] == 0.9312 and scores[0]["note"] == "phase 1" and scores[0]["date"]

    assert trainer("score", archive, "0.9401", "--runs-dir", runs_dir).returncode == 0
    assert [s["score"] for s in json.load(open(run / "leaderboard.json"))["scores"]] == [0.9312, 0.9401]
    table = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in runs.runs_table(str(runs_dir), sort="name", markdown=True).splitlines()]
    held = table[0].index("zip_heldout")
    assert table[0][held + 1] == "leaderboard"
    # The latest score, beside the held-out figure of the zip that got it; a run with no score shows "-".
    assert [row[held:held + 2] for row in table[2:]] == [["0.8750", "0.9401"], ["0.8750", "-"]]


def test_zips_json_ties_a_zip_to_its_run_before_the_model_does(submission_dir, tmp_path):
    """Two runs with the same model (a copied folder): the run whose zips.json lists the zip gets the score."""
    runs_dir = tmp_path / "runs"
    first = make_run(submission_dir, runs_dir / "a-first")
    second = make_run(submission_dir, runs_dir / "b-copy")
    archive = zip_of(second, tmp_path / "submission.zip")
    leaderboard.record_zip(str(first), str(archive), lean=True)
    run, entry = leaderboard.record_score(str(archive), 0.5, runs_dir=str(runs_dir))
    assert run == str(first) and entry["found_by"].startswith("zips.json")
    assert not (second / "leaderboard.json").exists()


@pytest.mark.parametrize("score, words", [("93.12", ["outside 0..1", "as a fraction that is 0.9312"]),
                                          ("-0.1", ["outside 0..1"]), ("nan", ["outside 0..1"])])
def test_refuses_a_score_outside_zero_to_one(submission_dir, tmp_path, score, words):
    run = make_run(submission_dir, tmp_path / "runs" / "alpha")
    done = trainer("score", zip_of(run, tmp_path / "s.zip"), score, "--runs-dir", tmp_path / "runs")
    assert done.returncode == 2 and done.stderr.startswith("error: score"), done.stderr
    for word in words:
        assert word in done.stderr
    assert not (run / "leaderboard.json").exists()


def test_refuses_what_is_not_a_submission_zip_or_matches_no_run(submission_dir, tmp_path):
    runs_dir = tmp_path / "runs"
    run = make_run(submission_dir, runs_dir / "alpha")
    stranger = make_run(submission_dir, tmp_path / "elsewhere" / "beta", onnx_bytes=b"a model of no run here")
    no_model_py = tmp_path / "no_model_py.zip"
    write_zip(str(no_model_py), {"settings.json": str(run / "settings.json")})
    (tmp_path / "plain.zip").write_bytes(b"not a zip")
    for archive, words in ((tmp_path / "missing.zip", ["zip not found", "dist/submission.zip"]),
                           (tmp_path / "plain.zip", ["is not a zip"]),
                           (no_model_py, ["no model.py", "not a submission zip"]),
                           (zip_of(stranger, tmp_path / "stranger.zip"), ["matches no run in", "--run runs/<name>"])):
        done = trainer("score", archive, "0.9", "--runs-dir", runs_dir)
        assert done.returncode == 2, done.stdout
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        for word in words:
            assert word in done.stderr, (archive, done.stderr)
    done = trainer("score", zip_of(stranger, tmp_path / "stranger.zip"), "0.9", "--run", run)
    assert done.returncode == 2 and "holds another model than" in done.stderr, done.stderr
    assert not (run / "leaderboard.json").exists()
    assert trainer("score", tmp_path / "stranger.zip", "0.9", "--run", stranger).returncode == 0


def test_a_damaged_leaderboard_file_is_never_overwritten(submission_dir, tmp_path):
    run = make_run(submission_dir, tmp_path / "runs" / "alpha")
    (run / "leaderboard.json").write_text('{"scores": [{"score": 0.9')
    done = trainer("score", zip_of(run, tmp_path / "s.zip"), "0.91", "--runs-dir", tmp_path / "runs")
    assert done.returncode == 2 and "repair it or move it aside" in done.stderr, done.stderr
    assert (run / "leaderboard.json").read_text() == '{"scores": [{"score": 0.9'
    assert runs.run_row(str(run))["leaderboard"] is None
