"""Every augmentation stage keeps shape, dtype and range, and really changes images."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer import augment, plots
from trainer.config import make_config

OFF = dict(flip=False, rot90=False, rotation=0.0, zoom=0.0, shift=0.0, shear=0.0, black_fill=0.0, randaugment=False,
           contrast=0.0, brightness=0.0, saturation=0.0, hue=0.0, noise_std=0.0, blur=0.0, erase=0.0, corrupt=0.0,
           veil=0.0)


def changed_share(before: np.ndarray, after: np.ndarray) -> float:
    diff = np.abs(after.astype(np.float32) - before.astype(np.float32)).reshape(len(before), -1).max(1)
    return float((diff > 1.0).mean())


def check_range(out: np.ndarray, n: int) -> None:
    assert out.shape == (n, 96, 96, 3)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0


@pytest.fixture(scope="module")
def batch(real_slice):
    return real_slice[0][:48]


@pytest.mark.parametrize("stage, share", [
    (dict(flip=True, rot90=True), 0.4),
    (dict(rotation=0.5, zoom=0.1, shift=0.1), 0.4),
    (dict(contrast=0.3), 0.4),
    (dict(brightness=0.2), 0.4),
    (dict(saturation=0.8), 0.4),
    (dict(hue=0.1), 0.4),
    (dict(noise_std=8.0), 0.4),
    (dict(blur=1.5), 0.2),  # half the images, by design
    (dict(erase=1.0), 0.4),
    (dict(shear=0.3), 0.4),
    (dict(zoom=0.6, black_fill=1.0), 0.4),
    (dict(corrupt=1.0), 0.9),
    (dict(pixmix=1.0), 0.9),
    (dict(randconv=1.0), 0.9),
    (dict(augmix=1.0), 0.8),
    (dict(apr=1.0), 0.8),
    (dict(patch_gaussian=60.0), 0.8),  # a patch's std or side may be drawn near zero
    (dict(veil=1.0), 0.8),  # an opacity may be drawn near zero
])
def test_each_stage_keeps_range_and_changes_images(batch, stage, share):
    cfg = make_config("cpu", **{**OFF, **stage})
    out = augment.augment_batch(tf.constant(batch, tf.float32), cfg).numpy()
    check_range(out, len(batch))
    assert changed_share(batch, out) > share, f"{stage} changed too few images"


def dihedral_views(image: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of a square image: the 4 turns, then the 4 turns of its mirror."""
    return [np.rot90(image, k) for k in range(4)] + [np.rot90(image[:, ::-1], k) for k in range(4)]


@pytest.mark.parametrize("flip, rot90, expected", [
    (True, True, set(range(8))),  # all 8 symmetries
    (False, True, {0, 1, 2, 3}),  # the 4 turns, no mirror
    (True, False, {0, 4}),        # identity and the left-right mirror
])
def test_flips_and_turns_are_exact_symmetries_drawn_evenly(batch, flip, rot90, expected):
    """Folded into the warp, flips and turns give each image one of its symmetries exactly, each equally often."""
    cfg = make_config("cpu", **{**OFF, "flip": flip, "rot90": rot90})
    tf.random.set_seed(1)
    images = np.repeat(batch[:4], 64, axis=0).astype(np.float32)
    out = augment.geometry(tf.constant(images), cfg).numpy()
    counts = dict.fromkeys(range(8), 0)
    for image, view in zip(images, out):
        matches = [k for k, v in enumerate(dihedral_views(image)) if np.abs(v - view).max() < 1e-3]
        assert matches, "a flipped or turned image is not one of its symmetries"
        counts[matches[0]] += 1
    assert {k for k, c in counts.items() if c} == expected
    for k in expected:  # 256 draws: each symmetry near its even share
        assert counts[k] > 0.5 * len(images) / len(expected), counts


