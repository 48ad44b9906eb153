"""The MedMNIST-C bloodmnist corruptions: each behaves as published, scoring holds every figure, training never
reaches them."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from test_heldout import CONFIGS, TRAINING, op_function, reach

from trainer import heldout, medmnist_c, medmnist_c_eval
from trainer.config import CLASS_NAMES, Config, make_config
from trainer.evaluate import models_by_views

DETERMINISTIC = ("pixelate", "jpeg_compression", "defocus_blur", "brightness_up", "brightness_down", "contrast_up",
                 "contrast_down", "saturate")
RANDOM = ("motion_blur", "stain_deposit", "bubble")


@pytest.fixture(scope="module")
def inks():
    """The package's inks when they can be found (make setup installs medmnistc), else stand-ins of the same
    shapes: irregular blobs covering about 60% of their square, as the real ones do. The stand-ins test our code,
    not the masks; docs/medmnist_c_check.py compares against the package itself."""
    try:
        return medmnist_c.load_inks()
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        made = {}
        for key, side in (("3", 24), ("4", 32)):
            ys, xs = np.mgrid[0:side, 0:side] - (side - 1) / 2
            angle = np.arctan2(ys, xs)
            edge = side / 2.4 * (1 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6, (10, 1, 1))))
            made[key] = np.hypot(ys, xs)[None] < edge
        return made


@pytest.fixture(scope="module")
def cells(real_slice):
    return real_slice[0][:64], real_slice[1][:64]


def change(images, out) -> float:
    return float(np.abs(out.astype(np.float64) - images).mean())


# ---- each corruption ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", medmnist_c.KINDS)
def test_every_severity_keeps_shape_dtype_and_input(cells, inks, kind):
    images = cells[0][:16]
    before = images.copy()
    for severity in range(6):
        out = medmnist_c.apply(images, kind, severity, np.random.default_rng(0), inks)
        assert out.shape == images.shape and out.dtype == np.uint8 and out is not images
        if severity:
            assert all(not np.array_equal(a, b) for a, b in zip(out, images)), f"{kind} {severity} left a cell as is"
    np.testing.assert_array_equal(images, before)
    np.testing.assert_array_equal(medmnist_c.apply(images, kind, 0, np.random.default_rng(0), inks), images)


@pytest.mark.parametrize("kind", medmnist_c.KINDS)
def test_heavier_severity_changes_more(cells, inks, kind):
    """Mean absolute change from the clean cell grows with severity. One seed for every severity, so a random kind
    draws alike at each and only its parameters differ. Stain deposit's severities 3 and 4 are the same corruption
    in the package (3 marks at most, the 24 px inks), so they come out equal."""
    images = cells[0]
    changes = [change(images, medmnist_c.apply(images, kind, s, np.random.default_rng(1), inks)) for s in range(1, 6)]
    if kind == "stain_deposit":
        assert changes[2] == changes[3], changes
        changes = changes[:3] + changes[4:]
    assert all(a < b for a, b in zip(changes, changes[1:])), (kind, changes)


@pytest.mark.parametrize("kind", medmnist_c.KINDS)
def test_seeded(cells, inks, kind):
    images = cells[0][:16]

    def run(seed):
        return medmnist_c.apply(images, kind, 3, np.random.default_rng(seed), inks)
    np.testing.assert_array_equal(run(7), run(7))
    assert np.array_equal(run(7), run(8)) == (kind in DETERMINISTIC), "only the random kinds depend on the seed"


def test_parameters_are_the_packages_bloodmnist_entry():
    """Transcribed from medmnistc 0.1.0's registry (docs/robustness.md); a typo here would pass every other test."""
    assert medmnist_c.KINDS == DETERMINISTIC[:3] + ("motion_blur",) + DETERMINISTIC[3:] + RANDOM[1:]
    assert medmnist_c.PIXELATE_FACTOR == (0.6, 0.5, 0.4, 0.3, 0.25)
    assert medmnist_c.JPEG_QUALITY == (50, 30, 15, 10, 7)
    assert medmnist_c.DEFOCUS == ((2, 0.01), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1))
    assert medmnist_c.MOTION == ((3, 3), (5, 5), (10, 5), (10, 7), (10, 9))
    assert medmnist_c.BRIGHTNESS_UP == (1.1, 1.2, 1.3, 1.35, 1.4)
    assert medmnist_c.BRIGHTNESS_DOWN == medmnist_c.CONTRAST_DOWN == (0.9, 0.8, 0.7, 0.6, 0.5)
    assert medmnist_c.CONTRAST_UP == (1.1, 1.15, 1.2, 1.25, 1.3)
    assert medmnist_c.SATURATE == (0.05, 0.10, 0.15, 0.17, 0.20)
    assert medmnist_c.STAIN_MARKS == (1, 2, 3, 3, 3) and medmnist_c.STAIN_INK_SET == ("3", "3", "3", "3", "4")
    assert medmnist_c.BUBBLE == ((5, 10), (7, 10), (10, 10), (12, 12), (15, 12))


