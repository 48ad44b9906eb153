"""Stage a submission folder as the grader unpacks it, and copies of it with other settings."""
from __future__ import annotations

import json
import os
import shutil
import zipfile


class UsageError(Exception):
    """Missing or unreadable inputs: exit 2 with a message saying what to pass."""


class SubmissionError(Exception):
    """The submission crashed or answered in a shape the grader cannot read: a FAIL."""


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def prepare_submission(source: str, run: str | None, from_run: bool, dest: str) -> str:
    """Copy the submission into dest as the grader unpacks it; the model and settings from the run if asked."""
    if source.endswith(".zip"):
        with zipfile.ZipFile(source) as zf:
            zf.extractall(dest)
    else:
        if not os.path.isfile(os.path.join(source, "model.py")):
            raise UsageError(f"{source}/model.py not found: the submission folder needs model.py")
        skip = {"__pycache__", *(("model.onnx", "settings.json") if from_run else ())}
        shutil.copytree(source, dest, ignore=lambda _dir, names: [n for n in names if n in skip])
        if from_run:
            for name in ("model.onnx", "settings.json"):
                if not os.path.isfile(os.path.join(run, name)):
                    raise UsageError(f"{run}/{name} not found: export the run first (python -m trainer export)")
                shutil.copyfile(os.path.join(run, name), os.path.join(dest, name))
    for name in ("model.py", "settings.json"):
        if not os.path.isfile(os.path.join(dest, name)):
            raise SubmissionError(f"{name} is not at the top of the submission ({source}); the grader needs it there")
    model_file = read_json(os.path.join(dest, "settings.json")).get("model_file", "model.onnx")
    if not os.path.isfile(os.path.join(dest, model_file)):
        raise SubmissionError(f"settings.json names {model_file}, which is not in the submission ({source})")
    return dest


def variant(folder: str, dest: str, **settings) -> str:
    """A copy of the submission folder with some settings changed (files hard-linked where possible)."""
    os.makedirs(dest)
    for name in os.listdir(folder):
        src = os.path.join(folder, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name))
        elif name != "settings.json":
            try:
                os.link(src, os.path.join(dest, name))
            except OSError:
                shutil.copyfile(src, os.path.join(dest, name))
    merged = {**read_json(os.path.join(folder, "settings.json")), **settings}
    with open(os.path.join(dest, "settings.json"), "w") as fh:
        json.dump(merged, fh, indent=2)
    return dest