def mirrored_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(np.ceil(2 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image.astype(np.float64), [(radius, radius), (radius, radius), (0, 0)], mode="reflect")
    out = np.apply_along_axis(lambda v: np.convolve(v, taps, "valid"), 0, padded)
    return np.apply_along_axis(lambda v: np.convolve(v, taps, "valid"), 1, out)


def test_blur_matrix_equals_a_mirrored_border_convolution(batch):
    image = batch[0].astype(np.float64)
    matrix = augment.reflect_blur_matrix(96, 1.5).numpy().astype(np.float64)
    np.testing.assert_allclose(np.einsum("ij,jkc->ikc", matrix, np.einsum("kl,ilc->ikc", matrix, image)),
                               mirrored_blur(image, 1.5), atol=1e-3)


def test_blur_stage_blends_each_image_with_its_mirrored_border_blur(batch):
    """Each output is the image plus a share in [0, 1] of the way to its blur; about half the images get some."""
    cfg = make_config("cpu", **{**OFF, "blur": 1.5})
    images = batch[:16].astype(np.float32)
    out = augment.blur(tf.constant(images), cfg).numpy()
    blurred = np.stack([mirrored_blur(image, 1.5) for image in images])
    for image, result, target in zip(images, out, blurred):
        step, change = (target - image).ravel(), (result - image).ravel()
        share = float(step @ change / (step @ step))
        assert -1e-3 <= share <= 1 + 1e-3
        np.testing.assert_allclose(change, share * step, atol=0.05)


def test_pipeline_takes_fewer_images_than_a_batch(real_slice):
    """A last short batch has no static batch size; every stage must still know the image size."""
    cfg = make_config("cpu", batch_size=32, randaugment=True)  # every stage: RandAugment is the gpu profile's
    x, _ = next(iter(augment.train_dataset(real_slice[0][:20], real_slice[1][:20], cfg, repeat=False)))
    check_range(x.numpy(), 20)


def test_randaugment_really_changes_images_inside_tf_data(batch):
    """keras-cv's RandAugment, mapped over a tf.data pipeline as the trainer runs it."""
    cfg = make_config("cpu", **{**OFF, "randaugment": True, "randaugment_rate": 1.0})
    layer = augment.make_randaugment(cfg)
    ds = tf.data.Dataset.from_tensor_slices(batch).batch(16).map(
        lambda x: augment.augment_batch(tf.cast(x, tf.float32), cfg, layer))
    out = np.concatenate([b.numpy() for b in ds])
    check_range(out, len(batch))
    assert changed_share(batch, out) > 0.7


def test_stages_off_change_nothing(batch):
    cfg = make_config("cpu", **OFF)
    out = augment.augment_batch(tf.constant(batch, tf.float32), cfg).numpy()
    np.testing.assert_array_equal(out, batch.astype(np.float32))


@pytest.mark.parametrize("mix", [dict(mixup_alpha=0.4), dict(cutmix_alpha=1.0)])
def test_mixup_and_cutmix_blend_images_and_labels(batch, real_slice, mix):
    cfg = make_config("cpu", **OFF, **mix)
    labels = tf.constant(np.eye(8, dtype=np.float32)[real_slice[1][:len(batch)]])
    tf.random.set_seed(0)
    x, y = augment.mix(tf.constant(batch, tf.float32), labels, cfg)
    check_range(x.numpy(), len(batch))
    np.testing.assert_allclose(y.numpy().sum(1), 1.0, atol=1e-5)
    assert (y.numpy().max(1) < 0.999).mean() > 0.3  # most labels are now soft
    assert changed_share(batch, x.numpy()) > 0.3


def test_train_dataset_batches(real_slice):
    cfg = make_config("smoke", batch_size=16, randaugment=True)
    ds = augment.train_dataset(real_slice[0][:64], real_slice[1][:64], cfg)
    x, y = next(iter(ds))
    assert x.shape == (16, 96, 96, 3) and x.dtype == tf.float32
    assert y.shape == (16, 8)
    assert float(tf.reduce_min(x)) >= 0 and float(tf.reduce_max(x)) <= 255


def first_batches(images, labels, seed: int, n: int = 3, **settings) -> list[np.ndarray]:
    cfg = make_config("cpu", seed=seed, batch_size=16, **settings)
    return [x.numpy() for x, _ in augment.train_dataset(images, labels, cfg).take(n)]


def test_a_seed_repeats_the_augmentation(real_slice):
    """tf.data maps batches in parallel threads; the draws must not depend on which thread runs first."""
    images, labels = real_slice[0][:64], real_slice[1][:64]
    every_stage = dict(mixup_alpha=0.2, cutmix_alpha=1.0, pixmix=0.3, apr=0.3, randconv=0.3,
                       patch_gaussian=0.5, corrupt_jpeg=True, corrupt_blur=2.5, corrupt_zoom=0.6)
    first, again, other = (first_batches(images, labels, seed, **every_stage) for seed in (42, 42, 7))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert all(changed_share(a, b) > 0.5 for a, b in zip(first, other))


def test_each_batch_draws_afresh(real_slice):
    """One cell in every slot: a batch's draws must differ from the batch before's, slot by slot."""
    images = np.repeat(real_slice[0][:1], 64, axis=0)
    batches = first_batches(images, real_slice[1][:64], 42)
    assert all(changed_share(a, b) > 0.9 for a, b in zip(batches, batches[1:]))


def test_train_dataset_shrinks_batches_while_its_size_is_low(real_slice):
    """Low-resolution training: batches come out at the size variable's value, read as they are made; at 96 they
    are the images untouched."""
    images = real_slice[0][:16]
    size = tf.Variable(48, trainable=False, dtype=tf.int32)
    ds = augment.train_dataset(images, real_slice[1][:16], make_config("cpu", **OFF, batch_size=16), size=size)
    small = next(iter(ds))[0].numpy()
    assert small.shape == (16, 48, 48, 3) and small.min() >= 0.0 and small.max() <= 255.0
    # antialiased: each shrunk image keeps its original's mean colour
    np.testing.assert_allclose(np.sort(small.mean((1, 2, 3))), np.sort(images.mean((1, 2, 3))), atol=1.0)
    size.assign(96)
    full = next(iter(ds))[0].numpy()  # a fresh iterator, so no prefetched small batch
    np.testing.assert_array_equal(np.sort(full.sum((1, 2, 3))), np.sort(images.astype(np.float32).sum((1, 2, 3))))


def test_augmentation_grid_png(tmp_path, batch):
    cfg = make_config("cpu")
    samples = augment.augmented_samples(batch, cfg, 8)
    assert samples.dtype == np.uint8 and samples.shape == (8, 96, 96, 3)
    path = tmp_path / "grid.png"
    plots.augmentation_grid(batch[:8], samples, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("op", augment.CORRUPTION_OPS + (augment._jpeg, augment._zoom),
                         ids=lambda op: op.__name__.strip("_"))
def test_each_corruption_op_keeps_shape_and_changes_images(batch, op):
    x = tf.constant(batch, tf.float32)
    out = tf.clip_by_value(op(x, tf.fill([len(batch), 1, 1, 1], 1.0)), 0.0, 255.0).numpy()
    check_range(out, len(batch))
    assert changed_share(batch, out) > 0.9, f"{op.__name__} at full strength left images unchanged"


def test_jpeg_op_matches_the_suites_jpeg_and_is_a_switch(batch):
    """At full strength the training op gives the suite's severity-5 JPEG (quality 7), within encoder rounding."""
    from trainer.corrupt import jpeg
    ours = augment._jpeg(tf.constant(batch, tf.float32), tf.fill([len(batch), 1, 1, 1], 1.0)).numpy()
    suite = jpeg(batch, 5, np.random.default_rng(0)).astype(np.float32)
    assert np.abs(ours - suite).mean() < 0.25 * np.abs(suite - batch).mean()
    assert augment._jpeg not in augment.corruption_ops(make_config("cpu", corrupt_jpeg=False))
    assert augment._jpeg in augment.corruption_ops(make_config("cpu", corrupt_jpeg=True))


def test_zoom_op_scales_by_up_to_its_maximum_and_is_a_switch():
    """At full strength a centred 20-pixel square becomes 20 * 1.6 or 20 / 1.6 wide, as the suite's severity-5 zoom."""
    x = np.full((64, 96, 96, 3), 200.0, np.float32)
    x[:, 38:58, 38:58] = 0.0
    tf.random.set_seed(0)
    out = augment._zoom(tf.constant(x), tf.fill([64, 1, 1, 1], 1.0), max_zoom=0.6).numpy()
    centre = out[:, 20:76, 20:76, 0]  # inside the black border a zoom-out leaves (18 px at 1.6x)
    sides = np.sqrt((centre < 100).sum(axis=(1, 2)))
    assert set(np.round(sides).astype(int)) == {12, 32}  # 12.5 and 32, both directions drawn
    weak = augment._zoom(tf.constant(x), tf.fill([64, 1, 1, 1], 0.5), max_zoom=0.6).numpy()[:, 20:76, 20:76, 0]
    assert np.all(np.abs(np.sqrt((weak < 100).sum(axis=(1, 2))) - 20) < 6)  # half strength: 1.26x at most
    names = lambda cfg: [getattr(op, "func", op) for op in augment.corruption_ops(cfg)]  # noqa: E731
    assert augment._zoom not in names(make_config("cpu", corrupt_zoom=0.0))
    assert augment._zoom in names(make_config("cpu", corrupt_zoom=0.6))


def test_blur_op_matches_the_suites_gaussian_blur_per_image_and_is_a_switch(real_slice):
    """Each image gets its own sigma: strength 1 is the suite's severity 5 (sigma 2.5), 0.72 its severity 4 (1.8)."""
    from trainer.corrupt import gaussian_blur
    batch = real_slice[0][:6]
    strengths = tf.constant([1.0, 0.72, 0.0, 1.0, 0.72, 0.0])[:, None, None, None]
    ours = augment._blur(tf.constant(batch, tf.float32), strengths, max_sigma=2.5).numpy()
    rng = np.random.default_rng(0)
    for rows, severity in (([0, 3], 5), ([1, 4], 4)):
        suite = gaussian_blur(batch[rows], severity, rng).astype(np.float32)
        assert np.abs(ours[rows] - suite).mean() < 0.1 * np.abs(suite - batch[rows]).mean()
    np.testing.assert_allclose(ours[[2, 5]], batch[[2, 5]], atol=1e-3)  # strength 0 leaves the image alone
    names = lambda cfg: [getattr(op, "func", op) for op in augment.corruption_ops(cfg)]  # noqa: E731
    assert augment._blur not in names(make_config("cpu", corrupt_blur=0.0))
    assert augment._blur in names(make_config("cpu", corrupt_blur=2.5))


@pytest.mark.parametrize("switch", [{"corrupt_jpeg": True}, {"corrupt_blur": 2.5}], ids=["jpeg", "blur"])
def test_ops_with_an_empty_pick_pass_through_the_pipeline(real_slice, switch):
    """In tf.data most batches give the JPEG or strong-blur op few or no images; an empty pick must pass through."""
    cfg = make_config("cpu", **{**OFF, "corrupt": 0.05, "corrupt_ops": 1, **switch}, batch_size=4)
    for x, _ in augment.train_dataset(real_slice[0][:64], real_slice[1][:64], cfg).take(16):
        check_range(x.numpy(), 4)


@pytest.mark.parametrize("slot,weight", [("_jpeg", 1.0), ("_jpeg", 3.0), ("_blur", 3.0)])
def test_op_weight_sets_how_often_the_draw_picks_that_op(slot, weight):
    """--corrupt-jpeg-weight w (or --corrupt-blur-weight w): with one op per image, that op's share of the picks is
    w / (w + the other ops); each image still gets exactly one op, and every other op is drawn equally often."""
    field = {"_jpeg": "corrupt_jpeg_weight", "_blur": "corrupt_blur_weight"}[slot]
    weights = {"corrupt_jpeg_weight": 1.0, "corrupt_blur_weight": 1.0, field: weight}  # only this op weighted
    cfg = make_config("cpu", **{**OFF, "corrupt": 1.0, "corrupt_ops": 1}, corrupt_jpeg=True, corrupt_blur=2.5,
                      corrupt_zoom=0.6, **weights)
    slots = [augment.op_name(op) for op in augment.corruption_ops(cfg)]
    tf.random.set_seed(4)
    picks = augment.draw_ops(20000, cfg).numpy()
    np.testing.assert_array_equal(picks.sum(axis=1), 1)
    share = picks.mean(axis=0)
    weighted = slots.index(slot)
    assert abs(share[weighted] - weight / (weight + len(slots) - 1)) < 0.01
    others = np.delete(share, weighted)
    assert others.max() - others.min() < 0.02


def test_corruption_stage_hits_the_chosen_share(batch):
    """corrupt=0.5 changes about half the images and leaves the rest bit-for-bit alone."""
    cfg = make_config("cpu", **{**OFF, "corrupt": 0.5, "corrupt_ops": 2})
    tf.random.set_seed(1)
    images = np.concatenate([batch] * 8)
    out = augment.corrupt_and_damage(tf.constant(images, tf.float32), cfg)[0].numpy()
    check_range(out, len(images))
    assert 0.35 < changed_share(images, out) < 0.65


def test_damage_is_zero_exactly_where_the_corruption_stage_left_an_image_alone(batch):
    """corrupt_and_damage's damage is 0 for untouched images, in (0, 1] for corrupted ones, and grows with the
    strength the stage may draw."""
    images = tf.constant(np.concatenate([batch] * 8), tf.float32)
    means = []
    for strength in (0.5, 1.0):
        # The strong blur at a sigma drawn near 0 is exactly the identity, so pixels cannot tell it was drawn.
        cfg = make_config("cpu", **{**OFF, "corrupt": 0.5, "corrupt_ops": 3}, corrupt_strength=strength,
                          corrupt_blur=0.0)
        tf.random.set_seed(2)
        out, damage = augment.corrupt_and_damage(images, cfg)
        damage = damage.numpy()
        touched = np.abs(out.numpy() - images.numpy()).reshape(len(damage), -1).max(1) > 0
        assert damage.shape == (len(images),)
        assert np.all(damage[~touched] == 0.0) and np.all((damage[touched] > 0) & (damage[touched] <= 1.0))
        assert 0.35 < touched.mean() < 0.65
        means.append(damage[touched].mean())
    assert means[0] < means[1]


def test_soft_spare_takes_the_spared_family_out_of_the_damage_and_nothing_else(batch):
    """--soft-spare blur: the same draws damage the same pixels, but the strong blur's strength no longer counts,
    so a cell the stage only blurred keeps a hard label and one blurred among other ops loses only the blur's
    share; images the blur never touched keep their damage."""
    images = tf.constant(np.concatenate([batch] * 8), tf.float32)
    stage = {**OFF, "corrupt": 1.0, "corrupt_ops": 2, "corrupt_blur": 3.0, "corrupt_blur_weight": 3.0}
    runs = []
    for spare in ("", "blur"):
        tf.random.set_seed(5)
        cfg = make_config("cpu", **stage, soft_spare=spare)
        runs.append([t.numpy() for t in augment.corrupt_and_damage(images, cfg)])
    (out, damage), (out_spared, damage_spared) = runs
    np.testing.assert_array_equal(out, out_spared)
    assert np.all(damage_spared <= damage + 1e-7)
    only_blur = (damage_spared == 0) & (damage > 0)
    lowered = (damage_spared > 0) & (damage_spared < damage - 1e-6)
    assert only_blur.sum() >= 3 and lowered.sum() >= 3, (only_blur.sum(), lowered.sum())
    assert np.abs(out[only_blur] - images.numpy()[only_blur]).max() > 1.0  # the spared cells were blurred all the same
    assert (damage_spared == damage).mean() > 0.3


def test_soft_spare_offers_exactly_the_families_the_corruption_stage_has():
    """A family with no corruption-stage op would make --soft-spare a silent no-op."""
    from trainer.config import STAGE_FAMILIES, validate
    assert set(STAGE_FAMILIES) == set(augment.OP_FAMILY.values())
    for value in ("", *STAGE_FAMILIES):
        validate(make_config("cpu", soft_spare=value))
    with pytest.raises(ValueError, match="--soft-spare is 'microscopy'; choose one of noise, blur"):
        validate(make_config("cpu", soft_spare="microscopy"))


def test_corruption_stage_past_severity_five_stays_valid(batch):
    """--corrupt-strength 2 (the most the config allows) with every op on runs, keeps pixels in range, and stops
    the ops that have a natural end there: JPEG at quality 1 rather than an invalid one, lowered contrast and
    saturation at flat and grey rather than inverted."""
    images = tf.constant(np.concatenate([batch] * 2), tf.float32)
    cfg = make_config("cpu", **{**OFF, "corrupt": 1.0, "corrupt_ops": 6}, corrupt_strength=2.0, corrupt_jpeg=True,
                      corrupt_zoom=0.6, corrupt_blur=2.5)
    tf.random.set_seed(3)
    out, damage = augment.corrupt_and_damage(images, cfg)
    assert np.isfinite(out.numpy()).all() and out.numpy().min() >= 0 and out.numpy().max() <= 255
    assert np.all((damage.numpy() > 0) & (damage.numpy() <= 1))
    strong = tf.fill([len(images), 1, 1, 1], 2.0)
    assert augment._jpeg(images, strong).shape == images.shape
    centred = images - tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    for op in (augment._contrast, augment._saturation):
        moved = op(images, strong)
        # Either way (raised or lowered), each image must not be anti-correlated with what it was.
        along = tf.reduce_sum((moved - tf.reduce_mean(moved, axis=[1, 2, 3], keepdims=True)) * centred, [1, 2, 3])
        assert np.all(along.numpy() >= -1e-3 * tf.reduce_sum(centred ** 2, [1, 2, 3]).numpy()), op.__name__


def test_soften_keeps_undamaged_labels_hard_and_lowers_the_true_class_with_damage():
    onehot = tf.constant(np.eye(8, dtype=np.float32)[[3, 3, 3, 0]])
    soft = augment.soften(onehot, tf.constant([0.0, 0.5, 1.0, 1.0]), amount=0.5).numpy()
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(soft[0], onehot.numpy()[0])
    np.testing.assert_allclose(soft[1, 3], 1 - 0.5 * 0.5 ** augment.SOFT_POWER, rtol=1e-6)
    np.testing.assert_allclose(soft[2], [0.5 / 7] * 3 + [0.5] + [0.5 / 7] * 4, rtol=1e-6)
    assert soft[3, 0] == soft.max(axis=1)[3] == 0.5


def test_soft_corrupt_softens_the_labels_of_the_corrupted_share_only(real_slice):
    """Through the training pipeline: rows stay distributions whose top class is the label's, and about the
    corrupted share of them (corrupt=0.5) lose confidence; without --soft-corrupt every row stays one-hot."""
    images, labels = real_slice[0][:128], real_slice[1][:128]
    for amount in (0.0, 0.5):
        cfg = make_config("cpu", **{**OFF, "corrupt": 0.5, "corrupt_ops": 3}, soft_corrupt=amount, batch_size=128)
        _, y = next(iter(augment.train_dataset(images, labels, cfg, repeat=False)))
        y = y.numpy()
        np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
        assert sorted(y.argmax(axis=1)) == sorted(labels)
        softened = (y.max(axis=1) < 1.0).mean()
        assert softened == 0.0 if amount == 0 else 0.3 < softened < 0.7
        assert y.max(axis=1).min() >= 1.0 - amount


def test_black_fill_leaves_black_corners_and_mirror_fill_does_not(batch):
    """A zoom-out with black fill shows black borders; the default mirror fill never does."""
    base = {**OFF, "zoom": 1.0}
    corner = lambda out: (out[:, :3, :3].max(axis=(1, 2, 3)) < 1.0).mean()  # noqa: E731
    tf.random.set_seed(3)
    black = augment.geometry(tf.constant(batch, tf.float32), make_config("cpu", **{**base, "black_fill": 1.0})).numpy()
    mirror = augment.geometry(tf.constant(batch, tf.float32), make_config("cpu", **base)).numpy()
    assert corner(black) > 0.3
    assert corner(mirror) == 0.0


def test_pipeline_stays_float32_under_bfloat16_training(real_slice):
    """Mixed-precision training on a CPU sets a bfloat16 policy; RandAugment must still run in float32."""
    import keras
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        cfg = make_config("cpu", batch_size=16, randaugment=True, randaugment_rate=1.0)
        x, _ = next(iter(augment.train_dataset(real_slice[0][:32], real_slice[1][:32], cfg)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert x.dtype == tf.float32
    check_range(x.numpy(), 16)


def test_consistency_batches_hold_two_views_of_the_same_images(real_slice):
    # noise only, no geometry: each view is its cell plus its own noise, so it matches its pair pixel by pixel
    cfg = make_config("smoke", batch_size=16, consistency=12.0, randaugment=False, flip=False, rot90=False,
                      rotation=0.0, shift=0.0, zoom=0.0, contrast=0.0, brightness=0.0, saturation=0.0,
                      noise_std=10.0, blur=0.0, erase=0.0, corrupt=0.0, black_fill=0.0)
    ds = augment.train_dataset(real_slice[0][:64], real_slice[1][:64], cfg)
    x, y = next(iter(ds))
    assert x.shape == (16, 96, 96, 3) and y.shape == (16, 8)
    first, second = x[:8].numpy().reshape(8, -1), x[8:].numpy().reshape(8, -1)
    np.testing.assert_array_equal(y[:8].numpy(), y[8:].numpy())
    assert np.abs(first - second).mean() > 1.0, "the two views should be augmented independently"
    corr = np.corrcoef(first, second)[:8, 8:]  # rows: first views, columns: second views
    assert (corr.argmax(axis=1) == np.arange(8)).all(), corr
    assert corr.diagonal().min() > 0.8


def test_consistency_refuses_mixing_and_odd_batches():
    from trainer.config import validate
    with pytest.raises(ValueError, match="mixup"):
        validate(make_config("smoke", consistency=1.0, mixup_alpha=0.2))
    with pytest.raises(ValueError, match="even batch_size"):
        validate(make_config("smoke", consistency=1.0, batch_size=15))


def test_consistency_loss_adds_the_divergence_of_the_two_views_in_training_only():
    import keras

    from trainer.train import consistency_loss
    loss, pairs_only = consistency_loss(make_config("smoke", consistency=12.0, label_smoothing=0.0))
    y = np.eye(8, dtype=np.float32)[[0, 1, 0, 1]]
    same = np.array([[0.7] + [0.3 / 7] * 7, [0.1] * 4 + [0.6 / 4] * 4] * 2, np.float32)
    apart = same.copy()
    apart[2:] = apart[2:, ::-1]
    cross_entropy = keras.losses.CategoricalCrossentropy(reduction=None)(y, same).numpy()
    np.testing.assert_allclose(loss(y, same).numpy(), cross_entropy, rtol=1e-5)
    assert (loss(y, apart).numpy() > keras.losses.CategoricalCrossentropy(reduction=None)(y, apart).numpy()
            + 0.1).all()
    pairs_only.on_test_begin()  # validation batches are not pairs: plain cross-entropy
    np.testing.assert_allclose(loss(y, apart).numpy(),
                               keras.losses.CategoricalCrossentropy(reduction=None)(y, apart).numpy(), rtol=1e-5)
    pairs_only.on_test_end()
    assert (loss(y, apart).numpy() > keras.losses.CategoricalCrossentropy(reduction=None)(y, apart).numpy()
            + 0.1).all()


@pytest.mark.parametrize("fill", ["random", "extremes"])
def test_erase_fill_extremes_paints_black_and_white_patches(fill):
    tf.random.set_seed(3)
    grey = tf.fill([600, 96, 96, 3], 128.0)
    out = augment.erase(grey, make_config("cpu", **{**OFF, "erase": 1.0, "erase_fill": fill})).numpy()
    # A 10-30% rectangle is at least 81 pixels; count the images that have that many of pure black or pure white.
    black = (np.all(out == 0.0, axis=-1).sum(axis=(1, 2)) >= 81).mean()
    white = (np.all(out == 255.0, axis=-1).sum(axis=(1, 2)) >= 81).mean()
    if fill == "extremes":  # half the patches are flat, a third of those black and a third white: 1/6 each
        assert 0.10 < black < 0.23 and 0.10 < white < 0.23, (black, white)
    else:
        assert black == 0.0 and white == 0.0, (black, white)


def test_pixmix_pictures_vary_inside_the_crop_and_never_ramp_across_it():
    tf.random.set_seed(0)
    pictures = augment.structured_pictures(64, 96).numpy()
    assert pictures.shape == (64, 96, 96, 3) and pictures.min() >= 0.0 and pictures.max() <= 1.0
    assert (pictures.std(axis=(1, 2, 3)) > 0.1).all(), "every picture has structure"
    # A plane fitted to each picture (the ramp of a lamp off centre) explains almost none of it.
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 96), np.linspace(-1, 1, 96)), -1).reshape(-1, 2)
    design = np.concatenate([grid, np.ones((len(grid), 1))], 1)
    grey = pictures.mean(-1).reshape(64, -1)
    fit = design @ np.linalg.lstsq(design, grey.T, rcond=None)[0]
    explained = 1 - ((grey.T - fit) ** 2).sum(0) / ((grey.T - grey.mean(1)) ** 2).sum(0)
    assert np.median(explained) < 0.05 and explained.max() < 0.3, explained


@pytest.mark.parametrize("weight", [0.2, 0.5])
def test_pixmix_keeps_the_cell_by_its_weight_and_touches_only_the_chosen_share(batch, weight):
    cfg = make_config("cpu", **{**OFF, "pixmix": 0.5, "pixmix_weight": weight})
    tf.random.set_seed(1)
    x = tf.constant(np.concatenate([batch] * 4), tf.float32)
    out = augment.pixmix(x, cfg).numpy()
    check_range(out, len(x))
    changed = np.abs(out - x.numpy()).reshape(len(x), -1).max(1) > 1.0
    assert 0.3 < changed.mean() < 0.7, "about half the images are blended"
    # Added in, a picture moves a pixel at most weight * 255; multiplied in, at most by the factor p ** weight.
    # Either way the cell stays what most of each pixel is made of: its correlation with the original is high.
    before, after = x.numpy()[changed].reshape(changed.sum(), -1), out[changed].reshape(changed.sum(), -1)
    corr = [np.corrcoef(b, a)[0, 1] for b, a in zip(before, after)]
    assert np.median(corr) > (0.8 if weight <= 0.2 else 0.5), corr


def test_apr_keeps_phase_and_mean_colour_takes_a_partners_amplitude_on_the_chosen_share(batch):
    x = np.concatenate([batch] * 4).astype(np.float32)
    tf.random.set_seed(3)
    half = augment.apr(tf.constant(x), make_config("cpu", **{**OFF, "apr": 0.5})).numpy()
    check_range(half, len(x))
    changed = np.abs(half - x).reshape(len(x), -1).max(1) > 1.0
    assert 0.3 < changed.mean() < 0.7, "about half the images are recombined"
    # the rest stay as they were (one drawn as its own partner goes through the transform and back: float error)
    assert np.abs(half[~changed] - x[~changed]).max() < 0.01

    x = batch.astype(np.float32)
    out = augment.apr(tf.constant(x), make_config("cpu", **{**OFF, "apr": 1.0})).numpy()
    before, after = (np.fft.fft2(v.transpose(0, 3, 1, 2)) for v in (x, out))
    moved = np.abs(out - x).reshape(len(x), -1).max(1) > 1.0  # an image drawn as its own partner is unchanged
    assert moved.mean() > 0.8
    # Its own mean colour: each channel's zero frequency, up to what clipping at 255 takes off a bright channel.
    assert np.median(np.abs(out.mean((1, 2)) - x.mean((1, 2)))[moved]) < 2.0
    # Its own phase: where the energy is, the frequencies point the way the original's did.
    weight = np.abs(after)
    agreement = (weight * np.cos(np.angle(after) - np.angle(before))).sum((1, 2, 3)) / weight.sum((1, 2, 3))
    assert np.median(agreement[moved]) > 0.9, agreement
    # Another image's amplitude: the batch image whose log-amplitude spectrum is nearest is not itself.
    log_amp = np.log1p(np.abs(before)).reshape(len(x), -1)
    nearest = [np.argmin(((log_amp - np.log1p(np.abs(a)).ravel()) ** 2).sum(1)) for a in after]
    assert np.mean([n != i for i, n in enumerate(nearest) if moved[i]]) > 0.9, nearest


def test_randconv_keeps_brightness_filters_texture_and_touches_only_the_chosen_share(batch):
    cfg = make_config("cpu", **{**OFF, "randconv": 0.5})
    x = np.concatenate([batch] * 4).astype(np.float32)
    beyond_colour = []
    for seed in range(8):  # one kernel per batch: eight batches draw sizes 1 to 7 px
        tf.random.set_seed(seed)
        out = augment.randconv(tf.constant(x), cfg).numpy()
        check_range(out, len(x))
        moved = np.abs(out - x).reshape(len(x), -1).max(1)
        assert 0.3 < (moved > 0).mean() < 0.7, "about half the images are filtered, the rest left exactly"
        changed = moved > 1.0  # a blend that kept nearly all of the original tells nothing about the kernel
        # The filtered image takes the original's mean before the blend; only clipping at 0 and 255 moves it.
        shift = np.abs(out[changed].mean(axis=(1, 2, 3)) - x[changed].mean(axis=(1, 2, 3)))
        assert np.median(shift) < 3.0, shift
        # How much of each changed image a per-pixel colour matrix (plus offset) of the original explains: all of
        # it for a 1 px kernel, less once neighbouring pixels are mixed in.
        unexplained = []
        for before, after in zip(x[changed], out[changed]):
            design = np.concatenate([before.reshape(-1, 3), np.ones((96 * 96, 1))], 1)
            target = after.reshape(-1, 3)
            residual = target - design @ np.linalg.lstsq(design, target, rcond=None)[0]
            unexplained.append((residual ** 2).sum() / ((target - target.mean(0)) ** 2).sum())
        beyond_colour.append(np.median(unexplained))
    assert min(beyond_colour) < 0.02, "some batch got a 1 px kernel: a colour change alone"
    assert max(beyond_colour) > 0.1, "some batch got a wider kernel: texture filtered, not only colour"


@pytest.mark.parametrize("op", augment.AUGMIX_OPS)
def test_augmix_ops_each_do_their_one_job_and_minus_one_leaves_an_image_alone(batch, op):
    x = np.concatenate([batch[:8]] * 2).astype(np.float32)
    ops = np.array([augment.AUGMIX_OPS.index(op)] * 8 + [-1] * 8, np.int32)
    tf.random.set_seed(0)
    out = augment._augmix_step(tf.constant(x), tf.constant(ops)).numpy()
    np.testing.assert_array_equal(out[8:], x[8:])
    done, before = out[:8], x[:8]
    assert all(np.abs(d - b).max() > 1.0 for d, b in zip(done, before)), f"{op} left an image as it was"
    if op == "autocontrast":
        assert np.allclose(done.min(axis=(1, 2)), 0.0) and np.allclose(done.max(axis=(1, 2)), 255.0)
    if op == "equalize":  # a flatter histogram: each quarter of the range nearer a quarter of the pixels
        def unevenness(images):
            channels = images.transpose(0, 3, 1, 2).reshape(-1, 96 * 96)
            quarters = np.stack([np.histogram(c, bins=4, range=(0, 256))[0] for c in channels]) / (96 * 96)
            return np.abs(quarters - 0.25).max(1)
        after, was = unevenness(done), unevenness(before)
        assert np.all(after < was) and np.median(after) < 0.1, (after, was)
    if op == "solarize":  # the brightest pixels are inverted, the dark ones (the cell's nucleus) kept
        dark = before < 150
        np.testing.assert_array_equal(done[dark], before[dark])
    if op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):  # moved, not recoloured
        assert np.abs(done.mean(axis=(1, 2, 3)) - before.mean(axis=(1, 2, 3))).max() < 6.0
        most = augment.AUGMIX_SEVERITY * augment.AUGMIX_MOST["translate"] * 96
        if op == "translate_x":  # each row is the original's, shifted by a whole or part pixel along x
            shifts = [min(range(-12, 13), key=lambda s: np.abs(np.roll(b, s, axis=1)[:, 16:80] - d[:, 16:80]).mean())
                      for b, d in zip(before, done)]
            assert all(abs(s) <= most + 1 for s in shifts) and any(s != 0 for s in shifts), shifts