def test_deterministic_kinds_match_hand_computed_pixels():
    """A few pixels worked out from the definitions: Pillow's blend truncates; contrast pivots on the rounded
    mean grey; saturation adds in HSV; the box filter averages."""
    image = np.array([[[200, 100, 50], [10, 20, 30]], [[255, 255, 255], [0, 0, 0]]], np.uint8)[None]
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(medmnist_c.apply(image, "brightness_down", 2, rng)[0, 0, 0], [160, 80, 40])
    np.testing.assert_array_equal(medmnist_c.apply(image, "brightness_up", 5, rng)[0, 0, 0], [255, 140, 70])
    # grey (0.299 R + 0.587 G + 0.114 B): 124, 18, 255, 0; mean 99.25 -> 99; 99 + 0.5 (200 - 99) = 149.5 -> 149
    np.testing.assert_array_equal(medmnist_c.apply(image, "contrast_down", 5, rng)[0, 0, 0], [149, 99, 74])
    # (200, 100, 50): S = 0.75 -> 0.95, V and H kept: min = 200 (1 - 0.95) = 10, mid 10 + 190 * 50 / 150
    np.testing.assert_array_equal(medmnist_c.apply(image, "saturate", 5, rng)[0, 0, 0], [200, 73, 10])
    flat = np.full((1, 96, 96, 3), 77, np.uint8)
    for kind in ("pixelate", "motion_blur"):  # a flat image stays flat under a blur
        assert (medmnist_c.apply(flat, kind, 5, rng) == 77).all(), kind
    # ... except the package's defocus: its float32 disk sums to just under 1 at severities 2, 3 and 5, and the
    # result is truncated, so flat areas lose one level there (as the package's own output does).
    assert [np.unique(medmnist_c.apply(flat, "defocus_blur", s, rng)).tolist() for s in range(1, 6)] == \
        [[77], [76], [76], [77], [76]]


def test_bad_input_names_the_problem_and_the_fix(cells):
    images = cells[0][:2]
    rng = np.random.default_rng(0)
    for bad, message in ((images.astype(np.float32), "images are float32; pass uint8 pixels 0-255"),
                         (images[0], r"one image; pass a batch \(N, H, W, 3\), e.g. image\[None\]"),
                         (images[..., :2], r"pass RGB batches shaped \(N, H, W, 3\)")):
        with pytest.raises(ValueError, match=message):
            medmnist_c.apply(bad, "pixelate", 1, rng)
    for severity in (6, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="severity must be an integer 1-5"):
            medmnist_c.apply(images, "pixelate", severity, rng)
    with pytest.raises(ValueError, match="unknown MedMNIST-C corruption 'gaussian_noise'; choose from pixelate"):
        medmnist_c.apply(images, "gaussian_noise", 1, rng)
    small = images[:, :40, :40]
    with pytest.raises(ValueError, match="stain deposit at severity 5 needs images of at least 52 px"):
        medmnist_c.apply(small, "stain_deposit", 5, rng, {"4": np.ones((10, 32, 32), bool)})
    with pytest.raises(ValueError, match="bubble at severity 5 needs images of at least 30 px"):
        medmnist_c.apply(small[:, :20, :20], "bubble", 5, rng)


def test_missing_or_broken_inks_say_how_to_get_them(tmp_path, monkeypatch, cells):
    monkeypatch.setenv(medmnist_c.INKS_ENV, str(tmp_path / "nowhere.npz"))
    with pytest.raises(FileNotFoundError, match="nowhere.npz does not exist; .*pip install --no-deps medmnistc"):
        medmnist_c.apply(cells[0][:2], "stain_deposit", 1, np.random.default_rng(0))
    broken = tmp_path / "inks.npz"
    broken.write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz archive"):
        medmnist_c.load_inks(str(broken))
    np.savez(broken, other=np.zeros(3))
    with pytest.raises(ValueError, match=r"no ink set\(s\) \['3', '4'\]"):
        medmnist_c.load_inks(str(broken))


