"""Leaderboard scores tied to the zips that got them: which run a zip came from, and its scores in that run."""
from __future__ import annotations

import json
import os
import time
import zipfile

from . import files

ZIPS = "zips.json"            # in a run folder: every zip make zip built from it, by sha256
LEADERBOARD = "leaderboard.json"  # in a run folder: the leaderboard scores its zips got


class ScoreError(ValueError):
    """A score that cannot be recorded; the message names the problem and the fix."""


def _entries(path: str, key: str) -> list[dict]:
    """The list under `key` in a JSON file; [] when the file is missing. A damaged file is an error, not [],
    so that recording a score never overwrites earlier ones."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as fh:
            found = json.load(fh)[key]
        if not isinstance(found, list):
            raise TypeError
        return found
    except (ValueError, KeyError, TypeError) as err:
        raise ScoreError(f"{path} is not a list of {key} ({type(err).__name__}: {err}); repair it or move it "
                         f"aside, then run the command again") from None


def _append(path: str, key: str, entry: dict) -> None:
    files.write_json(path, {key: _entries(path, key) + [entry]})


def record_zip(run_dir: str, zip_path: str, lean: bool) -> str:
    """Note in run_dir/zips.json that make zip built zip_path from this run; returns the zip's sha256."""
    sha = files.sha256(zip_path)
    _append(os.path.join(run_dir, ZIPS), "zips", {"zip_sha256": sha, "zip": os.path.abspath(zip_path),
                                                  "bytes": os.path.getsize(zip_path), "lean": lean,
                                                  "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return sha


def zip_settings(zip_path: str) -> dict:
    """settings.json of a submission zip, after checking that it is one: a zip with model.py at its root."""
    if not os.path.isfile(zip_path):
        raise ScoreError(f"zip not found: {zip_path}; pass the file you uploaded (make zip writes "
                         f"dist/submission.zip)")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
            raw = zf.read("settings.json") if "settings.json" in names else b"{}"
    except zipfile.BadZipFile as err:
        raise ScoreError(f"{zip_path} is not a zip ({err}); pass the zip you uploaded") from None
    if "model.py" not in names:
        raise ScoreError(f"{zip_path} holds no model.py at its root, so it is not a submission zip; pass the zip "
                         f"you uploaded (make zip writes dist/submission.zip)")
    try:
        return json.loads(raw)
    except ValueError as err:
        raise ScoreError(f"settings.json in {zip_path} is not valid JSON ({err}); pass the zip make zip "
                         f"wrote") from None


def _run_folders(runs_dir: str) -> list[str]:
    if not os.path.isdir(runs_dir):
        return []
    return [os.path.join(runs_dir, name) for name in sorted(os.listdir(runs_dir))
            if os.path.isdir(os.path.join(runs_dir, name))]


def model_sha(run_dir: str) -> str | None:
    """The sha256 of the run's model.onnx, as its settings.json records it."""
    try:
        with open(os.path.join(run_dir, "settings.json")) as fh:
            return json.load(fh).get("model_sha256")
    except (OSError, ValueError):
        return None


def find_run(zip_path: str, runs_dir: str = "runs", sha: str | None = None) -> tuple[str, str]:
    """(run folder, how it was found) for a submission zip: the run whose zips.json lists the zip's sha256, else
    the run whose model.onnx is the zip's (settings.json's model_sha256, for zips made before zips.json)."""
    sha = sha or files.sha256(zip_path)
    settings = zip_settings(zip_path)
    for run in _run_folders(runs_dir):
        try:
            listed = _entries(os.path.join(run, ZIPS), "zips")
        except ScoreError:  # another run's damaged file must not stop this zip from being found
            continue
        if any(e.get("zip_sha256") == sha for e in listed):
            return run, f"{ZIPS} lists the zip's sha256"
    model = settings.get("model_sha256")
    matches = [run for run in _run_folders(runs_dir) if model and model_sha(run) == model]
    if matches:
        # Two runs can hold the same model (a copied folder); the one the zip names wins, then the newest.
        named = [run for run in matches if os.path.basename(run) == settings.get("run")]
        return (named or sorted(matches, key=os.path.getmtime))[-1], "its model.onnx is the zip's"
    raise ScoreError(f"{zip_path} (sha256 {sha[:12]}...) matches no run in {runs_dir}/: no {ZIPS} lists it and no "
                     f"run's model.onnx is its model (sha256 {(model or 'none')[:12]}...). Pass --run runs/<name> "
                     f"for the run it came from, or --runs-dir for another runs folder")


def check_score(score: float) -> float:
    if score != score or not 0 <= score <= 1:  # score != score: NaN
        hint = f"; as a fraction that is {score / 100:g}" if 1 < score <= 100 else ""
        raise ScoreError(f"score {score:g} is outside 0..1: give the accuracy the leaderboard shows as a fraction, "
                         f"e.g. 0.9312{hint}")
    return score


def record_score(zip_path: str, score: float, note: str = "", runs_dir: str = "runs",
                 run: str | None = None) -> tuple[str, dict]:
    """Append {zip_sha256, score, date, note} to leaderboard.json of the run that produced the zip; returns the
    run folder and the entry."""
    check_score(score)
    settings = zip_settings(zip_path)
    sha = files.sha256(zip_path)
    if run:
        if not os.path.isdir(run):
            raise ScoreError(f"run folder not found: {run}; pass RUN=runs/<name> (see make runs)")
        model = settings.get("model_sha256")
        if model and model_sha(run) not in (None, model):
            raise ScoreError(f"{zip_path} holds another model than {run} (sha256 {model[:12]}... against "
                             f"{model_sha(run)[:12]}...); pass the run the zip was built from, or leave --run out "
                             f"to find it")
        how = "given with --run"
    else:
        run, how = find_run(zip_path, runs_dir, sha)
    entry = {"zip_sha256": sha, "score": float(score),
             "date": time.strftime("%Y-%m-%d %H:%M:%S"), "note": note}
    _append(os.path.join(run, LEADERBOARD), "scores", entry)
    return run, {**entry, "found_by": how}


def latest_score(run_dir: str) -> float | None:
    """The newest leaderboard score recorded for the run, or None (no file, or one the runs table cannot read)."""
    try:
        scores = _entries(os.path.join(run_dir, LEADERBOARD), "scores")
    except ScoreError:
        return None
    return scores[-1].get("score") if scores else None
