"""Codabench entry point: Model().predict(X) gives labels 0-7 via ONNX Runtime, with time-budgeted TTA."""
from __future__ import annotations

import atexit
import glob
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
DEFAULTS = {"model_file": "model.onnx", "input_name": "pixels", "time_limit_s": 6000.0, "safety_margin": 0.5,
            "expected_test_size": 10000, "max_views": 8, "tta": True, "chunk_size": 64, "budget_per_image_s": None}

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


# ---- onnxruntime: installed, or the vendored wheel for this Python ------------------------------------------

def _forget_onnxruntime() -> None:
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        del sys.modules[name]


def import_onnxruntime():
    """The installed onnxruntime, else the wheel for this Python shipped next to model.py, unpacked and imported."""
    try:
        import onnxruntime
        return onnxruntime, "installed"
    except ImportError as err:
        missing = err
        _forget_onnxruntime()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted(glob.glob(os.path.join(HERE, f"onnxruntime-*-{tag}-*.whl")))
    if not wheels:
        shipped = [os.path.basename(w) for w in glob.glob(os.path.join(HERE, "onnxruntime-*.whl"))]
        raise ImportError(f"model.py needs onnxruntime: `import onnxruntime` failed ({missing}) and there is no "
                          f"vendored onnxruntime wheel for this Python {sys.version.split()[0]} ({tag}, manylinux "
                          f"x86-64) next to model.py (shipped: {', '.join(shipped) or 'none'}); install onnxruntime "
                          f"or rebuild the zip with `make zip VENDOR_ORT=1`")
    errors = []
    for parent in (None, HERE):  # /tmp may be mounted noexec, which stops the shared library from loading
        try:
            folder = tempfile.mkdtemp(prefix="onnxruntime_", dir=parent)
            atexit.register(shutil.rmtree, folder, True)  # 75 MB unpacked: do not leave it behind
            with zipfile.ZipFile(wheels[-1]) as wheel:
                wheel.extractall(folder)
        except OSError as err:
            errors.append(str(err))
            continue
        sys.path.insert(0, folder)
        try:
            import onnxruntime
            return onnxruntime, "vendored"
        except ImportError as err:
            sys.path.remove(folder)
            _forget_onnxruntime()
            errors.append(f"{folder}: {err}")
    raise ImportError(f"model.py needs onnxruntime: it is not installed and the vendored wheel "
                      f"{os.path.basename(wheels[-1])} did not import ({'; '.join(errors)})")


_import_started = time.perf_counter()
ort, ORT_SOURCE = import_onnxruntime()
IMPORT_SECONDS = time.perf_counter() - _import_started


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


def make_session(path: str, threads: int):
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
        return ort.InferenceSession(path, options, providers=providers)
    except Exception:  # noqa: BLE001  a CUDA build on a machine whose driver does not work
        if providers == ["CPUExecutionProvider"]:
            raise
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


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
    """Loads model.onnx and settings.json from the folder of this file; predict(X) returns labels 0-7."""

    def __init__(self):
        started = time.perf_counter()
        self.settings = read_settings()
        self.threads = available_cores()
        self.session = make_session(os.path.join(HERE, self.settings["model_file"]), self.threads)
        names = [i.name for i in self.session.get_inputs()]
        self.input_name = self.settings["input_name"] if self.settings["input_name"] in names else names[0]
        self.chunk_size = max(1, int(self.settings["chunk_size"]))
        self.max_views = max(1, min(len(VIEWS), int(self.settings["max_views"]))) if self.settings["tta"] else 1
        # The first run allocates memory and picks kernels; do it now so the first chunk's timing is typical.
        self._run(np.zeros((min(self.chunk_size, 16), *IMAGE_SHAPE), np.float32))
        self.load_seconds = IMPORT_SECONDS + time.perf_counter() - started
        self.tta_report = {"provider": self.session.get_providers()[0], "threads": self.threads,
                           "load_seconds": self.load_seconds, "tta_mode": "numpy", "tta": bool(self.settings["tta"]),
                           "max_views": self.max_views, "chunk_size": self.chunk_size,
                           "budget_per_image_s": self.budget_per_image(), "onnxruntime": ort.__version__,
                           "onnxruntime_source": ORT_SOURCE}

    def budget_per_image(self) -> float:
        """Seconds each test image may take: the usable share of the limit, less loading, over the test size."""
        s = self.settings
        if s.get("budget_per_image_s") is not None:
            return float(s["budget_per_image_s"])
        usable = float(s["time_limit_s"]) * (1.0 - float(s["safety_margin"])) - self.load_seconds
        return max(0.0, usable) / max(1, int(s["expected_test_size"]))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]

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