# ---- seen or unseen -------------------------------------------------------------------------------------

def test_seen_follows_the_declared_split():
    """Seen: training draws the same operation. The rule reads heldout.SEEN_IN_TRAINING, so moving a kind across
    the declared split moves it here too."""
    assert medmnist_c.UNSEEN == ("defocus_blur", "motion_blur")
    for kind in medmnist_c.KINDS:
        suite = medmnist_c.SUITE_KIND[kind]
        if medmnist_c.SPLIT[kind] == "seen":
            assert suite in heldout.SEEN_IN_TRAINING or kind in medmnist_c.NEAREST_OPTION, kind
        else:
            assert suite is None or suite in heldout.HELD_OUT, kind
    # Gaussian blur trains, and defocus is not it: a disk is a different operation, so defocus stays unseen.
    assert "gaussian_blur" in heldout.SEEN_IN_TRAINING and medmnist_c.SPLIT["defocus_blur"] == "unseen"
    # Stain deposit counts as seen only because erasing can draw ragged blots: without that shape it is unseen.
    shapes = {f.name: f for f in dataclasses.fields(Config)}["erase_shape"].metadata["choices"]
    assert medmnist_c.SPLIT["stain_deposit"] == "seen" and "blot" in shapes
    # Bubble's translucent blend is what --veil draws: seen since the cpu profile trains with it, unseen for
    # profiles that all leave it off.
    from trainer.config import PROFILES
    assert medmnist_c.SPLIT["bubble"] == "seen" and PROFILES["cpu"]["veil"] > 0
    bare = {name: {**settings, "veil": 0.0} for name, settings in PROFILES.items()}
    assert medmnist_c.split_of("bubble", bare) == "unseen" and medmnist_c.split_of("defocus_blur", bare) == "unseen"


def test_a_run_trained_with_the_nearest_option_counts_that_kind_seen(monkeypatch):
    """split_for reads one run's settings beside the profiles: with no profile on --veil, a run made with it counts
    bubble seen for that run only, off changes nothing, and no setting moves a kind the kit counts as seen back to
    unseen."""
    from trainer.config import PROFILES
    assert medmnist_c.split_for(None) == medmnist_c.SPLIT
    assert medmnist_c.split_for(make_config("cpu").to_dict()) == medmnist_c.SPLIT
    monkeypatch.setattr(medmnist_c, "PROFILES", {name: {**s, "veil": 0.0} for name, s in PROFILES.items()})
    kit = medmnist_c.split_for(None)
    assert kit["bubble"] == "unseen" and medmnist_c.split_for(make_config("cpu", veil=0.0).to_dict()) == kit
    veiled = medmnist_c.split_for(make_config("cpu", veil=0.5).to_dict())
    assert veiled["bubble"] == "seen"
    assert {k: v for k, v in veiled.items() if k != "bubble"} == {k: v for k, v in kit.items() if k != "bubble"}
    bare = medmnist_c.split_for({name: 0 for name in make_config("cpu").to_dict()})
    assert all(bare[kind] == "seen" for kind in medmnist_c.KINDS if kit[kind] == "seen")


def test_training_never_reaches_medmnist_c():
    """As the held-out rule (tests/test_heldout.py): no training op is or calls a MedMNIST-C corruption, its helpers
    or its tables, and fit and the tf.data pipeline reach nothing of trainer/medmnist_c.py or its scoring."""
    ours = set()
    for function in medmnist_c.CORRUPTIONS.values():
        ours |= reach((function.__module__, function.__name__))
    assert ("trainer.medmnist_c", "_motion_blur") in ours and ("trainer.medmnist_c", "MOTION") in ours
    assert ("trainer.medmnist_c", "_stain") in reach(("trainer.medmnist_c_eval", "score"))  # the walk sees in
    assert not TRAINING & ours, sorted(TRAINING & ours)
    assert not [d for d in TRAINING if d[0] in ("trainer.medmnist_c", "trainer.medmnist_c_eval")]
    codes = {f.__code__ for f in medmnist_c.CORRUPTIONS.values()}
    from trainer import augment
    for cfg in CONFIGS.values():
        for op in map(op_function, augment.corruption_ops(cfg)):
            assert op.__code__ not in codes and op.__module__ != "trainer.medmnist_c", op.__name__