def test_augmix_blends_chains_into_the_chosen_share_only(batch):
    cfg = make_config("cpu", **{**OFF, "augmix": 0.5})
    x = np.concatenate([batch] * 4).astype(np.float32)
    tf.random.set_seed(3)
    out = augment.augmix(tf.constant(x), cfg).numpy()
    check_range(out, len(x))
    moved = np.abs(out - x).reshape(len(x), -1).max(1)
    assert 0.3 < (moved > 0).mean() < 0.7, "about half the images are mixed, the rest left exactly"
    # A mix of up to three chains and the image itself keeps the cell where it was: the blend correlates with the
    # original far more than a cell correlates with another cell.
    changed = moved > 1.0
    corr = [np.corrcoef(b.ravel(), a.ravel())[0, 1] for b, a in zip(x[changed], out[changed])]
    others = [np.corrcoef(b.ravel(), a.ravel())[0, 1] for b, a in zip(x[changed], np.roll(x, 1, axis=0)[changed])]
    assert np.median(corr) > 0.6 and np.median(corr) > np.median(others) + 0.3, (np.median(corr), np.median(others))


@pytest.mark.parametrize("least", [1.0, 0.3])
def test_erase_opacity_lays_translucent_patches_between_it_and_one(least):
    cfg = make_config("cpu", **{**OFF, "erase": 1.0, "erase_opacity": least})
    outs = []
    for base in (0.0, 255.0):  # the same draws over black and over white: their difference is 255 * (1 - opacity)
        tf.random.set_seed(5)
        outs.append(augment.erase(tf.fill([400, 96, 96, 3], base), cfg).numpy())
    opacity = 1.0 + (outs[0] - outs[1])[..., 0] / 255.0
    patch = opacity[opacity > 1e-3].reshape(-1)
    assert patch.size > 400 * 81, "every image gets a patch of at least 81 pixels"
    per_image = [o[o > 1e-3] for o in opacity]
    assert all(np.ptp(p) < 1e-4 for p in per_image), "one opacity per patch"
    if least == 1.0:
        np.testing.assert_allclose(patch, 1.0, atol=1e-4)
    else:
        firsts = np.array([p[0] for p in per_image])
        assert firsts.min() >= least - 1e-4 and firsts.max() <= 1.0 + 1e-4
        assert (firsts < 0.5).mean() > 0.15 and (firsts > 0.8).mean() > 0.15, "drawn across the range"


