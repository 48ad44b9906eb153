"""benchmark.pack and benchmark.grader: the zip's layout, refusals, time-limit check, and runs without onnxruntime."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAN = ["interpreter.py", "model.onnx", "model.py", "settings.json"]


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
    elif onnx_bytes:  # another model, with settings written for it, as its own export would
        (dest / "model.onnx").write_bytes(onnx_bytes)
        settings = json.loads((dest / "settings.json").read_text())
        settings["model_sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
        (dest / "settings.json").write_text(json.dumps(settings))
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


def test_lean_zip_layout_listing_and_same_bytes_twice(submission_dir, data_path, tmp_path):
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    done = pack("--run", submission_dir, "--skip-benchmark", "--lean", "--out", first, data=data_path)
    assert done.returncode == 0, done.stderr
    assert names(first) == LEAN
    sha = hashlib.sha256((submission_dir / "model.onnx").read_bytes()).hexdigest()
    settings = json.loads((submission_dir / "settings.json").read_text())
    with zipfile.ZipFile(first) as zf:
        for info in zf.infolist():
            assert "/" not in info.filename and (info.external_attr >> 16) & 0o170000 == 0o100000
            if info.filename == "settings.json":  # the zip's copy always carries the model's sha256
                assert json.loads(zf.read(info.filename)) == {**settings, "model_sha256": sha}
            else:
                source = submission_dir / info.filename
                if not source.exists():
                    source = os.path.join(ROOT, "submission", info.filename)
                assert zf.read(info.filename) == open(source, "rb").read(), info.filename
    for name in LEAN:
        assert name in done.stdout
    assert "ok: unpacked zip predicts 16 real images in a fresh Python" in done.stdout
    assert pack("--run", submission_dir, "--skip-benchmark", "--lean", "--out", second, data=data_path).returncode == 0
    assert first.read_bytes() == second.read_bytes()


def test_refuses_a_model_that_settings_json_was_not_written_for(submission_dir, data_path, tmp_path, previous):
    run = run_folder(submission_dir, tmp_path / "run")
    settings = json.loads((run / "settings.json").read_text())
    (run / "settings.json").write_text(json.dumps({**settings, "model_sha256": "ab" * 32}))
    done = pack("--run", run, "--skip-benchmark", "--lean", "--out", previous, data=data_path)
    assert_refused(done, previous, [str(run / "model.onnx"), "is not the model its settings.json was written for",
                                    "same run"])


def test_refuses_a_run_without_a_model(submission_dir, data_path, tmp_path, previous):
    run = run_folder(submission_dir, tmp_path / "run", onnx_bytes=b"")
    done = pack("--run", run, "--skip-benchmark", "--lean", "--out", previous, data=data_path)
    assert_refused(done, previous, ["no model.onnx", "make train"])


def test_refuses_a_zip_over_the_size_cap(submission_dir, data_path, previous):
    # The real cap is 512 MiB (the ConvNeXtBase zip is about 260 MiB and passes); a tiny cap makes the same check bite.
    done = pack("--run", submission_dir, "--skip-benchmark", "--lean", "--max-mib", 0.01, "--out", previous,
                data=data_path)
    assert_refused(done, previous, ["over the 0.01 MiB", "smaller model"])


def test_refuses_a_model_onnxruntime_cannot_load(submission_dir, data_path, tmp_path, previous):
    run = run_folder(submission_dir, tmp_path / "run", onnx_bytes=b"not an onnx model")
    done = pack("--run", run, "--skip-benchmark", "--lean", "--out", previous, data=data_path)
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
    done = pack("--run", run, "--skip-benchmark", "--lean", "--out", previous, data=data_path)
    assert_refused(done, previous, ["does not predict with onnxruntime here"])


def test_time_limit_check_passes_and_refuses(submission_dir, data_path, tmp_path, previous):
    done = pack("--run", submission_dir, "--lean", "--out", previous, "--limit", 2, "--margin", 0.5, data=data_path)
    assert_refused(done, previous, ["projected over the time limit"])
    done = pack("--run", submission_dir, "--lean", "--out", previous, data=data_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: time-limit check passed" in done.stdout and names(previous) == LEAN


def test_the_zip_is_recorded_in_its_run_for_trainer_score(submission_dir, data_path, tmp_path, capsys):
    """make zip notes the zip's sha256 in the run's zips.json, where python -m trainer score finds the run; a
    folder that make train did not make (no config.json) gets no record."""
    from benchmark.pack import record_in_run
    from trainer import leaderboard
    run = run_folder(submission_dir, tmp_path / "runs" / "alpha")
    (run / "config.json").write_text(json.dumps({"model": "vanilla_cnn"}))
    out = tmp_path / "submission.zip"
    done = pack("--run", run, "--skip-benchmark", "--lean", "--out", out, data=data_path)
    assert done.returncode == 0, done.stdout + done.stderr
    zips = json.loads((run / "zips.json").read_text())["zips"]
    assert [z["zip_sha256"] for z in zips] == [hashlib.sha256(out.read_bytes()).hexdigest()] and zips[0]["lean"]
    assert f"recorded: {run}/zips.json" in done.stdout
    assert leaderboard.find_run(str(out), str(tmp_path / "runs")) == (str(run), "zips.json lists the zip's sha256")

    settings = json.loads((submission_dir / "settings.json").read_text())
    record_in_run(str(submission_dir), settings, settings["model_sha256"], str(out), True)
    assert not (submission_dir / "zips.json").exists() and "recorded in no run" in capsys.readouterr().out
    (run / "settings.json").write_text(json.dumps({**settings, "model_sha256": "ab" * 32}))
    record_in_run(str(run), settings, settings["model_sha256"], str(out), True)  # the run holds another model
    assert len(json.loads((run / "zips.json").read_text())["zips"]) == 1
    assert "not for the zip's model" in capsys.readouterr().out


# ---- the default zip on graders without onnxruntime ---------------------------------------------------------

@pytest.fixture(scope="module")
def default_zip(submission_dir, data_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "submission.zip"
    done = pack("--run", submission_dir, "--skip-benchmark", "--out", out, data=data_path)
    if done.returncode != 0 and "could not download" in done.stderr:
        pytest.skip(f"no onnxruntime wheels (no network?): {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_default_zip_holds_one_wheel_per_python_and_prints_the_runtime_table(default_zip):
    """Contract changed: wheels for 3.9-3.13 by default (3.10-3.12 with VENDOR_ORT=1 before), no 50 MB warning."""
    path, printed = default_zip
    wheels = [n for n in names(path) if n.endswith(".whl")]
    assert sorted(set(names(path)) - set(wheels)) == LEAN
    assert sorted(w.split("-")[2] for w in wheels) == ["cp310", "cp311", "cp312", "cp313", "cp39"]
    assert all("manylinux" in w and w.endswith("x86_64.whl") for w in wheels)
    assert os.path.getsize(path) < 200e6
    table = printed[printed.index("runtime path"):]
    for wheel in wheels:
        assert f"Python {wheel.split('-')[2].replace('cp3', '3.')}, glibc >= 2." in table
    assert table.count("same") >= 4  # installed, the wheel of this Python, TensorFlow and numpy interpreters
    assert "DIFFER" not in table and "warning" not in printed


def test_glibc_of_wheel_tags():
    from benchmark.pack import glibc_of
    assert glibc_of("onnxruntime-1.19.2-cp39-cp39-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl") == "glibc >= 2.27"
    assert glibc_of("x-1.0-cp38-cp38-manylinux2014_x86_64.manylinux_2_17_x86_64.whl") == "glibc >= 2.17"


def test_lean_zip_runs_on_numpy_alone_through_the_interpreter(submission_dir, data_path, real_slice, tmp_path):
    from benchmark import grader
    out = tmp_path / "lean.zip"
    assert pack("--run", submission_dir, "--skip-benchmark", "--lean", "--out", out, data=data_path).returncode == 0
    images = real_slice[0][:16]
    row = grader.run_row(str(out), images, grader.reference_labels(str(out), images), "%d.%d" % sys.version_info[:2])
    assert row.ok, row
    assert row.runtime.startswith("numpy") and "interpreter.py" in row.runtime


def test_matrix_rows_cover_every_python_and_the_graders_tensorflow():
    from benchmark import grader
    rows = grader.matrix_rows()
    assert [(v, p, b) for v, p, b in rows if p == ("numpy",) and not b] == \
        [(v, ("numpy",), False) for v in ("3.9", "3.10", "3.11", "3.12", "3.13")]
    assert ("3.11", ("tensorflow-cpu==2.17.0", "keras==3.4.1"), True) in rows


@pytest.mark.heavy
def test_grader_matrix_on_the_default_zip(default_zip, real_slice):
    """Every row of make grader-check: Python 3.9-3.13 with numpy alone, TensorFlow 2.17 without onnxruntime."""
    from benchmark import grader
    images = real_slice[0][:16]
    reference = grader.reference_labels(str(default_zip[0]), images)
    rows = [grader.run_row(str(default_zip[0]), images, reference, v, p, b) for v, p, b in grader.matrix_rows()]
    print(grader.table(rows))
    assert all(r.ok for r in rows), grader.table(rows)
    used = {r.python: r.runtime for r in rows if r.wheels == "usable"}
    assert all(runtime.startswith("onnxruntime") and "vendored" in runtime for runtime in used.values()), used
    assert any(r.runtime.startswith("tensorflow 2.17") for r in rows)