# ---- scoring --------------------------------------------------------------------------------------------

def memoriser(images, labels):
    """Knows every clean image by heart, answers class 0 otherwise: a figure read off a clean image shows."""
    known = {image.tobytes(): label for image, label in zip(images, labels)}
    return lambda batch: np.array([known.get(image.tobytes(), 0) for image in batch])


def test_score_reads_every_figure_off_corrupted_copies(cells, inks):
    images, labels = cells[0][:20], cells[1][:20]
    base = float((labels == 0).mean())
    result = medmnist_c_eval.score(memoriser(images, labels), images, labels, seed=3, max_images=20, inks=inks)
    assert result["clean"] == 1.0 and result["images"] == 20 and result["seed"] == 3 and not result["skipped"]
    assert list(result["per_corruption"]) == list(medmnist_c.KINDS)
    for kind, row in result["per_corruption"].items():
        assert row["split"] == medmnist_c.SPLIT[kind]
        assert list(row["severities"]) == ["1", "2", "3", "4", "5"]
        # four images per severity; each cell is the share of class 0 among its own four
        severities = medmnist_c_eval.severities_for(20, medmnist_c.KINDS.index(kind))
        for s, value in row["severities"].items():
            assert value == pytest.approx((labels[severities == int(s)] == 0).mean()), (kind, s)
        assert row["accuracy"] == pytest.approx(np.mean(list(row["severities"].values())))
    kinds = result["per_corruption"]
    assert result["overall"] == pytest.approx(base)  # every kind sees all 20 images once
    assert result["unseen"] == pytest.approx(np.mean([kinds[k]["accuracy"] for k in medmnist_c.UNSEEN]))
    for s in "12345":
        assert result["per_severity"][s] == pytest.approx(np.mean([r["severities"][s] for r in kinds.values()]))
    # A run's own split moves its means: bubble seen, the unseen mean is defocus and motion blur alone.
    veiled = medmnist_c_eval.score(memoriser(images, labels), images, labels, seed=3, max_images=20, inks=inks,
                                   split=medmnist_c.split_for({"veil": 0.5}))
    assert veiled["per_corruption"]["bubble"]["split"] == "seen"
    assert veiled["unseen"] == pytest.approx(np.mean([kinds[k]["accuracy"] for k in ("defocus_blur", "motion_blur")]))
    assert veiled["seen"] == pytest.approx(np.mean([kinds[k]["accuracy"] for k in medmnist_c.KINDS
                                                    if k not in ("defocus_blur", "motion_blur")]))
    again = medmnist_c_eval.score(memoriser(images, labels), images, labels, seed=3, max_images=10, inks=inks)
    assert again["images"] == 10
    table = medmnist_c_eval.table(result)
    assert all(kind in table for kind in medmnist_c.KINDS) and "unseen kinds" in table


def test_each_kind_names_what_it_turned_right_cells_into(cells, inks):
    """The model knows the clean cells but for one class it already gets wrong, and answers class 0 on every
    corrupted cell: each kind turned exactly the cells of the other classes into class 0 (the misread class was
    wrong clean, so it is no new error), and the pairs, counts and order follow from the labels alone."""
    images, labels = cells[0][:20], cells[1][:20]
    misread = np.bincount(labels[labels != 0]).argmax()
    known = {image.tobytes(): (0 if label == misread else label) for image, label in zip(images, labels)}
    model = lambda batch: np.array([known.get(image.tobytes(), 0) for image in batch])  # noqa: E731
    result = medmnist_c_eval.score(model, images, labels, seed=3, max_images=20, inks=inks)
    classes, counts = np.unique(labels[(labels != 0) & (labels != misread)], return_counts=True)
    expected = [{"from": CLASS_NAMES[c], "to": CLASS_NAMES[0], "images": int(n)}
                for c, n in sorted(zip(classes, counts), key=lambda pair: -pair[1])[:3]]
    assert expected, "the slice needs cells outside class 0"
    for kind, row in result["per_corruption"].items():
        assert row["turned_into"] == expected, kind
    first = f"{expected[0]['from']} -> {CLASS_NAMES[0]} ({expected[0]['images']})"
    assert medmnist_c_eval.table(result).count(first) == len(medmnist_c.KINDS)
    # a model right on every copy (the copies keep the images' order) turned nothing, and the table says so
    perfect = medmnist_c_eval.score(lambda batch: labels[:len(batch)], images, labels, seed=3, max_images=20,
                                    inks=inks)
    assert perfect["overall"] == 1.0
    assert all(row["turned_into"] == [] for row in perfect["per_corruption"].values())
    assert medmnist_c_eval.first_turn(perfect["per_corruption"]["bubble"]) == "-"


