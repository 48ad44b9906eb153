"""ImageNet-C style corruptions (severity 0-5) for building a local pseudo-private test set."""

import argparse
import io
import os
import sys
import zipfile
from collections import Counter

import numpy as np
from PIL import Image

SEVERITIES = (1, 2, 3, 4, 5)

# Parameters per severity 1..5, in the spirit of ImageNet-C but scaled for 96x96 cells:
# 3 should stay readable for an expert, 5 only barely.
GAUSSIAN_SIGMA = (0.04, 0.07, 0.10, 0.14, 0.20)  # noise std, fraction of 255
SHOT_PHOTONS = (250, 100, 50, 25, 12)  # photons at full white; fewer photons, more noise
SALT_PEPPER_AMOUNT = (0.01, 0.03, 0.06, 0.10, 0.15)  # fraction of pixels set to black or white
BLUR_SIGMA = (0.6, 0.9, 1.3, 1.8, 2.5)  # gaussian std in pixels
MOTION_LENGTH = (3, 5, 7, 9, 12)  # streak length in pixels, random direction
DEFOCUS_RADIUS = (1.0, 1.5, 2.0, 2.8, 3.6)  # disk radius in pixels
BRIGHTNESS_SHIFT = (0.06, 0.12, 0.18, 0.26, 0.35)  # added or subtracted, fraction of 255
CONTRAST_FACTOR = (0.8, 0.65, 0.5, 0.38, 0.26)  # scale around the image mean, or 2 - it to raise
SATURATION_FACTOR = (0.75, 0.55, 0.4, 0.25, 0.1)  # scale of colour around grey, or 2 - it to raise
HUE_DEGREES = (10, 20, 32, 45, 60)  # rotation of the colour wheel
GAMMA = (1.2, 1.35, 1.55, 1.8, 2.2)  # exponent (or its inverse)
CHANNEL_MIX = (0.2, 0.4, 0.6, 0.8, 1.0)  # blend towards a permutation of the RGB channels
ROTATE_DEGREES = (5, 10, 18, 28, 40)
ZOOM_FACTOR = (1.08, 1.16, 1.27, 1.4, 1.6)  # zoom in by the factor, or out by its inverse
SHIFT_FRACTION = (0.04, 0.08, 0.12, 0.17, 0.23)  # of the image side, in a random direction
SHEAR_FACTOR = (0.08, 0.15, 0.24, 0.34, 0.46)
JPEG_QUALITY = (30, 20, 14, 10, 7)
PIXELATE_FRACTION = (0.65, 0.5, 0.4, 0.32, 0.25)  # side of the low-resolution copy
PATCH_COUNT = (1, 2, 3, 4, 5)
PATCH_SIDE = (0.14, 0.17, 0.2, 0.22, 0.24)  # of the image side
GRID_HOLE_AREA = (0.06, 0.12, 0.2, 0.28, 0.36)  # fraction of the image hidden by the grid


def _param(table, severity):
    return table[severity - 1]


def _to_uint8(x):
    # Clip first: casting out-of-range floats to uint8 wraps around.
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _signs(rng, n):
    """One random +1/-1 per image, shaped to broadcast over (N, H, W, C)."""
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=n).reshape(n, 1, 1, 1)


def _inverse_if(factor, signs):
    """factor where sign is +1, 1 / factor where it is -1 (e.g. zoom in or out)."""
    return np.float32(factor) ** signs


def _lower_or_raise(factor, signs):
    """factor (< 1) where sign is +1, 2 - factor where it is -1: the inverse 1 / factor
    would blow a raise up far more than the matching lower (x3.8 for 0.26)."""
    return np.where(signs > 0, factor, 2 - factor).astype(np.float32)


# ---------------------------------------------------------------- noise

def gaussian_noise(images, severity, rng):
    sigma = _param(GAUSSIAN_SIGMA, severity) * 255
    return _to_uint8(images + rng.normal(0, sigma, images.shape).astype(np.float32))


def shot_noise(images, severity, rng):
    photons = _param(SHOT_PHOTONS, severity)
    return _to_uint8(rng.poisson(images / 255.0 * photons) / photons * 255)