@pytest.mark.parametrize("shape", ["rectangle", "blot"])
def test_erase_shape_blot_cuts_a_ragged_blob_out_of_the_rectangle(shape):
    tf.random.set_seed(2)
    grey = tf.fill([300, 96, 96, 3], 128.0)
    out = augment.erase(grey, make_config("cpu", **{**OFF, "erase": 1.0, "erase_shape": shape})).numpy()
    changed = np.any(out != 128.0, axis=-1)
    fill, sizes = [], []
    for mask in changed:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows):
            sizes.append(mask.sum())
            fill.append(mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))
    fill = np.array(fill)
    assert len(sizes) > 285 and np.median(sizes) >= 40, "nearly every image gets a patch of some size"
    if shape == "rectangle":
        assert (fill > 0.99).mean() > 0.95, "a rectangle fills its bounding box"
    else:
        assert 0.5 < np.median(fill) < 0.9, f"a blot fills part of its box, median {np.median(fill):.2f}"


def test_patch_gaussian_puts_noise_in_one_square_per_image_at_the_set_strength():
    x = np.full((300, 96, 96, 3), 128.0, np.float32)  # mid-grey: no clipping hides the noise
    tf.random.set_seed(5)
    out = augment.patch_gaussian(tf.constant(x), make_config("cpu", **{**OFF, "patch_gaussian": 40.0})).numpy()
    check_range(out, len(x))
    limit = int(augment.PATCH_GAUSSIAN_SIDE * 96) + 1
    stds, squares = [], 0
    for before, after in zip(x, out):
        noisy = (after != before).any(2)
        if noisy.sum() < 4:  # a patch drawn with almost no side
            continue
        rows, cols = np.flatnonzero(noisy.any(1)), np.flatnonzero(noisy.any(0))
        box = noisy[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.mean() > 0.99, "the noise fills one rectangle"
        assert max(box.shape) <= limit, box.shape
        inner = 0 < rows[0] and rows[-1] < 95 and 0 < cols[0] and cols[-1] < 95
        if inner:  # a patch no border cuts is a square
            assert abs(box.shape[0] - box.shape[1]) <= 1, box.shape
            squares += 1
        stds.append(float((after - before)[noisy].std()))
    assert squares > 20 and len(stds) > 250
    # each image's std is uniform up to the setting: a mean near half of it, none far past it
    assert 15.0 < np.mean(stds) < 25.0 and max(stds) < 48.0, (np.mean(stds), max(stds))


def test_veil_blends_part_of_each_image_toward_a_light_grey_up_to_its_opacity():
    tf.random.set_seed(4)
    cfg = make_config("cpu", **{**OFF, "veil": 1.0, "veil_opacity": 0.6})
    black = augment.veil(tf.zeros([300, 96, 96, 3]), cfg).numpy()
    # over black the veil is tone * mask * opacity: light grey, never above its opacity of the brightest tone
    assert black.max() <= 0.6 * (augment.VEIL_TONE[1] + 10.0) + 1e-3
    covered = (black.max(axis=-1) > 1.0).reshape(300, -1).mean(axis=1)
    lit = covered[black.reshape(300, -1).max(axis=1) > 20.0]  # images whose opacity was not drawn near zero
    assert len(lit) > 200
    assert lit.min() > 0.05 and lit.max() < 0.75, "a veil covers part of an image, never all of it"
    assert (lit < 0.3).mean() > 0.1 and (lit > 0.45).mean() > 0.1, "drawn across the range"
    peak = black.reshape(300, -1, 3).max(axis=1)
    assert np.all(np.abs(peak - peak.mean(axis=1, keepdims=True)) < 25.0), "a grey, tinted a little"
    # over a cell the veil lowers contrast and raises brightness where it lies, and nowhere else
    cells = np.random.default_rng(0).uniform(0, 255, (300, 96, 96, 3)).astype(np.float32)
    tf.random.set_seed(4)
    out = augment.veil(tf.constant(cells), cfg).numpy()
    np.testing.assert_allclose(out[black.max(axis=-1) == 0], cells[black.max(axis=-1) == 0], atol=1e-3)
    veiled = black.max(axis=-1) > 20.0
    assert out[veiled].std() < 0.9 * cells[veiled].std() and out[veiled].mean() > cells[veiled].mean() + 5
    assert augment.veil(tf.constant(cells), make_config("cpu", **{**OFF, "veil": 0.0})).numpy().tolist() == \
        cells.tolist()
