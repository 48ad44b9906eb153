"""Build the Codabench upload zip (flat: model.py, the ONNX model, settings.json) only after checking that it runs."""
from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PY = os.path.join(ROOT, "submission", "model.py")
WHEEL_CACHE = os.path.join(ROOT, "dist", "wheels")
VENDOR_PYTHONS = ("3.10", "3.11", "3.12")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MAX_ZIP_MIB = 512  # Codabench rejects a submission over 512 MiB whole; refuse above it
WARN_ZIP_MB = 50   # some Codabench users report uploads failing above about this size
CHECK_IMAGES = 16      # images the unpacked zip must predict
BENCHMARK_IMAGES = 256  # real images for the time-limit check when the run has no holdout.npz
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same inputs give the same zip


class Refused(Exception):
    """The zip would not work on Codabench; the message says what failed and how to fix it."""


def log(msg: str) -> None:
    print(msg, flush=True)


def mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


# ---- what goes in -----------------------------------------------------------------------------------------

def find_run(run: str) -> str:
    for path in (run, os.path.join(ROOT, run), os.path.join(ROOT, "runs", run)):
        if os.path.isdir(path):
            return path
    raise Refused(f"run folder {run!r} not found; pass RUN=runs/<name> (see make runs)")


def sources(run: str | None) -> tuple[dict, dict]:
    """{name in zip: source path} for model.py, the ONNX model and settings.json, and the settings."""
    folder = find_run(run) if run else os.path.join(ROOT, "submission")
    if not os.path.isfile(MODEL_PY):
        raise Refused(f"{MODEL_PY} is missing; restore it from git")
    settings_path = os.path.join(folder, "settings.json")
    if not os.path.isfile(settings_path):
        raise Refused(f"no settings.json in {folder}; train first (make train) or pass RUN=runs/<name>")
    try:
        with open(settings_path) as fh:
            settings = json.load(fh)
    except ValueError as err:
        raise Refused(f"{settings_path} is not valid JSON ({err}); re-export the run") from None
    model_file = settings.get("model_file", "model.onnx")
    if os.path.basename(model_file) != model_file or model_file in ("model.py", "settings.json"):
        raise Refused(f"model_file in {settings_path} must be a plain file name like model.onnx; got {model_file!r}")
    onnx_path = os.path.join(folder, model_file)
    if not os.path.isfile(onnx_path):
        raise Refused(f"no {model_file} in {folder}; train first (make train) or pass RUN=runs/<name>")
    return {"model.py": MODEL_PY, model_file: onnx_path, "settings.json": settings_path}, settings


def check_onnx(path: str, input_name: str) -> None:
    """The model loads in ONNX Runtime and takes (batch, 96, 96, 3) pixels to (batch, 8) probabilities."""
    import onnxruntime as ort
    ort.set_default_logger_severity(3)  # errors only: its warnings would bury the one line that matters
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001  onnxruntime raises its own exception types
        raise Refused(f"{path} does not load in ONNX Runtime ({str(err).splitlines()[0]}); re-export the run "
                      f"(trainer.export.export_onnx)") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if input_name not in inputs or list(inputs[input_name][1:]) != [96, 96, 3]:
        raise Refused(f"{path} should take input {input_name!r} of shape (batch, 96, 96, 3); it takes {inputs}; "
                      f"re-export with trainer.export.export_onnx")
    output = session.get_outputs()[0].shape
    if output[-1] != 8:
        raise Refused(f"{path} should output (batch, 8) probabilities; it outputs {output}")


def real_images(k: int, data: str | None, run: str | None) -> np.ndarray:
    """Up to k real cell images (at least CHECK_IMAGES): --data, the run's holdout, $DATA, data/, ../shared/data/."""
    candidates = [data, os.path.join(find_run(run), "holdout.npz") if run else None, os.environ.get("DATA"),
                  os.path.join(ROOT, "data", "training_set.npz"),
                  os.path.join(ROOT, "..", "shared", "data", "training_set.npz")]
    for path in candidates:
        if path and os.path.isfile(path):
            images = first_images(path, k)
            if len(images) >= CHECK_IMAGES:
                return images
    raise Refused("no real images for the check; set DATA=path/to/training_set.npz (or put it in data/)")


def benchmark_test_set(run: str | None, settings: dict, images: np.ndarray, work: str) -> str:
    """The run's holdout (the run given, else the one settings.json names), else the real images we have."""
    for path in (os.path.join(find_run(run), "holdout.npz") if run else None,
                 os.path.join(ROOT, "runs", settings["run"], "holdout.npz") if settings.get("run") else None):
        if path and os.path.isfile(path):
            return path
    path = os.path.join(work, "benchmark_images.npz")
    np.savez(path, images=images)
    return path


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
        raise Refused(f"{npz_path}: images are stored in Fortran order; save them C-ordered")
    return np.frombuffer(data, dtype).reshape((k, *shape[1:])).copy()


# ---- vendored onnxruntime -----------------------------------------------------------------------------------