def salt_pepper(images, severity, rng):
    amount = _param(SALT_PEPPER_AMOUNT, severity)
    out = images.copy()
    hit = rng.random(images.shape[:3]) < amount
    white = rng.random(images.shape[:3]) < 0.5
    out[hit & white] = 255
    out[hit & ~white] = 0
    return out


# ---------------------------------------------------------------- blur

def _convolve(images, kernel):
    """Convolve float images (N, H, W, C) with a small 2-D kernel; edges are extended, not darkened."""
    kh, kw = kernel.shape
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode="edge")
    out = np.zeros(images.shape, dtype=np.float32)
    for i, j in zip(*np.nonzero(kernel)):
        out += kernel[i, j] * padded[:, i:i + h, j:j + w]
    return out


def gaussian_blur(images, severity, rng):
    sigma = _param(BLUR_SIGMA, severity)
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    # Separable: one pass along rows, one along columns.
    out = _convolve(images.astype(np.float32), taps[None, :])
    return _to_uint8(_convolve(out, taps[:, None]))


def _line_kernel(length, angle):
    size = length + 1 - length % 2  # odd, so the streak is centred
    kernel = np.zeros((size, size), dtype=np.float32)
    centre = size // 2
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length):
        kernel[int(round(centre + t * np.sin(angle))), int(round(centre + t * np.cos(angle)))] += 1
    return kernel / kernel.sum()


def motion_blur(images, severity, rng):
    length = _param(MOTION_LENGTH, severity)
    angles = rng.uniform(0, np.pi, len(images))
    out = np.empty(images.shape, dtype=np.uint8)
    for i, angle in enumerate(angles):  # each image moves in its own direction
        out[i] = _to_uint8(_convolve(images[i:i + 1].astype(np.float32), _line_kernel(length, angle)))[0]
    return out


def defocus_blur(images, severity, rng):
    radius = _param(DEFOCUS_RADIUS, severity)
    size = int(np.ceil(radius))
    ys, xs = np.mgrid[-size:size + 1, -size:size + 1]
    # Disk with a soft one-pixel rim, so small radii still grow smoothly.
    disk = np.clip(radius + 0.5 - np.hypot(ys, xs), 0, 1).astype(np.float32)
    return _to_uint8(_convolve(images.astype(np.float32), disk / disk.sum()))


# ---------------------------------------------------------------- colour

def brightness(images, severity, rng):
    shift = _param(BRIGHTNESS_SHIFT, severity) * 255 * _signs(rng, len(images))
    return _to_uint8(images + shift)


def contrast(images, severity, rng):
    factor = _lower_or_raise(_param(CONTRAST_FACTOR, severity), _signs(rng, len(images)))
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(mean + (images - mean) * factor)


def _grey(images):
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (images @ weights)[..., None]


def saturation(images, severity, rng):
    factor = _lower_or_raise(_param(SATURATION_FACTOR, severity), _signs(rng, len(images)))
    grey = _grey(images.astype(np.float32))
    return _to_uint8(grey + (images - grey) * factor)


# Hue rotation around the grey axis, keeping luminance: M = LUMA + cos * (I - LUMA) + sin * HUE_SIN.
HUE_LUMA = np.array([[0.213, 0.715, 0.072]] * 3, dtype=np.float32)
HUE_SIN = np.array([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]], dtype=np.float32)


