"""benchmark.pack: the zip's layout, its refusals, the time-limit check, vendored onnxruntime where it is missing."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREE = ["model.onnx", "model.py", "settings.json"]


def pack(*args, data=None):
    """`python -m benchmark.pack ARGS`, as make zip runs it."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    if data:
        env["DATA"] = data
    return subprocess.run([sys.executable, "-m", "benchmark.pack", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def names(path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return sorted(zf.namelist())


def run_folder(submission_dir, dest, onnx_bytes: bytes | None = None):
    """A run folder like the fixture's, optionally with other model.onnx bytes or none at all (b"")."""
    os.makedirs(dest)
    shutil.copy(submission_dir / "settings.json", dest / "settings.json")
    if onnx_bytes is None:
        shutil.copy(submission_dir / "model.onnx", dest / "model.onnx")
    elif onnx_bytes:
        (dest / "model.onnx").write_bytes(onnx_bytes)
    return dest


def assert_refused(done, out, words):
    """Exit 1, one line on stderr naming the problem, and the zip that was there before left alone."""
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused"), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert out.read_bytes() == b"previous zip"


@pytest.fixture()
def previous(tmp_path):
    out = tmp_path / "dist" / "submission.zip"
    out.parent.mkdir()
    out.write_bytes(b"previous zip")
    return out


def test_zip_layout_listing_and_same_bytes_twice(submission_dir, data_path, tmp_path):
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    done = pack("--run", submission_dir, "--skip-benchmark", "--out", first, data=data_path)
    assert done.returncode == 0, done.stderr
    assert names(first) == THREE
    with zipfile.ZipFile(first) as zf:
        for info in zf.infolist():
            assert "/" not in info.filename and (info.external_attr >> 16) & 0o170000 == 0o100000
            assert zf.read(info.filename) == (submission_dir / info.filename).read_bytes()
    for name in THREE:
        assert name in done.stdout
    assert "ok: unpacked zip predicts 16 real images" in done.stdout
    assert pack("--run", submission_dir, "--skip-benchmark", "--out", second, data=data_path).returncode == 0
    assert first.read_bytes() == second.read_bytes()


def test_refuses_a_run_without_a_model(submission_dir, data_path, tmp_path, previous):
    run = run_folder(submission_dir, tmp_path / "run", onnx_bytes=b"")
    done = pack("--run", run, "--skip-benchmark", "--out", previous, data=data_path)
    assert_refused(done, previous, ["no model.onnx", "make train"])


def test_refuses_a_zip_over_the_size_cap(submission_dir, data_path, previous):
    # The real cap is 512 MiB (a ConvNeXtBase zip is about 350 MB and passes); a tiny cap makes the same check bite.
    done = pack("--run", submission_dir, "--skip-benchmark", "--max-mib", 0.01, "--out", previous, data=data_path)
    assert_refused(done, previous, ["over the 0.01 MiB", "smaller model"])


def test_refuses_a_model_onnxruntime_cannot_load(submission_dir, data_path, tmp_path, previous):
    run = run_folder(submission_dir, tmp_path / "run", onnx_bytes=b"not an onnx model")
    done = pack("--run", run, "--skip-benchmark", "--out", previous, data=data_path)
    assert_refused(done, previous, ["does not load in ONNX Runtime"])


def failing_model() -> bytes:
    """Loads and maps (batch, 96, 96, 3) to (batch, 8), but fails when run: it gathers row 100 of 96."""
    from onnx import TensorProto, helper
    consts = [helper.make_tensor("row", TensorProto.INT64, [1], [100]),
              helper.make_tensor("repeats", TensorProto.INT64, [2], [1, 8])]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["pixels", "row"], ["rows"], axis=1),
         helper.make_node("ReduceMean", ["rows"], ["mean"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Unsqueeze", ["mean", "one"], ["column"]),
         helper.make_node("Tile", ["column", "repeats"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "fails", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 96, 96, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 8])],
        consts + [helper.make_tensor("one", TensorProto.INT64, [1], [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def test_refuses_a_model_that_fails_to_predict(submission_dir, data_path, tmp_path, previous):
    run = run_folder(submission_dir, tmp_path / "run", onnx_bytes=failing_model())
    done = pack("--run", run, "--skip-benchmark", "--out", previous, data=data_path)
    assert_refused(done, previous, ["does not predict in a fresh Python without TensorFlow"])


def test_time_limit_check_passes_and_refuses(submission_dir, data_path, tmp_path, previous):
    done = pack("--run", submission_dir, "--out", previous, "--limit", 2, "--margin", 0.5, data=data_path)
    assert_refused(done, previous, ["projected over the time limit"])
    done = pack("--run", submission_dir, "--out", previous, data=data_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: time-limit check passed" in done.stdout and names(previous) == THREE


# ---- vendored onnxruntime -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vendored_zip(submission_dir, data_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("vendored") / "submission.zip"
    done = pack("--run", submission_dir, "--skip-benchmark", "--vendor-ort", "--out", out, data=data_path)
    if done.returncode != 0 and "could not download" in done.stderr:
        pytest.skip(f"no onnxruntime wheels (no network?): {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def find_python(version: str) -> str | None:
    """An interpreter for `version`: pythonX.Y on PATH, else one pyenv installed."""
    candidates = [shutil.which(f"python{version}")]
    candidates += glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}"))
    for python in filter(None, candidates):
        done = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                              text=True)
        if done.returncode == 0 and done.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return python
    return None


def venv_without_onnxruntime(version: str, folder) -> str:
    """A fresh virtual environment with numpy only; skips when the interpreter or pip's network is missing."""
    python = find_python(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine")
    subprocess.run([python, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    venv_python = os.path.join(folder, "bin", "python")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", venv_python, "install", "-q", "numpy"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"pip could not install numpy into a Python {version} venv: {done.stderr.strip()[-300:]}")
    assert subprocess.run([venv_python, "-c", "import onnxruntime"], capture_output=True).returncode != 0
    return venv_python


PREDICT = r'''
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
try:
    from model import Model
except ImportError as err:
    print(json.dumps({"import_error": str(err)}))
    sys.exit(0)
model = Model()
labels = model.predict(np.load(sys.argv[2]))
print(json.dumps({"labels": labels.tolist(), "dtype": str(labels.dtype), "report": model.tta_report}))
'''


def predict_in(venv_python: str, zip_path, images: np.ndarray, work) -> dict:
    unpacked, elsewhere = work / "unpacked", work / "elsewhere"
    elsewhere.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(unpacked)
    np.save(work / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([venv_python, "-I", "-c", PREDICT, str(unpacked), str(work / "images.npy")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_vendored_zip_holds_one_wheel_per_python(vendored_zip):
    wheels = [n for n in names(vendored_zip) if n.endswith(".whl")]
    assert sorted(set(names(vendored_zip)) - set(wheels)) == THREE
    assert sorted(w.split("-")[2] for w in wheels) == ["cp310", "cp311", "cp312"]
    assert all("manylinux" in w and w.endswith("x86_64.whl") for w in wheels)
    assert os.path.getsize(vendored_zip) < 150e6


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12"])
def test_vendored_zip_predicts_where_onnxruntime_is_missing(vendored_zip, real_slice, tmp_path, version):
    venv_python = venv_without_onnxruntime(version, tmp_path / "venv")
    result = predict_in(venv_python, vendored_zip, real_slice[0][:16], tmp_path / "run")
    assert "import_error" not in result, result
    assert np.dtype(result["dtype"]).kind == "i" and len(result["labels"]) == 16
    assert all(0 <= v <= 7 for v in result["labels"])
    assert result["report"]["onnxruntime_source"] == "vendored"
    assert not glob.glob(os.path.join(tmp_path / "run" / "unpacked", "onnxruntime_*")), "left an unpacked wheel"


def test_plain_zip_says_what_is_missing_where_onnxruntime_is(submission_dir, data_path, real_slice, tmp_path):
    out = tmp_path / "plain.zip"
    assert pack("--run", submission_dir, "--skip-benchmark", "--out", out, data=data_path).returncode == 0
    venv_python = venv_without_onnxruntime(f"{sys.version_info[0]}.{sys.version_info[1]}", tmp_path / "venv")
    result = predict_in(venv_python, out, real_slice[0][:2], tmp_path / "run")
    assert "needs onnxruntime" in result["import_error"] and "VENDOR_ORT=1" in result["import_error"]