def vendored_wheels(cache: str = WHEEL_CACHE) -> list[str]:
    """onnxruntime CPU wheels (manylinux x86-64) for each Python in VENDOR_PYTHONS, downloaded once into the cache.

    Each Python gets the newest release up to the installed version that has a wheel for it
    (onnxruntime 1.32 no longer ships one for Python 3.10)."""
    version = importlib.metadata.version("onnxruntime")
    os.makedirs(cache, exist_ok=True)
    resolved_path = os.path.join(cache, "resolved.json")
    resolved = read_json(resolved_path) if os.path.isfile(resolved_path) else {}
    wheels = []
    for python in VENDOR_PYTHONS:
        key = f"{version}/cp{python.replace('.', '')}"
        name = resolved.get(key)
        if not name or not os.path.isfile(os.path.join(cache, name)):
            name = download_wheel(python, version, cache)
            resolved[key] = name
            write_json(resolved_path, resolved)
        if not name.startswith(f"onnxruntime-{version}-"):
            log(f"  note: onnxruntime {version} has no wheel for Python {python}; vendoring {name}")
        wheels.append(os.path.join(cache, name))
    return wheels


def download_wheel(python: str, version: str, cache: str) -> str:
    tag = f"cp{python.replace('.', '')}"
    folder = tempfile.mkdtemp(prefix=".download_", dir=cache)
    try:
        cmd = [sys.executable, "-m", "pip", "download", f"onnxruntime<={version}", "--only-binary=:all:", "--no-deps",
               "--python-version", python, "--implementation", "cp", "--abi", tag, "-d", folder, "--quiet"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        log(f"  downloading the onnxruntime wheel for Python {python}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = glob.glob(os.path.join(folder, f"onnxruntime-*-{tag}-*.whl"))
        if done.returncode != 0 or len(found) != 1:
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise Refused(f"could not download the onnxruntime wheel for Python {python} (pip: {why}); check the "
                          f"network, or put the wheel into {cache}/")
        name = os.path.basename(found[0])
        os.replace(found[0], os.path.join(cache, name))
        return name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


# ---- the zip and its checks -------------------------------------------------------------------------------

def write_zip(path: str, members: dict) -> None:
    """Regular files only, flat, fixed dates; wheels are zips already, so they are stored, not deflated."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, src in members.items():
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.external_attr = (stat.S_IFREG | 0o644) << 16  # a regular file, rw-r--r--
            info.compress_type = zipfile.ZIP_STORED if name.endswith(".whl") else zipfile.ZIP_DEFLATED
            with open(src, "rb") as fh:
                zf.writestr(info, fh.read())


def unpack(zip_path: str, folder: str) -> list[str]:
    """Unpack into an empty folder, refusing anything but plain files at the root."""
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if "/" in info.filename or "\\" in info.filename or info.is_dir() or is_link \
                    or "__pycache__" in info.filename:
                raise Refused(f"the zip holds {info.filename!r}; only plain files at its root are allowed")
        zf.extractall(folder)
        return zf.namelist()


# Runs in a fresh `python -I` from another working directory: TensorFlow, Keras and the trainer cannot be imported,
# and with vendored wheels neither can the installed onnxruntime, so the wheel in the zip is what gets used.
CHECK_SCRIPT = r'''
import importlib.abc, importlib.machinery, json, os, sys
folder, images_path, vendored = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
site_dirs = [p for p in sys.path if p.endswith("site-packages")]

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("tensorflow", "keras", "tf2onnx", "trainer"):
            raise ModuleNotFoundError(f"{top} is not available on Codabench: model.py must not import it")
        if vendored and top == "onnxruntime":
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and any((spec.origin or "").startswith(d) for d in site_dirs):
                raise ModuleNotFoundError("the installed onnxruntime is hidden, to test the vendored wheel")
        return None

sys.meta_path.insert(0, Blocker())
import numpy as np
sys.path.insert(0, folder)
from model import Model
x = np.load(images_path)
model = Model()
labels = model.predict(x)
problems = []
if not isinstance(labels, np.ndarray) or labels.shape != (len(x),):
    problems.append(f"predict returned {type(labels).__name__} of shape {getattr(labels, 'shape', None)}, "
                    f"expected an array of shape ({len(x)},)")
elif labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 7:
    problems.append(f"predict returned dtype {labels.dtype} with values {sorted(set(labels.tolist()))}, "
                    f"expected integers 0-7")
if problems:
    sys.exit("; ".join(problems))
print(json.dumps({"labels": labels.tolist(), "tta_report": getattr(model, "tta_report", {})}, default=str))
'''


def check_zip(zip_path: str, images: np.ndarray, vendored: bool, work: str) -> dict:
    """Unpack the zip, import it in a fresh Python from another folder and predict real images."""
    unpacked = os.path.join(work, "unpacked")
    elsewhere = os.path.join(work, "elsewhere")
    os.makedirs(unpacked)
    os.makedirs(elsewhere)
    unpack(zip_path, unpacked)
    images_path = os.path.join(work, "images.npy")
    np.save(images_path, images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-I", "-c", CHECK_SCRIPT, unpacked, images_path, "1" if vendored else "0"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        for line in lines[-15:]:
            log(f"  | {line}")
        raise Refused(f"the unpacked zip does not predict in a fresh Python without TensorFlow: {lines[-1]} "
                      f"(traceback above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(unpacked: str, test: str, cpus: int, limit: float, margin: float) -> None:
    """`python -m benchmark --quick` on the unpacked zip; it exits 0 on PASS and 1 when projected over the limit."""
    cmd = [sys.executable, "-m", "benchmark", "--submission", unpacked, "--quick", "--cpus", str(cpus),
           "--limit", str(limit), "--margin", str(margin), "--test", test]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        log(f"  | {line.rstrip()}")
        tail = (tail + [line.strip()])[-20:]
    code = proc.wait()
    if code == 1:
        raise Refused(f"projected over the time limit ({limit:g} s, margin {margin:g}): {tail[-1] if tail else ''}; "
                      f"use a faster model or lower max_views in settings.json")
    if code != 0:
        raise Refused(f"the time-limit check crashed (exit {code}): {tail[-1] if tail else 'no output'}; "
                      f"run make benchmark to see why")


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def pack(run: str | None, out: str, vendor_ort: bool, skip_benchmark: bool, cpus: int, limit: float, margin: float,
         data: str | None = None, max_mib: float = MAX_ZIP_MIB) -> list[tuple[str, int]]:
    """Check everything, then write the zip at `out` atomically; return (name, size) of each file in it."""
    members, settings = sources(run)
    model_file = settings.get("model_file", "model.onnx")
    check_onnx(members[model_file], settings.get("input_name", "pixels"))
    log(f"ok: {model_file} loads in ONNX Runtime")
    images = real_images(BENCHMARK_IMAGES, data, run)
    if vendor_ort:
        for wheel in vendored_wheels():
            members[os.path.basename(wheel)] = wheel
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    work = tempfile.mkdtemp(prefix="pack_")
    tmp_zip = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{os.getpid()}.tmp")
    try:
        write_zip(tmp_zip, members)
        size = os.path.getsize(tmp_zip)
        if size > max_mib * 2**20:
            raise Refused(f"the zip is {mib(size)}, over the {max_mib:g} MiB a submission may be; use a smaller "
                          "model" + (" or drop VENDOR_ORT=1" if vendor_ort else ""))
        result = check_zip(tmp_zip, images[:CHECK_IMAGES], vendor_ort, work)
        report = result["tta_report"]
        log(f"ok: unpacked zip predicts {len(result['labels'])} real images in a fresh Python without TensorFlow "
            f"(onnxruntime {report.get('onnxruntime')} {report.get('onnxruntime_source')}, "
            f"{report.get('provider')}, {report.get('views')} views)")
        if skip_benchmark:
            log("skipped: time-limit check (--skip-benchmark)")
        else:
            test = benchmark_test_set(run, settings, images, work)
            run_benchmark(os.path.join(work, "unpacked"), test, cpus, limit, margin)
            log("ok: time-limit check passed")
        os.replace(tmp_zip, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tmp_zip):
            os.remove(tmp_zip)
    with zipfile.ZipFile(out) as zf:
        listing = [(info.filename, info.file_size) for info in zf.infolist()]
    width = max(len(name) for name, _ in listing)
    for name, file_size in listing:
        log(f"  {name:{width}s} {mb(file_size):>10s}")
    log(f"wrote {out}: {len(listing)} files, {mb(os.path.getsize(out))} "
        f"(cap {max_mib:g} MiB)")
    if os.path.getsize(out) > WARN_ZIP_MB * 1e6:
        log(f"warning: over {WARN_ZIP_MB} MB; some Codabench uploads of this size fail, retry if yours does")
    return listing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.pack", description=__doc__)
    parser.add_argument("--run", help="run folder (runs/<name>) whose model.onnx and settings.json to pack; "
                                      "default: submission/")
    parser.add_argument("--vendor-ort", action="store_true",
                        help="put onnxruntime CPU wheels for Python 3.10-3.12 into the zip")
    parser.add_argument("--skip-benchmark", action="store_true", help="skip the time-limit check")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--limit", type=float, default=6000.0)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--max-mib", type=float, default=MAX_ZIP_MIB,
                        help=f"refuse a zip larger than this (default {MAX_ZIP_MIB}, Codabench's cap)")
    parser.add_argument("--out", default=os.path.join(ROOT, "dist", "submission.zip"))
    parser.add_argument("--data", help="npz with real images for the check (default: the run's holdout, then $DATA)")
    args = parser.parse_args(argv)
    try:
        pack(args.run, args.out, args.vendor_ort, args.skip_benchmark, args.cpus, args.limit, args.margin, args.data,
             args.max_mib)
    except Refused as err:
        print(f"refused, no zip written: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
