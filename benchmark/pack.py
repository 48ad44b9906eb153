"""Build the Codabench upload zip (model.py, its interpreter, the ONNX model, settings.json, onnxruntime wheels) after
checking that it runs."""
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

from trainer import files, leaderboard

from . import grader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PY = os.path.join(ROOT, "submission", "model.py")
INTERPRETER_PY = os.path.join(ROOT, "submission", "interpreter.py")
WHEEL_CACHE = os.path.join(ROOT, "dist", "wheels")
VENDOR_PYTHONS = grader.PYTHONS
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MAX_ZIP_MIB = 512  # Codabench rejects a submission over 512 MiB whole; refuse above it
CHECK_IMAGES = 16      # images the unpacked zip must predict
INTERPRETER_IMAGES = 4  # images the interpreter runtimes must label as onnxruntime does (1 view each)
PROJECT_IMAGES = 10000  # the grader's test size, for the projected times
BENCHMARK_IMAGES = 256  # real images for the time-limit check when the run has no holdout.npz
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same inputs give the same zip


class Refused(Exception):
    """The zip would not work on Codabench; the message says what failed and how to fix it."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- what goes in -----------------------------------------------------------------------------------------

def find_run(run: str) -> str:
    for path in (run, os.path.join(ROOT, run), os.path.join(ROOT, "runs", run)):
        if os.path.isdir(path):
            return path
    raise Refused(f"run folder {run!r} not found; pass RUN=runs/<name> (see make runs)")


def sources(run: str | None) -> tuple[dict, dict]:
    """{name in zip: source path} for model.py, the ONNX model and settings.json, and the settings."""
    folder = find_run(run) if run else os.path.join(ROOT, "submission")
    for path in (MODEL_PY, INTERPRETER_PY):
        if not os.path.isfile(path):
            raise Refused(f"{path} is missing; restore it from git")
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
    return {"model.py": MODEL_PY, "interpreter.py": INTERPRETER_PY, model_file: onnx_path,
            "settings.json": settings_path}, settings


def settings_with_sha(members: dict, settings: dict, model_file: str, work: str) -> str:
    """Refuse a model file that settings.json was not written for; add the sha256 where an older run lacks it.
    Returns the model's sha256."""
    actual = files.sha256(members[model_file])
    expected = settings.get("model_sha256")
    if expected and expected != actual:
        raise Refused(f"{members[model_file]} is not the model its settings.json was written for (sha256 "
                      f"{actual[:12]}..., expected {expected[:12]}...); copy model.onnx and settings.json from the "
                      f"same run (make zip RUN=runs/<name>)")
    if not expected:
        path = os.path.join(work, "settings.json")
        write_json(path, {**settings, "model_sha256": actual})
        members["settings.json"] = path
        log(f"note: settings.json had no model_sha256; the zip's copy carries {actual[:12]}...")
    return actual


def record_in_run(run: str | None, settings: dict, model_sha: str, zip_path: str, lean: bool) -> None:
    """Note the zip's sha256 in its run's zips.json (RUN, else the run settings.json names), so that
    `python -m trainer score` finds the run from the zip alone. Only a folder make train made (config.json) whose
    model is the zip's."""
    folder = find_run(run) if run else os.path.join(ROOT, "runs", settings["run"]) if settings.get("run") else None
    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
        log(f"note: the zip is recorded in no run ({folder or 'settings.json names none'} is no run folder); "
            f"python -m trainer score will look for the run by the zip's model")
        return
    if leaderboard.model_sha(folder) != model_sha:
        log(f"note: the zip is recorded in no run: {folder}'s settings.json is not for the zip's model")
        return
    sha = leaderboard.record_zip(folder, zip_path, lean)
    log(f"recorded: {folder}/{leaderboard.ZIPS} lists this zip (sha256 {sha[:12]}...); after uploading it, "
        f"record its score with make score SCORE=0.xxxx")


def check_onnx(path: str, input_name: str) -> None:
    """The model loads in ONNX Runtime and takes (batch, 96, 96, 3) pixels to (batch, 8) probabilities."""
    import onnxruntime as ort
    ort.set_default_logger_severity(4)  # fatal only: its logs would bury the one line that says what failed
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
    for path in grader.image_files(data, os.path.join(find_run(run), "holdout.npz") if run else None):
        if os.path.isfile(path):
            try:
                images = grader.first_images(path, k)
            except ValueError as err:
                raise Refused(str(err)) from None
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


def glibc_of(wheel: str) -> str:
    """The oldest glibc a manylinux wheel runs on, from its platform tags."""
    tags = os.path.basename(wheel)[:-len(".whl")].split("-")[-1].split(".")
    versions = []
    for tag in tags:
        if tag.startswith("manylinux_"):
            major, minor = tag.split("_")[1:3]
            versions.append((int(major), int(minor)))
        elif tag.startswith("manylinux2014"):
            versions.append((2, 17))
    return "glibc >= %d.%d" % min(versions) if versions else "?"


