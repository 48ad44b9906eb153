"""The MedMNIST-C bloodmnist corruptions, our own numpy code, as a fixed external reference that training never sees."""
from __future__ import annotations

import functools
import importlib.util
import io
import math
import os
import zipfile

import numpy as np
from PIL import Image, ImageDraw

from . import heldout
from .config import PROFILES

# ---------------------------------------------------------------- the published definitions
#
# Di Salvo, Doerrich and Ledig, "MedMNIST-C: Comprehensive benchmark and improved classifier robustness by
# simulating realistic image corruptions", arXiv:2406.17536 (2024); parameters from the bloodmnist entry of
# CORRUPTIONS_DS in medmnistc/corruptions/registry.py of the PyPI package medmnistc 0.1.0. Each tuple holds
# severities 1..5 (the package counts them 0..4). Sizes are in pixels, applied here as they are: the package meant
# them for 224x224 images, so at 96x96 the blur, the ink and the bubbles cover 2.3x more of a cell.
PIXELATE_FACTOR = (0.6, 0.5, 0.4, 0.3, 0.25)  # side of the low-resolution copy, int(side * factor) pixels
JPEG_QUALITY = (50, 30, 15, 10, 7)
DEFOCUS = ((2, 0.01), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1))  # (disk radius px, sigma of its anti-aliasing)
MOTION = ((3, 3), (5, 5), (10, 5), (10, 7), (10, 9))  # ImageMagick (radius, sigma) px; angle uniform in +-45 deg
BRIGHTNESS_UP = (1.1, 1.2, 1.3, 1.35, 1.4)  # factor towards or past black (PIL ImageEnhance.Brightness)
BRIGHTNESS_DOWN = (0.9, 0.8, 0.7, 0.6, 0.5)
CONTRAST_UP = (1.1, 1.15, 1.2, 1.25, 1.3)  # factor around the mean grey (PIL ImageEnhance.Contrast)
CONTRAST_DOWN = (0.9, 0.8, 0.7, 0.6, 0.5)
SATURATE = (0.05, 0.10, 0.15, 0.17, 0.20)  # added to HSV saturation, clipped to 1
STAIN_MARKS = (1, 2, 3, 3, 3)  # most ink marks; 1 to this many, uniformly
# The package picks the ink set with key max(3, index) of the 0-based severity index: the 24 px inks ("3") at
# severities 1-4 and the 32 px ones ("4") at 5. So severities 3 and 4 are the same corruption.
STAIN_INK_SET = ("3", "3", "3", "3", "4")
STAIN_MARGIN = 10  # px an ink keeps from the image's border
BUBBLE = ((5, 10), (7, 10), (10, 10), (12, 12), (15, 12))  # (largest radius px, most bubbles); at least 7 bubbles
BUBBLE_SMALLEST_RADIUS = 3
BUBBLE_RIM = 2  # px of the brighter ring around each bubble
BUBBLE_ALPHA, BUBBLE_RIM_ALPHA = 100, 130  # white at these opacities (0-255) inside and on the ring

KINDS = ("pixelate", "jpeg_compression", "defocus_blur", "motion_blur", "brightness_up", "brightness_down",
         "contrast_up", "contrast_down", "saturate", "stain_deposit", "bubble")  # the package's order

# ---------------------------------------------------------------- seen or unseen in training
#
# The rule: a kind is "seen" when the training stage can draw the same operation, declared in heldout.py: its
# corruption of the in-distribution suite (trainer/corrupt.py) is in SEEN_IN_TRAINING. Parameters may differ
# (training's brightness adds where MedMNIST-C's scales; its saturation scales where this one adds to HSV
# saturation): the operation counts, not its strength. "unseen": the suite's corruption of that kind is held out
# from training, or the suite has none. Stain deposit is seen since `--erase-shape blot` exists: erasing can lay a
# ragged opaque blob of one colour (black for a third of those under `--erase-fill extremes`), which is what an
# ink blot is; the package's masks never reach training. Unseen is not unrelated: defocus's disk and motion blur's
# one-sided streak are near training's Gaussian blur, bubble's translucent discs near --veil's blobs (below).
SUITE_KIND = {"pixelate": "pixelate", "jpeg_compression": "jpeg", "defocus_blur": "defocus_blur",
              "motion_blur": "motion_blur", "brightness_up": "brightness", "brightness_down": "brightness",
              "contrast_up": "contrast", "contrast_down": "contrast", "saturate": "saturation",
              "stain_deposit": "patches", "bubble": None}
