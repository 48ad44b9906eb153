"""Codabench entry point: Model().predict(X) gives labels 0-7 with timed TTA, on the first runtime that loads."""
from __future__ import annotations

import atexit
import glob
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_SHAPE = (96, 96, 3)
N_CLASSES = 8
# Tried in this order; settings.json's "runtimes" may leave some out.
RUNTIMES = ("onnxruntime", "onnxruntime-vendored", "tensorflow", "numpy")
DEFAULTS = {"model_file": "model.onnx", "input_name": "pixels", "time_limit_s": 6000.0, "safety_margin": 0.5,
            "expected_test_size": 10000, "max_views": 8, "tta": True, "chunk_size": 64, "budget_per_image_s": None,
            "runtimes": list(RUNTIMES), "model_sha256": None}

# The 8 symmetries of the square. The first 2 and the first 4 are subgroups, so a partial average is still
# invariant under those flips; all 8 make the prediction invariant under every rotation and flip.
VIEWS = ("identity", "flip_left_right", "flip_up_down", "rot180", "transpose", "anti_transpose", "rot90", "rot270")


def view_batch(batch: np.ndarray, view: int) -> np.ndarray:
    """View number `view` of a contiguous batch (n, h, w, c), as a new contiguous array."""
    if view == 0:
        return batch
    # Moving whole pixels (one c*itemsize-byte element each) is about 3x faster than moving every channel.
    pixels = batch.view(np.dtype((np.void, batch.shape[-1] * batch.itemsize)))
    return np.ascontiguousarray(apply_view(pixels, view)).view(batch.dtype)


def apply_view(x: np.ndarray, view: int) -> np.ndarray:
    """View number `view` of a batch (n, h, w, c), as a numpy view (no copy)."""
    name = VIEWS[view]
    if name == "identity":
        return x
    if name == "flip_left_right":
        return x[:, :, ::-1]
    if name == "flip_up_down":
        return x[:, ::-1]
    if name == "rot180":
        return x[:, ::-1, ::-1]
    if name == "transpose":
        return x.transpose(0, 2, 1, 3)
    if name == "anti_transpose":
        return x[:, ::-1, ::-1].transpose(0, 2, 1, 3)
    return np.rot90(x, 1 if name == "rot90" else -1, axes=(1, 2))


# ---- runtimes: onnxruntime installed, then its vendored wheel, then the interpreter in TensorFlow or numpy ------

class Unavailable(Exception):
    """This runtime cannot run here; the message says why, for tta_report and the final error."""


def _forget_onnxruntime() -> None:
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        del sys.modules[name]


def installed_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        _forget_onnxruntime()
        raise Unavailable(f"import onnxruntime failed ({err})") from None
    return onnxruntime