def _hue_matrix(degrees):
    """RGB matrix that turns the hue by `degrees` around the grey axis, keeping luminance."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (HUE_LUMA + c * (np.eye(3, dtype=np.float32) - HUE_LUMA) + s * HUE_SIN).astype(np.float32)


def hue(images, severity, rng):
    degrees = _param(HUE_DEGREES, severity) * _signs(rng, len(images)).ravel()
    matrices = np.stack([_hue_matrix(d) for d in degrees])  # (N, 3, 3)
    return _to_uint8(np.einsum("nhwc,ndc->nhwd", images.astype(np.float32), matrices))


def gamma(images, severity, rng):
    exponent = _inverse_if(_param(GAMMA, severity), _signs(rng, len(images)))
    return _to_uint8(255 * (images / np.float32(255)) ** exponent)


# The five orders of R, G, B that differ from the original.
CHANNEL_ORDERS = np.array([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def channel_swap(images, severity, rng):
    # A blend instead of a hard swap, so severity has a meaning; at 5 it is a full swap.
    mix = _param(CHANNEL_MIX, severity)
    orders = CHANNEL_ORDERS[rng.integers(len(CHANNEL_ORDERS), size=len(images))]
    swapped = np.take_along_axis(images, orders[:, None, None, :], axis=3)
    return _to_uint8((1 - mix) * images + mix * swapped.astype(np.float32))


# ---------------------------------------------------------------- geometry

def _warp(images, matrices, offsets):
    """Bilinear resampling where output pixel p (centred coordinates) reads source pixel
    matrices @ p + offsets; pixels that come from outside the image are black, as in most pipelines."""
    n, h, w, _ = images.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ys, xs = ys - cy, xs - cx
    m = matrices.astype(np.float32)[:, :, :, None, None]
    src_x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + offsets[:, 0, None, None] + cx
    src_y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + offsets[:, 1, None, None] + cy
    x0, y0 = np.floor(src_x), np.floor(src_y)
    fx, fy = src_x - x0, src_y - y0
    batch = np.arange(n)[:, None, None]
    out = np.zeros(images.shape, dtype=np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = (y0 + dy).astype(np.intp), (x0 + dx).astype(np.intp)
            inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            pixels = images[batch, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
            out += (wy * wx * inside)[..., None] * pixels
    return _to_uint8(out)


def _no_offsets(n):
    return np.zeros((n, 2), dtype=np.float32)


def rotate(images, severity, rng):
    angles = np.radians(_param(ROTATE_DEGREES, severity)) * _signs(rng, len(images)).ravel()
    c, s = np.cos(angles), np.sin(angles)
    matrices = np.stack([np.stack([c, s], 1), np.stack([-s, c], 1)], 1)  # inverse rotation
    return _warp(images, matrices, _no_offsets(len(images)))


# Growing sets of flips/right-angle turns: heavier severities allow less familiar orientations.
FLIP_CHOICES = (
    ("left_right",),
    ("left_right", "up_down"),
    ("left_right", "up_down", "turn_180"),
    ("left_right", "up_down", "turn_180", "turn_90", "turn_270"),
    ("left_right", "up_down", "turn_180", "turn_90", "turn_270", "transpose", "anti_transpose"),
)


def _flip_one(image, how):
    if how == "left_right":
        return image[:, ::-1]
    if how == "up_down":
        return image[::-1]
    if how == "turn_180":
        return image[::-1, ::-1]
    if how == "turn_90":
        return np.rot90(image, 1)
    if how == "turn_270":
        return np.rot90(image, 3)
    if how == "transpose":
        return image.transpose(1, 0, 2)
    return image[::-1, ::-1].transpose(1, 0, 2)  # anti_transpose


def flip(images, severity, rng):
    choices = _param(FLIP_CHOICES, severity)
    if images.shape[1] != images.shape[2]:
        choices = choices[:3]  # right-angle turns and transposes only fit square images
    picks = rng.integers(len(choices), size=len(images))
    return np.stack([_flip_one(image, choices[k]) for image, k in zip(images, picks)])


def zoom(images, severity, rng):
    factor = _inverse_if(_param(ZOOM_FACTOR, severity), _signs(rng, len(images)).ravel())
    matrices = np.eye(2, dtype=np.float32) / factor[:, None, None]
    return _warp(images, matrices, _no_offsets(len(images)))


def shift(images, severity, rng):
    distance = _param(SHIFT_FRACTION, severity) * min(images.shape[1:3])
    angles = rng.uniform(0, 2 * np.pi, len(images))
    offsets = -distance * np.stack([np.cos(angles), np.sin(angles)], 1)
    matrices = np.broadcast_to(np.eye(2, dtype=np.float32), (len(images), 2, 2))
    return _warp(images, matrices, offsets.astype(np.float32))


def shear(images, severity, rng):
    amounts = _param(SHEAR_FACTOR, severity) * _signs(rng, len(images)).ravel()
    vertical = rng.random(len(images)) < 0.5
    matrices = np.tile(np.eye(2, dtype=np.float32), (len(images), 1, 1))
    matrices[~vertical, 0, 1] = amounts[~vertical]
    matrices[vertical, 1, 0] = amounts[vertical]
    return _warp(images, matrices, _no_offsets(len(images)))


# ---------------------------------------------------------------- compression

def jpeg(images, severity, rng):
    quality = _param(JPEG_QUALITY, severity)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def pixelate(images, severity, rng):
    h, w = images.shape[1:3]
    fraction = _param(PIXELATE_FRACTION, severity)
    small = (max(1, round(w * fraction)), max(1, round(h * fraction)))
    out = np.empty_like(images)
    for i, image in enumerate(images):
        low = Image.fromarray(image).resize(small, Image.Resampling.BOX)
        out[i] = np.asarray(low.resize((w, h), Image.Resampling.NEAREST))
    return out


# ---------------------------------------------------------------- occlusion

def patches(images, severity, rng):
    h, w = images.shape[1:3]
    count = _param(PATCH_COUNT, severity)
    side = _param(PATCH_SIDE, severity) * min(h, w)
    out = images.copy()
    for image in out:
        for _ in range(count):
            ph, pw = (np.clip(side * rng.uniform(0.7, 1.3, 2), 1, None)).astype(int)
            top, left = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
            image[top:top + ph, left:left + pw] = rng.integers(0, 256, 3)
    return out


def grid_mask(images, severity, rng):
    n, h, w, _ = images.shape
    # GridMask: square holes on a regular grid with a random period and offset per image.
    period = rng.integers(12, 33, size=n)[:, None, None]
    hole = np.maximum(1, np.rint(period * np.sqrt(_param(GRID_HOLE_AREA, severity)))).astype(int)
    offset_y = rng.integers(0, 1 << 16, size=n)[:, None, None]
    offset_x = rng.integers(0, 1 << 16, size=n)[:, None, None]
    ys, xs = np.mgrid[0:h, 0:w]
    hidden = ((ys + offset_y) % period < hole) & ((xs + offset_x) % period < hole)
    out = images.copy()
    out[hidden] = 0
    return out


# ---------------------------------------------------------------- registry

# Family order is also the order in which a mix is applied, following how an image is made:
# placed, focused, stained/lit, sensed with noise, covered, then stored.
FAMILIES = {
    "geometry": ("rotate", "flip", "zoom", "shift", "shear"),
    "blur": ("gaussian_blur", "motion_blur", "defocus_blur"),
    "colour": ("brightness", "contrast", "saturation", "hue", "gamma", "channel_swap"),
    "noise": ("gaussian_noise", "shot_noise", "salt_pepper"),
    "occlusion": ("patches", "grid_mask"),
    "compression": ("jpeg", "pixelate"),
}

CORRUPTIONS = {name: globals()[name] for names in FAMILIES.values() for name in names}
FAMILY_OF = {name: family for family, names in FAMILIES.items() for name in names}


def _check_images(images):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    return images


def apply(images, name, severity, rng, suite=None):
    """Apply one corruption at severity 0-5 to a uint8 batch (N, H, W, 3); returns a new uint8 array.

    suite: {name: function} to pick from (default: this module's CORRUPTIONS; trainer/heldout.py passes its own).
    """
    images = _check_images(images)
    suite = CORRUPTIONS if suite is None else suite
    if name not in suite:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(suite)}")
    if severity not in range(6):
        raise ValueError(f"severity must be an integer 0-5, got {severity!r}")
    if severity == 0 or len(images) == 0:
        return images.copy()
    return suite[name](images, int(severity), rng)


def _apply_grouped(images, plan, rng, suite=None):
    """Apply plan[i] = (name, severity) to image i, batching images that share a plan; suite order = pipeline order."""
    suite = CORRUPTIONS if suite is None else suite
    order = {name: i for i, name in enumerate(suite)}
    out = images.copy()
    for step in sorted(set(plan), key=lambda s: (order[s[0]], s[1])):
        rows = np.array([i for i, p in enumerate(plan) if p == step])
        out[rows] = apply(out[rows], step[0], step[1], rng, suite)
    return out


def corrupt_mix(images, seed=0, min_k=1, max_k=3, severities=(1, 5), suite=None):
    """Give each image k in [min_k, max_k] distinct random corruptions at random severities.

    Returns the corrupted copy and, per image, the list of (name, severity) in the order applied. suite: as in
    apply; its order is the order in which an image's corruptions are applied.
    """
    images = _check_images(images)
    suite = CORRUPTIONS if suite is None else suite
    low, high = severities
    if not 0 <= min_k <= max_k <= len(suite):
        raise ValueError(f"need 0 <= min_k <= max_k <= {len(suite)}, got {min_k}, {max_k}")
    if not 0 <= low <= high <= 5:
        raise ValueError(f"severities must be (low, high) within 0-5, got {severities}")
    rng = np.random.default_rng(seed)
    names = list(suite)
    recipes = []
    for _ in range(len(images)):
        k = rng.integers(min_k, max_k + 1)
        picked = sorted(rng.choice(len(names), size=k, replace=False))  # registry order = pipeline order
        recipes.append([(names[j], int(rng.integers(low, high + 1))) for j in picked])
    # Round r applies every image's r-th corruption, so same-(name, severity) images share one batched call.
    out = images.copy()
    for r in range(max_k):
        plan = [recipe[r] if r < len(recipe) else None for recipe in recipes]
        rows = np.array([i for i, step in enumerate(plan) if step is not None], dtype=np.intp)
        if len(rows):
            out[rows] = _apply_grouped(out[rows], [plan[i] for i in rows], rng, suite)
    return out, recipes


def apply_family(images, family, severity, seed=0):
    """Apply one randomly chosen corruption of `family` per image, all at `severity` (for per-family tables)."""
    images = _check_images(images)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    rng = np.random.default_rng(seed)
    names = FAMILIES[family]
    plan = [(names[j], severity) for j in rng.integers(len(names), size=len(images))]
    return _apply_grouped(images, plan, rng)


# ---------------------------------------------------------------- command line

def _fail(message):
    print(f"corrupt: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load(path):
    if not os.path.isfile(path):
        _fail(f"{path} not found; pass an existing .npz with an 'images' array")
    if not zipfile.is_zipfile(path):
        _fail(f"{path} is not an .npz archive; save the arrays with np.savez(path, images=..., labels=...)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                _fail(f"{path} has no 'images' key (keys: {', '.join(data.files) or 'none'}); "
                      "save it with np.savez(path, images=..., labels=...)")
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
    except (OSError, ValueError, EOFError) as error:
        _fail(f"cannot read {path} as .npz ({error}); pass a file written by np.savez")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        _fail(f"'images' in {path} is {images.dtype} {images.shape}; need uint8 (N, H, W, 3) RGB")
    if labels is not None and (labels.ndim == 0 or len(labels) != len(images)):
        _fail(f"{path} has {len(images)} images but labels of shape {labels.shape}; need one label per image")
    return images, labels


def _save_atomically(path, arrays):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        _fail(f"output folder {folder} does not exist; create it first")
    # Write next to the target and rename, so a crash never leaves a half-written OUT.npz.
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:  # plain open, so the file gets the usual permissions
            np.savez(f, **arrays)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m trainer corrupt",
        description="Write a corrupted copy of an .npz image set (a local pseudo-private test set).")
    parser.add_argument("input", help=".npz with 'images' uint8 (N, H, W, 3) and optional 'labels'")
    parser.add_argument("output", help="where to write the corrupted .npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-k", type=int, default=1, help="fewest corruptions per image")
    parser.add_argument("--max-k", type=int, default=3, help="most corruptions per image")
    args = parser.parse_args(argv)
    if not 0 <= args.min_k <= args.max_k <= len(CORRUPTIONS):
        _fail(f"need 0 <= --min-k <= --max-k <= {len(CORRUPTIONS)}, got {args.min_k} and {args.max_k}")

    images, labels = _load(args.input)
    corrupted, recipes = corrupt_mix(images, seed=args.seed, min_k=args.min_k, max_k=args.max_k)
    arrays = {"images": corrupted}
    if labels is not None:
        arrays["labels"] = labels
    _save_atomically(args.output, arrays)

    counts = Counter(name for recipe in recipes for name, _ in recipe)
    summary = " ".join(f"{name}={counts[name]}" for name in CORRUPTIONS if counts[name])
    print(f"corrupt: wrote {len(images)} images to {args.output} (seed {args.seed}, "
          f"k {args.min_k}-{args.max_k}): {summary or 'none'}")


if __name__ == "__main__":
    main()
