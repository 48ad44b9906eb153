"""The command line as a user meets it: one-line errors, no run folder for bad data, honest tune candidates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from trainer.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def trainer(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def augmentation_fields() -> list[str]:
    """Every augmentation setting of Config: the fields from flip to cutmix_alpha, in declaration order."""
    names = [f.name for f in fields(Config)]
    return names[names.index("flip"):names.index("cutmix_alpha") + 1]


def test_every_tune_candidate_sets_every_augmentation_field():
    from trainer.tune import CANDIDATES
    wanted = set(augmentation_fields())
    assert {"corrupt_ops", "corrupt_jpeg", "randaugment_magnitude"} <= wanted
    for name, values in CANDIDATES.items():
        missing = sorted(wanted - set(values))
        assert not missing, f"candidate {name!r} inherits {missing} from the profile"


def test_tune_none_candidate_turns_the_whole_recipe_off():
    """'none' on top of the cpu profile (JPEG, zoom and 3 ops in its corruption stage) trains with no augmentation."""
    from trainer.config import make_config
    from trainer.tune import CANDIDATES
    cfg = make_config("cpu", **CANDIDATES["none"])
    assert not cfg.corrupt and not cfg.corrupt_jpeg and not cfg.corrupt_zoom and not cfg.randaugment
    assert not (cfg.flip or cfg.rot90 or cfg.rotation or cfg.erase or cfg.blur)


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, real_slice):
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, images=real_slice[0][:200], labels=real_slice[1][:200, None])
    return path


def test_runtime_error_is_one_line_not_a_traceback(small_npz, tmp_path):
    """No internet for the ImageNet download (a proxy on a closed local port): the message, not a traceback."""
    env = {**ENV, "KERAS_HOME": str(tmp_path / "keras"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    done = trainer("train", "--profile", "smoke", "--data", small_npz, "--runs-dir", tmp_path / "runs", "--name", "r",
                   "--model", "resnet50", "--weights", "imagenet", "--submission-dir", "", env=env)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "ImageNet weights" in lines[0] and "--weights" in lines[0], done.stderr[-2000:]


@pytest.mark.parametrize("problem", ["missing", "no labels"])
def test_bad_data_file_creates_no_run_folder(problem, tmp_path):
    data = tmp_path / "bad.npz"
    if problem == "no labels":
        np.savez(data, images=np.zeros((4, 96, 96, 3), np.uint8))
    done = trainer("train", "--profile", "smoke", "--data", data, "--runs-dir", tmp_path / "runs", "--name", "r",
                   timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert str(data) in done.stderr, done.stderr
    assert not (tmp_path / "runs" / "r").exists(), "a run that never started must leave no folder for make runs"


def test_one_op_thread_repeats_a_run_bit_for_bit(small_npz, tmp_path):
    """Two processes, one seed, the cpu profile's model for one epoch with --one-op-thread: the same weights.
    (Without the flag the two end a few last bits apart on a 2-core CPU: docs/experiments.md, 2026-12-08.)"""
    import keras

    from trainer import models  # noqa: F401  (registers the custom layers that model.keras names)
    weights = []
    for name in ("a", "b"):
        done = trainer("train", "--profile", "cpu", "--data", small_npz, "--runs-dir", tmp_path / "runs",
                       "--name", name, "--epochs", 1, "--time-budget-min", 0, "--submission-dir", "",
                       "--export", "false", "--robustness-images", 0, "--one-op-thread", "true", "--verbose", 0)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "TensorFlow already started" not in done.stdout, "the setting came too late to take effect"
        model = keras.models.load_model(tmp_path / "runs" / name / "model.keras", compile=False)
        weights.append(model.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*weights)), "one seed, one op thread: the runs must repeat"


def test_resume_applies_the_flags_that_may_change_and_refuses_the_others(tmp_path):
    from trainer import files
    from trainer.config import make_config
    run = tmp_path / "runs" / "r"
    files.write_json(str(run / "config.json"), make_config("smoke", name="r", runs_dir=str(tmp_path / "runs"),
                                                           time_budget_min=1.0).to_dict())
    done = trainer("config", "--resume", run, "--time-budget-min", "5", "--epochs", "9", "--verbose", "0")
    assert done.returncode == 0, done.stderr
    resumed = json.loads(done.stdout)
    assert (resumed["time_budget_min"], resumed["epochs"], resumed["verbose"]) == (5.0, 9, 0)
    assert resumed["learning_rate"] == make_config("smoke").learning_rate and resumed["name"] == "r"
    done = trainer("train", "--resume", run, "--learning-rate", "0.5", "--time-budget-min", "5")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--learning-rate cannot change" in done.stderr and "--time-budget-min" in done.stderr, done.stderr
    assert json.loads((run / "config.json").read_text())["time_budget_min"] == 1.0, "a refused resume changes nothing"


def test_flag_the_model_ignores_gets_a_warning_and_bad_values_an_error():
    done = trainer("config", "--profile", "gpu", "--width", "24")
    assert done.returncode == 0, done.stderr
    assert "warning: --width does not apply to convnext_base" in done.stderr
    assert json.loads(done.stdout)["model"] == "convnext_base"
    assert "warning" not in trainer("config", "--profile", "cpu", "--width", "24").stderr
    done = trainer("config", "--profile", "cpu", "--dropout", "1.5")
    assert done.returncode == 2 and done.stderr.startswith("error: --dropout is 1.5; use a value from 0.0 to 0.95")


def test_flag_another_setting_switches_off_gets_a_warning():
    done = trainer("config", "--profile", "cpu", "--erase", "0", "--erase-opacity", "0.3")
    assert done.returncode == 0, done.stderr
    assert "warning: --erase-opacity acts only with --erase above 0, and --erase is 0.0; it is ignored" \
        in done.stderr, done.stderr
    assert json.loads(done.stdout)["erase_opacity"] == 0.3, "a warning, not a refusal: the value is kept"
    assert "warning" not in trainer("config", "--profile", "cpu", "--erase-opacity", "0.3").stderr
    done = trainer("config", "--profile", "cpu", "--patience", "3")  # the cpu profile runs the cosine schedule
    assert "--patience acts only with --schedule plateau, and --schedule is cosine" in done.stderr, done.stderr
    assert "warning" not in trainer("config", "--profile", "cpu", "--schedule", "plateau", "--patience", "3").stderr
    # a flag the model ignores says so once, whatever it depends on
    done = trainer("config", "--profile", "gpu", "--instance-norm-stem", "false")
    assert done.stderr.count("warning") == 1 and "does not apply to convnext_base" in done.stderr, done.stderr


# For each field another one switches on: settings where it is on, and where it is off.
SWITCHES = {"erase": ({"erase": 0.5}, {"erase": 0.0}), "corrupt": ({"corrupt": 0.5}, {"corrupt": 0.0}),
            "pixmix": ({"pixmix": 0.3}, {"pixmix": 0.0}), "veil": ({"veil": 0.5}, {"veil": 0.0}),
            "randaugment": ({"randaugment": True}, {"randaugment": False}),
            "instance_norm": ({"instance_norm": True}, {"instance_norm": False}),
            "schedule": ({"schedule": "plateau"}, {"schedule": "cosine"}),
            "fine_tune_epochs": ({"fine_tune_epochs": 5}, {"fine_tune_epochs": 0}),
            "swa": ({"swa": 0.25}, {"swa": 0.0}), "low_res_size": ({"low_res_size": 64}, {"low_res_size": 0}),
            "local_contrast": ({"local_contrast": 4.0}, {"local_contrast": 0.0}),
            "corrupt_jpeg": ({"corrupt_jpeg": True}, {"corrupt_jpeg": False}),
            "corrupt_blur": ({"corrupt_blur": 2.5}, {"corrupt_blur": 0.0}),
            "soft_corrupt": ({"soft_corrupt": 0.5}, {"soft_corrupt": 0.0})}


def test_every_dependent_setting_warns_exactly_when_its_switch_is_off():
    from trainer.config import make_config, validate
    from trainer.registry import spec_of
    dependent = [f for f in fields(Config) if f.metadata["needs"] is not None]
    assert {f.name for f in dependent} >= {"erase_opacity", "corrupt_blur", "instance_norm_stem", "patience"}
    for f in dependent:
        needs = f.metadata["needs"]
        switch = needs if isinstance(needs, str) else needs[0]
        assert switch in SWITCHES, f"{f.name} needs {switch!r}: add it to SWITCHES"
        on, off = SWITCHES[switch]
        # a model that reads the field, so the only reason to warn is the switch
        model = "convnext_tiny" if spec_of("vanilla_cnn").ignores(f.name) else "vanilla_cnn"
        assert validate(make_config("cpu", model=model, **on), [f.name]) == [], f.name
        warnings = validate(make_config("cpu", model=model, **off), [f.name])
        flag = "--" + f.name.replace("_", "-")
        assert len(warnings) == 1 and warnings[0].startswith(f"warning: {flag} acts only with --"
                                                             f"{switch.replace('_', '-')}"), (f.name, warnings)