# Bubble's operation, a translucent light blend over part of the cell, is what --veil draws, without the discs'
# outline and ring. A kind an option reaches is seen for the kit once a profile turns the option on (the cpu
# profile trains with --veil), and for one run when that run did (split_for).
NEAREST_OPTION = {"bubble": "veil"}


def split_of(kind: str, profiles: dict = PROFILES) -> str:
    """"seen" when training draws the kind's operation: its suite corruption, or an option a profile turns on."""
    option = NEAREST_OPTION.get(kind)
    on = option is not None and any(settings.get(option) for settings in profiles.values())
    return "seen" if SUITE_KIND[kind] in heldout.SEEN_IN_TRAINING or on else "unseen"


SPLIT = {kind: split_of(kind) for kind in KINDS}
UNSEEN = tuple(kind for kind in KINDS if SPLIT[kind] == "unseen")


def split_for(settings: dict | None) -> dict:
    """{kind: "seen" or "unseen"} for one run: split_of with the run's own settings (its config.json) beside the
    profiles, so a --veil run counts bubble seen. None: the kit's split."""
    profiles = {**PROFILES, "this run": settings or {}}
    return {kind: split_of(kind, profiles) for kind in KINDS}

# The stain-deposit inks are data inside the package (medmnistc/assets/inks.npz): binary masks, ten per size.
INKS_ENV = "MEDMNIST_C_INKS"
INKS_HELP = (f"the stain-deposit inks ship inside the package medmnistc: `.venv/bin/pip install --no-deps "
             f"medmnistc==0.1.0` (make setup does it; --no-deps keeps PyTorch out), or set ${INKS_ENV} to its "
             f"medmnistc/assets/inks.npz")


# ---------------------------------------------------------------- input checks

def check_images(images) -> np.ndarray:
    """images as a uint8 (N, H, W, 3) array, or a ValueError naming what is wrong and how to fix it."""
    images = np.asarray(images)
    if images.ndim == 3 and images.shape[-1] == 3:
        raise ValueError(f"images have shape {images.shape}, one image; pass a batch (N, H, W, 3), e.g. image[None]")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images have shape {images.shape}; pass RGB batches shaped (N, H, W, 3)")
    if images.dtype != np.uint8:
        raise ValueError(f"images are {images.dtype}; pass uint8 pixels 0-255, e.g. "
                         "np.clip(np.rint(x), 0, 255).astype(np.uint8)")
    return images


def check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 0 <= severity <= 5:
        raise ValueError(f"severity must be an integer 1-5 (0 = unchanged), got {severity!r}")
    return int(severity)


# ---------------------------------------------------------------- compression

PRECISION_BITS = 22  # Pillow's fixed-point resampling of 8-bit images: 32 - 8 - 2 bits of fraction