# Runs in a separate process, so that TensorFlow's start-up lines and memory stay out of make zip's own.
INTERPRETER_CHECK = r'''
import importlib.util, json, os, sys, time
import numpy as np
unpacked, backend, images_path = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("zip_interpreter", os.path.join(unpacked, "interpreter.py"))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with open(os.path.join(unpacked, "settings.json")) as fh:
    model_file = json.load(fh).get("model_file", "model.onnx")
with open(os.path.join(unpacked, model_file), "rb") as fh:
    graph = module.Graph(fh.read())
missing = module.unsupported_ops(graph)
if missing:
    print(json.dumps({"checked": "no: lacks ops " + ", ".join(missing)}))
    sys.exit(0)
if backend == "tensorflow":
    try:
        import tensorflow as tf
    except ImportError:
        print(json.dumps({"checked": "no: no TensorFlow here"}))
        sys.exit(0)
    ops, version = module.TensorFlowOps(tf), "TensorFlow " + tf.__version__
else:
    ops, version = module.NumpyOps(), "numpy " + np.__version__
interpreter = module.Interpreter(graph, ops)
x = np.load(images_path).astype(np.float32)
interpreter.run(x[:1])
started = time.perf_counter()
labels = interpreter.run(x).argmax(1)
print(json.dumps({"checked": "here, %s, %d images" % (version, len(x)), "labels": labels.tolist(),
                  "per_image_s": (time.perf_counter() - started) / len(x)}))
'''


def check_interpreter(unpacked: str, backend: str, images: np.ndarray, reference: np.ndarray, work: str) -> dict:
    """The zip's interpreter.py (`backend` numpy or tensorflow) on real images: the same labels as onnxruntime?"""
    path = os.path.join(work, f"interpreter_{backend}.npy")
    np.save(path, images)
    done = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK, unpacked, backend, path], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise Refused(f"interpreter.py ({backend}) failed on the zip's model: "
                      f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}; report this as a bug")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ran = "labels" in result
    return {"checked": result["checked"], "per_image_s": result.get("per_image_s"),
            "same": bool(np.array_equal(result["labels"], reference)) if ran else None}


def runtime_table(rows: list[dict], zip_size: int, verdict: str) -> str:
    """Each runtime path the zip can take: what it needs, whether and how it was checked, projected grader time."""
    header = ("runtime path", "needs", "checked", "labels", f"{PROJECT_IMAGES:,} imgs, 1 view")
    body = [(r["path"], r["needs"], r["checked"], "-" if r["same"] is None else ("same" if r["same"] else "DIFFER"),
             "-" if not r.get("per_image_s") else f"{r['per_image_s'] * PROJECT_IMAGES:,.0f} s") for r in rows]
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths)).rstrip() for line in (header, *body)]
    lines.append(f"zip: {mib(zip_size)} to upload (Codabench's cap {MAX_ZIP_MIB} MiB); every row that is not "
                 f"checked here is checked by make grader-check")
    lines.append(f"grader time on {PROJECT_IMAGES:,} images, {verdict}" if verdict else
                 "grader time: not projected (--skip-benchmark)")
    return "\n".join(lines)


def run_benchmark(unpacked: str, test: str, cpus: int, limit: float, margin: float) -> str:
    """`python -m benchmark --quick` on the unpacked zip; it exits 0 on PASS and 1 when projected over the limit.
    Returns its verdict line (PASS: projected ...)."""
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
    return tail[-1] if tail else ""


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def pack(run: str | None, out: str, lean: bool, skip_benchmark: bool, cpus: int, limit: float, margin: float,
         data: str | None = None, max_mib: float = MAX_ZIP_MIB) -> list[tuple[str, int]]:
    """Check everything, then write the zip at `out` atomically; return (name, size) of each file in it."""
    members, settings = sources(run)
    model_file = settings.get("model_file", "model.onnx")
    check_onnx(members[model_file], settings.get("input_name", "pixels"))
    log(f"ok: {model_file} loads in ONNX Runtime")
    images = real_images(BENCHMARK_IMAGES, data, run)
    wheels = [] if lean else vendored_wheels()
    for wheel in wheels:
        members[os.path.basename(wheel)] = wheel
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    work = tempfile.mkdtemp(prefix="pack_")
    tmp_zip = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{os.getpid()}.tmp")
    try:
        model_sha = settings_with_sha(members, settings, model_file, work)
        write_zip(tmp_zip, members)
        size = os.path.getsize(tmp_zip)
        if size > max_mib * 2**20:
            raise Refused(f"the zip is {mib(size)}, over the {max_mib:g} MiB a submission may be; use a smaller "
                          "model" + ("" if lean else ", or LEAN=1 if the grader has onnxruntime"))
        rows = check_runtimes(tmp_zip, images[:CHECK_IMAGES], wheels, work)
        verdict = ""
        if skip_benchmark:
            log("skipped: time-limit check (--skip-benchmark)")
        else:
            test = benchmark_test_set(run, settings, images, work)
            verdict = run_benchmark(os.path.join(work, "unpacked"), test, cpus, limit, margin)
            log("ok: time-limit check passed")
        os.replace(tmp_zip, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tmp_zip):
            os.remove(tmp_zip)
    with zipfile.ZipFile(out) as zf:
        listing = [(info.filename, info.file_size) for info in zf.infolist()]
    log(runtime_table(rows, os.path.getsize(out), f"{cpus} cores, with model.py's views: {verdict}" if verdict
                      else ""))
    log(f"wrote {out}: {len(listing)} files ({', '.join(name for name, _ in listing)})")
    record_in_run(run, settings, model_sha, out, lean)
    return listing


