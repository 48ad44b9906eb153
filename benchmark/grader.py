"""The grader matrix: an unpacked zip predicts real images in fresh virtual environments, one per plausible grader."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_CACHE = os.path.join(ROOT, "dist", "grader-envs")
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
# What the course's teams pinned, most likely the grader's own; TensorFlow 2.17 has wheels up to Python 3.12.
TF_PYTHON, TF_PACKAGES = "3.11", ("tensorflow-cpu==2.17.0", "keras==3.4.1")


@dataclass
class Row:
    """One environment's result."""

    python: str
    installed: str
    wheels: str            # "usable" or "made unusable"
    runtime: str = "-"
    same_labels: bool = False
    seconds: float = 0.0
    per_view_s: float | None = None  # model.py's own seconds per view per image
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.same_labels


def image_files(*first: str | None) -> list[str]:
    """Where real images may be, in order: the paths given, $DATA, data/, ../shared/data/ (relative to the kit)."""
    return [p for p in (*first, os.environ.get("DATA"), os.path.join(ROOT, "data", "training_set.npz"),
                        os.path.join(ROOT, "..", "shared", "data", "training_set.npz")) if p]


def first_images(npz_path: str, k: int) -> np.ndarray:
    """images[:k] of an .npz without reading the rest (the training set is 340 MB unpacked)."""
    with zipfile.ZipFile(npz_path) as npz, npz.open("images.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        per_image = int(np.prod(shape[1:]))
        k = min(k, shape[0])
        data = fh.read(k * per_image * dtype.itemsize)
    if fortran:
        raise ValueError(f"{npz_path}: images are stored in Fortran order; save them C-ordered")
    return np.frombuffer(data, dtype).reshape((k, *shape[1:])).copy()


def find_python(version: str) -> str | None:
    """An interpreter for `version`: pythonX.Y on PATH, else one pyenv installed."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    for python in filter(None, candidates):
        done = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == version:
            return python
    return None


def make_env(version: str, packages: tuple[str, ...], cache: str = ENV_CACHE) -> str:
    """A virtual environment of Python `version` with only `packages`, built once and kept in the cache.

    Returns its python; raises RuntimeError saying what is missing."""
    python = find_python(version)
    if python is None:
        raise RuntimeError(f"no Python {version} here (install it, e.g. `pyenv install {version}`)")
    folder = os.path.join(cache, f"py{version}-" + "-".join(p.replace("==", "") for p in packages))
    venv_python = os.path.join(folder, "bin", "python")
    if os.path.isfile(os.path.join(folder, ".ready")):
        return venv_python
    shutil.rmtree(folder, ignore_errors=True)
    # The environment's own pip: the kit's may be too new to install for an older Python.
    subprocess.run([python, "-m", "venv", folder], check=True, capture_output=True, timeout=300)
    done = subprocess.run([venv_python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--only-binary=:all:", *packages], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pip could not install {' '.join(packages)} for Python {version} ({why})")
    # pip itself stays in the environment, as on any grader; nothing else but `packages` and what they need.
    with open(os.path.join(folder, ".ready"), "w") as fh:
        fh.write(" ".join(packages))
    return venv_python


# Runs in the fresh environment as `python -I` from an empty folder, as the grader would import model.py.
PREDICT = r'''
import json, sys, time
import numpy as np
started = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from model import Model
model = Model()
labels = model.predict(np.load(sys.argv[2]))
print(json.dumps({"labels": np.asarray(labels).tolist(), "dtype": str(np.asarray(labels).dtype),
                  "seconds": time.perf_counter() - started, "report": model.tta_report,
                  "numpy": np.__version__}, default=str))
'''


def unpack_for_row(zip_path: str, folder: str, break_wheels: bool) -> None:
    """The zip unpacked into an empty folder, with TTA views fixed (labels comparable across runtimes of different
    speed) and, if asked, every vendored wheel overwritten so that it cannot be unpacked."""
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(folder)
    settings_path = os.path.join(folder, "settings.json")
    with open(settings_path) as fh:
        settings = json.load(fh)
    settings["budget_per_image_s"] = 1e9
    with open(settings_path, "w") as fh:
        json.dump(settings, fh)
    if break_wheels:
        for wheel in glob.glob(os.path.join(folder, "*.whl")):
            with open(wheel, "wb") as fh:
                fh.write(b"made unusable by the grader matrix")


def run_row(zip_path: str, images: np.ndarray, reference: np.ndarray, version: str, packages=("numpy",),
            break_wheels: bool = False, cache: str = ENV_CACHE) -> Row:
    """Model().predict(images) in a fresh environment of Python `version` with only `packages`."""
    row = Row(version, " ".join(packages), "made unusable" if break_wheels else "usable")
    work = tempfile.mkdtemp(prefix="grader_row_")
    try:
        venv_python = make_env(version, tuple(packages), cache)
        unpacked, elsewhere = os.path.join(work, "unpacked"), os.path.join(work, "elsewhere")
        os.makedirs(elsewhere)
        unpack_for_row(zip_path, unpacked, break_wheels)
        np.save(os.path.join(work, "images.npy"), images)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        started = time.perf_counter()
        done = subprocess.run([venv_python, "-I", "-c", PREDICT, unpacked, os.path.join(work, "images.npy")],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=1800)
        row.seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
        result = json.loads(done.stdout.strip().splitlines()[-1])
        row.runtime = result["report"].get("runtime_version", "?")
        # Which numpy pip chose: 1.x under TensorFlow 2.17, the newest 2.x for each Python otherwise.
        numpy = f"numpy {result['numpy']}"
        row.installed = numpy if tuple(packages) == ("numpy",) else f"{row.installed} ({numpy})"
        row.per_view_s = result["report"].get("seconds_per_view_per_image")
        labels = np.asarray(result["labels"])
        row.same_labels = labels.shape == reference.shape and np.dtype(result["dtype"]).kind in "iu" \
            and bool(np.array_equal(labels, reference))
        if glob.glob(os.path.join(unpacked, "onnxruntime_*")):
            row.error = "left an unpacked wheel behind"
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as err:
        row.error = str(err).splitlines()[0] if str(err) else type(err).__name__
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


def reference_labels(zip_path: str, images: np.ndarray, views: int | None = None) -> np.ndarray:
    """Labels from the kit's own onnxruntime through the zip's model.py, with the same fixed views as the rows
    (or `views` of them)."""
    work = tempfile.mkdtemp(prefix="grader_ref_")
    try:
        unpack_for_row(zip_path, work, break_wheels=False)
        with open(os.path.join(work, "settings.json")) as fh:
            settings = json.load(fh)
        settings["runtimes"] = ["onnxruntime"]
        if views:
            settings["max_views"] = views
        with open(os.path.join(work, "settings.json"), "w") as fh:
            json.dump(settings, fh)
        spec = importlib.util.spec_from_file_location(f"grader_reference_{os.getpid()}", os.path.join(work, "model.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return np.asarray(module.Model().predict(images))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def matrix_rows() -> list[tuple[str, tuple[str, ...], bool]]:
    """(Python, packages, break wheels) of each row: every Python with only numpy, then the grader's TensorFlow
    without onnxruntime or a usable wheel (the interpreter in TensorFlow), then numpy alone without a wheel."""
    rows = [(version, ("numpy",), False) for version in PYTHONS]
    rows.append((TF_PYTHON, TF_PACKAGES, True))
    rows.append((PYTHONS[-1], ("numpy",), True))
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| Python | installed | vendored wheels | runtime used | labels = reference | seconds | result |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "ok" if r.ok else f"FAILED: {r.error or 'labels differ'}"
        lines.append(f"| {r.python} | {r.installed} | {r.wheels} | {r.runtime} | {'yes' if r.same_labels else 'no'} "
                     f"| {r.seconds:.1f} | {result} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.grader", description=__doc__)
    parser.add_argument("--zip", default=os.path.join(ROOT, "dist", "submission.zip"), help="the zip to check")
    parser.add_argument("--n", type=int, default=32, help="real images each row predicts (all 8 views)")
    parser.add_argument("--data", help="npz with real images (default: $DATA, data/, ../shared/data/)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.zip):
        print(f"error: {args.zip} not found; build it with make zip", file=sys.stderr)
        return 2
    found = [p for p in image_files(args.data) if os.path.isfile(p)]
    if not found:
        print("error: no real images; set DATA=path/to/training_set.npz (or put it in data/)", file=sys.stderr)
        return 2
    images = first_images(found[0], args.n)
    reference = reference_labels(args.zip, images)
    rows = []
    for version, packages, broken in matrix_rows():
        print(f"row: Python {version} with {' '.join(packages)}, wheels {'made unusable' if broken else 'usable'} ...",
              flush=True)
        rows.append(run_row(args.zip, images, reference, version, packages, broken))
    print(f"\n{args.zip}, {len(images)} real images, 8 views, labels compared with the kit's onnxruntime:\n")
    print(table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
