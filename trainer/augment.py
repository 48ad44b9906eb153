"""tf.data input pipelines: geometry, RandAugment, AugMix, colour, blur, erasing, PixMix, corruptions, MixUp."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

from .config import Config, off_values
from .corrupt import HUE_LUMA, HUE_SIN
from .data import NUM_CLASSES

AUTOTUNE = tf.data.AUTOTUNE


class Draws:
    """Where the augmentation's random numbers come from: TensorFlow's stateful ops, or stateless ones in `seeded`.

    tf.data's parallel map runs batches in threads that draw from one stateful generator in whatever order they
    reach it, so two runs with one seed would augment differently. Inside `seeded(key)`, each op instead draws
    from the key folded with its place in the traced graph: a batch's augmentation depends on its key alone.
    """

    def __init__(self):
        self.key, self.count = None, 0

    @contextlib.contextmanager
    def seeded(self, key: tf.Tensor):
        """Draw from key (shape [2], int) while tracing or running the block; stateful ops again after it."""
        self.key, self.count = key, 0
        try:
            yield
        finally:
            self.key = None

    def _next_key(self) -> tf.Tensor:
        self.count += 1  # counted as ops are traced: each op of the graph gets a key of its own
        return tf.random.experimental.stateless_fold_in(self.key, self.count)

    def uniform(self, shape, minval=0.0, maxval=1.0, dtype=tf.float32) -> tf.Tensor:
        if self.key is None:
            return tf.random.uniform(shape, minval, maxval, dtype)
        return tf.random.stateless_uniform(shape, self._next_key(), minval, maxval, dtype)

    def normal(self, shape) -> tf.Tensor:
        if self.key is None:
            return tf.random.normal(shape)
        return tf.random.stateless_normal(shape, self._next_key())

    def gamma(self, shape, alpha) -> tf.Tensor:
        if self.key is None:
            return tf.random.gamma(shape, alpha)
        return tf.random.stateless_gamma(shape, self._next_key(), alpha)

    def shuffle(self, values: tf.Tensor) -> tf.Tensor:
        """values in random order along the first axis."""
        if self.key is None:
            return tf.random.shuffle(values)
        return tf.gather(values, tf.argsort(self.uniform(tf.shape(values)[:1])))


draws = Draws()


def affine_warp(images: tf.Tensor, a00, a01, a10, a11, dx, dy, fill_mode: str) -> tf.Tensor:
    """Output pixel p samples the input at A @ (p - c) + c + d (per image, bilinear); borders mirrored or black."""
    c = (tf.cast(tf.shape(images)[1], tf.float32) - 1) / 2
    zeros = tf.zeros_like(a00)
    transforms = tf.stack([a00, a01, c - a00 * c - a01 * c + dx,
                           a10, a11, c - a10 * c - a11 * c + dy,
                           zeros, zeros], axis=1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        interpolation="BILINEAR", fill_mode=fill_mode, fill_value=0.0)
    warped.set_shape(images.shape)  # the op forgets the static size when the batch size is unknown
    return warped


def geometry(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Stage 1 on a float batch: flips and 90-degree turns, rotation, zoom, shear and shift, as one affine warp.

    Blood cells have no orientation, so every symmetry of the square is a free, label-preserving view. The
    symmetries are folded into the warp's matrix: one resampling pass, not a copy of the batch per flip.
    """
    batch = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1], tf.float32)
    if not (cfg.flip or cfg.rot90) and cfg.rotation <= 0 and cfg.zoom <= 0 and cfg.shift <= 0 and cfg.shear <= 0:
        return images
    angle = draws.uniform([batch], -1.0, 1.0) * cfg.rotation * 2 * math.pi
    scale = tf.exp(draws.uniform([batch], -1.0, 1.0) * math.log1p(cfg.zoom))  # zoom in and out alike
    shear = draws.uniform([batch], -1.0, 1.0) * cfg.shear
    dx = draws.uniform([batch], -1.0, 1.0) * cfg.shift * size
    dy = draws.uniform([batch], -1.0, 1.0) * cfg.shift * size
    # A = rotation @ shear / scale, acting on (x, y) = (column, row).
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a00, a01, a10, a11 = cos, cos * shear - sin, sin, sin * shear + cos

    def coin():
        return draws.uniform([batch]) < 0.5

    # A symmetry D of the square, then the warp: the image is sampled at D (A (p - c) + d) + c. D is a transpose,
    # then a sign on y, then one on x: rot90 draws the 4 turns (a transpose with exactly one flip, or a half turn
    # or nothing), flip a further left-right mirror; both give the 8 symmetries, each 1 in 8.
    sign_x = sign_y = 1.0
    if cfg.rot90:
        transpose, flip_y = coin(), coin()
        a00, a01, a10, a11 = (tf.where(transpose, a10, a00), tf.where(transpose, a11, a01),
                              tf.where(transpose, a00, a10), tf.where(transpose, a01, a11))
        dx, dy = tf.where(transpose, dy, dx), tf.where(transpose, dx, dy)
        sign_y = tf.where(flip_y, -1.0, 1.0)
        sign_x = tf.where(transpose != flip_y, -1.0, 1.0)  # an even number of mirrors: a turn
    if cfg.flip:
        sign_x = sign_x * tf.where(coin(), -1.0, 1.0)
    a00, a01, dx = a00 * sign_x, a01 * sign_x, dx * sign_x
    a10, a11, dy = a10 * sign_y, a11 * sign_y, dy * sign_y

    def warp(fill_mode):
        return affine_warp(images, a00, a01, a10, a11, dx, dy, fill_mode)

    if cfg.black_fill <= 0:
        return warp("REFLECT")
    # Scanners and test-set makers pad with black; a share of batches learns that border too.
    return tf.cond(draws.uniform([]) < cfg.black_fill, lambda: warp("CONSTANT"), lambda: warp("REFLECT"))


def per_image(images: tf.Tensor, low=0.0, high=1.0) -> tf.Tensor:
    """One uniform draw in [low, high) per image of the batch, shaped (batch, 1, 1, 1) to broadcast over pixels."""
    return draws.uniform([tf.shape(images)[0], 1, 1, 1], low, high)


