"""Loading, validation, cleaning and splitting of training_set.npz files."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from trainer import data, plots
from trainer.data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


# ---- loading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["n1", "n", "onehot"])
def test_each_label_layout_loads(tmp_path, real_slice, layout):
    images, labels = real_slice[0][:40], real_slice[1][:40]
    stored = {"n1": labels[:, None].astype(np.uint8), "n": labels.astype(np.int32),
              "onehot": np.eye(8, dtype=np.float32)[labels]}[layout]
    x, y = data.load_npz(write_npz(tmp_path / "t.npz", images=images, labels=stored))
    assert x.shape == (40, 96, 96, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("garbage", "not a readable .npz"),
    ("no_labels", "lacks key"),
    ("small_images", "64x64, expected 96x96"),
    ("gray", "expected (N,96,96,3)"),
    ("label_range", "expected integers 0-7"),
    ("count_mismatch", "must match"),
    ("pickled", "not a readable .npz"),
])
def test_broken_files_give_one_clear_error(tmp_path, real_slice, case, message):
    images, labels = real_slice[0][:10], real_slice[1][:10]
    path = str(tmp_path / "bad.npz")
    if case == "garbage":
        open(path, "wb").write(b"this is not a zip file")
    elif case == "no_labels":
        write_npz(path, images=images)
    elif case == "small_images":
        write_npz(path, images=images[:, :64, :64], labels=labels)
    elif case == "gray":
        write_npz(path, images=images[..., 0], labels=labels)
    elif case == "label_range":
        write_npz(path, images=images, labels=labels + 5)
    elif case == "count_mismatch":
        write_npz(path, images=images, labels=labels[:7])
    elif case == "pickled":
        np.savez(path, images=np.array([images[0], "x"], dtype=object), labels=labels[:2])
    with pytest.raises(DataError, match=None) as err:
        data.load_npz(path if case != "missing" else str(tmp_path / "nope.npz"))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_resize_on_request(tmp_path, real_slice):
    path = write_npz(tmp_path / "s.npz", images=real_slice[0][:4, :64, :64], labels=real_slice[1][:4])
    x, _ = data.load_npz(path, resize=True)
    assert x.shape == (4, 96, 96, 3) and x.dtype == np.uint8


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--profile", "smoke", "--data", str(bad),
                           "--runs-dir", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not a readable .npz" in proc.stderr


# ---- cleaning ----------------------------------------------------------------------------------------

def test_cleaning_finds_planted_junk_anywhere(real_slice):
    images, labels = real_slice[0][:300].copy(), real_slice[1][:300].copy()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    grass = np.zeros((96, 96, 3), np.uint8)
    grass[..., 1] = np.linspace(60, 200, 96, dtype=np.uint8)[:, None]  # a green photo-like gradient
    images[17], images[203] = noise, grass
    repeated = rng.choice(np.setdiff1d(np.arange(300), [17, 203]), 12, replace=False)
    images[repeated] = images[5]                    # a copy that appears very often, random labels
    labels[repeated] = rng.integers(0, 8, 12)
    images[250], labels[250] = images[251], labels[251]          # plain duplicate: keep one
    images[260], labels[260] = images[261], (labels[261] + 1) % 8  # copies disagree: drop both
    keep, report = data.clean(images, labels)
    kept = set(keep.tolist())
    assert 17 not in kept and 203 not in kept
    assert report.removed_not_a_smear == 2
    assert not kept & set(repeated.tolist())
    assert (250 in kept) != (251 in kept)
    assert 260 not in kept and 261 not in kept
    assert report.removed_conflicting == 2 and report.removed_duplicate == 1
    assert report.rare_colour_max_kept < report.rare_colour_threshold
    assert report.kept == len(keep) == 300 - 2 - len(set(repeated.tolist()) | {5}) - 1 - 2


def test_rare_colour_share_follows_its_definition(real_slice):
    """Each image's share of pixels whose 16-level colour makes up under floor of the other images' pixels."""
    images = real_slice[0][:40].copy()
    images[3, :30] = (0, 255, 0)  # a green band: a colour no smear has
    images[9] = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    floor = 1e-3
    codes = [(img // 16).reshape(-1, 3) @ np.array([256, 16, 1]) for img in images]
    counts = [np.bincount(c, minlength=4096) for c in codes]
    shares = data.rare_colour_share(images, floor=floor, chunk=7)  # chunks that do not divide the images
    total = sum(counts)
    for i in range(len(images)):
        others = total - counts[i]
        rare = others / others.sum() < floor
        assert shares[i] == pytest.approx(rare[codes[i]].mean(), abs=1e-12)
    assert shares[3] >= 30 / 96 and shares[9] > 0.5 and np.median(shares) < 0.05
    subset = np.array([0, 3, 9, 12, 13, 20, 31, 39])  # read in place: the same shares as a copy of those images
    np.testing.assert_array_equal(data.rare_colour_share(images, floor=floor, chunk=3, subset=subset),
                                  data.rare_colour_share(images[subset], floor=floor, chunk=3))


def test_cleaning_the_real_file(data_path, tmp_path):
    images, labels = data.load_npz(data_path)
    keep, report = data.clean(images, labels)
    # The shared file: 10,418 cells of which 8 repeat once, then 1,800 junk copies at the end.
    assert report.removed_repeated == 1800
    assert report.removed_duplicate + report.removed_conflicting >= 8
    assert report.kept >= 10400
    assert keep.max() < len(images) - 1800 + 1
    sheet = tmp_path / "removed.png"
    plots.removed_sheet(images, labels, report, str(sheet))
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- splits and balance ------------------------------------------------------------------------------

def test_split_is_stratified_disjoint_and_reproducible(real_slice):
    labels = real_slice[1]
    train, val, test = data.train_val_test(labels, 0.1, 0.1, seed=3)
    assert len(np.intersect1d(train, val)) == len(np.intersect1d(train, test)) == len(np.intersect1d(val, test)) == 0
    assert len(train) + len(val) + len(test) == len(labels)
    for c in np.unique(labels):
        n = (labels == c).sum()
        assert abs((labels[val] == c).sum() - 0.1 * n) <= 1
        assert abs((labels[test] == c).sum() - 0.1 * n) <= 1
    again = data.train_val_test(labels, 0.1, 0.1, seed=3)
    other = data.train_val_test(labels, 0.1, 0.1, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    assert not np.array_equal(val, other[1])


def test_no_test_split_joins_test_into_train(real_slice):
    labels = real_slice[1]
    train, val, test = data.train_val_test(labels, 0.1, 0.1, seed=3, no_test_split=True)
    assert len(test) == 0 and len(train) + len(val) == len(labels)


def test_kfold_val_parts_cover_every_index_once(real_slice):
    labels = real_slice[1]
    folds = data.kfold(labels, 5, seed=0)
    vals = np.concatenate([v for _, v in folds])
    assert np.array_equal(np.sort(vals), np.arange(len(labels)))
    for tr, va in folds:
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    with pytest.raises(ValueError):
        data.kfold(labels, 1, 0)


def test_class_balance_options(real_slice):
    labels = real_slice[1]
    idx = np.arange(len(labels))
    balanced = data.oversample(idx, labels, seed=0)
    counts = np.bincount(labels[balanced], minlength=8)
    present = np.bincount(labels, minlength=8) > 0
    assert len(set(counts[present].tolist())) == 1
    weights = data.class_weights(labels)
    counts = np.bincount(labels, minlength=8)
    rare, common = int(np.argmin(np.where(present, counts, 10**9))), int(np.argmax(counts))
    assert weights[rare] > weights[common]
