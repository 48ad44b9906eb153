"""tf.data input pipelines: fixed geometry, then RandAugment, colour, noise, erasing and MixUp/CutMix."""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from .config import Config
from .data import NUM_CLASSES

AUTOTUNE = tf.data.AUTOTUNE


def geometry(images: tf.Tensor, cfg: Config, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Stage 1 on a float batch: flips, 90-degree turns, then one affine warp (rotation, zoom, shift).

    Blood cells have no orientation, so every symmetry of the square is a free, label-preserving view.
    """
    batch = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1], tf.float32)
    if cfg.flip:
        flip = tf.random.uniform([batch, 1, 1, 1]) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    if cfg.rot90:
        transpose = tf.random.uniform([batch, 1, 1, 1]) < 0.5  # transpose + flip = all 8 symmetries
        images = tf.where(transpose, tf.transpose(images, [0, 2, 1, 3]), images)
        flip_v = tf.random.uniform([batch, 1, 1, 1]) < 0.5
        images = tf.where(flip_v, tf.reverse(images, axis=[1]), images)
    if cfg.rotation <= 0 and cfg.zoom <= 0 and cfg.shift <= 0:
        return images
    angle = tf.random.uniform([batch], -1.0, 1.0) * cfg.rotation * 2 * math.pi
    scale = 1.0 + tf.random.uniform([batch], -1.0, 1.0) * cfg.zoom
    dx = tf.random.uniform([batch], -1.0, 1.0) * cfg.shift * size
    dy = tf.random.uniform([batch], -1.0, 1.0) * cfg.shift * size
    # Output pixel (x, y) samples input at A @ (x - c) + c + d, with A = rotation / scale.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    c = (size - 1) / 2
    transforms = tf.stack([cos, -sin, c - cos * c + sin * c + dx,
                           sin, cos, c - sin * c - cos * c + dy,
                           tf.zeros([batch]), tf.zeros([batch])], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        interpolation="BILINEAR", fill_mode="REFLECT", fill_value=0.0)


def colour(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Contrast, brightness, colour degeneration, hue and Gaussian noise, each strength from the config."""
    batch = tf.shape(images)[0]
    def uniform(low, high):
        return tf.random.uniform([batch, 1, 1, 1], low, high)
    if cfg.contrast > 0:
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = (images - mean) * uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    if cfg.brightness > 0:
        images = images + uniform(-cfg.brightness, cfg.brightness) * 255.0
    if cfg.saturation > 0:
        grey = tf.reduce_mean(images, axis=3, keepdims=True)
        keep = 1.0 - uniform(0.0, cfg.saturation)
        images = grey + (images - grey) * keep
    if cfg.hue > 0:
        images = tf.clip_by_value(images, 0, 255) / 255.0
        delta = tf.random.uniform([batch], -cfg.hue, cfg.hue)
        images = tf.map_fn(lambda a: tf.image.adjust_hue(a[0], a[1]), (images, delta),
                           fn_output_signature=tf.float32) * 255.0
    if cfg.noise_std > 0:
        images = images + tf.random.normal(tf.shape(images)) * uniform(0.0, cfg.noise_std)
    return tf.clip_by_value(images, 0.0, 255.0)


def blur(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Gaussian blur of random strength: a random blend of each image with its blur at sigma cfg.blur."""
    radius = max(1, int(math.ceil(2 * cfg.blur)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / cfg.blur) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    rows = tf.constant(np.tile(taps[:, None, None, None], (1, 1, 3, 1)))
    cols = tf.constant(np.tile(taps[None, :, None, None], (1, 1, 3, 1)))
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], "VALID")
    batch = tf.shape(images)[0]
    amount = tf.random.uniform([batch, 1, 1, 1]) * tf.cast(tf.random.uniform([batch, 1, 1, 1]) < 0.5, tf.float32)
    return images + (blurred - images) * amount


def erase(images: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Random erasing: with chance cfg.erase, one rectangle (10-30% of the side) becomes noise or a flat colour."""
    shape = tf.shape(images)
    batch, h, w = shape[0], shape[1], shape[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    side_h = tf.cast(tf.random.uniform([batch], 0.1, 0.3) * hf, tf.int32)
    side_w = tf.cast(tf.random.uniform([batch], 0.1, 0.3) * wf, tf.int32)
    top = tf.cast(tf.random.uniform([batch]) * tf.cast(h - side_h, tf.float32), tf.int32)
    left = tf.cast(tf.random.uniform([batch]) * tf.cast(w - side_w, tf.float32), tf.int32)
    rows = tf.range(h)[None, :, None]
    cols = tf.range(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + side_h)[:, None, None]) &
              (cols >= left[:, None, None]) & (cols < (left + side_w)[:, None, None]))
    chosen = tf.random.uniform([batch, 1, 1]) < cfg.erase
    mask = tf.cast(inside & chosen, tf.float32)[..., None]
    flat = tf.random.uniform([batch, 1, 1, 3], 0, 255)
    use_noise = tf.random.uniform([batch, 1, 1, 1]) < 0.5
    fill = tf.where(use_noise, tf.random.uniform(shape, 0, 255), flat + tf.zeros_like(images))
    return images * (1 - mask) + fill * mask


def mix(images: tf.Tensor, labels: tf.Tensor, cfg: Config) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp and/or CutMix inside a batch (half the batches each when both are on)."""
    batch = tf.shape(images)[0]
    perm = tf.random.shuffle(tf.range(batch))
    other_images, other_labels = tf.gather(images, perm), tf.gather(labels, perm)

    def beta(alpha):
        a = tf.random.gamma([batch], alpha)
        b = tf.random.gamma([batch], alpha)
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
        cy = tf.random.uniform([batch], 0, h, tf.int32)
        cx = tf.random.uniform([batch], 0, w, tf.int32)
        rows, cols = tf.range(h)[None, :, None], tf.range(w)[None, None, :]
        box = ((rows >= (cy - ch // 2)[:, None, None]) & (rows < (cy + ch // 2)[:, None, None]) &
               (cols >= (cx - cw // 2)[:, None, None]) & (cols < (cx + cw // 2)[:, None, None]))
        box = tf.cast(box, tf.float32)[..., None]
        area = tf.reduce_mean(box, axis=[1, 2, 3])  # real share pasted, after clipping at the border
        return images * (1 - box) + other_images * box, labels * (1 - area)[:, None] + other_labels * area[:, None]

    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        mixed, soft = tf.cond(tf.random.uniform([]) < 0.5, mixup, cutmix)
    else:
        mixed, soft = mixup() if cfg.mixup_alpha > 0 else cutmix()
    return tf.clip_by_value(mixed, 0.0, 255.0), soft  # blending can round a hair past 255


def make_randaugment(cfg: Config):
    """keras-cv's RandAugment: it really changes images inside tf.data (Keras 3's own did not, in our check)."""
    import keras_cv
    return keras_cv.layers.RandAugment(value_range=(0, 255), augmentations_per_image=cfg.randaugment_layers,
                                       magnitude=cfg.randaugment_magnitude, rate=cfg.randaugment_rate,
                                       seed=cfg.seed)


def augment_batch(images: tf.Tensor, cfg: Config, randaugment=None) -> tf.Tensor:
    """All per-image augmentation of one float batch, stage 1 then stage 2."""
    images = geometry(images, cfg)
    if randaugment is not None:
        images = randaugment(images, training=True)
    images = colour(images, cfg)
    if cfg.blur > 0:
        images = blur(images, cfg)
    if cfg.erase > 0:
        images = erase(images, cfg)
    return images


def train_dataset(images: np.ndarray, labels: np.ndarray, cfg: Config, sample_weights: np.ndarray | None = None,
                  repeat: bool = True) -> tf.data.Dataset:
    """Shuffled, augmented, batched (images float32 0-255, one-hot labels) with prefetch."""
    tf.random.set_seed(cfg.seed)
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
    parts = (images, onehot) if sample_weights is None else (images, onehot, sample_weights.astype(np.float32))
    ds = tf.data.Dataset.from_tensor_slices(parts).cache()
    ds = ds.shuffle(min(len(images), 20000), seed=cfg.seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(cfg.batch_size, drop_remainder=len(images) >= cfg.batch_size)
    randaugment = make_randaugment(cfg) if cfg.randaugment else None

    def apply(*batch):
        x = augment_batch(tf.cast(batch[0], tf.float32), cfg, randaugment)
        y = batch[1]
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            x, y = mix(x, y, cfg)
        return (x, y) + tuple(batch[2:])

    return ds.map(apply, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


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
    out = augment_batch(batch, cfg, randaugment)
    return np.clip(np.rint(out.numpy()), 0, 255).astype(np.uint8)


def save_grid(originals: np.ndarray, augmented: np.ndarray, path: str, cols: int = 8) -> None:
    """PNG grid: each original above its augmented version."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .data import save_figure
    n = len(augmented)
    rows = 2 * math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.35 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = 2 * (i // cols), i % cols
        axes[r, c].imshow(originals[i])
        axes[r + 1, c].imshow(augmented[i])
        if r == 0:
            axes[r, c].set_title("original", fontsize=6)
            axes[r + 1, c].set_title("augmented", fontsize=6)
    fig.suptitle("Training augmentation: original (upper) and augmented (lower)", fontsize=9)
    save_figure(fig, path)