def check_runtimes(zip_path: str, images: np.ndarray, wheels: list[str], work: str) -> list[dict]:
    """Run the zip the ways a grader may: the fast row of the grader matrix (a fresh environment of this Python with
    numpy alone, so the vendored wheel or the interpreter runs) and each interpreter backend here; refuse a zip
    that does not predict. Returns the runtime table's rows."""
    unpacked = os.path.join(work, "unpacked")
    os.makedirs(unpacked)
    unpack(zip_path, unpacked)
    try:
        reference = grader.reference_labels(zip_path, images)
    except Exception as err:  # noqa: BLE001  whatever model.py raises is the answer
        raise Refused(f"the unpacked zip does not predict with onnxruntime here: {str(err).splitlines()[0]}") from None
    version = "%d.%d" % sys.version_info[:2]
    log(f"checking: the unpacked zip in a fresh Python {version} environment with numpy alone ...")
    row = grader.run_row(zip_path, images, reference, version)
    if row.error:
        raise Refused(f"the unpacked zip does not predict in a fresh Python {version} with numpy alone: {row.error}")
    if not row.same_labels:
        raise Refused(f"the unpacked zip, run by {row.runtime} in a fresh Python {version}, labels {len(images)} real "
                      f"images differently from onnxruntime here; report this as a bug")
    log(f"ok: unpacked zip predicts {len(images)} real images in a fresh Python {version} with numpy alone "
        f"({row.runtime}, {row.seconds:.1f} s), labels as onnxruntime here")
    single = grader.reference_labels(zip_path, images[:INTERPRETER_IMAGES], views=1)
    rows = [{"path": "onnxruntime, installed on the grader", "needs": "onnxruntime", "same": True,
             "checked": f"here, onnxruntime {importlib.metadata.version('onnxruntime')} (the reference)"}]
    for wheel in wheels:
        python = os.path.basename(wheel).split("-")[2].replace("cp3", "3.")
        ran = python == version
        rows.append({"path": f"vendored {'-'.join(os.path.basename(wheel).split('-')[:2])}", "needs":
                     f"Python {python}, {glibc_of(wheel)}, x86-64", "same": row.same_labels if ran else None,
                     "checked": f"fresh Python {version} + numpy" if ran else "make grader-check"})
    for backend, needs in (("tensorflow", "TensorFlow (any 2.x)"), ("numpy", "numpy alone")):
        result = check_interpreter(unpacked, backend, images[:INTERPRETER_IMAGES], single, work)
        if result["same"] is False:
            raise Refused(f"interpreter.py ({backend}) labels real images differently from onnxruntime; "
                          f"report this as a bug")
        rows.append({"path": f"interpreter.py in {backend}", "needs": needs, **result})
    for r in rows:  # onnxruntime's time per view, measured in the fast row; the same library installed or not
        if r["path"].startswith("onnxruntime") or r["checked"].startswith("fresh"):
            r["per_image_s"] = row.per_view_s
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.pack", description=__doc__)
    parser.add_argument("--run", help="run folder (runs/<name>) whose model.onnx and settings.json to pack; "
                                      "default: submission/")
    parser.add_argument("--lean", action="store_true",
                        help="leave out the onnxruntime wheels (for a grader known to have onnxruntime); the zip "
                             "still falls back to TensorFlow or numpy")
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
        pack(args.run, args.out, args.lean, args.skip_benchmark, args.cpus, args.limit, args.margin, args.data,
             args.max_mib)
    except Refused as err:
        print(f"refused, no zip written: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