def vendored_onnxruntime():
    """The onnxruntime wheel for this Python shipped next to model.py, unpacked into a temporary folder and imported."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted(glob.glob(os.path.join(HERE, f"onnxruntime-*-{tag}-*.whl")))
    if not wheels:
        shipped = [os.path.basename(w) for w in glob.glob(os.path.join(HERE, "onnxruntime-*.whl"))]
        raise Unavailable(f"no onnxruntime wheel for Python {sys.version.split()[0]} ({tag}) next to model.py "
                          f"(shipped: {', '.join(shipped) or 'none'})")
    errors = []
    for parent in (None, HERE):  # /tmp may be mounted noexec, which stops the shared library from loading
        folder = None
        try:
            folder = tempfile.mkdtemp(prefix="onnxruntime_", dir=parent)
            atexit.register(shutil.rmtree, folder, True)  # 75 MB unpacked: do not leave it behind
            with zipfile.ZipFile(wheels[-1]) as wheel:
                wheel.extractall(folder)
        except (OSError, zipfile.BadZipFile) as err:  # read-only folder, full disk, a damaged wheel
            errors.append(f"unpacking into {folder or parent or 'the temporary folder'}: {err}")
            continue
        sys.path.insert(0, folder)
        try:
            import onnxruntime
            return onnxruntime
        except ImportError as err:
            sys.path.remove(folder)
            _forget_onnxruntime()
            errors.append(f"importing from {folder}: {err}")
    raise Unavailable(f"{os.path.basename(wheels[-1])}: {'; '.join(errors)}")


class OnnxRuntimeRunner:
    """One ONNX Runtime session with every graph optimization; CUDA when the build has it and it starts."""

    def __init__(self, ort, path: str, threads: int, source: str):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one model run at a time: inter-op threads would only compete
        # Spinning threads lose badly when the cores are shared (21-27 vs 33-37 img/s on ConvNeXtTiny here), and we
        # cannot know whether the grader's are.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        providers = choose_providers(ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception:  # noqa: BLE001  a CUDA build on a machine whose driver does not work
            if providers == ["CPUExecutionProvider"]:
                raise
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]
        self.version = f"onnxruntime {ort.__version__} ({source})"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def _interpreter_module():
    """submission/interpreter.py, loaded by path under a name of its own, so that several submissions coexist."""
    path = os.path.join(HERE, "interpreter.py")
    if not os.path.isfile(path):
        raise Unavailable("interpreter.py is not next to model.py")
    name = f"an2dl_interpreter_{abs(hash(HERE))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


class InterpreterRunner:
    """model.onnx run op by op by interpreter.py, in TensorFlow or in numpy."""

    def __init__(self, path: str, threads: int, backend: str):
        module = _interpreter_module()
        if backend == "tensorflow":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            try:
                import tensorflow as tf
            except ImportError as err:
                raise Unavailable(f"import tensorflow failed ({err})") from None
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # TensorFlow already started in this process: keep its threads
                pass
            ops = module.TensorFlowOps(tf)
            gpus = tf.config.list_logical_devices("GPU")
            self.provider = "GPU" if gpus else "CPU"
            self.version = f"tensorflow {tf.__version__} (interpreter.py)"
        else:
            ops = module.NumpyOps()
            self.provider = "CPU"
            self.version = f"numpy {np.__version__} (interpreter.py)"
        with open(path, "rb") as fh:
            graph = module.Graph(fh.read())
        try:
            self.interpreter = module.Interpreter(graph, ops)
        except ValueError as err:
            raise Unavailable(str(err)) from None

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.interpreter.run(batch)


def load_runtime(path: str, threads: int, allowed, warmup: np.ndarray) -> tuple[object, str, dict]:
    """The first runtime in RUNTIMES order (those allowed) that loads the model and runs `warmup` through it:
    (runner, its name, why not the others)."""
    skipped = {}
    for name in RUNTIMES:
        if name not in allowed:
            skipped[name] = "not allowed by settings.json (runtimes)"
            continue
        try:
            if name == "onnxruntime":
                runner = OnnxRuntimeRunner(installed_onnxruntime(), path, threads, "installed")
            elif name == "onnxruntime-vendored":
                runner = OnnxRuntimeRunner(vendored_onnxruntime(), path, threads, "vendored wheel")
            else:
                runner = InterpreterRunner(path, threads, name)
            # The first run allocates memory and picks kernels, so the first chunk's timing is typical; a runtime
            # that cannot run the model fails here rather than in predict.
            runner.run(warmup)
            return runner, name, skipped
        except Unavailable as err:
            skipped[name] = str(err)
        except Exception as err:  # noqa: BLE001  a runtime that imports but cannot load the model: try the next
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    raise RuntimeError(f"model.py could not run {os.path.basename(path)} with any runtime: "
                       + "; ".join(f"{name}: {why}" for name, why in skipped.items()))


# ---- machine and settings ---------------------------------------------------------------------------------

def _cgroup_cpus() -> int | None:
    """CPUs allowed by a container's CPU quota (cgroup v2, then v1); None when there is no quota."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as fh:
                fields = fh.read().split()
            if period_file:
                with open(period_file) as fh:
                    fields.append(fh.read().strip())
            quota, period = fields[0], fields[-1]
            if quota in ("max", "-1"):
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a container quota; never the machine's total."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, quota) if quota else cores)


def choose_providers(available) -> list[str]:
    """CUDA when this onnxruntime build has it, CPU for everything else."""
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_settings(folder: str = HERE) -> dict:
    """settings.json next to model.py over the defaults; a missing or broken file leaves the defaults."""
    settings = dict(DEFAULTS)
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        try:
            with open(path) as fh:
                settings.update(json.load(fh))
        except (OSError, ValueError, TypeError) as err:  # a late answer beats none: run on defaults
            print(f"model.py: ignoring unreadable {path} ({err}); using defaults", file=sys.stderr)
    return settings


def check_model_file(path: str, expected: str | None) -> None:
    """Refuse a model file whose sha256 is not the one settings.json was written for (when it names one)."""
    if not expected:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{os.path.basename(path)} is not the model settings.json was written for (sha256 "
                         f"{digest.hexdigest()[:12]}..., expected {expected[:12]}...); copy model.onnx and "
                         f"settings.json from the same run, or rebuild the zip with make zip")


# ---- input ---------------------------------------------------------------------------------------------

def check_images(X) -> tuple[np.ndarray, float]:
    """X as an (n, 96, 96, 3) array and the factor that brings its values to 0-255; ValueError otherwise."""
    if isinstance(X, (list, tuple)) and len(X) == 0:
        return np.zeros((0, *IMAGE_SHAPE), np.uint8), 1.0
    try:
        x = np.asarray(X)
    except ValueError as err:  # a ragged list of arrays
        raise ValueError(f"expected images of shape (n, 96, 96, 3); got a sequence that is not one array ({err})") \
            from None
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"expected images of shape (n, 96, 96, 3) (RGB, channels last); got shape {x.shape}")
    if x.dtype.kind not in "uif":
        raise ValueError(f"expected integer or float pixel values; got dtype {x.dtype}")
    if x.dtype.kind != "f" or x.size == 0:
        return x, 1.0
    low, high = float(x.min()), float(x.max())  # min and max are NaN when any value is NaN, with no big temporary
    if math.isnan(low) or math.isnan(high) or math.isinf(low) or math.isinf(high):
        bad = np.flatnonzero(~np.isfinite(x).all(axis=(1, 2, 3)))
        value = "NaN" if math.isnan(low) or math.isnan(high) else "inf"
        raise ValueError(f"expected finite pixel values 0-255 (or 0-1 floats); got {value} in {len(bad)} of "
                         f"{len(x)} images (first: index {bad[0]})")
    return x, 255.0 if high <= 1.0 else 1.0


