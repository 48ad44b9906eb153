"""Tests for trainer/corrupt.py, run on a few real cell images."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer import corrupt

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(corrupt.CORRUPTIONS)
# Flips only move pixels around, so "how much" has no meaning for them; tested separately.
GRADED = [name for name in NAMES if name != "flip"]


def find_data():
    """The training set: $DATA, then data/, then ../shared/data/ next to the repository; None if absent."""
    candidates = [os.environ.get("DATA"), ROOT / "data" / "training_set.npz",
                  ROOT.parent / "shared" / "data" / "training_set.npz"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def images():
    path = find_data()
    if path is None:
        pytest.skip("no training_set.npz: set DATA=/path/to/training_set.npz or put it in data/")
    with np.load(path, allow_pickle=False) as data:
        return data["images"][:64]


@pytest.fixture
def few(images):
    return images[:16]


@pytest.mark.parametrize("name", NAMES)
def test_every_severity_keeps_shape_dtype_and_input(few, name):
    before = few.copy()
    for severity in range(6):
        out = corrupt.apply(few, name, severity, np.random.default_rng(0))
        assert out.shape == few.shape and out.dtype == np.uint8
        assert out is not few
    np.testing.assert_array_equal(few, before)


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_identity(few, name):
    np.testing.assert_array_equal(corrupt.apply(few, name, 0, np.random.default_rng(0)), few)


@pytest.mark.parametrize("name", NAMES)
def test_same_rng_seed_same_output(few, name):
    first = corrupt.apply(few, name, 3, np.random.default_rng(7))
    second = corrupt.apply(few, name, 3, np.random.default_rng(7))
    np.testing.assert_array_equal(first, second)


def _mean_change(images, name, severity):
    out = corrupt.apply(images, name, severity, np.random.default_rng(1))
    return np.abs(out.astype(np.float64) - images).mean()


@pytest.mark.parametrize("name", GRADED)
def test_heavier_severity_changes_more(few, name):
    mild, heavy = _mean_change(few, name, 1), _mean_change(few, name, 5)
    assert 0 < mild < heavy


def test_flip_only_rearranges_pixels(few):
    for severity in corrupt.SEVERITIES:
        out = corrupt.apply(few, "flip", severity, np.random.default_rng(severity))
        changed = [not np.array_equal(a, b) for a, b in zip(out, few)]
        assert sum(changed) >= len(few) - 1
        for a, b in zip(out, few):
            np.testing.assert_array_equal(np.sort(a, axis=None), np.sort(b, axis=None))


def test_clips_instead_of_wrapping():
    white = np.full((4, 96, 96, 3), 255, dtype=np.uint8)
    for name in ("gaussian_noise", "brightness", "contrast", "gamma"):
        out = corrupt.apply(white, name, 5, np.random.default_rng(0))
        assert out.mean() > 150, name  # wraparound would turn over-white pixels nearly black


def test_works_on_non_square_images(few):
    strip = few[:4, :64, :80]
    for name in NAMES:
        out = corrupt.apply(strip, name, 3, np.random.default_rng(0))
        assert out.shape == strip.shape and out.dtype == np.uint8


def test_apply_rejects_bad_arguments(few):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt.apply(few, "fog", 1, rng)
    with pytest.raises(ValueError, match="severity"):
        corrupt.apply(few, "jpeg", 6, rng)
    with pytest.raises(ValueError, match="uint8"):
        corrupt.apply(few.astype(np.float32), "jpeg", 1, rng)


def test_families_cover_every_corruption_once():
    listed = [name for names in corrupt.FAMILIES.values() for name in names]
    assert sorted(listed) == sorted(corrupt.CORRUPTIONS) and len(listed) == len(set(listed))


def test_mix_is_seeded_and_leaves_input_alone(images):
    before = images.copy()
    out, recipes = corrupt.corrupt_mix(images, seed=3)
    again, recipes_again = corrupt.corrupt_mix(images, seed=3)
    other, _ = corrupt.corrupt_mix(images, seed=4)
    np.testing.assert_array_equal(out, again)
    assert recipes == recipes_again
    assert not np.array_equal(out, other)
    np.testing.assert_array_equal(images, before)
    assert out.shape == images.shape and out.dtype == np.uint8


def test_mix_recipes_follow_the_limits(images):
    _, recipes = corrupt.corrupt_mix(images, seed=0, min_k=2, max_k=4, severities=(2, 3))
    assert len(recipes) == len(images)
    for recipe in recipes:
        names = [name for name, _ in recipe]
        assert 2 <= len(recipe) <= 4 and len(set(names)) == len(names)
        assert all(name in corrupt.CORRUPTIONS and severity in (2, 3) for name, severity in recipe)


def test_mix_with_zero_corruptions_is_identity(few):
    out, recipes = corrupt.corrupt_mix(few, seed=0, min_k=0, max_k=0)
    np.testing.assert_array_equal(out, few)
    assert recipes == [[] for _ in few]


@pytest.mark.parametrize("family", list(corrupt.FAMILIES))
def test_apply_family_is_seeded(few, family):
    out = corrupt.apply_family(few, family, 3, seed=1)
    np.testing.assert_array_equal(out, corrupt.apply_family(few, family, 3, seed=1))
    np.testing.assert_array_equal(corrupt.apply_family(few, family, 0, seed=1), few)
    assert out.shape == few.shape and out.dtype == np.uint8
    assert not np.array_equal(out, few)


def test_apply_family_rejects_unknown_family(few):
    with pytest.raises(ValueError, match="unknown family"):
        corrupt.apply_family(few, "weather", 1)


def test_cli_round_trip(tmp_path, few, capsys):
    labels = np.arange(len(few), dtype=np.uint8).reshape(-1, 1)
    source, target = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(source, images=few, labels=labels)
    corrupt.main([str(source), str(target), "--seed", "5", "--max-k", "2"])
    with np.load(target, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["labels"], labels)
        np.testing.assert_array_equal(data["images"], corrupt.corrupt_mix(few, seed=5, max_k=2)[0])
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("corrupt: wrote 16 images") and "\n" not in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "out.npz"]  # no temp file left


def test_cli_without_labels(tmp_path, few):
    source, target = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(source, images=few[:4])
    corrupt.main([str(source), str(target)])
    with np.load(target, allow_pickle=False) as data:
        assert data.files == ["images"]


@pytest.mark.parametrize("arrays, message", [
    ({"labels": np.zeros(4, dtype=np.uint8)}, "no 'images' key"),
    ({"images": np.zeros((4, 96, 96, 3), dtype=np.float32)}, "need uint8"),
    ({"images": np.zeros((96, 96, 3), dtype=np.uint8)}, "need uint8"),
])
def test_cli_rejects_bad_input(tmp_path, capsys, arrays, message):
    source = tmp_path / "in.npz"
    np.savez(source, **arrays)
    with pytest.raises(SystemExit) as exit_info:
        corrupt.main([str(source), str(tmp_path / "out.npz")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()


def test_module_cli_reports_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.corrupt", str(tmp_path / "nope.npz"), str(tmp_path / "out.npz")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert "nope.npz not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1