def colour(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Contrast, brightness, colour degeneration, hue and Gaussian noise, each strength from the config."""
    batch = tf.shape(images)[0]
    if cfg.contrast > 0:
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = (images - mean) * per_image(images, 1 - cfg.contrast, 1 + cfg.contrast) + mean
    if cfg.brightness > 0:
        images = images + per_image(images, -cfg.brightness, cfg.brightness) * 255.0
    if cfg.saturation > 0:
        grey = tf.reduce_mean(images, axis=3, keepdims=True)
        keep = 1.0 - per_image(images, 0.0, cfg.saturation)
        images = grey + (images - grey) * keep
    if cfg.hue > 0:
        images = tf.clip_by_value(images, 0, 255) / 255.0
        delta = draws.uniform([batch], -cfg.hue, cfg.hue)
        images = tf.map_fn(lambda a: tf.image.adjust_hue(a[0], a[1]), (images, delta),
                           fn_output_signature=tf.float32) * 255.0
    if cfg.noise_std > 0:
        images = images + draws.normal(tf.shape(images)) * per_image(images, 0.0, cfg.noise_std)
    return tf.clip_by_value(images, 0.0, 255.0)


def reflect_blur_matrix(n, sigma: float) -> tf.Tensor:
    """(n, n) matrix M with M @ v = v blurred by a Gaussian of this sigma, borders mirrored (no edge repeat).

    n may be a tensor: built in the graph, it follows the batch's image size.
    """
    radius = max(1, int(math.ceil(2 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = tf.constant(taps / taps.sum(), tf.float32)
    n = tf.convert_to_tensor(n, tf.int32)
    tf.debugging.assert_greater(n, radius, message=f"images must be larger than {radius} px to blur at sigma {sigma}")
    source = tf.abs(tf.range(n)[:, None] + tf.range(-radius, radius + 1)[None, :])  # mirrored at the top ...
    source = tf.where(source > n - 1, 2 * (n - 1) - source, source)                # ... and at the bottom
    return tf.reduce_sum(tf.one_hot(source, n) * taps[None, :, None], axis=1)


def blur(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Gaussian blur of random strength: a random blend of each image with its blur at sigma cfg.blur.

    The separable blur runs as two small matrix products (rows, then columns): about 3x faster on a CPU than
    depthwise convolutions, which leaves more of the two cores to training.
    """
    rows = reflect_blur_matrix(tf.shape(images)[1], cfg.blur)
    cols = reflect_blur_matrix(tf.shape(images)[2], cfg.blur)
    blurred = tf.einsum("ij,bjkc->bikc", rows, images)
    blurred = tf.einsum("kl,bilc->bikc", cols, blurred)
    amount = per_image(images) * tf.cast(per_image(images) < 0.5, tf.float32)
    return tf.clip_by_value(images + (blurred - images) * amount, 0.0, 255.0)  # sums can round past 255


BLOT_GRIDS = (12, 32)  # noise cells across the image that a blot's edge is cut from: lobes of ~8 px, rough ~3 px


def _blot(shape, top, left, side_h, side_w) -> tf.Tensor:
    """(batch, h, w) ragged blobs, one per image, filling most of its box: an ellipse inscribed in the box whose
    edge is pushed in and out by bilinearly smoothed uniform noise at two scales: lobes and bays, and a rough rim."""
    batch, h, w = shape[0], shape[1], shape[2]
    rows = tf.cast(tf.range(h), tf.float32)[None, :, None]
    cols = tf.cast(tf.range(w), tf.float32)[None, None, :]
    half_h = tf.cast(side_h, tf.float32)[:, None, None] / 2 + 0.5
    half_w = tf.cast(side_w, tf.float32)[:, None, None] / 2 + 0.5
    dy = (rows + 0.5 - tf.cast(top, tf.float32)[:, None, None] - half_h) / half_h
    dx = (cols + 0.5 - tf.cast(left, tf.float32)[:, None, None] - half_w) / half_w
    noise = sum(tf.image.resize(draws.uniform([batch, grid, grid, 1], -0.5, 0.5), [h, w], "bilinear")[..., 0]
                for grid in BLOT_GRIDS)
    return (1.0 - (dy ** 2 + dx ** 2)) + noise > 0.25


def erase(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Random erasing: with chance cfg.erase, one rectangle (10-30% of the side) becomes noise or a flat colour
    (cfg.erase_fill: any colour, or black and white as often as any colour), laid over at an opacity drawn from
    cfg.erase_opacity to 1; with cfg.erase_shape "blot" only a ragged blob inside the rectangle."""
    shape = tf.shape(images)
    batch, h, w = shape[0], shape[1], shape[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    side_h = tf.cast(draws.uniform([batch], 0.1, 0.3) * hf, tf.int32)
    side_w = tf.cast(draws.uniform([batch], 0.1, 0.3) * wf, tf.int32)
    top = tf.cast(draws.uniform([batch]) * tf.cast(h - side_h, tf.float32), tf.int32)
    left = tf.cast(draws.uniform([batch]) * tf.cast(w - side_w, tf.float32), tf.int32)
    rows = tf.range(h)[None, :, None]
    cols = tf.range(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + side_h)[:, None, None]) &
              (cols >= left[:, None, None]) & (cols < (left + side_w)[:, None, None]))
    if cfg.erase_shape == "blot":
        inside = inside & _blot(shape, top, left, side_h, side_w)
    chosen = draws.uniform([batch, 1, 1]) < cfg.erase
    mask = tf.cast(inside & chosen, tf.float32)[..., None]
    if cfg.erase_opacity < 1.0:  # a translucent patch: occlusion the cell shows through, as glare or a film would
        mask *= per_image(images, cfg.erase_opacity, 1.0)
    flat = draws.uniform([batch, 1, 1, 3], 0, 255)
    if cfg.erase_fill == "extremes":
        pick = draws.uniform([batch, 1, 1, 1], 0, 3, tf.int32)  # 0: any colour, 1: black, 2: white
        flat = tf.where(pick == 1, 0.0, tf.where(pick == 2, 255.0, flat))
    use_noise = per_image(images) < 0.5
    fill = tf.where(use_noise, draws.uniform(shape, 0, 255), flat + tf.zeros_like(images))
    return images * (1 - mask) + fill * mask


PIXMIX_SLOPES = (1.0, 3.0)  # spectra fall as 1/f^a, a drawn in this range: fine grain up to smooth clouds
PIXMIX_LOWEST_CYCLES = 2.0  # no frequency below 2 cycles per crop, so no picture lights one side of a cell


def structured_pictures(n, size: int) -> tf.Tensor:
    """n random textures in [0, 1], (n, size, size, 3): coloured 1/f noise, each with its own slope and tint.

    PixMix's mixing set is fractals and feature visualisations; any picture with structure at many scales and no
    meaning serves, and these need no files. Frequencies under PIXMIX_LOWEST_CYCLES are cut, so no picture is an
    illumination ramp (the held-out vignetting) and each one varies inside the cell itself. They are drawn at half
    the size and scaled up: the inverse FFTs at full size cost a third of a training step on a 2-core CPU.
    """
    half = (size + 1) // 2
    fy = tf.abs(tf.signal.fftshift(tf.range(half, dtype=tf.float32) - half // 2))  # |frequency|, cycles per crop
    fx = tf.range(half // 2 + 1, dtype=tf.float32)
    radius = tf.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    slope = draws.uniform([n, 1, 1, 1], *PIXMIX_SLOPES)
    gain = tf.where(radius >= PIXMIX_LOWEST_CYCLES, tf.maximum(radius, 1.0) ** -slope, 0.0)  # (n, 1, half, half/2)
    shape = [n, 4, half, half // 2 + 1]  # three colour fields and one grey field per picture
    spectrum = tf.complex(draws.normal(shape) * gain, draws.normal(shape) * gain)
    fields = tf.transpose(tf.signal.irfft2d(spectrum, [half, half]), [0, 2, 3, 1])  # (n, half, half, 4)
    grey = draws.uniform([n, 1, 1, 1])  # how much of the picture is one field in all three channels
    pictures = grey * fields[..., 3:] + (1 - grey) * fields[..., :3]
    mean, variance = tf.nn.moments(pictures, axes=[1, 2, 3], keepdims=True)
    # Two standard deviations either side fill [0, 1]: a min-max stretch would leave most pixels near mid-grey.
    pictures = tf.clip_by_value(0.5 + 0.25 * (pictures - mean) / tf.sqrt(variance + 1e-12), 0.0, 1.0)
    return tf.image.resize(pictures, [size, size], method="bilinear")


def on_a_share(images: tf.Tensor, chance: float, transform) -> tf.Tensor:
    """transform(picked) in place of each image picked with this chance, clipped to 0-255; the rest untouched.
    Only the picked images pay for the transform."""
    rows = tf.where(draws.uniform([tf.shape(images)[0]]) < chance)  # (m, 1)
    changed = transform(tf.gather_nd(images, rows))
    return tf.tensor_scatter_nd_update(images, rows, tf.clip_by_value(changed, 0.0, 255.0))


def pixmix(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """With chance cfg.pixmix, blend an image with a structured picture: added (a weighted mean) or multiplied (a
    weighted geometric mean) in, half the time each, the picture's weight uniform up to cfg.pixmix_weight."""
    def blend(picked):
        m = tf.shape(picked)[0]
        pictures = structured_pictures(m, images.shape[1] or tf.shape(images)[1])
        weight = draws.uniform([m, 1, 1, 1], 0.0, cfg.pixmix_weight)
        added = picked * (1 - weight) + 255.0 * pictures * weight
        unit = tf.clip_by_value(picked / 255.0, 1e-3, 1.0)
        multiplied = 255.0 * unit ** (1 - weight) * tf.maximum(pictures, 1e-3) ** weight
        return tf.where(draws.uniform([m, 1, 1, 1]) < 0.5, multiplied, added)
    return on_a_share(images, cfg.pixmix, blend)


VEIL_GRIDS = (6, 12)  # noise cells across the image that a veil's blobs are cut from: blobs of ~8-16 px
VEIL_COVER = (0.1, 0.6)  # share of the image a veil covers, drawn per image
VEIL_TONE = (170.0, 255.0)  # the light grey a veil blends toward, drawn per image, each channel tinted +-10


def veil(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """With chance cfg.veil, a patchy translucent veil: blobs cut from smoothed noise cover VEIL_COVER of the
    image, their edges sharp or soft, and there the image is blended toward one light tone at an opacity drawn up
    to cfg.veil_opacity, as a film of mounting medium, glare or a bubble lies over part of a smear. Contrast falls
    and brightness rises inside the blobs only: the colour stage changes both over the whole image, which
    instance norm divides out, and a model that met only that reads a local veil as a change of the cell."""
    def lay(picked):
        shape = tf.shape(picked)
        m, h, w = shape[0], shape[1], shape[2]
        field = sum(tf.image.resize(draws.uniform([m, grid, grid, 1], -0.5, 0.5), [h, w], "bilinear")
                    for grid in VEIL_GRIDS)
        # the threshold that leaves the drawn share of each image's pixels above it
        ranked = tf.sort(tf.reshape(field, [m, -1]), axis=1, direction="DESCENDING")
        cover = draws.uniform([m], *VEIL_COVER)
        at = tf.cast(cover * tf.cast(h * w, tf.float32), tf.int32)
        threshold = tf.gather(ranked, at, axis=1, batch_dims=1)[:, None, None, None]
        softness = draws.uniform([m, 1, 1, 1], 0.005, 0.1)  # in units of the field: a sharp rim to a haze
        mask = tf.clip_by_value((field - threshold) / softness, 0.0, 1.0)
        opacity = draws.uniform([m, 1, 1, 1], 0.0, cfg.veil_opacity)
        tone = draws.uniform([m, 1, 1, 1], *VEIL_TONE) + draws.uniform([m, 1, 1, 3], -10.0, 10.0)
        return picked + (tone - picked) * mask * opacity
    return on_a_share(images, cfg.veil, lay)


PATCH_GAUSSIAN_SIDE = 0.75  # the largest noisy patch, as a fraction of the image side


def patch_gaussian(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Patch Gaussian (Lopes et al., 2019): every image gets Gaussian noise inside one square, its side uniform up
    to PATCH_GAUSSIAN_SIDE of the image's, its centre anywhere (a border may cut it), its std uniform up to
    cfg.patch_gaussian. Noise teaches a model to ignore fine detail; confined to a patch, the rest of the cell
    keeps its detail to learn from."""
    size = tf.cast(tf.shape(images)[1], tf.float32)
    half = per_image(images, 0.0, PATCH_GAUSSIAN_SIDE) * size / 2
    centre_y, centre_x = per_image(images, 0.0, size), per_image(images, 0.0, size)
    pixels = tf.range(size) + 0.5
    inside = ((tf.abs(pixels[None, :, None, None] - centre_y) < half)
              & (tf.abs(pixels[None, None, :, None] - centre_x) < half))
    noise = draws.normal(tf.shape(images)) * per_image(images, 0.0, cfg.patch_gaussian)
    return tf.clip_by_value(images + tf.where(inside, noise, 0.0), 0.0, 255.0)


def apr(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """With chance cfg.apr, give an image the Fourier amplitude of another image of the batch, channel by channel,
    keeping its own phase (APR-P, Chen et al., ICCV 2021).

    The phase carries where the edges are: the cell's outline, its nucleus, the granules' places. The amplitude
    carries how strong each spatial frequency is: contrast, sharpness, grain. A blur by a Gaussian only scales the
    amplitude and leaves the phase as it was, so a model told that the amplitude is another cell's learns to read
    structure. The zero frequency (each channel's mean) stays the image's own: a cell's colour is a class cue, and
    another cell's mean would be a colour cast. The partner is another picked image (now and then the image itself).
    """
    def recombine(picked):
        spectrum = tf.signal.fft2d(tf.complex(tf.transpose(picked, [0, 3, 1, 2]), 0.0))  # (m, 3, h, w)
        own = tf.abs(spectrum)
        partners = tf.gather(own, draws.shuffle(tf.range(tf.shape(picked)[0])))  # a partner's, no second FFT
        h, w = tf.shape(spectrum)[2], tf.shape(spectrum)[3]
        dc = tf.pad(tf.ones([1, 1], tf.bool), [[0, h - 1], [0, w - 1]])  # the zero frequency sits at [0, 0]
        amplitude = tf.where(dc, own, partners)
        phase = tf.math.angle(spectrum)
        mixed = tf.math.real(tf.signal.ifft2d(tf.complex(amplitude * tf.cos(phase), amplitude * tf.sin(phase))))
        return tf.transpose(mixed, [0, 2, 3, 1])
    return on_a_share(images, cfg.apr, recombine)


RANDCONV_SIZES = (1, 3, 5, 7)  # px: the kernel sizes Xu et al. draw from


def randconv(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """With chance cfg.randconv, mix an image with itself seen through a random convolution (RandConv).

    One kernel per batch, as in the paper: 3 channels in and out, a size drawn from RANDCONV_SIZES, Gaussian weights
    scaled by 1/sqrt(fan-in). A 1 px kernel is a random colour matrix; a larger one also filters texture at random,
    edges and grain one way or another, which teaches that no one texture or colour rendering is the cell. The
    weights are zero-mean, so the filter is no blur: its gain is random at every frequency. The filtered image gets
    the original's mean and standard deviation (over all channels, so a colour cast survives) before the blend, and
    borders are reflected so no dark frame appears.
    """
    def filter_and_blend(picked):
        big = max(RANDCONV_SIZES)
        size = tf.gather(tf.constant(RANDCONV_SIZES, tf.float32),
                         draws.uniform([], 0, len(RANDCONV_SIZES), tf.int32))
        inside = tf.cast(tf.abs(tf.range(big, dtype=tf.float32) - big // 2) <= (size - 1) / 2, tf.float32)
        support = (inside[:, None] * inside[None, :])[:, :, None, None]  # the centred size x size square of 7 x 7
        kernel = draws.normal([big, big, 3, 3]) * support / tf.sqrt(size * size * 3.0)
        pad = big // 2
        filtered = tf.nn.conv2d(tf.pad(picked, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT"), kernel,
                                1, "VALID")
        mean, variance = tf.nn.moments(picked, axes=[1, 2, 3], keepdims=True)
        f_mean, f_variance = tf.nn.moments(filtered, axes=[1, 2, 3], keepdims=True)
        filtered = mean + (filtered - f_mean) * tf.sqrt(variance / (f_variance + 1e-6))
        keep = draws.uniform([tf.shape(picked)[0], 1, 1, 1])
        return keep * picked + (1 - keep) * filtered
    return on_a_share(images, cfg.randconv, filter_and_blend)


AUGMIX_WIDTH = 3  # chains mixed per image, as in AugMix
AUGMIX_DEPTH = 3  # a chain has 1 to this many ops, drawn per image
AUGMIX_SEVERITY = 0.3  # AugMix's default severity 3 of 10: an op's magnitude is uniform in [0.01, 0.3] of its most
AUGMIX_MOST = dict(rotate=math.radians(30), shear=0.3, translate=1 / 3, solarize=256.0)  # AugMix's ranges at 10/10
AUGMIX_OPS = ("autocontrast", "equalize", "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _autocontrast(x):
    low = tf.reduce_min(x, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    return tf.where(high > low, (x - low) * 255.0 / tf.maximum(high - low, 1e-6), x)


def _equalize(x):
    """Each channel mapped through its own cumulative histogram (256 bins): a flat histogram from 0 to 255."""
    shape = tf.shape(x)
    channels = tf.reshape(tf.transpose(x, [0, 3, 1, 2]), [shape[0] * 3, -1])  # (images * 3, pixels)
    bins = tf.cast(tf.clip_by_value(tf.round(channels), 0.0, 255.0), tf.int32)
    cumulative = tf.cumsum(tf.math.bincount(bins, minlength=256, maxlength=256, axis=-1, dtype=tf.float32), axis=1)
    # As OpenCV's equalizeHist: the darkest level present goes to 0, the brightest to 255.
    darkest = tf.reduce_min(tf.where(cumulative > 0, cumulative, cumulative[:, -1:]), axis=1, keepdims=True)
    lut = 255.0 * tf.maximum(cumulative - darkest, 0.0) / tf.maximum(cumulative[:, -1:] - darkest, 1.0)
    flat = tf.gather(lut, bins, batch_dims=1)
    return tf.transpose(tf.reshape(flat, [shape[0], 3, shape[1], shape[2]]), [0, 2, 3, 1])


def _solarize(x, level):
    return tf.where(x >= 255.0 - tf.abs(level)[:, None, None, None] * AUGMIX_MOST["solarize"], 255.0 - x, x)


def _augmix_warp(x, op, level):
    """Rotation, shear or translation by level of its AugMix range, as op says for each image."""
    size = tf.cast(tf.shape(x)[1], tf.float32)

    def amount(name, most):
        return tf.where(op == AUGMIX_OPS.index(name), level * most, 0.0)
    angle = amount("rotate", AUGMIX_MOST["rotate"])
    shear_x, shear_y = amount("shear_x", AUGMIX_MOST["shear"]), amount("shear_y", AUGMIX_MOST["shear"])
    cos, sin = tf.cos(angle), tf.sin(angle)
    # rotation @ [[1, shear_x], [shear_y, 1]]; an image has one of the three at most, the others are zero.
    return affine_warp(x, cos - sin * shear_y, cos * shear_x - sin, sin + cos * shear_y, sin * shear_x + cos,
                       amount("translate_x", AUGMIX_MOST["translate"] * size),
                       amount("translate_y", AUGMIX_MOST["translate"] * size), "REFLECT")


def _augmix_step(x, op):
    """One op of a chain on every image: op[i] indexes AUGMIX_OPS, -1 leaves image i as it is (a shorter chain).
    Each image pays for its own op only."""
    batch = tf.shape(x)[0]
    level = draws.uniform([batch], 0.01, AUGMIX_SEVERITY) * tf.where(draws.uniform([batch]) < 0.5, -1.0, 1.0)
    groups = ((lambda x, op, level: _autocontrast(x), op == AUGMIX_OPS.index("autocontrast")),
              (lambda x, op, level: _equalize(x), op == AUGMIX_OPS.index("equalize")),
              (lambda x, op, level: _solarize(x, level), op == AUGMIX_OPS.index("solarize")),
              (_augmix_warp, op >= AUGMIX_OPS.index("rotate")))
    for transform, chosen in groups:
        rows = tf.where(chosen)
        picked = tf.gather_nd(x, rows)
        x = tf.tensor_scatter_nd_update(x, rows, transform(picked, tf.gather_nd(op, rows), tf.gather_nd(level, rows)))
    return x


def augmix(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """With chance cfg.augmix, AugMix's augmentation mixing (Hendrycks et al., ICLR 2020): AUGMIX_WIDTH chains of 1
    to AUGMIX_DEPTH random ops, mixed with Dirichlet(1) weights, then blended with the image by a Uniform(0, 1)
    weight (Beta(1, 1)). AugMix's ops and ranges at its default severity, less posterize (a held-out kind here):
    auto-contrast, equalise, solarise, rotation, shear and translation. The blend of several chains is a new
    kind of image that no single op makes; shifted copies blended together look a little like a ghosted blur."""
    def mixed(picked):
        m = tf.shape(picked)[0]
        weights = draws.gamma([AUGMIX_WIDTH, m], 1.0)
        weights = weights / tf.reduce_sum(weights, axis=0, keepdims=True)
        total = tf.zeros_like(picked)
        for chain in range(AUGMIX_WIDTH):
            depth = draws.uniform([m], 1, AUGMIX_DEPTH + 1, tf.int32)
            x = picked
            for step in range(AUGMIX_DEPTH):
                op = draws.uniform([m], 0, len(AUGMIX_OPS), tf.int32)
                x = tf.clip_by_value(_augmix_step(x, tf.where(step < depth, op, -1)), 0.0, 255.0)
            total += weights[chain][:, None, None, None] * x
        keep = draws.uniform([m, 1, 1, 1])
        return keep * picked + (1 - keep) * total
    return on_a_share(images, cfg.augmix, mixed)


# ---- corruption stage: the pseudo-private test's families, at random strengths, inside tf.data ----------
# Each op takes a float batch and a per-image strength s >= 0 (1 = the suite's severity 5). --corrupt-strength above
# 1 draws past severity 5; an op whose setting has a natural end stops there (JPEG quality 1, no contrast or colour
# left, a full channel swap) rather than turn into another corruption or an invalid setting.

def _gaussian_noise(x, s):
    return x + draws.normal(tf.shape(x)) * s * 52.0


def _salt_pepper(x, s):
    hit = draws.uniform(tf.shape(x)[:3])[..., None] < s * 0.15
    white = draws.uniform(tf.shape(x)[:3])[..., None] < 0.5
    return tf.where(hit, tf.where(white, 255.0, 0.0), x)


def _sign(x):
    return tf.where(draws.uniform([tf.shape(x)[0], 1, 1, 1]) < 0.5, -1.0, 1.0)


def _brightness(x, s):
    return x + _sign(x) * s * 0.35 * 255.0


def _lower_or_raise(x, factor):
    # Lowering stops at 0 (flat); below it the image would come back inverted.
    return tf.where(_sign(x) > 0, tf.maximum(factor, 0.0), 2.0 - factor)


def _contrast(x, s):
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    return mean + (x - mean) * _lower_or_raise(x, 1.0 - 0.74 * s)


def _saturation(x, s):
    grey = tf.reduce_sum(x * [0.299, 0.587, 0.114], axis=3, keepdims=True)
    return grey + (x - grey) * _lower_or_raise(x, 1.0 - 0.9 * s)


def _hue(x, s):
    """Turn the colour wheel by up to 60 degrees around the grey axis (luminance kept)."""
    theta = tf.reshape(_sign(x) * s, [-1, 1, 1]) * (math.pi / 3)
    matrices = HUE_LUMA + tf.cos(theta) * (np.eye(3, dtype=np.float32) - HUE_LUMA) + tf.sin(theta) * HUE_SIN
    return tf.einsum("bhwc,bdc->bhwd", x, matrices)


def _gamma(x, s):
    exponent = tf.exp(_sign(x) * s * math.log(2.2))
    return 255.0 * tf.pow(tf.clip_by_value(x, 0.0, 255.0) / 255.0, exponent)


CHANNEL_ORDERS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def _channel_swap(x, s):
    orders = tf.gather(tf.constant(CHANNEL_ORDERS), draws.uniform([tf.shape(x)[0]], 0, 5, tf.int32))
    swapped = tf.gather(x, orders, axis=3, batch_dims=1)
    return x + (swapped - x) * tf.minimum(s, 1.0)


def _pixelate(x, s):
    """Down to 25-100% of the side and back with nearest neighbour; one size per batch (resize is batch-wide)."""
    size = tf.shape(x)[1:3]
    fraction = 1.0 - 0.75 * draws.uniform([])
    small = tf.maximum(1, tf.cast(tf.cast(size, tf.float32) * fraction, tf.int32))
    low = tf.image.resize(x, small, method="area")
    return tf.image.resize(low, size, method="nearest")


def _grid_mask(x, s):
    """Square holes on a regular grid (random period and offset), black or one flat colour."""
    shape = tf.shape(x)
    batch = shape[0]
    period = draws.uniform([batch, 1, 1], 12, 33, tf.int32)
    hole = tf.maximum(1, tf.cast(tf.cast(period, tf.float32) * tf.sqrt(s[:, :, :, 0] * 0.36), tf.int32))
    oy = draws.uniform([batch, 1, 1], 0, 32, tf.int32)
    ox = draws.uniform([batch, 1, 1], 0, 32, tf.int32)
    rows, cols = tf.range(shape[1])[None, :, None], tf.range(shape[2])[None, None, :]
    hidden = tf.cast(((rows + oy) % period < hole) & ((cols + ox) % period < hole), tf.float32)[..., None]
    fill = tf.where(per_image(x) < 0.5, 0.0, draws.uniform([batch, 1, 1, 3], 0, 255))
    return x * (1 - hidden) + fill * hidden


def _patches(x, s):
    """1 to 5 flat-colour squares (10-30% of the side), more of them at higher strength."""
    shape = tf.shape(x)
    batch, h, w = shape[0], shape[1], shape[2]
    count = 1.0 + tf.floor(s[:, 0, 0, 0] * 4.999)
    rows, cols = tf.range(h)[None, :, None], tf.range(w)[None, None, :]
    out = x
    for k in range(5):
        side = tf.cast(draws.uniform([batch], 0.1, 0.3) * tf.cast(h, tf.float32), tf.int32)
        top = draws.uniform([batch], 0, 1) * tf.cast(h - side, tf.float32)
        left = draws.uniform([batch], 0, 1) * tf.cast(w - side, tf.float32)
        top, left = tf.cast(top, tf.int32)[:, None, None], tf.cast(left, tf.int32)[:, None, None]
        inside = ((rows >= top) & (rows < top + side[:, None, None]) &
                  (cols >= left) & (cols < left + side[:, None, None]) & (float(k) < count)[:, None, None])
        box = tf.cast(inside, tf.float32)[..., None]
        out = out * (1 - box) + draws.uniform([batch, 1, 1, 3], 0, 255) * box
    return out


def _jpeg(x, s):
    """JPEG round trip at quality 40 (s=0) down to 7 (s=1, the suite's severity 5), one quality per image."""
    quality = tf.cast(tf.maximum(tf.round(40.0 - 33.0 * s[:, 0, 0, 0]), 1.0), tf.int32)  # s >= 0: never above 40

    def each():
        return tf.map_fn(lambda a: tf.image.adjust_jpeg_quality(a[0] / 255.0, a[1]) * 255.0,
                         (tf.clip_by_value(x, 0.0, 255.0), quality), fn_output_signature=tf.float32)
    # In a graph, map_fn cannot stack an empty list of unknown-shape images: a batch with no JPEG pick skips it.
    return tf.cond(tf.shape(x)[0] > 0, each, lambda: x)


def _zoom(x, s, max_zoom=0.6):
    """Zoom in or out by up to 1 + max_zoom (0.6: the suite's severity 5), black or mirrored border per image.

    Stage 1 keeps its zoom mild, because a wide zoom for every image costs clean accuracy; here only the share of
    images the corruption stage picks sees the strong zooms the suite tests.
    """
    a = 1.0 / tf.exp(_sign(x)[:, 0, 0, 0] * s[:, 0, 0, 0] * math.log1p(max_zoom))  # scale > 1 zooms in
    zeros = tf.zeros_like(a)

    black_border = _sign(x) > 0  # drawn apart from the zoom's direction

    def warp(fill_mode):
        return affine_warp(x, a, zeros, zeros, a, zeros, zeros, fill_mode)
    return tf.where(black_border, warp("CONSTANT"), warp("REFLECT"))


def _blur(x, s, max_sigma=2.5):
    """Gaussian blur with sigma up to max_sigma (2.5: the suite's severity 5), one sigma per image.

    Stage 1 blurs at sigma 1.5 at most; the suite's severities 4-5 (1.8, 2.5) and its defocus disks go further.
    """
    radius = int(math.ceil(3 * max_sigma))
    sigma = tf.maximum(s[:, 0, 0, 0] * max_sigma, 0.1)  # 0.1: all weight on the centre tap, no division by zero
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    taps = tf.exp(-0.5 * tf.square(offsets[None, :] / sigma[:, None]))
    taps = tf.transpose(tf.repeat(taps / tf.reduce_sum(taps, axis=1, keepdims=True), 3, axis=0))  # (taps, images*3)

    def each():
        # The images become the channels of one image, so a depthwise conv gives each its own kernel.
        shape = tf.shape(x)
        stacked = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, shape[1], shape[2], -1])
        padded = tf.pad(stacked, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
        out = tf.nn.depthwise_conv2d(padded, taps[:, None, :, None], [1, 1, 1, 1], "VALID")
        out = tf.nn.depthwise_conv2d(out, taps[None, :, :, None], [1, 1, 1, 1], "VALID")
        return tf.transpose(tf.reshape(out, [shape[1], shape[2], shape[0], 3]), [2, 0, 1, 3])
    return tf.cond(tf.shape(x)[0] > 0, each, lambda: x)


CORRUPTION_OPS = (_gaussian_noise, _salt_pepper, _brightness, _contrast, _saturation, _hue, _gamma,
                  _channel_swap, _pixelate, _grid_mask, _patches)

# --drop-family: the corruption family of each corruption-stage op and of each stage's settings, as the suite
# corruptions they produce put them (trainer/heldout.py declares those; tests/test_heldout.py checks that these
# tables agree with it). Settings shared by families (the stage's chance, count and strength) stay as they are.
OP_FAMILY = {"_gaussian_noise": "noise", "_salt_pepper": "noise", "_brightness": "colour", "_contrast": "colour",
             "_saturation": "colour", "_hue": "colour", "_gamma": "colour", "_channel_swap": "colour",
             "_pixelate": "compression", "_jpeg": "compression", "_grid_mask": "occlusion", "_patches": "occlusion",
             "_zoom": "geometry", "_blur": "blur"}
FAMILY_FIELDS = {"geometry": ("flip", "rot90", "rotation", "zoom", "shift", "shear", "black_fill", "augmix"),
                 "colour": ("contrast", "brightness", "saturation", "hue", "randconv", "augmix", "apr", "veil"),
                 "noise": ("noise_std", "patch_gaussian", "apr"), "blur": ("blur", "apr"), "occlusion": ("erase",)}
RANDAUGMENT_GEOMETRY = ("RandomShear", "RandomTranslation")  # the rest of its transforms change colour
# Soft Augmentation's k, the power of the damage in the confidence a label loses: 2 (our choice) keeps lightly
# damaged images' labels nearly hard and softens only heavy damage much.
SOFT_POWER = 2.0
RANDAUGMENT_STDDEV = 0.15  # keras-cv RandAugment's default magnitude_stddev, which make_randaugment keeps


def op_name(op) -> str:
    return (op.func if isinstance(op, functools.partial) else op).__name__


def _corruption_slots(cfg: Config) -> tuple:
    """Every corruption-stage op the config switches on, a dropped family's too: the draw picks among these."""
    zoom = (functools.partial(_zoom, max_zoom=cfg.corrupt_zoom),) if cfg.corrupt_zoom > 0 else ()
    strong_blur = (functools.partial(_blur, max_sigma=cfg.corrupt_blur),) if cfg.corrupt_blur > 0 else ()
    return CORRUPTION_OPS + ((_jpeg,) if cfg.corrupt_jpeg else ()) + zoom + strong_blur


def _slot_weights(cfg: Config) -> list[float]:
    """How strongly the draw favours each slot of _corruption_slots: JPEG's and the strong blur's weights, 1 else."""
    weights = {"_jpeg": cfg.corrupt_jpeg_weight, "_blur": cfg.corrupt_blur_weight}
    return [weights.get(op_name(op), 1.0) for op in _corruption_slots(cfg)]


def corruption_ops(cfg: Config) -> tuple:
    """The corruption-stage ops an image can get: those the config switches on, less cfg.drop_family's."""
    return tuple(op for op in _corruption_slots(cfg) if OP_FAMILY[op_name(op)] != cfg.drop_family)


def without_dropped_family(cfg: Config) -> Config:
    """cfg with the stage settings of cfg.drop_family at their off values (the colour stage's noise belongs to
    noise, not colour); the same cfg when it drops none."""
    off = off_values()
    return dataclasses.replace(cfg, **{name: off[name] for name in FAMILY_FIELDS.get(cfg.drop_family, ())})


def draw_ops(batch: tf.Tensor, cfg: Config) -> tf.Tensor:
    """(batch, slots) bool: the corruption-stage ops each image gets, slots as in _corruption_slots. With chance
    cfg.corrupt an image gets 1 to cfg.corrupt_ops distinct ones, weighted as _slot_weights says."""
    weights = _slot_weights(cfg)
    chosen = draws.uniform([batch]) < cfg.corrupt
    k = draws.uniform([batch], 1, cfg.corrupt_ops + 1, tf.int32)
    scores = draws.uniform([batch, len(weights)])
    if any(w != 1.0 for w in weights):
        # Weighted draw without replacement (Efraimidis and Spirakis, 2006): the k highest (1 - u)**(1/w) win,
        # so the k lowest 1 - (1 - u)**(1/w); a weight of 1 leaves a score as it was.
        scores = 1.0 - tf.pow(1.0 - scores, 1.0 / tf.constant(weights, tf.float32))
    kth = tf.gather(tf.sort(scores, axis=1), k - 1, axis=1, batch_dims=1)  # the k lowest scores pick the ops
    return chosen[:, None] & (scores <= kth[:, None])


def corrupt_and_damage(images: tf.Tensor, cfg: Config) -> tuple[tf.Tensor, tf.Tensor]:
    """With chance cfg.corrupt, give an image 1 to cfg.corrupt_ops distinct corruptions at random strengths; also
    return each image's damage in [0, 1]: 1 - the product of (1 - strength) over its ops (0 = untouched), the ops of
    family cfg.soft_spare left out.

    The ops mirror the pseudo-private suite's noise, colour, compression and occlusion families, its zoom with
    cfg.corrupt_zoom and its Gaussian blur with cfg.corrupt_blur. Shot noise and motion/defocus blur stay out, and
    JPEG too unless cfg.corrupt_jpeg, so the suite also measures corruptions the model never trained on.
    """
    batch = tf.shape(images)[0]
    picks = draw_ops(batch, cfg)
    intact = tf.ones([batch])
    for j, op in enumerate(_corruption_slots(cfg)):
        family = OP_FAMILY[op_name(op)]
        # A dropped family's op keeps its slot and does nothing there, so every other op is picked as often as
        # without the drop: leaving a family out changes only what that family's ops did.
        if family == cfg.drop_family:
            continue
        rows = tf.where(picks[:, j])  # (m, 1): only these images pay for the op
        picked = tf.gather_nd(images, rows)
        strength = draws.uniform([tf.shape(rows)[0], 1, 1, 1]) * cfg.corrupt_strength
        images = tf.tensor_scatter_nd_update(images, rows, tf.clip_by_value(op(picked, strength), 0.0, 255.0))
        if family != cfg.soft_spare:
            intact *= 1.0 - tf.scatter_nd(rows, tf.minimum(strength[:, 0, 0, 0], 1.0), [batch])
    return images, 1.0 - intact


def soften(labels: tf.Tensor, damage: tf.Tensor, amount: float, power: float = SOFT_POWER) -> tf.Tensor:
    """Soft Augmentation's targets (Liu et al., CVPR 2023): the true class keeps 1 - amount * damage**power of the
    confidence, the rest is shared evenly by the other classes; labels are one-hot rows."""
    keep = (1.0 - amount * tf.pow(damage, power))[:, None]
    spread = (1.0 - keep) / tf.cast(tf.shape(labels)[-1] - 1, labels.dtype)
    return labels * keep + (1.0 - labels) * spread


def mix(images: tf.Tensor, labels: tf.Tensor, cfg: Config) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp and/or CutMix inside a batch (half the batches each when both are on)."""
    batch = tf.shape(images)[0]
    perm = draws.shuffle(tf.range(batch))
    other_images, other_labels = tf.gather(images, perm), tf.gather(labels, perm)

    def beta(alpha):
        a = draws.gamma([batch], alpha)
        b = draws.gamma([batch], alpha)
        return a / (a + b)

    def mixup():
        lam = beta(cfg.mixup_alpha)
        li = lam[:, None, None, None]
        return images * li + other_images * (1 - li), labels * lam[:, None] + other_labels * (1 - lam[:, None])

    def cutmix():
        lam = beta(cfg.cutmix_alpha)
        h, w = tf.shape(images)[1], tf.shape(images)[2]
        cut = tf.sqrt(1.0 - lam)
        ch, cw = tf.cast(cut * tf.cast(h, tf.float32), tf.int32), tf.cast(cut * tf.cast(w, tf.float32), tf.int32)
        cy = draws.uniform([batch], 0, h, tf.int32)
        cx = draws.uniform([batch], 0, w, tf.int32)
        rows, cols = tf.range(h)[None, :, None], tf.range(w)[None, None, :]
        box = ((rows >= (cy - ch // 2)[:, None, None]) & (rows < (cy + ch // 2)[:, None, None]) &
               (cols >= (cx - cw // 2)[:, None, None]) & (cols < (cx + cw // 2)[:, None, None]))
        box = tf.cast(box, tf.float32)[..., None]
        area = tf.reduce_mean(box, axis=[1, 2, 3])  # real share pasted, after clipping at the border
        return images * (1 - box) + other_images * box, labels * (1 - area)[:, None] + other_labels * area[:, None]

    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        mixed, soft = tf.cond(draws.uniform([]) < 0.5, mixup, cutmix)
    else:
        mixed, soft = mixup() if cfg.mixup_alpha > 0 else cutmix()
    return tf.clip_by_value(mixed, 0.0, 255.0), soft  # blending can round a hair past 255


def make_randaugment(cfg: Config):
    """keras-cv's RandAugment: it really changes images inside tf.data (Keras 3's own did not, in our check)."""
    import keras
    import keras_cv
    # Built under float32, whatever the training policy: its sub-layers take the global policy when created,
    # and a bfloat16 one would clash with the float32 pipeline around it.
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        if cfg.drop_family == "colour":  # its shear and translation alone, drawn as RandAugment draws
            layers = [layer for layer in keras_cv.layers.RandAugment.get_standard_policy(
                (0, 255), cfg.randaugment_magnitude, RANDAUGMENT_STDDEV, geometric=True, seed=cfg.seed)
                if type(layer).__name__ in RANDAUGMENT_GEOMETRY]
            return keras_cv.layers.RandomAugmentationPipeline(layers, cfg.randaugment_layers,
                                                              rate=cfg.randaugment_rate, seed=cfg.seed)
        return keras_cv.layers.RandAugment(value_range=(0, 255), augmentations_per_image=cfg.randaugment_layers,
                                           magnitude=cfg.randaugment_magnitude, rate=cfg.randaugment_rate,
                                           geometric=cfg.drop_family != "geometry", seed=cfg.seed)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def augment_and_damage(images: tf.Tensor, cfg: Config, randaugment=None) -> tuple[tf.Tensor, tf.Tensor]:
    """All per-image augmentation of one float batch, stage 1 then stage 2 (less cfg.drop_family's), and each
    image's damage from the corruption stage (see corrupt_and_damage; zeros when the stage is off)."""
    cfg = without_dropped_family(cfg)
    images = geometry(images, cfg)
    if randaugment is not None:
        images = randaugment(images, training=True)
    if cfg.augmix > 0:
        images = augmix(images, cfg)
    images = colour(images, cfg)
    if cfg.veil > 0:
        images = veil(images, cfg)
    if cfg.patch_gaussian > 0:
        images = patch_gaussian(images, cfg)
    if cfg.blur > 0:
        images = blur(images, cfg)
    if cfg.erase > 0:
        images = erase(images, cfg)
    if cfg.randconv > 0:
        images = randconv(images, cfg)
    if cfg.pixmix > 0:
        images = pixmix(images, cfg)
    if cfg.apr > 0:
        images = apr(images, cfg)
    if cfg.corrupt > 0:
        return corrupt_and_damage(images, cfg)
    return images, tf.zeros(tf.shape(images)[:1])


def augment_batch(images: tf.Tensor, cfg: Config, randaugment=None) -> tf.Tensor:
    """All per-image augmentation of one float batch (see augment_and_damage)."""
    return augment_and_damage(images, cfg, randaugment)[0]


def images_per_step(cfg: Config) -> int:
    """Distinct images in a training batch: with the consistency loss, batch_size/2 images seen twice (the two
    views' halves line up)."""
    return cfg.batch_size // (2 if cfg.consistency > 0 else 1)


def train_dataset(images: np.ndarray, labels: np.ndarray, cfg: Config, sample_weights: np.ndarray | None = None,
                  repeat: bool = True, size: tf.Variable | None = None) -> tf.data.Dataset:
    """Shuffled, augmented, batched (images float32 0-255, one-hot labels) with prefetch.

    size: when given, batches are downscaled to size x size after augmentation while it is below 96; it is read
    as batches are made, so training can change it between epochs (a few prefetched batches lag behind).
    """
    tf.random.set_seed(cfg.seed)
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    parts = (images, onehot) if sample_weights is None else (images, onehot, sample_weights.astype(np.float32))
    ds = tf.data.Dataset.from_tensor_slices(parts).cache()
    ds = ds.shuffle(min(len(images), 20000), seed=cfg.seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    views = 2 if cfg.consistency > 0 else 1
    per_batch = images_per_step(cfg)
    ds = ds.batch(per_batch, drop_remainder=len(images) >= per_batch).enumerate()
    randaugment = make_randaugment(cfg) if cfg.randaugment else None

    def apply(index, batch):
        if views == 2:
            batch = tuple(tf.concat([part, part], axis=0) for part in batch)
        with draws.seeded(tf.stack([tf.constant(cfg.seed, tf.int64), index])):  # batch k of a run: one key
            x, damage = augment_and_damage(tf.cast(batch[0], tf.float32), cfg, randaugment)
            y = soften(batch[1], damage, cfg.soft_corrupt) if cfg.soft_corrupt > 0 else batch[1]
            if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
                x, y = mix(x, y, cfg)
        if size is not None:
            # Augment at full size, so every strength means what it says, then shrink: antialiased, like a
            # lower-resolution camera, and clipped, since rounding can leave 255.00003.
            x = tf.cond(size < x.shape[1],
                        lambda: tf.clip_by_value(tf.image.resize(x, tf.stack([size, size]), antialias=True), 0, 255),
                        lambda: x)
        return (x, y) + tuple(batch[2:])

    # keras-cv's RandAugment draws from its own stateful generator, which parallel threads would read in any order.
    calls = None if randaugment is not None else AUTOTUNE
    return ds.map(apply, num_parallel_calls=calls).prefetch(AUTOTUNE)


def eval_dataset(images: np.ndarray, labels: np.ndarray | None, batch_size: int) -> tf.data.Dataset:
    """Plain batches, no augmentation: images float32 0-255, one-hot labels when given."""
    if labels is None:
        ds = tf.data.Dataset.from_tensor_slices(images)
        return ds.batch(batch_size).map(lambda x: tf.cast(x, tf.float32)).prefetch(AUTOTUNE)
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    ds = tf.data.Dataset.from_tensor_slices((images, onehot)).batch(batch_size)
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(AUTOTUNE)


def augmented_samples(images: np.ndarray, cfg: Config, n: int = 32) -> np.ndarray:
    """n augmented versions of the first images, uint8, for a look at what the model trains on."""
    tf.random.set_seed(cfg.seed)
    batch = tf.constant(images[:n], tf.float32)
    randaugment = make_randaugment(cfg) if cfg.randaugment else None
    with draws.seeded(tf.constant([cfg.seed, 0], tf.int64)):
        out = augment_batch(batch, cfg, randaugment)
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