def to_model_input(chunk: np.ndarray, scale: float) -> np.ndarray:
    """float32, contiguous, 0-255: what the ONNX model takes."""
    x = np.asarray(chunk, np.float32)
    if scale != 1.0:
        x = x * np.float32(scale)
    if chunk.dtype != np.uint8:
        x = np.clip(x, 0.0, 255.0)  # also makes a copy, so the caller's array is never written to
    return np.ascontiguousarray(x)


# ---- the model -----------------------------------------------------------------------------------------

class Model:
    """Loads model.onnx and settings.json from the folder of this file; predict(X) returns labels 0-7.

    The model runs on the first runtime of RUNTIMES that loads it; tta_report says which, and why not the others."""

    def __init__(self):
        started = time.perf_counter()
        self.settings = read_settings()
        self.threads = available_cores()
        path = os.path.join(HERE, self.settings["model_file"])
        check_model_file(path, self.settings.get("model_sha256"))
        self.chunk_size = max(1, int(self.settings["chunk_size"]))
        warmup = np.zeros((min(self.chunk_size, 16), *IMAGE_SHAPE), np.float32)
        self.runner, runtime, skipped = load_runtime(path, self.threads, self.settings["runtimes"], warmup)
        self.max_views = max(1, min(len(VIEWS), int(self.settings["max_views"]))) if self.settings["tta"] else 1
        self.load_seconds = time.perf_counter() - started
        self.tta_report = {"runtime": runtime, "runtime_version": self.runner.version, "runtimes_skipped": skipped,
                           "provider": self.runner.provider, "threads": self.threads,
                           "load_seconds": self.load_seconds, "tta_mode": "numpy", "tta": bool(self.settings["tta"]),
                           "max_views": self.max_views, "chunk_size": self.chunk_size,
                           "budget_per_image_s": self.budget_per_image()}

    def budget_per_image(self) -> float:
        """Seconds each test image may take: the usable share of the limit, less loading, over the test size."""
        s = self.settings
        if s.get("budget_per_image_s") is not None:
            return float(s["budget_per_image_s"])
        usable = float(s["time_limit_s"]) * (1.0 - float(s["safety_margin"])) - self.load_seconds
        return max(0.0, usable) / max(1, int(s["expected_test_size"]))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.runner.run(np.ascontiguousarray(batch))

    def predict(self, X) -> np.ndarray:
        """Labels, shape (n,), int64, values 0-7."""
        return np.argmax(self.predict_proba(X), axis=1).astype(np.int64)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (n, 8), averaged over as many views as the time budget allows."""
        started = time.perf_counter()
        x, scale = check_images(X)
        n = len(x)
        probs = np.zeros((n, N_CLASSES), np.float32)
        budget = self.budget_per_image() * n
        views, first_views, image_views, first_rate = self.max_views, 0, 0, 0.0
        work_started = time.perf_counter()
        for lo in range(0, n, self.chunk_size):
            batch = to_model_input(x[lo:lo + self.chunk_size], scale)
            total = self._run(batch).astype(np.float32)  # identity always runs: a late answer beats none
            image_views += len(batch)
            rate = (time.perf_counter() - work_started) / image_views  # seconds per view per image so far
            first_rate = first_rate or rate
            views = min(views, self._views_that_fit(budget - (time.perf_counter() - started), rate, n - lo,
                                                    len(batch)))
            first_views = first_views or views  # the decision; later chunks only drop views if running late
            for view in range(1, views):
                total += self._run(view_batch(batch, view))
            image_views += (views - 1) * len(batch)
            probs[lo:lo + len(batch)] = total / views
        self._report(n, time.perf_counter() - started, image_views, first_rate, first_views, views)
        return probs

    def _views_that_fit(self, time_left: float, rate: float, images_left: int, chunk: int) -> int:
        """Most views (1 to the current maximum) whose remaining work fits the time left.

        Identity of this chunk is done; the rest costs rate * (views * images_left - chunk)."""
        if rate <= 0.0:
            return self.max_views
        fit = math.floor((time_left + rate * chunk) / (rate * images_left))
        return max(1, min(self.max_views, fit))

    def _report(self, n: int, seconds: float, image_views: int, first_rate: float, views: int, views_min: int) -> None:
        """What predict decided and measured, for the benchmark to print."""
        per_image = seconds / n if n else 0.0
        expected = int(self.settings["expected_test_size"])
        self.tta_report.update({
            "n_images": n, "views": views, "views_min": views_min if n else 0, "predict_seconds": seconds,
            "seconds_per_view_per_image": seconds / image_views if image_views else 0.0,
            "first_chunk_seconds_per_view_per_image": first_rate,
            "projected_total_s": self.load_seconds + expected * per_image,
            "budget_per_image_s": self.budget_per_image(), "expected_test_size": expected,
            "views_used": [VIEWS[v] for v in range(views)]})