def test_every_kind_sees_every_severity_on_a_fifth_of_the_images():
    for k in range(len(medmnist_c.KINDS)):
        severities = medmnist_c_eval.severities_for(500, k)
        assert all((severities == s).sum() == 100 for s in range(1, 6))
    image_meets = np.stack([medmnist_c_eval.severities_for(500, k) for k in range(len(medmnist_c.KINDS))], 1)
    assert all(set(row) == {1, 2, 3, 4, 5} for row in image_meets)


def test_score_without_inks_skips_stain_deposit_and_says_why(cells, monkeypatch, tmp_path):
    monkeypatch.setenv(medmnist_c.INKS_ENV, str(tmp_path / "missing.npz"))
    images, labels = cells[0][:10], cells[1][:10]
    result = medmnist_c_eval.score(memoriser(images, labels), images, labels, seed=0, max_images=10)
    assert "stain_deposit" not in result["per_corruption"] and len(result["per_corruption"]) == 10
    assert "pip install --no-deps medmnistc" in result["skipped"]["stain_deposit"]
    assert result["unseen"] == pytest.approx(np.mean([result["per_corruption"][k]["accuracy"]
                                                      for k in ("defocus_blur", "motion_blur", "bubble")]))
    assert "stain_deposit: skipped" in medmnist_c_eval.table(result)


def test_exported_model_scores_as_a_predict_function_does(submission_dir, cells, inks, tmp_path, capsys):
    """evaluate --medmnist-c (an exported model through model.py) and the runs' score() agree on the same images
    and seed: one design, two doors."""
    images, labels = cells[0][:10], cells[1][:10]
    rows = medmnist_c_eval.evaluate_exported(str(submission_dir), images, labels, (1,), seed=5)
    for _, model in models_by_views(str(submission_dir), [1], "medmnist_c_test"):
        direct = medmnist_c_eval.score(model.predict, images, labels, seed=5, max_images=10)
    for key in ("overall", "unseen", "seen", "clean", "per_severity", "per_corruption", "skipped", "images"):
        assert rows[0][key] == direct[key], key
    assert rows[0]["split_from"].startswith("the kit's")  # a submission folder has no config.json
    # A run folder carries the config it trained with: a --veil run's bubble row is seen there.
    run = tmp_path / "veil-run"
    run.mkdir()
    for name in ("model.onnx", "settings.json"):
        shutil.copy(submission_dir / name, run / name)
    (run / "config.json").write_text(json.dumps(make_config("smoke", veil=0.5).to_dict()))
    from_run = medmnist_c_eval.evaluate_exported(str(run), images, labels, (1,), seed=5)[0]
    assert from_run["per_corruption"]["bubble"]["split"] == "seen" and from_run["split_from"].startswith("the run's")
    assert from_run["overall"] == pytest.approx(rows[0]["overall"])
    assert "seen and unseen: the run's training" in medmnist_c_eval.table(from_run)
    (run / "config.json").write_text('{"veil": 0.5')  # cut off mid-write: not the run's split, and it says so
    assert medmnist_c_eval.run_split(str(run)) == (medmnist_c.SPLIT, "the kit's (no readable config.json beside "
                                                                     "the model)")
    data = tmp_path / "cells.npz"
    np.savez(data, images=images, labels=labels)
    from trainer.__main__ import main
    out = tmp_path / "mmc.json"
    assert main(["evaluate", "--model", str(submission_dir), "--data", str(data), "--medmnist-c", "--views", "1",
                 "--seed", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MedMNIST-C" in printed and "unseen kinds" in printed
    assert json.loads(out.read_text())["rows"][0]["overall"] == pytest.approx(rows[0]["overall"])
    for extra, message in ((["--heldout"], "drop --corrupt, --heldout and --per-corruption"),
                           (["--max-images", "0"], "--max-images takes a number of images")):
        assert main(["evaluate", "--model", str(submission_dir), "--data", str(data), "--medmnist-c", *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--model", str(submission_dir), "--data", str(data), "--max-images", "5"]) == 2
    assert "add --medmnist-c" in capsys.readouterr().err