def _box_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of Pillow's BOX resampling in its fixed point: output pixel j averages with equal
    weights the input pixels whose centres lie within half an output pixel of its centre (nearest neighbour when
    enlarging)."""
    scale = size_in / size_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    centre = (np.arange(size_out) + 0.5) * scale
    first = np.maximum((centre - support + 0.5).astype(int), 0)
    end = np.minimum((centre + support + 0.5).astype(int), size_in)
    x = np.arange(size_in)
    offset = (x[None, :] - centre[:, None] + 0.5) * (1.0 / filterscale)
    inside = (x >= first[:, None]) & (x < end[:, None]) & (offset > -0.5) & (offset <= 0.5)
    weights = inside / inside.sum(axis=1, keepdims=True)
    return np.floor(0.5 + weights * (1 << PRECISION_BITS))


def _resample(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's BOX resize of a uint8 batch: along the rows first, rounded to 8 bits, then along the columns.

    The sums are integers below 2^53, so float64 products (BLAS) give Pillow's integer arithmetic exactly."""
    half = float(1 << (PRECISION_BITS - 1))

    def one_axis(x, weights, axis):
        summed = np.moveaxis(np.tensordot(x.astype(np.float64), weights, axes=([axis], [1])), -1, axis)
        return np.clip(np.floor((summed + half) / (1 << PRECISION_BITS)), 0, 255).astype(np.uint8)
    if width != images.shape[2]:
        images = one_axis(images, _box_weights(images.shape[2], width), 2)
    if height != images.shape[1]:
        images = one_axis(images, _box_weights(images.shape[1], height), 1)
    return images


def pixelate(images, severity, rng):
    """Down to int(side * factor) pixels and back up, both with a box filter."""
    h, w = images.shape[1:3]
    factor = PIXELATE_FACTOR[severity - 1]
    return _resample(_resample(images, max(1, int(h * factor)), max(1, int(w * factor))), h, w)


def jpeg_compression(images, severity, rng):
    """Saved as JPEG at the severity's quality (Pillow's encoder and its default 4:2:0 chroma), then decoded."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY[severity - 1])
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


# ---------------------------------------------------------------- blur

def _defocus_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """The disk: pixels within radius of the centre, equal weights, on the package's 17x17 grid (its grid for radii
    up to 8, which every bloodmnist radius is), then smoothed by a 3x3 Gaussian of alias_sigma with mirrored
    borders (OpenCV's GaussianBlur in the package); float32."""
    ys, xs = np.mgrid[-8:9, -8:9]
    disk = (xs ** 2 + ys ** 2 <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_sigma ** 2))
    taps = (taps / taps.sum()).astype(np.float32)
    padded = np.pad(disk, 1, mode="reflect")  # numpy's reflect is OpenCV's default border (reflect-101)
    rows = sum(t * padded[:, k:k + disk.shape[1]] for k, t in enumerate(taps))
    return sum(t * rows[k:k + disk.shape[0]] for k, t in enumerate(taps)).astype(np.float32)


def _defocus(images: np.ndarray, radius: float, alias_sigma: float, chunk: int = 128) -> np.ndarray:
    """Convolution with the disk, on pixels / 255 in float64 with mirrored borders, clipped, times 255 and
    truncated to uint8 as the package does. Through the FFT (the disk has up to 113 taps), chunk images at a time:
    each takes about 0.6 MB of float64 and complex buffers."""
    if len(images) > chunk:
        return np.concatenate([_defocus(images[i:i + chunk], radius, alias_sigma, chunk)
                               for i in range(0, len(images), chunk)])
    kernel = _defocus_kernel(radius, alias_sigma).astype(np.float64)
    half = kernel.shape[0] // 2
    h, w = images.shape[1:3]
    padded = np.pad(images / 255.0, ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
    size = (h + 2 * half, w + 2 * half)
    spectrum = np.fft.rfft2(padded, s=size, axes=(1, 2))
    spectrum *= np.fft.rfft2(kernel, s=size)[None, :, :, None]
    # Circular convolution of the padded image; the kernel's centre sits at (half, half), so the image's own
    # pixels come out at rows and columns 2 * half onwards.
    blurred = np.fft.irfft2(spectrum, s=size, axes=(1, 2))[:, 2 * half:, 2 * half:][:, :h, :w]
    return (np.clip(blurred, 0, 1) * 255).astype(np.uint8)


def defocus_blur(images, severity, rng):
    """A disk kernel (an out-of-focus lens); deterministic."""
    return _defocus(images, *DEFOCUS[severity - 1])


SQRT_2PI = math.sqrt(2 * math.pi)


def _motion_blur(images: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's motion blur (MotionBlurImage, the package's Wand call) at one angle per image, in degrees.

    2 ceil(radius) + 1 taps, one-sided: pixel (x, y) is the weighted sum of the pixels at (x, y) + i (cos a, sin a)
    rounded to the grid, i = 0, 1, ..., weights exp(-i^2 / 2 sigma^2) normalised; reads past the border repeat the
    edge. In ImageMagick 6.9.11 Q16's numbers: 16-bit pixels (8-bit * 257), the sum rounded to 16 bits, and the
    8-bit PNG the package reads back holds that divided by 257, truncated (rounding instead would differ from
    the package in half the pixels)."""
    taps = int(2 * math.ceil(radius) + 1)
    weights = [math.exp(-(i * i) / (2.0 * sigma * sigma)) / (SQRT_2PI * sigma) for i in range(taps)]
    total = 0.0
    for weight in weights:  # summed in order, as ImageMagick does, so the weights agree to the last bit
        total += weight
    weights = [weight / total for weight in weights]
    n, h, w, _ = images.shape
    radians = np.pi * np.asarray(angles, np.float64) / 180.0
    along_x, along_y = taps * np.sin(radians), taps * np.cos(radians)  # ImageMagick's point.x and point.y
    length = np.hypot(along_x, along_y)
    pad = taps - 1
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge") * 257.0  # exact in float64
    summed = np.zeros(images.shape, np.float64)
    term = np.empty(images.shape[1:], np.float64)
    dx = np.ceil(np.arange(taps)[:, None] * along_y / length - 0.5).astype(int)  # (taps, N)
    dy = np.ceil(np.arange(taps)[:, None] * along_x / length - 0.5).astype(int)
    # One image at a time: each tap is then a plain slice; gathers or grouped fancy indexing over the batch moved
    # several times the data and ran 3-10x slower.
    for k in range(n):
        for i, weight in enumerate(weights):
            top, left = pad + dy[i, k], pad + dx[i, k]
            np.multiply(padded[k, top:top + h, left:left + w], weight, out=term)
            summed[k] += term
    quantum = np.where(summed >= 65535, 65535, np.floor(np.maximum(summed, 0) + 0.5))
    return (quantum // 257).astype(np.uint8)


def motion_blur(images, severity, rng):
    """A streak in a random direction within 45 degrees of horizontal (camera or stage moving)."""
    return _motion_blur(images, *MOTION[severity - 1], rng.uniform(-45, 45, len(images)))


# ---------------------------------------------------------------- colour

def _blend(base, images: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's Image.blend(base, images, factor) in its float32 arithmetic: base + factor (image - base), clipped
    and truncated to uint8."""
    base = np.asarray(base, np.float32)
    mixed = base + np.float32(factor) * (images.astype(np.float32) - base)
    return np.clip(np.trunc(mixed), 0, 255).astype(np.uint8)


def brightness_up(images, severity, rng):
    """Every pixel scaled by the factor (a blend away from black), clipped at white."""
    return _blend(0, images, BRIGHTNESS_UP[severity - 1])


def brightness_down(images, severity, rng):
    return _blend(0, images, BRIGHTNESS_DOWN[severity - 1])


def _mean_grey(images: np.ndarray) -> np.ndarray:
    """Per image (N, 1, 1, 1): the mean of Pillow's 8-bit grey (ITU-R 601-2 luma in 16-bit fixed point), rounded."""
    weights = np.array([19595, 38470, 7471], np.int64)
    grey = (images.astype(np.int64) @ weights + 0x8000) >> 16
    return np.floor(grey.mean(axis=(1, 2)) + 0.5).reshape(-1, 1, 1, 1)


def contrast_up(images, severity, rng):
    """Pixels moved away from the image's mean grey by the factor."""
    return _blend(_mean_grey(images), images, CONTRAST_UP[severity - 1])


def contrast_down(images, severity, rng):
    return _blend(_mean_grey(images), images, CONTRAST_DOWN[severity - 1])


def _rgb_to_hsv(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple:
    """Hue, saturation and value (each 0-1) of float RGB planes in 0-1, with scikit-image's rgb2hsv's arithmetic;
    where two channels share the maximum, the later channel's hue formula holds, as there."""
    value = np.maximum(np.maximum(r, g), b)
    delta = value - np.minimum(np.minimum(r, g), b)
    grey = delta == 0
    safe = np.where(grey, 1.0, delta)
    hue = np.where(b == value, 4.0 + (r - g) / safe, np.where(g == value, 2.0 + (b - r) / safe, (g - b) / safe))
    hue = np.where(grey, 0.0, np.mod(hue / 6.0, 1.0))
    saturation = np.where(grey, 0.0, delta / np.where(grey, 1.0, value))
    return hue, saturation, value


# Which of (v, t, p, q) each channel takes in each of the six hue sectors (the standard HSV to RGB table).
HSV_SECTORS = np.array([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]])


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The inverse of _rgb_to_hsv, with scikit-image's hsv2rgb's arithmetic: RGB (..., 3)."""
    sector = np.floor(h * 6)
    f = h * 6 - sector
    values = (v, v * (1 - (1 - f) * s), v * (1 - s), v * (1 - f * s))
    sector = sector.astype(np.uint8) % 6
    return np.stack([np.choose(HSV_SECTORS[:, c][sector], values) for c in range(3)], axis=-1)


def saturate(images, severity, rng):
    """HSV saturation raised by a constant (colours deepen, grey stays grey), in float64 as scikit-image does."""
    r, g, b = (np.ascontiguousarray(images[..., c]) / 255.0 for c in range(3))  # planes: strided ones ran 5x slower
    h, s, v = _rgb_to_hsv(r, g, b)
    return (np.clip(_hsv_to_rgb(h, np.clip(s + SATURATE[severity - 1], 0, 1), v), 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------- microscopy

def inks_path(path: str | None = None) -> str | None:
    """The stain-deposit inks file: path, else $MEDMNIST_C_INKS, else the one inside an installed medmnistc
    (found without importing it: its modules import PyTorch); None when none exists."""
    path = path or os.environ.get(INKS_ENV)
    if path:
        return path if os.path.isfile(path) else None
    spec = importlib.util.find_spec("medmnistc")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = os.path.join(folder, "assets", "inks.npz")
        if os.path.isfile(found):
            return found
    return None


def load_inks(path: str | None = None) -> dict:
    """{ink set: bool masks (10, side, side)} from inks_path(path), or FileNotFoundError saying how to get them."""
    found = inks_path(path)
    if found is None:
        where = path or os.environ.get(INKS_ENV)
        raise FileNotFoundError((f"{where} does not exist; " if where else "no stain-deposit inks: ") + INKS_HELP)
    return _read_inks(os.path.abspath(found))


@functools.lru_cache(maxsize=4)
def _read_inks(path: str) -> dict:
    """The masks of one inks file, read once per process (cached by the resolved path, so a changed
    $MEDMNIST_C_INKS is seen)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive, so not the package's inks.npz; {INKS_HELP}")
    with np.load(path, allow_pickle=False) as data:
        missing = sorted(key for key in set(STAIN_INK_SET) if key not in data.files)
        if missing:
            raise ValueError(f"{path} has no ink set(s) {missing} (keys: {data.files}); {INKS_HELP}")
        return {key: data[key].astype(bool) for key in set(STAIN_INK_SET)}


def _stain(images: np.ndarray, masks: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Black ink: marks (N, M, 3) holds (ink, top, left) per image and mark, ink -1 for none; the ink's pixels go
    to 0 in every channel."""
    out = images.copy()
    side = masks.shape[1]
    steps = np.arange(side)
    for m in range(marks.shape[1]):
        rows_of = np.flatnonzero(marks[:, m, 0] >= 0)
        ink, top, left = marks[rows_of, m].T
        rows = (top[:, None] + steps)[:, :, None]
        cols = (left[:, None] + steps)[:, None, :]
        patch = out[rows_of[:, None, None], rows, cols]
        patch[masks[ink]] = 0
        out[rows_of[:, None, None], rows, cols] = patch
    return out


def stain_deposit(images, severity, rng, inks: dict | None = None):
    """1 to STAIN_MARKS dark ink blots from the package's masks, at least STAIN_MARGIN px inside the border."""
    masks = (inks or load_inks())[STAIN_INK_SET[severity - 1]]
    n, h, w, _ = images.shape
    side = masks.shape[1]
    if min(h, w) < side + 2 * STAIN_MARGIN:
        raise ValueError(f"stain deposit at severity {severity} needs images of at least {side + 2 * STAIN_MARGIN}"
                         f" px a side (its {side} px inks keep {STAIN_MARGIN} px from the border); got {h}x{w}")
    most = STAIN_MARKS[severity - 1]
    count = rng.integers(1, most, n, endpoint=True)
    marks = np.stack([rng.integers(0, len(masks), (n, most)),
                      rng.integers(STAIN_MARGIN, h - side - STAIN_MARGIN, (n, most), endpoint=True),
                      rng.integers(STAIN_MARGIN, w - side - STAIN_MARGIN, (n, most), endpoint=True)], axis=-1)
    marks[np.arange(most)[None, :] >= count[:, None], 0] = -1
    return _stain(images, masks, marks)


def _bubble_alpha(shape: tuple, bubbles) -> np.ndarray:
    """(H, W) uint8 opacity of one image's bubbles [(x, y, radius)], drawn in order with Pillow's ellipse: a ring
    BUBBLE_RIM px wide at BUBBLE_RIM_ALPHA, the inside at BUBBLE_ALPHA, a later bubble over an earlier one."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for x, y, r in bubbles:
        outer = r + BUBBLE_RIM
        draw.ellipse((x - outer, y - outer, x + outer, y + outer), fill=BUBBLE_RIM_ALPHA)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=BUBBLE_ALPHA)
    return np.asarray(canvas)


def _bubble(images: np.ndarray, bubbles: list) -> np.ndarray:
    """White laid over each image at its bubbles' opacity, rounded as Pillow's paste with a mask does."""
    alpha = np.stack([_bubble_alpha(images.shape[1:3], b) for b in bubbles]).astype(np.int32)[..., None]
    mixed = images.astype(np.int32) * (255 - alpha) + 255 * alpha + 128
    return (((mixed >> 8) + mixed) >> 8).astype(np.uint8)


def bubble(images, severity, rng):
    """7 to the severity's most translucent white bubbles of radius 3 to its largest, whole inside the image."""
    largest, most = BUBBLE[severity - 1]
    n, h, w, _ = images.shape
    if min(h, w) < 2 * largest:
        raise ValueError(f"bubble at severity {severity} needs images of at least {2 * largest} px a side; "
                         f"got {h}x{w}")
    bubbles = []
    for _ in range(n):
        drawn = []
        for _ in range(int(rng.integers(7, most, endpoint=True))):
            r = int(rng.integers(BUBBLE_SMALLEST_RADIUS, largest, endpoint=True))
            drawn.append((int(rng.integers(r, w - r, endpoint=True)), int(rng.integers(r, h - r, endpoint=True)), r))
        bubbles.append(drawn)
    return _bubble(images, bubbles)


# ---------------------------------------------------------------- registry

CORRUPTIONS = {kind: globals()[kind] for kind in KINDS}


def apply(images, kind: str, severity: int, rng: np.random.Generator, inks: dict | None = None) -> np.ndarray:
    """One MedMNIST-C corruption at severity 1-5 (0 = unchanged copy) on a uint8 batch (N, H, W, 3); a new array.

    inks: load_inks()'s masks for stain_deposit (default: found as inks_path() says)."""
    images = check_images(images)
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown MedMNIST-C corruption {kind!r}; choose from {', '.join(KINDS)}")
    severity = check_severity(severity)
    if severity == 0 or len(images) == 0:
        return images.copy()
    if kind == "stain_deposit":
        return stain_deposit(images, severity, rng, inks)
    return CORRUPTIONS[kind](images, severity, rng)
